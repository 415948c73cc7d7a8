"""Model-level local identifiability of any NumPyro model, from simulated observable summaries.

:func:`model_identifiability` runs a perturbax-style NumPyro model (``model(batch, *, config,
n_cells)``, sites as in :mod:`perturbax.models.blocks`) at a parameter value ``theta`` on every
context of a design (a row ``l`` of the design, optionally crossed with covariates and times),
and forms the expected observable summaries of each context -- the mean and the covariance of
``"x_mean"`` (or of ``"x"`` where there is no mean) over the cells. It then hands that summary
map to :func:`perturbax.theory.local.local_identifiability`, which takes the Jacobian with
respect to the chosen global parameters, its rank with an explicit singular-value tolerance, and
the null directions that the declared symmetries do not explain, named by parameter entry
(``"W[1,2]"``, ``"decoder.layers.0.weight[3,1]"``).

Which parameters
----------------
By default the latent global sample sites (``"W"``, ``"V"``, ...; for a horseshoe prior the
deterministic ``"W"`` instead of its ``W_raw``/``W_tau``/``W_lambda`` parts) and the first-layer
weight matrix of the decoder (param ``"decoder$params"``): exactly the parameters a latent
rotation acts on. The rest of the decoder (deeper layers, biases) and the likelihood scales are
held at their values. A multilayer decoder is heavily over-parameterised -- many of its weights
are not locally identifiable from means and covariances whatever the design -- so including all
of it would bury the question asked here (is the design rich enough for the perturbation effects
and the latent space?) under decoder redundancies. ``sites=`` chooses other parameters: a site
name (``"W"``, ``"decoder$params"`` for all its leaves) or a readable leaf name
(``"decoder.layers.1.weight"``). ``mask=`` fixes single entries.

Expected summaries by simulation with common random numbers
-----------------------------------------------------------
A nonlinear decoder has no closed-form moments, so the summaries are Monte-Carlo averages over
``n_samples`` simulated cells per context. They are made *differentiable functions of theta* with
common random numbers: every evaluation runs the model under the same ``numpyro.handlers.seed``
key, so every per-cell sample site draws the same standard base noise and transforms it with
the distribution's reparameterisation (``loc + scale * eps`` for a normal) -- the same base draws
for every parameter value. The Jacobian of the Monte-Carlo summary is then an unbiased estimate
of the Jacobian of the expected summary.

The rotation symmetry under common random numbers
-------------------------------------------------
In the additive-shift model with a standard-normal base, ``W -> R W`` (and ``V -> R V``) with the
decoder's first layer ``A -> A R^T`` leaves the *distribution* of the observations unchanged for
every orthogonal ``R``: the decoder sees ``A R^T (z_base + R W l) = A (R^T z_base + W l)`` and
``R^T z_base`` is again standard normal. With fixed base draws ``z_i`` the Monte-Carlo summary is
*not* invariant (``A R^T z_i != A z_i``); the rotation directions then carry singular values of
the size of the Monte-Carlo error (``~ n_samples^-1/2`` relative) instead of zero, and no
tolerance separates them cleanly from directions that are weakly but truly identified.

This module therefore rotates the common random numbers *with* the parameters (a "latent
frame"). The cells' base states are drawn as ``z_i = O(A) eps_i`` with fixed
``eps_i ~ N(0, I_H)`` (``H`` = rows of ``A``, the first hidden width) and
``O(A) = (A_z^T A_z)^{-1/2} A_z^T``, where ``A_z`` is the ``H x d`` block of the first-layer
weights that the latent state feeds. ``O(A)`` has orthonormal rows, so ``z_i ~ N(0, I_d)``
exactly, for every ``theta``: the Monte-Carlo summary is still an unbiased estimate of the
expected summary at every parameter value. And ``O(A R^T) = R O(A)``, so under the rotation the
base states rotate with the parameters and every simulated cell is mapped to exactly the same
decoder input: the Monte-Carlo summary is invariant under the rotation *for every draw*, and the
``d(d-1)/2`` rotation directions are null directions of its Jacobian to rounding error
(``~1e-15`` relative). (The first-layer preactivation of cell ``i`` is ``(A A^T)^{1/2} eps_i +
A (W l + V c) + b``: the frame is the differentiable, rotation-invariant square root of the
preactivation covariance.) The frame cannot fake a symmetry: because the estimate is unbiased at
every ``theta``, an exact invariance of the Monte-Carlo summary along a curve is an invariance of
its expectation too. The inverse square root has a custom JVP (Daleckii-Krein formula) that stays
finite when eigenvalues of ``A_z^T A_z`` coincide. ``latent_frame=False`` switches the frame off
(plain common random numbers; the rotation defect then shows as a warning).

Why the null directions found are the true ones
-----------------------------------------------
With the frame, two kinds of null directions are exact to rounding error in the Monte-Carlo
Jacobian: the declared rotations (above), and *structural* ones -- parameter combinations that do
not enter the simulation at all on this design (the shift of a perturbation never measured, the
difference of two perturbations only ever measured together). Those are exactly the
non-identifiabilities a design can cause in the additive-shift model: its expected summaries
depend on ``(A, W, V)`` through the law of ``A z + b``, i.e. through ``A A^T`` and ``A (W l + V
c)`` over the contexts, and for a generic decoder these determine ``A`` up to ``A -> A R^T`` and
then every measured combination ``W l``. Every other direction moves some summary and gets a
singular value set by its effect, far above rounding error. The rank is counted with the
explicit tolerance ``rtol * s_max`` (default ``1e-7`` in float64): the report gives the smallest
kept and largest dropped singular values (:attr:`ModelIdentifiabilityReport.margins`), so a
narrow gap is visible. A symmetry of the *expectation* that is neither declared (and built into
the random numbers like the rotation) nor structural would appear only as a singular value at
the Monte-Carlo level; raise ``n_samples`` and compare seeds if the margins look marginal.

A consequence worth knowing: with the base fixed to ``N(0, I)``, a design of rank ``< d`` whose
perturbations are all measured does not add null directions -- ``A A^T`` fixes the latent
space; the design-level condition ``rank >= d`` (:func:`perturbax.theory.check_design`) is about
the latent space being spanned by perturbation effects, not about this local count.

:func:`perturbax.inference.fit_identifiability` runs the check at the posterior mean of a fitted
:class:`~perturbax.inference.result.FitResult` on its training design.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro import handlers

from perturbax.models.batch import Batch
from perturbax.models.blocks import CELL_PLATE
from perturbax.theory.local import LocalIdentifiabilityReport, _key_str, local_identifiability
from perturbax.theory.report import WARNING, fmt, join_names

__all__ = [
    "LatentRotation",
    "ModelIdentifiabilityReport",
    "ModelSummary",
    "model_summary_fn",
    "model_identifiability",
]

_PARAMS_SUFFIX = "$params"
_HORSESHOE_PARTS = ("_raw", "_tau", "_lambda")


# --------------------------------------------------------------------------- symmetry spec
@dataclass(frozen=True)
class LatentRotation:
    """The latent rotation symmetry of an additive-shift-type model.

    ``z -> R z`` for orthogonal ``R``: the rows of each ``shifts`` site (``(d, .)`` matrices such
    as ``W``, ``V``) rotate, ``M -> R M``, and the first ``d`` columns of the ``first_layer``
    weight matrix (what the latent state feeds) rotate back, ``A_z -> A_z R^T``. It is a symmetry
    when the base ``latent`` site is standard normal and the latent state reaches the
    observations only through that layer. Tangents, for each pair ``i < j`` and
    ``Omega = E_ij - E_ji``: ``dM = Omega M``, ``dA_z = -A_z Omega``, named
    ``"latent rotation (i, j)"``.

    Attributes
    ----------
    latent
        The per-cell base site (standard normal, event shape ``(d,)``).
    shifts
        Global sites whose rows live in the latent space; those absent from the model are skipped.
    first_layer
        Readable name of the first-layer weight leaf (``"decoder.layers.0.weight"`` for the
        built-in decoder, see :func:`model_identifiability`).
    """

    latent: str = "z_base"
    shifts: tuple[str, ...] = ("W", "V")
    first_layer: str = "decoder.layers.0.weight"

    def tangents(self, theta: Mapping[str, Any], d: int) -> tuple[list[dict], list[str]]:
        """The ``d(d-1)/2`` tangents at ``theta`` (a dict over the readable parameter names)."""
        A = np.asarray(theta[self.first_layer], dtype=np.float64)
        out, names = [], []
        for i in range(d):
            for j in range(i + 1, d):
                Om = np.zeros((d, d))
                Om[i, j], Om[j, i] = 1.0, -1.0
                t: dict[str, np.ndarray] = {}
                for s in self.shifts:
                    if s in theta:
                        t[s] = Om @ np.asarray(theta[s], dtype=np.float64)
                dA = np.zeros_like(A)
                dA[:, :d] = -A[:, :d] @ Om
                t[self.first_layer] = dA
                out.append(t)
                names.append(f"latent rotation ({i}, {j})")
        return out, names


# --------------------------------------------------------------------------- report
@dataclass(frozen=True, eq=False, repr=False)
class ModelIdentifiabilityReport(LocalIdentifiabilityReport):
    """:class:`~perturbax.theory.local.LocalIdentifiabilityReport` of a model-level check, plus
    how the summaries were formed.

    Attributes (in addition to the parent's)
    ----------------------------------------
    symmetry_names
        The declared symmetry directions (``"latent rotation (0, 1)"``, ...).
    sites
        The parameter arrays differentiated (readable names; entries are ``name[i,j]``).
    observable
        The site summarised (``"x_mean"`` or ``"x"``).
    summaries
        ``("mean", "cov")`` or a part of it.
    n_contexts, n_samples
        Contexts (design rows x covariates x times) and simulated cells per context.
    latent_frame
        Whether the base draws were rotated with the parameters (module docstring).
    notes
        Remarks on the choices made automatically (symmetries, frame).
    """

    symmetry_names: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    observable: str = "x_mean"
    summaries: tuple[str, ...] = ("mean", "cov")
    n_contexts: int = 0
    n_samples: int = 0
    latent_frame: bool = False
    notes: tuple[str, ...] = ()

    @property
    def margins(self) -> dict[str, float | None]:
        """The singular values around the cut: ``smallest_kept``, ``largest_dropped``,
        ``tolerance``, and ``gap`` = ``smallest_kept / max(largest_dropped, tiny)`` (how many
        orders of magnitude separate what is counted from what is not)."""
        kept, dropped = self.gap
        ratio = None
        if kept is not None:
            ratio = kept / max(dropped if dropped is not None else 0.0, np.finfo(np.float64).tiny)
        return {"smallest_kept": kept, "largest_dropped": dropped, "tolerance": self.tolerance, "gap": ratio}

    def around_cut(self, width: int = 3) -> np.ndarray:
        """Singular values ``s[rank - width : rank + width]`` (the cut lies after ``width`` of them
        or fewer)."""
        s = self.singular_values
        return s[max(self.rank - width, 0) : self.rank + width]

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(
            symmetry_names=list(self.symmetry_names),
            sites=list(self.sites),
            observable=self.observable,
            summaries=list(self.summaries),
            n_contexts=self.n_contexts,
            n_samples=self.n_samples,
            latent_frame=self.latent_frame,
            notes=list(self.notes),
            margins=self.margins,
            around_cut=[float(v) for v in self.around_cut()],
        )
        return out

    def render(self) -> str:
        lines = super().render().split("\n")
        extra = [
            f"  summaries: {'+'.join(self.summaries)} of {self.observable!r} in {self.n_contexts} context(s), "
            f"{self.n_samples} simulated cells each (common random numbers"
            + (", latent frame rotating with the parameters)" if self.latent_frame else ")"),
            f"  parameters: {join_names(self.sites, 8)}",
            f"  symmetry directions: {join_names(self.symmetry_names, 6)}",
            f"  singular values around the cut: {', '.join(fmt(v) for v in self.around_cut())} "
            f"(gap {fmt(self.margins['gap'])})",
        ]
        extra += [f"  note: {n}" for n in self.notes]
        return "\n".join([lines[0], *extra, *lines[1:]])


# --------------------------------------------------------------------------- frame
@jax.custom_jvp
def _inv_sqrt_spd(S):
    w, U = jnp.linalg.eigh(S)
    return (U * w ** -0.5) @ U.T


@_inv_sqrt_spd.defjvp
def _inv_sqrt_spd_jvp(primals, tangents):
    # Daleckii-Krein: d f(S) = U (F o (U^T dS U)) U^T with F_ij the divided differences of f,
    # f'(w_i) on (near-)coincident eigenvalues -- finite where eigenvector derivatives are not.
    (S,), (dS,) = primals, tangents
    w, U = jnp.linalg.eigh(S)
    f = w ** -0.5
    fp = -0.5 * w ** -1.5
    dw = w[:, None] - w[None, :]
    same = jnp.abs(dw) <= 1e-10 * jnp.max(jnp.abs(w))
    F = jnp.where(same, 0.5 * (fp[:, None] + fp[None, :]), (f[:, None] - f[None, :]) / jnp.where(same, 1.0, dw))
    dSs = 0.5 * (dS + dS.T)
    return (U * f) @ U.T, U @ (F * (U.T @ dSs @ U)) @ U.T


def _frame(A_z):
    """``O = (A_z^T A_z)^{-1/2} A_z^T`` (``d x H``, orthonormal rows); ``O(A_z R^T) = R O(A_z)``."""
    return _inv_sqrt_spd(A_z.T @ A_z) @ A_z.T


# --------------------------------------------------------------------------- helpers
def _readable_leaves(site: str, value) -> list[tuple[str, Any]]:
    """``[(readable name, leaf)]`` of a param site (``"decoder$params"`` -> ``"decoder.layers.0.weight"``)."""
    base = site[: -len(_PARAMS_SUFFIX)] if site.endswith(_PARAMS_SUFFIX) else site
    leaves = jax.tree_util.tree_flatten_with_path(value)[0]
    if len(leaves) == 1 and not leaves[0][0]:
        return [(base, leaves[0][1])]
    return [(".".join([base, *(_key_str(k) for k in path)]), leaf) for path, leaf in leaves]


def _as_float64(x):
    a = np.asarray(x)
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a


def _uses_time(config) -> bool:
    from perturbax.models.registry import uses_time

    return uses_time(config)


def _contexts(design, covariates, times, config) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    L = np.asarray(design, dtype=np.float64)
    if L.ndim != 2 or L.shape[0] == 0:
        raise ValueError(f"design must be a non-empty (n_contexts, K) array of label vectors, got shape {L.shape}.")
    if not np.all(np.isfinite(L)):
        raise ValueError("design has NaN/Inf entries.")
    K = getattr(config, "n_perturbations", None)
    if K is not None and L.shape[1] != K:
        raise ValueError(f"design has {L.shape[1]} columns but the model has n_perturbations={K}.")
    C_needed = int(getattr(config, "n_covariates", 0) or 0)
    C = None
    if covariates is None and C_needed:
        # every design row in every covariate level (one-hot), as in data measured in each batch
        eye = np.eye(C_needed)
        L, C = np.repeat(L, C_needed, axis=0), np.tile(eye, (L.shape[0], 1))
    elif covariates is not None:
        C = np.asarray(covariates, dtype=np.float64)
        if C.ndim == 1:
            C = np.broadcast_to(C, (L.shape[0], C.size)).copy()
        if C.ndim != 2 or C.shape[0] != L.shape[0]:
            raise ValueError(
                f"covariates must be (n_contexts, C) aligned with design ({L.shape[0]} rows), got {C.shape}."
            )
        if C_needed and C.shape[1] != C_needed:
            raise ValueError(f"covariates have {C.shape[1]} columns but the model has n_covariates={C_needed}.")
    T = None
    if times is not None:
        ts = np.atleast_1d(np.asarray(times, dtype=np.float64))
        if ts.ndim != 1 or ts.size == 0 or not np.all(np.isfinite(ts)) or np.any(ts < 0):
            raise ValueError(f"times must be finite numbers >= 0 (time since the perturbation), got {times!r}.")
        n = L.shape[0]
        L = np.repeat(L, ts.size, axis=0)  # perturbation-major: every time of the first row first
        C = None if C is None else np.repeat(C, ts.size, axis=0)
        T = np.tile(ts, n)
    elif _uses_time(config):
        raise ValueError(
            "This model describes cells over time: pass times=[...] (time since the perturbation was "
            "switched on) to choose the (perturbation, time) contexts."
        )
    return L, C, T


def _unwrap(fn):
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn


def _in_cells(site) -> bool:
    return any(f.name == CELL_PLATE for f in site.get("cond_indep_stack", ()))


# --------------------------------------------------------------------------- summary map
@dataclass(frozen=True)
class ModelSummary:
    """The expected observable summaries of a model as a differentiable function.

    Attributes
    ----------
    fn
        ``theta -> 1-d array``: for each context (context-major) the mean of the observable
        (``G`` entries) and/or the upper triangle of its covariance over the simulated cells
        (``G(G+1)/2``), computed with common random numbers (module docstring). Call it inside
        ``jax.enable_x64(True)`` for float64.
    params
        ``theta`` at the requested parameter value: ``{readable name: float64 array}``.
    symmetries, symmetry_names
        Declared symmetry tangents (dicts over the readable names, or callables) and their names.
    sites, observable, summaries, n_contexts, n_samples, latent_frame, notes
        As in :class:`ModelIdentifiabilityReport`.
    contexts
        ``{"design": (n_contexts, K), "covariates": (n_contexts, C) or None, "times": (n_contexts,) or
        None}``: the context of each block of ``fn``'s output.
    """

    fn: Callable
    params: dict[str, np.ndarray]
    symmetries: tuple
    symmetry_names: tuple[str, ...]
    sites: tuple[str, ...]
    observable: str
    summaries: tuple[str, ...]
    n_contexts: int
    n_samples: int
    latent_frame: bool
    notes: tuple[str, ...]
    contexts: dict[str, np.ndarray | None]


def model_summary_fn(
    model: Callable,
    design,
    params: Mapping[str, Any] | None = None,
    *,
    config: Any = None,
    n_cells: int | None = None,
    sites: Sequence[str] | None = None,
    symmetries: str | Sequence = "auto",
    n_samples: int = 1000,
    seed: int = 0,
    observable: str = "auto",
    summaries: Sequence[str] = ("mean", "cov"),
    covariates=None,
    times=None,
    library: float = 1.0,
    latent_frame: bool | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> ModelSummary:
    """The summary map that :func:`model_identifiability` differentiates (same arguments), for
    inspection or for other analyses (e.g. a Jacobian of your own)."""
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 (a covariance needs two cells), got {n_samples}.")
    summaries = tuple(summaries)
    if not summaries or set(summaries) - {"mean", "cov"}:
        raise ValueError(f"summaries must be a non-empty subset of ('mean', 'cov'), got {summaries}.")
    L, C, T = _contexts(design, covariates, times, config)
    n_ctx = L.shape[0]
    n_total = n_ctx * n_samples
    # the plate must hold the simulated cells; its size only scales densities, which are not used
    kwargs = {"config": config, "n_cells": max(int(n_cells or 0), n_total), **(model_kwargs or {})}
    user = dict(params or {})

    def batch(dtype, per_context=n_samples):
        return Batch(
            x=None,
            l=jnp.asarray(np.repeat(L, per_context, axis=0), dtype=dtype),
            c=None if C is None else jnp.asarray(np.repeat(C, per_context, axis=0), dtype=dtype),
            library=jnp.full((n_ctx * per_context,), float(library), dtype=dtype),
            t=None if T is None else jnp.asarray(np.repeat(T, per_context), dtype=dtype),
        )

    # ---- one small reference run: the sites, their shapes, values of globals not given
    def given(msg):  # global sites only: per-cell values in params are refused below
        return None if _in_cells(msg) and msg["type"] != "param" else user.get(msg["name"])

    # The run is jitted (one compilation instead of op-by-op dispatch); the site table is recorded
    # while tracing, the values of global sites (and the standard-normal test) come back from it.
    ref: dict[str, dict[str, Any]] = {}

    def run(key):
        tr = handlers.trace(handlers.seed(handlers.substitute(model, substitute_fn=given), key)).get_trace(
            batch(jnp.float32, 2), **kwargs
        )
        out, std = {}, {}
        for n, site in tr.items():
            if site["type"] not in ("sample", "param", "deterministic"):
                continue
            cells = _in_cells(site)
            ref[n] = {
                "type": site["type"],
                "in_cells": cells,
                "is_observed": bool(site.get("is_observed", False)),
                "discrete": site["type"] == "sample" and bool(getattr(site["fn"].support, "is_discrete", False)),
                "shape": tuple(np.shape(site["value"])) if site["type"] != "param" else None,
            }
            if site["type"] == "param" or not cells:
                out[n] = site["value"]
            if site["type"] == "sample" and cells:
                fn = _unwrap(site["fn"])
                if isinstance(fn, dist.Normal):
                    std[n] = jnp.all(fn.loc == 0.0) & jnp.all(fn.scale == 1.0)
        return out, std

    out, std = jax.jit(run)(jax.random.PRNGKey(seed))
    for n, v in out.items():
        ref[n]["value"] = v
    for n, flag in std.items():
        ref[n]["standard_normal"] = bool(flag)
    unknown = set(user) - set(ref)
    if unknown:
        raise ValueError(f"params names site(s) the model does not have: {sorted(unknown)}; its sites: {sorted(ref)}.")
    per_cell = sorted(n for n in user if ref[n]["in_cells"] and ref[n]["type"] != "param")
    if per_cell:
        raise ValueError(f"params may only hold global sites; {per_cell} are per-cell sites (simulated here).")
    sample_globals = [
        n for n, s in ref.items()
        if s["type"] == "sample" and not s["is_observed"] and not s["in_cells"] and not s["discrete"]
    ]
    det_globals = [n for n, s in ref.items() if s["type"] == "deterministic" and not s["in_cells"]]
    param_sites = [n for n, s in ref.items() if s["type"] == "param"]
    if observable == "auto":
        observable = "x_mean" if "x_mean" in ref else "x"
    if observable not in ref:
        raise ValueError(f"The model has no site {observable!r} to summarise; its sites: {sorted(ref)}.")

    # readable parameter table: name -> (site, leaf index or None)
    table: dict[str, tuple[str, int | None]] = {}
    values: dict[str, np.ndarray] = {}
    for n in [*sample_globals, *det_globals]:
        table[n] = (n, None)
        values[n] = _as_float64(ref[n]["value"])
    treedefs = {}
    for n in param_sites:
        leaves = _readable_leaves(n, ref[n]["value"])
        treedefs[n] = jax.tree_util.tree_structure(ref[n]["value"])
        for i, (rn, leaf) in enumerate(leaves):
            table[rn] = (n, i)
            values[rn] = _as_float64(leaf)

    # ---- which parameters
    replaced = {n for d in det_globals for n in (d + p for p in _HORSESHOE_PARTS) if n in sample_globals}
    if sites is None:
        chosen = [n for n in sample_globals if n not in replaced]
        chosen += [d for d in det_globals if any(d + p in replaced for p in _HORSESHOE_PARTS)]
        dec = "decoder" + _PARAMS_SUFFIX
        if dec in param_sites:
            first = next((rn for rn, (s, _) in table.items() if s == dec and np.ndim(values[rn]) == 2), None)
            if first is not None:
                chosen.append(first)
    else:
        chosen = []
        for want in ([sites] if isinstance(sites, str) else sites):
            if want in table:
                hits = [want]
            else:
                site = want if want in param_sites else want + _PARAMS_SUFFIX
                hits = [rn for rn, (s, _) in table.items() if s == site]
            if not hits:
                raise ValueError(f"Unknown parameter {want!r}; available: {join_names(sorted(table), 30)}.")
            chosen += [h for h in hits if h not in chosen]
    bad = [n for n in chosen if not np.issubdtype(values[n].dtype, np.floating)]
    if bad:
        raise ValueError(f"Parameters {bad} are not real-valued and cannot be differentiated.")
    if not chosen:
        raise ValueError("No parameter to differentiate: the model has no global latent site; pass sites=[...].")
    theta0 = {n: values[n] for n in chosen}

    # ---- latent rotation structure
    notes: list[str] = []
    rot = None
    user_syms: list = []
    if isinstance(symmetries, str):
        if symmetries != "auto":
            raise ValueError(f"symmetries must be 'auto' or a sequence, got {symmetries!r}.")
        detected, why = _detect_rotation(LatentRotation(), ref, table, values, set(chosen))
        declare = detected is not None and why is None
        rot = detected
        if why:
            notes.append(why)
    else:
        declare = False
        for item in symmetries:
            if isinstance(item, LatentRotation):
                detected, why = _detect_rotation(item, ref, table, values, set(chosen))
                if detected is None or why is not None:
                    raise ValueError(f"Cannot declare {item}: {why or 'the model lacks its sites'}.")
                rot, declare = detected, True
            else:
                user_syms.append(item)
        if rot is None:
            rot, _ = _detect_rotation(LatentRotation(), ref, table, values, set(chosen))
    d = int(ref[rot.latent]["shape"][-1]) if rot is not None else 0
    use_frame = rot is not None if latent_frame is None else bool(latent_frame)
    if use_frame and rot is None:
        raise ValueError(
            "latent_frame=True needs the latent rotation structure: a standard-normal per-cell site "
            "'z_base', a first-layer weight matrix with at least latent_dim columns and rows, and shift sites."
        )
    if use_frame:
        A_z = values[rot.first_layer][:, :d]
        sv = np.linalg.svd(A_z, compute_uv=False)
        if A_z.shape[0] < d or sv[-1] <= 1e-8 * sv[0]:
            raise ValueError(
                f"The first layer {rot.first_layer!r} has rank < latent_dim={d} on its latent columns: some latent "
                f"direction never reaches the observations (it is not identifiable at all). Pass latent_frame=False "
                f"to run the check with plain common random numbers."
            )

    sym_list: list = []
    sym_names: list[str] = []
    if declare and rot is not None:
        tans, names = rot.tangents(theta0, d)
        sym_list += tans
        sym_names += names
    for i, item in enumerate(user_syms):
        sym_list.append(item)
        sym_names.append(getattr(item, "__name__", f"symmetry {i}"))

    # ---- the summary map
    key = jax.random.PRNGKey(seed)
    eps = None
    if use_frame:  # fixed standard-normal draws in R^H, projected by the frame O(A)
        eps = np.random.default_rng(seed).standard_normal((n_samples, values[rot.first_layer].shape[0]))
    fixed_sites = {n: ref[n]["value"] for n in sample_globals}
    fixed_sites.update({n: v for n, v in user.items() if n not in param_sites})

    def summary(theta):
        dtype = next(iter(theta.values())).dtype

        def cast(v):
            return jnp.asarray(v, dtype=dtype) if np.issubdtype(np.asarray(v).dtype, np.floating) else v

        data = {n: jax.tree.map(cast, v) for n, v in fixed_sites.items()}
        for n in param_sites:
            base = user.get(n, ref[n]["value"])
            leaves = [cast(x) for x in jax.tree_util.tree_leaves(base)]
            for rn, (s, i) in table.items():
                if s == n and rn in theta:
                    leaves[i] = theta[rn]
            data[n] = jax.tree_util.tree_unflatten(treedefs[n], leaves)
        for n in [*sample_globals, *det_globals]:
            if n in theta:
                data[n] = theta[n]
        if use_frame:
            A_first = theta[rot.first_layer] if rot.first_layer in theta else cast(values[rot.first_layer])
            O = _frame(A_first[:, :d])
            z = jnp.asarray(eps, dtype=dtype) @ O.T  # same base cells in every context
            data[rot.latent] = jnp.tile(z, (n_ctx, 1))
        tr = handlers.trace(handlers.seed(handlers.substitute(model, data=data), key)).get_trace(batch(dtype), **kwargs)
        y = jnp.asarray(tr[observable]["value"], dtype=dtype).reshape(n_ctx, n_samples, -1)
        out = []
        m = jnp.mean(y, axis=1)
        if "mean" in summaries:
            out.append(m.ravel())
        if "cov" in summaries:
            yc = y - m[:, None, :]
            cov = jnp.einsum("cng,cnh->cgh", yc, yc) / (n_samples - 1)
            iu = np.triu_indices(y.shape[-1])
            out.append(cov[:, iu[0], iu[1]].ravel())
        return jnp.concatenate(out)

    notes_out = list(notes)
    if use_frame:
        notes_out.append(
            "base draws rotate with the parameters (latent frame), so latent rotations are exact null "
            "directions of the simulated summaries"
        )
    elif rot is not None and declare:
        notes_out.append("plain common random numbers: latent rotations are null only up to Monte-Carlo error")
    return ModelSummary(
        fn=summary,
        params=theta0,
        symmetries=tuple(sym_list),
        symmetry_names=tuple(sym_names),
        sites=tuple(chosen),
        observable=observable,
        summaries=summaries,
        n_contexts=n_ctx,
        n_samples=int(n_samples),
        latent_frame=use_frame,
        notes=tuple(notes_out),
        contexts={"design": L, "covariates": C, "times": T},
    )


# --------------------------------------------------------------------------- main
def model_identifiability(
    model: Callable,
    design,
    params: Mapping[str, Any] | None = None,
    *,
    config: Any = None,
    n_cells: int | None = None,
    sites: Sequence[str] | None = None,
    symmetries: str | Sequence = "auto",
    mask: Mapping[str, Any] | None = None,
    n_samples: int = 1000,
    seed: int = 0,
    rtol: float | None = None,
    observable: str = "auto",
    summaries: Sequence[str] = ("mean", "cov"),
    covariates=None,
    times=None,
    library: float = 1.0,
    latent_frame: bool | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    max_directions: int = 10,
) -> ModelIdentifiabilityReport:
    """Local identifiability of a NumPyro model at ``params`` on the contexts of ``design``.

    Parameters
    ----------
    model
        ``model(batch, *, config, n_cells, **model_kwargs)`` following the site conventions of
        :mod:`perturbax.models.blocks` (e.g. :func:`perturbax.models.additive_shift_model`).
    design
        ``(n_rows, K)`` label vectors, one context per row (include the control row of zeros).
    params
        Values of global sites by site name: sample sites (``"W"``) and param sites
        (``"decoder$params"``, a pytree), e.g. a fit's parameters with posterior means. Missing
        global sites take one fixed draw from the prior and param sites their initial values.
    config
        Passed to the model as ``config=``.
    n_cells
        The model's ``n_cells`` (size of the ``"cells"`` plate); default, and at least, the number
        of simulated cells. It only scales densities, which the summaries do not use.
    sites
        Parameters to differentiate: site names or readable leaf names (see the module
        docstring); default the global latent sample sites plus the decoder's first-layer weights.
    symmetries
        ``"auto"``: the latent rotation (:class:`LatentRotation`) where the model has its
        structure (standard-normal ``z_base``, a shift site ``W``, a decoder first layer, and all
        of them among ``sites``), else none. Or a sequence of :class:`LatentRotation` objects and
        tangents / callables as :func:`~perturbax.theory.local.local_identifiability` takes them
        (over the readable parameter names).
    mask
        ``{readable name: boolean array}``: entries to keep fixed (``False``), e.g. to fix a gauge.
    n_samples
        Simulated cells per context (the Monte-Carlo sample size).
    seed
        Seed of the common random numbers and of prior draws for global sites not in ``params``.
    rtol
        Rank tolerance relative to the largest singular value (default ``1e-7`` in float64).
    observable
        Site to summarise: ``"auto"`` = ``"x_mean"`` if the model has it, else ``"x"``.
    summaries
        ``"mean"`` and/or ``"cov"`` (upper triangle of the covariance over cells) per context.
    covariates
        ``(n_rows, C)`` covariate rows aligned with ``design``; default for a model with covariates:
        every design row in every one-hot covariate level.
    times
        Times for models of time: contexts are then (row, time) pairs, perturbation-major.
    library
        Library size of the simulated cells (count likelihoods).
    latent_frame
        Rotate the base draws with the parameters (module docstring); default: when the latent
        rotation structure is present. ``False``: plain common random numbers.
    model_kwargs
        Extra keyword arguments of the model.
    max_directions
        How many unexpected null directions to describe.

    Returns
    -------
    ModelIdentifiabilityReport
        ``n_unexpected == 0`` and status ``"ok"`` when every null direction is a declared
        symmetry; ``unexpected_directions`` / ``unexpected_entries`` name the others.
    """
    ms = model_summary_fn(
        model,
        design,
        params,
        config=config,
        n_cells=n_cells,
        sites=sites,
        symmetries=symmetries,
        n_samples=n_samples,
        seed=seed,
        observable=observable,
        summaries=summaries,
        covariates=covariates,
        times=times,
        library=library,
        latent_frame=latent_frame,
        model_kwargs=model_kwargs,
    )
    try:
        rep = local_identifiability(
            ms.fn, ms.params, symmetries=list(ms.symmetries), mask=mask, rtol=rtol, max_directions=max_directions
        )
    except FloatingPointError as err:
        raise FloatingPointError(
            f"{err} The model produced NaN/Inf summaries or derivatives at these parameters (check params, "
            f"and that {ms.observable!r} is continuous in them)."
        ) from None
    base = {f.name: getattr(rep, f.name) for f in dataclasses.fields(LocalIdentifiabilityReport)}
    if rep.n_unexpected == 0 and ms.symmetry_names:
        base["message"] += f" Declared: {join_names(ms.symmetry_names, 6)}."
    report = ModelIdentifiabilityReport(
        **base,
        symmetry_names=ms.symmetry_names,
        sites=ms.sites,
        observable=ms.observable,
        summaries=ms.summaries,
        n_contexts=ms.n_contexts,
        n_samples=ms.n_samples,
        latent_frame=ms.latent_frame,
        notes=ms.notes,
    )
    if report.status == WARNING and not ms.latent_frame and ms.symmetry_names:
        report = dataclasses.replace(
            report,
            message=report.message
            + " Without the latent frame the base draws do not rotate with the parameters, so the rotations are "
            "null only up to Monte-Carlo error; use the default latent_frame.",
        )
    return report


def _detect_rotation(
    spec: LatentRotation, ref, table, values, chosen: set[str]
) -> tuple[LatentRotation | None, str | None]:
    """(spec if the model has the rotation structure else None, reason it cannot be declared or None)."""
    z = ref.get(spec.latent)
    if z is None or z["type"] != "sample" or not z["in_cells"]:
        return None, None
    if not z.get("standard_normal", False):
        return None, (
            f"{spec.latent!r} is not standard normal, so latent rotations are not a symmetry (none declared)"
        )
    d = int(z["shape"][-1])
    if spec.first_layer not in table or np.ndim(values[spec.first_layer]) != 2:
        return None, None
    A = values[spec.first_layer]
    if A.shape[1] < d or A.shape[0] < d:
        return None, None
    present = [s for s in spec.shifts if s in table]
    if not present or any(np.shape(values[s])[:1] != (d,) for s in present):
        return None, None
    moved = [spec.first_layer, *present]
    fixed = [m for m in moved if m not in chosen]
    found = dataclasses.replace(spec, shifts=tuple(present))
    if fixed:
        return found, (
            f"latent rotations not declared: they move {fixed}, which are held fixed (not among the parameters)"
        )
    return found, None
