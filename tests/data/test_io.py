"""AnnData of predicted cells and cells grouped by condition."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbax.data.io import cells_by_condition, predictions_to_anndata

GENES = ["g0", "g1", "g2"]


def _cells(seed=0):
    rng = np.random.default_rng(seed)
    return {"B+A": rng.normal(size=(4, 3)), "C": rng.normal(size=(2, 3)), "control": rng.normal(size=(3, 3))}


def test_from_mapping():
    cells = _cells()
    adata = predictions_to_anndata(cells, gene_names=GENES, perturbation_key="pert")
    assert adata.shape == (9, 3)
    assert list(adata.var_names) == GENES
    assert adata.obs_names.is_unique
    assert isinstance(adata.obs["pert"].dtype, pd.CategoricalDtype)
    assert list(adata.obs["pert"].cat.categories) == ["B+A", "C", "control"]
    assert adata.obs["pert"].tolist() == ["B+A"] * 4 + ["C"] * 2 + ["control"] * 3
    assert adata.X.dtype == np.float32
    np.testing.assert_allclose(adata.X[:4], cells["B+A"], rtol=1e-6)
    np.testing.assert_allclose(adata.X[6:], cells["control"], rtol=1e-6)


def test_from_array_with_extras():
    X = np.arange(12, dtype=float).reshape(4, 3)
    adata = predictions_to_anndata(
        X, ["A", "A", "B", "A"], gene_names=GENES,
        obs={"draw": [0, 1, 0, 2]}, uns={"model": "additive"}, varm={"lo": np.zeros((3, 2))},
    )
    assert adata.obs["perturbation"].tolist() == ["A", "A", "B", "A"]
    assert adata.obs["draw"].tolist() == [0, 1, 0, 2]
    assert adata.uns["model"] == "additive"
    assert adata.varm["lo"].shape == (3, 2)
    np.testing.assert_array_equal(adata.X, X.astype(np.float32))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"cells": {"A": np.zeros((2, 3))}, "labels": ["A", "A"]}, ValueError, "labels must be None"),
        ({"cells": np.zeros((2, 3))}, ValueError, "labels is required"),
        ({"cells": np.zeros((2, 3)), "labels": ["A"]}, ValueError, "labels has 1 entries but cells has 2 rows"),
        ({"cells": {"A": np.zeros((2, 4))}}, ValueError, "4 genes .* gene_names has 3"),
        ({"cells": {"A": np.full((2, 3), np.nan)}}, ValueError, "NaN/Inf .* \\['A'\\]"),
        ({"cells": {"A": np.zeros((2, 3))}, "obs": {"perturbation": [1, 2]}}, ValueError, "already has a column"),
        ({"cells": {"A": np.zeros((2, 3))}, "obs": {"x": [1, 2, 3]}}, ValueError, "obs has 3 rows"),
        ({"cells": {}}, ValueError, "empty mapping"),
        ({"cells": {"A": np.zeros((2, 2, 3))}}, ValueError, "2-D array"),
    ],
)
def test_predictions_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        predictions_to_anndata(gene_names=GENES, **kwargs)


def test_duplicate_genes_rejected():
    with pytest.raises(ValueError, match="duplicates"):
        predictions_to_anndata({"A": np.zeros((1, 2))}, gene_names=["g", "g"])


def test_round_trip_through_h5ad_canonicalises_labels(tmp_path):
    cells = _cells()
    path = tmp_path / "pred.h5ad"
    predictions_to_anndata(cells, gene_names=GENES).write_h5ad(path)
    back = cells_by_condition(ad.read_h5ad(path), "perturbation", "control")
    assert set(back) == {"A+B", "C", "control"}  # "B+A" -> canonical "A+B"
    for src, key in [("B+A", "A+B"), ("C", "C"), ("control", "control")]:
        np.testing.assert_allclose(back[key], cells[src], rtol=1e-6)
        assert back[key].dtype == np.float32


def test_cells_by_condition_gene_selection_and_control():
    cells = _cells()
    adata = predictions_to_anndata(cells, gene_names=GENES)
    sub = cells_by_condition(adata, "perturbation", "control", genes=["g2", "g0"])
    np.testing.assert_allclose(sub["C"], cells["C"][:, [2, 0]], rtol=1e-6)
    with pytest.raises(KeyError, match="not in this AnnData's var_names .*'g9'"):
        cells_by_condition(adata, "perturbation", "control", genes=["g0", "g9"])
    no_ctrl = predictions_to_anndata({"A": cells["C"]}, gene_names=GENES)
    assert set(cells_by_condition(no_ctrl, "perturbation", "control")) == {"A"}
    with pytest.raises(ValueError, match="No cell has the control label"):
        cells_by_condition(no_ctrl, "perturbation", "control", require_control=True)


def test_cells_by_condition_reads_layer():
    adata = predictions_to_anndata(_cells(), gene_names=GENES)
    adata.layers["counts"] = np.round(np.abs(adata.X) * 10)
    out = cells_by_condition(adata, "perturbation", "control", layer="counts")
    np.testing.assert_array_equal(out["C"], adata.layers["counts"][4:6])


def _two_datasets():
    obs = pd.DataFrame(
        {"pert": ["control", "A", "control", "B", "A"], "dataset": pd.Categorical(["x", "x", "y", "y", "y"]),
         "batch": [1, 2, 1, 2, 2]},
        index=[f"c{i}" for i in range(5)],
    )
    return ad.AnnData(X=np.arange(15, dtype=np.float32).reshape(5, 3), obs=obs)


def test_select_where_keeps_matching_rows_and_prunes_categories():
    from perturbax.data import parse_where, select_where

    adata = _two_datasets()
    sub = select_where(adata, ["dataset=y"])
    assert sub.obs_names.tolist() == ["c2", "c3", "c4"]
    assert list(sub.obs["dataset"].cat.categories) == ["y"]
    np.testing.assert_array_equal(sub.X, adata.X[2:])
    # one key twice: either value; two keys: both (numbers compared as strings)
    assert select_where(adata, ["dataset=x", "dataset=y", "batch=2"]).obs_names.tolist() == ["c1", "c3", "c4"]
    assert select_where(adata, []) is adata
    assert parse_where(["a=b=c", " k = v "]) == {"a": ["b=c"], "k": ["v"]}


def test_select_where_errors_name_key_value_and_what_exists():
    from perturbax.data import select_where

    adata = _two_datasets()
    with pytest.raises(ValueError, match=r"--where dataset=z: no cell has obs\['dataset'\] == 'z'; values present: 'x', 'y'"):
        select_where(adata, ["dataset=z"])
    with pytest.raises(KeyError, match=r"obs has no column 'datset'; columns: 'pert', 'dataset', 'batch'"):
        select_where(adata, ["datset=x"])
    with pytest.raises(ValueError, match="no cell matches all of them together"):
        select_where(adata, ["dataset=x", "pert=B"])
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        select_where(adata, ["dataset"])


def test_subsets_do_not_warn():
    """Issue 20 (quiet output): selecting cells or genes of an AnnData with categorical obs columns
    does not go through anndata's category pruning under a pandas option deprecated in pandas 3."""
    import warnings

    from perturbax.data import select_where

    adata = _two_datasets()
    adata.obs["pert"] = adata.obs["pert"].astype("category")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sub = select_where(adata, ["dataset=x"])
        cells = cells_by_condition(adata, "pert", "control", genes=["1", "0"])
    assert list(sub.obs["pert"].cat.categories) == ["A", "control"]
    np.testing.assert_array_equal(cells["A"], adata.X[[1, 4]][:, [1, 0]])
