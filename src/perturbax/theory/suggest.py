"""Design suggestions: which experiments to add so that target perturbations become covered.

:func:`suggest_additions` takes a training design, target perturbations and candidate experiments
(default: every elementary perturbation alone) and returns a short list of candidates to add.

What the greedy search guarantees
---------------------------------
Let ``r_j`` be the part of target ``j`` (minus the reference) outside the current row space.
Adding candidate ``c`` lowers ``sum_j ||r_j||^2`` by ``sum_j (r_j . c)^2 / ||c_perp||^2`` where
``c_perp`` is the part of ``c`` outside the row space. Each step adds the candidate with the
largest reduction (ties: first in candidate order), then

1. the search stops as soon as every target is covered; it fails only if no candidate reduces the
   residual, and then no set of the given candidates covers the remaining targets (if the
   candidates together covered a target, some candidate would have a non-zero ``r_j . c``);
2. every addition raises the rank of the design by exactly one, so there are at most
   ``K - rank`` additions;
3. afterwards additions that are not needed are dropped (last first), so the result is
   irredundant: removing any one of them uncovers a target;
4. ``lower_bound`` = numerical rank of the targets' residuals: no set of additions of any kind
   can be smaller. When the result has that size it is a minimum (``minimal=True``).

Finding a minimum set among the candidates is NP-hard in general (it contains sparse recovery),
so ``minimal`` can be ``False`` for a result that is nevertheless the best available; with
unit-vector candidates and a target whose missing part involves several perturbations the greedy
result usually meets the bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from perturbax.data.labels import PerturbationRegistry
from perturbax.theory._design_input import prepare_design, resolve_registry
from perturbax.theory.report import FAIL, OK, ReportMixin, fmt, join_names
from perturbax.theory.rowspace import DEFAULT_RESIDUAL_RTOL, DEFAULT_RTOL, RowSpace

__all__ = ["SuggestionReport", "suggest_additions"]


class _Candidates:
    """Candidate difference vectors: explicit rows or (``C is None``) the unit vectors."""

    def __init__(self, space: RowSpace, C: np.ndarray | None, q2: np.ndarray | None = None):
        self.C = C
        if C is None:
            self.n = space.K
            self.norm2 = np.ones(space.K)
            self.q2 = (space.elementary_residuals() ** 2) if q2 is None else q2.copy()
        else:
            self.n = C.shape[0]
            self.norm2 = np.sum(C * C, axis=1)
            self.q2 = np.sum(space.residuals(C) ** 2, axis=1) if q2 is None else q2.copy()

    def dot(self, R: np.ndarray) -> np.ndarray:
        return R.copy() if self.C is None else R @ self.C.T

    def apply(self, q: np.ndarray) -> np.ndarray:
        return q.copy() if self.C is None else self.C @ q

    def vector(self, j: int, K: int) -> np.ndarray:
        if self.C is None:
            v = np.zeros(K)
            v[j] = 1.0
            return v
        return self.C[j].copy()


def _orth_against(v: np.ndarray, Q: list[np.ndarray]) -> np.ndarray:
    for _ in range(2):  # classical Gram-Schmidt, twice
        for q in Q:
            v = v - (q @ v) * q
    return v


def _greedy_cover(
    space: RowSpace,
    R0: np.ndarray,
    tnorm: np.ndarray,
    cand: _Candidates,
    *,
    residual_rtol: float,
    max_additions: int | None,
    prefer: np.ndarray | None = None,
) -> tuple[list[int], list[float]]:
    """Greedy additions (candidate indices) and the total squared residual after each step.
    Ties (scores within 1e-9 relative) go to the first ``prefer``-ed candidate, else the first."""
    K = space.K
    R = R0.copy()
    M = cand.dot(R)  # (m, n_cand): r_j . c
    q2 = cand.q2.copy()
    Q: list[np.ndarray] = []
    chosen: list[int] = []
    history: list[float] = []
    limit = K if max_additions is None else max_additions
    floor = 1e-4 * residual_rtol**2 * float(np.sum(tnorm**2))
    while len(chosen) < limit:
        rn = np.linalg.norm(R, axis=1)
        if np.all(rn <= residual_rtol * tnorm):
            break
        valid = q2 > (residual_rtol**2) * cand.norm2
        score = np.where(valid, np.sum(M * M, axis=0) / np.where(valid, q2, 1.0), -np.inf)
        best_val = float(np.max(score))
        if not np.isfinite(best_val) or best_val <= floor:
            break
        ties = np.flatnonzero(score >= best_val * (1 - 1e-9))
        if prefer is not None and prefer[ties].any():
            ties = ties[prefer[ties]]
        best = int(ties[0])
        v = _orth_against(space.residuals(cand.vector(best, K))[0], Q)
        nv = float(np.linalg.norm(v))
        if nv == 0.0:  # pragma: no cover - excluded by `valid`
            q2[best] = 0.0
            continue
        qhat = v / nv
        Rq = R @ qhat
        R -= np.outer(Rq, qhat)
        cq = cand.apply(qhat)
        M -= np.outer(Rq, cq)
        q2 = q2 - cq**2
        q2[best] = 0.0
        Q.append(qhat)
        chosen.append(best)
        history.append(float(np.sum(R * R)))
    return chosen, history


def _covered_with(R0: np.ndarray, tnorm: np.ndarray, P: list[np.ndarray], residual_rtol: float) -> np.ndarray:
    """Coverage of targets with residuals ``R0`` once vectors ``P`` (parts outside the original row
    space) are added."""
    if not P:
        R = R0
    else:
        Q, _ = np.linalg.qr(np.stack(P, axis=1))
        R = R0 - (R0 @ Q) @ Q.T
    return np.linalg.norm(R, axis=1) <= residual_rtol * tnorm


def _prune(R0, tnorm, P: list[np.ndarray], residual_rtol: float) -> list[int]:
    """Indices into ``P`` that are kept: additions are dropped last-first while coverage holds."""
    keep = list(range(len(P)))
    for i in reversed(range(len(P))):
        trial = [j for j in keep if j != i]
        if np.all(_covered_with(R0, tnorm, [P[j] for j in trial], residual_rtol)):
            keep = trial
    return keep


def _lower_bound(R0: np.ndarray, tnorm: np.ndarray, residual_rtol: float) -> int:
    todo = np.linalg.norm(R0, axis=1) > residual_rtol * tnorm
    if not todo.any():
        return 0
    Rn = R0[todo] / tnorm[todo, None]
    cols = np.flatnonzero(np.any(Rn != 0, axis=0))
    s = np.linalg.svd(Rn[:, cols], compute_uv=False)
    return int(np.sum(s > residual_rtol))


def greedy_unit_additions(
    space: RowSpace,
    r: np.ndarray,
    tnorm: float | np.ndarray,
    residual_rtol: float,
    q2: np.ndarray,
    prefer: np.ndarray | None = None,
    prune: bool = True,
) -> list[int]:
    """Elementary perturbations to add alone so that vectors with residuals ``r`` (one vector or
    rows of a matrix, norms ``tnorm``) are covered (greedy + pruning on unit-vector candidates);
    ``q2`` = squared elementary residuals; ties go to ``prefer``-ed perturbations (e.g. those in
    the test). ``prune=False`` skips the pruning, which cannot shorten the list when the targets are
    unit vectors of every unidentified perturbation (each addition then raises the rank by one, and
    ``K - rank`` additions are needed)."""
    R0 = np.atleast_2d(r)
    tn = np.broadcast_to(np.asarray(tnorm, dtype=np.float64), (R0.shape[0],)).copy()
    cand = _Candidates(space, None, q2)
    chosen, _ = _greedy_cover(
        space, R0, tn, cand, residual_rtol=residual_rtol, max_additions=None, prefer=prefer
    )
    if not chosen:
        return []
    P = [space.residuals(cand.vector(j, space.K))[0] for j in chosen]
    if not np.all(_covered_with(R0, tn, P, residual_rtol)):
        return []
    return [chosen[i] for i in _prune(R0, tn, P, residual_rtol)] if prune else chosen


@dataclass(frozen=True, eq=False, repr=False)
class SuggestionReport(ReportMixin):
    """Result of :func:`suggest_additions`.

    Attributes
    ----------
    status
        ``"ok"`` when all targets are covered after the additions (also when nothing was needed),
        ``"fail"`` when some targets cannot be covered by any of the candidates.
    additions
        Labels of the experiments to add, in the order chosen.
    addition_vectors
        Their label vectors, ``(n_additions, K)``.
    candidate_indices
        Their positions in the candidate list (for unit-vector candidates: the elementary index).
    targets
        Target labels.
    covered_before, covered_after
        Per target.
    residual_before, residual_after
        Relative residual ``||t - P t|| / ||t||`` per target (``t`` = target minus reference).
    lower_bound
        No set of additions covering every coverable target can be smaller than this.
    minimal
        ``len(additions) == lower_bound`` (the result is a minimum).
    message
        What to do.
    """

    status: str
    message: str
    additions: tuple[str, ...]
    addition_vectors: np.ndarray
    candidate_indices: tuple[int, ...]
    targets: tuple[str, ...]
    covered_before: np.ndarray
    covered_after: np.ndarray
    residual_before: np.ndarray
    residual_after: np.ndarray
    lower_bound: int
    minimal: bool

    @property
    def uncoverable(self) -> tuple[str, ...]:
        """Targets still not covered after the additions."""
        return tuple(t for t, c in zip(self.targets, self.covered_after) if not c)

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "message": self.message,
            "additions": list(self.additions),
            "candidate_indices": list(self.candidate_indices),
            "lower_bound": self.lower_bound,
            "minimal": self.minimal,
            "targets": [
                {
                    "label": t,
                    "covered_before": bool(cb),
                    "covered_after": bool(ca),
                    "relative_residual_before": float(rb),
                    "relative_residual_after": float(ra),
                }
                for t, cb, ca, rb, ra in zip(
                    self.targets, self.covered_before, self.covered_after, self.residual_before, self.residual_after
                )
            ],
        }

    def render(self) -> str:
        lines = [f"Design suggestion: {self.status.upper()}"]
        if self.additions:
            tag = "minimum" if self.minimal else f"irredundant; at least {self.lower_bound} needed"
            lines.append(f"  add ({len(self.additions)}, {tag}): {join_names(self.additions)}")
        for t, cb, ca, rb, ra in zip(
            self.targets, self.covered_before, self.covered_after, self.residual_before, self.residual_after
        ):
            before = "covered" if cb else f"not covered (residual {fmt(rb)})"
            after = "covered" if ca else f"NOT covered (residual {fmt(ra)})"
            lines.append(f"  {t}: {before} -> {after}")
        lines.append(self.message)
        return "\n".join(lines)


def suggest_additions(
    train,
    targets,
    *,
    candidates=None,
    names: Sequence[str] | None = None,
    registry: PerturbationRegistry | None = None,
    reference=None,
    rtol: float = DEFAULT_RTOL,
    residual_rtol: float = DEFAULT_RESIDUAL_RTOL,
    max_additions: int | None = None,
    method: str = "auto",
) -> SuggestionReport:
    """A short list of experiments whose addition makes every target perturbation covered.

    Parameters
    ----------
    train
        Training design: label vectors ``(n, K)`` (dense or sparse) or label strings/mappings
        (then ``names`` or ``registry`` is needed). The control is the zero vector.
    targets
        Perturbations that should become covered (same forms).
    candidates
        Experiments that may be added (same forms). Default: every elementary perturbation alone
        at dose 1.
    names, registry
        Names of the elementary perturbations (columns).
    reference
        Reference label ``l_0`` (default the control, the zero vector), or a row index of ``train``.
    rtol, residual_rtol
        Rank tolerance (relative to the largest singular value) and coverage tolerance (relative
        residual), as in :func:`perturbax.theory.check_design`.
    max_additions
        Stop after this many additions (default: no limit).
    method
        Row-space method (``"auto"``, ``"svd"``, ``"peel"``), see :mod:`perturbax.theory.rowspace`.

    See the module docstring for what the greedy search guarantees.
    """
    reg = resolve_registry(names, registry, train, targets, candidates)
    prep = prepare_design(train, reg, reference=reference)
    space = RowSpace.from_rows(prep.D, rtol=rtol, method=method)
    T, tlabels = prep.differences(targets, "targets")
    if T.shape[0] == 0:
        raise ValueError("No targets given; pass the perturbations that should become covered.")
    Td = T.toarray()
    tnorm = np.linalg.norm(Td, axis=1)
    R0 = space.residuals(Td)
    rel0 = np.linalg.norm(R0, axis=1) / np.where(tnorm > 0, tnorm, 1.0)
    covered0 = rel0 <= residual_rtol

    if candidates is None:
        unit_ok = not np.any(prep.reference)
        if unit_ok:
            cand = _Candidates(space, None)
            cand_labels = list(reg.names)
            cand_rows = None
        else:
            cand_rows = np.eye(reg.K) - prep.reference[None, :]
            cand = _Candidates(space, cand_rows)
            cand_labels = list(reg.names)
    else:
        Cs, cand_labels = prep.differences(candidates, "candidates")
        if Cs.shape[0] == 0:
            raise ValueError("candidates is empty; pass None to use every elementary perturbation alone.")
        cand_rows = Cs.toarray()
        cand = _Candidates(space, cand_rows)

    chosen, _ = _greedy_cover(space, R0, tnorm, cand, residual_rtol=residual_rtol, max_additions=max_additions)
    P = [space.residuals(cand.vector(j, reg.K))[0] for j in chosen]
    coverable_now = _covered_with(R0, tnorm, P, residual_rtol)
    # prune only against the targets that the greedy additions do cover
    keep = _prune(R0[coverable_now], tnorm[coverable_now], P, residual_rtol) if chosen else []
    chosen = [chosen[i] for i in keep]
    P = [P[i] for i in keep]
    covered1 = _covered_with(R0, tnorm, P, residual_rtol)
    if P:
        Q, _ = np.linalg.qr(np.stack(P, axis=1))
        R1 = R0 - (R0 @ Q) @ Q.T
    else:
        R1 = R0
    rel1 = np.linalg.norm(R1, axis=1) / np.where(tnorm > 0, tnorm, 1.0)
    lower = _lower_bound(R0[covered1], tnorm[covered1], residual_rtol)

    if cand_rows is None:
        vecs = np.zeros((len(chosen), reg.K))
        vecs[np.arange(len(chosen)), chosen] = 1.0
    else:
        vecs = cand_rows[chosen] + prep.reference[None, :]
    additions = tuple(cand_labels[j] for j in chosen)

    n_todo = int((~covered0).sum())
    if covered1.all():
        status = OK
        if n_todo == 0:
            message = "All targets are already covered; nothing to add."
        else:
            what = "alone" if candidates is None else ""
            message = (
                f"Add {join_names(additions)}{' ' + what if what else ''} to cover "
                f"{n_todo} uncovered target(s)"
                + (
                    "; this is the smallest possible number of additions."
                    if len(chosen) == lower
                    else f"; at least {lower} addition(s) are needed by any design, none of these can be dropped."
                )
            )
    else:
        status = FAIL
        stuck = [t for t, c in zip(tlabels, covered1) if not c]
        message = (
            f"No combination of the candidates covers {join_names(stuck)}: their missing directions "
            f"are not reachable from the candidate experiments. Add candidates that contain the "
            f"missing perturbations (e.g. the elementary perturbations alone)."
        )
        if chosen:
            message = f"Add {join_names(additions)} to cover what can be covered. " + message
    vecs.flags.writeable = False
    return SuggestionReport(
        status=status,
        message=message,
        additions=additions,
        addition_vectors=vecs,
        candidate_indices=tuple(int(j) for j in chosen),
        targets=tuple(tlabels),
        covered_before=covered0,
        covered_after=covered1,
        residual_before=rel0,
        residual_after=rel1,
        lower_bound=lower,
        minimal=len(chosen) == lower,
    )
