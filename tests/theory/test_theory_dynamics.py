"""Dynamics-level checks: contexts, sufficient variability, intervention targets, B/S <-> W."""

import json

import numpy as np
import pytest

from perturbax.data import simulate_latent_dynamics
from perturbax.theory import (
    FAIL,
    OK,
    WARNING,
    bs_to_w,
    check_dynamics,
    check_order_from_effects,
    check_targets,
    check_variability,
    count_contexts,
    dynamics_context_moments,
    equivalent_bs,
    natural_parameters,
    w_to_bs,
)

# 2 programs, 5 contexts: reference, two mean shifts, two variance changes
MEANS = np.array([[0, 0], [1, 0], [0, 1], [0, 0], [0, 0]], dtype=float)
VARS = np.array([[1, 1], [1, 1], [1, 1], [2, 1], [1, 2]], dtype=float)


def test_full_sufficient_variability():
    rep = check_variability(means=MEANS, variances=VARS, independent=True)
    # differences of eta = [m/v, -1/(2v)] are e1, e2, 0.25 e3, 0.25 e4
    assert rep.condition == "full" and rep.status == OK
    assert rep.identified_up_to == "permutation and scaling"
    assert rep.rank == 4 == rep.required and rep.mean_rank == 2
    np.testing.assert_allclose(rep.singular_values, [1, 1, 0.25, 0.25], atol=1e-12)
    assert rep.variance_varies.tolist() == [True, True]
    same = check_variability(natural_parameters(MEANS, VARS))
    assert same.condition == "full" and same.rank == 4
    # without the independence premise (not checked) the rank alone claims no more than an affine map
    assert same.status == WARNING and same.independent is None and same.identified_up_to == "affine map at best"
    assert "not checked" in same.message and "permutation and scaling" not in same.identified_up_to


def test_mean_only_is_the_weaker_case():
    means = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [2, 1]], dtype=float)
    rep = check_variability(means=means, variances=np.ones_like(means))
    assert rep.condition == "mean_only" and rep.status == WARNING
    assert rep.rank == 2 and rep.mean_rank == 2
    assert not rep.variance_varies.any()
    assert "weaker" in rep.message and "variances are the same in every context" in rep.message
    # every missing direction is a variance coordinate
    for d in rep.missing_directions:
        assert all(k.startswith("-1/2v") for k in d)
    only_means = check_variability(means=means)
    assert only_means.condition == "mean_only" and only_means.means_only_input


def test_variance_changing_for_one_program_only():
    rep = check_variability(means=MEANS[:4], variances=VARS[:4], program_names=["p", "q"])
    assert rep.rank == 3 and rep.condition == "mean_only"
    assert "the variance of q never changes" in rep.message
    assert json.loads(rep.to_json())["variance_varies"] == {"p": True, "q": False}


def test_insufficient_variability():
    means = np.array([[0, 0], [1, 0], [2, 0]], dtype=float)
    rep = check_variability(means=means, variances=np.ones_like(means))
    assert rep.condition == "insufficient" and rep.status == FAIL
    assert rep.mean_rank == 1 and rep.mean_varies.tolist() == [True, False]
    assert "z2 never move" in rep.message


def test_variability_input_errors():
    with pytest.raises(ValueError, match="variances must be > 0"):
        check_variability(means=MEANS, variances=-VARS)
    with pytest.raises(ValueError, match="negative"):
        check_variability(np.ones((3, 4)))
    with pytest.raises(ValueError, match="Give natural_params"):
        check_variability()


def test_count_contexts():
    design = np.array([[0, 0], [0, 0], [1, 0], [1, 0], [1, 0], [0, 1]], dtype=float)
    times = np.array([0, 0, 1, 2, 2, 1], dtype=float)
    rep = count_contexts(design, times, names=["A", "B"], latent_dim=2)
    assert rep.n_contexts == 4 and rep.n_perturbations == 3 and rep.n_times == 3
    assert rep.contexts == (("control", 0.0), ("A", 1.0), ("B", 1.0), ("A", 2.0))
    assert rep.control_present and rep.n_crossed == 1
    assert rep.required_full == 5 and rep.status == WARNING  # 4 >= l+1 = 3 but < 2l+1 = 5
    assert "crossing" in rep.message
    assert count_contexts(design, times, latent_dim=1).status == OK
    assert count_contexts(design, times, latent_dim=4).status == FAIL
    assert count_contexts(design).n_contexts == 3  # no time axis
    no_ctrl = count_contexts(design[2:], times[2:])
    assert not no_ctrl.control_present and no_ctrl.status == WARNING
    with pytest.raises(ValueError, match="one time per row"):
        count_contexts(design, times[:3])


def test_time_alone_gives_few_contexts():
    rep = count_contexts(np.zeros((4, 1)), [0, 1, 2, 3], latent_dim=3)
    assert rep.n_contexts == 4 and rep.status == WARNING
    assert "Time alone gives only T+1 contexts" in rep.message


def test_targets_never_and_always_together():
    S = np.array([[1.0, 0, 0], [0.7, 0, 0], [0, 0, 0]])
    rep = check_targets(S, control_present=True)
    assert rep.untargeted == ("z3",)
    assert rep.always_together == (("z1", "z2"),)
    assert rep.status == FAIL
    assert "z3 is never targeted" in rep.message and "always targeted together" in rep.message


def test_targets_with_a_design():
    S = np.array([[1.0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]])  # A -> z1, z2; B -> z1; C -> z3
    names = ["A", "B", "C"]
    ok = check_targets(S, ["control", "A", "B", "C"], names=names)
    assert ok.status == OK and ok.control_present and ok.targeted.all()
    assert ok.incidence.tolist() == [[False] * 3, [True, True, False], [True, False, False], [False, False, True]]
    together = check_targets(S, ["control", "A", "C"], names=names)
    assert together.always_together == (("z1", "z2"),) and together.status == FAIL
    no_ctrl = check_targets(S, ["A", "B", "C"], names=names)
    assert no_ctrl.control_present is False and no_ctrl.status == FAIL
    assert check_targets(S).status == WARNING  # control presence unknown


def test_check_dynamics_combines():
    design = np.vstack([np.zeros(2), np.eye(2), np.eye(2)])
    times = [0, 1, 1, 2, 2]
    S = np.eye(2)
    rep = check_dynamics(design, times, targets=S, means=MEANS, covariances=np.stack([np.diag(v) for v in VARS]))
    assert rep.status == OK and rep.variability.independent
    assert rep.contexts.n_contexts == 5 and rep.contexts.latent_dim == 2
    assert rep.variability.condition == "full" and rep.targets.status == OK
    d = json.loads(rep.to_json())
    assert d["variability"]["condition"] == "full"
    assert "Dynamics check: OK" in str(rep)
    worse = check_dynamics(design[:3], times[:3], targets=np.array([[1.0, 0], [1.0, 0]]))
    assert worse.status == FAIL


def test_bs_w_conversions():
    B = np.array([[0.0, 0.0], [0.5, 0.0]])
    S = np.eye(2)
    W = bs_to_w(B, S)
    np.testing.assert_allclose(W, [[1.0, 0.0], [0.5, 1.0]])
    B0, S0 = w_to_bs(W)
    np.testing.assert_allclose(B0, 0) and np.testing.assert_allclose(S0, W)
    B1, S1 = equivalent_bs(B, S, np.array([[0.0, 0.0], [-1.0, 0.0]]))
    np.testing.assert_allclose(S1, [[1.0, 0.0], [1.5, 1.0]])
    np.testing.assert_allclose(bs_to_w(B1, S1), W)
    with pytest.raises(np.linalg.LinAlgError, match="singular"):
        bs_to_w(np.eye(2), S)
    with pytest.raises(ValueError, match="square"):
        bs_to_w(np.zeros((2, 3)), S)


def test_bs_to_w_is_differentiable_in_jax():
    import jax
    import jax.numpy as jnp

    B = jnp.array([[0.0, 0.0], [0.5, 0.0]])
    S = jnp.eye(2)
    W = bs_to_w(B, S)
    assert isinstance(W, jax.Array)
    # dW = W dB W, so d W[1, 0] / d B[i, j] = W[1, i] W[j, 0] with W = [[1, 0], [0.5, 1]]
    g = jax.grad(lambda b: bs_to_w(b, S)[1, 0])(B)
    np.testing.assert_allclose(np.asarray(g), [[0.5, 0.25], [1.0, 0.5]], atol=1e-6)


def test_check_order_from_effects_needs_a_sole_target_per_program():
    """Issue 16 item 4: every program targeted is not enough to read the order from W; each
    program needs a perturbation that targets it alone."""
    dense = np.array([[1.0, 0.5, 0.0], [0.3, 1.0, 0.4], [0.0, 0.2, 1.0]])
    rep = check_order_from_effects(dense, program_names=["a", "b", "c"])
    assert rep.status == FAIL and not rep.identified and rep.missing == ("a", "b", "c")
    assert rep.sole_target == (-1, -1, -1) and "NOT identified" in rep.message
    assert check_targets(dense, control_present=True).status == OK  # the targeting condition holds
    single = np.hstack([dense[:, :2], np.diag([2.0, -1.0, 0.0]), dense[:, 2:]])  # sole targets of a and b
    rep2 = check_order_from_effects(single)
    assert rep2.status == FAIL and rep2.sole_target == (2, 3, -1) and rep2.missing == ("z3",)
    ok = check_order_from_effects(np.hstack([single, [[0.0], [0.0], [0.7]]]))
    assert ok.status == OK and ok.identified and ok.sole_target == (2, 3, 6)
    assert json.loads(ok.to_json())["sole_target"] == {"z1": 2, "z2": 3, "z3": 6}
    assert "Causal order from W: OK" in ok.render()
    with pytest.raises(ValueError, match="n_programs, K"):
        check_order_from_effects(np.ones(3))


def _dynamics_design():
    """The training contexts of benchmarks/dynamics.py: control, 4 singles and the training doubles,
    each at 5 times; 4 programs with every edge j -> i."""
    _, truth = simulate_latent_dynamics(n_programs=4, n_perturbations=4, edge_prob=1.0, n_cells=2, n_genes=3, seed=0)
    times = (0.25, 0.5, 1.0, 2.0, 3.0)
    labels = [lab for lab in truth.train_labels for _ in times]
    ts = np.array([t for _ in truth.train_labels for t in times])
    design = np.stack([truth.label_vector(lab) for lab in labels])
    return truth, labels, design, ts


def test_variability_verdict_for_the_dynamics_model_needs_independent_programs():
    """Issue 16 item 6: the rank-2l condition met by the latent dynamics model's contexts does not
    identify its programs up to permutation and scaling: they are correlated within a context."""
    truth, labels, design, ts = _dynamics_design()
    # relaxing dynamics (as in the benchmark): the variances change over time and reach rank 2l ...
    means = np.stack([truth.latent_mean(lab, t) for lab, t in zip(labels, ts)])
    covs = np.stack([truth.expm(t) @ truth.Sigma_0 @ truth.expm(t).T for t in ts])  # relaxing, no diffusion
    variances = np.diagonal(covs, axis1=1, axis2=2)
    rep = check_variability(means=means, variances=variances)
    assert rep.rank == 8 and rep.condition == "full"
    assert "permutation and scaling" not in rep.message.split("which would")[0]
    assert rep.status == WARNING and "affine map at best" in rep.message
    # ... but the programs are strongly correlated within each context: the premise fails
    rep = check_variability(means=means, covariances=covs)
    assert rep.independent is False and rep.max_correlation > 0.5
    assert rep.identified_up_to == "affine map at best" and "NOT independent" in rep.message
    m2, c2 = dynamics_context_moments(truth.B, truth.S, truth.mu, truth.Sigma_0, design, ts, heterogeneity="relaxing")
    np.testing.assert_allclose(m2, means, atol=1e-10)
    np.testing.assert_allclose(c2, covs, atol=1e-10)
    # the default (persistent) dynamics: only the means move, the affine class at best
    m, c = dynamics_context_moments(truth.B, truth.S, truth.mu, truth.Sigma_0, design, ts)
    dyn = check_dynamics(design, ts, latent_dim=4, targets=truth.S, means=m, covariances=c)
    assert dyn.variability.condition == "mean_only" and dyn.variability.identified_up_to == "affine map at best"
    assert "permutation and scaling" not in dyn.message


def test_variability_verdict_claims_permutation_and_scaling_when_the_premises_hold():
    """Independent programs whose means and variances vary in all 2l directions."""
    covs = np.stack([np.diag(v) for v in VARS])
    rep = check_variability(means=MEANS, covariances=covs)
    assert rep.status == OK and rep.independent and rep.max_correlation == 0.0
    assert rep.identified_up_to == "permutation and scaling" and "permutation and scaling" in rep.message
    covs[3, 0, 1] = covs[3, 1, 0] = 0.5  # one correlated context breaks the premise
    bad = check_variability(means=MEANS, covariances=covs)
    assert bad.status == WARNING and bad.independent is False and bad.identified_up_to == "affine map at best"
    assert "programs independent given the context: NO" in bad.render()
    with pytest.raises(ValueError, match="covariances"):
        check_variability(means=MEANS, variances=VARS, covariances=covs)


def test_check_order_design_before_a_fit():
    from perturbax.theory import check_order_design

    names = ["A", "B", "C"]
    # two perturbations measured (alone or together) for three programs: the order cannot be identified
    rep = check_order_design(["control", "A", "B", "A+B"], 3, names=names)
    assert rep.status == "fail" and not rep.identified and "NOT identified by the design" in rep.message
    # B and C only ever together: only A's own effect is identified
    rep = check_order_design(["control", "A", "B+C"], 3, names=names)
    assert rep.status == "fail" and "effects of 1 elementary perturbation(s) (A)" in rep.message
    # three singles: identified only under the sole-target assumption, which the design cannot show
    rep = check_order_design(["control", "A", "B", "C"], 3, names=names)
    assert rep.status == "warning" and not rep.identified and "sole direct target" in rep.message
    # with the targets' support: sole targets -> ok; C hits programs 1 and 3 and nothing hits 3 alone -> fail
    sole = np.eye(3, dtype=bool)
    assert check_order_design(["control", "A", "B", "C"], 3, names=names, targets=sole).status == "ok"
    multi = sole.copy()
    multi[0, 2] = True
    rep = check_order_design(["control", "A", "B", "C"], 3, names=names, targets=multi)
    assert rep.status == "fail" and rep.missing == ("z3",)
