"""Design suggestions: greedy additions that make targets covered."""

import itertools
import json

import numpy as np
import pytest

from perturbax.theory import FAIL, OK, check_design, suggest_additions

E = np.eye(3)
Z = np.zeros(3)


def test_adds_the_missing_single():
    rep = suggest_additions(np.array([[0.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 1.0]]), names=["A", "B"])
    assert rep.additions == ("A",) and rep.candidate_indices == (0,)
    np.testing.assert_array_equal(rep.addition_vectors, [[1.0, 0.0]])
    assert rep.covered_before.tolist() == [False] and rep.covered_after.tolist() == [True]
    assert rep.residual_before[0] == pytest.approx(1 / np.sqrt(2))
    assert rep.residual_after[0] < 1e-12
    assert rep.lower_bound == 1 and rep.minimal
    assert rep.status == OK and "Add A alone" in rep.message


def test_doubles_only_design_needs_one_single_for_two_targets():
    train = np.array([Z, E[0] + E[1], E[1] + E[2]])
    rep = suggest_additions(train, np.array([E[0], E[0] + E[2]]), names=["A", "B", "C"])
    # both residuals are multiples of (1, -1, 1): one addition, ties broken by candidate order
    assert rep.additions == ("A",) and rep.minimal and rep.lower_bound == 1
    assert rep.covered_after.all()
    fixed = check_design(np.vstack([train, rep.addition_vectors]), np.array([E[0], E[0] + E[2]]))
    assert fixed.covered.all()


def test_nothing_to_add():
    rep = suggest_additions(np.array([Z, E[0], E[1]]), np.array([E[0] + E[1]]))
    assert rep.additions == () and rep.status == OK and rep.lower_bound == 0 and rep.minimal
    assert "already covered" in rep.message


def test_lower_bound_can_be_below_unit_vector_optimum():
    # from the control alone, e1+e2 needs two single perturbations, but one double would do
    train = np.array([[0.0, 0.0]])
    singles = suggest_additions(train, [[1.0, 1.0]])
    assert singles.additions == ("e1", "e2")
    assert singles.lower_bound == 1 and not singles.minimal
    double = suggest_additions(train, [[1.0, 1.0]], candidates=[[1.0, 0.0], [1.0, 1.0]])
    assert double.additions == ("e1+e2",) and double.minimal


def test_uncoverable_targets_fail():
    train = np.array([Z, E[0]])
    rep = suggest_additions(train, np.array([E[1], E[2]]), candidates=np.array([E[1]]), names=["A", "B", "C"])
    assert rep.status == FAIL
    assert rep.additions == ("B",)  # B can be covered, C cannot
    assert rep.uncoverable == ("C",)
    assert rep.covered_after.tolist() == [True, False]
    assert "No combination of the candidates covers C" in rep.message
    d = json.loads(rep.to_json())
    assert d["additions"] == ["B"] and d["targets"][1]["covered_after"] is False
    assert "C: not covered" in str(rep)


def test_label_candidates_and_reference():
    rep = suggest_additions(
        ["control", "A"], ["A+B+C"], candidates=["B+C", "B", "C"], names=["A", "B", "C"]
    )
    assert rep.additions == ("B+C",) and rep.minimal


def _covers(train, targets, rows, tol=1e-6):
    return check_design(np.vstack([train, rows]) if len(rows) else train, targets, residual_rtol=tol).covered.all()


@pytest.mark.parametrize("seed", range(6))
def test_greedy_is_irredundant_and_respects_the_bound(seed):
    """Against brute force on small random designs with unit-vector candidates."""
    rng = np.random.default_rng(seed)
    K = 5
    train = np.vstack([np.zeros(K), (rng.random((3, K)) < 0.4) * rng.choice([1.0, 2.0], (3, K))])
    targets = (rng.random((3, K)) < 0.5).astype(float)
    targets[targets.sum(axis=1) == 0, 0] = 1.0
    rep = suggest_additions(train, targets)
    assert rep.status == OK
    added = rep.addition_vectors
    assert _covers(train, targets, added)
    for i in range(len(added)):  # irredundant
        assert not _covers(train, targets, np.delete(added, i, axis=0))
    best = next(
        size
        for size in range(K + 1)
        if any(_covers(train, targets, np.eye(K)[list(c)]) for c in itertools.combinations(range(K), size))
    )
    assert rep.lower_bound <= best <= len(added)
    if rep.minimal:
        assert len(added) == best
