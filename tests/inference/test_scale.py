"""Issue 21: data-parallel fitting over a device mesh, and cells streamed from disk."""

import json
import os
import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbax.data import from_anndata, simulate_additive_shift
from perturbax.data.stream import DiskCells, Prefetch, read_obs, stream_plan
from perturbax.inference import EnergyOptions, fit
from perturbax.models import AdditiveShiftConfig

# One tiny fit per objective (argv[2], comma-separated) on 1 and on 2 forced CPU devices, in a fresh
# process (XLA_FLAGS must be set before jax is imported). Energy: 4 groups of 8 cells per step, two
# whole groups a device.
_DEVICES_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    from perturbax.data import from_anndata, simulate_additive_shift, simulate_latent_dynamics
    from perturbax.inference import EnergyOptions, fit
    from perturbax.models import AdditiveShiftConfig, LatentDynamicsConfig

    assert jax.device_count() == 2, jax.devices()
    which = sys.argv[1]
    small = dict(latent_dim=2, decoder_hidden=(16,), encoder_hidden=(16,))
    out = {}
    if which == "additive":
        adata, _ = simulate_additive_shift(n_perturbations=3, latent_dim=2, n_genes=8, n_cells=40, seed=0)
        data = from_anndata(adata, "perturbation", "control")
        cfg = AdditiveShiftConfig(n_genes=data.n_genes, n_perturbations=data.K, **small)
        runs = [("elbo", None), ("energy", EnergyOptions(cells_per_condition=8))]
        model = "additive_shift"
    else:
        adata, _ = simulate_latent_dynamics(n_programs=2, n_perturbations=2, times=(0.5, 2.0), n_cells=20,
                                            n_genes=8, seed=0)
        data = from_anndata(adata, "perturbation", "control", time_key="time")
        cfg = LatentDynamicsConfig(n_genes=data.n_genes, n_perturbations=data.K, **small)
        runs = [("elbo", None)]
        model = "latent_dynamics"
    for objective, energy in [r for r in runs if r[0] in sys.argv[2].split(",")]:
        for n in (1, 2):
            r = fit(model, data, config=cfg, objective=objective, energy=energy, steps=8, eval_every=4,
                    batch_size=32, seed=3, progress=False, select=False, devices=n)
            out[f"{objective}/{n}"] = {"loss": r.history["loss"].tolist(), "val": r.history["val_loss"].tolist(),
                                       "devices": r.info["devices"]}
    print("RESULT" + json.dumps(out))
    """
)


def _run_on_two_devices(which: str, objectives: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT, which, objectives], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(t for t in proc.stdout.splitlines() if t.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def _same_trajectory(out: dict, objective: str) -> None:
    one, two = out[f"{objective}/1"], out[f"{objective}/2"]
    assert one["devices"] == 1 and two["devices"] == 2
    assert len(one["loss"]) == len(two["loss"]) == 8
    # the same draws, split over two devices: equal up to the order of float32 sums
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(two["val"], one["val"], rtol=2e-5, atol=1e-6)


def test_two_devices_follow_the_one_device_trajectory_energy_objective():
    """The default objective; the ELBO's check runs with -m slow (each costs a fresh process and four
    compilations)."""
    _same_trajectory(_run_on_two_devices("additive", "energy"), "energy")


@pytest.mark.slow
def test_two_devices_follow_the_one_device_trajectory_elbo():
    _same_trajectory(_run_on_two_devices("additive", "elbo"), "elbo")


@pytest.mark.slow
def test_two_devices_follow_the_one_device_trajectory_latent_dynamics():
    _same_trajectory(_run_on_two_devices("dynamics", "elbo"), "elbo")


# ---------------------------------------------------------------------------------------- on disk
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    adata, _ = simulate_additive_shift(n_perturbations=3, latent_dim=2, n_genes=8, n_cells=40, seed=0)
    adata.X = sp.csr_matrix(np.asarray(adata.X, dtype=np.float32))
    path = tmp_path_factory.mktemp("disk") / "tiny.h5ad"
    adata.write_h5ad(path)
    return adata, path


def test_disk_cells_read_the_rows_asked_for(tiny, tmp_path):
    adata, path = tiny
    cells = DiskCells.open(path)
    dense = adata.X.toarray()
    assert cells.shape == dense.shape
    rows = np.array([7, 3, 3, 400, 0, 7])  # any order, repeats
    np.testing.assert_array_equal(np.asarray(cells[rows]), dense[rows])
    view = cells[np.arange(100, 300)][np.array([5, 1])]  # views of views read nothing until asked
    np.testing.assert_array_equal(np.asarray(view), dense[[105, 101]])
    np.testing.assert_allclose(cells[rows].sum(axis=1).ravel(), dense[rows].sum(1), rtol=1e-6)
    by_name = DiskCells.open(path, adata.obs_names[[9, 2]])
    np.testing.assert_array_equal(np.asarray(by_name), dense[[9, 2]])
    adata.write_zarr(tmp_path / "tiny.zarr")  # a zarr store: the same reader
    z = from_anndata(read_obs(tmp_path / "tiny.zarr"), "perturbation", "control", on_disk=str(tmp_path / "tiny.zarr"))
    assert isinstance(z.X, DiskCells)
    np.testing.assert_array_equal(z.dense(rows), dense[rows])
    csc = adata.copy()
    csc.X = sp.csc_matrix(csc.X)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match="CSC.*csr_matrix"):
        DiskCells.open(tmp_path / "csc.h5ad")


@pytest.mark.parametrize("layout", ["anndata", "chunks of 7", "contiguous", "gzip"])
def test_memory_mapped_rows_equal_anndata_reader(tmp_path, layout):
    """The fast path of uncompressed h5ad (rows gathered from a memory map of the file) reads what
    anndata reads, whatever the chunking and chunk alignment; compressed files keep anndata's reader."""
    import h5py
    from anndata.io import write_elem

    from perturbax.data.stream import _MappedCSR, _Source

    x = sp.random(300, 11, density=0.3, format="csr", dtype=np.float32, random_state=1)
    path = tmp_path / "x.h5ad"
    ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(300)])).write_h5ad(path)
    with h5py.File(path, "a") as f:
        f.create_dataset("pad", data=np.zeros(1, np.uint8))  # so that chunks start at odd bytes
        if layout == "contiguous":  # (anndata always writes chunked arrays)
            g = f.create_group("X")
            g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": np.array(x.shape)})
            for key in ("data", "indices", "indptr"):
                g.create_dataset(key, data=getattr(x, key))
            assert g["data"].chunks is None
        else:
            kwargs = {"anndata": {}, "chunks of 7": {"chunks": (7,)}, "gzip": {"compression": "gzip"}}[layout]
            write_elem(f, "X", x, dataset_kwargs=kwargs)
    src = _Source(path)
    assert (src.mapped is not None) == (layout != "gzip")
    if layout == "chunks of 7":  # the case of chunks that do not start at a multiple of 4 bytes
        assert any(np.any(offsets % dtype.itemsize) for dtype, _, offsets in src.mapped.arrays.values())
    rows = np.array([0, 5, 6, 7, 150, 151, 299])
    ref = ad.io.sparse_dataset(h5py.File(path, "r")["X"])[rows]
    np.testing.assert_array_equal(src.read(rows).toarray(), ref.toarray())
    np.testing.assert_array_equal(np.asarray(DiskCells.open(path)[[299, 0, 0, 42]]), x[[299, 0, 0, 42]].toarray())
    if src.mapped is not None:  # more rows than one map holds
        big = np.sort(np.random.default_rng(0).choice(300, 250, replace=False))
        old, _MappedCSR.MAP_ROWS = _MappedCSR.MAP_ROWS, 16
        try:
            np.testing.assert_array_equal(src.read(big).toarray(), x[big].toarray())
        finally:
            _MappedCSR.MAP_ROWS = old


def test_prefetch_keeps_order_raises_errors_and_stops_early():
    assert [a for a, _ in Prefetch(lambda a: a * 2, range(7), depth=2)] == list(range(7))
    assert [v for _, v in Prefetch(lambda a: a * 2, range(3))] == [0, 2, 4]

    def boom(a):
        if a == 2:
            raise RuntimeError("read failed at 2")
        return a

    feed = Prefetch(boom, range(5))
    assert next(feed)[0] == 0 and next(feed)[0] == 1
    with pytest.raises(RuntimeError, match="read failed at 2"):
        next(feed)
    early = Prefetch(lambda a: a, range(10**6), depth=1)
    next(early)
    early.close()
    assert not early._thread.is_alive()


@pytest.mark.parametrize("objective", [pytest.param("elbo", marks=pytest.mark.slow), "energy"])
def test_fit_streamed_from_disk_equals_fit_in_memory(tiny, objective):
    adata, path = tiny
    mem = from_anndata(adata, "perturbation", "control")
    disk = from_anndata(ad.read_h5ad(path, backed="r"), "perturbation", "control", on_disk=True)
    assert isinstance(disk.X, DiskCells)
    cfg = AdditiveShiftConfig(n_genes=mem.n_genes, n_perturbations=mem.K, latent_dim=2, decoder_hidden=(16,),
                              encoder_hidden=(16,))
    kw = dict(config=cfg, objective=objective, steps=8, eval_every=4, batch_size=32, seed=2, progress=False,
              select=False, devices=1, energy=EnergyOptions(cells_per_condition=8) if objective == "energy" else None)
    a, b = fit("additive_shift", mem, **kw), fit("additive_shift", disk, **kw)
    assert b.info["streamed"] and not a.info["streamed"]
    # the same cells drawn per step (per condition for the energy objective), read from disk
    np.testing.assert_allclose(b.history["loss"], a.history["loss"], rtol=1e-6)
    np.testing.assert_allclose(b.history["val_loss"], a.history["val_loss"], rtol=1e-6)
    np.testing.assert_allclose(b.basal["z"], a.basal["z"], rtol=1e-5, atol=1e-6)


def test_stream_plan_chooses_from_size_and_free_memory():
    gb = 2**30
    assert stream_plan(10**6, 2000, available=20 * gb)[0]  # 8 GB dense x 2.5 > half of 20 GB
    small, line = stream_plan(10**5, 2000, available=20 * gb)
    assert not small and "in memory" in line and "--stream" in line
    assert not stream_plan(10**6, 2000, stream=False, available=gb)[0]
    assert stream_plan(10, 2, stream=True)[1].endswith("streamed from disk (as asked).")


# ------------------------------------------------------------------------------------------- CLI
def _cli_fit(path, out, *extra):
    from click.testing import CliRunner

    from perturbax.cli import main

    args = ["fit", str(path), "-k", "perturbation", "-c", "control", "--no-select", "--no-progress", "--steps", "2",
            "-d", "2", "-o", str(out), *extra]
    return CliRunner().invoke(main, args)


def test_cli_fit_refuses_more_devices_than_there_are(tiny, tmp_path):
    import jax

    too_many = jax.device_count() + 1
    r = _cli_fit(tiny[1], tmp_path / "a", "--devices", str(too_many))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"--devices {too_many} but {jax.device_count()}" in r.output


@pytest.mark.slow
def test_cli_fit_says_it_streamed(tiny, tmp_path):
    r = _cli_fit(tiny[1], tmp_path / "b", "--stream")
    assert r.exit_code == 0, r.output
    assert "streamed from disk (as asked). Devices: 1." in r.output
