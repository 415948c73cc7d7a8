"""Contexts (cell type, cell line, ...) as label columns: the label grammar, from_anndata, the
design check of (perturbation, context) pairs."""

import numpy as np
import pytest

from perturbax.data import PerturbationRegistry, from_anndata
from perturbax.theory import check_design

REG = PerturbationRegistry(("A", "B"), contexts=(("line", ("x", "y", "z")), ("batch", ("1", "2"))))


def test_registry_columns_and_label_grammar():
    assert REG.names == ("A", "B", "line=y", "line=z", "batch=2") and REG.n_perturbations == 2
    assert REG.context_keys == ("line", "batch")
    v = REG.encode("A+B @ line=z & batch=2")
    np.testing.assert_array_equal(v, [1, 1, 0, 1, 1])
    # spacing, key order and bare values (unambiguous) do not matter; canonical names every key
    assert REG.canonical("B+A@batch=2&z") == "A+B @ line=z & batch=2"
    assert REG.canonical("control @ line=x & batch=1") == "control @ line=x & batch=1" == REG.control_label
    assert REG.canonical("A") == "A @ line=x & batch=1"  # no "@": the reference context
    assert REG.context_of(v) == {"line": "z", "batch": "2"}
    assert REG.perturbation_label(v) == "A+B"
    np.testing.assert_array_equal(REG.context_vector({"line": "y", "batch": "1"}), [0, 0, 1, 0, 0])
    assert len(REG.all_contexts()) == 6
    # the registry survives a rebuild from its full names (as a saved fit does)
    assert PerturbationRegistry(REG.names, contexts=REG.contexts) == REG


@pytest.mark.parametrize("label, match", [
    ("A @ line=w & batch=1", r"'w' is not a category of context 'line'.*Categories: x, y, z"),
    ("A @ lin=z & batch=1", r"context key 'lin'.*Did you mean 'line'"),
    ("A @ line=z", r"leaves context key\(s\) \['batch'\] out.*line=x & batch=1"),
    ("A @ line=z & line=y & batch=1", "names context 'line' twice"),
    ("A @ 3 & batch=1", "'3' is a category of no context key"),
])
def test_label_errors_name_the_value_and_the_fix(label, match):
    with pytest.raises(ValueError, match=match):
        REG.encode(label)


def test_context_label_without_declared_contexts_says_how():
    with pytest.raises(ValueError, match=r"no contexts were declared.*context_keys=\['cell_type'\]"):
        PerturbationRegistry(("A",)).encode("A @ cell_type=CD4T")


def test_from_anndata_pairs_and_round_trip(contexts_adata):
    d = from_anndata(contexts_adata, "perturbation", "control", context_keys=["line"])
    assert d.registry.names == ("A", "B", "line=y", "line=z") and d.context_keys == ("line",)
    assert d.control == "control @ line=x" and d.conditions[d.control_index] == "control @ line=x"
    assert set(d.conditions) == {f"{p} @ line={c}" for p in ("control", "A", "B") for c in "xyz"}
    np.testing.assert_array_equal(d.design[d.condition_index("A @ line=z")], [1, 0, 0, 1])
    assert d.cells_of("control @ z").size == 45
    # obs of to_anndata: the perturbation and the context in their own columns, read back the same way
    a2 = d.to_anndata()
    assert set(a2.obs["perturbation"].astype(str)) == {"control", "A", "B"}
    assert (a2.obs["line"].astype(str).to_numpy() == contexts_adata.obs["line"].to_numpy()).all()
    d2 = from_anndata(a2, "perturbation", "control", context_keys=["line"])
    assert d2.conditions == d.conditions and (d2.env == d.env).all()


def test_single_context_cells_encoded_with_the_fitted_registry(contexts_adata):
    """Cells of one context, read with a fit's registry, keep every context column (the source of
    '0 covariate columns but the model was fitted with 6')."""
    full = from_anndata(contexts_adata, "perturbation", "control", context_keys=["line"])
    only_z = contexts_adata[contexts_adata.obs["line"] == "z"]
    own = from_anndata(only_z, "perturbation", "control", context_keys=["line"])
    assert own.registry.contexts == (("line", ("z",)),) and own.K == 2
    d = from_anndata(only_z, "perturbation", "control", registry=full.registry, require_control=False)
    assert d.registry == full.registry and d.K == 4
    np.testing.assert_array_equal(d.design[d.condition_index("B @ line=z")], [0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"contexts.*from_anndata\(\.\.\., registry="):
        own.with_registry(full.registry)
    bad = contexts_adata.copy()
    bad.obs["line"] = bad.obs["line"].replace("z", "w")
    with pytest.raises(ValueError, match=r"\['w'\] that the fitted model never saw as a context"):
        from_anndata(bad, "perturbation", "control", registry=full.registry)


def test_check_design_reports_context_transfer(contexts_adata):
    d = from_anndata(contexts_adata, "perturbation", "control", context_keys=["line"])
    train = d.select(["A @ line=z"], exclude=True)
    rep = check_design(train.design, ["A @ line=z", "A @ line=y", "A+B @ line=z"], registry=d.registry)
    held, seen, combo = rep.tests
    assert held.covered and held.context_transfer and not held.measured
    assert "never measured" in held.message and "additive model" in held.message
    assert "interpolation" not in held.message.replace("not interpolation", "")
    assert held.extrapolation and held.to_dict()["context_transfer"] is True
    assert seen.measured and not seen.context_transfer
    assert combo.covered and combo.context_transfer
    # without the control of z nothing moves A into z: not identified
    no_ctrl = d.select(["A @ line=z", "B @ line=z", "control @ line=z"], exclude=True)
    assert not check_design(no_ctrl.design, ["A @ line=z"], registry=d.registry).tests[0].covered


def test_check_design_never_measured_perturbation_in_a_context(contexts_adata):
    d = from_anndata(contexts_adata, "perturbation", "control", context_keys=["line"])
    rep = check_design(d.design, ["C @ line=z", "A+C @ line=y"], registry=d.registry)
    assert [t.covered for t in rep.tests] == [False, False] and rep.unmeasured == ("C",)
    assert all("never measured" in t.message for t in rep.tests)
