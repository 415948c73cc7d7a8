"""Latent dynamical causal programs (CITE-VAE, arXiv 2605.25581), DESIGN section 2.2.

``l`` latent programs ``z(t)`` evolve after the perturbation is switched on at ``t = 0``:

    z(0) = z_base ~ N(a, Sigma_0)              a = mu (+ V c); the control steady state under the
                                               default heterogeneity="persistent"
    dz/dt = F(z - a) + S l                     F(0) = 0; Jacobian of F = -I + entries on the
                                               causal mask (default: strictly lower triangular)
    x_i ~ likelihood(decoder([z(t_i), s_i]))   each cell a snapshot at its own time t_i

Drift variants (``LatentDynamicsConfig.drift``):

``"linear"`` (the core model)
    ``F(u) = (B - I) u``: an Ornstein-Uhlenbeck process on a latent linear SCM with causal weights
    ``B`` (nonzero only where ``causal_mask`` is 1; by default strictly lower triangular, so
    program ``j`` acts on program ``i`` only if ``j < i``) and targets ``S`` (``l x K``). For an
    acyclic mask ``B`` is nilpotent, ``B - I`` has every eigenvalue ``-1`` and the dynamics are
    stable for EVERY value of ``B``; ``e^{(B-I)t} = e^{-t} sum_{k<l} (tB)^k / k!`` exactly.
    Closed form (``solver="closed_form"``, the default):
    ``z(t) = a + (I - E_t) W l + E_t (z(0) - a)``, ``E_t = e^{(B-I)t}``, ``W = (I - B)^{-1} S``:
    at long times the model is the additive shift model with ``W`` (DESIGN 2.3).
``"neural"``
    ``F(u) = -u + g(u) - g(0)`` where ``g`` is a :class:`CausalMLP`: one small MLP per program
    whose input is masked to the program's parents (row ``i`` of ``causal_mask``), so
    ``dF_i/dz_j = 0`` exactly for every non-parent ``j`` (including ``j = i``): the Jacobian of
    the drift is ``-I`` plus a matrix supported on the causal mask. ``g(u) = B u`` recovers the
    linear model; ``F(0) = 0`` keeps ``a`` the control steady state. Solved with ``solver="ode"``.
``"mechanism"`` (perturbations as mechanism changes)
    Linear drift whose causal weights depend on the label: for a label ``l`` (doses as entries)
    ``B_l = B + sum_k l_k D_k``, where ``D_k`` (site ``"B_delta"``, ``K x l x l``) is nonzero only
    on the rows of the programs that perturbation ``k`` targets (``mechanism_targets``) and only
    where ``causal_mask`` is 1. A single perturbation at dose 1 therefore REPLACES the incoming
    causal weights of each targeted program ``i`` by ``B[i] + D_k[i]`` (a new mechanism whose
    prior is centred at the observational one); a dose ``d`` interpolates linearly
    (``B[i] + d D_k[i]``); perturbations that target the same program add their changes.
    The shift ``S l`` is kept (a perturbation can change both a mechanism and a set point).
    ``B_l`` keeps the mask, so the dynamics stay stable; the equilibrium is
    ``a + (I - B_l)^{-1} S l``.

``heterogeneity`` (as in :func:`perturbax.data.simulate_latent_dynamics`):

``"persistent"`` (the default)
    Each cell's own basal state is its steady state: ``a`` is replaced by ``z(0)``, so
    ``z(t) = z(0) + (I - E_t) W l`` and the control population is STATIONARY: ``z(t) = z(0) ~
    N(a, Sigma_0)`` at every time, so ``N(a, Sigma_0)`` is the control steady state. For the
    linear drift each snapshot then has the law ``N(a + (I - E_t) W l, Sigma_0)``, the same as an
    Ornstein-Uhlenbeck process started in its stationary law ``N(a, Sigma_0)`` would give
    (where one exists: diffusion ``D D^T = -(A Sigma_0 + Sigma_0 A^T)`` positive semi-definite,
    ``A = B - I``); each cell is one snapshot, so only that law is observed.
``"relaxing"``
    DESIGN 2.2 literally: each cell's deviation ``z(0) - a`` relaxes with ``E_t`` and nothing
    replaces it, so the latent covariance is ``E_t Sigma_0 E_t^T`` (plus the diffusion's
    ``sigma^2 Q_t``): without diffusion the spread of every population, the control's included,
    decays to 0 over time. NOT stationary; ``N(a, Sigma_0)`` is the state at ``t = 0`` only.

With ``diffusion=True`` the persistent reading adds ``sigma^2 Q_t`` to ``Sigma_0`` (the control
spreads over time); only the default (persistent, no diffusion) keeps the control stationary.

Diffusion (``diffusion=True``, linear and mechanism drifts only): ``dz = drift dt + sigma dW``.
Because each cell is a single snapshot no path is needed: ``z(t)`` is drawn from the EXACT
Ornstein-Uhlenbeck transition ``N(deterministic solution, sigma^2 Q_t)`` with
``Q_t = P - E_t P E_t^T``, ``(B-I) P + P (B-I)^T + I = 0``, through a per-cell standard normal
site ``"z_noise"``: ``z(t) = mean + sigma chol(Q_t + 1e-6 I) z_noise``. (A neural drift with
diffusion would need an SDE solve and is not implemented; the config refuses it.)

Covariates ``c`` (batch, cell line) shift the control steady state: ``a = mu + V c``.
Time: the model sees ``t_eff = t * rate / time_scale`` (``rate`` a global site when
``learn_rate=True``, else 1), so the programs relax at rate ~1 per ``time_scale`` units of
``batch.t``.

Sites of :func:`latent_dynamics_model` (``n`` cells in the minibatch, ``l = latent_dim``):

Global (outside the plate):

- ``B_free`` ``(n_free,)``: the free entries of ``B`` (``n_free`` = number of ones in the mask,
  row-major); with ``b_prior="horseshoe"`` it is deterministic and ``B_free_raw``,
  ``B_free_tau``, ``B_free_lambda`` are sampled. ``B`` ``(l, l)``: deterministic, zero outside
  the mask (linear and mechanism drifts).
- ``S`` ``(l, K)``: via :func:`perturbation_effects` (``S_raw``/``S_tau``/``S_lambda`` for the
  horseshoe); with ``target_mask`` it is built like ``B``: deterministic, zero outside the mask,
  with the allowed entries in ``S_free`` ``(mask.sum(),)``.
- ``B_delta_free`` ``(m,)`` and deterministic ``B_delta`` ``(K, l, l)``: mechanism drift only.
- ``acyclicity``: a factor ``-rho * h(B)`` (NOTEARS, :func:`acyclicity_measure`), only with
  ``acyclicity=rho > 0`` on a cyclic mask.
- ``mu``, ``basal_sd`` ``(l,)``: ``basal="learned"`` only; ``Sigma_0 = diag(basal_sd^2)``.
- ``V`` ``(l, C)``: covariates only. ``rate`` ``()``: ``learn_rate=True`` only. ``diffusion``
  ``()``: ``diffusion=True`` only (sigma).
- params ``drift$params`` (neural drift), ``decoder$params``, and the likelihood's params.

Per cell (plate ``"cells"``):

- ``z_base`` ``(n, l)``: ``z(0)``, the sample site the amortised encoder infers;
- ``z_noise`` ``(n, l)``: ``diffusion=True`` only; ``s`` ``(n, state_dim)``: ``state_dim > 0``
  only;
- ``z`` ``(n, l)``: deterministic, ``z(t_i)``;
- ``x``, ``x_mean``, ``eta``: as in the additive shift model;
- ``ode_failure`` ``(n,)``: ``solver="ode"`` only, a factor ``-failure_penalty * failed``.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, Float
from numpyro.contrib.module import eqx_module

from perturbax.models import ode
from perturbax.models.batch import Batch
from perturbax.models.blocks import (
    CELL_PLATE,
    MLP,
    gaussian_likelihood,
    implicit_likelihood,
    negative_binomial_likelihood,
    network,
    perturbation_effects,
)

__all__ = [
    "LatentDynamicsConfig",
    "latent_dynamics_model",
    "CausalMLP",
    "causal_drift_network",
    "causal_weights",
    "mechanism_changes",
    "mechanism_weights",
    "neural_drift",
    "linear_drift",
    "transition_matrix",
    "linear_solution",
    "stationary_noise_cov",
    "ou_noise_cov",
    "equilibrium_shift",
    "lower_triangular_mask",
    "full_mask",
    "order_mask",
    "causal_order",
    "order_from_effects",
    "order_violation",
    "acyclicity_measure",
    "is_acyclic",
    "check_times",
    "check_stable",
]

DRIFTS = ("linear", "neural", "mechanism")
SOLVERS = ("closed_form", "ode")
LIKELIHOODS = ("gaussian", "negative_binomial", "implicit")
PRIORS = ("normal", "horseshoe")
BASALS = ("learned", "standard")
HETEROGENEITY = ("relaxing", "persistent")

_NOISE_JITTER = 1e-6


# --------------------------------------------------------------------------------------------
# Masks and checks
# --------------------------------------------------------------------------------------------
def lower_triangular_mask(n: int) -> np.ndarray:
    """Strictly lower-triangular 0/1 mask: program ``j`` may act on program ``i`` iff ``j < i``."""
    return np.tril(np.ones((n, n), dtype=np.int64), -1)


def full_mask(n: int) -> np.ndarray:
    """0/1 mask with every off-diagonal entry 1 (any program may act on any other; cyclic, so use
    it with ``allow_cycles=True`` and usually ``acyclicity > 0``)."""
    return np.ones((n, n), dtype=np.int64) - np.eye(n, dtype=np.int64)


def order_mask(order: Sequence[int]) -> np.ndarray:
    """Acyclic 0/1 mask of a causal order: ``mask[i, j] = 1`` iff program ``j`` comes before
    program ``i`` in ``order`` (a permutation of ``range(l)``, causes first).
    ``order_mask(range(l))`` is :func:`lower_triangular_mask`."""
    order = [int(i) for i in order]
    n = len(order)
    if sorted(order) != list(range(n)):
        raise ValueError(f"order must be a permutation of 0..{n - 1}, got {order}.")
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    return (pos[None, :] < pos[:, None]).astype(np.int64)


def causal_order(B: Any) -> list[int]:
    """A causal order (causes first) read from weights ``B`` (edge ``j -> i`` in ``B[i, j]``):
    repeatedly take, among the programs not yet placed, the one whose incoming weights from the
    other unplaced programs have the smallest sum of squares. Exact (the order of the DAG) when
    ``B`` is acyclic; for a nearly acyclic ``B`` (e.g. fitted with ``acyclicity > 0``) the order
    that drops the least squared weight greedily."""
    b = np.asarray(B, dtype=np.float64) ** 2
    if b.ndim != 2 or b.shape[0] != b.shape[1]:
        raise ValueError(f"B must be a square matrix, got shape {b.shape}.")
    left = list(range(b.shape[0]))
    order: list[int] = []
    while left:
        incoming = [b[i, left].sum() - b[i, i] for i in left]
        nxt = left[int(np.argmin(incoming))]
        order.append(nxt)
        left.remove(nxt)
    return order


def order_from_effects(
    W: Any, targets: Any = None, *, cycle_tol: float = 0.05
) -> tuple[list[int], np.ndarray]:
    """A causal order of the programs read from the total effects ``W = (I - B)^{-1} S``
    (``l x K``, one column per elementary perturbation, ``K >= l``). Returns ``(order, B_hat)``.

    Identified only when every program is the SOLE direct target of some perturbation
    (:func:`perturbax.theory.check_order_from_effects`); targeting every program is not enough:
    with programs only ever targeted together, every acyclic ``B'`` reproduces ``W`` with
    ``S' = (I - B') W``, whatever the order. For ``l`` perturbations that each target one
    program, ``W_sub^{-1} = S_sub^{-1} (I - B)`` has the row of the perturbation that targets
    program ``i`` proportional to ``e_i - B[i]``. Programs are matched to perturbations by
    minimising ``sum 1 / |entry|`` (Hungarian), each matched row is scaled to a unit diagonal,
    ``B_hat = I - rows`` and the order is :func:`causal_order` of ``B_hat`` (the ICA-LiNGAM idea
    applied to the latent shifts). ``W`` does not depend on the causal mask of a fit, so this
    reads the order from a fit made under any mask.

    ``targets`` (``l x K``, the support of ``S`` in the same program labelling, e.g. a fit's
    ``target_mask``): the condition is checked, and the columns of sole-target perturbations are
    used; a ``UserWarning`` says when the condition fails (the result is then one of many orders
    consistent with ``W``). Without ``targets`` the condition cannot be checked from ``W``: ``l``
    perturbations with linearly independent columns are used (QR with column pivoting) and a
    ``UserWarning`` is raised only when ``B_hat`` shows the condition fails -- more than
    ``cycle_tol`` of its squared weight points against the order read (exactly 0 when the chosen
    perturbations each target one program). Dense targets can still give an acyclic, wrong
    ``B_hat`` without a warning.
    """
    import warnings

    import scipy.linalg as sla
    from scipy.optimize import linear_sum_assignment

    from perturbax.theory.dynamics import check_order_from_effects

    w = np.asarray(W, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] < w.shape[0]:
        raise ValueError(
            f"W must be l x K with K >= l (at least one perturbation per program), got shape {w.shape}. "
            f"With fewer perturbations than programs the causal order cannot be read from the shifts."
        )
    ell = w.shape[0]
    cols_used = None
    if targets is not None:
        tm = np.asarray(targets)
        if tm.shape != w.shape:
            raise ValueError(f"targets must have the shape of W, {w.shape}, got {tm.shape}.")
        report = check_order_from_effects(tm)
        if report.identified:
            cols_used = np.asarray(report.sole_target)
        else:
            warnings.warn(f"order_from_effects: {report.message}", UserWarning, stacklevel=2)
    if cols_used is None:
        # l perturbations with linearly independent effects (QR with column pivoting; two
        # perturbations with the same target have parallel columns), then W_sub^-1 = S_sub^-1 (I - B).
        cols_used = np.sort(sla.qr(w, mode="r", pivoting=True)[1][:ell])
    m = np.linalg.inv(w[:, cols_used])  # (l, l): rows = the chosen perturbations
    # programs -> perturbations minimising sum 1/|m| (ICA-LiNGAM): m is triangular up to
    # permutations, and the diagonal is the only matching that avoids its zeros.
    rows, cols = linear_sum_assignment(1.0 / np.maximum(np.abs(m.T), 1e-12))
    matched = m[cols[np.argsort(rows)]]
    diag = np.diag(matched)
    if np.any(np.abs(diag) < 1e-12):
        raise ValueError("A program has no perturbation with a direct effect on it; the order is not identified.")
    b_hat = np.eye(ell) - matched / diag[:, None]
    order = causal_order(b_hat)
    backward = order_violation(b_hat, order)
    if targets is None and backward > cycle_tol:
        warnings.warn(
            f"order_from_effects: {backward:.0%} of the squared weight of B_hat read from W points against the "
            f"order {order}, so the perturbations used do not each target a single program and the causal order "
            f"is not identified by W (every acyclic B' reproduces W with S' = (I - B') W). Give the targets' "
            f"support (targets=, e.g. a target_mask) if it is known, or read B from a time course's transients.",
            UserWarning,
            stacklevel=2,
        )
    return order, b_hat


def order_violation(B: Any, order: Sequence[int]) -> float:
    """Fraction of the squared off-diagonal weight of ``B`` on edges that point against ``order``
    (causes first): 0 for weights that are acyclic in that order."""
    b = np.asarray(B, dtype=np.float64) ** 2
    off = b * (1 - np.eye(b.shape[0]))
    total = float(off.sum())
    if total == 0:
        return 0.0
    return float((off * (1 - order_mask(order))).sum() / total)


def acyclicity_measure(B: Float[Array, "l l"]) -> Float[Array, ""]:
    """NOTEARS acyclicity measure ``h(B) = tr(e^{B * B}) - l`` (elementwise square): ``>= 0``,
    and ``0`` exactly when the graph of ``B`` has no directed cycle; differentiable."""
    B = jnp.asarray(B)
    return jnp.trace(jsl.expm(B * B)) - B.shape[-1]


def is_acyclic(mask: np.ndarray) -> bool:
    """Whether the directed graph with adjacency ``mask[i, j] != 0`` (edge ``j -> i``) has no
    cycle, i.e. the mask is nilpotent (then every ``B`` on it has ``B^n = 0``)."""
    m = (np.asarray(mask) != 0).astype(np.int64)
    n = m.shape[0]
    p = np.eye(n, dtype=np.int64)
    for _ in range(n):
        p = np.minimum(p @ m, 1)
    return not p.any()


def check_times(t: Any) -> np.ndarray:
    """Validate per-cell times (hours since the perturbation was switched on) and return them as
    a float64 array. Call it where data enter a fit or a prediction (the model itself can only
    check concrete values, not traced ones).

    Raises ``ValueError`` for missing times, a wrong shape, NaN/Inf or negative values.
    """
    if t is None:
        raise ValueError(
            "The latent dynamics model needs the time of every cell (batch.t), measured from the moment "
            "the perturbation was switched on (t = 0). Pass the time column of your data (e.g. "
            "obs['time']) when fitting or predicting."
        )
    arr = np.asarray(t, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"Times must be a 1-d array with one time per cell, got shape {arr.shape}.")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(
            f"{bad.size} cell time(s) are NaN or infinite (first: cell {bad[0]}, value {arr[bad[0]]}). "
            f"Every cell needs a finite time since the perturbation was switched on; drop or fill those cells."
        )
    neg = np.flatnonzero(arr < 0)
    if neg.size:
        raise ValueError(
            f"{neg.size} cell time(s) are negative (first: cell {neg[0]}, t={arr[neg[0]]:g}; minimum "
            f"{arr.min():g}). Times are measured from the moment the perturbation is switched on (t = 0), "
            f"and cells before it are control cells at t = 0: shift the time column so that the switch "
            f"happens at 0, or give pre-perturbation cells the control label and t = 0."
        )
    return arr


def check_stable(B: Any) -> float:
    """Raise ``ValueError`` unless the linear drift ``(B - I)`` is stable (all eigenvalues with
    negative real part); returns the spectral abscissa ``max Re eig(B - I)``. Eager (numpy) check.

    Always satisfied for ``B`` on an acyclic mask (spectral abscissa exactly -1); needed for
    cyclic masks (``allow_cycles=True``) or user-supplied ``B``.
    """
    b = np.asarray(B, dtype=np.float64)
    if b.ndim != 2 or b.shape[0] != b.shape[1]:
        raise ValueError(f"B must be a square matrix, got shape {b.shape}.")
    if not np.all(np.isfinite(b)):
        raise ValueError("B has NaN/Inf entries.")
    abscissa = float(np.max(np.linalg.eigvals(b - np.eye(b.shape[0])).real))
    if abscissa >= 0:
        raise ValueError(
            f"The linear drift (B - I) is unstable: its largest eigenvalue real part is {abscissa:.4g} >= 0, "
            f"so z(t) grows without bound instead of relaxing to an equilibrium. Use an acyclic causal mask "
            f"(the default strictly lower-triangular one is always stable) or smaller feedback weights."
        )
    return abscissa


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}.")


def _as_matrix(name: str, value: Any, shape: tuple[int, int]) -> tuple[tuple[int, ...], ...]:
    arr = np.asarray(value)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}.")
    if not np.all(np.isin(arr, (0, 1))):
        raise ValueError(f"{name} must contain only 0/1 (or booleans), got values {np.unique(arr).tolist()}.")
    return tuple(tuple(int(v) for v in row) for row in arr)


@dataclass(frozen=True)
class LatentDynamicsConfig:
    """Dimensions and choices of the latent dynamical causal programs model (DESIGN 2.2).

    Attributes
    ----------
    n_genes, n_perturbations, n_covariates
        G, K and the number of covariate one-hot columns C (0 for none).
    latent_dim
        Number of latent programs ``l`` (also available as ``n_programs``).
    drift
        ``"linear"``, ``"neural"`` or ``"mechanism"`` (module docstring).
    solver
        ``"closed_form"`` (matrix exponential; linear and mechanism drifts; the default for them)
        or ``"ode"`` (:func:`perturbax.models.ode.solve`; the default and only choice for the
        neural drift). ``None`` picks the default.
    likelihood
        ``"gaussian"``, ``"negative_binomial"`` or ``"implicit"``, as in the additive model.
    causal_mask
        ``l x l`` 0/1 matrix, ``mask[i, j] = 1`` allows an effect of program ``j`` on program ``i``.
        ``None``: strictly lower triangular (all edges consistent with the program order). The
        diagonal must be 0 (self-regulation is the fixed decay ``-I``). Cyclic masks are refused
        unless ``allow_cycles=True`` (stability then depends on the values of ``B``).
    acyclicity
        Weight ``rho >= 0`` of a NOTEARS penalty ``-rho * h(B)`` (:func:`acyclicity_measure`, factor site
        ``"acyclicity"``) for a cyclic mask: with ``causal_mask=full_mask(l)``,
        ``allow_cycles=True`` and ``rho > 0`` the fit learns the program order instead of fixing
        it; read it with :func:`causal_order` and refit on :func:`order_mask` of it.
    b_prior, b_scale
        Prior of the free entries of ``B``: ``"normal"`` with scale ``b_scale`` or
        ``"horseshoe"`` (global scale ``b_scale``) for a sparse graph. Both have median 0, so the
        usual ``init_to_median`` starts at ``B = 0``.
    s_prior, s_scale
        Prior of the targets ``S`` (``"normal"`` or ``"horseshoe"``).
    target_mask
        ``l x K`` 0/1 matrix, ``target_mask[i, k] = 1`` lets perturbation ``k`` shift program
        ``i`` directly (``None``: every program). Every column needs a 1. It stops the fit from
        explaining an effect that travels along ``B`` by a direct entry of ``S``, but only helps
        with the right labelling AND a causal mask that allows the true edges: programs are
        identified only up to permutation, and in ``benchmarks/dynamics_target_mask.py`` a mask
        fixed before the order was known, or read from an unmasked fit, made recovery worse.
    mechanism_targets, mechanism_scale
        ``l x K`` 0/1 matrix: which programs' mechanisms each perturbation may change
        (``drift="mechanism"`` only; ``None``: every program); prior scale of the changes.
    basal
        ``"learned"``: ``mu ~ N(0, mu_scale^2)``, ``basal_sd ~ HalfNormal(basal_sd_scale)``;
        ``"standard"``: ``mu = 0``, ``Sigma_0 = I`` (removes the affine gauge of the latent space).
    heterogeneity
        ``"persistent"`` (default: the control population is stationary, ``N(a, Sigma_0)`` at every
        time) or ``"relaxing"`` (every population's spread decays as ``E_t Sigma_0 E_t^T``; not
        stationary); module docstring.
    diffusion, diffusion_scale
        Add Brownian noise ``sigma dW`` (exact OU transition; linear/mechanism drifts only) with
        ``sigma ~ HalfNormal(diffusion_scale)``.
    learn_rate, time_scale
        Time seen by the dynamics is ``t * rate / time_scale``; ``rate ~ LogNormal(0, 1)`` if
        ``learn_rate`` else 1. Set ``time_scale`` to the time unit over which programs relax.
    state_dim
        Width of the invariant per-cell state ``s ~ N(0, I)`` fed to the decoder next to
        ``z(t)`` (0: off).
    drift_hidden, decoder_hidden, encoder_hidden
        Hidden widths of the per-program drift MLPs, the decoder and the encoder.
    noise_dim
        Width of the noise fed into the decoder (``implicit`` only).
    rtol, atol, max_steps, failure_penalty
        ODE solver settings (``solver="ode"``); each cell whose solve fails adds
        ``-failure_penalty`` to the log density.
    seed
        Seed of the network initialisation.
    """

    n_genes: int
    n_perturbations: int
    latent_dim: int = 5
    n_covariates: int = 0
    drift: Literal["linear", "neural", "mechanism"] = "linear"
    solver: Literal["closed_form", "ode"] | None = None
    likelihood: Literal["gaussian", "negative_binomial", "implicit"] = "gaussian"
    causal_mask: tuple[tuple[int, ...], ...] | None = None
    allow_cycles: bool = False
    acyclicity: float = 0.0
    b_prior: Literal["normal", "horseshoe"] = "normal"
    b_scale: float = 0.5
    s_prior: Literal["normal", "horseshoe"] = "normal"
    s_scale: float = 1.0
    target_mask: tuple[tuple[int, ...], ...] | None = None
    mechanism_targets: tuple[tuple[int, ...], ...] | None = None
    mechanism_scale: float = 0.5
    basal: Literal["learned", "standard"] = "learned"
    mu_scale: float = 1.0
    basal_sd_scale: float = 1.0
    heterogeneity: Literal["relaxing", "persistent"] = "persistent"
    diffusion: bool = False
    diffusion_scale: float = 0.3
    learn_rate: bool = False
    time_scale: float = 1.0
    state_dim: int = 0
    drift_hidden: tuple[int, ...] = (32,)
    decoder_hidden: tuple[int, ...] = (128, 128)
    encoder_hidden: tuple[int, ...] = (128, 128)
    noise_dim: int = 8
    rtol: float = 1e-5
    atol: float = 1e-6
    max_steps: int = ode.DEFAULT_MAX_STEPS
    failure_penalty: float = 1e4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_genes", "n_perturbations", "n_covariates", "noise_dim", "state_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}.")
        if self.n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {self.n_genes}.")
        if not isinstance(self.latent_dim, int) or self.latent_dim < 1:
            raise ValueError(
                f"latent_dim must be an integer >= 1, got {self.latent_dim!r}. It is the number of latent "
                f"programs; try 3-10."
            )
        _choice("drift", self.drift, DRIFTS)
        _choice("likelihood", self.likelihood, LIKELIHOODS)
        _choice("b_prior", self.b_prior, PRIORS)
        _choice("s_prior", self.s_prior, PRIORS)
        _choice("basal", self.basal, BASALS)
        _choice("heterogeneity", self.heterogeneity, HETEROGENEITY)
        solver = self.solver
        if solver is None:
            solver = "ode" if self.drift == "neural" else "closed_form"
            object.__setattr__(self, "solver", solver)
        _choice("solver", solver, SOLVERS)
        if self.drift == "neural" and solver == "closed_form":
            raise ValueError("The neural drift has no closed form; use solver='ode' (or leave solver=None).")
        if self.drift == "neural" and self.diffusion:
            raise ValueError(
                "diffusion=True is implemented for the linear and mechanism drifts only (exact "
                "Ornstein-Uhlenbeck transition); the neural drift would need an SDE solve."
            )
        for name in ("b_scale", "s_scale", "mechanism_scale", "mu_scale", "basal_sd_scale", "diffusion_scale"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}.")
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise ValueError(
                f"time_scale must be a finite number > 0, got {self.time_scale!r}: time_scale <= 0 would "
                f"run the dynamics backwards in time, where the relaxing drift is unstable."
            )
        ell = self.latent_dim
        if self.causal_mask is not None:
            mask = _as_matrix("causal_mask", self.causal_mask, (ell, ell))
            arr = np.asarray(mask)
            if np.any(np.diag(arr)):
                raise ValueError(
                    f"causal_mask has nonzero diagonal entries (programs {np.flatnonzero(np.diag(arr)).tolist()}). "
                    f"Self-regulation is the fixed decay -I; a free diagonal B_ii >= 1 would make program i "
                    f"unstable. Set the diagonal to 0."
                )
            if not is_acyclic(arr) and not self.allow_cycles:
                raise ValueError(
                    "causal_mask contains a directed cycle, so the linear drift (B - I) can be unstable "
                    "(eigenvalues with positive real part) for some B. Use an acyclic mask (e.g. the default "
                    "strictly lower-triangular one), or pass allow_cycles=True and check B with check_stable."
                )
            object.__setattr__(self, "causal_mask", mask)
        if not (isinstance(self.acyclicity, int | float) and math.isfinite(self.acyclicity) and self.acyclicity >= 0):
            raise ValueError(f"acyclicity must be a finite number >= 0, got {self.acyclicity!r}.")
        if self.acyclicity > 0 and (self.drift == "neural" or is_acyclic(self.mask)):
            raise ValueError(
                "acyclicity > 0 penalises cycles of the linear causal weights B, but "
                + ("the neural drift has no B." if self.drift == "neural" else
                   "the causal mask is already acyclic, so the penalty is 0. Pass causal_mask=full_mask(latent_dim) "
                   "and allow_cycles=True to learn the order.")
            )
        if self.target_mask is not None:
            tm = _as_matrix("target_mask", self.target_mask, (ell, self.n_perturbations))
            empty = np.flatnonzero(~np.asarray(tm, dtype=bool).any(0))
            if empty.size:
                raise ValueError(
                    f"target_mask has no program for perturbation column(s) {empty.tolist()}, so they could have "
                    f"no effect at all; give each column at least one 1 (or pass target_mask=None)."
                )
            object.__setattr__(self, "target_mask", tm)
        if self.mechanism_targets is not None:
            if self.drift != "mechanism":
                raise ValueError("mechanism_targets is only used with drift='mechanism'.")
            object.__setattr__(
                self,
                "mechanism_targets",
                _as_matrix("mechanism_targets", self.mechanism_targets, (ell, self.n_perturbations)),
            )
        for name in ("drift_hidden", "decoder_hidden", "encoder_hidden"):
            object.__setattr__(self, name, tuple(int(h) for h in getattr(self, name)))
        if self.likelihood == "implicit" and self.noise_dim < 1:
            raise ValueError("The implicit likelihood needs noise_dim >= 1 (noise fed into the decoder).")
        if not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise ValueError(f"max_steps must be an integer >= 1, got {self.max_steps!r}.")
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError(f"rtol and atol must be > 0, got rtol={self.rtol}, atol={self.atol}.")
        if not (math.isfinite(self.failure_penalty) and self.failure_penalty >= 0):
            raise ValueError(f"failure_penalty must be a finite number >= 0, got {self.failure_penalty!r}.")

    @property
    def name(self) -> str:
        return "latent_dynamics"

    @property
    def n_programs(self) -> int:
        return self.latent_dim

    @property
    def mask(self) -> np.ndarray:
        """The causal mask as an ``(l, l)`` int array."""
        if self.causal_mask is None:
            return lower_triangular_mask(self.latent_dim)
        return np.asarray(self.causal_mask, dtype=np.int64)

    @property
    def acyclic(self) -> bool:
        return is_acyclic(self.mask)

    @property
    def targets(self) -> np.ndarray:
        """Mechanism targets as an ``(l, K)`` int array (all ones when not given)."""
        if self.mechanism_targets is None:
            return np.ones((self.latent_dim, self.n_perturbations), dtype=np.int64)
        return np.asarray(self.mechanism_targets, dtype=np.int64)

    @property
    def decoder_input_size(self) -> int:
        return self.latent_dim + self.state_dim + (self.noise_dim if self.likelihood == "implicit" else 0)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("drift_hidden", "decoder_hidden", "encoder_hidden"):
            d[k] = list(getattr(self, k))
        for k in ("causal_mask", "target_mask", "mechanism_targets"):
            if d[k] is not None:
                d[k] = [list(row) for row in getattr(self, k)]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentDynamicsConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - known
        if extra:
            raise ValueError(f"Unknown LatentDynamicsConfig fields {sorted(extra)}; was this saved by another version?")
        d = dict(d)
        for k in ("drift_hidden", "decoder_hidden", "encoder_hidden"):
            if k in d:
                d[k] = tuple(d[k])
        for k in ("causal_mask", "target_mask", "mechanism_targets"):
            if d.get(k) is not None:
                d[k] = tuple(tuple(int(v) for v in row) for row in d[k])
        return cls(**d)


# --------------------------------------------------------------------------------------------
# Linear dynamics: closed form, noise, equilibrium
# --------------------------------------------------------------------------------------------
def equilibrium_shift(B: Float[Array, "l l"], S: Float[Array, "l K"]) -> Float[Array, "l K"]:
    """``W = (I - B)^{-1} S``: the equilibrium shift of the linear drift, i.e. the ``W`` of the
    additive shift model that the dynamics reach at long times (DESIGN 2.3).

    The one implementation lives in :func:`perturbax.theory.bs_to_w` (imported lazily, so that
    importing the models does not import the theory layer): NumPy inputs give a float64 NumPy
    result (with a clear error if ``I - B`` is singular), JAX inputs or tracers a differentiable
    JAX result.
    """
    from perturbax.theory.dynamics import bs_to_w

    return bs_to_w(B, S)


def _powers(B: Float[Array, "l l"]) -> Float[Array, "l l l"]:
    """``[I, B, B^2, ..., B^{l-1}]``."""
    n = B.shape[-1]
    out = [jnp.eye(n, dtype=B.dtype)]
    for _ in range(1, n):
        out.append(out[-1] @ B)
    return jnp.stack(out)


def _poisson_weights(t: Float[Array, ""], n: int) -> Float[Array, " n"]:
    """``e^{-t} t^k / k!`` for ``k < n`` by recursion (no overflow, finite gradients at t = 0)."""
    c = [jnp.exp(-t)]
    for k in range(1, n):
        c.append(c[-1] * t / k)
    return jnp.stack(c)


def _transition_single(B: Float[Array, "l l"], t: Float[Array, ""], nilpotent: bool) -> Float[Array, "l l"]:
    n = B.shape[-1]
    if nilpotent:
        return jnp.einsum("k,kij->ij", _poisson_weights(t, n), _powers(B))
    return jsl.expm((B - jnp.eye(n, dtype=B.dtype)) * t)


def _progress_single(B: Float[Array, "l l"], t: Float[Array, ""], nilpotent: bool) -> Float[Array, "l l"]:
    """``I - E_t``, with the identity part ``1 - e^{-t}`` as ``-expm1(-t)`` in the series (exactly
    0 at ``t = 0`` and accurate for small ``t``)."""
    n = B.shape[-1]
    eye = jnp.eye(n, dtype=B.dtype)
    if nilpotent:
        c = _poisson_weights(t, n)
        return -jnp.expm1(-t) * eye - jnp.einsum("k,kij->ij", c[1:], _powers(B)[1:])
    return eye - jsl.expm((B - eye) * t)


def _map_cells(fn: Callable, B: Array, t: Array) -> Array:
    """Apply ``fn(B_i, t_i)`` with ``B`` shared ``(l, l)`` or per cell ``(n, l, l)`` and ``t``
    a scalar or ``(n,)``."""
    if B.ndim == 2 and t.ndim == 0:
        return fn(B, t)
    return jax.vmap(fn, in_axes=(0 if B.ndim == 3 else None, 0 if t.ndim == 1 else None))(B, t)


def transition_matrix(B: Array, t: Array, *, nilpotent: bool = False) -> Array:
    """``E_t = e^{(B - I) t}``.

    ``B``: ``(l, l)`` or per cell ``(n, l, l)``; ``t``: a scalar or ``(n,)``. With
    ``nilpotent=True`` (``B`` on an acyclic mask, so ``B^l = 0``) the exact finite series
    ``sum_{k<l} e^{-t} t^k / k! B^k`` is used (cheap, no overflow, exact gradients); otherwise
    ``jax.scipy.linalg.expm``. For a strictly lower-triangular ``B``, ``B - I`` is triangular with
    every eigenvalue -1 and both agree.
    """
    B = jnp.asarray(B)
    t = jnp.asarray(t, dtype=B.dtype)
    return _map_cells(lambda b, s: _transition_single(b, s, nilpotent), B, t)


def linear_solution(
    z0: Float[Array, "n l"],
    t: Float[Array, " n"],
    B: Array,
    shift: Float[Array, "n l"],
    anchor: Array,
    *,
    nilpotent: bool = False,
) -> Float[Array, "n l"]:
    """Closed-form solution of ``dz/dt = (B - I)(z - anchor) + shift`` from ``z(0) = z0``:

        z(t) = anchor + (I - E_t) w + E_t (z0 - anchor)
             = z0 + (I - E_t)(anchor + w - z0),            w = (I - B)^{-1} shift,

    with ``E_t = e^{(B-I)t}`` (:func:`transition_matrix`). ``B`` is shared ``(l, l)`` or per cell
    ``(n, l, l)``; ``shift`` is ``S l`` per cell; ``anchor`` broadcasts to ``(n, l)``
    (``mu`` for relaxing dynamics, ``z0`` for persistent ones). As ``t -> inf``,
    ``z(t) -> anchor + (I - B)^{-1} S l``.
    """
    z0 = jnp.asarray(z0)
    B = jnp.asarray(B, dtype=z0.dtype)
    t = jnp.asarray(t, dtype=z0.dtype)
    anchor = jnp.broadcast_to(jnp.asarray(anchor, dtype=z0.dtype), z0.shape)
    eye = jnp.eye(z0.shape[-1], dtype=z0.dtype)
    if B.ndim == 2:
        w = jnp.linalg.solve(eye - B, shift.T).T
    else:
        w = jax.vmap(lambda b, s: jnp.linalg.solve(eye - b, s))(B, shift)
    R = _map_cells(lambda b, s: _progress_single(b, s, nilpotent), B, t)  # I - E_t
    if R.ndim == 2:
        R = jnp.broadcast_to(R, (z0.shape[0], *R.shape))
    # z0 + (I - E_t)(anchor + w - z0): exactly z0 at t = 0, no cancellation of large shifts.
    return z0 + jnp.einsum("nij,nj->ni", R, anchor + w - z0)


def _stationary_single(B: Float[Array, "l l"], nilpotent: bool) -> Float[Array, "l l"]:
    n = B.shape[-1]
    if nilpotent:
        # e^{As} = e^{-s} sum_j (sB)^j / j!  and  int_0^inf e^{-2s} s^m ds = m! / 2^{m+1}.
        j = np.arange(n)
        m = j[:, None] + j[None, :]
        coef = np.array([[math.comb(int(a + b), int(a)) for b in j] for a in j], dtype=np.float64) / 2.0 ** (m + 1)
        M = _powers(B)
        return jnp.einsum("jk,jab,kcb->ac", jnp.asarray(coef, dtype=B.dtype), M, M)
    A = B - jnp.eye(n, dtype=B.dtype)
    eye = jnp.eye(n, dtype=B.dtype)
    lyap = jnp.kron(A, eye) + jnp.kron(eye, A)
    P = jnp.linalg.solve(lyap, -eye.reshape(-1)).reshape(n, n)
    return 0.5 * (P + P.T)


def stationary_noise_cov(B: Array, *, nilpotent: bool = False) -> Array:
    """``P`` with ``(B - I) P + P (B - I)^T + I = 0``: the covariance unit Brownian noise builds up
    as ``t -> inf`` (needs a stable drift). ``B``: ``(l, l)`` or ``(n, l, l)``."""
    B = jnp.asarray(B)
    if B.ndim == 2:
        return _stationary_single(B, nilpotent)
    return jax.vmap(lambda b: _stationary_single(b, nilpotent))(B)


def ou_noise_cov(B: Array, t: Array, *, nilpotent: bool = False) -> Array:
    """Covariance ``Q_t = P - E_t P E_t^T`` that unit Brownian noise adds to ``z(t)`` between 0
    and ``t`` (multiply by ``sigma^2``). ``B``: ``(l, l)`` or ``(n, l, l)``; ``t``: scalar or
    ``(n,)``."""
    B = jnp.asarray(B)
    t = jnp.asarray(t, dtype=B.dtype)

    def one(b, s):
        P = _stationary_single(b, nilpotent)
        E = _transition_single(b, s, nilpotent)
        Q = P - E @ P @ E.T
        return 0.5 * (Q + Q.T)

    return _map_cells(one, B, t)


# --------------------------------------------------------------------------------------------
# Drift blocks
# --------------------------------------------------------------------------------------------
def _vector_prior(name: str, n: int, prior: str, scale: float) -> Float[Array, " n"]:
    if prior == "normal":
        return numpyro.sample(name, dist.Normal(0.0, scale).expand((n,)).to_event(1))
    if prior == "horseshoe":
        tau = numpyro.sample(f"{name}_tau", dist.HalfCauchy(scale))
        lam = numpyro.sample(f"{name}_lambda", dist.HalfCauchy(1.0).expand((n,)).to_event(1))
        raw = numpyro.sample(f"{name}_raw", dist.Normal(0.0, 1.0).expand((n,)).to_event(1))
        return numpyro.deterministic(name, raw * tau * lam)
    raise ValueError(f"prior={prior!r} is not supported; choose 'normal' or 'horseshoe'.")


def causal_weights(name: str, mask: np.ndarray, *, prior: str = "normal", scale: float = 0.5) -> Float[Array, "l m"]:
    """Causal weights ``B`` (deterministic site ``name``), zero outside ``mask`` (any 2-d shape:
    also the targets ``S`` under a ``target_mask``); only the free
    entries are sampled (site ``name + "_free"``, shape ``(mask.sum(),)``, in row-major order of
    the mask's ones) under a ``"normal"`` or ``"horseshoe"`` prior with median 0."""
    mask = np.asarray(mask)
    rows, cols = np.nonzero(mask)
    B = jnp.zeros(mask.shape)
    if rows.size:
        free = _vector_prior(f"{name}_free", int(rows.size), prior, scale)
        B = B.at[rows, cols].set(free)
    return numpyro.deterministic(name, B)


def mechanism_changes(name: str, mask: np.ndarray, targets: np.ndarray, *, scale: float = 0.5) -> Float[Array, "K l l"]:
    """Per-perturbation changes ``D_k`` of the causal weights (deterministic site ``name``,
    ``(K, l, l)``): entry ``(k, i, j)`` is free iff ``targets[i, k]`` and ``mask[i, j]``; free
    entries ``~ N(0, scale^2)`` (site ``name + "_free"``)."""
    mask = np.asarray(mask) != 0
    targets = np.asarray(targets) != 0
    n_prog, n_pert = targets.shape
    allowed = targets.T[:, :, None] & mask[None, :, :]  # (K, l, l)
    k_idx, i_idx, j_idx = np.nonzero(allowed)
    D = jnp.zeros((n_pert, n_prog, n_prog))
    if k_idx.size:
        free = numpyro.sample(f"{name}_free", dist.Normal(0.0, scale).expand((int(k_idx.size),)).to_event(1))
        D = D.at[k_idx, i_idx, j_idx].set(free)
    return numpyro.deterministic(name, D)


def mechanism_weights(B: Float[Array, "l l"], delta: Float[Array, "K l l"], labels: Float[Array, "n K"]) -> Array:
    """Per-cell causal weights ``B_l = B + sum_k l_k D_k`` for label vectors ``labels`` (doses as
    entries), shape ``(n, l, l)``."""
    return B[None] + jnp.einsum("nk,kij->nij", labels, delta)


def linear_drift(t: Any, z: Float[Array, " l"], args: tuple) -> Float[Array, " l"]:
    """``(B - I)(z - a) + s`` for one cell, ``args = (B, a, s)`` (diffrax signature)."""
    B, a, s = args
    u = z - a
    return B @ u - u + s


class CausalMLP(eqx.Module):
    """``g: R^l -> R^l`` with ``g_i(u) = MLP_i(u * mask[i])``: one MLP per program whose input
    is masked to the program's parents, so ``dg_i/du_j`` is exactly 0 wherever ``mask[i, j] = 0``.

    The per-program MLPs are stored stacked (every array leaf has a leading axis ``l``). The
    last layer is scaled by ``init_scale`` so that the drift starts close to ``-u`` (the
    programs' own decay) and early solves are easy.
    """

    nets: MLP
    mask: tuple[tuple[float, ...], ...] = eqx.field(static=True)

    def __init__(
        self,
        mask: np.ndarray,
        hidden: Sequence[int],
        *,
        key: jax.Array,
        activation: Callable = jax.nn.silu,
        init_scale: float = 0.1,
    ):
        m = np.asarray(mask, dtype=np.float64)
        n = m.shape[0]
        keys = jax.random.split(key, n)
        nets = eqx.filter_vmap(lambda k: MLP(n, 1, tuple(hidden), key=k, activation=activation))(keys)
        self.nets = eqx.tree_at(
            lambda net: (net.layers[-1].weight, net.layers[-1].bias), nets, replace_fn=lambda w: w * init_scale
        )
        self.mask = tuple(tuple(float(v) for v in row) for row in m)

    def __call__(self, u: Float[Array, " l"]) -> Float[Array, " l"]:
        m = jnp.asarray(self.mask, dtype=u.dtype)
        return eqx.filter_vmap(lambda net, mi: net(u * mi)[0], in_axes=(eqx.if_array(0), 0))(self.nets, m)


def causal_drift_network(
    name: str, mask: np.ndarray, hidden: Sequence[int], *, seed: int = 0, init_scale: float = 0.1
) -> CausalMLP:
    """A :class:`CausalMLP` whose weights are NumPyro params ``name + "$params"``; the initial
    weights depend only on ``name`` and ``seed`` (as :func:`perturbax.models.network`)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return eqx_module(name, CausalMLP(mask, hidden, key=key, init_scale=init_scale))


def neural_drift(
    g: Callable[[Array], Array], z: Float[Array, " l"], anchor: Float[Array, " l"], shift: Float[Array, " l"]
) -> Float[Array, " l"]:
    """``F(z - a) + s`` with ``F(u) = -u + g(u) - g(0)`` for one cell: zero drift at the control
    steady state ``a``; Jacobian ``-I + dg/du`` (lower triangular with diagonal -1 for a
    :class:`CausalMLP` on an acyclic mask, hence locally stable everywhere)."""
    u = z - anchor
    return -u + g(u) - g(jnp.zeros_like(u)) + shift


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
def _cell_times(batch: Batch, config: LatentDynamicsConfig) -> Array:
    if batch.t is None:
        check_times(None)
    t = batch.t
    if _is_concrete(t):
        check_times(t)
        if np.shape(t) != (batch.size,):
            raise ValueError(f"batch.t must have one time per cell, shape ({batch.size},), got {np.shape(t)}.")
    return jnp.asarray(t, dtype=jnp.result_type(float)) / config.time_scale


def latent_dynamics_model(batch: Batch, *, config: LatentDynamicsConfig, n_cells: int) -> None:
    """Latent dynamical causal programs: ``z(0) = z_base ~ N(a, Sigma_0)``, ``z(t_i)`` from the
    drift chosen in ``config``, ``x_i ~ likelihood(decoder([z(t_i), s_i]))``.

    ``batch.t`` (time since the perturbation was switched on, ``>= 0``) is required; ``batch.l``
    holds the labels (active for ``t > 0``). See the module docstring for the drifts and the
    table of sites.
    """
    ell, K = config.latent_dim, config.n_perturbations
    nilpotent = config.acyclic
    t = _cell_times(batch, config)
    labels = jnp.asarray(batch.l)

    mask = config.mask
    B = None
    if config.drift in ("linear", "mechanism"):
        B = causal_weights("B", mask, prior=config.b_prior, scale=config.b_scale)
        if not nilpotent and _is_concrete(B):
            check_stable(B)
        if config.acyclicity > 0:
            numpyro.factor("acyclicity", -config.acyclicity * acyclicity_measure(B))
    if config.target_mask is None:
        S = perturbation_effects("S", ell, K, prior=config.s_prior, scale=config.s_scale)
    else:  # zero outside the mask, only the allowed entries sampled (as for B)
        S = causal_weights("S", np.asarray(config.target_mask), prior=config.s_prior, scale=config.s_scale)
    delta = None
    if config.drift == "mechanism":
        delta = mechanism_changes("B_delta", mask, config.targets, scale=config.mechanism_scale)
    if config.basal == "learned":
        mu = numpyro.sample("mu", dist.Normal(0.0, config.mu_scale).expand((ell,)).to_event(1))
        basal_sd = numpyro.sample("basal_sd", dist.HalfNormal(config.basal_sd_scale).expand((ell,)).to_event(1))
    else:
        mu, basal_sd = jnp.zeros(ell), jnp.ones(ell)
    V = None
    if config.n_covariates:
        V = perturbation_effects("V", ell, config.n_covariates, prior="normal", scale=config.s_scale)
    if config.learn_rate:
        t = t * numpyro.sample("rate", dist.LogNormal(0.0, 1.0))
    sigma = numpyro.sample("diffusion", dist.HalfNormal(config.diffusion_scale)) if config.diffusion else None
    g = None
    if config.drift == "neural":
        g = causal_drift_network("drift", mask, config.drift_hidden, seed=config.seed)
    decoder = network("decoder", config.decoder_input_size, config.n_genes, config.decoder_hidden, seed=config.seed)

    with numpyro.plate(CELL_PLATE, n_cells, subsample_size=batch.size):
        base_mean = jnp.broadcast_to(mu, (batch.size, ell))
        if V is not None:
            base_mean = base_mean + batch.c @ V.T
        z_base = numpyro.sample("z_base", dist.Normal(base_mean, basal_sd).to_event(1))
        anchor = z_base if config.heterogeneity == "persistent" else base_mean
        shift = labels @ S.T
        B_cell = mechanism_weights(B, delta, labels) if delta is not None else B

        if config.solver == "closed_form":
            z_t = linear_solution(z_base, t, B_cell, shift, anchor, nilpotent=nilpotent)
        else:
            if g is not None:
                g0 = g(jnp.zeros(ell))

                def field(_t, y, args):
                    a, s = args
                    u = y - a
                    return -u + g(u) - g0 + s

                args = (anchor, shift)
            elif delta is not None:
                field, args = linear_drift, (B_cell, anchor, shift)
            else:

                def field(_t, y, args):
                    return linear_drift(_t, y, (B, *args))

                args = (anchor, shift)
            sol = ode.solve(field, z_base, t, args=args, max_steps=config.max_steps, rtol=config.rtol, atol=config.atol)
            z_t = sol.y
            numpyro.factor("ode_failure", -sol.penalty(config.failure_penalty))

        if sigma is not None:
            Q = ou_noise_cov(B_cell, t, nilpotent=nilpotent)
            if Q.ndim == 2:
                Q = jnp.broadcast_to(Q, (batch.size, ell, ell))
            L = jnp.linalg.cholesky(Q + _NOISE_JITTER * jnp.eye(ell))
            z_noise = numpyro.sample("z_noise", dist.Normal(0.0, 1.0).expand((ell,)).to_event(1))
            z_t = z_t + sigma * jnp.einsum("nij,nj->ni", L, z_noise)

        z = numpyro.deterministic("z", z_t)
        dec_in = z
        if config.state_dim:
            s = numpyro.sample("s", dist.Normal(0.0, 1.0).expand((config.state_dim,)).to_event(1))
            dec_in = jnp.concatenate([z, s], axis=-1)
        if config.likelihood == "gaussian":
            gaussian_likelihood(decoder, dec_in, batch.x, n_genes=config.n_genes)
        elif config.likelihood == "negative_binomial":
            negative_binomial_likelihood(decoder, dec_in, batch.x, batch.library, n_genes=config.n_genes)
        else:
            implicit_likelihood(decoder, dec_in, batch.x, noise_dim=config.noise_dim)
