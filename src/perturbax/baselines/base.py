"""The baseline protocol and what all baselines share.

Every baseline here predicts *cells*, not only means, in the same way:

    predicted cells of label l  =  control cells  +  delta(l)

where ``delta(l)`` (shape ``(G,)``) is the baseline's predicted change of the mean from the control
mean. The control cells carry the cell-to-cell variation (the "control residuals"
``control cells - control mean``), so the predicted mean is ``control mean + delta(l)``. For the
control label itself (the zero vector) every baseline returns the control cells.

With contexts (``from_anndata(..., context_keys=...)``) the context indicator columns are part of
``l``; the cells of a label start from the training control cells of *its* context (the reference
context's when that context has no control cells in training), moved to the predicted mean.

Usage (all baselines are frozen dataclasses; ``fit`` returns a new, fitted object)::

    model = LinearBaseline(alpha=0.1).fit(split.train)
    cells = model.predict(["A+B", "C"])          # {canonical label: (n_control, G) float32}
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

import numpy as np
import scipy.sparse as sp

from perturbax.data.core import PerturbationData
from perturbax.data.labels import LabelLike, PerturbationRegistry

__all__ = ["Baseline", "TrainingSummary", "summarize_training"]


@runtime_checkable
class Baseline(Protocol):
    """What every baseline offers: ``fit`` on training data, then ``predict`` cells."""

    name: ClassVar[str]

    def fit(self, data: PerturbationData) -> Self:
        """A fitted copy of this baseline (the object itself is not changed)."""
        ...

    def why_not(self, label: LabelLike) -> str | None:
        """``None`` if ``label`` can be predicted, else the reason (the message ``predict`` raises)."""
        ...

    def predict(
        self, labels: LabelLike | Iterable[LabelLike], *, n_cells: int | None = None, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """``{canonical label: predicted cells (n_cells, G) float32}``."""
        ...


@dataclass(frozen=True, repr=False)
class TrainingSummary:
    """Per-condition means of the training data (float64) and its control cells.

    Attributes
    ----------
    registry, gene_names
        From the training data.
    conditions, design
        Training conditions and their label vectors ``(C, K)`` (control included).
    means
        Mean expression of each condition, ``(C, G)`` float64.
    n_cells
        Cells per condition, ``(C,)``.
    control_cells
        The control cells ``(n0, G)`` float32 (read-only).
    control_mean
        Their mean, ``(G,)`` float64.
    """

    registry: PerturbationRegistry
    gene_names: tuple[str, ...]
    conditions: tuple[str, ...]
    design: np.ndarray
    means: np.ndarray
    n_cells: np.ndarray
    control_cells: np.ndarray
    control_mean: np.ndarray

    @property
    def perturbed(self) -> np.ndarray:
        """Indices of the perturbed (non-control) training conditions."""
        return np.flatnonzero(np.any(self.design != 0, axis=1))

    @property
    def deltas(self) -> np.ndarray:
        """``means - control_mean`` of every condition, ``(C, G)``."""
        return self.means - self.control_mean

    @property
    def in_training(self) -> np.ndarray:
        """Boolean ``(K,)``: elementary perturbation present in at least one training condition."""
        return np.any(self.design != 0, axis=0)

    @property
    def measured_alone(self) -> np.ndarray:
        """Boolean ``(K,)``: elementary perturbation measured as a single in training."""
        single = np.count_nonzero(self.design, axis=1) == 1
        return np.any(self.design[single] != 0, axis=0)


def summarize_training(data: PerturbationData) -> TrainingSummary:
    """Condition means and control cells of training data (raises if there is no control)."""
    if not isinstance(data, PerturbationData):
        raise TypeError(
            f"Baselines are fitted on a PerturbationData (from perturbax.data.from_anndata or a "
            f"Split's .train), got {type(data).__name__}."
        )
    ci = data.control_index
    if ci is None:
        raise ValueError(
            f"The training data have no control cells (label {data.control!r}); baselines add "
            f"predicted shifts to control cells. Keep the control in the training split."
        )
    C = data.n_conditions
    counts = np.bincount(data.env, minlength=C).astype(np.float64)
    indicator = sp.csr_matrix(
        (1.0 / counts[data.env], (data.env, np.arange(data.n_cells))), shape=(C, data.n_cells)
    )
    X = data.X
    means = indicator @ (X.astype(np.float64) if sp.issparse(X) else np.asarray(X, dtype=np.float64))
    means = np.asarray(means.toarray() if sp.issparse(means) else means, dtype=np.float64)
    control_cells = data.dense(np.flatnonzero(data.env == ci))
    control_cells.flags.writeable = False
    means.flags.writeable = False
    return TrainingSummary(
        registry=data.registry,
        gene_names=data.gene_names,
        conditions=data.conditions,
        design=np.asarray(data.design, dtype=np.float64),
        means=means,
        n_cells=counts.astype(np.int64),
        control_cells=control_cells,
        control_mean=means[ci],
    )


@dataclass(frozen=True, repr=False)
class _Fitted:
    """``delta(l) = offset + l @ effects`` for perturbed labels; ``blocked[name]`` = reason."""

    summary: TrainingSummary
    offset: np.ndarray
    effects: np.ndarray
    blocked: Mapping[str, str]
    info: Mapping[str, Any] = field(default_factory=dict)
    #: With contexts: ``{canonical control label of a non-reference context: its training control cells}``
    #: (rows of the training ``X``, sparse if it is; made dense when a label of that context is predicted).
    sources: Mapping[str, Any] = field(default_factory=dict)


def _context_sources(data: PerturbationData) -> dict[str, Any]:
    """The training control cells of every non-reference context (empty without contexts)."""
    if not data.context_keys:
        return {}
    P = data.registry.n_perturbations
    design = np.asarray(data.design)
    return {cond: data.X[data.cells_of(cond)] for i, cond in enumerate(data.conditions)
            if cond != data.control and not np.any(design[i, :P] != 0)}


def _context_relative_deltas(summary: TrainingSummary) -> tuple[np.ndarray, np.ndarray]:
    """``(D, ok)``: each condition's mean minus the mean of the control of its own context ``(C, G)``,
    and whether that control is in training ``(C,)`` (rows without it are zero). Without contexts
    ``D`` is :attr:`TrainingSummary.deltas`."""
    P = summary.registry.n_perturbations
    controls = {tuple(row[P:]): r for r, row in enumerate(summary.design) if not np.any(row[:P] != 0)}
    ref = [controls.get(tuple(row[P:])) for row in summary.design]
    ok = np.array([r is not None for r in ref])
    D = np.zeros_like(summary.means)
    D[ok] = summary.means[ok] - summary.means[[r for r in ref if r is not None]]
    return D, ok


def _context_effects(summary: TrainingSummary) -> tuple[np.ndarray, np.ndarray]:
    """``(effects, known)`` of the context indicator columns: the least-squares fit of the training
    control means of the contexts on their context columns, relative to the reference control
    ``(K - P, G)`` (with one context key: each context's control mean minus the reference one), and
    which columns some training control condition covers ``(K - P,)``."""
    P = summary.registry.n_perturbations
    rows = np.flatnonzero(~np.any(summary.design[:, :P] != 0, axis=1))
    A = summary.design[np.ix_(rows, np.arange(P, summary.design.shape[1]))]
    effects = np.linalg.lstsq(A, summary.means[rows] - summary.control_mean, rcond=None)[0] if A.shape[1] else \
        np.zeros((0, summary.means.shape[1]))
    return effects, np.any(A != 0, axis=0)


@dataclass(frozen=True, repr=False)
class _ShiftBaseline:
    """Common machinery: subclasses implement ``_estimate(summary) -> _Fitted``."""

    name: ClassVar[str] = "baseline"
    fitted: _Fitted | None = field(default=None, repr=False, compare=False)

    # -------------------------------------------------------------- to override
    def _estimate(self, summary: TrainingSummary) -> _Fitted:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ public
    def fit(self, data: PerturbationData) -> Self:
        """A fitted copy of this baseline."""
        fitted = self._estimate(summarize_training(data))
        return replace(self, fitted=replace(fitted, sources=_context_sources(data)))

    @property
    def is_fitted(self) -> bool:
        return self.fitted is not None

    def _require_fit(self) -> _Fitted:
        if self.fitted is None:
            raise RuntimeError(
                f"{type(self).__name__} is not fitted; call `model = {type(self).__name__}(...).fit(train)` "
                f"and predict with the returned object."
            )
        return self.fitted

    @property
    def registry(self) -> PerturbationRegistry:
        return self._require_fit().summary.registry

    @property
    def gene_names(self) -> tuple[str, ...]:
        return self._require_fit().summary.gene_names

    def _vector(self, label: LabelLike) -> np.ndarray:
        return self._require_fit().summary.registry.encode(label)  # KeyError naming unknown names

    def why_not(self, label: LabelLike) -> str | None:
        """``None`` if ``label`` can be predicted, else why not (unknown names raise KeyError)."""
        fit = self._require_fit()
        vec = self._vector(label)
        reasons = [fit.blocked[fit.summary.registry.names[k]] for k in np.flatnonzero(vec)
                   if fit.summary.registry.names[k] in fit.blocked]
        return " ".join(reasons) if reasons else None

    def predict_mean(self, label: LabelLike) -> np.ndarray:
        """Predicted mean expression ``(G,)`` float64 of one label."""
        fit = self._require_fit()
        return fit.summary.control_mean + self._delta(label)

    def _delta(self, label: LabelLike) -> np.ndarray:
        fit = self._require_fit()
        vec = self._vector(label)
        if not np.any(vec):
            return np.zeros_like(fit.summary.control_mean)
        reason = self.why_not(vec)
        if reason is not None:
            canon = fit.summary.registry.decode(vec)
            raise ValueError(f"{type(self).__name__} cannot predict {canon!r}: {reason}")
        return fit.offset + vec @ fit.effects

    def predict(
        self, labels: LabelLike | Iterable[LabelLike], *, n_cells: int | None = None, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Predicted cells ``{canonical label: (n, G) float32}``.

        ``n_cells=None`` uses every training control cell (of the label's context, with contexts)
        once, in order (deterministic); an integer draws that many control cells at random (without
        replacement when possible), reproducibly from ``seed`` and the label.
        """
        fit = self._require_fit()
        summary = fit.summary
        if isinstance(labels, (str, Mapping, np.ndarray)):
            labels = [labels]
        out: dict[str, np.ndarray] = {}
        for label in labels:
            vec = self._vector(label)
            canon = summary.registry.decode(vec)
            if canon in out:
                continue
            mean = summary.control_mean + self._delta(vec)
            cells, center = summary.control_cells, summary.control_mean
            if fit.sources:  # the control cells of the label's context
                P = summary.registry.n_perturbations
                src = fit.sources.get(summary.registry.decode(np.concatenate([np.zeros(P), vec[P:]])))
                if src is not None:
                    cells = np.asarray(src.toarray() if sp.issparse(src) else src, dtype=np.float32)
                    center = cells.mean(0, dtype=np.float64)
            base = _draw_control(cells, n_cells, seed, canon)
            out[canon] = (base.astype(np.float64) + (mean - center)).astype(np.float32)
        return out

    def __repr__(self) -> str:
        params = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name != "fitted"
        )
        state = "fitted" if self.fitted is not None else "not fitted"
        return f"{type(self).__name__}({params}) [{state}]"


def _draw_control(control: np.ndarray, n_cells: int | None, seed: int, label: str) -> np.ndarray:
    if n_cells is None:
        return control
    if isinstance(n_cells, bool) or not isinstance(n_cells, (int, np.integer)) or n_cells < 1:
        raise ValueError(f"n_cells must be a positive integer or None (all control cells), got {n_cells!r}.")
    rng = np.random.default_rng([int(seed), zlib.crc32(label.encode())])
    n0 = control.shape[0]
    idx = rng.choice(n0, size=int(n_cells), replace=int(n_cells) > n0)
    return control[idx]
