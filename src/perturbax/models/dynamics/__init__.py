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
``batch.t``. ``fit`` sets a ``time_scale`` of ``None`` (the default) to the median of the distinct
positive training times, so a fit does not depend on the unit of the times.

Sites of :func:`latent_dynamics_model` (``n`` cells in the minibatch, ``l = latent_dim``):

Global (outside the plate):

- ``B_free`` ``(n_free,)``: the free entries of ``B`` (``n_free`` = number of ones in the mask,
  row-major); with ``b_prior="horseshoe"`` it is deterministic and ``B_free_raw``,
  ``B_free_tau``, ``B_free_lambda`` are sampled. ``B`` ``(l, l)``: deterministic, zero outside
  the mask (linear and mechanism drifts).
- ``S`` ``(l, K)``: via :func:`perturbation_effects`: deterministic, from ``S_raw``, ``S_tau``,
  ``S_lambda`` under the default horseshoe prior; a sample site under ``s_prior="normal"``; with
  ``target_mask`` it is built like ``B``: deterministic, zero outside the mask, with the allowed
  entries in ``S_free`` ``(mask.sum(),)``.
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

from perturbax.models.dynamics.checks import check_stable, check_times
from perturbax.models.dynamics.closed_form import equilibrium_shift, linear_solution, transition_matrix
from perturbax.models.dynamics.config import LatentDynamicsConfig
from perturbax.models.dynamics.drift import (
    CausalMLP,
    causal_drift_network,
    causal_weights,
    linear_drift,
    mechanism_changes,
    mechanism_weights,
    neural_drift,
)
from perturbax.models.dynamics.model import latent_dynamics_model
from perturbax.models.dynamics.noise import ou_noise_cov, stationary_noise_cov
from perturbax.models.dynamics.ordering import (
    acyclicity_measure,
    causal_order,
    full_mask,
    is_acyclic,
    lower_triangular_mask,
    order_from_effects,
    order_mask,
    order_violation,
    sole_target_mask,
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
    "sole_target_mask",
    "acyclicity_measure",
    "is_acyclic",
    "check_times",
    "check_stable",
]
