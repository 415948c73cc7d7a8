"""Design-level coverage checks against hand-derived answers."""

import dataclasses
import json
import math

import numpy as np
import pytest
import scipy.sparse as sp

from perturbax.data.labels import PerturbationRegistry
from perturbax.theory import FAIL, OK, WARNING, check_design

E = np.eye(3)
ZERO = np.zeros(3)


def test_singles_cover_midpoint_and_extrapolation():
    train = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    rep = check_design(train, np.array([[0.5, 0.5], [2.0, -1.0]]), names=["A", "B"])
    mid, ext = rep.tests
    assert rep.rank == 2 and rep.full_rank
    assert rep.identified_elementary == ("A", "B")
    assert mid.covered and mid.relative_residual < 1e-12
    assert mid.coefficients == pytest.approx({"A": 0.5, "B": 0.5})
    assert mid.in_convex_hull is True and not mid.extrapolation
    assert ext.covered and ext.coefficients == pytest.approx({"A": 2.0, "B": -1.0})
    assert ext.in_convex_hull is False and ext.extrapolation
    assert "outside the convex hull" in ext.message
    assert rep.status == WARNING  # all covered, one needs extrapolation
    assert rep.extrapolating == ("A:2+B:-1",)


def test_sum_of_singles_is_outside_the_convex_hull():
    # e1 + e2 = 1*(e1) + 1*(e2): covered, coefficients in [0, 1] but summing to 2
    rep = check_design(np.array([ZERO[:2], [1, 0], [0, 1]]), ["e1+e2"])
    (t,) = rep.tests
    assert t.covered and t.coefficients == pytest.approx({"e1": 1.0, "e2": 1.0})
    assert t.in_convex_hull is False


def test_missing_direction_and_suggestion():
    rep = check_design(np.array([[0.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 1.0]]), names=["A", "B"])
    (t,) = rep.tests
    assert not t.covered
    assert t.residual == pytest.approx(1.0)  # the e1 component
    assert t.relative_residual == pytest.approx(1 / math.sqrt(2))
    assert t.missing_direction == pytest.approx({"A": 1.0})
    assert t.suggested_additions == ("A",)
    assert t.coefficients is None and t.in_convex_hull is False
    assert t.verdict == "not identified" and t.unmeasured == ("A",)
    assert "A was never measured" in t.message and "measure it alone" in t.message
    assert rep.unidentified_elementary == ("A",) and rep.identified_elementary == ("B",)
    assert rep.status == FAIL


def test_doubles_only_design():
    train = np.array([ZERO, E[0] + E[1], E[1] + E[2]])
    tests = np.array([E[0] + 2 * E[1] + E[2], E[0], E[0] + E[2]])
    rep = check_design(train, tests, names=["A", "B", "C"])
    combo, single, pair = rep.tests
    assert rep.rank == 2 and rep.identified_elementary == ()
    assert combo.covered and combo.coefficients == pytest.approx({"A+B": 1.0, "B+C": 1.0})
    # the row space misses n = (1, -1, 1)/sqrt(3): residual of e1 is 1/sqrt(3), of e1+e3 is 2/sqrt(3)
    assert not single.covered and single.residual == pytest.approx(1 / math.sqrt(3))
    assert not pair.covered and pair.residual == pytest.approx(2 / math.sqrt(3))
    s = 1 / math.sqrt(3)
    for t in (single, pair):
        assert t.missing_direction == pytest.approx({"A": s, "B": -s, "C": s})
        assert t.suggested_additions == ("A",)  # any one single closes the gap; A is in the test
        assert "never separates" in t.message
    # the test's own perturbations are preferred among equally good additions
    c_only = check_design(train, [E[2]], names=["A", "B", "C"]).tests[0]
    assert c_only.suggested_additions == ("C",)
    assert c_only.missing_direction == pytest.approx({"A": s, "B": -s, "C": s})  # (e3 . n) n, n = (1,-1,1)/sqrt3
    assert rep.uncovered == ("A", "A+C")


def test_doses_one_third_decided_exactly():
    third = 1.0 / 3.0
    train = np.array([ZERO[:2], [third, 1.0], [0.0, 1.0]])
    rep = check_design(train, np.array([[1.0, 0.0], [third, 0.0], [2.0, 5.0]]))
    assert rep.rank == 2
    e1, e1_third, mix = rep.tests
    assert all(t.covered for t in rep.tests)
    assert all(t.relative_residual < 1e-14 for t in rep.tests)
    # e1 = 3 * ((1/3) e1 + e2) - 3 * e2
    assert e1.coefficients == pytest.approx({"e1:0.333333+e2": 3.0, "e2": -3.0})
    assert e1_third.coefficients == pytest.approx({"e1:0.333333+e2": 1.0, "e2": -1.0})
    assert mix.coefficients == pytest.approx({"e1:0.333333+e2": 6.0, "e2": -1.0})


def test_small_dose_decided_at_the_stated_tolerance():
    # e1 is at relative distance 1e-3/sqrt(1 + 1e-6) from span{e1 + 1e-3 e2}
    train = np.array([[0.0, 0.0], [1.0, 1e-3]])
    expected = 1e-3 / math.sqrt(1 + 1e-6)
    strict = check_design(train, np.array([[1.0, 0.0], [1e-3, 1e-6]]))
    assert strict.tests[0].relative_residual == pytest.approx(expected, rel=1e-9)
    assert not strict.tests[0].covered  # 1e-3 > residual_rtol = 1e-6
    assert strict.tests[1].covered  # 1e-3 * (e1 + 1e-3 e2) lies on the line
    assert strict.tests[1].coefficients == pytest.approx({"e1+e2:0.001": 1e-3})
    loose = check_design(train, np.array([[1.0, 0.0]]), residual_rtol=1e-2)
    assert loose.tests[0].covered
    # a tiny dose still identifies its perturbation
    rep = check_design(np.array([[0.0, 0.0], [1e-3, 0.0], [0.0, 1.0]]), ["e1+e2"])
    assert rep.full_rank and rep.tests[0].coefficients == pytest.approx({"e1:0.001": 1000.0, "e2": 1.0})


@pytest.mark.parametrize("method", ["svd", "peel"])
def test_rank_deficient_by_1e10_is_reported_deficient(method):
    train = np.array([ZERO, E[0], E[1], E[0] + E[1] + 1e-10 * E[2]])
    rep = check_design(train, np.array([E[2], E[0] + E[1]]), names=["A", "B", "C"], method=method)
    assert rep.rank == 2 and not rep.full_rank
    assert rep.unidentified_elementary == ("C",)
    assert not rep.tests[0].covered and rep.tests[1].covered
    assert rep.largest_dropped is not None and 0 < rep.largest_dropped < 1e-9
    # the same design at a tolerance below the perturbation has full rank
    assert check_design(train, rtol=1e-12, method=method).rank == 3


def test_random_rank_deficient_plus_noise():
    rng = np.random.default_rng(3)
    low = rng.standard_normal((8, 3)) @ rng.standard_normal((3, 6))
    noisy = low + 1e-10 * rng.standard_normal(low.shape)
    rep = check_design(np.vstack([np.zeros(6), noisy]))
    assert rep.rank == 3
    assert rep.largest_dropped < 1e-8 * rep.singular_values[0] < rep.smallest_retained


def test_duplicate_rows_are_merged():
    train = np.array([ZERO[:2], ZERO[:2], [1, 0], [1, 0], [1, 0], [0, 1], [1, 1]])
    rep = check_design(train, ["e1+e2:2"])
    assert rep.n_rows == 7 and rep.n_distinct_rows == 4
    assert rep.rank == 2
    c = rep.tests[0].coefficients
    assert set(c) <= {"e1", "e2", "e1+e2"}  # one coefficient per distinct label
    # the minimum-norm representation over e1, e2, e1+e2 of (1, 2): c = (0, 1, 1)
    assert c == pytest.approx({"e2": 1.0, "e1+e2": 1.0})
    single = check_design(train[[0, 2, 5, 6]], ["e1+e2:2"]).tests[0].coefficients
    assert single == pytest.approx(c)


def test_dependent_rows_use_linear_program_for_the_hull():
    train = np.array([ZERO[:2], [1, 0], [0, 1], [1, 1]])
    rep = check_design(train, ["e1+e2", "e1:2"])
    both, double = rep.tests
    # minimum norm: (1/3, 1/3, 2/3) sums to 4/3, but e1+e2 itself was measured
    assert both.coefficients == pytest.approx({"e1": 1 / 3, "e2": 1 / 3, "e1+e2": 2 / 3})
    assert both.in_convex_hull is True and both.hull_coefficients == pytest.approx({"e1+e2": 1.0})
    assert double.in_convex_hull is False and double.hull_coefficients is None


def test_declared_reference_row():
    reg = PerturbationRegistry(("A", "B", "C"))
    rep = check_design(["A", "A+B", "A+C"], ["A+B+C", "control"], registry=reg, reference=0)
    full, ctrl = rep.tests
    assert rep.reference == "A" and rep.control_present
    assert full.covered and full.coefficients == pytest.approx({"A+B": 1.0, "A+C": 1.0})
    # control - A = -e_A: the test lacks the direction -A
    assert not ctrl.covered and ctrl.missing_direction == pytest.approx({"A": -1.0})
    assert ctrl.suggested_additions == ("A:2",)  # a row differing from the reference in A only
    assert rep.identified_elementary == ("B", "C")


def test_missing_control_is_a_warning():
    rep = check_design(np.array([[1.0, 0.0], [0.0, 1.0]]), [[0.5, 0.5]])
    assert not rep.control_present
    assert rep.status == WARNING and "not among the training rows" in rep.message
    t = rep.tests[0]
    # without a measured control the hull needs coefficients summing to exactly 1
    assert t.covered and t.in_convex_hull is True


def test_latent_dimension_check():
    train = np.array([ZERO, E[0], E[1]])
    assert check_design(train, latent_dim=2).latent_dim_ok is True
    bad = check_design(train, latent_dim=3)
    assert bad.latent_dim_ok is False and bad.status == FAIL and "latent dimension 3" in bad.message


def test_status_without_tests():
    assert check_design(np.array([ZERO, E[0], E[1], E[2]])).status == OK
    assert check_design(np.array([ZERO, E[0], E[1]])).status == WARNING


def test_label_strings_and_errors():
    rep = check_design(["control", "A", "B:0.5"], ["A+B", "B:2"], names=["A", "B", "C"])
    assert [t.covered for t in rep.tests] == [True, True]
    assert rep.tests[1].coefficients == pytest.approx({"B:0.5": 4.0})
    # a name the design never measured is a verdict, not an error
    ax = check_design(["control", "A"], ["A+X"], names=["A", "B"]).tests[0]
    assert not ax.covered and ax.unmeasured == ("X",) and "X was never measured" in ax.message
    with pytest.raises(ValueError, match="names"):
        check_design(["control", "A"], ["A"])
    with pytest.raises(ValueError, match="columns"):
        check_design(np.zeros((2, 3)), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        check_design(np.array([[0.0, np.nan]]))


def test_report_is_frozen_and_serialises():
    rep = check_design(np.array([ZERO, E[0], E[1]]), [E[0] + E[2]], names=["A", "B", "C"], latent_dim=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rep.rank = 5
    d = json.loads(rep.to_json())
    assert d["schema"] == "perturbax.check_design/1"
    assert d["rank"] == 2 and d["identified_elementary"] == ["A", "B"]
    assert d["tests"][0]["label"] == "A+C" and d["tests"][0]["covered"] is False
    assert d["tests"][0]["missing_direction"] == {"C": 1.0}
    text = str(rep)
    assert "NOT identified  A+C" in text and "rank 2 of 3" in text


def test_max_details_and_on_request_coefficients():
    train = np.array([ZERO, E[0], E[1], E[2]])
    tests = np.array([E[0] + E[1], E[1] + 0.5 * E[2], 3 * E[2]])
    rep = check_design(train, tests, max_details=1)
    assert rep.tests[0].details and rep.tests[0].coefficients is not None
    assert not rep.tests[2].details and rep.tests[2].coefficients is None
    assert all(rep.covered)
    later = rep.coefficients(tests[1:])
    assert later[0] == pytest.approx({"e2": 1.0, "e3": 0.5})
    assert later[1] == pytest.approx({"e3": 3.0})
    assert rep.coefficients([[1.0, 0, 0]])[0] == pytest.approx({"e1": 1.0})


@pytest.mark.parametrize("method", ["svd", "peel"])
def test_direction_reached_only_through_a_tiny_dose_is_ill_conditioned(method):
    # issue 16 item 8: A is measured only at dose 1e-6, so A = 1e6 * (A:1e-6) is covered (identified)
    # but its predicted shift is the measured one blown up a million-fold
    train = ["control", "A:0.000001", "B"]
    rep = check_design(train, ["A", "A+B", "B", "B:0.5"], names=["A", "B"], method=method)
    a, ab, b, half = rep.tests
    assert all(t.covered for t in rep.tests)
    assert a.coefficient_norm == pytest.approx(1e6, rel=1e-6) and a.coefficient_l1 == pytest.approx(1e6, rel=1e-6)
    assert ab.coefficient_norm == pytest.approx(math.sqrt(1e12 + 1), rel=1e-6)
    assert ab.coefficient_l1 == pytest.approx(1e6 + 1, rel=1e-6)
    assert a.ill_conditioned and ab.ill_conditioned and "ill-conditioned" in a.message
    assert b.coefficient_norm == pytest.approx(1.0) and half.coefficient_norm == pytest.approx(0.5)
    assert not b.ill_conditioned and not half.ill_conditioned and "ill-conditioned" not in b.message
    assert rep.ill_conditioned == ("A", "A+B")
    assert rep.status == WARNING and "2 covered test(s) are ill-conditioned" in rep.message
    d = json.loads(rep.to_json())
    assert d["max_coefficient_norm"] == 10.0 and d["n_ill_conditioned"] == 2
    assert d["tests"][0]["ill_conditioned"] is True and d["tests"][0]["coefficient_norm"] == pytest.approx(1e6)
    assert d["tests"][2]["ill_conditioned"] is False
    assert "ILL-CONDITIONED" in rep.render()
    # the limit is a parameter; inf turns the flag off
    assert check_design(train, ["A"], names=["A", "B"], max_coefficient_norm=math.inf).ill_conditioned == ()
    with pytest.raises(ValueError, match="max_coefficient_norm"):
        check_design(train, ["A"], names=["A", "B"], max_coefficient_norm=0)


def test_normal_design_is_well_conditioned():
    train = np.array([ZERO, E[0], E[1], E[2], E[0] + E[1]])
    tests = np.array([0.5 * E[0] + 0.5 * E[1], E[0] + E[1] + E[2], E[1] + E[2]])
    rep = check_design(train, tests, names=["A", "B", "C"])
    assert all(rep.covered) and rep.ill_conditioned == ()
    assert all(t.coefficient_norm is not None and t.coefficient_norm <= math.sqrt(3) + 1e-12 for t in rep.tests)
    assert "ill-conditioned" not in rep.message
    assert check_design(train, tests[:1], names=["A", "B", "C"]).status == OK


def test_coefficient_norm_is_the_least_squares_error_amplification():
    # the minimum-norm coefficients are the weights of the least-squares prediction t^T pinv(D) Y of
    # the test's shift from the measured shifts Y, so ||c||_2 scales an equal per-condition error
    rng = np.random.default_rng(0)
    D = rng.standard_normal((6, 4)) * np.array([1.0, 1.0, 1.0, 1e-3])
    t = rng.standard_normal(4)
    rep = check_design(np.vstack([np.zeros(4), D]), t[None, :])
    (res,) = rep.tests
    c = np.linalg.pinv(D).T @ t
    assert res.coefficient_norm == pytest.approx(np.linalg.norm(c), rel=1e-8)
    assert res.coefficient_l1 == pytest.approx(np.abs(c).sum(), rel=1e-8)
    assert res.ill_conditioned == (np.linalg.norm(c) > 10)
    # unit-free: the same design and test in doses 1000 times smaller have the same coefficients
    small = check_design(np.vstack([np.zeros(4), D * 1e-3]), t[None, :] * 1e-3).tests[0]
    assert small.coefficient_norm == pytest.approx(res.coefficient_norm, rel=1e-8)


def test_elementary_coefficient_norms_at_unit_dose():
    rep = check_design(["control", "A:0.000001", "B", "B+C"], names=["A", "B", "C"])
    norms = rep.elementary_coefficient_norms
    assert norms[0] == pytest.approx(1e6, rel=1e-6) and norms[1] == pytest.approx(1.0)
    assert norms[2] == pytest.approx(math.sqrt(2))  # C = (B+C) - B
    assert rep.ill_conditioned_elementary == ("A",) and "ill-conditioned at unit dose" in rep.render()
    assert rep.status == OK  # the unit dose depends on the dose unit: shown, not a warning
    d = json.loads(rep.to_json())
    assert d["ill_conditioned_elementary"] == ["A"] and d["elementary_coefficient_norms"]["B"] == pytest.approx(1.0)
    unident = check_design(["control", "A"], names=["A", "B"])
    assert unident.to_dict()["elementary_coefficient_norms"] == {"A": pytest.approx(1.0), "B": None}


def test_elementary_coefficient_norms_match_the_explicit_coefficients():
    rng = np.random.default_rng(1)
    low = rng.standard_normal((9, 2)) @ rng.standard_normal((2, 5))  # rank 2 in 5 columns
    L = np.vstack([np.zeros(6), np.c_[low, np.zeros(9)], np.eye(6)[[0, 1]]])  # + e1, e2; column 6 unused
    rep = check_design(L)
    assert rep.method == "svd"
    ident = np.flatnonzero(rep.identified)
    assert rep.rank == 4 and rep.largest_dropped is not None and ident.tolist() == [0, 1]
    explicit = [rep.coefficients([np.eye(6)[k]])[0] for k in ident]
    np.testing.assert_allclose(
        rep.elementary_coefficient_norms[ident], [np.linalg.norm(list(c.values())) for c in explicit], rtol=1e-8
    )
    assert np.isnan(rep.elementary_coefficient_norms[~rep.identified]).all()


def test_simplest_combination_explains_tests_in_training_conditions():
    """Issue 20: a covered test is explained by the fewest training conditions (KLF1+SGK1 =
    KLF1 + SGK1), not only by the minimum-norm weights that spread over dependent conditions."""
    names = ["KLF1", "SGK1", "MAP2K6", "MAP2K3", "TGFBR2", "D"]
    train = ["control", "KLF1", "SGK1", "MAP2K6", "MAP2K3", "KLF1+MAP2K6", "MAP2K3+MAP2K6",
             "KLF1+TGFBR2", "D"]
    rep = check_design(train, ["KLF1+SGK1", "TGFBR2", "KLF1+MAP2K6", "SGK1+MAP2K3+D", "MAP2K6:2"], names=names)
    ks, tg, km, three, dose = rep.tests
    assert ks.simplest == pytest.approx({"KLF1": 1.0, "SGK1": 1.0}) and ks.equation == "KLF1 + SGK1"
    assert len(ks.coefficients) > 2  # the minimum-norm weights use the dependent conditions too
    assert "KLF1+SGK1 = KLF1 + SGK1" in ks.message and "= KLF1 + SGK1" in rep.render()
    assert "minimum-norm weights" in rep.render()
    assert tg.simplest == pytest.approx({"KLF1+TGFBR2": 1.0, "KLF1": -1.0})
    assert tg.equation == "(KLF1+TGFBR2) - KLF1"
    assert km.simplest == pytest.approx({"KLF1+MAP2K6": 1.0}) and "measured training condition" in km.message
    assert three.simplest == pytest.approx({"SGK1": 1.0, "MAP2K3": 1.0, "D": 1.0})
    assert dose.simplest == pytest.approx({"MAP2K6": 2.0}) and dose.equation == "2*MAP2K6"
    # the representation is exact
    for t in rep.tests:
        vec = sum(c * rep.design.registry.encode(lab) for lab, c in t.simplest.items())
        np.testing.assert_allclose(vec, rep.design.registry.encode(t.label), atol=1e-9)
    assert rep.to_dict()["tests"][0]["equation"] == "KLF1 + SGK1"
    assert km.measured and not ks.measured and "measured in training" in rep.render()
    # a declared reference other than the control: terms are differences from it
    ref = check_design(["A", "B", "A+B"], ["A+B:2", "A"], names=["A", "B"], reference="A")
    assert ref.tests[0].equation == "A + 2*(A+B - A)" and ref.tests[1].measured


def test_simplest_coefficients_beyond_pairs():
    from perturbax.theory.sparse import simplest_coefficients

    rng = np.random.default_rng(0)
    D = sp.csr_matrix(rng.normal(size=(12, 8)))
    c_true = np.zeros(12)
    c_true[[1, 4, 7, 9]] = [1.0, -2.0, 0.5, 3.0]
    t = c_true @ D.toarray()
    c = simplest_coefficients(D, t, 1e-9 * np.linalg.norm(t))
    assert c is not None and np.linalg.norm(c @ D.toarray() - t) <= 1e-8 * np.linalg.norm(t)
    assert np.count_nonzero(c) <= 8  # never worse than a basis of the active columns
    # a target outside the span has no representation
    assert simplest_coefficients(D[:3], t, 1e-9 * np.linalg.norm(t)) is None


def test_design_rank_is_reported_apart_from_the_test_verdicts():
    """Issue 20: a rank-deficient design whose tests are all identified does not FAIL; the
    design-level status names the perturbations to add, not vectors."""
    train = ["control", "A", "B", "A+B", "C+D", "E+F"]
    rep = check_design(train, ["A+B", "A:2"], names=list("ABCDEF"))
    assert rep.status != FAIL and rep.n_identified_tests == 2
    assert rep.message.startswith("2 of 2 test perturbations are identified.")
    assert "Design as a whole" in rep.message and "rank 4 of 6" in rep.message
    assert set(rep.design_additions) in ({"C", "E"}, {"C", "F"}, {"D", "E"}, {"D", "F"})
    assert "to identify every one, add:" in rep.render()
    bad = check_design(train, ["C", "A+E"], names=list("ABCDEF"))
    assert bad.status == FAIL and bad.message.startswith("0 of 2 test perturbations are identified; 2 are not: C, A+E.")
    text = bad.render()
    assert "NOT identified  C  " in text and "add C alone" in text and "0.71" not in text
