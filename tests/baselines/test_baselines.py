"""Baselines: exactness on additive data, agreement between additive and linear, cells not only
means, clear errors."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbax.baselines import (
    AdditiveBaseline,
    Baseline,
    ControlBaseline,
    LinearBaseline,
    PooledMeanBaseline,
    split_half_noise_floor,
    standard_baselines,
)
from perturbax.data import from_anndata

G = 6
RNG = np.random.default_rng(0)
MU0 = RNG.normal(size=G)
DELTA = {name: RNG.normal(scale=2.0, size=G) for name in "ABCDE"}


def _additive_adata(conditions, n=8, seed=1, sparse=False):
    """Cells whose condition means are exactly control mean + sum_k dose_k * DELTA[k]
    (noise centred per condition), so an additive model is exact in gene space."""
    rng = np.random.default_rng(seed)
    blocks, labels = [], []
    for cond, n_c in conditions:
        mean = MU0.copy()
        if cond != "control":
            for part in cond.split("+"):
                name, _, dose = part.partition(":")
                mean += float(dose or 1.0) * DELTA[name]
        noise = rng.normal(size=(n_c or n, G))
        blocks.append(mean + noise - noise.mean(0))
        labels += [cond] * (n_c or n)
    X = np.concatenate(blocks).astype(np.float32)
    obs = pd.DataFrame({"pert": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])
    return ad.AnnData(X=sp.csr_matrix(X) if sparse else X, obs=obs,
                      var=pd.DataFrame(index=[f"g{j}" for j in range(G)]))


def _data(conds, **kw):
    return from_anndata(_additive_adata([(c, None) if isinstance(c, str) else c for c in conds], **kw),
                        "pert", "control")


SINGLES = ["control", "A", "B", "C", "D"]


@pytest.fixture(scope="module")
def singles():
    return _data(SINGLES)


def _true_mean(label):
    mean = MU0.copy()
    for part in label.split("+"):
        name, _, dose = part.partition(":")
        mean += float(dose or 1.0) * DELTA[name]
    return mean


def test_all_baselines_follow_the_protocol(singles):
    for b in standard_baselines():
        assert isinstance(b, Baseline)
        fitted = b.fit(singles)
        assert isinstance(fitted, Baseline) and not b.is_fitted and fitted.is_fitted
        out = fitted.predict(["A", "B+A"])
        assert list(out) == ["A", "A+B"]  # canonical keys
        assert all(v.shape == (8, G) and v.dtype == np.float32 for v in out.values())


def test_control_baseline_returns_the_control_cells(singles):
    ctrl = singles.dense(singles.cells_of("control"))
    pred = ControlBaseline().fit(singles).predict(["A+B", "C"])
    for cells in pred.values():
        np.testing.assert_array_equal(cells, ctrl)


@pytest.mark.parametrize("label", ["A+B", "A+B+C", "D", "A:0.5+C:2", "B:-1+D"])
def test_additive_exact_on_additive_data(singles, label):
    model = AdditiveBaseline().fit(singles)
    np.testing.assert_allclose(model.predict_mean(label), _true_mean(label), atol=2e-5)
    cells = model.predict(label)[singles.registry.canonical(label)]
    np.testing.assert_allclose(cells.mean(0), _true_mean(label), atol=2e-5)


def test_cells_are_predicted_mean_plus_control_residuals(singles):
    ctrl = singles.dense(singles.cells_of("control")).astype(np.float64)
    for model in (AdditiveBaseline().fit(singles), LinearBaseline(alpha=0.3).fit(singles),
                  PooledMeanBaseline().fit(singles)):
        cells = model.predict("A+C")["A+C"].astype(np.float64)
        np.testing.assert_allclose(cells, model.predict_mean("A+C") + ctrl - ctrl.mean(0), atol=1e-5)
        # the control label gives the control cells
        np.testing.assert_allclose(model.predict("control")["control"], ctrl, atol=1e-6)


def test_additive_dose_scaled_singles():
    data = _data(["control", "A:0.5", "A:2", "B"])
    model = AdditiveBaseline().fit(data)
    np.testing.assert_allclose(model.predict_mean("A:1.5+B"), _true_mean("A:1.5+B"), atol=2e-5)


def test_linear_tiny_alpha_equals_additive_on_singles(singles):
    add = AdditiveBaseline().fit(singles)
    lin = LinearBaseline(alpha=1e-9).fit(singles)
    for label in ["A", "A+B", "A+B+C+D", "C:0.5+D:3"]:
        np.testing.assert_allclose(lin.predict_mean(label), add.predict_mean(label), atol=1e-6)
    # ridge shrinks towards the control mean as alpha grows
    norms = [np.linalg.norm(LinearBaseline(alpha=a).fit(singles).predict_mean("A+B") - MU0)
             for a in (0.0, 0.5, 5.0, 50.0)]
    assert all(n1 > n2 for n1, n2 in zip(norms, norms[1:]))
    np.testing.assert_allclose(norms[0], np.linalg.norm(DELTA["A"] + DELTA["B"]), rtol=1e-5)


def test_linear_least_squares_recovers_effects_from_combinations():
    # B and C are never measured alone; the design still has full rank
    data = _data(["control", "A", "A+B", "B+C", "A+C", "D"])
    lin = LinearBaseline(alpha=0.0).fit(data)
    np.testing.assert_allclose(lin.predict_mean("B+D"), _true_mean("B+D"), atol=5e-5)


def test_pooled_mean_is_cell_weighted():
    data = _data([("control", 8), ("A", 4), ("B", 12)])
    model = PooledMeanBaseline().fit(data)
    X = data.dense()
    pooled = X[data.env != data.control_index].astype(np.float64).mean(0)
    for label in ("A", "A+B"):  # the same for every perturbed label
        np.testing.assert_allclose(model.predict_mean(label), pooled, atol=1e-5)
    assert model.predict("A")["A"].shape == (8, G)


def test_unmeasured_single_options():
    data = _data(["control", "A", "B", "A+E", "B+E", "C+D"])
    with pytest.raises(ValueError, match="'E' was never measured alone .*unmeasured='least_squares'"):
        AdditiveBaseline().fit(data).predict("A+E")
    assert "E" in AdditiveBaseline().fit(data).why_not("C+E")
    assert AdditiveBaseline().fit(data).why_not("A+B") is None
    ls = AdditiveBaseline(unmeasured="least_squares").fit(data)
    np.testing.assert_allclose(ls.predict_mean("E"), _true_mean("E"), atol=5e-5)
    np.testing.assert_allclose(ls.predict_mean("B+E"), _true_mean("B+E"), atol=5e-5)
    # C and D only appear together: minimum-norm split of their joint effect, joint effect exact
    np.testing.assert_allclose(ls.predict_mean("C+D"), _true_mean("C+D"), atol=5e-5)
    np.testing.assert_allclose(ls.predict_mean("C") - MU0, ls.predict_mean("D") - MU0, atol=1e-6)
    zero = AdditiveBaseline(unmeasured="zero").fit(data)
    np.testing.assert_allclose(zero.predict_mean("A+E"), _true_mean("A"), atol=2e-5)


def test_component_absent_from_training():
    data = _data(["control", "A", "B", "A+B"])
    only_a = data.select(["B", "A+B"], exclude=True)  # B now in no training condition
    assert only_a.registry.names == ("A", "B")  # but the registry still knows it
    for model in (AdditiveBaseline(unmeasured="least_squares"), LinearBaseline()):
        fitted = model.fit(only_a)
        with pytest.raises(ValueError, match="'B' appears in no training condition.*unmeasured='zero'"):
            fitted.predict(["A+B"])
    lin0 = LinearBaseline(unmeasured="zero", alpha=0.0).fit(only_a)
    np.testing.assert_allclose(lin0.predict_mean("A+B"), _true_mean("A"), atol=2e-5)


def test_unknown_perturbation_errors(singles):
    for b in standard_baselines():
        fitted = b.fit(singles)
        with pytest.raises(KeyError, match="Unknown perturbation 'Z'"):
            fitted.predict(["A", "A+Z"])


def test_not_fitted_and_argument_errors(singles):
    with pytest.raises(RuntimeError, match="not fitted.*fit\\(train\\)"):
        AdditiveBaseline().predict("A")
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0 or 'cv', got -1"):
        LinearBaseline(alpha=-1)
    with pytest.raises(ValueError, match="unmeasured must be one of"):
        AdditiveBaseline(unmeasured="ignore")
    with pytest.raises(ValueError, match="n_cells must be a positive integer"):
        ControlBaseline().fit(singles).predict("A", n_cells=0)
    no_ctrl = from_anndata(_additive_adata([("A", 4)]), "pert", "control", require_control=False)
    with pytest.raises(ValueError, match="no control cells"):
        ControlBaseline().fit(no_ctrl)
    with pytest.raises(TypeError, match="PerturbationData"):
        ControlBaseline().fit(np.zeros((3, 3)))


def test_n_cells_resampling_is_seeded(singles):
    model = AdditiveBaseline().fit(singles)
    a = model.predict(["A", "B"], n_cells=5, seed=1)
    b = model.predict(["B", "A"], n_cells=5, seed=1)
    c = model.predict(["A"], n_cells=5, seed=2)
    assert a["A"].shape == (5, G)
    np.testing.assert_array_equal(a["A"], b["A"])  # independent of the other labels asked for
    assert not np.array_equal(a["A"], c["A"])
    big = model.predict("A", n_cells=50, seed=0)["A"]  # more than the 8 control cells
    assert big.shape == (50, G)
    # every drawn cell is a control cell shifted by the same delta
    ctrl = singles.dense(singles.cells_of("control")) + (model.predict_mean("A") - model.predict_mean("control"))
    d = np.abs(big[:, None, :] - ctrl[None, :, :]).max(-1).min(1)
    assert d.max() < 1e-5


def test_sparse_and_dense_training_agree():
    dense = _data(SINGLES + ["A+B"])
    sparse = _data(SINGLES + ["A+B"], sparse=True)
    assert sparse.is_sparse
    for b in standard_baselines(alpha=0.2):
        np.testing.assert_allclose(b.fit(dense).predict_mean("B+C"), b.fit(sparse).predict_mean("B+C"), atol=1e-6)


def test_split_half_noise_floor():
    x = np.arange(22, dtype=float).reshape(11, 2)
    a, b = split_half_noise_floor(x, seed=3)
    assert a.shape == (5, 2) and b.shape == (6, 2)
    rows = sorted(map(tuple, np.concatenate([a, b])))
    assert rows == sorted(map(tuple, x))  # a partition of the cells
    a2, b2 = split_half_noise_floor(x, seed=3)
    np.testing.assert_array_equal(a, a2)
    a3, _ = split_half_noise_floor(x, seed=4)
    assert not np.array_equal(a, a3)
    with pytest.raises(ValueError, match="at least 4 cells"):
        split_half_noise_floor(x[:3], seed=0)


# ------------------------------------------------------------ ridge penalty chosen on training data
from perturbax.baselines.linear import ALPHA_GRID, FALLBACK_ALPHA, ridge_loo_scores  # noqa: E402
from perturbax.theory.holdouts import in_span_holdouts, label_leverage  # noqa: E402


def test_in_span_holdouts_are_the_rows_the_others_identify():
    D = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=float)
    # the double is identified by its singles and each single by the double and the other single;
    # C is measured only once, so holding it out leaves it unidentified; the control is never held out
    assert in_span_holdouts(D).tolist() == [1, 2, 3]
    h = label_leverage(D)
    assert np.isclose(h[4], 1.0) and np.all(h[1:4] < 1 - 1e-6)
    assert in_span_holdouts(np.eye(3)).size == 0


def test_ridge_loo_closed_form_matches_refitting():
    rng = np.random.default_rng(3)
    L = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]], float)
    D = L @ rng.normal(size=(3, 4)) + 0.3 * rng.normal(size=(7, 4))
    rows = in_span_holdouts(L)
    assert rows.size == 7
    for a in (0.0, 0.05, 2.0):
        brute = []
        for j in rows:
            keep = np.delete(np.arange(7), j)
            W = np.linalg.lstsq(L[keep], D[keep], rcond=None)[0] if a == 0 else \
                np.linalg.solve(L[keep].T @ L[keep] + a * np.eye(3), L[keep].T @ D[keep])
            brute.append(np.mean((D[j] - L[j] @ W) ** 2))
        assert np.isclose(ridge_loo_scores(L, D, rows, [a])[0], np.mean(brute), rtol=1e-10)


def test_linear_cv_alpha_is_chosen_on_in_span_training_conditions():
    # additive truth with noise-free means: least squares is exact, so CV picks the smallest penalty
    data = _data(["control", "A", "B", "C", "A+B", "B+C", "A+C"])
    fitted = LinearBaseline().fit(data)
    info = fitted.fitted.info
    assert LinearBaseline().alpha == "cv"
    assert info["alpha"] == 0.0 and info["alpha_cv"]["scores"][0] < 1e-12
    assert sorted(info["alpha_cv"]["held_out"]) == sorted(["A", "B", "C", "A+B", "A+C", "B+C"])
    assert len(info["alpha_cv"]["scores"]) == len(ALPHA_GRID)
    np.testing.assert_allclose(fitted.predict_mean("A+B+C"), _true_mean("A+B+C"), atol=1e-6)


def test_linear_cv_alpha_shrinks_pure_noise_effects():
    # perturbations with no effect at all: every non-zero effect is noise, so CV picks a large penalty
    rng = np.random.default_rng(0)
    conds = ["control", "A", "B", "C", "A+B", "B+C", "A+C"]
    blocks, labels = [], []
    for cond in conds:
        blocks.append(MU0 + rng.normal(size=(5, G)))
        labels += [cond] * 5
    adata = ad.AnnData(X=np.concatenate(blocks).astype(np.float32),
                       obs=pd.DataFrame({"pert": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))]),
                       var=pd.DataFrame(index=[f"g{j}" for j in range(G)]))
    info = LinearBaseline().fit(from_anndata(adata, "pert", "control")).fitted.info
    assert info["alpha"] >= 1.0


def test_linear_cv_alpha_without_in_span_conditions_says_so(singles):
    info = LinearBaseline().fit(singles).fitted.info
    assert info["alpha"] == FALLBACK_ALPHA and info["alpha_cv"]["held_out"] == []
    assert "cannot be cross-validated" in info["alpha_cv"]["note"]
    with pytest.raises(ValueError, match="'cv'"):
        LinearBaseline(alpha="loo")


def test_baselines_with_contexts_start_from_the_contexts_control(contexts_adata):
    """A held-out (perturbation, context) pair: the additive baseline is the context's control + the
    perturbation's mean effect in the other contexts (each against its own control), and every
    baseline's cells are the control cells of that context moved to its predicted mean."""
    data = from_anndata(contexts_adata, "perturbation", "control", context_keys=["line"])
    train = data.select(["A @ line=z"], exclude=True)

    def mean(label):
        return data.dense(data.cells_of(label)).astype(np.float64).mean(0)

    z_control = data.dense(data.cells_of("control @ line=z")).astype(np.float64)
    expected = mean("control @ line=z") + np.mean([mean(f"A @ line={c}") - mean(f"control @ line={c}") for c in "xy"], 0)
    additive = AdditiveBaseline().fit(train)
    np.testing.assert_allclose(additive.predict_mean("A @ line=z"), expected, atol=1e-10)
    for model in (additive, LinearBaseline().fit(train), ControlBaseline().fit(train)):
        cells = model.predict("A @ line=z")["A @ line=z"].astype(np.float64)
        assert cells.shape == z_control.shape  # z's 45 control cells, not the reference context's 30
        np.testing.assert_allclose(cells - cells.mean(0), z_control - z_control.mean(0), atol=1e-5)
    np.testing.assert_allclose(ControlBaseline().fit(train).predict_mean("A @ line=z"), mean("control @ line=z"),
                               atol=1e-10)
