"""Does fixing the direct targets of S (``LatentDynamicsConfig.target_mask``) help recovery on the
simulator of ``benchmarks/dynamics.py`` part a? (Issue 5; results are quoted, with this command, in
the "target mask" paragraph after the dynamics section of docs/benchmarks.md.)

The fits of part a put part of P0's effect directly on z2 instead of through the edge z1 -> z2. A
target mask forbids such direct entries, but it has to name, for every perturbation, a program of
the fit, and the programs are only identified up to permutation. Three ways to name them:

- ``identity``: P_k may target program k, with the default lower-triangular causal mask. In this
  simulator that is the TRUE labelling and the TRUE order, so it is an upper bound that uses the
  truth, not something a user could do.
- ``reversed``: P_k may target program l-1-k (a labelling fixed before the order is known; the
  default causal mask is then the reverse of the true order), then the stages of part a.
- ``from-fit``: stages 1-2 of part a without a mask; the mask keeps, for each perturbation, the
  program with the largest |S| of the stage-2 fit; an ELBO refit with that mask (warm-started,
  half as many steps as stage 1) and the energy stage of part a.

Per seed: MCC, sign agreement and edges in the true programs' units, the entries of S off the true
targets, and the E-ratios of the 5 held-out (perturbation, time) pairs of part b (2000 true and 2000
predicted cells, half size 100).

    .venv/bin/python benchmarks/dynamics_target_mask.py --variant from-fit --seeds 2,4   # ~9 min
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dynamics as D  # noqa: E402

STEPS = 6000


def held_out(res, truth) -> str:
    from perturbax.inference import predict

    pred = predict(res, list(dict.fromkeys(p for p, _ in D.HELD_PAIRS)), times=sorted({t for _, t in D.HELD_PAIRS}),
                   n_cells=2000, num_samples=100, seed=0)
    plab = pred.obs["perturbation"].astype(str).to_numpy()
    ptime = pred.obs["time"].to_numpy()
    out = []
    for i, (p, t) in enumerate(D.HELD_PAIRS):
        tc = truth.sample(p, t, 2000, seed=1000 + i)
        r = D.ed_pair(np.asarray(pred.X[(plab == p) & np.isclose(ptime, t)]), tc, seed=i, half=100)
        out.append(f"{p}@{t:g} ED {r['ed_u']:.3f} E-ratio {r['ratio_expected']:.2f}")
    return "; ".join(out)


def describe(rec: dict) -> str:
    return (f"MCC {rec['mcc']:.3f}, signs {rec['sign_agreement']:.2f}; edges (true, rescaled fit) "
            + ", ".join(f"{e['edge']} {e['true']:+.2f}/{e['fitted_rescaled']:+.2f}" for e in rec["edges"])
            + "; S targets " + ", ".join(f"{v:+.2f}" for v in rec["S_targets_fitted_rescaled"])
            + "; " + D.off_target_text(rec))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=["identity", "reversed", "from-fit"], required=True)
    ap.add_argument("--seeds", default="2,4")
    args = ap.parse_args(argv)
    D._quiet()
    from perturbax.data import from_anndata
    from perturbax.inference import fit, refit_in_causal_order

    adata, truth = D.simulate()
    train_all = adata[adata.obs["split"] == "train"].copy()
    train = train_all[~D.held_mask(train_all)].copy()
    data = from_anndata(train, "perturbation", "control", time_key="time")
    z_true = train.obsm["z_true"]
    ell, K = D.SIM["n_programs"], data.K
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.perf_counter()
        if args.variant in ("identity", "reversed"):
            tm = np.zeros((ell, K), int)
            for k in range(K):
                tm[k if args.variant == "identity" else ell - 1 - k, k] = 1
            res, _ = D.fit_stages(data, z_true, truth, steps=STEPS, seed=seed, quick=False, target_mask=tm.tolist())
        else:
            res1, _ = D.fit_dyn(data, steps=STEPS, seed=seed, quick=False, s_prior="horseshoe", s_scale=0.5)
            res2 = refit_in_causal_order(res1, data, steps=STEPS // 2, batch_size=256, eval_every=max(50, STEPS // 40),
                                         patience=10_000, progress=False)
            S2 = D.fitted_latents(res2, data)[3]
            tm = np.zeros_like(S2, dtype=int)
            tm[np.argmax(np.abs(S2), 0), np.arange(K)] = 1
            cfg = dataclasses.replace(res2.config, target_mask=tm.tolist())
            res2b = fit("latent_dynamics", data, config=cfg, objective="elbo", steps=STEPS // 2, batch_size=256,
                        init_params=res2, eval_every=max(50, STEPS // 40), patience=10_000, progress=False, seed=seed)
            print(f"seed {seed} mask read from stage 2 {tm.tolist()}; refit: "
                  + describe(D.recovery(res2b, data, z_true, truth)), flush=True)
            res = D.energy_stage(data, cfg, res2b, steps=4 * STEPS // 3, seed=seed)
        print(f"seed {seed} {args.variant} final: " + describe(D.recovery(res, data, z_true, truth))
              + f"; held-out energy score {float(np.min(res.history['val_loss'])):.4g} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        print(f"seed {seed} {args.variant} held-out pairs: " + held_out(res, truth), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
