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

**Contexts** (cell type, cell line, donor, batch; ``from_anndata(..., context_keys=[...])``, CLI
``--context-keys``): a (perturbation, context) pair is written ``PERTURBATION @ KEY=VALUE``, several
context keys joined by ``&``::

    "stimulated @ cell_type=CD4T"          "control @ cell_type=CD4T"
    "A+B @ line=U87MG & batch=2"           "stimulated @ CD4T"   (the key may be left out when
                                                                  the value names one category)

Contexts enter the label vector as indicator columns ``KEY=VALUE`` (one per category but the first,
the reference), after the K perturbation columns: ``z = z_base + W l + V c`` is ``z_base + [W V] [l; c]``,
so the span checks of :mod:`perturbax.theory` and every baseline see (perturbation, context) pairs as
conditions. A label without ``@`` is in the reference context (the first category of each key);
the canonical string always names the context.
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
    "CONTEXT_SEP",
    "CONTEXT_JOIN",
    "context_columns",
]

LabelLike = str | Mapping[str, float] | Sequence[float] | np.ndarray

_DOSE_SEP = ":"
#: Separates a perturbation from its context in a label: ``"stimulated @ cell_type=CD4T"``.
CONTEXT_SEP = "@"
#: Joins several context keys: ``"A @ line=U87MG & batch=2"``.
CONTEXT_JOIN = "&"


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


def context_columns(contexts) -> tuple[str, ...]:
    """Indicator column names ``"KEY=VALUE"`` of contexts ``((key, categories), ...)``: every category
    but the first (the reference) of each key."""
    return tuple(f"{key}={cat}" for key, cats in contexts for cat in cats[1:])


@dataclass(frozen=True)
class PerturbationRegistry:
    """The elementary perturbations of a data set, in a fixed order (the columns of ``L``).

    Attributes
    ----------
    names
        Column names of the label vector: the elementary perturbations, then (with contexts) the
        context indicator columns ``"KEY=VALUE"``; column ``k`` of every design matrix is ``names[k]``.
        Given without the context columns, they are appended.
    control
        The control label (no perturbation).
    sep
        Separator used when writing combination labels.
    contexts
        ``((key, categories), ...)``: the context keys and their categories, the first category of each
        key the reference (module docstring); empty without contexts.
    """

    names: tuple[str, ...]
    control: str = "control"
    sep: str = "+"
    contexts: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        contexts = tuple((str(k), tuple(str(c) for c in cats)) for k, cats in (
            self.contexts.items() if isinstance(self.contexts, Mapping) else self.contexts))
        object.__setattr__(self, "contexts", contexts)
        cols = context_columns(contexts)
        names = tuple(str(n) for n in self.names)
        if cols and names[len(names) - len(cols):] != cols:
            names = names + cols
        object.__setattr__(self, "names", names)
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"Duplicate elementary perturbation names: {dup}.")
        perts = names[: len(names) - len(cols)]
        bad = [n for n in perts if self.sep in n or _DOSE_SEP in n or n == self.control or not n
               or (contexts and CONTEXT_SEP in n)]
        if bad:
            raise ValueError(
                f"Elementary perturbation names {bad} are empty, equal the control label, or contain "
                f"{self.sep!r} or {_DOSE_SEP!r}" + (f" or {CONTEXT_SEP!r}" if contexts else "") + "; rename them."
            )
        keys = [k for k, _ in contexts]
        for key, cats in contexts:
            if not key or any(ch in key for ch in ("=", CONTEXT_SEP, CONTEXT_JOIN)) or keys.count(key) > 1:
                raise ValueError(
                    f"Context key {key!r} is empty, repeated, or contains '=', {CONTEXT_SEP!r} or {CONTEXT_JOIN!r}; "
                    f"rename the obs column."
                )
            badc = [c for c in cats if not c.strip() or CONTEXT_SEP in c or CONTEXT_JOIN in c or c != c.strip()]
            if not cats or badc or len(set(cats)) != len(cats):
                raise ValueError(
                    f"Context {key!r} has categories {list(cats)[:10]}: each must be non-empty, unique, without "
                    f"surrounding spaces, {CONTEXT_SEP!r} or {CONTEXT_JOIN!r}" + (f" (bad: {badc[:3]})" if badc else "")
                    + "; rename them in the obs column."
                )
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(names)})

    @property
    def K(self) -> int:
        """Number of label columns (elementary perturbations, plus context columns if any)."""
        return len(self.names)

    @property
    def context_keys(self) -> tuple[str, ...]:
        """The context keys (``obs`` columns), empty without contexts."""
        return tuple(k for k, _ in self.contexts)

    @property
    def n_perturbations(self) -> int:
        """Number of elementary perturbations (label columns before the context columns)."""
        return self.K - len(context_columns(self.contexts))

    @property
    def perturbation_names(self) -> tuple[str, ...]:
        """The elementary perturbations (``names`` without the context columns)."""
        return self.names[: self.n_perturbations]

    @property
    def control_label(self) -> str:
        """Canonical label of the zero vector: the control (in the reference context)."""
        return self.decode(np.zeros(self.K))

    def index(self, name: str) -> int:
        """Column of ``name``; a clear error with close matches if unknown."""
        try:
            return self._index[name]  # type: ignore[attr-defined]
        except KeyError:
            hint = close_matches(name, self.names)
            more = f" Did you mean {hint}?" if hint else ""
            raise KeyError(
                f"Unknown perturbation {name!r}.{more} Known elementary perturbations "
                f"({self.n_perturbations}): {_preview(self.perturbation_names)}."
            ) from None

    def unknown(self, label: LabelLike) -> list[str]:
        """Names in ``label`` that are not in the registry (empty list if all known)."""
        comps = self._components(label)
        return [n for n in comps if n not in self._index]  # type: ignore[attr-defined]

    def _split(self, label: str) -> tuple[str, str | None]:
        """``(perturbation text, context text or None)`` of a label string."""
        head, at, tail = label.partition(CONTEXT_SEP)
        if not at:
            return label, None
        if not self.contexts:
            if "=" in tail or not tail.strip():
                raise ValueError(
                    f"{label!r} names a context after {CONTEXT_SEP!r}, but no contexts were declared; declare them "
                    f"when reading the data (from_anndata(..., context_keys=['cell_type']); CLI --context-keys)."
                )
            return label, None
        return head, tail

    def _context_components(self, text: str, label: str) -> dict[str, float]:
        """``{"KEY=VALUE": 1}`` for the non-reference categories named in ``text``."""
        given: dict[str, str] = {}
        cats = dict(self.contexts)
        for item in (p.strip() for p in text.split(CONTEXT_JOIN)):
            if "=" in item:
                key, _, value = (s.strip() for s in item.partition("="))
                if key not in cats:
                    hint = close_matches(key, cats)
                    more = f" Did you mean {hint[0]!r}?" if hint else ""
                    raise ValueError(f"Label {label!r} names the context key {key!r}, which is not declared.{more} "
                                     f"Context keys: {list(cats)}.")
            else:
                value = item
                keys = [k for k, c in self.contexts if value in c]
                if len(keys) != 1:
                    what = "no" if not keys else f"more than one ({keys})"
                    raise ValueError(
                        f"Label {label!r}: context {value!r} is a category of {what} context key; write it as "
                        f"'KEY=VALUE', e.g. '{self.contexts[0][0]}={self.contexts[0][1][0]}'."
                    )
                key = keys[0]
            if value not in cats[key]:
                hint = close_matches(value, cats[key])
                more = f" Did you mean {hint[0]!r}?" if hint else ""
                raise ValueError(f"Label {label!r}: {value!r} is not a category of context {key!r}.{more} "
                                 f"Categories: {_preview(cats[key])}.")
            if key in given:
                raise ValueError(f"Label {label!r} names context {key!r} twice; give each context key once.")
            given[key] = value
        missing = [k for k in cats if k not in given]
        if missing:
            raise ValueError(
                f"Label {label!r} leaves context key(s) {missing} out; name every context key, joined by "
                f"{CONTEXT_JOIN!r}: " + f" {CONTEXT_JOIN} ".join(f"{k}={cats[k][0]}" for k in cats) + "."
            )
        return {f"{k}={v}": 1.0 for k, v in given.items() if v != cats[k][0]}

    def _components(self, label: LabelLike) -> dict[str, float]:
        if isinstance(label, str):
            head, ctx = self._split(label)
            out = parse_label(head, sep=self.sep, control=self.control)
            if ctx is not None:
                out.update(self._context_components(ctx, label))
            return out
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
                f"A label vector must have shape ({self.K},) (one entry per elementary perturbation"
                + (" and context column" if self.contexts else "") + f"), got {vec.shape}."
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

    def perturbation_label(self, label: LabelLike) -> str:
        """Canonical label of the perturbation part alone (``"stimulated"`` for
        ``"stimulated @ cell_type=CD4T"``)."""
        vec = self.encode(label)
        P = self.n_perturbations
        return format_label({self.names[k]: float(vec[k]) for k in range(P) if vec[k] != 0},
                            sep=self.sep, control=self.control)

    def context_of(self, vec: Sequence[float] | np.ndarray) -> dict[str, str] | None:
        """``{key: category}`` of a label vector, or ``None`` if its context columns are not a valid
        indicator (at most one 1 per key, zeros elsewhere)."""
        vec = np.asarray(vec, dtype=np.float64)
        out, j = {}, self.n_perturbations
        for key, cats in self.contexts:
            part = vec[j : j + len(cats) - 1]
            j += len(cats) - 1
            on = np.flatnonzero(part)
            if on.size > 1 or (on.size == 1 and part[on[0]] != 1):
                return None
            out[key] = cats[on[0] + 1] if on.size else cats[0]
        return out

    def context_vector(self, context: Mapping[str, str]) -> np.ndarray:
        """The label vector of the control in ``context`` (``{key: category}``, every key)."""
        text = f" {CONTEXT_JOIN} ".join(f"{k}={context[k]}" for k in self.context_keys if k in context)
        return self.encode(f"{self.control} {CONTEXT_SEP} {text}") if self.contexts else np.zeros(self.K)

    def all_contexts(self) -> list[dict[str, str]]:
        """Every combination of context categories (``[{}]`` without contexts)."""
        import itertools

        return [dict(zip(self.context_keys, combo)) for combo in itertools.product(*(c for _, c in self.contexts))]

    def decode(self, vec: Sequence[float] | np.ndarray, *, atol: float = 0.0) -> str:
        """Canonical label string of a label vector (entries with ``|dose| <= atol`` dropped)."""
        vec = np.asarray(vec, dtype=np.float64)
        if vec.shape != (self.K,):
            raise ValueError(f"Expected a label vector of shape ({self.K},), got {vec.shape}.")
        P = self.n_perturbations
        comps = {self.names[k]: float(vec[k]) for k in range(P) if abs(vec[k]) > atol}
        text = format_label(comps, sep=self.sep, control=self.control)
        if not self.contexts:
            return text
        ctx = self.context_of(np.where(np.abs(vec) > atol, vec, 0.0))
        if ctx is not None:
            items = [f"{k}={v}" for k, v in ctx.items()]
        else:  # not an indicator (e.g. a difference of label vectors): the columns with their values
            items = [self.names[k] if vec[k] == 1 else f"{self.names[k]}{_DOSE_SEP}{_format_dose(float(vec[k]))}"
                     for k in range(P, self.K) if abs(vec[k]) > atol]
        return f"{text} {CONTEXT_SEP} " + f" {CONTEXT_JOIN} ".join(items)

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
