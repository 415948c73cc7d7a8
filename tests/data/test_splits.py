"""Splits by condition (holdout, norman-doubles folds, GEARS-style) and the Norman 2019 loader."""

import dataclasses

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbax.data import from_anndata
from perturbax.data.datasets import NORMAN19_FILE, find_data_file, load_norman19
from perturbax.data.splits import (
    Split,
    gears_split,
    holdout_split,
    norman_doubles_folds,
    split_from_column,
)

CONDITIONS = ["control", "A", "B", "C", "D", "A+B", "A+C", "C+B", "C+D", "A+E", "E+F"]


def _adata(conditions=CONDITIONS, n=5, genes=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(conditions, n)
    obs = pd.DataFrame({"pert": pd.Categorical(labels)}, index=[f"c{i}" for i in range(labels.size)])
    return ad.AnnData(X=rng.normal(size=(labels.size, genes)).astype(np.float32), obs=obs,
                      var=pd.DataFrame(index=[f"g{j}" for j in range(genes)]))


@pytest.fixture(scope="module")
def data():
    return from_anndata(_adata(), "pert", "control")


def _cells(pd_data):
    return set(pd_data.cell_names)


# ------------------------------------------------------------------------------- holdout
def test_holdout_any_spelling_and_disjoint_cover(data):
    split = holdout_split(data, ["B+A", {"C": 1.0, "D": 1.0}])
    assert isinstance(split, Split)
    assert split.test_labels == ("A+B", "C+D")
    assert dict(split.test_groups) == {"A+B": "holdout", "C+D": "holdout"}
    assert set(split.test.conditions) == {"A+B", "C+D"}
    assert "A+B" not in split.train.conditions and "control" in split.train.conditions
    assert _cells(split.train) | _cells(split.test) == set(data.cell_names)
    assert not _cells(split.train) & _cells(split.test)
    assert split.test.n_cells == 10
    # same registry on both sides: label vectors mean the same thing
    assert split.train.registry == split.test.registry == data.registry


def test_holdout_single_label_and_duplicates(data):
    split = holdout_split(data, "A+B")
    assert split.test_labels == ("A+B",)
    assert holdout_split(data, ["A+B", "B+A"]).test_labels == ("A+B",)


def test_holdout_errors_name_the_label(data):
    with pytest.raises(KeyError, match="'A\\+D' has zero cells"):
        holdout_split(data, ["A+B", "A+D"])
    with pytest.raises(KeyError, match="Unknown perturbation 'Z'"):
        holdout_split(data, "Z")
    with pytest.raises(ValueError, match="control"):
        holdout_split(data, "control")
    with pytest.raises(ValueError, match="empty"):
        holdout_split(data, [])


def test_split_is_frozen(data):
    split = holdout_split(data, "A+B")
    with pytest.raises(dataclasses.FrozenInstanceError):
        split.name = "x"
    with pytest.raises(TypeError):
        split.test_groups["A+C"] = "holdout"
    assert split.groups() == {"holdout": ["A+B"]}
    with pytest.raises(KeyError, match="no test group 'combo_seen2'"):
        split.labels_in("combo_seen2")


# ------------------------------------------------------------------------ norman doubles
def test_norman_doubles_folds_protocol(data):
    doubles = sorted(["A+B", "A+C", "B+C", "C+D", "A+E", "E+F"])
    folds = norman_doubles_folds(data, n_folds=4)
    assert len(folds) == 4
    for k, split in enumerate(folds):
        expected = [d for i, d in enumerate(doubles) if i % 4 == k]
        assert list(split.test_labels) == expected
        assert set(split.train.conditions) == set(data.conditions) - set(expected)
        assert split.name == f"norman-doubles/fold{k}"
    held = [lab for s in folds for lab in s.test_labels]
    assert sorted(held) == doubles  # each double held out exactly once
    groups = {lab: g for s in folds for lab, g in s.test_groups.items()}
    # singles measured: A, B, C, D; E and F never alone
    assert groups == {"A+B": "combo_seen2", "A+C": "combo_seen2", "B+C": "combo_seen2",
                      "C+D": "combo_seen2", "A+E": "combo_seen1", "E+F": "combo_seen0"}


def test_norman_doubles_errors(data):
    with pytest.raises(ValueError, match="n_folds=7 is larger than the number of doubles \\(6\\)"):
        norman_doubles_folds(data, n_folds=7)
    with pytest.raises(ValueError, match="positive integer"):
        norman_doubles_folds(data, n_folds=0)
    singles_only = from_anndata(_adata(["control", "A", "B"]), "pert", "control")
    with pytest.raises(ValueError, match="no double perturbations"):
        norman_doubles_folds(singles_only)
    no_control = from_anndata(_adata(["A", "B", "A+B"]), "pert", "control", require_control=False)
    with pytest.raises(ValueError, match="needs control cells"):
        norman_doubles_folds(no_control, n_folds=1)


# ---------------------------------------------------------------------------------- GEARS
@pytest.fixture(scope="module")
def big():
    names = [f"G{i}" for i in range(10)]
    conds = ["control", *names, "X+G0"]  # X is never measured alone
    rng = np.random.default_rng(1)
    pairs = set()
    while len(pairs) < 20:
        i, j = sorted(rng.choice(10, size=2, replace=False))
        pairs.add(f"{names[i]}+{names[j]}")
    return from_anndata(_adata(conds + sorted(pairs), n=3), "pert", "control")


def test_gears_split_rules(big):
    split = gears_split(big, seed=3, unseen_single_fraction=0.3, seen2_test_fraction=0.25)
    reg = big.registry
    unseen = {lab for lab, g in split.test_groups.items() if g == "single_unseen"}
    assert len(unseen) == 3  # 30% of the 10 measured singles
    seen = {c for c in split.train.conditions if len(reg.components(c)) == 1}
    assert seen.isdisjoint(unseen) and len(seen) == 7
    # no training cell carries a held-out single, X (never alone) never trains
    for c in split.train.conditions:
        assert not set(reg.components(c)) & (unseen | {"X"})
    # every combination is classified by the number of its components seen alone in training
    for c in big.conditions:
        comps = reg.components(c)
        if len(comps) == 2:
            k = sum(n in seen for n in comps)
            if k < 2:
                assert split.test_groups[c] == f"combo_seen{k}"
    n_seen2_all = sum(
        1 for c in big.conditions
        if len(reg.components(c)) == 2 and all(n in seen for n in reg.components(c))
    )
    n_seen2_test = sum(g == "combo_seen2" for g in split.test_groups.values())
    assert n_seen2_test == round(0.25 * n_seen2_all) and n_seen2_test >= 1
    assert split.test_groups["G0+X"] in ("combo_seen0", "combo_seen1")
    assert _cells(split.train) | _cells(split.test) == set(big.cell_names)


def test_gears_split_deterministic_by_seed(big):
    a = gears_split(big, seed=0)
    b = gears_split(big, seed=0)
    assert dict(a.test_groups) == dict(b.test_groups)
    others = {tuple(gears_split(big, seed=s).test_groups) for s in range(1, 6)}
    assert len(others | {tuple(a.test_groups)}) > 1


def test_gears_split_argument_errors(big):
    with pytest.raises(ValueError, match="unseen_single_fraction must be in \\[0, 1\\)"):
        gears_split(big, seed=0, unseen_single_fraction=1.0)
    with pytest.raises(ValueError, match="seen2_test_fraction"):
        gears_split(big, seed=0, seen2_test_fraction=-0.1)
    only_seen2 = gears_split(big, seed=0, unseen_single_fraction=0.0)
    assert set(only_seen2.test_groups.values()) <= {"combo_seen2", "combo_seen1", "combo_seen0"}


# ------------------------------------------------------------------------- from a column
def test_split_from_column():
    adata = _adata(["control", "A", "B", "A+B"], n=4)
    adata.obs["split"] = np.where(adata.obs["pert"].astype(str) == "A+B", "test", "train")
    split = split_from_column(adata, "pert", "control")
    assert split.test_labels == ("A+B",) and split.test_groups["A+B"] == "combo_seen2"
    assert split.train.n_cells == 12
    adata.obs["split"] = "validation"
    with pytest.raises(ValueError, match="'validation'"):
        split_from_column(adata, "pert", "control")
    with pytest.raises(KeyError, match="column \\(split_key\\) 'spilt'"):
        split_from_column(adata, "pert", "control", split_key="spilt")


# ------------------------------------------------------------------------------- Norman 19
def test_load_norman19_and_doubles_protocol():
    adata = load_norman19()
    assert (adata.obs["dataset"].astype(str) == "norman19").all()
    assert adata.n_vars == 500 and adata.n_obs == 3375
    data = from_anndata(adata, "condition", "control")
    n_comp = np.count_nonzero(data.design, axis=1)
    assert (n_comp == 1).sum() == 18 and (n_comp == 2).sum() == 15 and (n_comp == 0).sum() == 1
    folds = norman_doubles_folds(data)
    seen2 = sorted(lab for s in folds for lab, g in s.test_groups.items() if g == "combo_seen2")
    assert seen2 == ["KLF1+MAP2K6", "KLF1+TGFBR2", "MAP2K3+MAP2K6", "MAP2K3+SLC38A2", "MAPK1+TGFBR2"]
    assert [len(s.test_labels) for s in folds] == [3, 3, 3, 3, 3]


def test_missing_data_file_errors_say_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="PROVENANCE"):
        load_norman19(tmp_path)
    with pytest.raises(FileNotFoundError, match="PERTURBAX_DATA_DIR"):
        find_data_file("no_such_file.h5ad")
    assert find_data_file(NORMAN19_FILE).name == NORMAN19_FILE
