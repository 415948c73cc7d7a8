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
