"""The nested estimator of the additive-shift model, its selection on training conditions and its
calibrated intervals (issue 17), on tiny simulated data."""

import dataclasses
import inspect
import json

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from perturbax.baselines import LinearBaseline, summarize_training  # noqa: E402
from perturbax.baselines.linear import ridge_solve  # noqa: E402
from perturbax.data import from_anndata, prediction_intervals, simulate_additive_shift  # noqa: E402
from perturbax.inference import FitResult, fit, predict  # noqa: E402
from perturbax.inference.nested import conformal_quantile, nested_columns  # noqa: E402
from perturbax.inference.selection import in_span_folds, nested_path, one_standard_error_choice  # noqa: E402
from perturbax.metrics import interval_coverage, reliability  # noqa: E402
from perturbax.models import AdditiveShiftConfig  # noqa: E402
from perturbax.theory import check_design  # noqa: E402

FIT = dict(steps=30, eval_every=10, progress=False, seed=0)


@pytest.fixture(scope="module")
def sim():
    adata, _ = simulate_additive_shift(
        n_perturbations=3, latent_dim=2, n_genes=8, n_cells=40, doubles="all", doses=None, n_out_of_span=0, seed=3
    )
    return from_anndata(adata, "perturbation", "control")


def _config(data):
    return AdditiveShiftConfig(n_genes=data.n_genes, n_perturbations=data.K, latent_dim=2, decoder_hidden=(16,),
                               encoder_hidden=(16,))


@pytest.fixture(scope="module")
def selected(sim):
    return fit("additive_shift", sim, config=_config(sim), **FIT)  # selection is the default


@pytest.fixture(scope="module")
def plain(sim):
    return fit("additive_shift", sim, config=_config(sim), select=False, **FIT)


def test_lambda_zero_is_the_ridge_baseline_and_one_the_corrected_model(sim, plain):
    arrays, facts, _ = nested_path(plain, sim)
    labels = ["P0+P1", "P2", "P1:0.5+P2:2"]
    vecs = np.stack([sim.registry.encode(lab) for lab in labels])
    pr = predict(plain, labels, n_cells=20, num_samples=8, seed=4)
    draws = np.asarray(pr.uns["mean_draws"], dtype=np.float64)
    cells = [np.asarray(pr.X)[pr.obs["perturbation"].astype(str).to_numpy() == lab] for lab in labels]
    rng = np.random.default_rng(0)
    base = LinearBaseline(alpha="cv").fit(sim)
    zero, _, _ = nested_columns(arrays, 0.0, "generated", vecs, draws, cells, facts["n_ref"], rng)
    for i, lab in enumerate(labels):
        np.testing.assert_allclose(zero[i].mean(0), base.predict_mean(lab), rtol=0, atol=1e-10)
    # lambda = 1: the model's mean + R0 + l R, R the ridge fit of the observed-minus-model training means
    S = summarize_training(sim)
    conds = list(S.conditions)
    model = np.asarray(predict(plain, conds, n_cells=1, num_samples=30, seed=0, bootstrap=False).varm["pred_mean"]).T
    resid = S.means - model
    ci = conds.index(sim.control)
    R = ridge_solve(S.design[S.perturbed], resid[S.perturbed] - resid[ci], facts["alpha"])
    one, _, _ = nested_columns(arrays, 1.0, "generated", vecs, draws, cells, facts["n_ref"], rng)
    for i in range(len(labels)):
        np.testing.assert_allclose(one[i], draws[i] + resid[ci] + vecs[i] @ R, rtol=0, atol=1e-8)


def test_cell_modes_carry_the_nested_mean(sim, plain):
    arrays, facts, _ = nested_path(plain, sim)
    vecs = sim.registry.encode("P0+P2")[None]
    pr = predict(plain, ["P0+P2"], n_cells=100, num_samples=8, seed=1)
    draws = np.asarray(pr.uns["mean_draws"], dtype=np.float64)
    for mode in ("generated", "control"):
        d, cells, _ = nested_columns(arrays, 0.5, mode, vecs, draws, [np.asarray(pr.X)],
                                     facts["n_ref"], np.random.default_rng(0))
        np.testing.assert_allclose(cells[0].mean(0), d[0].mean(0), atol=1e-5)
        spread = cells[0].std(0)
        ref = np.asarray(pr.X).std(0) if mode == "generated" else arrays["control_cells"].std(0)
        np.testing.assert_allclose(spread, ref, rtol=0.15)
        if mode == "control":  # 100 cells from 40 control cells: each used 2-3 times, none more
            counts = np.unique(cells[0], axis=0, return_counts=True)[1]
            assert counts.max() == 3 and counts.size == 40


@pytest.mark.parametrize("seed", range(6))
def test_in_span_folds_keep_every_held_out_condition_in_the_span(seed):
    rng = np.random.default_rng(seed)
    K = 6
    singles = np.eye(K)[rng.permutation(K)[: rng.integers(3, K + 1)]]
    pairs = np.zeros((8, K))
    for r in pairs:
        r[rng.choice(K, 2, replace=False)] = 1.0
    design = np.vstack([np.zeros((1, K)), singles, pairs])
    folds = in_span_folds(design)
    assert folds, "a design of singles and pairs has in-span pairs to hold out"
    seen = set()
    for held in folds:
        assert not seen & set(held.tolist())  # disjoint folds
        seen |= set(held.tolist())
        assert np.all(np.count_nonzero(design[held], axis=1) == 2)  # combinations first
        rest = np.setdiff1d(np.arange(design.shape[0]), held)
        report = check_design(design[rest], design[held])
        assert all(t.covered for t in report.tests), held


def test_in_span_folds_do_not_depend_on_rounding_noise_of_the_leverages(monkeypatch):
    """Rows of equal leverage (every double of a complete design) are taken in row order: noise in the
    last bits of the SVD (which differs between BLAS builds and runs) does not change the folds."""
    import perturbax.inference.selection as selection
    from perturbax.theory.holdouts import label_leverage

    K = 4
    pairs = [np.eye(K)[i] + np.eye(K)[j] for i in range(K) for j in range(i + 1, K)]
    design = np.vstack([np.zeros((1, K)), np.eye(K), *pairs])
    lev = label_leverage(design)
    assert np.ptp(lev[1 + K :]) < 1e-9  # the doubles tie
    expected = in_span_folds(design)
    assert [f.tolist() for f in expected] == [[5, 6], [7, 8]]  # the first doubles, in row order
    for seed in range(5):
        noise = np.random.default_rng(seed).normal(scale=1e-14, size=lev.size)
        monkeypatch.setattr(selection, "label_leverage", lambda D, n=noise: label_leverage(D) + n)
        assert [f.tolist() for f in in_span_folds(design)] == [f.tolist() for f in expected]


def test_in_span_folds_hold_out_two_conditions_a_fold_in_small_designs():
    """5 singles and 5 doubles: max_fraction (1/6 of 10) alone would hold out one double a fold, so the
    CV and the interval calibration would rest on two conditions; two a fold when every fold can have two."""
    K = 5
    pairs = [np.eye(K)[i] + np.eye(K)[j] for i, j in [(0, 1), (1, 2), (2, 3), (3, 4), (0, 4)]]
    design = np.vstack([np.zeros((1, K)), np.eye(K), *pairs])
    assert [f.tolist() for f in in_span_folds(design, min_per_fold=1)] == [[6], [7]]
    assert [f.tolist() for f in in_span_folds(design)] == [[6, 7], [8, 9]]
    three = np.vstack([np.zeros((1, K)), np.eye(K), *pairs[:3]])  # 3 candidates: not two for every fold
    assert [len(f) for f in in_span_folds(three)] == [1, 1]


def test_in_span_folds_singles_only_and_fallback(sim):
    assert in_span_folds(np.vstack([np.zeros(3), np.eye(3)])) == []
    singles = sim.select(["control", "P0", "P1", "P2"])
    res = fit("additive_shift", singles, config=_config(singles), **FIT)
    sel = res.info["selection"]
    assert sel["held_out"] == [] and sel["cv_scores"] == []
    assert (sel["lambda"], sel["cells"]) == (0.0, "control") and not sel["calibration"]["calibrated"]
    assert "singles only" in sel["note"]


def test_selection_is_recorded_and_survives_save_load(tmp_path, selected):
    sel = selected.info["selection"]
    assert sel["held_out"] and len(sel["cv_scores"]) == 10
    best = min(sel["cv_scores"], key=lambda r: r["energy"])
    assert sel["lambda"] <= best["lambda"]  # the one-standard-error rule moves towards the ridge baseline
    per = {(r["lambda"], r["cells"]): r["per_condition"] for r in sel["cv_scores"]}
    assert all(len(v) == sum(len(h) for h in sel["held_out"]) for v in per.values())
    assert (sel["lambda"], sel["cells"]) == one_standard_error_choice(per)
    assert selected.nested["scores"].size == 2 * 8 * 0 + sum(len(h) for h in sel["held_out"]) * 8
    selected.save(tmp_path / "m")
    back = FitResult.load(tmp_path / "m")
    assert back.info["selection"] == json.loads(json.dumps(sel))
    assert set(back.nested) == set(selected.nested)
    for k, v in selected.nested.items():
        np.testing.assert_array_equal(back.nested[k], v)
    a, b = (predict(r, ["P0+P1"], num_samples=5, seed=2) for r in (selected, back))
    np.testing.assert_allclose(np.asarray(a.varm["pred_lower"]), np.asarray(b.varm["pred_lower"]), rtol=1e-6)
    assert a.uns["perturbax"]["nested"]["lambda"] == sel["lambda"]
    # a tampered selection in meta.json is refused
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    meta["info"]["selection"]["lambda"] = 2.0
    (tmp_path / "m" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="lambda must be a number in"):
        FitResult.load(tmp_path / "m")


def test_select_false_keeps_the_plain_fit(plain):
    assert "selection" not in plain.info and plain.nested == {}


def test_one_standard_error_rule_prefers_the_ridge_end_within_the_noise():
    # lambda=1 is best on average, but not by more than the paired standard error: lambda=0.5 is taken
    noisy = {(0.0, "c"): [1.5, 1.5, 1.5], (0.5, "c"): [0.9, 0.5, 1.0], (1.0, "c"): [0.2, 1.2, 0.9]}
    assert one_standard_error_choice(noisy) == (0.5, "c")
    # a clear, consistent win is kept
    clear = {(0.0, "c"): [1.0, 1.1, 0.9], (1.0, "c"): [0.5, 0.6, 0.4], (1.0, "g"): [0.7, 0.8, 0.6]}
    assert one_standard_error_choice(clear) == (1.0, "c")
    # one condition: the lowest mean
    assert one_standard_error_choice({(0.0, "c"): [1.0], (0.5, "g"): [0.99]}) == (0.5, "g")


def test_cv_fits_share_the_final_fits_compiled_step(sim, monkeypatch):
    """The nested estimator's CV fits leave conditions out of one compiled trainer (issue 17)."""
    import perturbax.inference.fitting as fitting

    builds, runs = [], []
    real = fitting._trainer

    def counting(*args, **kwargs):
        builds.append(args[4] if len(args) > 4 else kwargs.get("holdouts", ()))
        run = real(*args, **kwargs)

        def counted(exclude=()):
            res = run(exclude)
            runs.append((list(exclude), res.train_conditions))
            return res

        return counted

    monkeypatch.setattr(fitting, "_trainer", counting)
    res = fit("additive_shift", sim, config=_config(sim), **FIT)
    held = res.info["selection"]["held_out"]
    assert len(builds) == 1 and [list(h) for h in builds[0]] == held
    assert [r[0] for r in runs] == held + [[]]
    for exclude, conds in runs:  # a CV fit's training conditions are the data's minus its fold
        assert set(conds) == set(sim.conditions) - set(exclude)


def test_conformal_scale_widens_intervals_of_a_miscalibrated_model():
    rng = np.random.default_rng(0)
    sigma = np.full(4000, 0.2)  # the model's stated scale
    err_cal = rng.normal(0.0, 3 * 0.2, 4000)  # it is three times too confident
    err_new = rng.normal(0.0, 3 * 0.2, 4000)
    scores = np.abs(err_cal) / sigma
    q = conformal_quantile(scores, 0.9)
    assert q > 2.5 * 1.6449  # the normal factor, widened
    naive = interval_coverage(-1.6449 * sigma, 1.6449 * sigma, err_new)
    calibrated = interval_coverage(-q * sigma, q * sigma, err_new)
    assert naive < 0.5 and abs(calibrated - 0.9) < 0.02
    assert conformal_quantile(np.arange(1.0, 10.0), 0.5) == 5.0  # ceil(10 * 0.5) = 5th smallest
    assert conformal_quantile(np.zeros(0), 0.9) is None


def test_reliability_and_its_diagram_return_the_right_numbers():
    from perturbax.plotting import plot_reliability

    truth = np.array([0.0, 1.0, 2.0, 3.0])
    intervals = {0.9: (truth - 1, truth + 1), 0.5: (np.zeros(4), np.full(4, 1.5))}
    cov = reliability(intervals, truth)
    assert cov == {0.5: 0.5, 0.9: 1.0}
    ax = plot_reliability(intervals, truth)
    np.testing.assert_array_equal(ax.lines[-1].get_xydata(), [[0.5, 0.5], [0.9, 1.0]])


def test_prediction_intervals_at_other_levels(selected):
    pr = predict(selected, ["P0+P1"], num_samples=5, seed=2)
    mean, lo, hi = prediction_intervals(pr, "P0+P1")
    f = selected.info["selection"]["calibration"]["factor"]
    m5, lo5, hi5 = prediction_intervals(pr, "P0+P1", level=0.5)
    np.testing.assert_allclose(hi5 - m5, (hi - mean) * f["0.5"] / f["0.9"], rtol=1e-6)
    assert np.all(hi5 - lo5 <= hi - lo + 1e-12)


def test_cli_and_python_share_defaults():
    from perturbax.cli.fit import fit as fit_cmd
    from perturbax.cli.fit import fit_file
    from perturbax.inference.fitting import default_learning_rate, default_objective

    py = inspect.signature(fit).parameters
    cli = {p.name: p for p in fit_cmd.params}
    ff = inspect.signature(fit_file).parameters
    for name in ("steps", "batch_size", "seed"):
        assert cli[name].default == py[name].default == ff[name].default, name
    # None everywhere means: the library's per-model default
    assert py["learning_rate"].default is None and cli["learning_rate"].default is None
    assert ff["learning_rate"].default is None and ff["objective"].default is None
    assert default_learning_rate("additive_shift") == 2e-3 and default_learning_rate("latent_dynamics") == 5e-3
    assert py["objective"].default is None and cli["objective"].default is None
    assert default_objective("additive_shift", "gaussian") == "energy"
    assert default_objective("latent_dynamics", "gaussian") == "elbo"
    # the CLI's latent size is the model config's own default (None: the config decides), as in fit()
    assert cli["latent_dim"].default is None and ff["latent_dim"].default is None
    assert py["select"].default is None and cli["no_select"].is_flag
    assert "Norman" not in (cli["mean_weight"].help or "")


def test_fit_default_objective_is_energy(selected, plain):
    assert selected.objective == plain.objective == "energy"
    assert selected.info["learning_rate"] == plain.info["learning_rate"] == 2e-3
    assert dataclasses.asdict(selected.config) == dataclasses.asdict(plain.config)


def test_cli_fit_output_names_the_selection(selected, plain):
    from perturbax.cli.fit import selection_lines

    sel = selected.info["selection"]
    text = "\n".join(selection_lines(sel))
    assert f"lambda={sel['lambda']:g}, cells={sel['cells']}" in text
    assert "CV energy (lambda/cells): 0/generated=" in text and "calibrated on" in text
    assert selection_lines(plain.info.get("selection")) == []


def test_unidentified_spread_is_zero_in_the_span_and_grows_outside():
    from perturbax.inference.nested import unidentified_spread

    design = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    effects = np.array([[1.0, -2.0], [3.0, 0.0], [50.0, 50.0]])  # P2's row (never measured) must not count
    arrays = {"ridge_effects": effects}
    residual, spread = unidentified_spread(arrays, design, np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                                                                     [1.0, 0.0, 2.0]]))
    np.testing.assert_allclose(residual, [0.0, 1.0, 2.0], atol=1e-12)
    tau2 = np.array([(1 + 9) / 2, (4 + 0) / 2])
    np.testing.assert_allclose(spread, [[0, 0], tau2, 4 * tau2], atol=1e-12)


def test_intervals_of_an_unseen_perturbation_are_widened_and_say_so(sim):
    """A perturbation never measured has no data behind its effect: the nested estimator's ridge
    path predicts no effect, and its interval must not be the narrow calibrated one of the span."""
    train = sim.select([c for c in sim.conditions if "P2" in c], exclude=True)
    res = fit("additive_shift", train, config=_config(train), **FIT)
    with pytest.warns(UserWarning, match="not identified"):
        pr = predict(res, ["P0+P1", "P2"], num_samples=5, seed=0, allow_unseen=True)
    nested = pr.uns["perturbax"]["nested"]
    assert nested["unidentified"][0] == 0.0 and nested["unidentified"][1] == pytest.approx(1.0)
    assert "exchangeable" in nested["unidentified_note"]
    _, lo_in, hi_in = prediction_intervals(pr, "P0+P1")
    mean, lo_out, hi_out = prediction_intervals(pr, "P2")
    tau = np.sqrt(np.mean(res.nested["ridge_effects"][:2] ** 2, axis=0))
    q = nested["interval_factor"]
    assert np.all(hi_out - mean >= q * tau - 1e-5)  # at least the spread of the measured effects
    assert np.median(hi_out - lo_out) > 2 * np.median(hi_in - lo_in)


def test_continue_fit_restarts_from_the_kept_state_and_merges_the_history(sim):
    """A further cycle starts from the earlier fit's kept parameters (its held-out loss at the
    restart equals the kept one: the evaluation is paired), runs all its steps whatever the held-out
    cells say (the CV judges the cycle) and keeps its last state; the result counts both cycles."""
    from functools import partial

    import perturbax.inference.fitting as fitting
    from perturbax.inference.selection import continue_fit

    cfg = _config(sim)
    run = fitting._trainer("additive_shift", fitting.BUILTIN_MODELS["additive_shift"][0], cfg, sim, (),
                           objective="energy", steps=30, batch_size=64, learning_rate=2e-3, seed=0, guide=None,
                           global_guide="lowrank", energy=None, validation_fraction=0.1, eval_every=10,
                           patience=1, progress=False, init_params=None, data_init=True)
    first = run()
    both = continue_fit(run, first, 1)
    done = first.info["steps_run"]
    replay = partial(run, init_params=first)()  # cycle 0 again: the same draws as the first cycle
    assert both.info["cycles"] == 2
    # the second cycle ran its 30 steps with patience 1 (no early stopping) and kept its last state
    assert both.info["steps_run"] == done + 30 and both.info["stop_reason"] == "steps"
    assert both.info["best_step"] == done + 30
    assert both.history["loss"].size == done + 30
    np.testing.assert_allclose(both.history["loss"][:done], first.history["loss"])
    np.testing.assert_array_equal(both.history["val_step"], list(range(0, done + 31, 10)))
    assert both.info["best_val_loss"] == pytest.approx(both.history["val_loss"][-1])
    # the restart's starting state is the first cycle's kept one (scored again: the same held-out loss)
    np.testing.assert_allclose(replay.history["val_loss"][0], first.info["best_val_loss"], rtol=1e-4)
    assert np.isfinite(both.history["val_loss"]).all()
    # a cycle > 0 draws other cells than the first cycle (a replay of cycle 0 would repeat them)
    assert not np.allclose(both.history["loss"][done : done + 10], replay.history["loss"][:10])


def test_length_is_chosen_by_the_cv_in_cycles_of_the_default_steps(sim, selected, monkeypatch):
    """Given no steps, the CV fits run further cycles while the chosen setting uses the model and its
    CV energy falls; the final fit runs the kept number of cycles (issue 17: length chosen on
    training conditions)."""
    import perturbax.inference.fitting as fitting
    import perturbax.inference.selection as selection

    monkeypatch.setattr(fitting, "DEFAULT_STEPS", 20)
    monkeypatch.setattr(selection, "MAX_CYCLES", 3)  # fewer CV scorings than the default's 5: the same logic
    # a setting that uses the model, whatever the CV says, so that the length loop runs
    monkeypatch.setattr(selection, "one_standard_error_choice", lambda scores: (1.0, "generated"))
    res = fit("additive_shift", sim, config=_config(sim), eval_every=10, progress=False, seed=0, patience=None)
    sel = res.info["selection"]
    log = sel["length"]
    assert len(log) >= 2 and 1 <= sel["cycles"] <= selection.MAX_CYCLES and log[0]["cycles"] == 1
    assert [r["cycles"] for r in log] == list(range(1, len(log) + 1))
    kept = log[sel["cycles"] - 1]
    assert (sel["lambda"], sel["cells"]) == (kept["lambda"], kept["cells"])
    for a, b in zip(log[: sel["cycles"]], log[1 : sel["cycles"]]):  # every kept cycle lowered the CV energy
        assert b["energy"] < a["energy"] and selection._uses_model((a["lambda"], a["cells"]))
    if len(log) > sel["cycles"]:  # a cycle tried and not kept did not lower it
        assert log[-1].get("diverged") or log[-1]["energy"] >= kept["energy"]
    else:  # every cycle allowed was run and kept
        assert sel["cycles"] == selection.MAX_CYCLES
    assert res.info["steps_run"] == 20 * sel["cycles"] and res.info.get("cycles", 1) == sel["cycles"]
    # a number of steps fixes the length: one cycle, nothing chosen
    assert selected.info["selection"]["cycles"] == 1 and len(selected.info["selection"]["length"]) == 1
    assert selected.info["steps_run"] <= FIT["steps"] and "cycles" not in selected.info
    # a setting without the model (the ridge mean, control cells): more fitting cannot change it
    monkeypatch.setattr(selection, "one_standard_error_choice", lambda scores: (0.0, "control"))
    ridge = fit("additive_shift", sim, config=_config(sim), eval_every=10, progress=False, seed=0, patience=None)
    assert ridge.info["selection"]["cycles"] == 1 and len(ridge.info["selection"]["length"]) == 1

