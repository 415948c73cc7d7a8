"""Scaling of ``fit`` and ``predict`` (issue 21): time per step vs devices, a fit streamed from disk,
and a prediction written in chunks.

Three parts (``--parts``), every configuration in a fresh subprocess (``--one``: cold compile caches, its own
``XLA_FLAGS`` and its own peak RSS):

- devices: the additive shift model fitted from memory on ``--device-cells`` cells x 2000 genes
  (simulated as below),
  ELBO (batch 256) and energy (4 conditions x 64 cells per step), with ``devices=1`` and
  ``devices=2`` (on CPU: ``XLA_FLAGS=--xla_force_host_platform_device_count=2``; on a machine with
  accelerators the children see them and ``--devices`` lists the counts to try). Records ms/step
  and, where the backend reports it, peak device memory (``memory_stats()["peak_bytes_in_use"]``).
- streamed: a simulated sparse dataset of ``--stream-cells`` cells x 2000 genes (22 conditions:
  control, 6 singles, 15 doubles; about 5% non-zeros, log1p of Poisson counts; written to an
  ``.h5ad`` in chunks, so the writer never holds the matrix) fitted streamed from disk
  (``from_anndata(backed, on_disk=True)``) against the same model fitted from memory on the first
  ``--memory-cells`` cells of that file. Records ms/step and the child's peak RSS
  (``ru_maxrss``: the whole process, Python and XLA included).
- predict: a small model (additive shift, ``select=False``: the model's own cells; ``--predict-fit-cells``
  cells of the simulated data, 200 ELBO steps) saved, then ``predict(fit, "P0+P1", n_cells=N,
  num_samples=100, out=...)`` in a fresh child per row: written in chunks (``stream_output=True``)
  for ``--predict-cells`` cells and for a tenth of them, and built in memory (``stream_output=False``)
  for the tenth (the full size in memory would need about twice its cells' size). Records the wall
  time, the child's peak RSS, its RSS before predicting (fit loaded, JAX imported) and the file size.

Time per step: ``fit`` runs ``eval_every`` steps per jitted scan and updates its progress bar
after each; this script replaces the bar class of ``perturbax.inference.fitting`` in the child
by a recorder of the update times (``fit`` itself is unchanged). Runs use ``patience=None`` (no
held-out evaluations between chunks), so a chunk's time is its steps (and, streamed, any wait
for the reader). ms/step = median over the chunks after the first (which holds the compile) /
chunk length.

    .venv/bin/python benchmarks/scale.py                        # issue size: 10^6 streamed vs 10^5 in memory
    .venv/bin/python benchmarks/scale.py --stream-cells 200000  # smaller streamed run (labelled in the doc)
    .venv/bin/python benchmarks/scale.py --json r.json --no-doc # print only, keep the results
    .venv/bin/python benchmarks/scale.py --parts predict --no-doc  # the predict part alone
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
from _docs import provenance, write_section  # noqa: E402

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GENES = 2000
N_PERT = 6
SECTION = "scale"


# ------------------------------------------------------------------------------------------ data
def _conditions() -> list[str]:
    singles = [f"P{k}" for k in range(N_PERT)]
    doubles = [f"P{a}+P{b}" for a in range(N_PERT) for b in range(a + 1, N_PERT)]
    return ["control", *singles, *doubles]


def write_dataset(path: Path, n_cells: int, seed: int = 0, chunk: int = 50_000, nnz_per_cell: int = 100) -> dict:
    """A sparse (CSR) h5ad of ``n_cells`` x 2000 genes written chunk by chunk: each condition has
    its own gene frequencies (a shifted Dirichlet profile), each cell ``nnz_per_cell`` draws of
    genes from it, values ``log1p`` of Poisson counts. Conditions in random order over the cells."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    rng = np.random.default_rng(seed)
    conds = _conditions()
    base = rng.dirichlet(np.full(GENES, 0.3))
    profiles = np.stack([0.5 * base + 0.5 * rng.dirichlet(np.full(GENES, 0.3)) for _ in conds])
    labels = rng.integers(0, len(conds), n_cells)
    obs = pd.DataFrame({"perturbation": pd.Categorical(np.asarray(conds)[labels], categories=conds)},
                       index=[f"c{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(GENES)])
    t0 = time.perf_counter()
    ad.AnnData(obs=obs, var=var).write_h5ad(path)
    with h5py.File(path, "a") as f:
        for a in range(0, n_cells, chunk):
            lab = labels[a : a + chunk]
            rows = []
            for e in range(len(conds)):
                idx = np.flatnonzero(lab == e)
                if idx.size:
                    genes = rng.choice(GENES, size=(idx.size, nnz_per_cell), p=profiles[e])
                    rows.append((idx, genes))
            n = lab.size
            r = np.concatenate([np.repeat(i, nnz_per_cell) for i, _ in rows])
            c = np.concatenate([g.reshape(-1) for _, g in rows])
            m = sp.csr_matrix((np.ones(r.size, np.float32), (r, c)), shape=(n, GENES))
            m.sum_duplicates()
            m.data = np.log1p(m.data * rng.poisson(2.0, m.data.size).clip(1)).astype(np.float32)
            if a == 0:
                write_elem(f, "X", m)
            else:
                sparse_dataset(f["X"]).append(m)
    return {"cells": n_cells, "genes": GENES, "write_seconds": time.perf_counter() - t0,
            "file_bytes": path.stat().st_size}


# ------------------------------------------------------------------------------------------ child
class _Recorder:
    """Stands in for tqdm in ``perturbax.inference.fitting``: timestamps of every update."""

    marks: list = []

    def __init__(self, *a, total=None, **k):
        _Recorder.marks = [(time.perf_counter(), 0)]

    def update(self, n):
        _Recorder.marks.append((time.perf_counter(), int(n)))

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_predict(spec: dict) -> dict:
    """``kind="fit"``: the small model of the predict part, saved to ``spec["model"]``;
    ``kind="predict"``: one prediction of it written to ``spec["out"]`` (in this process)."""
    import anndata as ad

    from perturbax.data import from_anndata
    from perturbax.inference import FitResult, fit, predict
    from perturbax.inference.prediction import output_chunk_cells
    from perturbax.models import AdditiveShiftConfig

    t0 = time.perf_counter()
    if spec["kind"] == "fit":
        data = from_anndata(ad.read_h5ad(spec["path"]), "perturbation", "control")
        cfg = AdditiveShiftConfig(n_genes=data.n_genes, n_perturbations=data.K, latent_dim=10)
        res = fit("additive_shift", data, config=cfg, objective="elbo", steps=200, eval_every=50, batch_size=256,
                  patience=None, progress=False, select=False, seed=0)
        res.save(spec["model"])
        return {**spec, "fit_s": time.perf_counter() - t0, "n_control": int(np.shape(res.basal["library"])[0])}
    res = FitResult.load(spec["model"])
    before = _rss_gb()
    t1 = time.perf_counter()
    pred = predict(res, ["P0+P1"], n_cells=spec["cells"], num_samples=spec["num_samples"], out=spec["out"],
                   stream_output=spec["stream"], seed=0)
    seconds = time.perf_counter() - t1
    shape = pred.shape
    pred.file.close()
    size = Path(spec["out"]).stat().st_size
    Path(spec["out"]).unlink()
    return {**spec, "shape": list(shape), "predict_s": seconds, "rss_before_gb": before, "peak_rss_gb": _rss_gb(),
            "file_bytes": size, "chunk_cells": output_chunk_cells(shape[1]) if spec["stream"] else None}


def run_one(spec: dict) -> dict:
    """One fit as described by ``spec`` (in this process); its timings and memory."""
    if "kind" in spec:
        return run_predict(spec)
    import anndata as ad
    import jax

    import perturbax.inference.fitting as fitting
    from perturbax.data import from_anndata
    from perturbax.inference import EnergyOptions, fit
    from perturbax.models import AdditiveShiftConfig

    fitting.tqdm = _Recorder
    t0 = time.perf_counter()
    if spec["source"] == "disk":
        data = from_anndata(ad.read_h5ad(spec["path"], backed="r"), "perturbation", "control", on_disk=True)
    else:  # the first ``cells`` cells of the file, in memory
        adata = ad.read_h5ad(spec["path"], backed="r")[: spec["cells"]].to_memory()
        data = from_anndata(adata, "perturbation", "control")
        del adata
    load = time.perf_counter() - t0
    cfg = AdditiveShiftConfig(n_genes=data.n_genes, n_perturbations=data.K, latent_dim=10)
    energy = EnergyOptions(cells_per_condition=64, conditions_per_step=4) if spec["objective"] == "energy" else None
    t1 = time.perf_counter()
    res = fit("additive_shift", data, config=cfg, objective=spec["objective"], energy=energy, steps=spec["steps"],
              eval_every=spec["eval_every"], batch_size=256, patience=None, progress=True, select=False,
              devices=spec["devices"], seed=0)
    total = time.perf_counter() - t1
    marks = _Recorder.marks
    chunks = [(t - s, n) for (s, _), (t, n) in zip(marks[:-1], marks[1:])]
    steady = [dt / n for dt, n in chunks[1:] if n == spec["eval_every"]]
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    return {
        **spec,
        "n_cells": data.n_cells,
        "platform": dev.platform,
        "devices_used": res.info["devices"],
        "streamed": res.info["streamed"],
        "ms_per_step": 1e3 * float(np.median(steady)) if steady else float("nan"),
        "first_chunk_s": chunks[0][0] if chunks else float("nan"),
        "load_s": load,
        "fit_s": total,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_device_gb": (stats or {}).get("peak_bytes_in_use", float("nan")) / 2**30 if stats else None,
        "final_loss": float(res.history["loss"][-1]),
    }


def child(spec: dict) -> dict:
    env = dict(os.environ)
    if spec.get("force_cpu_devices"):
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={spec['force_cpu_devices']}"
        env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"child failed: {spec}\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(out), flush=True)
    return out


# ------------------------------------------------------------------------------------------- doc
def _fmt(v, nd=1):
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}f}"


def render(res: dict) -> str:
    host = res["host"]
    lines = [
        "## Scaling: devices, cells streamed from disk, predictions written in chunks (issue 21)",
        "",
        f"Command: `{res['command']}`. Machine: {host['cpus']} CPU cores ({host['machine']}, shared with other "
        f"processes: load average {host['load']:.1f} at the start), {host['mem_gb']:.0f} GB RAM; "
        f"platform {res['devices'][0]['platform'] if res['devices'] else 'n/a'}. Additive shift model "
        "(latent_dim 10, default networks), 2000 genes, `patience=None`; ms/step is the median of the chunks "
        "after the compile (benchmarks/scale.py docstring).",
    ]
    if res["devices"]:
        lines += [
            "",
            "**Time per step vs devices** (in memory, "
            f"{res['devices'][0]['n_cells']} cells; "
            "on CPU the devices are forced host devices sharing the same cores, so this shows the "
            "partitioned program runs, not a speed-up):",
            "",
            "| objective | devices | ms/step | first chunk (s, with compile) | peak RSS (GB) | peak device memory (GB) |",
            "|---|---|---|---|---|---|",
        ]
    for r in res["devices"]:
        lines.append(f"| {r['objective']} | {r['devices_used']} | {_fmt(r['ms_per_step'])} | {_fmt(r['first_chunk_s'])} "
                     f"| {_fmt(r['peak_rss_gb'], 2)} | {_fmt(r['peak_device_gb'], 2)} |")
    s = res["stream"]
    if s:
        ds = s["dataset"]
        full = ds["cells"] >= 10**6
        lines += [
            "",
            f"**Streamed from disk** ({ds['cells']} cells x {ds['genes']} genes, sparse h5ad of "
            f"{ds['file_bytes'] / 2**30:.2f} GB written in {ds['write_seconds']:.0f} s)"
            + ("" if full else f" -- a smaller size than the issue's 10^6 cells (labelled; the full size: "
               f"`benchmarks/scale.py --stream-cells 1000000`)") + ":",
            "",
            "| run | cells | objective | ms/step | ratio to in memory | peak RSS (GB) | load (s) | whole fit (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for mem, disk in zip(s["memory"], s["disk"]):
            for r, kind in ((mem, "in memory"), (disk, "streamed")):
                ratio = r["ms_per_step"] / mem["ms_per_step"]
                lines.append(f"| {kind} | {r['n_cells']} | {r['objective']} | {_fmt(r['ms_per_step'])} | {ratio:.2f} "
                             f"| {_fmt(r['peak_rss_gb'], 2)} | {_fmt(r['load_s'])} | {_fmt(r['fit_s'])} |")
    pr = res.get("predict")
    if pr:
        lines += [
            "",
            f"**Predict written in chunks** (`predict(fit, \"P0+P1\", n_cells=N, num_samples={pr['num_samples']}, "
            f"out=...)` of a model fitted on {pr['fit']['cells']} cells x 2000 genes with `select=False`, 200 ELBO "
            f"steps; {pr['fit']['n_control']} control cells as the source; dense float32 cells written to an h5ad):",
            "",
            "| output | cells x genes | chunk target (cells) | peak RSS (GB) | RSS before predict (GB) | predict (s) | file (GB) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in pr["rows"]:
            lines.append(f"| {'in chunks' if r['stream'] else 'in memory'} | {r['shape'][0]} x {r['shape'][1]} "
                         f"| {r['chunk_cells'] or 'n/a'} | {_fmt(r['peak_rss_gb'], 2)} | {_fmt(r['rss_before_gb'], 2)} "
                         f"| {_fmt(r['predict_s'])} | {r['file_bytes'] / 2**30:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--device-cells", type=int, default=20_000, help="cells of the devices table")
    ap.add_argument("--devices", default="1,2", help="device counts to try (CPU: forced host devices)")
    ap.add_argument("--stream-cells", type=int, default=1_000_000, help="cells of the streamed dataset (0: skip)")
    ap.add_argument("--memory-cells", type=int, default=100_000, help="cells of the in-memory reference fit")
    ap.add_argument("--parts", default="devices,stream,predict", help="parts to run (comma-separated)")
    ap.add_argument("--predict-cells", type=int, default=1_000_000, help="cells of the largest prediction")
    ap.add_argument("--predict-fit-cells", type=int, default=5_000, help="cells the predicted-from model is fitted on")
    ap.add_argument("--objectives", default="energy,elbo")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--workdir", default=None, help="folder for the simulated h5ad (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the results as JSON")
    ap.add_argument("--no-doc", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0

    import jax

    gpu = jax.default_backend() != "cpu"
    objectives = args.objectives.split(",")
    res = {
        "command": "benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "load": os.getloadavg()[0],
                 "mem_gb": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30},
        "provenance": provenance(),
        "devices": [],
        "stream": None,
    }
    parts = set(args.parts.split(","))
    unknown = parts - {"devices", "stream", "predict"}
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose from devices, stream, predict.")
    common = {"steps": args.steps, "eval_every": args.eval_every}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if "devices" not in parts:
            args.devices = ""
        path = Path(tmp) / "device_cells.h5ad"
        if args.devices:
            write_dataset(path, args.device_cells, seed=1)
        for objective in objectives:
            for n in (int(v) for v in args.devices.split(",") if v):
                spec = {**common, "source": "file", "path": str(path), "cells": args.device_cells,
                        "objective": objective, "devices": n}
                if not gpu:
                    spec["force_cpu_devices"] = max(n, 1)
                res["devices"].append(child(spec))
    if args.stream_cells and "stream" in parts:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            path = Path(tmp) / "cells.h5ad"
            ds = write_dataset(path, args.stream_cells)
            print(json.dumps(ds), flush=True)
            stream = {"dataset": ds, "memory": [], "disk": []}
            for objective in objectives:
                base = {**common, "path": str(path), "objective": objective, "devices": 1}
                stream["memory"].append(child({**base, "source": "file", "cells": min(args.memory_cells, args.stream_cells)}))
                stream["disk"].append(child({**base, "source": "disk", "cells": args.stream_cells}))
            res["stream"] = stream
    if args.predict_cells and "predict" in parts:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            path = Path(tmp) / "fit_cells.h5ad"
            write_dataset(path, args.predict_fit_cells, seed=2)
            model = str(Path(tmp) / "model")
            pr = {"fit": {**child({"kind": "fit", "path": str(path), "model": model}), "cells": args.predict_fit_cells},
                  "num_samples": 100, "rows": []}
            small = max(1, args.predict_cells // 10)
            for cells, streamed in ((small, True), (args.predict_cells, True), (small, False)):
                pr["rows"].append(child({"kind": "predict", "model": model, "cells": cells, "stream": streamed,
                                         "num_samples": 100, "out": str(Path(tmp) / "pred.h5ad")}))
            res["predict"] = pr
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    text = render(res)
    print(text)
    if not args.no_doc:
        write_section(SECTION, text, sources=[__file__], produced=res["provenance"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
