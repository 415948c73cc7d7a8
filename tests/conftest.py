"""Test-suite settings: CPU only, and a persistent XLA compilation cache so the many small fits
of the suite reuse compiled programs instead of compiling each again."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    cache = getattr(config, "cache", None)
    cache = cache.mkdir("jax-compilation-cache") if cache is not None else None
    if cache is not None:
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(autouse=True)
def _no_display(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(session, config, items):
    """Run the notebooks first: they are the longest file (~5 min), and with the suite split over
    pytest-xdist workers file by file, a long file that starts last is the run's tail."""
    items.sort(key=lambda item: 0 if item.nodeid.startswith("tests/test_notebooks.py") else 1)


def context_adata(seed: int = 0):
    """Tiny log-scale data in three contexts (obs "line": x, y, z) x {control, A, B}: each condition
    is the context's mean + the perturbation's effect + noise; the control groups have 30/35/45 cells
    (so a prediction's default size tells which context's control cells it started from)."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    G = 8
    base = {c: rng.normal(0, 1, G) for c in "xyz"}
    effect = {"control": np.zeros(G), "A": rng.normal(0, 1.5, G), "B": rng.normal(0, 1.5, G)}
    n_control = {"x": 30, "y": 35, "z": 45}
    X, labels, lines = [], [], []
    for c in "xyz":
        for p in ("control", "A", "B"):
            n = n_control[c] if p == "control" else 25
            X.append(base[c] + effect[p] + 0.3 * rng.normal(size=(n, G)))
            labels += [p] * n
            lines += [c] * n
    obs = pd.DataFrame({"perturbation": labels, "line": lines}, index=[f"cell{i}" for i in range(len(labels))])
    return ad.AnnData(np.vstack(X).astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(G)]))


@pytest.fixture
def contexts_adata():
    """:func:`context_adata` (seed 0)."""
    return context_adata()
