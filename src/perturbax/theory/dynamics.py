"""Dynamics-level identifiability checks for the latent dynamical causal model (DESIGN 2.2, 3).

Model: ``l`` latent programs follow ``dz/dt = (B - I)(z - mu) + S l`` after the perturbation is
switched on at ``t = 0``; cells are snapshots at times ``t_i``. Identifiability of the programs
rests on *contexts* -- distinct (perturbation, time) pairs -- changing the latent distribution
enough (iVAE / latent-causal-model style results, see ``notes/identifiability.md`` B and D):

- :func:`count_contexts`: the distinct contexts of a design with times. Time alone gives only
  ``T + 1`` contexts; crossing perturbations with times is what supplies ``2l + 1``.
- :func:`check_variability`: *sufficient variability*. With per-context Gaussian latent
  parameters (means ``m``, variances ``v`` per program) the natural parameters are
  ``eta = [m / v, -1 / (2 v)]`` in ``R^{2l}``; the stacked differences ``eta(u_k) - eta(u_0)``
  must have rank ``2l`` (needs at least ``2l + 1`` contexts). That rank gives programs identified
  up to permutation and scaling only under the premise of the iVAE result that the programs are
  INDEPENDENT given the context (within-context covariance diagonal); checked when the
  covariances are given. The latent dynamics model does not meet it in general: its programs
  are coupled through the shared ``B`` (correlated within a context under relaxing
  heterogeneity) or only their means change (the default, persistent heterogeneity). If only the
  means vary (or the premise fails), the best possible is the weaker *mean-only* condition (rank
  ``l`` of the mean shifts), which identifies the programs only up to an affine map.
- :func:`dynamics_context_moments`: the per-context latent means and covariances that the linear
  dynamics model implies, the input of :func:`check_variability` for a model's own design.
- :func:`check_targets`: intervention targets. Every program is targeted by some measured
  perturbation, no two programs are always targeted together, and control cells are present.
- :func:`check_dynamics`: all of the above in one report.
- :func:`check_order_from_effects`: whether the causal order of the programs (and ``B``) can be
  read from the total effects ``W = (I - B)^{-1} S`` given the targets' support: only when every
  program is the SOLE target of some perturbation.
- :func:`check_order_design`: the same question asked of a training design before any fit (what
  ``fit``'s default recipe for the dynamics model checks first).

The linear model links to the additive-shift model through ``W = (I - B)^{-1} S``
(:func:`bs_to_w`); ``W`` alone does not determine ``B`` and ``S`` (:func:`w_to_bs`,
:func:`equivalent_bs`).

All checks are pure functions on arrays (float64) with explicit tolerances.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from perturbax.data.labels import PerturbationRegistry
from perturbax.models.linear_scm import _check_bs, bs_to_w, equivalent_bs, sole_targets, w_to_bs
from perturbax.theory._design_input import as_label_rows, resolve_registry, row_labels
from perturbax.theory.report import FAIL, OK, WARNING, ReportMixin, fmt, join_names, top_weights, worst_status

__all__ = [
    "ContextReport",
    "VariabilityReport",
    "TargetReport",
    "DynamicsReport",
    "OrderReport",
    "count_contexts",
    "check_variability",
    "check_targets",
    "check_dynamics",
    "check_order_from_effects",
    "check_order_design",
    "natural_parameters",
    "dynamics_context_moments",
    "bs_to_w",
    "w_to_bs",
    "equivalent_bs",
]


# --------------------------------------------------------------------------- contexts
@dataclass(frozen=True, eq=False, repr=False)
class ContextReport(ReportMixin):
    """Distinct (perturbation, time) contexts of a design.

    Attributes
    ----------
    n_contexts, n_perturbations, n_times
        Distinct (perturbation, time) pairs, perturbations, times.
    contexts
        ``(label, time)`` of every context (time ``None`` without times), sorted.
    times
        Distinct times, sorted.
    control_present
        Some row is the control (zero label).
    n_crossed
        Perturbations measured at two or more times.
    latent_dim
        Number of latent programs ``l`` (if given): ``2l + 1`` contexts are needed for the full
        sufficient-variability condition, ``l + 1`` for the mean-only one.
    """

    status: str
    message: str
    n_contexts: int
    n_perturbations: int
    n_times: int
    contexts: tuple[tuple[str, float | None], ...]
    times: np.ndarray
    control_present: bool
    n_crossed: int
    latent_dim: int | None

    @property
    def required_full(self) -> int | None:
        return None if self.latent_dim is None else 2 * self.latent_dim + 1

    @property
    def required_mean_only(self) -> int | None:
        return None if self.latent_dim is None else self.latent_dim + 1

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "message": self.message,
            "n_contexts": self.n_contexts,
            "n_perturbations": self.n_perturbations,
            "n_times": self.n_times,
            "times": [float(t) for t in self.times],
            "control_present": self.control_present,
            "n_crossed": self.n_crossed,
            "latent_dim": self.latent_dim,
            "required_full": self.required_full,
            "required_mean_only": self.required_mean_only,
            "contexts": [{"label": lab, "time": t} for lab, t in self.contexts],
        }

    def render(self) -> str:
        lines = [
            f"Contexts: {self.status.upper()}",
            f"  {self.n_contexts} distinct (perturbation, time) contexts from {self.n_perturbations} "
            f"perturbation(s) x {self.n_times} time(s); control {'present' if self.control_present else 'ABSENT'}",
        ]
        if self.latent_dim is not None:
            lines.append(
                f"  needed for {self.latent_dim} programs: {self.required_full} (full), "
                f"{self.required_mean_only} (mean-only)"
            )
        lines.append(f"  {self.message}")
        return "\n".join(lines)


def _label_ids(M: sp.csr_matrix) -> tuple[np.ndarray, list[int]]:
    """Integer id of each row's label (equal rows share an id) and the first row of each id."""
    ip, ind, dat = M.indptr, M.indices, M.data
    seen: dict[tuple[bytes, bytes], int] = {}
    ids = np.empty(M.shape[0], dtype=np.int64)
    first: list[int] = []
    for i in range(M.shape[0]):
        key = (ind[ip[i] : ip[i + 1]].tobytes(), dat[ip[i] : ip[i + 1]].tobytes())
        j = seen.get(key)
        if j is None:
            j = seen[key] = len(first)
            first.append(i)
        ids[i] = j
    return ids, first


def count_contexts(
    design,
    times=None,
    *,
    names: Sequence[str] | None = None,
    registry: PerturbationRegistry | None = None,
    latent_dim: int | None = None,
) -> ContextReport:
    """Count the distinct (perturbation, time) contexts of a design.

    Parameters
    ----------
    design
        One label vector (or label string, with ``names``) per cell or per measured condition,
        ``(n, K)``.
    times
        Time of each row, ``(n,)`` (``None``: no time axis; contexts are the perturbations).
    latent_dim
        Number of latent programs ``l``. Status ``ok`` with at least ``2l + 1`` contexts,
        ``warning`` with at least ``l + 1`` (only the mean-only condition can hold), else ``fail``.
        Without it: ``ok`` when the control is present, else ``warning``.
    """
    reg = resolve_registry(names, registry, design)
    M, _ = as_label_rows(design, reg, "design")
    n = M.shape[0]
    if n == 0:
        raise ValueError("The design has no rows.")
    ids, first = _label_ids(M)
    labels = row_labels(M, reg, first)
    control_present = any(M.indptr[i] == M.indptr[i + 1] for i in first)
    if times is None:
        t = None
        pairs = np.unique(ids)
        contexts = tuple(sorted(((labels[j], None) for j in pairs), key=lambda c: c[0]))
        tvals = np.zeros(0)
        n_crossed = 0
    else:
        t = np.asarray(times, dtype=np.float64).reshape(-1)
        if t.shape[0] != n:
            raise ValueError(f"times has {t.shape[0]} entries but the design has {n} rows; give one time per row.")
        if not np.isfinite(t).all():
            raise ValueError("times contains NaN/Inf; give finite times (e.g. hours after the perturbation).")
        pairs = np.unique(np.stack([ids.astype(np.float64), t], axis=1), axis=0)
        contexts = tuple(sorted(((labels[int(j)], float(tt)) for j, tt in pairs), key=lambda c: (c[1], c[0])))
        tvals = np.unique(t)
        per_pert = np.bincount(pairs[:, 0].astype(np.int64), minlength=len(first))
        n_crossed = int(np.sum(per_pert >= 2))
    n_ctx = len(contexts)
    n_pert = len(first)
    n_times = max(1, tvals.size)
    parts = []
    status = OK
    if not control_present:
        status = WARNING
        parts.append("No control (unperturbed) cells: add them; the reference context anchors every check.")
    if latent_dim is not None:
        ell = int(latent_dim)
        if ell < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}.")
        if n_ctx >= 2 * ell + 1:
            parts.append(
                f"{n_ctx} contexts >= 2l+1 = {2 * ell + 1}: enough for the full sufficient-variability "
                f"condition (whether it holds depends on the fitted parameters, see check_variability)."
            )
        else:
            status = worst_status(status, WARNING if n_ctx >= ell + 1 else FAIL)
            need = 2 * ell + 1 - n_ctx
            crossing = ""
            if t is not None and n_pert * n_times > n_ctx:
                crossing = (
                    f" Measuring the perturbations at more of the {n_times} time points (crossing "
                    f"perturbation x time) gives up to {n_pert * n_times} contexts."
                )
            elif t is not None and n_pert == 1:
                crossing = " Time alone gives only T+1 contexts; add perturbations and measure them over time."
            parts.append(
                f"Only {n_ctx} contexts for {ell} programs: the full condition needs 2l+1 = {2 * ell + 1} "
                f"({need} more)"
                + ("; the weaker mean-only condition (l+1) can still hold." if n_ctx >= ell + 1 else
                   f"; even the weaker mean-only condition needs l+1 = {ell + 1}.")
                + crossing
            )
    if not parts:
        parts.append(f"{n_ctx} distinct contexts.")
    return ContextReport(
        status=status,
        message=" ".join(parts),
        n_contexts=n_ctx,
        n_perturbations=n_pert,
        n_times=int(tvals.size),
        contexts=contexts,
        times=tvals,
        control_present=bool(control_present),
        n_crossed=n_crossed,
        latent_dim=None if latent_dim is None else int(latent_dim),
    )


# --------------------------------------------------------------------------- variability
def natural_parameters(means, variances) -> np.ndarray:
    """Gaussian natural parameters ``[m / v, -1 / (2 v)]`` per context, shape ``(n, 2l)``."""
    m = np.asarray(means, dtype=np.float64)
    v = np.asarray(variances, dtype=np.float64)
    if m.ndim != 2 or m.shape != v.shape:
        raise ValueError(
            f"means and variances must both be (n_contexts, n_programs); got {m.shape} and {v.shape}."
        )
    if not (np.isfinite(m).all() and np.isfinite(v).all()):
        raise ValueError("means/variances contain NaN/Inf.")
    if np.any(v <= 0):
        raise ValueError(f"variances must be > 0 (min {v.min():.3g}).")
    return np.concatenate([m / v, -0.5 / v], axis=1)


@dataclass(frozen=True, eq=False, repr=False)
class VariabilityReport(ReportMixin):
    """Sufficient-variability check on per-context latent parameters.

    Attributes
    ----------
    condition
        ``"full"`` (stacked natural-parameter differences have rank ``2l``), ``"mean_only"`` (not
        full, but the mean shifts have rank ``l``: the weaker affine class), or ``"insufficient"``.
    latent_dim, n_contexts
        ``l`` and the number of contexts.
    rank, required
        Rank of the stacked differences and ``2l``.
    mean_rank
        Rank of the stacked mean differences (``l`` needed for the mean-only condition).
    means_only_input
        Only means were given (variances unknown), so only the mean-only condition was checked.
    variance_varies, mean_varies
        Per program: does its variance / mean change across contexts.
    singular_values, tolerance
        Of the stacked natural-parameter differences, and the rank threshold.
    missing_directions
        Unit directions in natural-parameter coordinates (``"m/v[z]"``, ``"-1/2v[z]"``) that no
        context moves along (at most 5).
    independent
        The premise that the programs are independent given the context: ``True``/``False`` from
        the covariances (every within-context correlation at most ``corr_tol`` in absolute value)
        or as asserted by the caller, ``None`` when not checked.
    max_correlation
        Largest absolute within-context correlation between two programs (``None`` without
        covariances).
    identified_up_to
        The verdict: ``"permutation and scaling"`` (full rank and independent programs),
        ``"affine map at best"`` (the mean shifts have rank ``l`` but the full condition or its
        premise fails or is unchecked) or ``"not identified"``.
    """

    status: str
    message: str
    condition: str
    latent_dim: int
    n_contexts: int
    rank: int
    required: int
    mean_rank: int
    means_only_input: bool
    variance_varies: np.ndarray
    mean_varies: np.ndarray
    singular_values: np.ndarray
    tolerance: float
    program_names: tuple[str, ...]
    missing_directions: tuple[dict[str, float], ...]
    independent: bool | None = None
    max_correlation: float | None = None
    identified_up_to: str = "not identified"

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "message": self.message,
            "condition": self.condition,
            "identified_up_to": self.identified_up_to,
            "independent": self.independent,
            "max_correlation": self.max_correlation,
            "latent_dim": self.latent_dim,
            "n_contexts": self.n_contexts,
            "rank": self.rank,
            "required": self.required,
            "mean_rank": self.mean_rank,
            "means_only_input": self.means_only_input,
            "variance_varies": {p: bool(b) for p, b in zip(self.program_names, self.variance_varies)},
            "mean_varies": {p: bool(b) for p, b in zip(self.program_names, self.mean_varies)},
            "singular_values": [float(s) for s in self.singular_values],
            "tolerance": self.tolerance,
            "missing_directions": [dict(d) for d in self.missing_directions],
        }

    def render(self) -> str:
        s = self.singular_values
        lines = [
            f"Sufficient variability: {self.status.upper()} ({self.condition})",
            f"  {self.n_contexts} contexts, {self.latent_dim} programs; rank {self.rank} of {self.required} "
            f"(mean shifts: rank {self.mean_rank} of {self.latent_dim}); tolerance {fmt(self.tolerance)}",
            f"  programs independent given the context: "
            + {True: "yes", False: "NO", None: "not checked"}[self.independent]
            + ("" if self.max_correlation is None else f" (max |corr| {fmt(self.max_correlation)})")
            + f"; identified up to: {self.identified_up_to}",
        ]
        if s.size:
            lines.append(f"  singular values: {', '.join(fmt(x) for x in s[:10])}{' ...' if s.size > 10 else ''}")
        lines.append(f"  {self.message}")
        return "\n".join(lines)


def _rank(A: np.ndarray, rtol: float) -> tuple[int, np.ndarray, np.ndarray, float]:
    if A.size == 0:
        return 0, np.zeros(0), np.zeros((0, A.shape[1] if A.ndim == 2 else 0)), 0.0
    _, s, Vt = np.linalg.svd(A, full_matrices=True)
    tol = rtol * (s[0] if s.size else 0.0)
    r = int(np.sum(s > tol)) if s.size and s[0] > 0 else 0
    return r, s, Vt, float(tol)


def check_variability(
    natural_params=None,
    *,
    means=None,
    variances=None,
    covariances=None,
    independent: bool | None = None,
    reference: int = 0,
    rtol: float = 1e-8,
    corr_tol: float = 0.05,
    program_names: Sequence[str] | None = None,
) -> VariabilityReport:
    """Sufficient-variability rank condition on context-dependent latent parameters.

    Give either ``natural_params`` ``(n_contexts, 2l)`` (``[m/v, -1/(2v)]`` per context), or
    ``means`` ``(n_contexts, l)`` with ``variances`` (same shape) or ``covariances``
    ``(n_contexts, l, l)`` (the variances are their diagonals) -- or ``means`` alone, which can
    only establish the weaker mean-only condition. ``reference`` is the row of the reference
    context (the control at ``t = 0``). Ranks count singular values above ``rtol * s_max``.

    The rank ``2l`` identifies the programs up to permutation and scaling only if they are
    independent given the context (the iVAE premise; with an injective decoder). With
    ``covariances`` that premise is checked (every within-context correlation ``<= corr_tol`` in
    absolute value); without them pass ``independent=True`` only if the model makes the programs
    independent given the context. Unchecked or failed, the verdict is at best "up to an affine
    map" (from the mean shifts), and the status is at best ``warning``.
    """
    max_corr = None
    if covariances is not None:
        if natural_params is not None or variances is not None or means is None:
            raise ValueError("Give covariances with means, and without variances or natural_params.")
        cov = np.asarray(covariances, dtype=np.float64)
        n_ctx, ell_m = np.shape(means) if np.ndim(means) == 2 else (-1, -1)
        if cov.shape != (n_ctx, ell_m, ell_m):
            raise ValueError(f"covariances must be (n_contexts, l, l) matching means, got shape {cov.shape}.")
        variances = np.diagonal(cov, axis1=1, axis2=2).copy()
        if np.any(variances <= 0) or not np.isfinite(cov).all():
            raise ValueError("covariances must be finite with positive diagonals.")
        sd = np.sqrt(variances)
        corr = cov / (sd[:, :, None] * sd[:, None, :])
        max_corr = float(np.abs(corr[:, ~np.eye(ell_m, dtype=bool)]).max()) if ell_m > 1 else 0.0
        independent = max_corr <= corr_tol
    if natural_params is not None:
        if means is not None or variances is not None:
            raise ValueError("Give natural_params or means/variances, not both.")
        eta = np.asarray(natural_params, dtype=np.float64)
        if eta.ndim != 2 or eta.shape[1] % 2:
            raise ValueError(f"natural_params must be (n_contexts, 2l), got shape {eta.shape}.")
        if not np.isfinite(eta).all():
            raise ValueError("natural_params contain NaN/Inf.")
        ell = eta.shape[1] // 2
        if np.any(eta[:, ell:] >= 0):
            raise ValueError("The second half of natural_params (-1/(2 v)) must be negative.")
        var = -0.5 / eta[:, ell:]
        mu = eta[:, :ell] * var
        means_only = False
    elif means is not None:
        mu = np.asarray(means, dtype=np.float64)
        if mu.ndim != 2:
            raise ValueError(f"means must be (n_contexts, n_programs), got shape {mu.shape}.")
        means_only = variances is None
        var = np.ones_like(mu) if means_only else np.asarray(variances, dtype=np.float64)
        eta = natural_parameters(mu, var)
        ell = mu.shape[1]
    else:
        raise ValueError("Give natural_params=, or means= (and variances=).")
    n = eta.shape[0]
    if not -n <= reference < n:
        raise IndexError(f"reference={reference} is not a context (there are {n}).")
    names = tuple(program_names) if program_names is not None else tuple(f"z{i + 1}" for i in range(ell))
    if len(names) != ell:
        raise ValueError(f"program_names has {len(names)} names for {ell} programs.")
    others = np.delete(np.arange(n), reference % n)
    dEta = eta[others] - eta[reference]
    dMu = mu[others] - mu[reference]
    rank, s, Vt, tol = _rank(dEta, rtol)
    mean_rank, _, _, _ = _rank(dMu, rtol)
    scale_v = np.maximum(np.abs(var).max(axis=0), np.finfo(float).tiny)
    scale_m = np.maximum(np.abs(mu).max(axis=0), 1.0)
    var_varies = np.any(np.abs(var[others] - var[reference]) > rtol * scale_v, axis=0) if n > 1 else np.zeros(ell, bool)
    mean_varies = np.any(np.abs(dMu) > rtol * scale_m, axis=0) if n > 1 else np.zeros(ell, bool)
    coord_names = [f"m/v[{p}]" for p in names] + [f"-1/2v[{p}]" for p in names]
    missing = tuple(top_weights(Vt[k], coord_names) for k in range(rank, min(2 * ell, Vt.shape[0])))[:5]

    if means_only:
        rank = min(rank, mean_rank)
    if independent is None:
        premise = (
            "whether the programs are independent given the context, the premise of that result, was not "
            "checked (pass covariances=, or independent=True when the model makes them so)"
        )
    elif not independent:
        premise = (
            "the programs are NOT independent given the context"
            + (f" (within-context correlation up to {fmt(max_corr)} > {fmt(corr_tol)})" if max_corr is not None else "")
            + ", the premise of that result (in the latent dynamics model the programs are coupled through the "
            "shared causal weights B)"
        )
    affine = (
        f"The mean shifts have full rank l = {ell}: the programs are identified only up to an affine map "
        f"at best (the PDAE class)."
        if mean_rank == ell else
        f"The mean shifts have rank {mean_rank} < l = {ell}: not even the affine class is identified."
    )
    if not means_only and rank == 2 * ell and independent:
        condition, status, identified = "full", OK, "permutation and scaling"
        message = (
            f"Sufficient variability holds: the {n} contexts move the natural parameters in all "
            f"2l = {2 * ell} directions (smallest singular value {fmt(s[2 * ell - 1])}, tolerance "
            f"{fmt(tol)}), and the programs are independent given the context"
            + (f" (max |corr| {fmt(max_corr)})" if max_corr is not None else " (as stated)")
            + ". With an injective decoder the programs are identified up to permutation and scaling."
        )
    elif not means_only and rank == 2 * ell:
        condition = "full"
        status = WARNING if mean_rank == ell else FAIL
        identified = "affine map at best" if mean_rank == ell else "not identified"
        message = (
            f"The {n} contexts move the natural parameters in all 2l = {2 * ell} directions, which would "
            f"identify the programs up to permutation and scaling, but {premise}. {affine}"
        )
    elif mean_rank == ell:
        condition, status, identified = "mean_only", WARNING, "affine map at best"
        if means_only:
            why = "Only means were given"
        elif not var_varies.any():
            why = "Only the means vary across contexts (the variances are the same in every context)"
        else:
            fixed = [p for p, b in zip(names, var_varies) if not b]
            why = (
                f"The natural-parameter differences have rank {rank} < 2l = {2 * ell}"
                + (f" (the variance of {join_names(fixed)} never changes)" if fixed else "")
            )
        message = (
            f"{why}: the full condition (rank 2l = {2 * ell}) is not met. The mean shifts have full "
            f"rank l = {ell}, the weaker mean-only condition, which identifies the programs only up to "
            f"an affine map (the PDAE class). For the full class, contexts must also change the "
            f"variances of programs that are independent given the context, with at least 2l+1 = "
            f"{2 * ell + 1} contexts (have {n})."
        )
    else:
        condition, status, identified = "insufficient", FAIL, "not identified"
        still = [p for p, b in zip(names, mean_varies) if not b]
        message = (
            f"Insufficient variability: the mean shifts have rank {mean_rank} < l = {ell}"
            + (f" ({join_names(still)} never move)" if still else "")
            + f"; with {n} contexts (2l+1 = {2 * ell + 1} needed for the full condition) the programs "
            f"are not identifiable. Add perturbations that target the programs that do not move."
        )
    return VariabilityReport(
        status=status,
        message=message,
        condition=condition,
        latent_dim=ell,
        n_contexts=n,
        rank=int(rank),
        required=2 * ell,
        mean_rank=int(mean_rank),
        means_only_input=means_only,
        variance_varies=var_varies,
        mean_varies=mean_varies,
        singular_values=s,
        tolerance=tol,
        program_names=names,
        missing_directions=missing,
        independent=None if independent is None else bool(independent),
        max_correlation=max_corr,
        identified_up_to=identified,
    )


def dynamics_context_moments(
    B, S, mu, Sigma_0, design, times, *, heterogeneity: str = "persistent", diffusion: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Latent mean and covariance of ``z(t)`` in each context ``(design[i], times[i])`` under the
    linear dynamics ``dz/dt = (B - I)(z - a) + S l`` with ``z(0) ~ N(mu, Sigma_0)``, as in
    :class:`perturbax.models.LatentDynamicsConfig` and :func:`perturbax.data.simulate_latent_dynamics`:
    mean ``mu + (I - E_t) W l`` (``E_t = e^{(B - I) t}``, ``W = (I - B)^{-1} S``); covariance
    ``Sigma_0 + Q_t`` (``heterogeneity="persistent"``, ``a = z(0)``) or
    ``E_t Sigma_0 E_t^T + Q_t`` (``"relaxing"``, ``a = mu``), where ``Q_t`` is what Brownian noise
    of scale ``diffusion`` adds. Returns ``(means (n, l), covariances (n, l, l))``, the input of
    :func:`check_variability`.
    """
    import scipy.linalg

    B = np.asarray(B, dtype=np.float64)
    S = np.asarray(S, dtype=np.float64)
    _check_bs(B, S)
    ell = B.shape[0]
    mu = np.broadcast_to(np.asarray(mu, dtype=np.float64), (ell,))
    Sigma_0 = np.asarray(Sigma_0, dtype=np.float64)
    if Sigma_0.shape != (ell, ell):
        raise ValueError(f"Sigma_0 must be ({ell}, {ell}), got shape {Sigma_0.shape}.")
    L = np.atleast_2d(np.asarray(design, dtype=np.float64))
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    if L.shape != (t.size, S.shape[1]):
        raise ValueError(f"design must be (n, K = {S.shape[1]}) with one time per row; got {L.shape} and {t.size} times.")
    if heterogeneity not in ("relaxing", "persistent"):
        raise ValueError(f"heterogeneity={heterogeneity!r} is not supported; use 'persistent' or 'relaxing'.")
    A = B - np.eye(ell)
    W = bs_to_w(B, S)
    P = scipy.linalg.solve_continuous_lyapunov(A, -(diffusion**2) * np.eye(ell)) if diffusion else np.zeros((ell, ell))
    means, covs = [], []
    for lab, ti in zip(L, t):
        E = scipy.linalg.expm(A * ti)
        means.append(mu + (np.eye(ell) - E) @ (W @ lab))
        base = Sigma_0 if heterogeneity == "persistent" else E @ Sigma_0 @ E.T
        c = base + P - E @ P @ E.T
        covs.append(0.5 * (c + c.T))
    return np.stack(means), np.stack(covs)


# --------------------------------------------------------------------------- targets
@dataclass(frozen=True, eq=False, repr=False)
class TargetReport(ReportMixin):
    """Intervention-target coverage.

    Attributes
    ----------
    targeted
        Per program: targeted in at least one measured condition.
    untargeted
        Programs never targeted.
    always_together
        Groups of (targeted) programs with identical targeting patterns across the conditions.
    control_present
        Observational (control) data present; ``None`` if unknown.
    incidence
        ``(n_conditions, n_programs)``: which programs each condition targets.
    """

    status: str
    message: str
    program_names: tuple[str, ...]
    targeted: np.ndarray
    untargeted: tuple[str, ...]
    always_together: tuple[tuple[str, ...], ...]
    control_present: bool | None
    incidence: np.ndarray

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "message": self.message,
            "programs": list(self.program_names),
            "targeted": {p: bool(b) for p, b in zip(self.program_names, self.targeted)},
            "untargeted": list(self.untargeted),
            "always_together": [list(g) for g in self.always_together],
            "control_present": self.control_present,
        }

    def render(self) -> str:
        lines = [f"Intervention targets: {self.status.upper()}"]
        lines.append(f"  targeted: {join_names([p for p, b in zip(self.program_names, self.targeted) if b])}")
        if self.untargeted:
            lines.append(f"  never targeted: {join_names(self.untargeted)}")
        for g in self.always_together:
            lines.append(f"  always targeted together: {join_names(g)}")
        cp = {True: "present", False: "ABSENT", None: "unknown"}[self.control_present]
        lines.append(f"  control: {cp}")
        lines.append(f"  {self.message}")
        return "\n".join(lines)


def check_targets(
    targets,
    design=None,
    *,
    atol: float = 0.0,
    control_present: bool | None = None,
    program_names: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    registry: PerturbationRegistry | None = None,
) -> TargetReport:
    """Check intervention-target coverage.

    Parameters
    ----------
    targets
        Target matrix ``S`` (programs x K; entries with ``|S| > atol`` count as targets) or its
        boolean support.
    design
        Measured conditions ``(n, K)`` (label vectors, or strings with ``names``). A condition
        targets program ``i`` if it contains a perturbation ``k`` with ``S[i, k]`` non-zero. Without
        a design every elementary perturbation is taken as measured alone.
    control_present
        Override / supply whether control cells exist (default: a zero row of ``design``; unknown
        without a design).
    """
    S = np.asarray(targets)
    if S.ndim != 2:
        raise ValueError(f"targets must be (n_programs, K), got shape {S.shape}.")
    supp = S.astype(bool) if S.dtype == bool else np.abs(S.astype(np.float64)) > atol
    ell, K = supp.shape
    pnames = tuple(program_names) if program_names is not None else tuple(f"z{i + 1}" for i in range(ell))
    if len(pnames) != ell:
        raise ValueError(f"program_names has {len(pnames)} names for {ell} programs.")
    if design is None:
        incidence = supp.T.copy()
        cp = control_present
    else:
        reg = resolve_registry(names, registry, design) if names is not None or registry is not None else None
        if reg is None:
            reg = PerturbationRegistry(tuple(f"e{k + 1}" for k in range(K)))
        M, _ = as_label_rows(design, reg, "design")
        if M.shape[1] != K:
            raise ValueError(f"design has {M.shape[1]} columns but targets has K = {K}.")
        present = sp.csr_matrix((np.ones_like(M.data), M.indices, M.indptr), shape=M.shape)
        incidence = np.asarray((present @ sp.csr_matrix(supp.T.astype(np.float64))).toarray() > 0)
        zero_row = bool(np.any(np.diff(M.indptr) == 0))
        cp = zero_row if control_present is None else control_present
    targeted = incidence.any(axis=0)
    untargeted = tuple(p for p, b in zip(pnames, targeted) if not b)
    groups: dict[bytes, list[str]] = {}
    for i in np.flatnonzero(targeted):
        groups.setdefault(np.packbits(incidence[:, i]).tobytes(), []).append(pnames[i])
    together = tuple(tuple(g) for g in groups.values() if len(g) > 1)
    parts = []
    statuses = [OK]
    if untargeted:
        statuses.append(FAIL)
        parts.append(
            f"{join_names(untargeted)} {'is' if len(untargeted) == 1 else 'are'} never targeted: such a "
            f"program cannot be told apart from alternatives; add a perturbation that targets it."
        )
    for g in together:
        statuses.append(FAIL)
        parts.append(
            f"{join_names(g)} are always targeted together, so their effects cannot be separated; "
            f"add a perturbation that targets one without the other."
        )
    if cp is False:
        statuses.append(FAIL)
        parts.append("No control (observational) data: measure unperturbed cells.")
    elif cp is None:
        statuses.append(WARNING)
        parts.append("Whether control cells exist is unknown (pass design= or control_present=).")
    if not parts:
        parts.append("Every program is targeted, no two always together, and control data are present.")
    return TargetReport(
        status=worst_status(*statuses),
        message=" ".join(parts),
        program_names=pnames,
        targeted=targeted,
        untargeted=untargeted,
        always_together=together,
        control_present=cp,
        incidence=incidence,
    )


# --------------------------------------------------------------------------- order from W
@dataclass(frozen=True, eq=False, repr=False)
class OrderReport(ReportMixin):
    """Can the causal order of the programs be read from the total effects ``W``?

    Attributes
    ----------
    identified
        Every program is the sole target of at least one perturbation.
    sole_target
        Per program, the first perturbation (column of ``S``) that targets it and no other
        program, or ``-1``.
    missing
        Programs without such a perturbation.
    """

    status: str
    message: str
    program_names: tuple[str, ...]
    identified: bool
    sole_target: tuple[int, ...]
    missing: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "message": self.message,
            "identified": self.identified,
            "sole_target": {p: int(k) for p, k in zip(self.program_names, self.sole_target)},
            "missing": list(self.missing),
        }

    def render(self) -> str:
        lines = [f"Causal order from W: {self.status.upper()}"]
        if self.missing:
            lines.append(f"  no perturbation targets only: {join_names(self.missing)}")
        lines.append(f"  {self.message}")
        return "\n".join(lines)


def check_order_from_effects(targets, *, atol: float = 0.0, program_names: Sequence[str] | None = None) -> OrderReport:
    """Whether the causal order of the programs (and ``B``) is identified by the total effects
    ``W = (I - B)^{-1} S`` of the linear dynamics, given the support of the targets ``S``
    (``programs x K``; entries with ``|S| > atol`` count, or a boolean mask).

    The condition is that every program ``i`` is the SOLE direct target of some perturbation
    ``k`` (``S[:, k]`` nonzero only in row ``i``). Then ``W[:, k] = s (I - B)^{-1} e_i``, the
    inverse of those ``l`` columns has rows proportional to ``e_i - B[i]``, and ``B`` and its order
    follow (:func:`perturbax.models.order_from_effects`). Targeting every program is NOT enough:
    if a program is only ever targeted together with others, ``W`` alone does not determine the
    order -- for every acyclic ``B'`` (any order), ``S' = (I - B') W`` reproduces ``W`` exactly
    (:func:`w_to_bs`), and nothing in ``W`` says which pair has the true, sparser targets. Then
    only time courses (the transients ``e^{(B - I) t}``) can identify ``B``. The check does not
    depend on how the programs are labelled.
    """
    S = np.asarray(targets)
    if S.ndim != 2:
        raise ValueError(f"targets must be (n_programs, K), got shape {S.shape}.")
    ell = S.shape[0]
    pnames = tuple(program_names) if program_names is not None else tuple(f"z{i + 1}" for i in range(ell))
    if len(pnames) != ell:
        raise ValueError(f"program_names has {len(pnames)} names for {ell} programs.")
    sole = sole_targets(S, atol=atol)
    missing = tuple(p for p, k in zip(pnames, sole) if k < 0)
    if not missing:
        message = (
            "Every program is the sole target of some perturbation: W = (I - B)^{-1} S determines B and "
            "the causal order (order_from_effects reads them from those perturbations' columns)."
        )
    else:
        message = (
            f"{join_names(missing)} {'has' if len(missing) == 1 else 'have'} no perturbation that targets "
            f"{'it' if len(missing) == 1 else 'them'} alone, so the causal order is NOT identified by the "
            f"total effects W: every acyclic B' gives the same W with S' = (I - B') W. Read B from the "
            f"transients of a time course (fit the dynamics with a causal mask you trust), or add a "
            f"perturbation that targets each such program alone."
        )
    return OrderReport(
        status=OK if not missing else FAIL,
        message=message,
        program_names=pnames,
        identified=not missing,
        sole_target=tuple(sole),
        missing=missing,
    )


def check_order_design(
    design,
    latent_dim: int,
    *,
    targets=None,
    names: Sequence[str] | None = None,
    registry: PerturbationRegistry | None = None,
    tol: float = 1e-6,
) -> OrderReport:
    """Whether a training design can identify the causal order of ``latent_dim`` programs from the
    total effects ``W`` -- asked before any fit.

    The order is read from ``l`` columns of ``W`` (:func:`check_order_from_effects`), so it needs
    (i) at least ``l`` elementary perturbations whose own effect is identified by the design
    (``e_k`` in the row space of the measured labels, control excluded; residual of its projection
    ``<= tol``): otherwise ``fail``, every
    order fits the design equally; and (ii) each program the sole direct target of one of them.
    (ii) is checked when ``targets`` (``l x K`` support of ``S``, e.g. a fit's ``target_mask``) is
    given; without it the design cannot tell, the status is ``warning`` and a fit reads the order
    under that assumption (and should report which orders fit equally well).
    """
    reg = resolve_registry(names, registry, design)
    M, _ = as_label_rows(design, reg, "design")
    D = np.asarray(M.toarray(), dtype=np.float64)
    D = D[np.any(D != 0, axis=1)]
    K = D.shape[1]
    ell = int(latent_dim)
    pnames = tuple(f"z{i + 1}" for i in range(ell))
    if D.shape[0]:
        P = np.linalg.pinv(D) @ D  # projection on the row space
        resid = np.linalg.norm(np.eye(K) - P, axis=0)
        ident = np.flatnonzero(resid <= tol)
    else:
        ident = np.zeros(0, dtype=np.int64)
    ident_names = [reg.names[k] for k in ident]
    if ident.size < ell:
        return OrderReport(
            status=FAIL,
            message=(f"the design identifies the effects of {ident.size} elementary perturbation(s) "
                     f"({join_names(ident_names) if ident_names else 'none'}) for {ell} programs, so the causal order "
                     f"is NOT identified by the design: W has fewer identified columns than programs and every order "
                     f"of the programs fits equally (a fit can only report the orders it tried). Measure at least "
                     f"{ell} perturbations alone, each targeting one program, or use fewer programs."),
            program_names=pnames, identified=False, sole_target=tuple([-1] * ell), missing=pnames,
        )
    if targets is not None:
        rep = check_order_from_effects(targets, program_names=pnames)
        if rep.identified:
            unmeasured = [k for k in rep.sole_target if k not in set(ident.tolist())]
            if unmeasured:
                return OrderReport(
                    status=FAIL, message=(f"the sole-target perturbations {join_names([reg.names[k] for k in unmeasured])} "
                                          f"are not identified by the design, so the order is not identified."),
                    program_names=pnames, identified=False, sole_target=rep.sole_target,
                    missing=tuple(p for p, k in zip(pnames, rep.sole_target) if k in unmeasured),
                )
        return rep
    return OrderReport(
        status=WARNING,
        message=(f"the design identifies {ident.size} elementary perturbation effect(s) for {ell} programs; the causal "
                 f"order is identified only if each program is the sole direct target of one of them, which the "
                 f"design cannot show (perturbations that hit several programs break it). The fit reads the order "
                 f"under that assumption and reports the orders that fit equally well; pass a target_mask if the "
                 f"targets are known."),
        program_names=pnames, identified=False, sole_target=tuple([-1] * ell), missing=(),
    )


# --------------------------------------------------------------------------- combined
@dataclass(frozen=True, eq=False, repr=False)
class DynamicsReport(ReportMixin):
    """Contexts, sufficient variability and intervention targets together (the parts that were
    given); ``status`` is the worst of the parts."""

    status: str
    message: str
    contexts: ContextReport
    variability: VariabilityReport | None
    targets: TargetReport | None

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "message": self.message,
            "contexts": self.contexts.to_dict(),
            "variability": None if self.variability is None else self.variability.to_dict(),
            "targets": None if self.targets is None else self.targets.to_dict(),
        }

    def render(self) -> str:
        parts = [f"Dynamics check: {self.status.upper()}", self.contexts.render()]
        if self.variability is not None:
            parts.append(self.variability.render())
        if self.targets is not None:
            parts.append(self.targets.render())
        return "\n".join(parts)


def check_dynamics(
    design,
    times=None,
    *,
    latent_dim: int | None = None,
    targets=None,
    natural_params=None,
    means=None,
    variances=None,
    covariances=None,
    independent: bool | None = None,
    reference: int = 0,
    names: Sequence[str] | None = None,
    registry: PerturbationRegistry | None = None,
    program_names: Sequence[str] | None = None,
    rtol: float = 1e-8,
    atol: float = 0.0,
    corr_tol: float = 0.05,
) -> DynamicsReport:
    """Run :func:`count_contexts` and, when their inputs are given, :func:`check_variability`
    (per-context parameters, rows = contexts; ``covariances`` to check that the programs are
    independent given the context, e.g. from :func:`dynamics_context_moments`) and
    :func:`check_targets` (``targets`` = ``S``)."""
    var_report = None
    if natural_params is not None or means is not None:
        var_report = check_variability(
            natural_params, means=means, variances=variances, covariances=covariances, independent=independent,
            reference=reference, rtol=rtol, corr_tol=corr_tol, program_names=program_names,
        )
        if latent_dim is None:
            latent_dim = var_report.latent_dim
    tgt_report = None
    if targets is not None:
        tgt_report = check_targets(
            targets, design, atol=atol, program_names=program_names, names=names, registry=registry
        )
        if latent_dim is None:
            latent_dim = int(np.asarray(targets).shape[0])
    ctx = count_contexts(design, times, names=names, registry=registry, latent_dim=latent_dim)
    reports = [r for r in (ctx, var_report, tgt_report) if r is not None]
    status = worst_status(*(r.status for r in reports))
    message = " ".join(r.message for r in reports if r.status != OK) or " ".join(r.message for r in reports)
    return DynamicsReport(status=status, message=message, contexts=ctx, variability=var_report, targets=tgt_report)
