"""Per-condition evaluation table: distributional metrics in PCA space, gene-level metrics on means.

The protocol of DESIGN.md section 6: energy distance (U-statistic by default) and RBF MMD in a
PCA space fit on reference (training) cells (by default the control cells; never the evaluated
cells), mean L2, Pearson delta on all genes and on the
top-k DE genes (:func:`perturbax.metrics.top_de_genes`), R^2 and MSE of the means on the top-k
DE genes.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from perturbax.metrics.distances import (
    _as_cells,
    _check_form,
    _check_same_genes,
    energy_distance,
    mean_l2,
    mmd_rbf,
)
from perturbax.metrics.expression import mse_means, pearson_delta, r2_means, top_de_genes

__all__ = ["PCAProjector", "evaluate_conditions", "summarize"]


@dataclass(frozen=True)
class PCAProjector:
    """A fitted linear PCA projection ``(X - mean) @ components.T``.

    Attributes
    ----------
    mean
        Gene means of the fitting cells, shape ``(G,)``.
    components
        Principal axes as orthonormal rows, shape ``(k, G)``, by decreasing variance. Sign
        convention: the entry of largest absolute value in each row is positive (the first such
        entry on exact ties).
    """

    mean: np.ndarray
    components: np.ndarray

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64)
        comps = np.asarray(self.components, dtype=np.float64)
        if mean.ndim != 1 or comps.ndim != 2 or comps.shape[1] != mean.shape[0]:
            raise ValueError(
                f"PCAProjector needs mean of shape (G,) and components of shape (k, G); got "
                f"{mean.shape} and {comps.shape}."
            )
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "components", comps)

    @property
    def n_components(self) -> int:
        """Number of principal components ``k``."""
        return self.components.shape[0]

    @classmethod
    def fit(cls, X, n_components: int = 50) -> PCAProjector:
        """Fit PCA by a NumPy SVD of the centred cells ``X`` (shape ``(n, G)``, ``n >= 2``).

        The centred data have rank at most ``min(n - 1, G)``; a larger ``n_components`` is
        clamped to that value with a ``UserWarning`` (directions beyond it carry no variance of
        ``X`` and would be arbitrary).
        """
        x = _as_cells(X, "X", min_cells=2)
        if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) \
                or n_components < 1:
            raise ValueError(f"`n_components` must be a positive integer, got {n_components!r}.")
        n, g = x.shape
        k_max = min(n - 1, g)
        k = int(n_components)
        if k > k_max:
            warnings.warn(
                f"n_components={k} exceeds the rank bound min(n_cells - 1, n_genes) = {k_max} of "
                f"the centred data ({n} cells, {g} genes); using {k_max} components.",
                UserWarning,
                stacklevel=2,
            )
            k = k_max
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        comps = vt[:k].copy()
        pivot = np.argmax(np.abs(comps), axis=1)
        signs = np.sign(comps[np.arange(k), pivot])
        signs[signs == 0] = 1.0
        comps *= signs[:, None]
        return cls(mean=mean, components=comps)

    def transform(self, X) -> np.ndarray:
        """Project cells ``X`` (shape ``(n, G)``) to ``(n, k)`` PCA coordinates."""
        x = _as_cells(X, "X")
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"`X` has {x.shape[1]} genes but the PCA was fit on {self.mean.shape[0]}; use the "
                "same genes in the same order."
            )
        return (x - self.mean) @ self.components.T


def evaluate_conditions(
    pred: Mapping[str, np.ndarray],
    truth: Mapping[str, np.ndarray],
    control: np.ndarray,
    *,
    reference: np.ndarray | None = None,
    n_pcs: int = 50,
    top_k: int = 20,
    energy_form: str = "U",
    method: str | None = None,
) -> pd.DataFrame:
    """Score predicted cells against held-out cells, one row per condition.

    Parameters
    ----------
    pred, truth
        ``{condition: cells (n, G)}``. Every condition of ``truth`` must be in ``pred``; extra
        conditions in ``pred`` are ignored. Rows follow the order of ``truth``.
    control
        Control cells ``(n_ctrl, G)``: the baseline of the deltas and of the DE ranking.
    reference
        Cells on which the PCA is fit (the training cells). Default: the ``control`` cells only;
        the evaluated (``truth``) cells are never used, so the space does not adapt to them.
    n_pcs
        Number of principal components (clamped to the rank bound with a warning).
    top_k
        Number of top DE genes, from ``top_de_genes(truth[c], control, top_k)``.
    energy_form
        ``"U"`` (unbiased, default) or ``"V"``; used for both ``energy_pca`` and ``mmd_pca``
        (``"U"`` needs at least 2 cells per set).
    method
        If given, a leading ``method`` column with this value (for stacking tables).

    Returns
    -------
    pandas.DataFrame
        Columns: [``method``], ``condition``, ``n_pred``, ``n_true``, ``energy_pca`` (energy
        distance in PCA space), ``mmd_pca`` (RBF MMD^2 in PCA space, default bandwidths),
        ``mean_l2`` (distance of the mean vectors in gene space), ``pearson_delta`` (all genes),
        ``pearson_delta_top{k}``, ``r2_top{k}``, ``mse_top{k}`` (gene space, top-k DE genes).
    """
    if not isinstance(pred, Mapping) or not isinstance(truth, Mapping):
        raise TypeError("`pred` and `truth` must be mappings {condition: cells}.")
    if len(truth) == 0:
        raise ValueError("`truth` is empty; pass at least one held-out condition.")
    missing = [c for c in truth if c not in pred]
    if missing:
        raise ValueError(
            f"`pred` lacks {len(missing)} condition(s) present in `truth`: {missing}. Predict "
            "every held-out condition (or drop it from `truth`)."
        )
    energy_form = _check_form(energy_form)
    ctrl = _as_cells(control, "control")
    min_cells = 2 if energy_form == "U" else 1
    cells_true: dict[str, np.ndarray] = {}
    cells_pred: dict[str, np.ndarray] = {}
    for c in truth:
        t = _as_cells(truth[c], f"truth[{c!r}]")
        p = _as_cells(pred[c], f"pred[{c!r}]")
        _check_same_genes(t, ctrl, f"truth[{c!r}]", "control")
        _check_same_genes(p, ctrl, f"pred[{c!r}]", "control")
        for arr, nm in ((t, f"truth[{c!r}]"), (p, f"pred[{c!r}]")):
            if arr.shape[0] < min_cells:
                raise ValueError(
                    f"`{nm}` has {arr.shape[0]} cell(s); energy_form={energy_form!r} needs at "
                    f"least {min_cells}. Use energy_form='V' or provide more cells."
                )
        cells_true[c], cells_pred[c] = t, p

    if reference is None:
        ref = ctrl
    else:
        ref = _as_cells(reference, "reference")
        _check_same_genes(ref, ctrl, "reference", "control")
    pca = PCAProjector.fit(ref, n_components=n_pcs)

    rows = []
    for c in truth:
        t, p = cells_true[c], cells_pred[c]
        genes = top_de_genes(t, ctrl, top_k)
        zt, zp = pca.transform(t), pca.transform(p)
        row = {} if method is None else {"method": method}
        row.update(
            {
                "condition": c,
                "n_pred": p.shape[0],
                "n_true": t.shape[0],
                "energy_pca": energy_distance(zp, zt, form=energy_form),
                "mmd_pca": mmd_rbf(zp, zt, form=energy_form),
                "mean_l2": mean_l2(p, t),
                "pearson_delta": pearson_delta(p, t, ctrl),
                f"pearson_delta_top{top_k}": pearson_delta(p, t, ctrl, genes=genes),
                f"r2_top{top_k}": r2_means(p, t, genes=genes),
                f"mse_top{top_k}": mse_means(p, t, genes=genes),
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame, by: str | None = "method") -> pd.DataFrame:
    """Mean and median of every metric column per group (e.g. per method).

    Parameters
    ----------
    df
        A table from :func:`evaluate_conditions` (possibly several concatenated).
    by
        Grouping column; ``None`` summarises all rows together (one row, index ``"all"``).

    Returns
    -------
    pandas.DataFrame
        One row per group, columns a MultiIndex ``(metric, "mean" | "median")`` over the numeric
        columns other than ``n_pred``/``n_true``. NaN values (undefined correlations) are
        skipped; the column ``("n_conditions", "")`` counts the rows per group.
    """
    if by is not None and by not in df.columns:
        raise ValueError(
            f"Column {by!r} is not in the table (columns: {list(df.columns)}); pass method= to "
            "evaluate_conditions, choose another `by`, or use by=None."
        )
    metrics = [
        col for col in df.columns
        if col not in ("method", "condition", "n_pred", "n_true", by)
        and pd.api.types.is_numeric_dtype(df[col])
    ]
    if by is None:
        grouped = df.assign(_all="all").groupby("_all", sort=False)
    else:
        grouped = df.groupby(by, sort=False)
    out = grouped[metrics].agg(["mean", "median"])
    out[("n_conditions", "")] = grouped.size()
    out.index.name = by
    return out
