"""theory: numerical identifiability and extrapolation checks (pure functions on arrays).

Design level (no data needed):

- :func:`check_design` -- which test perturbations a training design covers (affine hull of the
  training labels), with residuals, coefficients and their norm (how much a prediction amplifies
  estimation error; large norms are flagged ill-conditioned), convex-hull (extrapolation) flags,
  identified elementary perturbations, rank vs latent dimension; returns a :class:`DesignReport`.
- :func:`suggest_additions` -- a small set of experiments to add so that targets become covered.
- :func:`in_span_holdouts` -- training conditions that the rest of the design identifies (the
  conditions in-span cross-validation may hold out).
- :class:`RowSpace` -- the row-space machinery (rank with explicit tolerances, projections).

Dynamics level (latent dynamical causal programs):

- :func:`count_contexts`, :func:`check_variability`, :func:`check_targets`,
  :func:`check_dynamics`, :func:`check_order_from_effects`, :func:`check_order_design`, :func:`dynamics_context_moments`;
  conversions :func:`bs_to_w`, :func:`w_to_bs`, :func:`equivalent_bs`.

Model level:

- :func:`local_identifiability` -- Jacobian rank of expected summaries after removing declared
  symmetries, with closed-form helpers for the linear-Gaussian additive-shift model
  (:func:`linear_gaussian_summary_fn`, :func:`latent_rotations`) and linear latent dynamics
  (:func:`linear_dynamics_summary_fn`, :func:`linear_dynamics_mask`, :func:`bs_equivalences`).
  These live in :mod:`perturbax.theory.local`, which imports JAX on first use.

Every check returns a frozen report with ``status`` (``"ok"``/``"warning"``/``"fail"``), the
margins that decided it, a ``message`` to act on, ``to_dict()``/``to_json()`` and ``render()``.
No global JAX configuration is changed.
"""

from __future__ import annotations

import importlib

from perturbax.theory.design import SCHEMA, CoverageResult, DesignReport, check_design
from perturbax.theory.dynamics import (
    ContextReport,
    DynamicsReport,
    OrderReport,
    TargetReport,
    VariabilityReport,
    bs_to_w,
    check_dynamics,
    check_order_from_effects,
    check_order_design,
    check_targets,
    check_variability,
    count_contexts,
    dynamics_context_moments,
    equivalent_bs,
    natural_parameters,
    w_to_bs,
)
from perturbax.theory.holdouts import in_span_holdouts, label_leverage
from perturbax.theory.report import FAIL, OK, WARNING
from perturbax.theory.rowspace import DEFAULT_RESIDUAL_RTOL, DEFAULT_RTOL, RowSpace
from perturbax.theory.suggest import SuggestionReport, suggest_additions

_LOCAL = (
    "NullDirection",
    "LocalIdentifiabilityReport",
    "local_identifiability",
    "parameter_names",
    "linear_gaussian_summary_fn",
    "latent_rotations",
    "linear_dynamics_summary_fn",
    "linear_dynamics_mask",
    "bs_equivalences",
)
_MODEL_CHECK = (
    "LatentRotation",
    "ModelIdentifiabilityReport",
    "ModelSummary",
    "model_summary_fn",
    "model_identifiability",
)

__all__ = [
    "OK",
    "WARNING",
    "FAIL",
    "SCHEMA",
    "DEFAULT_RTOL",
    "DEFAULT_RESIDUAL_RTOL",
    "RowSpace",
    "CoverageResult",
    "DesignReport",
    "check_design",
    "SuggestionReport",
    "suggest_additions",
    "in_span_holdouts",
    "label_leverage",
    "ContextReport",
    "VariabilityReport",
    "TargetReport",
    "DynamicsReport",
    "OrderReport",
    "count_contexts",
    "check_variability",
    "check_targets",
    "check_dynamics",
    "check_order_from_effects",
    "check_order_design",
    "natural_parameters",
    "dynamics_context_moments",
    "bs_to_w",
    "w_to_bs",
    "equivalent_bs",
    *_LOCAL,
    *_MODEL_CHECK,
]


def __getattr__(name: str):
    if name in _LOCAL:
        return getattr(importlib.import_module("perturbax.theory.local"), name)
    if name in _MODEL_CHECK:
        return getattr(importlib.import_module("perturbax.theory.model_check"), name)
    raise AttributeError(f"module 'perturbax.theory' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LOCAL) | set(_MODEL_CHECK))
