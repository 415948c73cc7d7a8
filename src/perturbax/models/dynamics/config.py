"""The configuration of the latent dynamics model (:class:`LatentDynamicsConfig`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from perturbax.models import ode
from perturbax.models.dynamics.ordering import is_acyclic, lower_triangular_mask

__all__ = ["LatentDynamicsConfig", "mask_variant"]

DRIFTS = ("linear", "neural", "mechanism")
SOLVERS = ("closed_form", "ode")
LIKELIHOODS = ("gaussian", "negative_binomial", "implicit")
PRIORS = ("normal", "horseshoe")
BASALS = ("learned", "standard")
HETEROGENEITY = ("relaxing", "persistent")


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
        Prior of the direct targets ``S``: ``"horseshoe"`` (default; global scale ``s_scale``), a
        sparsity prior, or ``"normal"`` with scale ``s_scale``. The programs are identified when
        each perturbation directly targets few of them (one per program suffices in the linear
        setting); the horseshoe says so, where a normal prior lets a rotation of the programs
        spread every effect over all of them. On the development seeds of
        ``benchmarks/dynamics.py`` (10-12, not the reported ones) it raised the latent MCC from
        0.74/0.81/0.83 to 0.92/0.87/0.87.
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
        ``learn_rate`` else 1: the programs relax over about ``time_scale`` units of time.
        ``None`` (default): ``fit`` sets it from the training data, to the median of their distinct
        positive times (:func:`~perturbax.inference.default_time_scale`), so that a fit does not
        depend on the unit the times are given in; the model run outside ``fit`` reads ``None``
        as 1 (:attr:`time_unit`).
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
    s_prior: Literal["normal", "horseshoe"] = "horseshoe"
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
    time_scale: float | None = None
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
        if self.time_scale is not None and not (isinstance(self.time_scale, int | float)
                                                and math.isfinite(self.time_scale) and self.time_scale > 0):
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
    def time_unit(self) -> float:
        """The ``time_scale`` the model divides times by (1 while ``time_scale`` is ``None``,
        before ``fit`` has set it from the training times)."""
        return 1.0 if self.time_scale is None else float(self.time_scale)

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


def mask_variant(config, base) -> str | None:
    """``None`` if ``config`` is ``base`` with another causal mask of as many free entries (acyclic
    iff ``base``'s is), what one compiled trainer of the linear latent dynamics runs
    (``run(config=...)``); else why not."""
    if config is base:
        return None
    if type(config) is not type(base) or dataclasses.replace(config, causal_mask=base.causal_mask) != base:
        return "run(config=...) can change only the causal_mask of the trainer's config; build another trainer."
    if int(config.mask.sum()) != int(base.mask.sum()) or config.acyclic != base.acyclic:
        return (f"run(config=...) needs a causal_mask with {int(base.mask.sum())} free entries and "
                f"{'no' if base.acyclic else 'a'} cycle, as the trainer's; got {config.mask.tolist()}.")
    return None
