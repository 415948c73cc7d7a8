"""Gene-level metrics on mean expression: DE ranking, Pearson delta, R^2 and MSE of means.

**The DE ranking of perturbax.** :func:`top_de_genes` is the single definition of "top-k
differentially expressed genes" used everywhere in the package (metrics, baselines, benchmarks,
docs): genes sorted by descending ``|mean(true) - mean(control)|`` in the expression space of the
arrays you pass (no test statistic, no variance scaling), ties broken by the lower gene index.

Inputs are cell matrices ``(n_cells, n_genes)`` whose means over cells are used, or (where
stated) mean vectors ``(n_genes,)``. All computations are float64.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

from perturbax.metrics.distances import _check_finite

__all__ = ["mse_means", "pearson_delta", "r2_means", "top_de_genes"]


def _mean_vector(a, name: str) -> np.ndarray:
    """Mean over cells of a 2-D cell matrix, or a 1-D mean vector as is (float64, finite)."""
    if sp.issparse(a):
        a = a.toarray()
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be a numeric array, got {type(a).__name__}.") from err
    if arr.ndim == 2:
        if arr.shape[0] == 0:
            raise ValueError(f"`{name}` has 0 cells; at least 1 is needed to take a mean.")
        _check_finite(arr, name)
        return arr.mean(axis=0)
    if arr.ndim == 1:
        _check_finite(arr, name)
        return arr
    raise ValueError(
        f"`{name}` must be a cell matrix (n_cells, n_genes) or a mean vector (n_genes,); got shape "
        f"{arr.shape}."
    )


def _same_length(vectors: dict[str, np.ndarray]) -> int:
    lengths = {k: v.shape[0] for k, v in vectors.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"`{k}` has {g}" for k, g in lengths.items())
        raise ValueError(
            f"Gene counts differ ({desc}); all inputs must use the same genes in the same order."
        )
    return next(iter(lengths.values()))


def _gene_index(genes, n_genes: int) -> np.ndarray:
    """Validated integer gene indices (accepts integer indices or a boolean mask of length G)."""
    if genes is None:
        return np.arange(n_genes)
    g = np.asarray(genes)
    if g.size == 0:
        raise ValueError("`genes` selects no gene; pass at least one gene index.")
    if g.dtype == bool:
        if g.shape != (n_genes,):
            raise ValueError(
                f"A boolean `genes` mask must have shape ({n_genes},), got {g.shape}."
            )
        g = np.flatnonzero(g)
    elif g.ndim != 1 or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(
            f"`genes` must be a 1-D array of integer gene indices (or a boolean mask); got "
            f"dtype {g.dtype} and shape {g.shape}. Map gene names to indices first."
        )
    if g.size == 0:
        raise ValueError("`genes` selects no gene; pass at least one gene index.")
    if g.min() < -n_genes or g.max() >= n_genes:
        raise ValueError(
            f"`genes` contains an index out of range for {n_genes} genes (min {g.min()}, "
            f"max {g.max()})."
        )
    return g


def top_de_genes(true, control, k: int) -> np.ndarray:
    """Indices of the ``k`` most differentially expressed genes (the package's DE ranking).

    Genes are ranked by descending ``|mean(true) - mean(control)|`` in the expression space of
    the inputs; ties are broken by the lower gene index (stable sort). This is the only DE
    ranking used in perturbax.

    Parameters
    ----------
    true, control
        Perturbed and control cells ``(n, G)``, or their mean vectors ``(G,)``.
    k
        Number of genes, ``1 <= k <= G``.

    Returns
    -------
    numpy.ndarray
        Integer gene indices, shape ``(k,)``, most changed first.
    """
    mt = _mean_vector(true, "true")
    mc = _mean_vector(control, "control")
    n_genes = _same_length({"true": mt, "control": mc})
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_genes:
        raise ValueError(
            f"`k` must be an integer between 1 and the number of genes ({n_genes}), got {k!r}."
        )
    score = np.abs(mt - mc)
    order = np.argsort(-score, kind="stable")
    return order[: int(k)]


def _pearson(a: np.ndarray, b: np.ndarray, what: str) -> float:
    a = a - a.mean()
    b = b - b.mean()
    na, nb = np.sqrt(a @ a), np.sqrt(b @ b)
    if na == 0 or nb == 0:
        warnings.warn(
            f"Pearson correlation of {what} is undefined because one of the vectors is constant "
            "over the selected genes (e.g. a prediction equal to the control mean); returning NaN.",
            RuntimeWarning,
            stacklevel=3,
        )
        return float("nan")
    return float(np.clip((a @ b) / (na * nb), -1.0, 1.0))


def pearson_delta(pred, true, control, *, genes=None) -> float:
    """Pearson correlation of the predicted and the true change from control.

    Computes ``corr(mean(pred) - mean(control), mean(true) - mean(control))`` over all genes or
    over ``genes``.

    Parameters
    ----------
    pred, true, control
        Cell matrices ``(n, G)`` or mean vectors ``(G,)``.
    genes
        Optional integer gene indices or boolean mask selecting the genes (e.g.
        :func:`top_de_genes`); at least 2 genes are needed for a correlation.

    Returns
    -------
    float
        Correlation in ``[-1, 1]``; NaN (with a ``RuntimeWarning``) if either change vector is
        constant over the selected genes.
    """
    mp = _mean_vector(pred, "pred")
    mt = _mean_vector(true, "true")
    mc = _mean_vector(control, "control")
    n_genes = _same_length({"pred": mp, "true": mt, "control": mc})
    g = _gene_index(genes, n_genes)
    if g.size < 2:
        raise ValueError(f"A Pearson correlation needs at least 2 genes; `genes` selects {g.size}.")
    return _pearson(mp[g] - mc[g], mt[g] - mc[g], "the changes from control")


def r2_means(pred, true, *, genes=None) -> float:
    """Coefficient of determination of the true mean expression by the predicted one.

    ``R^2 = 1 - sum_g (t_g - p_g)^2 / sum_g (t_g - tbar)^2`` where ``t``, ``p`` are the true and
    predicted mean vectors over the selected genes and ``tbar`` is the mean of ``t`` over those
    genes. It can be negative (worse than predicting ``tbar`` for every gene).

    Parameters
    ----------
    pred, true
        Cell matrices ``(n, G)`` (their means over cells are used) or mean vectors ``(G,)``.
    genes
        Optional integer gene indices or boolean mask (at least 2 genes).

    Returns
    -------
    float
        ``R^2``; NaN (with a ``RuntimeWarning``) if the true means are equal on all selected genes.
    """
    mp = _mean_vector(pred, "pred")
    mt = _mean_vector(true, "true")
    n_genes = _same_length({"pred": mp, "true": mt})
    g = _gene_index(genes, n_genes)
    if g.size < 2:
        raise ValueError(f"R^2 over genes needs at least 2 genes; `genes` selects {g.size}.")
    t, p = mt[g], mp[g]
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    ss_res = float(np.sum((t - p) ** 2))
    if ss_tot == 0:
        warnings.warn(
            "R^2 is undefined because the true mean is identical on all selected genes; "
            "returning NaN.",
            RuntimeWarning,
            stacklevel=2,
        )
        return float("nan")
    return 1.0 - ss_res / ss_tot


def mse_means(pred, true, *, genes=None) -> float:
    """Mean squared error between the predicted and the true mean vectors over the genes.

    Parameters
    ----------
    pred, true
        Cell matrices ``(n, G)`` (their means over cells are used) or mean vectors ``(G,)``.
    genes
        Optional integer gene indices or boolean mask.

    Returns
    -------
    float
        ``mean_g (p_g - t_g)^2``.
    """
    mp = _mean_vector(pred, "pred")
    mt = _mean_vector(true, "true")
    n_genes = _same_length({"pred": mp, "true": mt})
    g = _gene_index(genes, n_genes)
    return float(np.mean((mp[g] - mt[g]) ** 2))
