"""Speed of the additive-shift fits: ELBO and energy objectives (issue 3, item 5c).

Measures optimiser steps per second, cells per second, compile and set-up time, the wall time of
a whole ``fit`` and the peak memory (process peak RSS), for

- grid 1, scaling in cells per step (10^4 cells x 500 genes): ELBO at batch sizes 64 ... 1024;
  energy at ``cells_per_condition`` m = 64 and ``conditions_per_step`` E = 1 ... 16 (64 ... 1024
  cells per step); energy with m = 32, 64, 128 at a fixed 512 cells per step;
- grid 2, data size: 10^3, 10^4, 10^5 cells x 500 and 2000 genes at 256 cells per step (ELBO
  batch 256; energy E = 4 x m = 64), including a full fit of 10^5 cells x 2000 genes.

Every configuration runs in a fresh subprocess (``--one``), so compile caches are cold and the
peak RSS belongs to that configuration alone. Data come from ``simulate_additive_shift``
(6 elementary perturbations, latent_dim 10, control + 6 singles + all 15 doubles = 22 training
conditions, n_cells per condition chosen to reach the target total), Gaussian likelihood.

Timing. ``fit`` runs a jitted ``lax.scan`` of ``eval_every`` steps per chunk and blocks on each
chunk's losses before it updates its progress bar. This script replaces the progress-bar class
in ``perturbax.inference.fitting`` (a module attribute, in the child process only; ``fit`` itself
is unchanged) by a recorder that timestamps every ``update``: the first chunk holds the XLA
compile of the step, later chunks are steady state. Time per step is the median steady chunk
time / chunk length; compile = first chunk - median chunk; set-up = time from calling ``fit``
until its loop starts (data to device, guide construction, jitted ``svi.init``). If the recorder
sees fewer than 3 chunks (``fit`` changed), the script falls back to two fits of different
lengths: time per step = (t2 - t1) / (s2 - s1) on ``info["fit_seconds"]``. Configurations marked
``check`` run that second method too, as a cross-check (it is confounded by run-to-run
variation of the compile time, which is why it is not the primary method).

Also recorded per chunk: process CPU time (``time.process_time``, all threads), the measure
least disturbed by other processes on a shared machine; the scaling statements use it.

Prints the tables, replaces the section between ``<!-- speed-additive:start -->`` and
``<!-- speed-additive:end -->`` in docs/benchmarks.md and writes docs/speed_additive.png.

    .venv/bin/python benchmarks/speed_additive.py            # full run (22 configurations)
    .venv/bin/python benchmarks/speed_additive.py --quick    # smoke run (4 configurations), no doc unless --doc
    .venv/bin/python benchmarks/speed_additive.py --json r.json ...; ... --render r.json  # re-write doc/plot

The full run used 11.5 min of CPU time; on the shared 2-core machine at load ~9 it took 29 min of
wall time. The quick run used 1.5 min of CPU (4.4 min wall at load ~9).
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
from _docs import provenance, write_section  # noqa: E402

import argparse
import datetime as dt
import itertools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
N_PERT = 6  # doubles="all": control + 6 singles + 15 doubles = 22 training conditions
N_COND = 1 + N_PERT + N_PERT * (N_PERT - 1) // 2
LATENT_DIM = 10


# ------------------------------------------------------------------------------------------------
# Child: one configuration
# ------------------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _ChunkRecorder:
    """Stands in for tqdm inside ``fit``: records when each chunk of steps finished."""

    instances: list[_ChunkRecorder] = []

    def __init__(self, *args, total=None, **kwargs):
        self.t_start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.total = total
        self.updates: list[tuple[float, int, float]] = []  # (wall, steps in the chunk, process CPU)
        _ChunkRecorder.instances.append(self)

    def update(self, n=1):
        self.updates.append((time.perf_counter(), int(n), time.process_time()))

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def build_data(n_cells: int, n_genes: int, seed: int = 0):
    from perturbax.data.core import from_anndata
    from perturbax.data.simulate import simulate_additive_shift

    per = math.ceil(n_cells / N_COND)
    adata, _ = simulate_additive_shift(
        n_perturbations=N_PERT, latent_dim=LATENT_DIM, n_genes=n_genes, n_cells=per,
        doubles="all", doses=None, n_out_of_span=0, seed=seed,
    )
    data = from_anndata(adata, "perturbation", "control")
    del adata
    if data.n_conditions != N_COND:
        raise RuntimeError(f"expected {N_COND} conditions, the simulator gave {data.n_conditions}")
    return data


def run_one(cfg: dict) -> dict:
    out = {"cfg": cfg, "load1_start": os.getloadavg()[0]}
    t_proc = time.perf_counter()
    import jax

    from perturbax.inference import fitting
    from perturbax.inference.energy import EnergyOptions

    t = time.perf_counter()
    data = build_data(cfg["n_cells"], cfg["n_genes"], cfg.get("seed", 0))
    out["data_seconds"] = time.perf_counter() - t
    out["n_cells_actual"] = int(data.n_cells)
    out["peak_rss_data_mb"] = _peak_rss_mb()
    out["rss_before_fit_mb"] = _rss_mb()

    steps, chunk = int(cfg["steps"]), int(cfg["chunk"])
    kw = dict(objective=cfg["objective"], seed=0, patience=None, progress=False, eval_every=chunk)
    if cfg["objective"] == "energy":
        E, m = int(cfg["conditions_per_step"]), int(cfg["cells_per_condition"])
        kw["energy"] = EnergyOptions(cells_per_condition=m, conditions_per_step=E)
        kw["batch_size"] = E * m
    else:
        kw["batch_size"] = int(cfg["batch_size"])

    # The child process only; fit's code is untouched: the progress bar becomes a chunk recorder and
    # two set-up helpers get timers (to split the set-up time).
    fitting.tqdm = _ChunkRecorder
    _ChunkRecorder.instances.clear()
    setup_parts = {"device_data": 0.0, "make_guide": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                setup_parts[name] += time.perf_counter() - t

        return wrapper

    fitting._device_data = timed("device_data", fitting._device_data)
    fitting.make_guide = timed("make_guide", fitting.make_guide)
    t0 = time.perf_counter()
    res = fitting.fit("additive_shift", data, steps=steps, **kw)
    jax.block_until_ready(res.params)
    t_end = time.perf_counter()
    info = res.info
    out.update(
        wall_seconds=t_end - t0,
        fit_seconds=float(info["fit_seconds"]),
        steps_run=int(info["steps_run"]),
        stop_reason=str(info["stop_reason"]),
        cells_per_step=int(info["cells_per_step"]),
        final_loss=float(np.mean(res.history["loss"][-chunk:])) if len(res.history["loss"]) else float("nan"),
        jax_backend=jax.default_backend(),
        n_params=int(sum(np.size(x) for x in jax.tree_util.tree_leaves(res.params))),
    )
    out["setup_device_data_seconds"] = setup_parts["device_data"]
    out["setup_make_guide_seconds"] = setup_parts["make_guide"]
    rec = _ChunkRecorder.instances[-1] if _ChunkRecorder.instances else None
    if rec is not None and len(rec.updates) >= 3:
        times = [rec.t_start] + [u[0] for u in rec.updates]
        cpus = [rec.cpu_start] + [u[2] for u in rec.updates]
        sizes = [u[1] for u in rec.updates]
        durs, cdurs = np.diff(times), np.diff(cpus)
        steady = [d / n for d, n in zip(durs[1:], sizes[1:], strict=True) if n == chunk]
        steady_cpu = [d / n for d, n in zip(cdurs[1:], sizes[1:], strict=True) if n == chunk]
        tps = float(np.median(steady))
        out.update(
            method="chunks",
            time_per_step=tps,
            time_per_step_best=float(np.min(steady)),
            cpu_per_step=float(np.median(steady_cpu)),
            n_steady_chunks=len(steady),
            step_spread=float((np.percentile(steady, 90) - np.percentile(steady, 10)) / tps),
            setup_seconds=rec.t_start - t0,
            compile_seconds=float(durs[0] - sizes[0] * tps),
            post_seconds=t_end - times[-1],
        )
        need_two_call = bool(cfg.get("check"))
    else:
        out["method"] = "two_call"
        need_two_call = True
    if need_two_call:
        # Second method: a fit of one chunk; (t2 - t1) / (s2 - s1) on info["fit_seconds"].
        n_rec = len(_ChunkRecorder.instances)
        short = fitting.fit("additive_shift", data, steps=chunk, **kw)
        tps2 = (out["fit_seconds"] - float(short.info["fit_seconds"])) / (steps - chunk)
        out["time_per_step_two_call"] = tps2
        out["fixed_seconds_two_call"] = float(short.info["fit_seconds"]) - chunk * tps2
        out["short_fit_seconds"] = float(short.info["fit_seconds"])
        if "compile_seconds" in out and len(_ChunkRecorder.instances) > n_rec:
            r2 = _ChunkRecorder.instances[-1]
            if r2.updates:
                out["short_compile_seconds"] = r2.updates[0][0] - r2.t_start - chunk * out["time_per_step"]
        if out["method"] == "two_call":
            out["time_per_step"] = tps2
            out["compile_seconds"] = out["fixed_seconds_two_call"]
            out["setup_seconds"] = out["wall_seconds"] - out["fit_seconds"]
            out["step_spread"] = float("nan")
            out["time_per_step_best"] = out["cpu_per_step"] = float("nan")
            out["post_seconds"] = float("nan")
    out["peak_rss_mb"] = _peak_rss_mb()
    out["process_seconds"] = time.perf_counter() - t_proc
    out["load1_end"] = os.getloadavg()[0]
    return out


# ------------------------------------------------------------------------------------------------
# Parent: grids, tables, doc, plot
# ------------------------------------------------------------------------------------------------
def configs(quick: bool) -> list[dict]:
    cs: list[dict] = []

    def add(grid, objective, n_cells, n_genes, steps, chunk, **kw):
        cs.append(dict(grid=grid, objective=objective, n_cells=n_cells, n_genes=n_genes, steps=steps, chunk=chunk, **kw))

    if quick:
        steps, chunk = 40, 10
        for b in (64, 512):
            add("batch", "elbo", 2_000, 500, steps, chunk, batch_size=b)
        for e in (1, 8):
            add("batch", "energy", 2_000, 500, steps, chunk, conditions_per_step=e, cells_per_condition=64)
        return cs

    steps, chunk = 120, 10
    # Grid 1: cells per step (10^4 cells x 500 genes).
    for b in (64, 128, 256, 512, 1024):
        add("batch", "elbo", 10_000, 500, steps, chunk, batch_size=b)
    for e in (1, 2, 4, 8, 16):
        add("batch", "energy", 10_000, 500, steps, chunk, conditions_per_step=e, cells_per_condition=64, check=e == 4)
    for e, m in ((16, 32), (4, 128)):  # with E=8 x m=64 above: m = 32, 64, 128 at 512 cells per step
        add("m", "energy", 10_000, 500, steps, chunk, conditions_per_step=e, cells_per_condition=m)
    # Grid 2: data size at 256 cells per step (10^4 x 500 is shared with grid 1).
    for g in (500, 2000):
        for n in (1_000, 10_000, 100_000):
            if (n, g) == (10_000, 500):
                continue
            s = 400 if (n, g) == (100_000, 2000) else steps
            add("size", "elbo", n, g, s, chunk, batch_size=256)
            add("size", "energy", n, g, s, chunk, conditions_per_step=4, cells_per_condition=64)
    return cs


def run_child(cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(cfg)]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"cfg": cfg, "error": f"timed out after {timeout:.0f} s", "process_seconds": time.perf_counter() - t}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr or "").strip().splitlines()[-5:]
    why = f"exit code {p.returncode}" + (" (killed by signal %d)" % -p.returncode if p.returncode < 0 else "")
    return {"cfg": cfg, "error": why + ": " + " | ".join(tail), "process_seconds": time.perf_counter() - t}


def _layout(r: dict) -> str:
    c = r["cfg"]
    if c["objective"] == "energy":
        return f"E={c['conditions_per_step']} x m={c['cells_per_condition']}"
    return f"B={c['batch_size']}"


def _cells_per_step(r: dict) -> int:
    c = r["cfg"]
    if "cells_per_step" in r:
        return int(r["cells_per_step"])
    return c["conditions_per_step"] * c["cells_per_condition"] if c["objective"] == "energy" else c["batch_size"]


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "nan"
    return format(v, spec)


COLUMNS = [
    ("objective", lambda r: r["cfg"]["objective"]),
    ("cells", lambda r: f"{r.get('n_cells_actual', r['cfg']['n_cells']):,}"),
    ("genes", lambda r: str(r["cfg"]["n_genes"])),
    ("layout", _layout),
    ("cells/step", lambda r: str(_cells_per_step(r))),
    ("ms/step", lambda r: _fmt(1e3 * r["time_per_step"], ".1f")),
    ("best ms/step", lambda r: _fmt(1e3 * r["time_per_step_best"], ".1f")),
    ("CPU ms/step", lambda r: _fmt(1e3 * r["cpu_per_step"], ".1f")),
    ("steps/s", lambda r: _fmt(1.0 / r["time_per_step"], ".1f")),
    ("cells/s", lambda r: _fmt(_cells_per_step(r) / r["time_per_step"], ",.0f")),
    ("compile s", lambda r: _fmt(r["compile_seconds"], ".1f")),
    ("setup s", lambda r: _fmt(r["setup_seconds"], ".1f")),
    ("steps", lambda r: str(r["steps_run"])),
    ("fit wall s", lambda r: _fmt(r["wall_seconds"], ".1f")),
    ("peak RSS MB", lambda r: _fmt(r["peak_rss_mb"], ",.0f")),
    ("load1", lambda r: _fmt(r["load1_start"], ".1f")),
]


def _rows(results):
    rows = []
    for r in results:
        if "error" in r:
            c = r["cfg"]
            rows.append([c["objective"], f"{c['n_cells']:,}", str(c["n_genes"]), _layout(r), str(_cells_per_step(r)),
                         "FAILED: " + r["error"]] + [""] * (len(COLUMNS) - 6))
        else:
            rows.append([f(r) for _, f in COLUMNS])
    return rows


def text_table(results) -> str:
    head = [h for h, _ in COLUMNS]
    rows = _rows(results)
    w = [max(len(head[i]), *(len(row[i]) for row in rows)) for i in range(len(head))]
    lines = ["  ".join(h.rjust(w[i]) for i, h in enumerate(head))]
    lines += ["  ".join(v.rjust(w[i]) for i, v in enumerate(row)) for row in rows]
    return "\n".join(lines)


def markdown_table(results) -> str:
    head = [h for h, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 4 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(results)]
    return "\n".join(lines)


def loglog_slope(results, key: str = "time_per_step") -> tuple[float, float] | None:
    ok = [r for r in results if "error" not in r and math.isfinite(r.get(key, float("nan")))]
    if len(ok) < 2:
        return None
    x = np.log([_cells_per_step(r) for r in ok])
    y = np.log([r[key] for r in ok])
    slope, icpt = np.polyfit(x, y, 1)
    return float(slope), float(icpt)


def machine_facts() -> dict:
    facts = {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                facts["mem_gb"] = int(line.split()[1]) / 2**20
                break
    except OSError:
        pass
    from importlib.metadata import version

    for pkg in ("jax", "jaxlib", "numpyro", "optax"):
        try:
            facts[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            facts[pkg] = "?"
    return facts


def plot(results, path: Path) -> None:
    """Left: time per step vs cells per step (log-log); right: time per step vs data size.

    Filled markers / solid lines: process CPU time per step (the work; robust to other load);
    hollow markers / faint dashed lines: median wall time per step.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11.5, 4.6))
    series = [
        ("ELBO, batch B", "o", "C0", lambda r: r["cfg"]["grid"] == "batch" and r["cfg"]["objective"] == "elbo"),
        ("energy, m = 64, E = 1..16", "s", "C1",
         lambda r: r["cfg"]["grid"] == "batch" and r["cfg"]["objective"] == "energy"),
        ("energy, 512 cells/step, other m", "D", "C3", lambda r: r["cfg"]["grid"] == "m"),
    ]
    for label, mk, color, sel in series:
        rs = sorted((r for r in ok if sel(r)), key=_cells_per_step)
        if not rs:
            continue
        x = [_cells_per_step(r) for r in rs]
        ls = "" if label.startswith("energy, 512") else "-"
        ax.plot(x, [1e3 * r["cpu_per_step"] for r in rs], mk + ls, color=color, ms=5, label=f"{label}: CPU")
        ax.plot(x, [1e3 * r["time_per_step"] for r in rs], mk + ("--" if ls else ""), color=color, mfc="none",
                alpha=0.45, ms=5, lw=0.9, label=f"{label}: wall")
        if not ls:
            for r, xi in zip(rs, x, strict=True):
                ax.annotate(f"m={r['cfg']['cells_per_condition']}", (xi, 1e3 * r["cpu_per_step"]),
                            textcoords="offset points", xytext=(6, -3), fontsize=7, color=color)
    en = sorted((r for r in ok if series[1][3](r)), key=_cells_per_step)
    if len(en) >= 2:
        x0, y0 = _cells_per_step(en[0]), 1e3 * en[0]["cpu_per_step"]
        xs = np.array([x0, _cells_per_step(en[-1])], dtype=float)
        ax.plot(xs, y0 * xs / x0, "-", color="grey", lw=0.8, alpha=0.7, label="slope 1 (linear)")
        ax.plot(xs, y0 * (xs / x0) ** 2, ":", color="grey", lw=0.8, alpha=0.7, label="slope 2 (quadratic)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cells per step")
    ax.set_ylabel("ms per step (steady state, median)")
    g1 = [r for r in ok if r["cfg"]["grid"] == "batch"]
    if g1:
        ax.set_title(f"cells per step ({g1[0]['n_cells_actual']:,} cells x {g1[0]['cfg']['n_genes']} genes)")
    ax.legend(fontsize=6.5, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)

    for obj, mk, color in (("elbo", "o", "C0"), ("energy", "s", "C1")):
        for g, ls in ((500, "-"), (2000, "--")):
            rs = sorted((r for r in ok if r["cfg"]["objective"] == obj and r["cfg"]["n_genes"] == g
                         and _cells_per_step(r) == 256 and (obj == "elbo" or r["cfg"]["cells_per_condition"] == 64)
                         and r["cfg"]["grid"] in ("batch", "size")),
                        key=lambda r: r["cfg"]["n_cells"])
            if len(rs) < 2:
                continue
            n = [r["n_cells_actual"] for r in rs]
            ax2.plot(n, [1e3 * r["cpu_per_step"] for r in rs], mk + ls, color=color, ms=5, label=f"{obj}, {g} genes: CPU")
            ax2.plot(n, [1e3 * r["time_per_step"] for r in rs], mk + ls, color=color, mfc="none", alpha=0.4, ms=5,
                     lw=0.8, label=f"{obj}, {g} genes: wall")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("cells in the data set")
    ax2.set_ylabel("ms per step (256 cells per step)")
    ax2.set_title("data size")
    if ax2.get_legend_handles_labels()[0]:
        lo, hi = ax2.get_ylim()
        ax2.set_ylim(lo / 6, hi)  # room for the legend below the lines
        ax2.legend(fontsize=6.5, ncol=2, loc="lower center")
    else:
        ax2.text(0.5, 0.5, "no data-size grid in this run", ha="center", va="center", transform=ax2.transAxes)
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)



def _slope_text(name, fit_all, fit_hi):
    if fit_all is None:
        return f"- {name}: not enough points."
    s = f"- {name}: slope {fit_all[0]:.2f} over all points"
    if fit_hi is not None:
        s += f", {fit_hi[0]:.2f} over the points with >= 256 cells per step"
    return s + "."


def section_text(results, *, cmd, date, facts, load_start, load_end, total_seconds, cpu_seconds, png_name,
                 slopes) -> str:
    ok = [r for r in results if "error" not in r]
    g_batch = [r for r in results if r["cfg"]["grid"] == "batch"]
    g_m = sorted((r for r in results if r["cfg"]["grid"] == "m" or r["cfg"]["grid"] == "batch"
                  and r["cfg"]["objective"] == "energy" and _cells_per_step(r) == 512),
                 key=lambda r: (_cells_per_step(r), r["cfg"]["cells_per_condition"]))
    shared = [r for r in g_batch if r["cfg"]["objective"] == "elbo" and r["cfg"].get("batch_size") == 256] + [
        r for r in g_batch if r["cfg"]["objective"] == "energy" and r["cfg"].get("conditions_per_step") == 4]
    g_size = sorted([r for r in results if r["cfg"]["grid"] == "size"] + shared,
                    key=lambda r: (r["cfg"]["objective"], r["cfg"]["n_genes"], r["cfg"]["n_cells"]))
    big = [r for r in results if r["cfg"]["n_cells"] == 100_000 and r["cfg"]["n_genes"] == 2000]
    checks = [r for r in ok if "time_per_step_two_call" in r]
    chunk = results[0]["cfg"]["chunk"]
    g1_size = (f"{g_batch[0]['cfg']['n_cells']:,} cells x {g_batch[0]['cfg']['n_genes']} genes" if g_batch else "")

    lines = [
        "## Speed of the additive-shift fits (ELBO and energy)",
        "",
        f"Command (from the repository root, in the project venv): `{cmd}` (took {total_seconds / 60:.1f} min "
        f"wall, {cpu_seconds / 60:.1f} min of CPU time in the configuration processes).",
        f"Date: {date}. Machine: {facts.get('nproc')} CPUs ({facts.get('affinity')} usable, "
        f"{facts.get('cpu', '?')}), {facts.get('mem_gb', float('nan')):.1f} GB RAM, no accelerator "
        f"(JAX backend `{ok[0]['jax_backend'] if ok else '?'}`); Python {facts.get('python')}, jax {facts.get('jax')}, "
        f"jaxlib {facts.get('jaxlib')}, numpyro {facts.get('numpyro')}, optax {facts.get('optax')}. "
        f"The machine is shared: load average (1/5/15 min) {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f} "
        f"at the start, {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f} at the end; the `load1` column is "
        f"the 1-minute load when each configuration started. With load > 2 on 2 cores other processes "
        f"compete for the CPU, so absolute wall times are pessimistic and noisy.",
        "",
        "Set-up: data from `simulate_additive_shift` (6 elementary perturbations, latent_dim 10, control + "
        "6 singles + all 15 doubles = 22 training conditions, cells split evenly), Gaussian likelihood, "
        "default `AdditiveShiftConfig` (encoder/decoder hidden 128-128, low-rank posterior over W), "
        f"`fit(..., patience=None, eval_every={chunk}, progress=False)`, every configuration in a fresh process. "
        f"`ms/step` is the steady-state time per optimiser step: the median over the chunks of {chunk} steps after "
        "the first (in the child process the script swaps `fit`'s progress bar for a recorder that "
        "timestamps the end of every chunk; `fit` blocks on each chunk's losses before that); `compile s` is the first chunk's extra time "
        "(XLA compile of the scanned step); `setup s` is the time from calling `fit` to the start of its loop "
        "(data to device, guide construction, jitted `svi.init`); `fit wall s` is the whole `fit` call "
        "including `FitResult.build`; `peak RSS MB` is the process peak (`ru_maxrss`), simulation included. "
        "`best ms/step` is the fastest chunk (least disturbed by other processes) and `CPU ms/step` the "
        "median process CPU time (all threads, `time.process_time`) per step: with other processes "
        "competing for the 2 cores, CPU time measures the work of a step and is the least sensitive to the "
        "load. `steps/s` and `cells/s` use the median wall time. "
        "Energy layout `E x m`: `conditions_per_step` x `cells_per_condition`.",
        "",
        f"![time per step vs cells per step]({png_name})",
        "",
        f"### Grid 1: cells per step ({g1_size})",
        "",
        markdown_table(g_batch),
        "",
        "Fitted log-log slope of time per step against cells per step (1 = linear; least squares on "
        "log time vs log cells per step):",
        "",
        *[_slope_text(f"{name}, {MEASURES[key]} time", *slopes[obj][key])
          for obj, name in (("energy", "energy (m = 64, E = 1...16)"), ("elbo", "ELBO (B = 64...1024)"))
          for key in MEASURES],
        "",
        "### Energy: cells per condition m (512 cells per step)",
        "",
        "Per step the energy objective decodes 3 E m cells and computes three m x m distance matrices "
        "per condition, i.e. 3 E m^2 = 3 B m distances for B = E m cells per step. At fixed m this is "
        "linear in B; at fixed B the distance work grows linearly in m; at fixed E it grows "
        "quadratically in m (the O(m^2) within-group energy distance, by design: the score compares "
        "all pairs of cells of a condition). The reference PDAE implementation decodes B^2 cells and "
        "computes B^3 distances per batch.",
        "",
        markdown_table(g_m),
        "",
        "### Grid 2: data size (256 cells per step: ELBO B = 256, energy E = 4 x m = 64)",
        "",
        markdown_table(g_size),
        "",
    ]
    if checks:
        lines += [f"Cross-check of the timing method (two fits, of {chunk} and of all steps, "
                  "(t2 - t1) / (s2 - s1) on `info[\"fit_seconds\"]`):", ""]
        for r in checks:
            extra = ""
            if "short_compile_seconds" in r:
                extra = (f"; but the compile of the two calls differed: {r['compile_seconds']:.1f} s in the long fit, "
                         f"{r['short_compile_seconds']:.1f} s in the short one (second in the process), and that "
                         f"difference divided by {r['cfg']['steps'] - r['cfg']['chunk']} steps is "
                         f"{1e3 * (r['compile_seconds'] - r['short_compile_seconds']) / (r['cfg']['steps'] - r['cfg']['chunk']):.1f}"
                         f" ms/step of the two-call number. The chunk timing does not depend on the compile time")
            lines.append(
                f"- {r['cfg']['objective']} {_layout(r)}, {r['cfg']['n_cells']:,} x {r['cfg']['n_genes']}: "
                f"chunk median {1e3 * r['time_per_step']:.1f} ms/step, two-call {1e3 * r['time_per_step_two_call']:.1f} "
                f"ms/step{extra}."
            )
        lines.append("")
    lines += ["### Reading", ""]
    lines += reading(results, slopes, big)
    return "\n".join(lines)


def _ratios(rs, key):
    rs = sorted(rs, key=_cells_per_step)
    return ", ".join(f"{b[key] / a[key]:.2f}" for a, b in itertools.pairwise(rs))


def reading(results, slopes, big) -> list[str]:
    ok = [r for r in results if "error" not in r]
    out = []
    loads = [r["load1_start"] for r in ok]
    if loads:
        spread = [r["step_spread"] for r in ok if math.isfinite(r.get("step_spread", float("nan")))]
        out.append(
            f"- The machine was heavily shared during this run (1-minute load {min(loads):.1f}-{max(loads):.1f} on "
            f"2 cores), so wall times per step are inflated and noisy (10th-90th percentile spread of the chunk "
            f"times up to {max(spread):.0%} of the median). The CPU-time columns measure the work of a step and "
            f"are far more stable (see grid 2: the same step on different data sizes); the scaling statements "
            f"below use them."
        )
    for obj, name in (("energy", "Energy (m = 64, E = 1...16)"), ("elbo", "ELBO (B = 64...1024)")):
        cpu_all, cpu_hi = slopes[obj]["cpu_per_step"]
        if cpu_all is None:
            continue
        rs = [r for r in ok if r["cfg"]["grid"] == "batch" and r["cfg"]["objective"] == obj]
        rs.sort(key=_cells_per_step)
        first, last = rs[0], rs[-1]
        worst = max(cpu_all[0], cpu_hi[0] if cpu_hi else 0.0)
        if worst <= 1.0:
            verdict = "at most linearly"
        elif worst <= 1.15:
            verdict = "linearly (within the noise of this machine; a quadratic cost would have slope 2)"
        else:
            verdict = "faster than linearly"
        wall = ", ".join(f"{slopes[obj][k][0][0]:.2f} ({MEASURES[k]})" for k in ("time_per_step", "time_per_step_best")
                         if slopes[obj][k][0] is not None)
        out.append(
            f"- {name}: CPU time per step {1e3 * first['cpu_per_step']:.1f} -> {1e3 * last['cpu_per_step']:.1f} ms "
            f"for {_cells_per_step(first)} -> {_cells_per_step(last)} cells per step "
            f"(x{last['cpu_per_step'] / first['cpu_per_step']:.1f} for x{_cells_per_step(last) // _cells_per_step(first)} "
            f"cells; per doubling x{_ratios(rs, 'cpu_per_step')}); it grows {verdict}: log-log slope "
            f"{cpu_all[0]:.2f}" + (f" over all points, {cpu_hi[0]:.2f} over 256-1024" if cpu_hi else "")
            + f". Wall-time slopes: {wall} (load-driven; e.g. the largest batch's median wall time is "
            f"{last['time_per_step'] / last['cpu_per_step']:.1f}x its CPU time)."
        )
    by = {(r["cfg"]["objective"], r["cfg"]["n_genes"]): r for r in ok
          if r["cfg"]["n_cells"] == 10_000 and _cells_per_step(r) == 256
          and (r["cfg"]["objective"] == "elbo" or r["cfg"]["cells_per_condition"] == 64)}
    for g in (500, 2000):
        if ("elbo", g) in by and ("energy", g) in by:
            out.append(
                f"- At 256 cells per step and {g} genes the energy step costs "
                f"{by[('energy', g)]['cpu_per_step'] / by[('elbo', g)]['cpu_per_step']:.1f}x the ELBO step in CPU time "
                f"({1e3 * by[('energy', g)]['cpu_per_step']:.0f} vs {1e3 * by[('elbo', g)]['cpu_per_step']:.0f} ms): "
                f"it decodes each cell three times and computes the m x m distance matrices."
            )
    m_rows = [r for r in ok if r["cfg"]["objective"] == "energy" and r["cfg"]["grid"] in ("batch", "m")
              and _cells_per_step(r) == 512]
    if len(m_rows) >= 2:
        m_rows.sort(key=lambda r: r["cfg"]["cells_per_condition"])
        desc = ", ".join(f"m = {r['cfg']['cells_per_condition']}: {1e3 * r['cpu_per_step']:.0f} ms CPU "
                         f"({1e3 * r['time_per_step']:.0f} ms wall)" for r in m_rows)
        out.append(f"- Cells per condition at a fixed 512 cells per step: {desc}. The distance work 3 B m grows 4x "
                   f"from m = 32 to 128 while the 3 B decodes stay the same, so at 500 genes the step grows only "
                   f"mildly with m; at a fixed number of conditions E the cost would grow with m^2.")
    size_rows = [r for r in ok if _cells_per_step(r) == 256 and r["cfg"]["grid"] in ("batch", "size")
                 and (r["cfg"]["objective"] == "elbo" or r["cfg"]["cells_per_condition"] == 64)]
    for obj in ("elbo", "energy"):
        for g in (500, 2000):
            rs = sorted((r for r in size_rows if r["cfg"]["objective"] == obj and r["cfg"]["n_genes"] == g),
                        key=lambda r: r["cfg"]["n_cells"])
            if len(rs) >= 2:
                out.append(
                    f"- {obj}, {g} genes, {' / '.join(f'{r['cfg']['n_cells']:,}' for r in rs)} cells: "
                    + " / ".join(f"{1e3 * r['cpu_per_step']:.0f}" for r in rs) + " ms CPU per step ("
                    + " / ".join(f"{1e3 * r['time_per_step']:.0f}" for r in rs) + " ms wall): no growth with the number "
                    "of cells (minibatches); set-up " + " / ".join(f"{r['setup_seconds']:.0f}" for r in rs)
                    + " s; peak RSS " + " / ".join(f"{r['peak_rss_mb']:,.0f}" for r in rs) + " MB."
                )
    comp = [r["compile_seconds"] for r in ok if math.isfinite(r.get("compile_seconds", float("nan")))]
    setup = [r["setup_seconds"] for r in ok if math.isfinite(r.get("setup_seconds", float("nan")))]
    if comp:
        dd = [r["setup_device_data_seconds"] for r in ok if "setup_device_data_seconds" in r]
        mg = [r["setup_make_guide_seconds"] for r in ok if "setup_make_guide_seconds" in r]
        rest = [r["setup_seconds"] - r["setup_device_data_seconds"] - r["setup_make_guide_seconds"] for r in ok
                if "setup_device_data_seconds" in r and math.isfinite(r.get("setup_seconds", float("nan")))]
        post = [r["post_seconds"] for r in ok if math.isfinite(r.get("post_seconds", float("nan")))]
        steady = [r["steps_run"] * r["time_per_step"] for r in ok]
        out.append(
            f"- Fixed cost per fit (wall, under this load): compile of the scanned step {min(comp):.0f}-{max(comp):.0f} s "
            f"(median {np.median(comp):.0f}) and set-up {min(setup):.0f}-{max(setup):.0f} s (median "
            f"{np.median(setup):.0f}; data to device {min(dd):.1f}-{max(dd):.1f} s, `make_guide` {min(mg):.1f}-"
            f"{max(mg):.1f} s, the rest, mostly the compile of the jitted `svi.init`, {min(rest):.0f}-{max(rest):.0f} s), "
            f"plus {min(post):.1f}-{max(post):.1f} s after the loop (`FitResult.build`). The steps themselves took "
            f"{min(steady):.1f}-{max(steady):.0f} s per fit here: fits of a few hundred steps are dominated by "
            f"compilation."
        )
    for r in big:
        if "error" in r:
            out.append(f"- 10^5 cells x 2000 genes, {r['cfg']['objective']}: FAILED ({r['error']}).")
        else:
            out.append(
                f"- 10^5 cells x 2000 genes, {r['cfg']['objective']}: {r['steps_run']} steps completed "
                f"(stop reason `{r['stop_reason']}`, final loss {r['final_loss']:.4g}) in {r['wall_seconds']:.0f} s of "
                f"`fit` ({r['process_seconds']:.0f} s for the whole process, simulation {r['data_seconds']:.0f} s "
                f"included), peak RSS {r['peak_rss_mb']:,.0f} MB ({r['peak_rss_data_mb']:,.0f} MB already after "
                f"simulating and loading the data; the dense float32 matrix alone is "
                f"{r['n_cells_actual'] * r['cfg']['n_genes'] * 4 / 2**20:,.0f} MB)."
            )
    failed = [r for r in results if "error" in r and r not in big]
    for r in failed:
        out.append(f"- FAILED: {r['cfg']} -> {r['error']}")
    return out


def _n_params(ok) -> str:
    ns = sorted({r["n_params"] for r in ok if r["cfg"]["n_genes"] == 500 and "n_params" in r})
    return "/".join(f"{n:,}" for n in ns) or "?"


MEASURES = {"time_per_step": "median wall", "time_per_step_best": "best wall", "cpu_per_step": "CPU"}


def report(results, meta, *, doc: Path | None, quick: bool) -> None:
    def slope_pair(sel, key):
        rs = [r for r in results if r["cfg"]["grid"] == "batch" and r["cfg"]["objective"] == sel]
        return loglog_slope(rs, key), loglog_slope([r for r in rs if _cells_per_step(r) >= 256], key)

    slopes = {obj: {key: slope_pair(obj, key) for key in MEASURES} for obj in ("energy", "elbo")}
    print("\n" + text_table(results))
    for obj, by in slopes.items():
        for key, (a, b) in by.items():
            if a is not None:
                hi = "" if b is None else f", {b[0]:.3f} (>= 256 cells per step)"
                print(f"log-log slope of {MEASURES[key]} time/step vs cells/step, {obj}: {a[0]:.3f} (all){hi}")
    le = meta["load_end"]
    print(f"total {meta['total_seconds']:.0f} s; load average at end {le[0]:.2f} {le[1]:.2f} {le[2]:.2f}")
    if doc is None:
        return
    png = doc.parent / "speed_additive.png"
    plot(results, png)
    cmd = ".venv/bin/python benchmarks/speed_additive.py" + (" --quick" if quick else "")
    section = section_text(results, cmd=cmd, date=meta["date"], facts=meta["facts"], load_start=meta["load_start"],
                           load_end=meta["load_end"], total_seconds=meta["total_seconds"],
                           cpu_seconds=meta.get("children_cpu_seconds", float("nan")), png_name=png.name,
                           slopes=slopes)
    write_section("speed-additive", section, doc, sources=[__file__], produced=meta.get("provenance", {}))
    print(f"wrote {doc} and {png}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke run, 4 configurations (no doc/plot unless --doc)")
    ap.add_argument("--doc", default=None, help="markdown file to update (default docs/benchmarks.md; "
                    "the full run writes it, --quick only when given); the PNG goes next to it")
    ap.add_argument("--no-doc", action="store_true", help="print only")
    ap.add_argument("--json", default=None, help="also write all results (and run facts) as JSON")
    ap.add_argument("--render", default=None, help="re-render tables/doc/plot from a --json file, no runs")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    args = ap.parse_args(argv)

    if args.one:
        res = run_one(json.loads(args.one))
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    write = not args.no_doc and (not args.quick or args.doc is not None)
    doc = (Path(args.doc) if args.doc else REPO / "docs" / "benchmarks.md") if write else None
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        report(saved["results"], saved["meta"], doc=doc, quick=saved["meta"]["quick"])
        return 0

    load_start = os.getloadavg()
    prov = provenance()
    facts = machine_facts()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{date}; nproc {facts['nproc']}, jax {facts['jax']}, load average at start "
          f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)
    cs = configs(args.quick)
    results = []
    t_all = time.perf_counter()
    for i, cfg in enumerate(cs, 1):
        r = run_child(cfg, args.timeout)
        results.append(r)
        if "error" in r:
            msg = "FAILED " + r["error"]
        else:
            msg = (f"{1e3 * r['time_per_step']:.1f} ms/step ({1e3 * r['cpu_per_step']:.1f} CPU), compile {r['compile_seconds']:.1f} s, setup "
                   f"{r['setup_seconds']:.1f} s, peak {r['peak_rss_mb']:,.0f} MB, load {r['load1_start']:.1f}")
        print(f"[{i}/{len(cs)} {time.perf_counter() - t_all:6.0f} s] {cfg['objective']:6s} {cfg['n_cells']:>7,} x "
              f"{cfg['n_genes']:<4} {_layout(r):14s} {msg}", flush=True)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    meta = dict(date=date, facts=facts, load_start=list(load_start), load_end=list(os.getloadavg()),
                total_seconds=time.perf_counter() - t_all, quick=args.quick,
                children_cpu_seconds=ru.ru_utime + ru.ru_stime, provenance=prov)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    report(results, meta, doc=doc, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
