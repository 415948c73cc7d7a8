"""Loss curves of a fit."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_loss"]


def plot_loss(history: Mapping[str, np.ndarray], *, ax=None, smooth: int = 50, title: str | None = None):
    """Training loss per step (running mean over ``smooth`` steps) and the held-out loss.

    ``history`` is ``FitResult.history`` (keys ``loss``, ``val_step``, ``val_loss``).
    """
    loss = np.asarray(history["loss"], dtype=float)
    if loss.size == 0:
        raise ValueError("The history has no loss values (did the fit run any step?).")
    ax = ax or plt.subplots(figsize=(5, 3))[1]
    steps = np.arange(1, loss.size + 1)
    ax.plot(steps, loss, color="0.8", lw=0.5, label="loss per step")
    k = max(1, min(smooth, loss.size))
    run = np.convolve(loss, np.ones(k) / k, mode="valid")
    ax.plot(steps[k - 1 :], run, color="tab:blue", lw=1.2, label=f"running mean ({k} steps)")
    vs, vl = np.asarray(history.get("val_step", [])), np.asarray(history.get("val_loss", []))
    if vs.size:
        ax.plot(vs, vl, "o-", color="tab:orange", ms=3, lw=1, label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lo, hi = np.percentile(loss, [1, 99])
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.1 * (hi - lo))
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return ax
