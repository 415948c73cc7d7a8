"""The linear latent SCM behind the latent dynamics: ``dz/dt = (B - I)(z - mu) + S l`` reaches
the shifts ``W = (I - B)^{-1} S`` (:func:`bs_to_w`); ``W`` alone does not determine ``B`` and
``S`` (:func:`w_to_bs`, :func:`equivalent_bs`), and the support of ``S`` says which columns of
``W`` read ``B`` (:func:`sole_targets`).

NumPy in, float64 NumPy out; JAX arrays in, differentiable JAX out. Importing this module does not
import JAX. The theory layer re-exports these as :func:`perturbax.theory.bs_to_w` etc.
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["bs_to_w", "w_to_bs", "equivalent_bs", "sole_targets"]


def _xp(*arrays):
    jax = sys.modules.get("jax")
    if jax is not None and any(isinstance(a, jax.Array) for a in arrays):
        import jax.numpy as jnp

        return jnp
    return np


def _check_bs(B, S) -> None:
    if B.ndim != 2 or B.shape[0] != B.shape[1]:
        raise ValueError(f"B must be square (l x l), got shape {B.shape}.")
    if S.ndim != 2 or S.shape[0] != B.shape[0]:
        raise ValueError(f"S must be (l x K) with l = {B.shape[0]}, got shape {S.shape}.")


def bs_to_w(B, S):
    """``W = (I - B)^{-1} S``: the long-time latent shifts of the linear dynamics
    ``dz/dt = (B - I)(z - mu) + S l`` (its equilibrium is ``mu + W l``).

    Works on numpy (float64) and JAX arrays (differentiable).
    """
    xp = _xp(B, S)
    B = xp.asarray(B, dtype=None if xp is not np else np.float64)
    S = xp.asarray(S, dtype=None if xp is not np else np.float64)
    _check_bs(B, S)
    eye = xp.eye(B.shape[0], dtype=B.dtype)
    if xp is np:
        cond = np.linalg.cond(eye - B)
        if not np.isfinite(cond) or cond > 1e12:
            raise np.linalg.LinAlgError(
                f"I - B is singular (condition number {cond:.3g}): the dynamics have no unique equilibrium."
            )
    return xp.linalg.solve(eye - B, S)


def w_to_bs(W, B=None):
    """One ``(B, S)`` pair that gives the shifts ``W``: ``S = (I - B) W``.

    ``W`` alone does **not** determine ``B`` and ``S``: for *every* ``B`` with ``I - B`` invertible
    (acyclic or not), ``S = (I - B) W`` reproduces ``W`` exactly. So steady-state data (which see
    only ``W``) leave the causal weights and the direct targets unidentified; transients
    (``exp((B - I) t)`` at two or more times) are needed. ``B`` defaults to zero (no edges between
    programs, ``S = W``). See :func:`equivalent_bs` to move within the family.
    """
    xp = _xp(W, B)
    W = xp.asarray(W, dtype=None if xp is not np else np.float64)
    if W.ndim != 2:
        raise ValueError(f"W must be (l x K), got shape {W.shape}.")
    ell = W.shape[0]
    B = xp.zeros((ell, ell), dtype=W.dtype) if B is None else xp.asarray(B, dtype=W.dtype)
    _check_bs(B, W)
    return B, (xp.eye(ell, dtype=W.dtype) - B) @ W


def equivalent_bs(B, S, B_new):
    """The pair ``(B_new, S_new)`` with the same ``W = (I - B)^{-1} S`` as ``(B, S)``:
    ``S_new = (I - B_new)(I - B)^{-1} S``."""
    return w_to_bs(bs_to_w(B, S), B_new)


def sole_targets(targets, atol: float = 0.0) -> list[int]:
    """Per program (row of the targets ``S``, ``programs x K``; entries with ``|S| > atol`` count,
    or a boolean mask), the first perturbation (column) that targets it and no other program, or
    ``-1`` where there is none."""
    S = np.asarray(targets)
    supp = S.astype(bool) if S.dtype == bool else np.abs(S.astype(np.float64)) > atol
    single = supp.sum(axis=0) == 1
    sole = []
    for i in range(supp.shape[0]):
        ks = np.flatnonzero(single & supp[i])
        sole.append(int(ks[0]) if ks.size else -1)
    return sole
