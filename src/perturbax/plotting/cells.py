"""Whole cell distributions and method comparisons: predicted against held-out cells."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_cell_distributions", "plot_scores"]


def plot_cell_distributions(cells: Mapping[str, np.ndarray], *, reference=None, ax=None, title: str | None = None,
                            max_cells: int = 300, seed: int = 0):
    """Overlay of cell sets (e.g. held-out cells, the model's and a baseline's predicted cells) on
    the first two principal components of ``reference`` (default: all sets together).

    ``cells``: ``{name: (n_cells, n_genes) array}``, drawn in order, at most ``max_cells`` cells each
    (a seeded subsample); each set's mean is a large marker of its colour, so a shifted mean and a
    wrong spread are both visible.
    """
    from perturbax.metrics.evaluate import PCAProjector

    if not cells:
        raise ValueError("cells is empty; pass {name: (n_cells, n_genes) array} for at least one set.")
    sets = {name: np.asarray(x, dtype=float) for name, x in cells.items()}
    genes = {x.shape[1] if x.ndim == 2 else None for x in sets.values()}
    if len(genes) != 1 or None in genes:
        shapes = {name: x.shape for name, x in sets.items()}
        raise ValueError(f"every set must be (n_cells, n_genes) with the same genes; got shapes {shapes}.")
    ref = np.concatenate(list(sets.values())) if reference is None else np.asarray(reference, dtype=float)
    pca = PCAProjector.fit(ref, n_components=2)
    rng = np.random.default_rng(seed)
    ax = ax or plt.subplots(figsize=(4.5, 4))[1]
    for i, (name, x) in enumerate(sets.items()):
        color = plt.get_cmap("tab10")(i % 10)
        xy = pca.transform(x)
        shown = xy if len(xy) <= max_cells else xy[rng.choice(len(xy), max_cells, replace=False)]
        ax.scatter(shown[:, 0], shown[:, 1], s=5, alpha=0.35, color=color, label=f"{name} ({len(x)} cells)")
        centre = xy.mean(0)
        ax.scatter([centre[0]], [centre[1]], s=120, marker="X", color=color, edgecolor="k", linewidth=0.8, zorder=3)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, markerscale=2, loc="best")
    return ax


def plot_scores(table, *, metric: str = "energy_pca", by: str = "condition", method: str = "method", ax=None,
                title: str | None = None, log: bool = False):
    """Grouped bars of one score per ``by`` group (x) and method (colour), e.g. the table of
    :func:`perturbax.metrics.evaluate_conditions` concatenated over the model and the baselines,
    so the model is drawn next to its baselines and the noise floor. Several rows of one
    (group, method) pair are averaged."""
    for col in (metric, by, method):
        if col not in table.columns:
            raise ValueError(f"table has no column {col!r}; its columns are {list(table.columns)}.")
    wide = table.pivot_table(index=by, columns=method, values=metric, aggfunc="mean", sort=False)
    ax = ax or plt.subplots(figsize=(max(4.0, 0.9 * len(wide) + 2), 3.2))[1]
    n = wide.shape[1]
    width = 0.8 / n
    x = np.arange(len(wide))
    for i, name in enumerate(wide.columns):
        ax.bar(x + (i - (n - 1) / 2) * width, wide[name].to_numpy(), width, label=str(name),
               color=plt.get_cmap("tab10")(i % 10))
    ax.set_xticks(x, [str(v) for v in wide.index], rotation=30 if len(wide) > 3 else 0, ha="right" if len(wide) > 3 else "center",
                  fontsize=8)
    ax.set_ylabel(metric)
    if log:
        ax.set_yscale("symlog", linthresh=1e-2)
    ax.axhline(0, color="0.5", lw=0.6)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return ax
