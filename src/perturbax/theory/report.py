"""Shared machinery of the theory reports: status values, JSON conversion, text helpers.

Every check in :mod:`perturbax.theory` returns a frozen dataclass that has

- ``status``: ``"ok"`` (the condition holds), ``"warning"`` (it holds in a weaker form, or holds
  with a caveat the message names) or ``"fail"`` (it does not hold);
- the margins that decided it (singular values, residuals, tolerances);
- ``message``: one or a few sentences saying what the result means for the experiment and what
  to change;
- ``to_dict()`` (plain Python types, safe for :func:`json.dumps`; non-finite floats become
  ``None``), ``to_json()`` and ``render()`` (readable text, also what ``str()`` gives).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["OK", "WARNING", "FAIL", "STATUSES", "worst_status", "jsonable", "ReportMixin"]

OK = "ok"
WARNING = "warning"
FAIL = "fail"
STATUSES = (OK, WARNING, FAIL)


def worst_status(*statuses: str) -> str:
    """The most severe of the given statuses (``ok`` < ``warning`` < ``fail``)."""
    rank = {s: i for i, s in enumerate(STATUSES)}
    out = OK
    for s in statuses:
        if s not in rank:
            raise ValueError(f"Unknown status {s!r}; expected one of {STATUSES}.")
        if rank[s] > rank[out]:
            out = s
    return out


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays, tuples and mappings turned into JSON types.

    Non-finite floats become ``None`` (JSON has no NaN/Inf).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    raise TypeError(f"Cannot convert {type(value).__name__} to JSON.")


class ReportMixin:
    """``to_json``, ``__str__`` on top of a class's ``to_dict`` and ``render``."""

    def to_dict(self) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def render(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_json(self, indent: int | None = 2) -> str:
        """The :meth:`to_dict` form as a JSON string."""
        return json.dumps(jsonable(self.to_dict()), indent=indent, allow_nan=False)

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        status = getattr(self, "status", "?")
        message = str(getattr(self, "message", ""))
        short = message if len(message) <= 100 else message[:97] + "..."
        return f"<{type(self).__name__} status={status!r}: {short}>"


def fmt(x: float | None, spec: str = ".3g") -> str:
    """Short number formatting for text reports (``-`` for ``None``)."""
    if x is None:
        return "-"
    x = float(x)
    if x == 0:
        return "0"
    return format(x, spec)


def join_names(names: Sequence[str], limit: int = 12) -> str:
    """``"A, B, C"`` with a ``"... (n more)"`` tail past ``limit`` names."""
    names = list(names)
    if not names:
        return "(none)"
    text = ", ".join(names[:limit])
    if len(names) > limit:
        text += f", ... ({len(names) - limit} more)"
    return text


def format_direction(weights: Mapping[str, float], limit: int = 6) -> str:
    """A direction ``{name: weight}`` written as ``"0.71 A - 0.71 B"`` (largest weights first)."""
    items = sorted(weights.items(), key=lambda kv: -round(abs(kv[1]), 9))[:limit]
    if not items:
        return "0"
    parts = []
    for i, (name, w) in enumerate(items):
        mag = abs(w)
        coef = "" if math.isclose(mag, 1.0, rel_tol=1e-9) else f"{mag:.2g} "
        if i == 0:
            parts.append(("-" if w < 0 else "") + coef + name)
        else:
            parts.append(("- " if w < 0 else "+ ") + coef + name)
    text = " ".join(parts)
    if len(weights) > limit:
        text += f" + ... ({len(weights) - limit} more terms)"
    return text


def top_weights(
    vector: np.ndarray, names: Sequence[str], *, rel: float = 0.05, limit: int = 8, fix_sign: bool = True
) -> dict[str, float]:
    """Entries of a direction that carry weight: ``|v_k| >= rel * max|v|``, largest first, at most
    ``limit``, normalised so that the direction has unit length (with ``fix_sign``, signs flipped so
    that the largest entry is positive -- for directions whose sign means nothing)."""
    v = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        return {}
    v = v / norm
    k0 = int(np.argmax(np.abs(v)))
    if fix_sign and v[k0] < 0:
        v = -v
    big = np.flatnonzero(np.abs(v) >= rel * abs(v[k0]))
    big = big[np.argsort(-np.round(np.abs(v[big]), 9), kind="stable")][:limit]
    return {str(names[k]): float(v[k]) for k in big}
