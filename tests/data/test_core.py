"""from_anndata: arrays out, clear errors on bad input, the user's AnnData never modified."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbax.data import from_anndata


def _adata(sparse=False, counts=True):
    rng = np.random.default_rng(0)
    labels = ["control"] * 4 + ["A"] * 3 + ["B"] * 3 + ["A+B"] * 2 + ["A:0.5+B:2"] * 2
    X = rng.poisson(2.0, (len(labels), 5)).astype(np.float32)
    if not counts:
        X = np.log1p(X) - 0.3
    obs = pd.DataFrame(
        {"perturbation": pd.Categorical(labels), "time": np.arange(len(labels), dtype=float) % 3,
         "batch": ["b1", "b2"] * (len(labels) // 2)},
        index=[f"c{i}" for i in range(len(labels))],
    )
    return ad.AnnData(X=sp.csr_matrix(X) if sparse else X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(5)]))


@pytest.mark.parametrize("sparse", [False, True])
def test_arrays_and_registry(sparse):
    a = _adata(sparse)
    before = a.copy()
    d = from_anndata(a, "perturbation", "control", time_key="time", counts=True)
    assert d.registry.names == ("A", "B") and d.K == 2
    assert d.conditions == ("control", "A", "B", "A+B", "A:0.5+B:2")
    np.testing.assert_array_equal(d.design, [[0, 0], [1, 0], [0, 1], [1, 1], [0.5, 2]])
    assert d.is_sparse == sparse and d.dense().shape == (14, 5)
    np.testing.assert_array_equal(d.L[4], [1, 0])
    assert d.times.tolist()[:4] == [0, 1, 2, 0]
    assert d.cells_of("B+A").tolist() == [10, 11]
    sub = d.select(["A", "control"])
    assert sub.conditions == ("control", "A") and sub.registry == d.registry
    with pytest.raises(ValueError):
        d.env[0] = 3  # immutable arrays
    # nothing was modified in the user's object
    np.testing.assert_array_equal(a.X.toarray() if sparse else a.X, before.X.toarray() if sparse else before.X)
    pd.testing.assert_frame_equal(a.obs, before.obs)


def test_dose_column_and_backed_mode(tmp_path):
    a = _adata()
    a.obs["label"] = ["control"] * 4 + ["A"] * 3 + ["B"] * 3 + ["A+B"] * 4
    a.obs["dose"] = ["0"] * 4 + ["1"] * 6 + ["1+1"] * 2 + ["0.5+2"] * 2
    d = from_anndata(a, "label", "control", dose_key="dose")
    assert "A:0.5+B:2" in d.conditions
    path = tmp_path / "x.h5ad"
    _adata(sparse=True).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    db = from_anndata(backed, "perturbation", "control")
    assert db.n_cells == 14 and db.is_sparse
    backed.file.close()


@pytest.mark.parametrize(
    "mutate, kwargs, match",
    [
        (None, {"perturbation_key": "perturbaton"}, r"no column \(perturbation_key\) 'perturbaton'.*Did you mean 'perturbation'"),
        (None, {"control": "ctrl"}, "No cell has the control label 'ctrl'"),
        (lambda a: a.obs.__setitem__("perturbation", ["A"] * a.n_obs), {}, "No cell has the control label"),
        (lambda a: a.obs.__setitem__("perturbation", ["control"] * 13 + ["A++B"]), {}, "empty component"),
        (lambda a: a.obs.__setitem__("perturbation", ["control"] * 13 + ["A|B"]), {}, r"Pass sep='\|'"),
        (None, {"dose_key": "dosage"}, r"no column \(dose_key\)"),
        (None, {"context_keys": ("bach",)}, "Did you mean 'batch'"),
        (lambda a: a.X.__setitem__((3, 1), np.nan), {}, "NaN/Inf"),
        (lambda a: a.X.__setitem__((3, 1), np.inf), {}, "NaN/Inf"),
        (lambda a: a.X.__setitem__((3, 1), -1.0), {"counts": True}, "negative"),
        (lambda a: a.X.__setitem__((3, 1), 0.5), {"counts": True}, "non-integer"),
        (lambda a: setattr(a, "var_names", ["g0", "g0", "g1", "g2", "g3"]), {}, "duplicated"),
        (None, {"layer": "counts"}, r"no layer 'counts'"),
        (None, {"time_key": "batch"}, "not numeric"),
    ],
)
def test_bad_input_errors(mutate, kwargs, match):
    a = _adata()
    if mutate is not None:
        mutate(a)
    kw = {"perturbation_key": "perturbation", "control": "control", **kwargs}
    with pytest.raises((ValueError, KeyError), match=match):
        from_anndata(a, kw.pop("perturbation_key"), kw.pop("control"), **kw)


def test_dose_strings_must_align():
    a = _adata()
    a.obs["dose"] = ["0"] * 4 + ["1"] * 6 + ["1"] * 2 + ["0.5+2"] * 2
    a.obs["label"] = ["control"] * 4 + ["A"] * 3 + ["B"] * 3 + ["A+B"] * 4
    with pytest.raises(ValueError, match="2 component\\(s\\) but dose"):
        from_anndata(a, "label", "control", dose_key="dose")


def test_zero_cells_in_requested_condition():
    d = from_anndata(_adata(), "perturbation", "control")
    with pytest.raises(KeyError, match="'A:2' has zero cells"):
        d.cells_of("A:2")
    with pytest.raises(KeyError, match="Unknown perturbation 'C'"):
        d.cells_of("C")
