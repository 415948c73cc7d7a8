"""The causal order read from the transients of condition means (perturbax.inference.transients)."""

import itertools

import numpy as np
import pytest

from perturbax.data import from_anndata, simulate_latent_dynamics
from perturbax.inference.transients import condition_shifts, transient_residual, transient_scores
from perturbax.models.dynamics import causal_order


def _exact_means(p_true, seed=0):
    """Mean shifts ``D Phi(u) S l`` of singles and two doubles at four times, programs ordered as
    ``p_true`` (program j the sole target of perturbation p_true[j], causes first)."""
    from perturbax.inference.transients import _phi

    rng = np.random.default_rng(seed)
    ell = len(p_true)
    B = np.zeros((ell, ell))
    B[np.tril_indices(ell, -1)] = rng.choice([-1, 1], ell * (ell - 1) // 2) * rng.uniform(0.6, 1.2, ell * (ell - 1) // 2)
    S = np.zeros((ell, ell))
    S[np.arange(ell), list(p_true)] = rng.uniform(1.0, 2.0, ell)
    D = rng.normal(size=(ell, ell))
    designs = [np.eye(ell)[k] for k in range(ell)] + [np.eye(ell)[0] + np.eye(ell)[1], np.eye(ell)[1] + np.eye(ell)[2]]
    L, u = [], []
    for lab in designs:
        for t in (0.25, 0.5, 1.0, 2.0, 3.0):
            L.append(lab)
            u.append(t)
    L, u = np.asarray(L), np.asarray(u)
    Y = np.einsum("nij,nj->ni", _phi(B, u), L @ S.T) @ D.T
    return Y, L, u


def test_the_true_order_fits_exact_means_and_the_others_do_not():
    p_true = (2, 0, 1)
    Y, L, u = _exact_means(p_true)
    res = {p: transient_residual(Y, L, u, p) for p in itertools.permutations(range(3))}
    total = float((Y ** 2).sum())
    assert res[p_true] < 1e-8 * total
    assert min(v for p, v in res.items() if p != p_true) > 1e-4 * total


def test_transient_residual_refuses_a_hypothesis_of_the_wrong_size():
    Y, L, u = _exact_means((0, 1, 2))
    with pytest.raises(ValueError, match="3 distinct perturbation columns"):
        transient_residual(Y, L, u, (0, 1))
    with pytest.raises(ValueError, match="3 distinct perturbation columns"):
        transient_residual(Y, L, u, (0, 1, 1))


def test_transient_scores_on_a_simulated_time_course():
    """On a simulated time course (2 programs, 2 perturbations and their double, 5 times), the reading
    ranks the simulator's order first; the bootstrap's set of first hypotheses holds the point best."""
    adata, truth = simulate_latent_dynamics(n_programs=2, n_perturbations=2, times=(0.25, 0.5, 1.0, 2.0, 3.0),
                                            n_cells=60, n_genes=8, seed=0)
    data = from_anndata(adata, "perturbation", "control", time_key="time")
    Y, L, u = condition_shifts(data, 2, time_unit=1.0)
    assert Y.shape == (L.shape[0], 2) and L.shape[1] == 2 and np.all(u > 0)
    sole = [int(np.flatnonzero(np.asarray(truth.S)[:, k])[0]) for k in range(2)]  # program of each perturbation
    program_of = {j: k for k, j in enumerate(sole)}
    true = tuple(program_of[j] for j in causal_order(np.asarray(truth.B)))
    out = transient_scores(data, [(0, 1), (1, 0)], latent_dim=2, time_unit=1.0, bootstrap=3)
    assert set(out["residual"]) == {(0, 1), (1, 0)} and out["bootstrap"] == 3
    assert min(out["residual"], key=out["residual"].get) == true
    assert out["first"][0] == true


def test_condition_shifts_need_times_and_a_control():
    adata, _ = simulate_latent_dynamics(n_programs=2, n_perturbations=2, times=(0.5, 1.0), n_cells=5, n_genes=4,
                                        seed=0)
    data = from_anndata(adata, "perturbation", "control")
    with pytest.raises(ValueError, match="time_key="):
        condition_shifts(data, 2, time_unit=1.0)
