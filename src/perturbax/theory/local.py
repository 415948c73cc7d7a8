"""Model-level local identifiability: the rank of the Jacobian of expected observable summaries.

At a parameter value ``theta`` the map ``theta -> s(theta)`` (expected per-context means and
covariances of what is observed) has Jacobian ``J``. Directions in the null space of ``J`` change
the parameters without changing anything the data can see. Some are expected -- they come from a
known symmetry of the model, e.g. rotations of the latent space in the additive-shift model
(``d(d-1)/2`` directions). Any *further* null direction is a parameter combination the data cannot
determine: the model is not locally identifiable at ``theta``.

:func:`local_identifiability` takes any ``summary_fn(params) -> array`` (or pytree of arrays) and
a parameter pytree (typically a dict of arrays), differentiates with ``jax.jacfwd``, and reports
the rank, the singular values, and the unexpected null directions in parameter names (``"W[0,2]"``)
after removing the declared symmetry directions.

Precision: by default the Jacobian is computed in float64 inside ``jax.enable_x64(True)``, a
*scoped* (context-manager) setting -- the global JAX configuration is not changed. Pass
``x64=False`` to compute in the default precision; then the default rank tolerance is looser.

Closed-form helpers
-------------------
- Linear-Gaussian additive shift (DESIGN 2.1 with a linear decoder): ``x = A z + b + noise``,
  ``z ~ N(W l, I)``, noise ``N(0, s^2 I)``. :func:`linear_gaussian_summary_fn` gives the
  per-context means ``A W l + b`` and the covariance ``A A^T + s^2 I``;
  :func:`latent_rotations` gives the tangents of ``A -> A R, W -> R^T W``. On a design with
  ``rank = K`` and ``G > d`` genes exactly ``d(d-1)/2`` null directions remain, all rotations; a
  too-small design leaves the shifts of unmeasured perturbations free as well.
- Linear latent dynamics (DESIGN 2.2): ``dz/dt = (B - I)(z - mu) + S l`` with ``B`` strictly lower
  triangular. :func:`linear_dynamics_summary_fn` gives the means
  ``mu + (I - exp((B - I) t)) W l``, ``W = (I - B)^{-1} S`` at the requested times
  (``t = inf``: steady state ``mu + W l``); :func:`linear_dynamics_mask` fixes the entries of ``B``
  that are not free; :func:`bs_equivalences` gives the tangents of the family of ``(B, S)`` with
  the same ``W``. Steady-state summaries depend on ``W`` only, so they leave ``l(l-1)/2``
  directions of ``(B, S)`` undetermined; two or more time points generically identify ``B`` and
  ``S``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from perturbax.theory.report import FAIL, OK, WARNING, ReportMixin, fmt, join_names, top_weights

__all__ = [
    "NullDirection",
    "LocalIdentifiabilityReport",
    "local_identifiability",
    "parameter_names",
    "linear_gaussian_summary_fn",
    "latent_rotations",
    "linear_dynamics_summary_fn",
    "linear_dynamics_mask",
    "bs_equivalences",
]

_DEFAULT_RTOL = {"float64": 1e-7, "float32": 1e-3}


# --------------------------------------------------------------------------- names
def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def parameter_names(params) -> tuple[str, ...]:
    """Names of the entries of a parameter pytree in ``ravel_pytree`` order: ``"W[0,2]"`` for
    entry ``(0, 2)`` of ``params["W"]``, ``"s"`` for a scalar, ``"enc.w[3]"`` for nested dicts."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    out: list[str] = []
    for path, leaf in leaves:
        base = ".".join(_key_str(k) for k in path) or "param"
        shape = np.shape(leaf)
        if shape == ():
            out.append(base)
        else:
            out.extend(f"{base}[{','.join(map(str, idx))}]" for idx in np.ndindex(*shape))
    return tuple(out)


def _group_of(name: str) -> str:
    return name.split("[", 1)[0]


# --------------------------------------------------------------------------- report
@dataclass(frozen=True, eq=False)
class NullDirection:
    """One unexpected null direction (unit vector over the free parameters).

    Attributes
    ----------
    weights
        Entries carrying weight (``|v_i| >= 0.05 max|v|``, at most 8), by parameter name.
    by_parameter
        Share of the squared norm per parameter array (sums to 1).
    """

    weights: dict[str, float]
    by_parameter: dict[str, float]

    def describe(self) -> str:
        ent = ", ".join(f"{k} {v:+.2f}" for k, v in self.weights.items())
        grp = ", ".join(f"{k} {v:.0%}" for k, v in self.by_parameter.items())
        return f"{ent} (weight: {grp})"

    def to_dict(self) -> dict:
        return {"weights": dict(self.weights), "by_parameter": dict(self.by_parameter)}


@dataclass(frozen=True, eq=False, repr=False)
class LocalIdentifiabilityReport(ReportMixin):
    """Result of :func:`local_identifiability`.

    Attributes
    ----------
    n_params, n_summaries
        Free parameters (columns of ``J``) and summaries (rows).
    rank, singular_values, tolerance, rtol
        Rank of ``J`` counting singular values above ``tolerance = rtol * s_max``.
    n_null
        ``n_params - rank``.
    n_symmetries
        Dimension of the span of the declared symmetry tangents.
    symmetry_defect
        ``||J Q|| / s_max`` for an orthonormal basis ``Q`` of that span (``~0`` if the declared
        symmetries are true null directions; ``None`` without symmetries).
    n_unexpected
        Null directions of ``J`` outside the symmetry span (``rank`` deficit of ``J`` restricted
        to the orthogonal complement of the symmetries).
    unexpected_directions
        An orthonormal basis of those directions (at most ``max_directions``), in parameter names.
    unexpected_by_parameter
        How the unexpected null space splits over the parameter arrays (sums to ``n_unexpected``).
    unexpected_entries
        Entries taking part in the unexpected null space (diagonal of its projector, ``>= 0.01``).
    parameter_names
        Names of the free parameters (columns of ``J``).
    dtype
        Precision of the Jacobian.
    """

    status: str
    message: str
    n_params: int
    n_summaries: int
    rank: int
    singular_values: np.ndarray
    tolerance: float
    rtol: float
    n_null: int
    n_symmetries: int
    symmetry_defect: float | None
    n_unexpected: int
    unexpected_directions: tuple[NullDirection, ...]
    unexpected_by_parameter: dict[str, float]
    unexpected_entries: dict[str, float]
    parameter_names: tuple[str, ...]
    dtype: str

    @property
    def identifiable(self) -> bool:
        """No unexpected null direction."""
        return self.n_unexpected == 0

    @property
    def gap(self) -> tuple[float | None, float | None]:
        """(smallest singular value kept, largest dropped)."""
        s = self.singular_values
        kept = float(s[self.rank - 1]) if self.rank else None
        dropped = float(s[self.rank]) if s.size > self.rank else None
        return kept, dropped

    def to_dict(self) -> dict:
        kept, dropped = self.gap
        return {
            "status": self.status,
            "message": self.message,
            "n_params": self.n_params,
            "n_summaries": self.n_summaries,
            "rank": self.rank,
            "n_null": self.n_null,
            "n_symmetries": self.n_symmetries,
            "symmetry_defect": self.symmetry_defect,
            "n_unexpected": self.n_unexpected,
            "identifiable": self.identifiable,
            "rtol": self.rtol,
            "tolerance": self.tolerance,
            "smallest_retained": kept,
            "largest_dropped": dropped,
            "singular_values": [float(x) for x in self.singular_values],
            "unexpected_directions": [d.to_dict() for d in self.unexpected_directions],
            "unexpected_by_parameter": dict(self.unexpected_by_parameter),
            "unexpected_entries": dict(self.unexpected_entries),
            "dtype": self.dtype,
        }

    def render(self) -> str:
        kept, dropped = self.gap
        lines = [
            f"Local identifiability: {self.status.upper()}",
            f"  Jacobian {self.n_summaries} summaries x {self.n_params} parameters ({self.dtype}): rank "
            f"{self.rank}, null space {self.n_null} (tolerance {fmt(self.tolerance)}; smallest kept "
            f"{fmt(kept)}, largest dropped {fmt(dropped)})",
            f"  declared symmetries: {self.n_symmetries} direction(s)"
            + ("" if self.symmetry_defect is None else f", defect {fmt(self.symmetry_defect)}"),
            f"  unexpected null directions: {self.n_unexpected}",
        ]
        if self.unexpected_by_parameter:
            lines.append(
                "  involving: " + ", ".join(f"{k} ({v:.2g})" for k, v in self.unexpected_by_parameter.items())
            )
        for i, d in enumerate(self.unexpected_directions):
            lines.append(f"    {i + 1}. {d.describe()}")
        lines.append(f"  {self.message}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- core
def _x64_context(x64: bool):
    if not x64:
        return contextlib.nullcontext()
    ctx = getattr(jax, "enable_x64", None)
    if ctx is None:  # pragma: no cover - older JAX
        from jax.experimental import enable_x64 as ctx  # type: ignore[no-redef]

        return ctx()
    return ctx(True)


def _fill_tangent(tangent, params):
    """A tangent given as a sub-dict of ``params`` is completed with zeros."""
    if isinstance(params, Mapping) and isinstance(tangent, Mapping):
        unknown = set(tangent) - set(params)
        if unknown:
            raise ValueError(f"Symmetry tangent names unknown parameters {sorted(unknown)}; known: {sorted(params)}.")
        return {k: (_fill_tangent(tangent[k], v) if k in tangent else jax.tree.map(jnp.zeros_like, v))
                for k, v in params.items()}
    return jax.tree.map(lambda t, p: jnp.broadcast_to(jnp.asarray(t, dtype=p.dtype), p.shape), tangent, params)


def _tangent_list(symmetries, params) -> list:
    out = []
    items = symmetries if isinstance(symmetries, (list, tuple)) else [symmetries]
    for item in items:
        value = item(params) if callable(item) else item
        family = value if isinstance(value, list) else [value]
        for t in family:
            out.append(_fill_tangent(t, params))
    return out


def _mask_vector(mask, params, n: int) -> np.ndarray:
    if mask is None:
        return np.ones(n, dtype=bool)
    if isinstance(params, Mapping) and isinstance(mask, Mapping):
        unknown = set(mask) - set(params)
        if unknown:
            raise ValueError(f"mask names unknown parameters {sorted(unknown)}; known: {sorted(params)}.")
        full = {
            k: (jax.tree.map(lambda p, m=mask[k]: np.broadcast_to(np.asarray(m, dtype=bool), np.shape(p)), v)
                if k in mask else jax.tree.map(lambda p: np.ones(np.shape(p), dtype=bool), v))
            for k, v in params.items()
        }
    else:
        full = jax.tree.map(lambda m, p: np.broadcast_to(np.asarray(m, dtype=bool), np.shape(p)), mask, params)
    leaves = [np.asarray(x, dtype=bool).ravel() for x in jax.tree_util.tree_leaves(full)]
    vec = np.concatenate(leaves) if leaves else np.zeros(0, dtype=bool)
    if vec.size != n:
        raise ValueError(f"mask covers {vec.size} entries but the parameters have {n}.")
    return vec


def _orthonormal_span(T: np.ndarray, rtol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """(basis of span(T columns), basis of its orthogonal complement)."""
    p = T.shape[0]
    if T.shape[1] == 0:
        return np.zeros((p, 0)), np.eye(p)
    U, s, _ = np.linalg.svd(T, full_matrices=True)
    r = int(np.sum(s > rtol * s[0])) if s.size and s[0] > 0 else 0
    return U[:, :r], U[:, r:]


def local_identifiability(
    summary_fn: Callable,
    params,
    *,
    symmetries: Sequence | Callable = (),
    mask=None,
    rtol: float | None = None,
    x64: bool = True,
    max_directions: int = 10,
) -> LocalIdentifiabilityReport:
    """Local identifiability of a model at ``params`` from the Jacobian of its summaries.

    Parameters
    ----------
    summary_fn
        ``params -> array`` (or pytree of arrays) of expected observable summaries, e.g. the
        per-context means and covariances. Must be written with ``jax.numpy``.
    params
        Parameter pytree (dict of arrays) at which to evaluate.
    symmetries
        Declared symmetries, each either a tangent (a pytree like ``params``, or for dict
        parameters a dict of some of its keys; missing keys are zero), a list of tangents, or a
        callable ``params -> tangent`` / ``params -> [tangents]`` (a generator family, e.g.
        :func:`latent_rotations`). Their span is removed before counting null directions.
    mask
        Which entries are free parameters: a pytree of booleans like ``params`` or, for dict
        parameters, a dict of some keys (others fully free), e.g. :func:`linear_dynamics_mask`.
        Fixed entries are excluded from ``J`` (structural zeros such as an acyclic ``B``).
    rtol
        Rank tolerance relative to the largest singular value of ``J``; default ``1e-7`` in float64,
        ``1e-3`` in float32.
    x64
        Compute in float64 within a scoped ``jax.enable_x64(True)`` (the global configuration is
        left alone). ``summary_fn`` must not hard-code float32.
    max_directions
        How many unexpected null directions to describe.
    """
    with _x64_context(x64):
        dtype = jnp.float64 if x64 else jnp.asarray(0.0).dtype
        p_c = jax.tree.map(lambda a: jnp.asarray(a, dtype=dtype), params)
        flat, unravel = ravel_pytree(p_c)
        n = int(flat.size)
        if n == 0:
            raise ValueError("params has no entries.")
        names_all = parameter_names(p_c)
        free = _mask_vector(mask, params, n)
        free_idx = np.flatnonzero(free)
        if free_idx.size == 0:
            raise ValueError("mask leaves no free parameter.")
        fidx = jnp.asarray(free_idx)

        def f(u):
            out = summary_fn(unravel(flat.at[fidx].set(u)))
            vec, _ = ravel_pytree(out)
            return vec

        tangents = _tangent_list(symmetries, p_c)
        tvecs = []
        for i, t in enumerate(tangents):
            if jax.tree.structure(t) != jax.tree.structure(p_c):
                raise ValueError(f"Symmetry tangent {i} does not have the structure of params.")
            v = np.asarray(ravel_pytree(t)[0], dtype=np.float64)
            nv = float(np.linalg.norm(v))
            fixed_part = float(np.linalg.norm(v[~free]))
            if nv > 0 and fixed_part > 1e-8 * nv:
                raise ValueError(
                    f"Symmetry tangent {i} moves entries that mask fixes "
                    f"({join_names([names_all[k] for k in np.flatnonzero((~free) & (np.abs(v) > 0))], 5)})."
                )
            tvecs.append(v[free_idx])
        J = np.asarray(jax.jit(jax.jacfwd(f))(flat[fidx]), dtype=np.float64)
        dtype_name = str(np.dtype(flat.dtype))
    if not np.isfinite(J).all():
        raise FloatingPointError("The Jacobian of summary_fn has NaN/Inf entries at these parameters.")
    names = tuple(names_all[k] for k in free_idx)
    p = J.shape[1]
    rtol = _DEFAULT_RTOL.get(dtype_name, 1e-3) if rtol is None else float(rtol)
    s = np.linalg.svd(J, compute_uv=False) if J.size else np.zeros(0)
    s_max = float(s[0]) if s.size else 0.0
    tol = rtol * s_max
    rank = int(np.sum(s > tol)) if s_max > 0 else 0
    T = np.stack(tvecs, axis=1) if tvecs else np.zeros((p, 0))
    Qsym, Perp = _orthonormal_span(T)
    n_sym = Qsym.shape[1]
    defect = None
    if n_sym:
        defect = float(np.linalg.norm(J @ Qsym, 2) / s_max) if s_max > 0 else 0.0
    Jp = J @ Perp
    if Jp.size:
        _, sp_, Vt_p = np.linalg.svd(Jp, full_matrices=True)
        rank_p = int(np.sum(sp_ > tol)) if s_max > 0 else 0
        N = Perp @ Vt_p[rank_p:].T
    else:
        N = np.zeros((p, 0))
    n_unexp = N.shape[1]
    groups = [_group_of(nm) for nm in names]
    dirs = []
    for k in range(min(n_unexp, max_directions)):
        v = N[:, k]
        share: dict[str, float] = {}
        for g, x in zip(groups, v**2):
            share[g] = share.get(g, 0.0) + float(x)
        share = {g: w for g, w in sorted(share.items(), key=lambda kv: -kv[1]) if w >= 1e-3}
        dirs.append(NullDirection(weights=top_weights(v, names), by_parameter=share))
    diag = np.sum(N**2, axis=1) if n_unexp else np.zeros(p)
    by_param: dict[str, float] = {}
    for g, x in zip(groups, diag):
        by_param[g] = by_param.get(g, 0.0) + float(x)
    by_param = {g: w for g, w in sorted(by_param.items(), key=lambda kv: -kv[1]) if w >= 1e-3}
    order = np.argsort(-diag, kind="stable")
    entries = {names[i]: float(diag[i]) for i in order if diag[i] >= 0.01}

    n_null = p - rank
    sym_ok = defect is None or defect <= max(tol / s_max if s_max else 0.0, 10 * rtol)
    if n_unexp == 0:
        status = OK if sym_ok else WARNING
        message = (
            f"Locally identifiable: the only null directions of the Jacobian "
            f"({n_null}) are the {n_sym} declared symmetry direction(s)."
            if n_sym
            else f"Locally identifiable: the Jacobian has full column rank {rank}."
        )
    else:
        status = FAIL
        where = ", ".join(f"{g} ({w:.2g} of {n_unexp})" for g, w in by_param.items())
        example = f" Example: {dirs[0].describe()}." if dirs else ""
        message = (
            f"Not locally identifiable: {n_unexp} null direction(s) beyond the declared symmetries -- "
            f"parameter combinations that leave every summary unchanged. They involve {where}.{example} "
            f"Add contexts that move these parameters (more perturbations, time points), fix them, "
            f"or declare the symmetry if it is one."
        )
    if not sym_ok:
        message += (
            f" Warning: the declared symmetries are not null directions of the Jacobian "
            f"(defect {fmt(defect)} > tolerance); check the generator."
        )
    return LocalIdentifiabilityReport(
        status=status,
        message=message,
        n_params=p,
        n_summaries=int(J.shape[0]),
        rank=rank,
        singular_values=s,
        tolerance=float(tol),
        rtol=rtol,
        n_null=n_null,
        n_symmetries=n_sym,
        symmetry_defect=defect,
        n_unexpected=n_unexp,
        unexpected_directions=tuple(dirs),
        unexpected_by_parameter=by_param,
        unexpected_entries=entries,
        parameter_names=names,
        dtype=dtype_name,
    )


# --------------------------------------------------------------------------- ALS helpers
def linear_gaussian_summary_fn(design) -> Callable:
    """Summaries of the linear-Gaussian additive-shift model on a design ``(n_contexts, K)``.

    Parameters (dict): ``A`` ``(G, d)`` decoder, ``W`` ``(d, K)`` shifts, ``b`` ``(G,)`` offset,
    ``noise_scale`` scalar ``s``. Observations ``x = A z + b + e``, ``z ~ N(W l, I)``,
    ``e ~ N(0, s^2 I)``. Returned vector: per-context means ``A W l + b`` (context-major), then the
    upper triangle of the covariance ``A A^T + s^2 I``, which is the same in every context and so
    listed once (repeating it per context would not change the Jacobian's rank).
    """
    L = np.asarray(design, dtype=np.float64)
    if L.ndim != 2:
        raise ValueError(f"design must be (n_contexts, K), got shape {L.shape}.")

    def summary(params):
        A, W, b, s = params["A"], params["W"], params["b"], params["noise_scale"]
        Lj = jnp.asarray(L, dtype=A.dtype)
        means = (A @ (W @ Lj.T)).T + b[None, :]
        G = A.shape[0]
        cov = A @ A.T + (s**2) * jnp.eye(G, dtype=A.dtype)
        iu = np.triu_indices(G)
        return jnp.concatenate([means.ravel(), cov[iu]])

    return summary


def latent_rotations(params, *, decoder: str = "A", shifts: str = "W") -> list[dict]:
    """Tangents of the latent rotations ``A -> A R``, ``W -> R^T W`` at ``params``: for each pair
    ``i < j`` the generator ``Omega = E_ij - E_ji`` gives ``dA = A Omega``, ``dW = -Omega W``
    (``d(d-1)/2`` tangents; other parameters unchanged)."""
    A, W = params[decoder], params[shifts]
    xp = jnp if isinstance(A, jax.Array) or isinstance(W, jax.Array) else np
    d = A.shape[1]
    if W.shape[0] != d:
        raise ValueError(f"{decoder} has {d} latent columns but {shifts} has {W.shape[0]} rows.")
    out = []
    for i in range(d):
        for j in range(i + 1, d):
            Om = np.zeros((d, d))
            Om[i, j], Om[j, i] = 1.0, -1.0
            Om = xp.asarray(Om, dtype=A.dtype)
            out.append({decoder: A @ Om, shifts: -(Om @ W)})
    return out


# --------------------------------------------------------------------------- dynamics helpers
def linear_dynamics_summary_fn(design, times) -> Callable:
    """Latent means of the linear dynamics at each (perturbation, time) context.

    Parameters (dict): ``B`` ``(l, l)`` causal weights (use :func:`linear_dynamics_mask` to keep
    only the strictly lower triangle free), ``S`` ``(l, K)`` targets, ``mu`` ``(l,)`` basal mean.
    With ``z(0) ~ N(mu, Sigma_0)`` the mean at time ``t`` under label ``l`` is
    ``mu + (I - exp((B - I) t)) W l`` with ``W = (I - B)^{-1} S``; ``t = inf`` gives the steady
    state ``mu + W l``. Returned: the means for every design row at every time (time-major).
    Uses ``jax.scipy.linalg.expm``.
    """
    L = np.asarray(design, dtype=np.float64)
    if L.ndim != 2:
        raise ValueError(f"design must be (n_contexts, K), got shape {L.shape}.")
    ts = [float(t) for t in np.atleast_1d(np.asarray(times, dtype=np.float64))]
    if not ts:
        raise ValueError("Give at least one time (np.inf for the steady state).")
    if any(t < 0 or np.isnan(t) for t in ts):
        raise ValueError(f"times must be >= 0 (np.inf for the steady state), got {ts}.")

    def summary(params):
        B, S, mu = params["B"], params["S"], params["mu"]
        ell = B.shape[0]
        eye = jnp.eye(ell, dtype=B.dtype)
        W = jnp.linalg.solve(eye - B, S)
        Lj = jnp.asarray(L, dtype=B.dtype)
        outs = []
        for t in ts:
            M = W if np.isinf(t) else (eye - jax.scipy.linalg.expm((B - eye) * t)) @ W
            outs.append((mu[None, :] + (M @ Lj.T).T).ravel())
        return jnp.concatenate(outs)

    return summary


def linear_dynamics_mask(latent_dim: int) -> dict[str, np.ndarray]:
    """Mask for :func:`local_identifiability`: only the strictly lower-triangular entries of ``B``
    are free (an acyclic program order); ``S`` and ``mu`` are fully free."""
    return {"B": np.tril(np.ones((latent_dim, latent_dim), dtype=bool), -1)}


def bs_equivalences(params, *, free=None) -> list[dict]:
    """Tangents of the family of ``(B, S)`` with the same ``W = (I - B)^{-1} S``: moving a free
    entry ``B_ij`` by ``dB = E_ij`` and ``S`` by ``dS = -E_ij W`` keeps ``W`` (``S = (I - B) W``).

    ``free`` is a boolean ``(l, l)`` mask of the free entries of ``B`` (default strictly lower
    triangle). These are exact symmetries of steady-state summaries only.
    """
    B, S = params["B"], params["S"]
    xp = jnp if isinstance(B, jax.Array) or isinstance(S, jax.Array) else np
    ell = B.shape[0]
    free = np.tril(np.ones((ell, ell), dtype=bool), -1) if free is None else np.asarray(free, dtype=bool)
    W = xp.linalg.solve(xp.eye(ell, dtype=B.dtype) - B, S)
    out = []
    for i, j in zip(*np.nonzero(free)):
        E = np.zeros((ell, ell))
        E[i, j] = 1.0
        E = xp.asarray(E, dtype=B.dtype)
        out.append({"B": E, "S": -(E @ W)})
    return out
