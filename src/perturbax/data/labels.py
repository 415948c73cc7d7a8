"""Perturbation labels: strings such as ``"A+B"`` or ``"A:0.5+B:2"`` <-> label vectors.

A *label vector* ``l`` in R^K has one entry per elementary perturbation; the entry is the dose
(1 for a plain ``"A"``, 0 when absent). The control condition is the zero vector.

Accepted spellings of one perturbation (all equivalent):

- ``"A+B"`` — A and B at dose 1;
- ``"A:0.5+B:2"`` — A at dose 0.5, B at dose 2;
- ``{"A": 0.5, "B": 2.0}`` — a mapping name -> dose;
- a length-K vector in registry order.

The canonical string lists components in registry order, writes ``:dose`` only when the dose is
not 1, and is the control label for the zero vector.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LabelLike",
    "PerturbationRegistry",
    "parse_label",
    "format_label",
    "close_matches",
]

LabelLike = str | Mapping[str, float] | Sequence[float] | np.ndarray

_DOSE_SEP = ":"


def close_matches(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` names in ``known`` that look like ``name`` (for error messages)."""
    known = list(known)
    hits = difflib.get_close_matches(name, known, n=n, cutoff=0.5)
    if not hits:
        low = name.lower()
        hits = [k for k in known if k.lower() == low or low in k.lower()][:n]
    return hits


def _parse_dose(text: str, component: str, label: str) -> float:
    try:
        dose = float(text)
    except ValueError:
        raise ValueError(
            f"Dose {text!r} of component {component!r} in perturbation {label!r} is not a number. "
            f"Write doses as 'NAME:DOSE', e.g. 'A:0.5+B:2'."
        ) from None
    if not math.isfinite(dose):
        raise ValueError(f"Dose of {component!r} in perturbation {label!r} is {dose}; doses must be finite.")
    return dose


def parse_label(
    label: str,
    *,
    sep: str = "+",
    control: str | Sequence[str] = "control",
    doses: str | Sequence[float] | None = None,
) -> dict[str, float]:
    """Parse one perturbation string into ``{name: dose}`` (empty dict for control).

    Parameters
    ----------
    label
        ``"A"``, ``"A+B"``, ``"A:0.5+B:2"`` or a control label.
    sep
        Separator between components.
    control
        Label (or labels) meaning "no perturbation".
    doses
        Optional doses aligned with the components, as a ``sep``-joined string (``"0.5+2"``) or a
        sequence; not allowed together with inline ``NAME:DOSE`` doses.
    """
    if not isinstance(label, str):
        raise TypeError(f"Perturbation label must be a string, got {type(label).__name__}: {label!r}.")
    controls = (control,) if isinstance(control, str) else tuple(control)
    text = label.strip()
    if text in controls:
        return {}
    if text == "":
        raise ValueError(
            f"Empty perturbation label. Use the control label {controls[0]!r} for unperturbed cells."
        )
    parts = text.split(sep)
    if any(p.strip() == "" for p in parts):
        raise ValueError(
            f"Perturbation {label!r} has an empty component (separator {sep!r} at the start, end or "
            f"twice in a row). Write combinations as 'A{sep}B'."
        )
    other_seps = [s for s in ("+", "|", ";", ",", "_", "&") if s != sep and s in text]
    if len(parts) == 1 and other_seps and re.search(r"[A-Za-z0-9]\s*[|;,&]\s*[A-Za-z0-9]", text):
        raise ValueError(
            f"Perturbation {label!r} contains {other_seps[0]!r}, which is not the separator {sep!r}. "
            f"Pass sep={other_seps[0]!r} (CLI: --sep) if it separates combined perturbations."
        )
    dose_list: list[float] | None = None
    if doses is not None:
        if isinstance(doses, str):
            dose_parts = doses.strip().split(sep)
            dose_list = [_parse_dose(d.strip(), "?", label) for d in dose_parts]
        else:
            dose_list = [float(d) for d in doses]
        if len(dose_list) != len(parts):
            raise ValueError(
                f"Perturbation {label!r} has {len(parts)} component(s) but dose {doses!r} has "
                f"{len(dose_list)} value(s); give one dose per component, joined by {sep!r}."
            )
    out: dict[str, float] = {}
    for i, part in enumerate(parts):
        part = part.strip()
        if _DOSE_SEP in part:
            name, _, dose_text = part.rpartition(_DOSE_SEP)
            name = name.strip()
            if not name:
                raise ValueError(f"Component {part!r} of perturbation {label!r} has no name before ':'.")
            if dose_list is not None:
                raise ValueError(
                    f"Perturbation {label!r} has inline doses and a dose column at once; use one."
                )
            dose = _parse_dose(dose_text.strip(), name, label)
        else:
            name = part
            dose = 1.0 if dose_list is None else dose_list[i]
        if name in controls:
            # "ctrl+A" style labels: the control component carries no effect.
            continue
        if name in out:
            raise ValueError(f"Perturbation {label!r} names {name!r} twice; give each component once.")
        out[name] = dose
    return out


def _format_dose(dose: float) -> str:
    return f"{dose:g}" if abs(dose) >= 1e-4 or dose == 0 else repr(float(dose))


def format_label(components: Mapping[str, float], *, sep: str = "+", control: str = "control") -> str:
    """Write ``{name: dose}`` as a label string in the given order (zero doses dropped)."""
    parts = []
    for name, dose in components.items():
        if dose == 0:
            continue
        parts.append(name if dose == 1 else f"{name}{_DOSE_SEP}{_format_dose(float(dose))}")
    return sep.join(parts) if parts else control


@dataclass(frozen=True)
class PerturbationRegistry:
    """The elementary perturbations of a data set, in a fixed order (the columns of ``L``).

    Attributes
    ----------
    names
        Elementary perturbation names; column ``k`` of every design matrix is ``names[k]``.
    control
        The control label (the zero vector).
    sep
        Separator used when writing combination labels.
    """

    names: tuple[str, ...]
    control: str = "control"
    sep: str = "+"

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        object.__setattr__(self, "names", names)
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"Duplicate elementary perturbation names: {dup}.")
        bad = [n for n in names if self.sep in n or _DOSE_SEP in n or n == self.control or not n]
        if bad:
            raise ValueError(
                f"Elementary perturbation names {bad} are empty, equal the control label, or contain "
                f"{self.sep!r} or {_DOSE_SEP!r}; rename them."
            )
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(names)})

    @property
    def K(self) -> int:
        """Number of elementary perturbations."""
        return len(self.names)

    def index(self, name: str) -> int:
        """Column of ``name``; a clear error with close matches if unknown."""
        try:
            return self._index[name]  # type: ignore[attr-defined]
        except KeyError:
            hint = close_matches(name, self.names)
            more = f" Did you mean {hint}?" if hint else ""
            raise KeyError(
                f"Unknown perturbation {name!r}.{more} Known elementary perturbations "
                f"({self.K}): {_preview(self.names)}."
            ) from None

    def unknown(self, label: LabelLike) -> list[str]:
        """Names in ``label`` that are not in the registry (empty list if all known)."""
        comps = self._components(label)
        return [n for n in comps if n not in self._index]  # type: ignore[attr-defined]

    def _components(self, label: LabelLike) -> dict[str, float]:
        if isinstance(label, str):
            return parse_label(label, sep=self.sep, control=self.control)
        if isinstance(label, Mapping):
            out = {}
            for k, v in label.items():
                v = float(v)
                if not math.isfinite(v):
                    raise ValueError(f"Dose of {k!r} is {v}; doses must be finite.")
                out[str(k)] = v
            return out
        vec = np.asarray(label, dtype=np.float64)
        if vec.shape != (self.K,):
            raise ValueError(
                f"A label vector must have shape ({self.K},) (one entry per elementary perturbation), "
                f"got {vec.shape}."
            )
        return {self.names[k]: float(vec[k]) for k in np.flatnonzero(vec)}

    def encode(self, label: LabelLike) -> np.ndarray:
        """Label vector (float64, shape ``(K,)``) of a string, mapping or vector."""
        comps = self._components(label)
        vec = np.zeros(self.K, dtype=np.float64)
        for name, dose in comps.items():
            vec[self.index(name)] = dose
        return vec

    def encode_many(self, labels: Iterable[LabelLike]) -> np.ndarray:
        """Stack :meth:`encode` over ``labels``: shape ``(n, K)``."""
        rows = [self.encode(lab) for lab in labels]
        return np.stack(rows) if rows else np.zeros((0, self.K))

    def decode(self, vec: Sequence[float] | np.ndarray, *, atol: float = 0.0) -> str:
        """Canonical label string of a label vector (entries with ``|dose| <= atol`` dropped)."""
        vec = np.asarray(vec, dtype=np.float64)
        if vec.shape != (self.K,):
            raise ValueError(f"Expected a label vector of shape ({self.K},), got {vec.shape}.")
        comps = {self.names[k]: float(vec[k]) for k in range(self.K) if abs(vec[k]) > atol}
        return format_label(comps, sep=self.sep, control=self.control)

    def canonical(self, label: LabelLike) -> str:
        """Canonical string of any accepted spelling."""
        return self.decode(self.encode(label))

    def components(self, label: LabelLike) -> dict[str, float]:
        """``{name: dose}`` of ``label`` in registry order (names checked)."""
        vec = self.encode(label)
        return {self.names[k]: float(vec[k]) for k in np.flatnonzero(vec)}


def _preview(names: Sequence[str], n: int = 20) -> str:
    names = list(names)
    text = ", ".join(names[:n])
    return text + (f", ... ({len(names) - n} more)" if len(names) > n else "")
