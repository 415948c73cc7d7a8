"""``PerturbationData``: the arrays a model needs, read from an AnnData once.

This is the only module (with the rest of :mod:`perturbax.data`) that touches AnnData. Nothing
here modifies the user's object.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbax.data.labels import LabelLike, PerturbationRegistry, close_matches, parse_label

__all__ = ["PerturbationData", "from_anndata", "check_counts"]


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    a.flags.writeable = False
    return a


def _condition_sort_key(label: str, comps: Mapping[str, float], control: str) -> tuple:
    return (label != control, len(comps), label)


@dataclass(frozen=True, repr=False)
class PerturbationData:
    """Cells, their perturbation labels and metadata, as arrays (immutable).

    Attributes
    ----------
    X
        Expression, shape ``(n_cells, n_genes)``, float32; a SciPy CSR matrix if the source was
        sparse (densified only per batch, see :meth:`dense`).
    registry
        Elementary perturbation names (columns of the design), the control label and the contexts
        (``registry.contexts``: keys and categories; their indicator columns follow the perturbations).
    conditions
        Canonical label of each distinct condition -- with contexts, each (perturbation, context)
        pair, e.g. ``"stimulated @ cell_type=CD4T"``; ``conditions[control_index]`` is the control
        (in the reference context).
    design
        Label vector of each condition, shape ``(n_conditions, K)`` (doses as values).
    env
        Condition index of each cell, shape ``(n_cells,)``.
    gene_names, cell_names
        Var and obs names of the source.
    times
        Time of each cell (``time_key``), or ``None``.
    """

    X: Any
    registry: PerturbationRegistry
    conditions: tuple[str, ...]
    design: np.ndarray
    env: np.ndarray
    gene_names: tuple[str, ...]
    cell_names: tuple[str, ...]
    times: np.ndarray | None = None
    perturbation_key: str = "perturbation"
    time_key: str | None = None
    source_layer: str | None = None

    # ----------------------------------------------------------------- shapes
    @property
    def n_cells(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.X.shape[1])

    @property
    def K(self) -> int:
        """Number of elementary perturbations (columns of the design)."""
        return self.registry.K

    @property
    def n_conditions(self) -> int:
        return len(self.conditions)

    @property
    def control(self) -> str:
        """Canonical label of the control condition (with contexts: in the reference context)."""
        return self.registry.control_label

    @property
    def context_keys(self) -> tuple[str, ...]:
        """The context keys (``from_anndata(..., context_keys=...)``), empty without contexts."""
        return self.registry.context_keys

    @property
    def control_index(self) -> int | None:
        """Index of the control condition in :attr:`conditions` (``None`` if absent)."""
        try:
            return self.conditions.index(self.control)
        except ValueError:
            return None

    @property
    def is_sparse(self) -> bool:
        return sp.issparse(self.X)

    @property
    def L(self) -> np.ndarray:
        """Per-cell label matrix, shape ``(n_cells, K)`` (``design[env]``)."""
        return self.design[self.env]

    @property
    def cells_per_condition(self) -> np.ndarray:
        return np.bincount(self.env, minlength=self.n_conditions)

    @property
    def library_size(self) -> np.ndarray:
        """Total of each cell's row of ``X`` (meaningful for counts), shape ``(n_cells,)``."""
        return np.asarray(self.X.sum(axis=1), dtype=np.float32).reshape(-1)

    def condition_contexts(self) -> list[dict[str, str]]:
        """``{key: category}`` of each condition (empty dicts without contexts)."""
        return [self.registry.context_of(row) or {} for row in self.design]

    def cell_contexts(self) -> dict[str, np.ndarray]:
        """``{key: category of each cell}`` (object arrays; empty without contexts)."""
        per = self.condition_contexts()
        return {k: np.asarray([c[k] for c in per], dtype=object)[self.env] for k in self.context_keys}

    # ------------------------------------------------------------- accessors
    def dense(self, idx: np.ndarray | slice | None = None) -> np.ndarray:
        """Dense float32 rows of ``X`` (all cells if ``idx`` is None)."""
        rows = self.X if idx is None else self.X[idx]
        if sp.issparse(rows):
            rows = rows.toarray()
        return np.asarray(rows, dtype=np.float32)

    def condition_index(self, label: LabelLike) -> int:
        """Index in :attr:`conditions` of a label in any spelling; error if it has no cells."""
        canon = self.registry.canonical(label)
        try:
            return self.conditions.index(canon)
        except ValueError:
            hint = close_matches(canon, self.conditions)
            more = f" Close matches: {hint}." if hint else ""
            raise KeyError(
                f"Condition {canon!r} has zero cells in this data.{more} "
                f"Conditions present ({self.n_conditions}): {_preview(self.conditions)}."
            ) from None

    def cells_of(self, label: LabelLike) -> np.ndarray:
        """Indices of the cells of one condition."""
        return np.flatnonzero(self.env == self.condition_index(label))

    def cells_by_condition(self) -> dict[str, np.ndarray]:
        """``{label: dense cells}`` for every condition."""
        return {lab: self.dense(np.flatnonzero(self.env == e)) for e, lab in enumerate(self.conditions)}

    # ---------------------------------------------------------------- subsets
    def subset(self, cells: np.ndarray) -> PerturbationData:
        """A new object with the given cells (indices or boolean mask); the registry is kept,
        conditions without cells are dropped."""
        cells = np.asarray(cells)
        if cells.dtype == bool:
            if cells.shape != (self.n_cells,):
                raise ValueError(f"Boolean mask has shape {cells.shape}, expected ({self.n_cells},).")
            cells = np.flatnonzero(cells)
        env = self.env[cells]
        keep = np.unique(env)
        remap = np.full(self.n_conditions, -1, dtype=np.int64)
        remap[keep] = np.arange(keep.size)
        return replace(
            self,
            X=self.X[cells],
            conditions=tuple(self.conditions[e] for e in keep),
            design=_readonly(self.design[keep]),
            env=_readonly(remap[env].astype(np.int32)),
            cell_names=tuple(self.cell_names[i] for i in cells),
            times=None if self.times is None else _readonly(self.times[cells]),
        )

    def select(self, labels: Iterable[LabelLike], *, exclude: bool = False) -> PerturbationData:
        """Cells of the given conditions (or, with ``exclude=True``, of all others)."""
        idx = {self.condition_index(lab) for lab in labels}
        mask = np.isin(self.env, sorted(idx))
        return self.subset(~mask if exclude else mask)

    def with_registry(self, registry: PerturbationRegistry) -> PerturbationData:
        """Re-express the design in another registry (e.g. the training data's), which must contain
        every elementary perturbation present here and the same contexts."""
        if registry.names == self.registry.names and registry.control == self.registry.control:
            return self
        if registry.contexts != self.registry.contexts:
            raise ValueError(
                f"These cells have contexts {dict(self.registry.contexts)} but the target registry has "
                f"{dict(registry.contexts)}; read them with from_anndata(..., registry=<the fit's registry>) so "
                f"that the categories match."
            )
        missing = [n for n in self.registry.names if n not in registry.names]
        if missing:
            raise ValueError(
                f"Elementary perturbations {missing} are not in the target registry "
                f"({_preview(registry.names)})."
            )
        design = np.zeros((self.n_conditions, registry.K))
        for j, name in enumerate(self.registry.names):
            design[:, registry.index(name)] = self.design[:, j]
        conditions = tuple(registry.decode(row) for row in design)
        return replace(self, registry=registry, design=_readonly(design), conditions=conditions)

    def to_anndata(self):
        """An AnnData with ``X``, the perturbation labels in ``obs[perturbation_key]``, times and
        contexts (one ``obs`` column per context key)."""
        import anndata as ad

        obs = pd.DataFrame(index=pd.Index(self.cell_names, name=None))
        plain = [self.registry.perturbation_label(c) for c in self.conditions] if self.context_keys else self.conditions
        obs[self.perturbation_key] = pd.Categorical([plain[e] for e in self.env])
        if self.times is not None:
            obs[self.time_key or "time"] = self.times
        cats = dict(self.registry.contexts)
        for key, values in self.cell_contexts().items():
            obs[key] = pd.Categorical(values.astype(str), categories=list(cats[key]))
        var = pd.DataFrame(index=pd.Index(self.gene_names))
        X = self.X.copy()
        return ad.AnnData(X=X, obs=obs, var=var)

    def __repr__(self) -> str:
        kind = "on disk" if hasattr(self.X, "blocks") else "sparse" if self.is_sparse else "dense"
        lines = [
            f"PerturbationData: {self.n_cells} cells x {self.n_genes} genes ({kind}), "
            f"K={self.K} elementary perturbations, {self.n_conditions} conditions",
            f"    control: {self.control!r} ({'present' if self.control_index is not None else 'absent'})",
            f"    conditions: {_preview(self.conditions, 8)}",
        ]
        if self.times is not None:
            lines.append(f"    times: {np.unique(self.times).tolist()[:10]}")
        if self.context_keys:
            lines.append(f"    contexts: {', '.join(f'{k} ({len(c)})' for k, c in self.registry.contexts)}")
        return "\n".join(lines)


def _preview(items: Sequence[str], n: int = 12) -> str:
    items = list(items)
    text = ", ".join(map(str, items[:n]))
    return text + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _missing_key(where: str, key: str, available: Iterable[str], what: str) -> KeyError:
    available = list(map(str, available))
    hint = close_matches(key, available)
    more = f" Did you mean {hint[0]!r}?" if hint else ""
    return KeyError(f"{where} has no {what} {key!r}.{more} Available: {_preview(available, 30)}.")


def _read_matrix(adata, layer: str | None, on_disk=False):
    if on_disk is not False:  # the cells stay in the file, read when needed (perturbax.data.stream)
        from perturbax.data.stream import DiskCells

        if layer is not None:
            raise ValueError(f"on_disk reads X; layer={layer!r} cannot be streamed (write that layer to X of a file).")
        if on_disk is not True:  # a file named by the caller: its cells matched by name
            return DiskCells.open(on_disk, adata.obs_names)
        if not adata.isbacked:
            raise ValueError(
                "on_disk=True reads X of a backed AnnData: open it with `anndata.read_h5ad(path, backed='r')`, "
                "or pass on_disk='path.zarr' with an AnnData of its obs (perturbax.data.stream.read_obs)."
            )
        return DiskCells.open(adata.filename, adata.obs_names if adata.is_view else None)
    if layer is not None:
        if layer not in adata.layers:
            raise _missing_key("adata.layers", layer, adata.layers.keys(), "layer")
        if adata.isbacked:
            raise ValueError(
                "Layers of a backed AnnData cannot be read lazily. Load it into memory first: "
                "`adata = anndata.read_h5ad(path)` (without backed=) or `adata = adata.to_memory()`."
            )
        M = adata.layers[layer]
    else:
        M = adata.X
        if M is None:
            raise ValueError("adata.X is None; pass layer= naming the layer that holds expression.")
        if adata.isbacked:
            M = M[:] if hasattr(M, "format") or hasattr(M, "to_memory") else M[()]
            if hasattr(M, "to_memory"):
                M = M.to_memory()
    if sp.issparse(M):
        M = sp.csr_matrix(M, dtype=np.float32, copy=True)
        M.sum_duplicates()
    else:
        M = np.array(M, dtype=np.float32, copy=True)
        if M.ndim != 2:
            raise ValueError(f"Expression matrix must be 2-D, got shape {M.shape}.")
    return M


def _finite_check(M, what: str, offset: int = 0) -> None:
    if hasattr(M, "blocks"):  # cells on disk: one pass over the file
        for start, block in M.blocks():
            _finite_check(block, what, offset + start)
        return
    vals = M.data if sp.issparse(M) else M
    bad = ~np.isfinite(vals)
    if bad.any():
        if sp.issparse(M):
            rows = np.unique(np.repeat(np.arange(M.shape[0]), np.diff(M.indptr))[bad])
        else:
            rows = np.unique(np.nonzero(bad)[0])
        raise ValueError(
            f"{what} contains {int(bad.sum())} NaN/Inf value(s) in {rows.size} cell(s) "
            f"(first rows: {(rows[:5] + offset).tolist()}). Remove or impute those cells before fitting, e.g. "
            f"`adata = adata[np.isfinite(adata.X.sum(1)).A1]` for sparse X."
        )


def check_counts(M, what: str = "X") -> None:
    """Raise if ``M`` holds negative or non-integer values (for count likelihoods)."""
    if hasattr(M, "blocks"):  # cells on disk: one pass over the file
        for _, block in M.blocks():
            check_counts(block, what)
        return
    vals = M.data if sp.issparse(M) else np.asarray(M)
    if vals.size == 0:
        return
    neg = vals < 0
    if neg.any():
        raise ValueError(
            f"{what} has {int(neg.sum())} negative value(s) (min {float(vals.min()):.4g}); a count "
            f"likelihood needs raw non-negative integer counts. Pass layer='counts' (or the layer that "
            f"holds raw UMI counts), or use likelihood='gaussian' for log-normalised data."
        )
    frac = np.abs(vals - np.round(vals)) > 1e-3
    if frac.any():
        ex = vals[frac][:3].tolist()
        raise ValueError(
            f"{what} has {int(frac.sum())} non-integer value(s) (e.g. {ex}); a count likelihood needs "
            f"raw integer counts. Pass layer='counts' (or the layer that holds raw UMI counts), or use "
            f"likelihood='gaussian' for log-normalised data."
        )


def from_anndata(
    adata,
    perturbation_key: str,
    control: str,
    *,
    sep: str = "+",
    dose_key: str | None = None,
    time_key: str | None = None,
    layer: str | None = None,
    context_keys: Sequence[str] = (),
    counts: bool = False,
    registry: PerturbationRegistry | None = None,
    require_control: bool = True,
    on_disk: bool | str = False,
) -> PerturbationData:
    """Read perturbed cells from an AnnData (which is never modified).

    Parameters
    ----------
    adata
        Cells x genes. Backed AnnData (``read_h5ad(..., backed="r")``) is read into memory (unless ``on_disk``).
    perturbation_key
        ``obs`` column with labels such as ``"A"``, ``"A+B"``, ``"A:0.5+B:2"`` or the control.
    control
        Label of unperturbed cells in that column.
    sep
        Separator of combined perturbations.
    dose_key
        Optional ``obs`` column of doses aligned with the components (``"0.5+2"`` for ``"A+B"``).
    time_key
        Optional numeric ``obs`` column of times since the perturbation was switched on.
    layer
        Layer holding the expression (default ``X``).
    context_keys
        Categorical ``obs`` columns (cell type, cell line, donor, batch): the contexts. Each
        condition is then a (perturbation, context) pair (``"stimulated @ cell_type=CD4T"``, see
        :mod:`perturbax.data.labels`), and the label vector gets one indicator column per category
        but the first (the reference). Categories are the sorted values; with ``registry``, that
        registry's contexts (default: all of them) and categories are used, so cells of a single
        context are encoded as the fitted model's.
    counts
        Require raw counts (non-negative integers), as count likelihoods do.
    registry
        Encode labels with this registry (e.g. a fitted model's) instead of building one; labels
        naming other perturbations are an error.
    require_control
        Raise if no cell carries the control label.
    on_disk
        ``True`` with a backed AnnData (``.h5ad``), or the path of the ``.h5ad``/``.zarr`` file
        whose obs ``adata`` holds (:func:`perturbax.data.stream.read_obs`): keep ``X`` in the file
        and read cells when needed (:class:`perturbax.data.stream.DiskCells`); ``fit`` then streams
        its minibatches from disk.
    """
    import anndata as ad

    if registry is not None and registry.contexts:
        if not context_keys:
            context_keys = registry.context_keys
        elif tuple(context_keys) != registry.context_keys:
            raise ValueError(
                f"context_keys={list(context_keys)} but the registry's contexts are {list(registry.context_keys)}; "
                f"pass context_keys={list(registry.context_keys)} (or leave it out)."
            )
    elif registry is not None and context_keys:
        raise ValueError(
            f"context_keys={list(context_keys)} but the given registry has no contexts (the model was fitted "
            f"without them); leave context_keys out or refit with them."
        )
    context_keys = tuple(context_keys)
    if len(set(context_keys)) != len(context_keys):
        raise ValueError(f"context_keys {list(context_keys)} name a column twice; give each once.")
    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"from_anndata expects an AnnData, got {type(adata).__name__}.")
    obs = adata.obs
    for key, what in [(perturbation_key, "perturbation_key"), (dose_key, "dose_key"), (time_key, "time_key")]:
        if key is not None and key not in obs.columns:
            raise _missing_key("adata.obs", key, obs.columns, f"column ({what})")
    for key in context_keys:
        if key not in obs.columns:
            raise _missing_key("adata.obs", key, obs.columns, "column (context_keys)")
        if key in (perturbation_key, dose_key, time_key):
            raise ValueError(f"obs[{key!r}] is both a context key and the perturbation/dose/time key; pick another.")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique().tolist()
        raise ValueError(
            f"Gene names are duplicated ({len(dup)}: {dup[:5]}). Make them unique first, e.g. "
            f"`adata = adata.copy(); adata.var_names_make_unique()`."
        )

    raw = obs[perturbation_key]
    if raw.isna().any():
        n = int(raw.isna().sum())
        raise ValueError(
            f"obs[{perturbation_key!r}] is missing for {n} cell(s). Label every cell (use {control!r} "
            f"for unperturbed cells) or drop them."
        )
    labels = raw.astype(str).to_numpy()
    doses = None
    if dose_key is not None:
        dose_col = obs[dose_key]
        if dose_col.isna().any() and not np.all(labels[dose_col.isna().to_numpy()] == control):
            raise ValueError(f"obs[{dose_key!r}] is missing for perturbed cells; give a dose per component.")
        doses = dose_col.astype(str).to_numpy()

    # Parse each distinct (label, dose) pair once.
    keys = labels if doses is None else np.char.add(np.char.add(labels.astype(str), "\x1f"), doses.astype(str))
    uniq, inverse = np.unique(keys, return_inverse=True)
    parsed: list[dict[str, float]] = []
    for u in uniq:
        lab, _, dose_text = str(u).partition("\x1f")
        if lab == control:
            parsed.append({})
            continue
        try:
            parsed.append(
                parse_label(lab, sep=sep, control=control, doses=dose_text if doses is not None else None)
            )
        except ValueError as err:
            raise ValueError(f"obs[{perturbation_key!r}]: {err}") from None

    if require_control and not any(len(p) == 0 for p in parsed):
        present = sorted({str(u).partition("\x1f")[0] for u in uniq})
        hint = close_matches(control, present)
        more = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(
            f"No cell has the control label {control!r} in obs[{perturbation_key!r}].{more} "
            f"Labels present: {_preview(present, 20)}."
        )

    names_seen = sorted({n for p in parsed for n in p})
    ctx_codes, ctx_cats = _context_codes(obs, context_keys, registry)
    if registry is None:
        registry = PerturbationRegistry(tuple(names_seen), control=control, sep=sep, contexts=ctx_cats)
    else:
        unknown = [n for n in names_seen if n not in registry.perturbation_names]
        if unknown:
            raise ValueError(
                f"obs[{perturbation_key!r}] names perturbations unknown to the given registry: "
                f"{unknown[:10]}. Known: {_preview(registry.perturbation_names, 20)}."
            )
        registry = PerturbationRegistry(registry.names, control=control, sep=sep, contexts=registry.contexts)

    # conditions: distinct (perturbation, context) pairs; label vectors [l, context indicators]
    P = registry.n_perturbations
    pert_vecs = np.stack([registry.encode(p)[:P] for p in parsed]) if parsed else np.zeros((0, P))
    pair_keys = np.stack([inverse.astype(np.int64), *ctx_codes], axis=1) if ctx_codes else inverse[:, None]
    pairs, pair_inverse = np.unique(pair_keys, axis=0, return_inverse=True)
    pair_inverse = pair_inverse.reshape(-1)
    offsets = np.cumsum([0] + [len(c) - 1 for _, c in ctx_cats])
    vecs = np.zeros((pairs.shape[0], registry.K))
    vecs[:, :P] = pert_vecs[pairs[:, 0]]
    for j in range(len(ctx_cats)):
        code = pairs[:, 1 + j]
        on = code > 0
        vecs[np.flatnonzero(on), P + offsets[j] + code[on] - 1] = 1.0
    canon = [registry.decode(v) for v in vecs]
    cond_labels = sorted(set(canon), key=lambda c: _condition_sort_key(c, registry.components(c), registry.control_label))
    cond_index = {c: i for i, c in enumerate(cond_labels)}
    env = np.array([cond_index[c] for c in canon], dtype=np.int32)[pair_inverse]
    design = registry.encode_many(cond_labels)

    M = _read_matrix(adata, layer, on_disk)
    _finite_check(M, "X" if layer is None else f"layers[{layer!r}]")
    if counts:
        check_counts(M, "X" if layer is None else f"layers[{layer!r}]")

    times = None
    if time_key is not None:
        tcol = obs[time_key]
        try:
            times = pd.to_numeric(tcol, errors="raise").to_numpy(dtype=np.float64)
        except (ValueError, TypeError):
            ex = tcol.astype(str).unique()[:5].tolist()
            raise ValueError(
                f"obs[{time_key!r}] is not numeric (values like {ex}). Give times as numbers "
                f"(e.g. hours since the perturbation was switched on)."
            ) from None
        if not np.isfinite(times).all():
            raise ValueError(f"obs[{time_key!r}] has {int((~np.isfinite(times)).sum())} missing/infinite time(s).")
        times = _readonly(times.astype(np.float32))

    return PerturbationData(
        X=M,
        registry=registry,
        conditions=tuple(cond_labels),
        design=_readonly(design),
        env=_readonly(env),
        gene_names=tuple(map(str, adata.var_names)),
        cell_names=tuple(map(str, adata.obs_names)),
        times=times,
        perturbation_key=perturbation_key,
        time_key=time_key,
        source_layer=layer,
    )


def _context_codes(obs, keys: Sequence[str], registry: PerturbationRegistry | None):
    """Integer codes per cell of each context key (0 = the reference category) and the contexts
    ``((key, categories), ...)``: the sorted values, or the given registry's categories."""
    codes, cats = [], []
    known = dict(registry.contexts) if registry is not None else {}
    for key in keys:
        col = obs[key]
        if col.isna().any():
            raise ValueError(f"obs[{key!r}] (context) is missing for {int(col.isna().sum())} cell(s); label every cell or drop them.")
        values = col.astype(str).to_numpy()
        if key in known:
            categories = known[key]
            unknown = sorted(set(values) - set(categories))
            if unknown:
                raise ValueError(
                    f"obs[{key!r}] has values {unknown[:5]} that the fitted model never saw as a context; its "
                    f"categories are {_preview(categories, 20)}. Keep only cells of those contexts."
                )
        else:
            categories = tuple(sorted(set(values)))
        codes.append(pd.Categorical(values, categories=list(categories)).codes.astype(np.int64))
        cats.append((key, tuple(categories)))
    return codes, tuple(cats)
