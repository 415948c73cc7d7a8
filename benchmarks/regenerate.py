"""Rerun every benchmark with the settings that produced its section, then rebuild docs/results.md
(``make benchmarks``). Hours on a 2-core CPU machine; ``--dry-run`` lists the commands.

:data:`RUNS` is the one list of what regenerates the benchmark pages: per section, the commands
(run from the repository root with this interpreter) that write it. tests/test_docs.py checks
that every section on the pages is in it (or in :data:`HAND_WRITTEN`, with the reason), and that
each command's script is the one its section's stamp names and writes that section. A new
benchmark section needs one entry here.

    python benchmarks/regenerate.py --dry-run           # what would run
    python benchmarks/regenerate.py --only pdae-sim     # one section (repeatable), then results.md
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: section -> commands that (re)write it, in order (``python`` = this interpreter).
RUNS: dict[str, tuple[str, ...]] = {
    "baselines": ("python benchmarks/baselines.py",),
    "norman-models": ("python benchmarks/norman_doubles_models.py",),
    "norman_defaults": (
        "python benchmarks/norman_defaults.py --folds 0,1,2,3,4 --out /tmp/perturbax_bench_norman_defaults.json",
        "python benchmarks/norman_defaults.py --report /tmp/perturbax_bench_norman_defaults.json",
    ),
    "norman-fold-time": ("python benchmarks/norman_fold_time.py --fold 0",),
    "pdae-sim": ("python benchmarks/pdae_sim.py --defaults --seeds 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19",),
    "pdae-sim-ceiling": ("python benchmarks/oracle_ceiling.py --parts pdae "
                         "--model-pdae /tmp/perturbax_bench_pdae_sim/table.csv",),
    "theory-coverage": ("python benchmarks/theory_coverage.py --steps 4000 --seed 0",),
    "dynamics": ("python benchmarks/dynamics.py --parts h --seeds 0,1,2,3,4",),
    "dynamics-ceiling": ("python benchmarks/oracle_ceiling.py --parts dynamics "
                         "--model-dynamics /tmp/perturbax_bench_dynamics/defaults.json",),
    "dynamics-order-transients": ("python benchmarks/dynamics_order_transients.py --seeds 0,1,2,3,4 --multi-seeds 4 "
                                  "--bootstrap 10 --headline /tmp/perturbax_bench_dynamics/defaults.json",),
    "dynamics-real": ("python benchmarks/dynamics.py --parts c",),
    "dynamics-speed": ("python benchmarks/dynamics.py --parts d --speed default",),
    "speed-additive": ("python benchmarks/speed_additive.py",),
    "scale": ("python benchmarks/scale.py --steps 250 --eval-every 50",),
    "contexts-kang": (
        "python benchmarks/contexts.py --out /tmp/perturbax_bench_contexts_kang.json",
        "python benchmarks/contexts.py --report /tmp/perturbax_bench_contexts_kang.json",
    ),
    "contexts-mcfaline": (
        "python benchmarks/contexts_mcfaline.py --folds 0,1,2,3,4,5,6,7,8 --out /tmp/perturbax_bench_contexts_mcfaline.json",
        "python benchmarks/contexts_mcfaline.py --report /tmp/perturbax_bench_contexts_mcfaline.json",
    ),
}
#: Sections no script writes (their text was written by hand from a script's output): why.
HAND_WRITTEN: dict[str, str] = {
    "dynamics-target-mask": "written by hand from the output of benchmarks/dynamics_target_mask.py (--variant "
                            "identity/reversed --seeds 2, --variant from-fit --seeds 2,4), which prints but does not "
                            "write its section; rerun those by hand and edit the section.",
}
REBUILD = "python benchmarks/results.py"


def script_of(command: str) -> str:
    """The script path of a command (``benchmarks/x.py``)."""
    return shlex.split(command)[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list the commands, run nothing")
    ap.add_argument("--only", action="append", default=[], metavar="SECTION", help="only this section (repeatable)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.only) - set(RUNS))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; sections: {', '.join(RUNS)}")
    chosen = [s for s in RUNS if not args.only or s in args.only]
    plan = [(s, c) for s in chosen for c in RUNS[s]] + [("results", REBUILD)]
    for section, command in plan:
        print(f"[{section}] {command}", flush=True)
        if args.dry_run:
            continue
        t0 = time.time()
        proc = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=ROOT)
        if proc.returncode != 0:
            print(f"[{section}] failed (exit {proc.returncode}) after {time.time() - t0:.0f} s", file=sys.stderr)
            return proc.returncode
        print(f"[{section}] done in {time.time() - t0:.0f} s", flush=True)
    for section, why in HAND_WRITTEN.items():
        print(f"[{section}] not regenerated: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
