"""Design-level identifiability: which unseen perturbations a training design can predict.

Model (additive latent shift, DESIGN 2.1): ``z = z_base + W l``. A training design is a set of
measured label vectors ``l_e`` (rows of ``L``) with the control ``l_0 = 0`` (or a declared
reference row). With ``D = [l_e - l_0]``:

- a test perturbation ``l*`` is **covered** iff ``l* - l_0`` lies in ``rowspace(D)`` -- the affine
  hull of the training labels, not their convex hull and not a cone. Then
  ``l* = l_0 + sum_e c_e (l_e - l_0)`` and its latent shift is determined by the measured ones;
- coefficients outside the convex hull (some ``c_e < 0``, or ``sum_e c_e > 1``) mean the model
  must **extrapolate** beyond the latent states it was trained on: covered, but harder;
- elementary perturbation ``k`` is **identified** iff the unit vector ``e_k`` is covered; all of
  ``W`` iff ``rank(D) = K``;
- ``rank(D) >= d`` is necessary for the shifts to span a ``d``-dimensional latent space.

Tolerances (all explicit, float64): ``rank(D)`` counts singular values above
``rtol * s_max(D)`` (``rtol=1e-8``); a vector ``t`` is covered iff its distance to the row space is
at most ``residual_rtol * ||t||`` (``residual_rtol=1e-6``); coefficients count as inside the hull
up to ``hull_atol`` (``1e-8``), and the linear program for dependent training labels accepts an
``l1`` distance to the hull of at most ``1e-6 * max(1, ||t||_1)``. See
:mod:`perturbax.theory.rowspace` for the algorithm (duplicates
removed, one SVD -- after exact elimination of single-perturbation rows for large designs -- and
all tests projected at once).

Names in test labels that the training design never contains are given zero columns (listed as
``unmeasured``): such a test is not covered, with the verdict "never measured; measure it", rather
than an unknown-name error. The design-level figures (rank, identified elementary perturbations)
are about the measured perturbations only.

Coefficients
------------
For each covered test the report first gives the *simplest* representation (fewest training
conditions, :mod:`perturbax.theory.sparse`): ``KLF1+SGK1 = KLF1 + SGK1``. It also gives one
representation ``c`` over the *distinct* training labels
(duplicated rows are merged; the reference has no coefficient): the minimum-norm one, which is the
unique one when the training labels are linearly independent. When that representation is not
convex but another is (the training labels are dependent), a convex one found by linear programming
is given as ``hull_coefficients`` and the test counts as inside the hull. Coefficients cost
``O(n_rows)`` per test, so they are computed for the first ``max_details`` tests (default 100);
:meth:`DesignReport.coefficients` computes them for any test on request.

Conditioning
------------
Covered is a statement about identification, not accuracy. The minimum-norm coefficients are the
weights of the least-squares prediction: if the shifts of the distinct measured conditions are
estimated with independent errors of equal variance ``sigma^2``, the predicted shift of the test is
``sum_e c_e y_e`` and its error has standard deviation ``sigma * ||c||_2`` -- no other
representation does better. So ``coefficient_norm = ||c||_2`` is the factor by which the prediction
amplifies the estimation error of one measured condition (``||c||_1`` bounds it for errors of equal
size and any correlation). Both are unit-free: rescaling all doses leaves ``c`` unchanged. A test
that is the sum of ``k`` measured singles has ``||c||_2 = sqrt(k)``; a test reached only through a
training row at dose ``1e-6`` has ``||c||_2 = 1e6``. A covered test with ``||c||_2`` above
``max_coefficient_norm`` (default ``10``: the prediction is at least 10 times as noisy as a measured
condition, which would take 100 times the cells per condition to make up) is **ill-conditioned**:
flagged, and the report is at least a warning. The same norm is reported for each identified
elementary perturbation at unit dose ``e_k`` (method ``"svd"`` only, i.e. at most 256 active
columns); it depends on the unit of the doses, so it is shown but does not change the status --
pass the doses you mean to predict as tests.

JSON form (``DesignReport.to_dict()``; ``perturbax check-design --json``), schema
``perturbax.check_design/1``::

    {
      "schema": "perturbax.check_design/1",
      "status": "ok" | "warning" | "fail",
      "message": str,                        # what it means / what to do
      "elementary": [str],                   # the K elementary perturbations (column order)
      "reference": str,                      # label of l_0 ("control" for the zero vector)
      "control_present": bool,               # l_0 is a measured training row
      "n_rows": int, "n_distinct_rows": int, # training rows, distinct training labels
      "rank": int, "full_rank": bool,        # rank(D), rank(D) == K
      "latent_dim": int | null, "latent_dim_ok": bool | null,
      "method": "svd" | "peel",
      "rtol": float, "tolerance": float,     # relative and absolute rank tolerance
      "residual_rtol": float, "hull_atol": float,
      "singular_values": [float],            # of D (method "svd") or of the SVD block ("peel")
      "smallest_retained": float | null, "largest_dropped": float | null,
      "n_eliminated": int, "min_pivot": float | null,   # method "peel" only (else 0 / null)
      "identified_elementary": [str],
      "unidentified_elementary": [str],
      "elementary_residuals": {name: float}, # distance of e_k to the row space
      "elementary_coefficient_norms": {name: float | null},  # ||c||_2 of e_k (null: not identified
                                             # or method "peel")
      "ill_conditioned_elementary": [str],   # identified, unit dose with ||c||_2 above max_coefficient_norm
      "n_tests": int, "n_covered": int, "n_extrapolating": int,
      "max_coefficient_norm": float,         # limit on ||c||_2 above which a test is ill-conditioned
      "n_ill_conditioned": int,
      "tests": [
        {
          "label": str,                      # as given (strings) or canonical (vectors)
          "covered": bool,
          "residual": float,                 # ||t - P t||, t = l* - l_0
          "relative_residual": float,        # residual / ||t|| (0 for t = 0)
          "in_convex_hull": bool | null,     # null: not determined (see "details")
          "coefficients": {training label: float} | null,      # null: not computed
          "hull_coefficients": {training label: float} | null, # convex representation, if found by LP
          "coefficient_norm": float | null,  # ||c||_2 of the minimum-norm coefficients (error amplification)
          "coefficient_l1": float | null,    # ||c||_1
          "ill_conditioned": bool,           # covered with coefficient_norm > max_coefficient_norm
                                             # (or coefficients that did not converge)
          "verdict": "identified" | "not identified",   # = covered
          "simplest_coefficients": {training label: float} | null,  # sparsest representation found
          "equation": str | null,            # it written out, e.g. "KLF1 + SGK1"
          "measured": bool,                  # the test is itself a measured training condition
          "unmeasured": [str],               # names in the test that no training condition contains
          "missing_direction": {name: float},  # unit direction of the unmeasured part (uncovered tests)
          "suggested_additions": [str],      # labels to add so that this test becomes covered
          "details": bool,                   # coefficients / directions computed for this test
          "message": str
        }, ...
      ],
      "unmeasured": [str],                   # names used only by tests (never measured; extra columns)
      "design_additions": [str]              # labels to add so that every elementary one is identified
    }

Only coefficients with ``|c| > 1e-12 * max(1, max|c|)`` are listed; missing labels have 0.
Statuses: ``fail`` if a test is not covered or ``rank < latent_dim``; ``warning`` if a covered test
needs extrapolation or is ill-conditioned, the control is not among the training rows, or -- when
no tests are given -- some elementary perturbation is not identified; ``ok`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from perturbax.data.labels import PerturbationRegistry, close_matches
from perturbax.theory._design_input import PreparedDesign, add_unmeasured, prepare_design, resolve_registry
from perturbax.theory.design_text import (
    context_transfer_message,
    covered_message,
    format_combination,
    ill_conditioned_message,
    render_report,
    uncovered_message,
    unmeasured_message,
)
from perturbax.theory.report import (
    FAIL,
    OK,
    WARNING,
    ReportMixin,
    fmt,
    join_names,
    top_weights,
)
from perturbax.theory.rowspace import (
    DEFAULT_RESIDUAL_RTOL,
    DEFAULT_RTOL,
    RowSpace,
    convex_coefficients,
    is_convex,
    min_norm_coefficients,
)
from perturbax.theory.sparse import PAIR_ROWS, simplest_coefficients
from perturbax.theory.suggest import greedy_unit_additions

__all__ = [
    "CoverageResult",
    "DesignReport",
    "check_design",
    "DEFAULT_HULL_ATOL",
    "DEFAULT_MAX_COEFFICIENT_NORM",
    "SCHEMA",
    "format_combination",
]

SCHEMA = "perturbax.check_design/1"
DEFAULT_HULL_ATOL = 1e-8
DEFAULT_MAX_COEFFICIENT_NORM = 10.0
_LP_MAX_ROWS = 2000
_COEF_DROP = 1e-12
_DESIGN_SUGGEST_MAX = 500


@dataclass(frozen=True, eq=False)
class CoverageResult:
    """Coverage of one test perturbation.

    Attributes
    ----------
    label
        The test as given (strings) or its canonical label (vectors).
    covered
        ``l* - l_0`` lies in the row space of the training differences (within ``residual_rtol``).
    residual, relative_residual
        ``||t - P t||`` and that divided by ``||t||`` (``t = l* - l_0``).
    in_convex_hull
        Inside the convex hull of the training labels (``False`` if not covered; ``None`` if not
        determined: no details, or too many training labels for the linear program).
    coefficients
        ``{training label: c_e}`` of the minimum-norm representation (``None``: not computed).
    hull_coefficients
        A convex representation when the minimum-norm one is not convex but one exists.
    coefficient_norm, coefficient_l1
        ``||c||_2`` and ``||c||_1`` of the minimum-norm coefficients (``None``: not computed): the
        factor by which the prediction amplifies the estimation error of a measured condition
        (module docstring, Conditioning).
    ill_conditioned
        Covered, but ``coefficient_norm`` exceeds the report's ``max_coefficient_norm`` (or the
        coefficients did not converge on a very ill-conditioned large design).
    missing_direction
        For uncovered tests: the unit direction of ``t - P t`` (largest entries, signs as in the
        test), i.e. what the design never measures.
    suggested_additions
        Labels whose addition to the design covers this test (greedy over single perturbations,
        preferring those in the test itself).
    simplest
        ``{training label: c_e}`` of the sparsest representation found
        (:func:`perturbax.theory.sparse.simplest_coefficients`; the minimum-norm one if none was
        found), e.g. ``{"KLF1": 1, "SGK1": 1}`` for ``KLF1+SGK1``.
    equation
        ``simplest`` written out: ``"KLF1 + SGK1"`` (``None`` when not covered).
    unmeasured
        Perturbations in the test that no training condition contains (never measured).
    measured
        The test is itself a measured training condition (or the measured reference).
    context_transfer
        With contexts (``registry.contexts``): a (perturbation, context) pair never measured but
        identified through other contexts -- only under the additive model (the perturbation's latent
        shift is the same in every context), so an extrapolation even when the coefficients are convex.
    details
        Whether coefficients / directions / suggestions were computed for this test.
    message
        One sentence for the experimenter.
    """

    label: str
    covered: bool
    residual: float
    relative_residual: float
    in_convex_hull: bool | None
    coefficients: dict[str, float] | None
    hull_coefficients: dict[str, float] | None
    missing_direction: dict[str, float]
    suggested_additions: tuple[str, ...]
    details: bool
    message: str
    coefficient_norm: float | None = None
    coefficient_l1: float | None = None
    ill_conditioned: bool = False
    simplest: dict[str, float] | None = None
    equation: str | None = None
    unmeasured: tuple[str, ...] = ()
    measured: bool = False
    context_transfer: bool = False

    @property
    def verdict(self) -> str:
        """``"identified"`` (covered) or ``"not identified"``."""
        return "identified" if self.covered else "not identified"

    @property
    def extrapolation(self) -> bool:
        """Covered but outside the convex hull of the training labels, or a context transfer."""
        return bool(self.covered and (self.in_convex_hull is False or self.context_transfer))

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "covered": bool(self.covered),
            "residual": float(self.residual),
            "relative_residual": float(self.relative_residual),
            "in_convex_hull": self.in_convex_hull,
            "coefficients": None if self.coefficients is None else dict(self.coefficients),
            "hull_coefficients": None if self.hull_coefficients is None else dict(self.hull_coefficients),
            "coefficient_norm": self.coefficient_norm,
            "coefficient_l1": self.coefficient_l1,
            "ill_conditioned": bool(self.ill_conditioned),
            "verdict": self.verdict,
            "simplest_coefficients": None if self.simplest is None else dict(self.simplest),
            "equation": self.equation,
            "measured": bool(self.measured),
            "context_transfer": bool(self.context_transfer),
            "unmeasured": list(self.unmeasured),
            "missing_direction": dict(self.missing_direction),
            "suggested_additions": list(self.suggested_additions),
            "details": bool(self.details),
            "message": self.message,
        }


@dataclass(frozen=True, eq=False, repr=False)
class DesignReport(ReportMixin):
    """Result of :func:`check_design` (see the module docstring for the meaning of every field)."""

    status: str
    message: str
    names: tuple[str, ...]
    reference: str
    control_present: bool
    n_rows: int
    n_distinct_rows: int
    rank: int
    method: str
    rtol: float
    tolerance: float
    residual_rtol: float
    hull_atol: float
    singular_values: np.ndarray
    smallest_retained: float | None
    largest_dropped: float | None
    n_eliminated: int
    min_pivot: float | None
    identified: np.ndarray
    elementary_residuals: np.ndarray
    elementary_coefficient_norms: np.ndarray
    latent_dim: int | None
    tests: tuple[CoverageResult, ...]
    covered: np.ndarray
    relative_residuals: np.ndarray
    max_coefficient_norm: float
    space: RowSpace = field(repr=False)
    design: PreparedDesign = field(repr=False)
    unmeasured: tuple[str, ...] = ()
    design_additions: tuple[str, ...] = ()

    # ------------------------------------------------------------- derived
    @property
    def K(self) -> int:
        return len(self.names)

    @property
    def K_measured(self) -> int:
        """Elementary perturbations of the design (those named only by tests excluded)."""
        return self.K - len(self.unmeasured)

    @property
    def full_rank(self) -> bool:
        return self.rank == self.K_measured

    @property
    def identified_elementary(self) -> tuple[str, ...]:
        return tuple(n for n, ok in zip(self.names, self.identified) if ok)

    @property
    def unidentified_elementary(self) -> tuple[str, ...]:
        """Elementary perturbations of the design that are not identified (the never-measured
        names of tests are listed in ``unmeasured`` instead)."""
        skip = set(self.unmeasured)
        return tuple(n for n, ok in zip(self.names, self.identified) if not ok and n not in skip)

    @property
    def n_identified_tests(self) -> int:
        return int(np.sum(self.covered))

    @property
    def ill_conditioned_elementary(self) -> tuple[str, ...]:
        """Identified elementary perturbations whose unit dose has ``||c||_2 > max_coefficient_norm``."""
        norms = self.elementary_coefficient_norms
        return tuple(n for n, c in zip(self.names, norms) if np.isfinite(c) and c > self.max_coefficient_norm)

    @property
    def latent_dim_ok(self) -> bool | None:
        return None if self.latent_dim is None else self.rank >= self.latent_dim

    @property
    def uncovered(self) -> tuple[str, ...]:
        return tuple(t.label for t in self.tests if not t.covered)

    @property
    def extrapolating(self) -> tuple[str, ...]:
        return tuple(t.label for t in self.tests if t.extrapolation)

    @property
    def ill_conditioned(self) -> tuple[str, ...]:
        """Covered tests whose coefficient norm exceeds ``max_coefficient_norm``."""
        return tuple(t.label for t in self.tests if t.ill_conditioned)

    def test(self, label: str) -> CoverageResult:
        """The result of the test with this label (as given)."""
        for t in self.tests:
            if t.label == label:
                return t
        raise KeyError(f"No test labelled {label!r}; tests: {join_names([t.label for t in self.tests])}.")

    def coefficients(self, tests) -> list[dict[str, float] | None]:
        """Minimum-norm coefficients ``{training label: c}`` for any perturbations (label strings,
        mappings or vectors), computed now; ``None`` for those not covered (or whose iterative
        solve did not converge on a very ill-conditioned large design)."""
        T, _ = self.design.differences(tests, "tests")
        Td = T.toarray()
        tnorm = np.linalg.norm(Td, axis=1)
        res = np.linalg.norm(self.space.residuals(Td), axis=1)
        cov = res <= self.residual_rtol * tnorm
        C = min_norm_coefficients(self.design.D, self.space, Td)
        keys = _unique_keys(self.design.labels)
        ok = cov & np.isfinite(C).all(axis=1)
        return [_coef_map(C[i], keys) if ok[i] else None for i in range(Td.shape[0])]

    # ------------------------------------------------------------- output
    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "status": self.status,
            "message": self.message,
            "elementary": list(self.names),
            "reference": self.reference,
            "control_present": bool(self.control_present),
            "n_rows": int(self.n_rows),
            "n_distinct_rows": int(self.n_distinct_rows),
            "rank": int(self.rank),
            "full_rank": bool(self.full_rank),
            "latent_dim": self.latent_dim,
            "latent_dim_ok": self.latent_dim_ok,
            "method": self.method,
            "rtol": float(self.rtol),
            "tolerance": float(self.tolerance),
            "residual_rtol": float(self.residual_rtol),
            "hull_atol": float(self.hull_atol),
            "singular_values": [float(s) for s in self.singular_values],
            "smallest_retained": self.smallest_retained,
            "largest_dropped": self.largest_dropped,
            "n_eliminated": int(self.n_eliminated),
            "min_pivot": self.min_pivot,
            "identified_elementary": list(self.identified_elementary),
            "unidentified_elementary": list(self.unidentified_elementary),
            "elementary_residuals": {n: float(r) for n, r in zip(self.names, self.elementary_residuals)},
            "elementary_coefficient_norms": {
                n: (float(c) if np.isfinite(c) else None) for n, c in zip(self.names, self.elementary_coefficient_norms)
            },
            "ill_conditioned_elementary": list(self.ill_conditioned_elementary),
            "unmeasured": list(self.unmeasured),
            "design_additions": list(self.design_additions),
            "n_tests": len(self.tests),
            "n_covered": int(np.sum(self.covered)),
            "n_extrapolating": len(self.extrapolating),
            "max_coefficient_norm": float(self.max_coefficient_norm),
            "n_ill_conditioned": len(self.ill_conditioned),
            "tests": [t.to_dict() for t in self.tests],
        }

    def render(self, max_tests: int = 50) -> str:
        return render_report(self, max_tests)


# --------------------------------------------------------------------------- helpers
def _unique_keys(labels: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        n = seen.get(lab, 0)
        seen[lab] = n + 1
        out.append(lab if n == 0 else f"{lab}#{n + 1}")
    return out


def _coef_map(c: np.ndarray, keys: Sequence[str]) -> dict[str, float]:
    if c.size == 0:
        return {}
    cut = _COEF_DROP * max(1.0, float(np.max(np.abs(c))))
    idx = np.flatnonzero(np.abs(c) > cut)
    return dict(zip([keys[i] for i in idx.tolist()], c[idx].tolist()))


def check_design(
    train,
    tests=None,
    *,
    names: Sequence[str] | None = None,
    registry: PerturbationRegistry | None = None,
    reference=None,
    latent_dim: int | None = None,
    rtol: float = DEFAULT_RTOL,
    residual_rtol: float = DEFAULT_RESIDUAL_RTOL,
    hull_atol: float = DEFAULT_HULL_ATOL,
    max_coefficient_norm: float = DEFAULT_MAX_COEFFICIENT_NORM,
    max_details: int | None = 100,
    suggest: bool = True,
    method: str = "auto",
) -> DesignReport:
    """Check which test perturbations a training design covers (see the module docstring).

    From a :class:`~perturbax.data.PerturbationData`:
    ``check_design(data.design, ["A+B", "A:0.5+C:2"], registry=data.registry)``.

    Parameters
    ----------
    train
        Training design: label vectors ``(n_rows, K)`` (numpy or scipy.sparse; doses as values;
        duplicates allowed) or label strings such as ``"A+B"``, ``"A:0.5+C:2"``, ``"control"``
        (then pass ``names`` or ``registry``), or mappings ``{name: dose}``.
    tests
        Test perturbations, same forms (``None``: only the design itself is checked).
    names, registry
        Names of the elementary perturbations, in column order (default ``e1 .. eK``).
    reference
        ``l_0``: ``None`` for the control (zero vector), a row index of ``train``, or a label.
    latent_dim
        Requested latent dimension ``d``; ``rank(D) < d`` fails.
    rtol, residual_rtol, hull_atol
        Tolerances (module docstring).
    max_coefficient_norm
        A covered test whose minimum-norm coefficients have ``||c||_2`` above this is flagged
        ill-conditioned (module docstring, Conditioning); ``inf`` turns the flag off.
    max_details
        Number of tests (from the first) that get coefficients, convex-hull checks, missing
        directions and suggestions; ``None`` for all. Coverage and residuals are always computed
        for every test.
    suggest
        Compute, for each uncovered test with details, elementary perturbations to add alone.
    method
        Row-space algorithm: ``"auto"``, ``"svd"`` or ``"peel"`` (:mod:`perturbax.theory.rowspace`).
    """
    for name, val in (("residual_rtol", residual_rtol), ("hull_atol", hull_atol)):
        if not (0 <= val < 1):
            raise ValueError(f"{name} must be in [0, 1), got {val}.")
    if not max_coefficient_norm > 0:
        raise ValueError(
            f"max_coefficient_norm must be > 0 (inf turns the check off), got {max_coefficient_norm}."
        )
    if latent_dim is not None and (int(latent_dim) != latent_dim or latent_dim < 1):
        raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}.")
    if max_details is not None and max_details < 0:
        raise ValueError(f"max_details must be >= 0 or None, got {max_details}.")
    reg = resolve_registry(names, registry, train, tests)
    reg, train, unmeasured = add_unmeasured(reg, train, tests)
    prep = prepare_design(train, reg, reference=reference)
    space = RowSpace.from_rows(prep.D, rtol=rtol, method=method)
    elem_res = space.elementary_residuals()
    identified = elem_res <= residual_rtol
    elem_norms = np.full(reg.K, np.nan)
    if space.method == "svd" and space.basis.shape[1]:
        # D = U S V^T on the active columns: the minimum-norm c of e_k is U S^-1 V^T e_k, so
        # ||c||_2 = ||(row k of V) / s|| -- O(K r), without forming the (K, n_rows) coefficients
        r = space.basis.shape[1]
        norms = np.linalg.norm(space.basis / space.singular_values[:r], axis=1)
        cols = np.asarray(space.block_cols)
        ok = identified[cols]
        elem_norms[cols[ok]] = norms[ok]

    T, tlabels = prep.differences(tests, "tests")
    m = T.shape[0]
    tnorm = np.sqrt(np.asarray(T.multiply(T).sum(axis=1)).ravel()) if m else np.zeros(0)
    res = space.residual_norms(T) if m else np.zeros(0)
    rel = np.where(tnorm > 0, res / np.where(tnorm > 0, tnorm, 1.0), 0.0)
    covered = rel <= residual_rtol

    n_detail = m if max_details is None else min(m, int(max_details))
    keys = _unique_keys(prep.labels)
    absent = {reg.names[k] for k in np.setdiff1d(np.arange(reg.K), np.unique(prep.D.indices))}
    never_set = set(unmeasured) | absent
    measured_names = [n for n in reg.names if n not in never_set]
    hints: dict[str, list[str]] = {}
    partners = [n for n, ok in zip(reg.names, identified) if ok]
    control_ref = not np.any(prep.reference)
    ref_text = None if control_ref else prep.reference_label
    unique_repr = prep.D.shape[0] == space.rank
    results: list[CoverageResult] = []
    if n_detail:
        Td = T[:n_detail].toarray()
        Rd = space.residuals(Td)
        cov_idx = np.flatnonzero(covered[:n_detail])
        C = min_norm_coefficients(prep.D, space, Td[cov_idx]) if cov_idx.size else np.zeros((0, prep.D.shape[0]))
        coef_rows = dict(zip(cov_idx.tolist(), C))
        gram = (prep.D @ prep.D.T).toarray() if cov_idx.size and prep.D.shape[0] <= PAIR_ROWS else None
    for i in range(m):
        label = tlabels[i]
        test_never = ()
        if i < n_detail:
            test_never = tuple(reg.names[k] for k in np.flatnonzero(Td[i] != 0) if reg.names[k] in never_set)
        if i >= n_detail:
            if covered[i]:
                msg = f"{label} is identified (details computed for the first {n_detail} tests only)."
            else:
                msg = (
                    f"{label} is not identified (relative residual {fmt(rel[i])}); details were computed for "
                    f"the first {n_detail} tests only -- check it with max_details=None or on its own."
                )
            results.append(
                CoverageResult(label, bool(covered[i]), float(res[i]), float(rel[i]), None if covered[i] else False,
                               None, None, {}, (), False, msg)
            )
            continue
        if covered[i] and not np.isfinite(coef_rows[i]).all():
            msg = (
                f"{label} is identified; its coefficients did not converge (the design is very "
                f"ill-conditioned: rank margin {fmt(space.smallest_retained)})."
            )
            results.append(
                CoverageResult(label, True, float(res[i]), float(rel[i]), None, None, None, {}, (), True, msg,
                               None, None, True)
            )
        elif covered[i]:
            c = coef_rows[i]
            coefs = _coef_map(c, keys)
            c_norm, c_l1 = float(np.linalg.norm(c)), float(np.abs(c).sum())
            ill = c_norm > max_coefficient_norm
            sc = simplest_coefficients(prep.D, Td[i], residual_rtol * float(tnorm[i]), gram=gram)
            simplest = coefs if sc is None else _coef_map(sc, keys)
            hull_coefs = None
            inside: bool | None = is_convex(c, reference_is_row=prep.reference_is_row, atol=hull_atol)
            if not inside and sc is not None and is_convex(sc, reference_is_row=prep.reference_is_row,
                                                           atol=hull_atol):
                inside, hull_coefs = True, simplest
            if not inside and not unique_repr:
                inside = None
                if prep.D.shape[0] <= _LP_MAX_ROWS:
                    try:
                        hc = convex_coefficients(prep.D, space, Td[i], reference_is_row=prep.reference_is_row)
                    except RuntimeError:
                        hc, inside = None, None
                    else:
                        inside = hc is not None
                        hull_coefs = None if hc is None else _coef_map(hc, keys)
            measured = (len(simplest) == 1 and math.isclose(next(iter(simplest.values())), 1.0, rel_tol=1e-9)) or (
                not simplest and prep.reference_is_row)
            equation = (
                format_combination(simplest, sep=reg.sep, reference=ref_text) if simplest else prep.reference_label
            )
            transfer = bool(reg.contexts) and not measured and bool(np.any((Td[i] + prep.reference)[: reg.n_perturbations] != 0))
            msg = (context_transfer_message(label, equation) if transfer
                   else covered_message(label, equation, inside, measured, _LP_MAX_ROWS))
            if ill:
                msg += " " + ill_conditioned_message(label, c, keys, c_norm, max_coefficient_norm)
            results.append(
                CoverageResult(label, True, float(res[i]), float(rel[i]), inside, coefs, hull_coefs, {}, (), True, msg,
                               c_norm, c_l1, ill, simplest, equation, measured=measured, context_transfer=transfer)
            )
        else:
            missing = top_weights(Rd[i], reg.names, fix_sign=False)
            adds: list[str] = []
            if suggest:
                ks = greedy_unit_additions(
                    space, Rd[i], float(tnorm[i]), residual_rtol, elem_res**2, prefer=Td[i] != 0
                )
                for k in ks:
                    v = prep.reference.copy()
                    v[k] += 1.0
                    adds.append(reg.names[k] if control_ref else reg.decode(v))
            if test_never:
                in_test = [reg.names[k] for k in np.flatnonzero(Td[i] != 0)]
                for n in test_never:  # names outside the registry may be typos: hint at measured ones
                    if n in unmeasured and n not in hints:
                        hints[n] = close_matches(n, measured_names, n=2)
                msg = unmeasured_message(label, test_never, partners, reg.sep, in_test, hints)
            else:
                msg = uncovered_message(label, float(rel[i]), missing, adds, control_ref)
            results.append(
                CoverageResult(label, False, float(res[i]), float(rel[i]), False, None, None, missing,
                               tuple(adds), True, msg, unmeasured=test_never)
            )

    # ----------------------------------------------------------------- summary
    K = reg.K - len(unmeasured)
    unident = [n for n, ok in zip(reg.names, identified) if not ok and n not in unmeasured]
    design_adds: list[str] = []
    if suggest and unident and len(unident) <= _DESIGN_SUGGEST_MAX:
        cols = [reg.index(n) for n in unident]
        E = np.zeros((len(cols), reg.K))
        E[np.arange(len(cols)), cols] = 1.0
        for k in greedy_unit_additions(space, space.residuals(E), np.ones(len(cols)), residual_rtol, elem_res**2,
                                       prune=False):
            v = prep.reference.copy()
            v[k] += 1.0
            design_adds.append(reg.names[k] if control_ref else reg.decode(v))
    parts: list[str] = []
    statuses = [OK]
    if m:
        n_cov = int(covered.sum())
        text = f"{n_cov} of {m} test perturbation{'s' if m > 1 else ''} {'is' if m == 1 else 'are'} identified"
        if n_cov < m:
            statuses.append(FAIL)
            bad = [r for r in results if not r.covered]
            verb = "is" if len(bad) == 1 else "are"
            text += f"; {len(bad)} {verb} not: {join_names([r.label for r in bad], 8)}"
        parts.append(text + ".")
        first = next((r for r in results if not r.covered and r.details), None)
        if first is not None:
            parts.append(first.message)
        ext = [r.label for r in results if r.extrapolation]
        if ext:
            statuses.append(WARNING)
            parts.append(
                f"{len(ext)} identified test(s) lie outside the convex hull of the training labels "
                f"(extrapolation): {join_names(ext, 8)}."
            )
        ill = [r for r in results if r.ill_conditioned]
        if ill:
            statuses.append(WARNING)
            text = (
                f"{len(ill)} covered test(s) are ill-conditioned (coefficient norm ||c||_2 above "
                f"{fmt(max_coefficient_norm)}): {join_names([r.label for r in ill], 8)}"
            )
            normed = [r for r in ill if r.coefficient_norm is not None]
            if normed:
                worst = max(normed, key=lambda r: r.coefficient_norm)
                text += (
                    f"; the worst, {worst.label}, amplifies the estimation error of a measured condition "
                    f"{fmt(worst.coefficient_norm)}-fold"
                )
            parts.append(text + ".")
    if not prep.reference_is_row:
        statuses.append(WARNING)
        parts.append(
            f"The reference {prep.reference_label!r} is not among the training rows: coverage is computed "
            f"as if it were measured; measure it (control cells) or pass reference=<a measured row>."
        )
    scope = ""
    if space.rank == K:
        parts.append(f"Design as a whole{scope}: full rank {K}, every elementary perturbation is identified.")
    else:
        text = (
            f"Design as a whole{scope}: rank {space.rank} of {K}; {len(unident)} elementary perturbation(s) "
            f"are not identified on their own: {join_names(unident)}"
        )
        if design_adds:
            text += f"; to identify every one, add {join_names(design_adds)}{' alone' if control_ref else ''}"
        parts.append(text + (" (separate from the test verdicts)." if m else "."))
        if m == 0:
            statuses.append(WARNING)
    if latent_dim is not None:
        if space.rank < latent_dim:
            statuses.append(FAIL)
            parts.append(
                f"rank {space.rank} < latent dimension {latent_dim}: the perturbation shifts span at most "
                f"{space.rank} latent directions; add at least {latent_dim - space.rank} perturbation(s) with "
                f"new directions or lower the latent dimension."
            )
        else:
            parts.append(f"rank {space.rank} >= latent dimension {latent_dim} (necessary condition holds).")
    status = max(statuses, key=[OK, WARNING, FAIL].index)
    return DesignReport(
        status=status,
        message=" ".join(parts),
        names=reg.names,
        reference=prep.reference_label,
        control_present=prep.reference_is_row,
        n_rows=prep.n_rows,
        n_distinct_rows=prep.n_distinct,
        rank=space.rank,
        method=space.method,
        rtol=float(rtol),
        tolerance=space.tolerance,
        residual_rtol=float(residual_rtol),
        hull_atol=float(hull_atol),
        singular_values=space.singular_values,
        smallest_retained=space.smallest_retained,
        largest_dropped=space.largest_dropped,
        n_eliminated=space.n_eliminated,
        min_pivot=float(space.pivots.min()) if space.pivots.size else None,
        identified=identified,
        elementary_residuals=elem_res,
        elementary_coefficient_norms=elem_norms,
        latent_dim=None if latent_dim is None else int(latent_dim),
        tests=tuple(results),
        covered=covered,
        relative_residuals=rel,
        max_coefficient_norm=float(max_coefficient_norm),
        space=space,
        design=prep,
        unmeasured=tuple(unmeasured),
        design_additions=tuple(design_adds),
    )
