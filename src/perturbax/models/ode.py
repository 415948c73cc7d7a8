"""The one ODE solve of perturbax: every cell from ``t = 0`` to its own snapshot time.

All models that need a numerical ODE solution call :func:`solve`, a thin wrapper around
:func:`diffrax.diffeqsolve` with fixed, tested choices (DESIGN 2.2):

- ``Tsit5`` (explicit 5th-order Runge-Kutta) with a ``PIDController`` (adaptive steps, first step
  chosen automatically), ``SaveAt(t1=True)``, the default ``RecursiveCheckpointAdjoint`` (exact
  gradients of the discretised solve, the fastest choice measured for these models);
- a finite ``max_steps`` and ``throw=False``: a solve that fails (too many steps for a stiff or
  exploding drift, or a non-finite state) never raises inside a fit. Instead the returned
  :class:`ODESolution` carries a per-cell ``failed`` flag; non-finite entries of the state are
  replaced by the corresponding entries of the initial state, so everything downstream stays
  finite; :meth:`ODESolution.penalty` turns the flags into a finite log-density penalty that a
  model adds with ``numpyro.factor``. Only outside ``jit`` (concrete values) a Python
  ``RuntimeWarning`` names the failed cells and their times.

Why one solve per cell (``jax.vmap`` over cells with ``t1 = t_i``) rather than one solve of the
stacked system saved at the sorted unique times: every cell has its own initial state
(``z_base``), so nothing is shared between cells except the drift parameters; per-cell solves get
per-cell error control (one badly behaved cell cannot hide in an averaged error norm, nor force
tiny steps on all others' accuracy bookkeeping), need no data-dependent number of unique times
(which ``jit`` cannot handle without padding) and no gather afterwards, and cells at ``t = 0``
cost zero steps. The vmapped solver loop runs until the slowest cell of the minibatch is done,
with all cells advanced together in one vectorised step, so the cost is about
``max_i(steps_i) x batch`` drift evaluations — the same as a stacked solve with a max-norm
controller.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

__all__ = ["ODESolution", "solve", "DEFAULT_MAX_STEPS"]

DEFAULT_MAX_STEPS = 1000


class ODESolution(NamedTuple):
    """Result of :func:`solve` for a batch of cells.

    Attributes
    ----------
    y
        State at each cell's final time, ``(n, d)``. Entries that came out non-finite are
        replaced by the initial state's entries (so ``y`` is always finite when ``y0`` is).
    failed
        ``(n,)`` bool: the solver did not reach the cell's time (e.g. ``max_steps`` hit) or the
        state was not finite.
    t_reached
        ``(n,)`` time the solver actually reached (equal to the requested time on success).
    num_steps
        ``(n,)`` accepted + rejected steps taken per cell.
    """

    y: Float[Array, "n d"]
    failed: Bool[Array, " n"]
    t_reached: Float[Array, " n"]
    num_steps: Int[Array, " n"]

    def penalty(self, weight: float) -> Float[Array, " n"]:
        """Per-cell log-density penalty ``weight * failed`` (add ``-penalty`` with
        ``numpyro.factor`` inside the cell plate). It is constant in the parameters: it carries
        no gradient, but it makes the loss of a failed solve visibly bad and finite."""
        return weight * self.failed.astype(self.y.dtype)


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def solve(
    drift: Callable[[Any, Float[Array, " d"], Any], Float[Array, " d"]],
    y0: Float[Array, "n d"],
    t: Float[Array, " n"],
    *,
    args: Any = None,
    t0: float = 0.0,
    max_steps: int = DEFAULT_MAX_STEPS,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    dt0: float | None = None,
    warn: bool = True,
) -> ODESolution:
    """Solve ``dy/dt = drift(t, y, args_i)`` for every cell ``i`` from ``t0`` to ``t[i]``.

    Parameters
    ----------
    drift
        Vector field of ONE cell: ``drift(t, y, args) -> dy/dt`` with ``y`` of shape ``(d,)``
        (diffrax convention). Parameters shared by all cells (weights, networks) are closed over.
    y0
        Initial states, ``(n, d)``.
    t
        Final time of each cell, ``(n,)``, each ``>= t0`` (``t[i] == t0`` returns ``y0[i]``
        after zero steps). Validate data with :func:`perturbax.models.dynamics.check_times`.
    args
        Per-cell inputs (labels, anchors, ...): a pytree whose array leaves have a leading axis
        of length ``n``; cell ``i`` sees the ``i``-th slice. ``None`` for none.
    max_steps
        Finite step budget per cell (needed for reverse-mode gradients and to bound the cost of
        a stiff drift); a cell that needs more is flagged ``failed``.
    rtol, atol
        Tolerances of the PID step-size controller. In float32 ``1e-5``/``1e-6`` is about the
        floor of what is meaningful; use float64 (``jax.enable_x64``) for tighter solves.
    dt0
        Initial step (``None``: chosen by the controller).
    warn
        Emit a ``RuntimeWarning`` naming the failed cells' times when called outside ``jit``.

    Returns
    -------
    ODESolution
        ``y`` at each cell's time, the ``failed`` flags, the time reached and the step counts.
    """
    y0 = jnp.asarray(y0)
    if y0.ndim != 2:
        raise ValueError(f"y0 must have shape (n_cells, state_dim), got {y0.shape}.")
    if not jnp.issubdtype(y0.dtype, jnp.floating):
        y0 = y0.astype(jnp.result_type(float))
    t = jnp.asarray(t, dtype=y0.dtype)
    if t.shape != (y0.shape[0],):
        raise ValueError(f"t must have one time per cell, shape ({y0.shape[0]},), got {t.shape}.")
    if not (isinstance(max_steps, int | np.integer) and max_steps >= 1):
        raise ValueError(f"max_steps must be a finite integer >= 1, got {max_steps!r}.")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}.")

    term = diffrax.ODETerm(drift)
    solver = diffrax.Tsit5()
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    saveat = diffrax.SaveAt(t1=True)
    t0_ = jnp.asarray(t0, dtype=y0.dtype)

    def one(y0_i, t1_i, args_i):
        sol = diffrax.diffeqsolve(
            term,
            solver,
            t0_,
            t1_i,
            dt0,
            y0_i,
            args=args_i,
            saveat=saveat,
            stepsize_controller=controller,
            max_steps=int(max_steps),
            throw=False,
        )
        ok = sol.result == diffrax.RESULTS.successful
        return sol.ys[0], ok, sol.ts[0], sol.stats["num_steps"]

    in_axes = (0, 0, None if args is None else 0)
    y, ok, t_reached, num_steps = jax.vmap(one, in_axes=in_axes)(y0, t, args)
    finite = jnp.isfinite(y)
    failed = jnp.logical_not(ok) | jnp.logical_not(jnp.all(finite, axis=-1))
    y = jnp.where(finite, y, y0)
    sol = ODESolution(y=y, failed=failed, t_reached=t_reached, num_steps=num_steps)
    if warn and _is_concrete(failed):
        _warn_failures(sol, t, max_steps)
    return sol


def _warn_failures(sol: ODESolution, t: Array, max_steps: int) -> None:
    failed = np.asarray(sol.failed)
    if not failed.any():
        return
    idx = np.flatnonzero(failed)
    times = np.asarray(t)[idx]
    reached = np.asarray(sol.t_reached)[idx]
    shown = ", ".join(
        f"cell {i} at t={ti:g} (reached t={ri:g})" for i, ti, ri in zip(idx[:5], times[:5], reached[:5], strict=True)
    )
    more = f" and {idx.size - 5} more" if idx.size > 5 else ""
    warnings.warn(
        f"ODE solve failed for {idx.size} of {failed.size} cells: {shown}{more}. The drift is too stiff "
        f"or unstable for max_steps={max_steps}, or the state became non-finite. Those cells keep a "
        f"finite state (non-finite entries replaced by the initial state) and are flagged; increase "
        f"max_steps, loosen rtol/atol, or check the drift parameters (an exploding drift means an "
        f"unstable system).",
        RuntimeWarning,
        stacklevel=3,
    )
