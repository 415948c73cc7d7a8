"""Turning user input (label strings, mappings, dense or sparse label vectors) into the sparse
difference matrix the design checks work on. Internal to :mod:`perturbax.theory`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from perturbax.data.labels import PerturbationRegistry, format_label
from perturbax.theory.rowspace import _csr, distinct_rows

__all__ = [
    "PreparedDesign",
    "resolve_registry",
    "as_label_rows",
    "prepare_design",
    "row_labels",
    "add_unmeasured",
]


def _looks_like_labels(x) -> bool:
    if isinstance(x, (str, Mapping)):
        return True
    if isinstance(x, np.ndarray) or sp.issparse(x):
        return x.dtype.kind in "OUS"
    if isinstance(x, Sequence) and len(x) > 0:
        return all(isinstance(v, (str, Mapping)) for v in x)
    return False


def _n_columns(x) -> int | None:
    if x is None or _looks_like_labels(x):
        return None
    if sp.issparse(x):
        return int(x.shape[1])
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        return int(a.shape[0])
    if a.ndim == 2:
        return int(a.shape[1])
    raise ValueError(f"Label vectors must be 1-D or 2-D, got an array of shape {a.shape}.")


def resolve_registry(
    names: Sequence[str] | None,
    registry: PerturbationRegistry | None,
    *arrays,
) -> PerturbationRegistry:
    """The registry naming the columns: ``registry``, else one built from ``names``, else default
    names ``e1 .. eK`` with ``K`` read from the first numeric input."""
    if registry is not None:
        if names is not None and tuple(names) != registry.names:
            raise ValueError("Pass either names= or registry=, not both with different names.")
        return registry
    if names is not None:
        return PerturbationRegistry(tuple(str(n) for n in names))
    for a in arrays:
        K = _n_columns(a)
        if K is not None:
            return PerturbationRegistry(tuple(f"e{k + 1}" for k in range(K)))
    raise ValueError(
        "Label strings need the names of the elementary perturbations: pass names=[...] or "
        "registry=PerturbationRegistry(...)."
    )


def add_unmeasured(registry: PerturbationRegistry, train, tests):
    """Extend the registry with names that occur only in test labels (strings or mappings).

    Such a perturbation was never measured; giving it a column of zeros in the training design
    turns it into a verdict (not covered: never measured) instead of an unknown-name error.
    Returns ``(registry, train, unmeasured names)``; a numeric ``train`` is padded with zero columns.
    """
    if tests is None:
        return registry, train, ()
    items = [tests] if isinstance(tests, (str, Mapping)) else tests
    if not _looks_like_labels(items):
        return registry, train, ()
    new: list[str] = []
    for lab in items:
        for name in registry.unknown(lab):
            if name not in new:
                new.append(name)
    if not new:
        return registry, train, ()
    P = registry.n_perturbations  # (new names go after the perturbations, before any context columns)
    ext = PerturbationRegistry(registry.names[:P] + tuple(new), control=registry.control, sep=registry.sep,
                               contexts=registry.contexts)
    if not _looks_like_labels(train):
        M = _csr(train, registry.K, "train")
        train = sp.hstack([M[:, :P], sp.csr_matrix((M.shape[0], len(new))), M[:, P:]], format="csr")
    return ext, train, tuple(new)


def as_label_rows(x, registry: PerturbationRegistry, what: str) -> tuple[sp.csr_matrix, list[str | None]]:
    """Rows of label vectors (CSR ``(n, K)``) and the user's own strings (``None`` for vectors)."""
    K = registry.K
    if x is None or (isinstance(x, Sequence) and not isinstance(x, str) and len(x) == 0):
        return sp.csr_matrix((0, K)), []
    if isinstance(x, (str, Mapping)):
        x = [x]
    if _looks_like_labels(x):
        originals: list[str | None] = []
        rows, cols, vals = [], [], []
        for i, lab in enumerate(x):
            try:
                vec = registry.encode(lab)
            except (KeyError, ValueError) as err:
                msg = err.args[0] if err.args else str(err)
                raise type(err)(f"{what}[{i}] = {lab!r}: {msg}") from None
            nz = np.flatnonzero(vec)
            rows.extend([i] * nz.size)
            cols.extend(nz.tolist())
            vals.extend(vec[nz].tolist())
            originals.append(lab if isinstance(lab, str) else None)
        M = sp.csr_matrix((vals, (rows, cols)), shape=(len(originals), K), dtype=np.float64)
        return _csr(M, K, what), originals
    M = _csr(x, K, what)
    return M, [None] * M.shape[0]


def row_labels(M: sp.csr_matrix, registry: PerturbationRegistry, rows: Sequence[int] | None = None) -> list[str]:
    """Canonical label strings of rows of a CSR label matrix (fast: no dense vectors)."""
    M = _csr(M)
    names = registry.names
    ip, ind, dat = M.indptr, M.indices, M.data
    idx = range(M.shape[0]) if rows is None else rows
    out = []
    for i in idx:
        s, e = ip[i], ip[i + 1]
        if registry.contexts:  # "A @ cell_type=CD4T"
            vec = np.zeros(registry.K)
            vec[ind[s:e]] = dat[s:e]
            out.append(registry.decode(vec))
            continue
        comps = {names[k]: float(v) for k, v in zip(ind[s:e], dat[s:e])}
        out.append(format_label(comps, sep=registry.sep, control=registry.control))
    return out


def _subtract(M: sp.csr_matrix, l0: np.ndarray) -> sp.csr_matrix:
    """``M - 1 l0^T`` without densifying ``M``."""
    supp = np.flatnonzero(l0)
    if supp.size == 0:
        return M
    n = M.shape[0]
    B = sp.csr_matrix(
        (np.tile(l0[supp], n), np.tile(supp, n), np.arange(0, n * supp.size + 1, supp.size)),
        shape=M.shape,
    )
    return _csr(M - B)


@dataclass(frozen=True, eq=False)
class PreparedDesign:
    """A training design reduced to its distinct differences from the reference.

    Attributes
    ----------
    registry
        Names of the columns.
    L
        The training labels as given, CSR ``(n_rows, K)``.
    reference
        The reference label ``l_0`` (the control: zero vector, unless declared otherwise).
    reference_label
        Its label string.
    reference_is_row
        Whether ``l_0`` is one of the training rows (a measured control).
    D
        Distinct non-zero rows of ``L - l_0``, in order of first occurrence, CSR ``(n_distinct, K)``.
    first, counts
        Row of ``L`` where each distinct row first occurs, and how often it occurs.
    labels
        Training label of each distinct row.
    """

    registry: PerturbationRegistry
    L: sp.csr_matrix
    reference: np.ndarray
    reference_label: str
    reference_is_row: bool
    D: sp.csr_matrix
    first: np.ndarray
    counts: np.ndarray
    labels: tuple[str, ...]

    @property
    def n_rows(self) -> int:
        return int(self.L.shape[0])

    @property
    def n_distinct(self) -> int:
        """Distinct training labels, the reference included if measured."""
        return int(self.D.shape[0]) + int(self.reference_is_row)

    def differences(self, x, what: str) -> tuple[sp.csr_matrix, list[str]]:
        """Rows ``l - l_0`` of other labels (tests, candidates) and their label strings."""
        M, originals = as_label_rows(x, self.registry, what)
        labels = row_labels(M, self.registry)
        labels = [o if o is not None else lab for o, lab in zip(originals, labels)]
        return _subtract(M, self.reference), labels


def prepare_design(train, registry: PerturbationRegistry, *, reference=None) -> PreparedDesign:
    """Parse ``train`` and the reference (``None``: zero vector; ``int``: a row of ``train``; or a
    label) into a :class:`PreparedDesign`."""
    L, _ = as_label_rows(train, registry, "train")
    if L.shape[0] == 0:
        raise ValueError("The training design has no rows; give at least the measured perturbations.")
    K = registry.K
    if reference is None:
        l0 = np.zeros(K)
    elif isinstance(reference, (int, np.integer)) and not isinstance(reference, bool):
        if not -L.shape[0] <= reference < L.shape[0]:
            raise IndexError(f"reference={reference} is not a row of the design ({L.shape[0]} rows).")
        l0 = L[int(reference)].toarray()[0]
    else:
        l0 = registry.encode(reference) if isinstance(reference, (str, Mapping)) else np.asarray(
            reference, dtype=np.float64
        )
        if l0.shape != (K,) or not np.isfinite(l0).all():
            raise ValueError(f"reference must be a finite label vector of length {K}, got {reference!r}.")
    D_all = _subtract(L, l0)
    reference_is_row = bool(np.any(np.diff(D_all.indptr) == 0))
    D, first, counts = distinct_rows(D_all)
    labels = tuple(row_labels(L, registry, first))
    ref_label = registry.decode(l0)
    for a in (l0, first, counts):
        a.flags.writeable = False
    return PreparedDesign(registry, L, l0, ref_label, reference_is_row, D, first, counts, labels)
