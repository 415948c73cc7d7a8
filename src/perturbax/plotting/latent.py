"""Latent embeddings coloured by perturbation."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_latent"]


def plot_latent(z, labels: Sequence[str], *, dims: tuple[int, int] | None = None, ax=None, max_legend: int = 12,
                title: str | None = None):
    """Scatter of latent states ``z`` (cells x d), one colour per perturbation label.

    ``dims`` picks two latent coordinates; by default the first two principal components of ``z``
    (a 1-D latent is drawn against a jitter-free zero axis).
    """
    z = np.asarray(z, dtype=float)
    labels = np.asarray([str(v) for v in labels])
    if z.ndim != 2 or z.shape[0] != labels.size:
        raise ValueError(f"z must be (cells, d) with one label per cell; got z {z.shape} and {labels.size} labels.")
    if dims is not None:
        xy = z[:, list(dims)]
        names = [f"z{dims[0]}", f"z{dims[1]}"]
    elif z.shape[1] == 1:
        xy, names = np.column_stack([z[:, 0], np.zeros(len(z))]), ["z0", ""]
    else:
        zc = z - z.mean(0)
        _, _, vt = np.linalg.svd(zc, full_matrices=False)
        xy, names = zc @ vt[:2].T, ["PC1 of z", "PC2 of z"]
    ax = ax or plt.subplots(figsize=(4.5, 4))[1]
    cats = list(dict.fromkeys(labels))
    cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
    for i, cat in enumerate(cats):
        m = labels == cat
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.6, color=cmap(i % cmap.N), label=cat if i < max_legend else None)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, markerscale=2, loc="best")
    return ax
