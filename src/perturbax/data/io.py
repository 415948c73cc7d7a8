"""AnnData of predicted cells (in memory, or written to a file block by block), cells grouped by condition out of an AnnData, and rows of an
AnnData selected by ``obs`` values (``--where KEY=VALUE``).

These two functions are how the layers above :mod:`perturbax.data` (baselines, metrics, the CLI,
inference) hand cells to and take cells from AnnData.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "predictions_to_anndata",
    "write_predictions",
    "cells_by_condition",
    "prediction_cells",
    "prediction_intervals",
    "prediction_trajectory",
    "prediction_summary",
    "parse_where",
    "select_where",
    "where_mask",
    "subset_copy",
]


def _as_cells(name: str, x, n_genes: int | None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 1 and n_genes is not None and a.size == n_genes:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"Predicted cells of {name} must be a 2-D array (cells x genes), got shape {a.shape}.")
    if not np.issubdtype(a.dtype, np.number):
        raise TypeError(f"Predicted cells of {name} must be numeric, got dtype {a.dtype}.")
    return a


def predictions_to_anndata(
    cells: Mapping[str, np.ndarray] | np.ndarray,
    labels: Sequence[str] | None = None,
    *,
    gene_names: Sequence[str],
    perturbation_key: str = "perturbation",
    obs: pd.DataFrame | Mapping[str, Sequence] | None = None,
    uns: Mapping | None = None,
    varm: Mapping[str, np.ndarray] | None = None,
):
    """Build the AnnData of predicted cells.

    Parameters
    ----------
    cells
        ``{label: array (n_cells_label, n_genes)}``, or one array ``(n_cells, n_genes)`` together
        with ``labels`` (one per row).
    labels
        Perturbation label of each row when ``cells`` is an array; must be ``None`` for a mapping.
    gene_names
        Names of the columns (become ``var_names``; must be unique).
    perturbation_key
        ``obs`` column receiving the labels (categorical, categories in order of first appearance).
    obs
        Extra per-cell columns (a DataFrame or mapping of equal-length columns), in row order.
    uns, varm
        Copied into ``adata.uns`` / ``adata.varm`` (``varm`` arrays need ``n_genes`` rows).

    Returns
    -------
    AnnData with float32 ``X`` and obs names ``pred_0, pred_1, ...``.
    """
    import anndata as ad

    var = _prediction_var(gene_names)
    G = len(var)
    if isinstance(cells, Mapping):
        if labels is not None:
            raise ValueError(
                "labels must be None when cells is a mapping {label: cells}: the keys are the labels."
            )
        if not cells:
            raise ValueError("cells is an empty mapping; give at least one {label: array}.")
        blocks, per_cell = [], []
        for lab, x in cells.items():
            a = _as_cells(repr(lab), x, G)
            blocks.append(a)
            per_cell.extend([str(lab)] * a.shape[0])
        X = np.concatenate([b.astype(np.float32, copy=False) for b in blocks], axis=0)
    else:
        X = _as_cells("the array", cells, None).astype(np.float32, copy=False)
        if labels is None:
            raise ValueError(
                "cells is an array, so labels is required: one perturbation label per row "
                "(or pass a mapping {label: cells})."
            )
        per_cell = labels
    per_cell = _label_column(per_cell)
    if len(per_cell) != X.shape[0]:
        raise ValueError(f"labels has {len(per_cell)} entries but cells has {X.shape[0]} rows; give one per row.")
    _check_block(X, G, per_cell)
    adata = ad.AnnData(X=X, obs=_prediction_obs(per_cell, obs, perturbation_key), var=var)
    _add_summaries(adata, uns, varm)
    return adata


def write_predictions(
    path,
    blocks: Iterable[np.ndarray],
    labels: Sequence[str] | pd.Categorical,
    *,
    gene_names: Sequence[str],
    perturbation_key: str = "perturbation",
    obs: pd.DataFrame | Mapping[str, Sequence] | None = None,
    uns: Mapping | None = None,
    varm: Mapping[str, np.ndarray] | None = None,
):
    """Write predicted cells to an ``.h5ad`` file block by block, never holding more than one block.

    The file holds what :func:`predictions_to_anndata` builds from the same arguments (``labels``:
    one per cell, ``blocks``: the cells in row order, ``(rows, n_genes)`` each); ``obs``, ``var``,
    ``varm`` and ``uns`` are written first by anndata's writer, then ``X`` (dense float32) is
    appended by rows. It is written to a hidden file next to ``path`` and renamed when complete (a
    failure leaves no partial ``path``).

    Returns
    -------
    The written AnnData opened backed (``X`` stays in the file; close it with ``adata.file.close()``).
    """
    import anndata as ad
    import h5py
    from anndata.io import write_elem

    path = Path(path)
    var = _prediction_var(gene_names)
    G = len(var)
    per_cell = _label_column(labels)
    n = len(per_cell)
    if n == 0:
        raise ValueError("labels is empty; there are no predicted cells to write.")
    skeleton = ad.AnnData(obs=_prediction_obs(per_cell, obs, perturbation_key), var=var)
    _add_summaries(skeleton, uns, varm)
    partial = path.with_name(f".{path.name}.partial")
    try:
        skeleton.write_h5ad(partial)
        del skeleton
        done = 0
        with h5py.File(partial, "a") as f:
            for block in blocks:
                X = _as_cells("a block", block, G).astype(np.float32, copy=False)
                if done + X.shape[0] > n:
                    raise ValueError(f"The blocks hold more than the {n} cells labelled; give one label per row.")
                _check_block(X, G, per_cell[done : done + X.shape[0]])
                if done == 0:
                    rows = max(1, min(n, 2**18 // max(G, 1)))  # HDF5 chunks of about 1 MB
                    write_elem(f, "X", X, dataset_kwargs={"maxshape": (n, G), "chunks": (rows, G)})
                    f["X"].resize((n, G))
                else:
                    f["X"][done : done + X.shape[0]] = X
                done += X.shape[0]
        if done != n:
            raise ValueError(f"The blocks hold {done} cells but {n} are labelled; give one label per row.")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return ad.read_h5ad(path, backed="r")


def _prediction_var(gene_names: Sequence[str]) -> pd.DataFrame:
    gene_names = [str(g) for g in gene_names]
    if len(set(gene_names)) != len(gene_names):
        dup = pd.Index(gene_names)
        raise ValueError(
            f"gene_names has duplicates ({dup[dup.duplicated()].unique().tolist()[:5]}); pass unique names."
        )
    return pd.DataFrame(index=pd.Index(gene_names))


def _label_column(labels) -> pd.Categorical:
    """Labels as a categorical (categories in order of first appearance; a categorical is kept)."""
    if isinstance(labels, pd.Categorical):
        return labels
    per_cell = [str(lab) for lab in labels]
    return pd.Categorical(per_cell, categories=list(dict.fromkeys(per_cell)))


def _check_block(X: np.ndarray, G: int, per_cell: pd.Categorical) -> None:
    if X.shape[1] != G:
        raise ValueError(
            f"Predicted cells have {X.shape[1]} genes (columns) but gene_names has {G}; they must match."
        )
    bad = ~np.isfinite(X)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        labs = sorted({str(per_cell[r]) for r in rows})
        raise ValueError(
            f"Predicted cells contain {int(bad.sum())} NaN/Inf value(s) in {rows.size} cell(s) of "
            f"condition(s) {labs[:5]}; fix the prediction (e.g. a diverged fit) before saving."
        )


def _prediction_obs(per_cell: pd.Categorical, obs, perturbation_key: str) -> pd.DataFrame:
    n = len(per_cell)
    obs_df = pd.DataFrame(index=pd.Index([f"pred_{i}" for i in range(n)]))
    if obs is not None:
        extra = obs.reset_index(drop=True) if isinstance(obs, pd.DataFrame) else pd.DataFrame(dict(obs))
        if len(extra) != n:
            raise ValueError(f"obs has {len(extra)} rows but there are {n} predicted cells; give one row per cell.")
        if perturbation_key in extra.columns:
            raise ValueError(
                f"obs already has a column {perturbation_key!r}, which would be overwritten by the labels; "
                f"rename it or pass another perturbation_key."
            )
        extra.index = obs_df.index
        obs_df = pd.concat([obs_df, extra], axis=1)
    obs_df.insert(0, perturbation_key, per_cell)
    return obs_df


def _add_summaries(adata, uns, varm) -> None:
    if uns:
        adata.uns.update(dict(uns))
    if varm:
        for key, arr in varm.items():
            arr = np.asarray(arr)
            if arr.shape[0] != adata.n_vars:
                raise ValueError(f"varm[{key!r}] has {arr.shape[0]} rows but there are {adata.n_vars} genes.")
            adata.varm[key] = arr


def cells_by_condition(
    adata,
    perturbation_key: str,
    control: str,
    layer: str | None = None,
    *,
    sep: str = "+",
    genes: Sequence[str] | None = None,
    require_control: bool = False,
    context_keys: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """``{canonical label: dense float32 cells}`` of every condition in ``adata``.

    Labels are canonical (``"B+A"`` and ``"A+B"`` both become ``"A+B"``; components in sorted
    name order), so the keys of two files can be matched directly. ``genes`` selects and orders
    the columns by name (an error names genes that are missing). Control cells appear under
    ``control`` if present; pass ``require_control=True`` to insist on them. With
    ``context_keys`` the keys are (perturbation, context) pairs, ``"A @ cell_type=CD4T"``, and the
    control cells of each context appear under ``"control @ cell_type=CD4T"``.
    """
    from perturbax.data.core import from_anndata

    if genes is not None:
        genes = [str(g) for g in genes]
        have = pd.Index(adata.var_names.astype(str))
        missing = [g for g in genes if g not in have]
        if missing:
            raise KeyError(
                f"{len(missing)} requested gene(s) are not in this AnnData's var_names (e.g. {missing[:5]}). "
                f"Subset the other file to the shared genes, e.g. `truth[:, pred.var_names]`."
            )
        adata = subset_copy(adata, var=have.get_indexer(genes))
    data = from_anndata(adata, perturbation_key, control, sep=sep, layer=layer, require_control=require_control,
                        context_keys=tuple(context_keys))
    return data.cells_by_condition()


def prediction_cells(adata) -> dict[str, np.ndarray]:
    """``{column label: predicted cells}`` of an AnnData written by :func:`perturbax.inference.predict`,
    in the order of ``uns["perturbax"]["labels"]`` (with contexts, the cells of each
    (perturbation, context) pair, from ``obs[perturbation_key]`` and the context columns)."""
    meta = adata.uns.get("perturbax", {})
    labels = [str(x) for x in np.asarray(meta.get("labels", [])).reshape(-1)]
    if not labels or meta.get("times") is not None:
        raise ValueError("prediction_cells needs a prediction of perturbax.inference.predict without times.")
    key = str(adata.obs.columns[0])
    per_cell = adata.obs[key].astype(str).to_numpy().astype(object)
    contexts = meta.get("contexts") or {}
    if contexts:
        ctx = [" & ".join(f"{k}={v}" for k, v in zip(contexts, row))
               for row in zip(*(adata.obs[k].astype(str).to_numpy() for k in contexts))]
        per_cell = np.asarray([f"{p} @ {c}" for p, c in zip(per_cell, ctx)], dtype=object)
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    return {lab: np.asarray(X[per_cell == lab], dtype=np.float32) for lab in labels}


def prediction_intervals(adata, label, *, level: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, lower, upper)`` per gene of one predicted perturbation in an AnnData written by
    :func:`perturbax.inference.predict` (label in any spelling the prediction used).

    ``level``: the interval at another level than the prediction's (``None``: its own). For the
    nested estimator's calibrated intervals (``uns["perturbax"]["nested"]``) the half-width is
    rescaled by the ratio of the conformal factors (levels 0.5, 0.8, 0.9, 0.95 and the
    prediction's; likewise the dynamics recipe's calibrated intervals, ``uns["perturbax"]["calibration"]``);
    otherwise the equal-tailed quantiles of ``uns["mean_draws"]``."""
    meta = adata.uns.get("perturbax", {})
    labels = list(meta.get("labels", []))
    if not labels or "pred_mean" not in adata.varm:
        raise ValueError("This AnnData has no credible intervals; it was not written by perturbax.inference.predict.")
    if label not in labels:
        from perturbax.data.labels import close_matches

        hint = close_matches(str(label), labels)
        raise KeyError(f"{label!r} was not predicted here.{' Did you mean ' + repr(hint) + '?' if hint else ''} "
                       f"Predicted: {labels}.")
    j = labels.index(label)
    mean, lower, upper = (np.asarray(adata.varm[k])[:, j] for k in ("pred_mean", "pred_lower", "pred_upper"))
    if level is None or float(level) == float(meta.get("interval", np.nan)):
        return mean, lower, upper
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    nested = meta.get("nested") or meta.get("calibration")  # (calibrated intervals: nested or dynamics recipe)
    if nested is not None:
        by_kind = nested.get("factors_by_kind")  # (dynamics recipe: the factors of this column's kind)
        levels = by_kind[nested["kinds"][j]] if by_kind is not None else nested["factors"]
        factors = {float(a): float(q) for a, q in dict(levels).items()}
        if float(level) not in factors:
            raise ValueError(f"level={level} is not one this calibrated prediction holds; use one of {sorted(factors)}.")
        own = nested["interval_factors"][j] if by_kind is not None else nested["interval_factor"]
        scale = factors[float(level)] / float(own)
        return mean, mean - (mean - lower) * scale, mean + (upper - mean) * scale
    draws = np.asarray(adata.uns["mean_draws"])[j]
    return mean, np.quantile(draws, (1 - level) / 2, axis=0), np.quantile(draws, (1 + level) / 2, axis=0)


def prediction_trajectory(adata, perturbation, *, level: float | None = None):
    """``(times (T,), mean (T, G), lower (T, G), upper (T, G))`` of one perturbation in a prediction
    of a model of time (``predict(fit, ..., times=[...])``), times ascending: the per-gene interval of
    the mean at each predicted time (:func:`prediction_intervals` of each (perturbation, time)
    column). ``perturbation`` is spelled as the prediction's plain labels
    (``uns["perturbax"]["perturbations"]``)."""
    meta = adata.uns.get("perturbax", {})
    perts = [str(p) for p in meta.get("perturbations", [])]
    if not perts:
        raise ValueError("This prediction has no times; trajectories come from predict(fit, ..., times=[...]) of a model "
                         "of time.")
    if str(perturbation) not in perts:
        raise KeyError(f"{perturbation!r} was not predicted here; predicted: {list(dict.fromkeys(perts))}.")
    labels = list(meta["labels"])
    cols = [(float(t), labels[j]) for j, (p, t) in enumerate(zip(perts, meta["times"])) if p == str(perturbation)]
    cols.sort()
    parts = [prediction_intervals(adata, key, level=level) for _, key in cols]
    return (np.array([t for t, _ in cols]), *(np.stack([p[k] for p in parts]) for k in range(3)))


def prediction_summary(adata) -> pd.DataFrame:
    """Tidy per-gene table of a prediction: columns perturbation, gene, mean, lower, upper, plus
    the interval level (from :func:`perturbax.inference.predict`'s output)."""
    meta = adata.uns.get("perturbax", {})
    rows = []
    for lab in meta.get("labels", []):
        mean, lower, upper = prediction_intervals(adata, lab)
        rows.append(pd.DataFrame({"perturbation": lab, "gene": adata.var_names.astype(str), "mean": mean,
                                  "lower": lower, "upper": upper}))
    if not rows:
        raise ValueError("This AnnData has no credible intervals; it was not written by perturbax.inference.predict.")
    out = pd.concat(rows, ignore_index=True)
    out["interval"] = float(meta.get("interval", np.nan))
    return out


def parse_where(items: Sequence[str] | None) -> dict[str, list[str]]:
    """``["dataset=norman19", "cell_type=k562"]`` -> ``{"dataset": ["norman19"], ...}``.

    A key given more than once keeps every value (cells matching any of them); different keys must
    all match. Raises ``ValueError`` naming an item without ``=`` or with an empty key.
    """
    out: dict[str, list[str]] = {}
    for item in items or ():
        key, eq, value = str(item).partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"--where {item!r} is not KEY=VALUE; write e.g. --where dataset=norman19.")
        out.setdefault(key, []).append(value.strip())
    return out


def _values_preview(values: Sequence[str], n: int = 20) -> str:
    values = list(values)
    text = ", ".join(repr(v) for v in values[:n])
    return text + (f", ... ({len(values) - n} more)" if len(values) > n else "")


def where_mask(obs: pd.DataFrame, where: Mapping[str, Sequence[str]] | Sequence[str] | None) -> np.ndarray:
    """Boolean mask of the rows of ``obs`` selected by ``where`` (``{column: [values]}`` or
    ``KEY=VALUE`` strings, see :func:`parse_where`); values are compared as strings.

    Raises ``KeyError`` for a missing column (naming the columns) and ``ValueError`` when a value
    matches no row or the keys together select nothing (naming the values present).
    """
    if where is not None and not isinstance(where, Mapping):
        where = parse_where(where)
    mask = np.ones(obs.shape[0], dtype=bool)
    if not where:
        return mask
    for key, values in where.items():
        if key not in obs.columns:
            raise KeyError(
                f"--where {key}=...: obs has no column {key!r}; columns: {_values_preview(list(obs.columns))}."
            )
        col = obs[key].astype(str).to_numpy()
        present = sorted(pd.unique(col).tolist())
        missing = [v for v in values if v not in present]
        if missing:
            raise ValueError(
                f"--where {key}={missing[0]}: no cell has obs[{key!r}] == {missing[0]!r}; values present: "
                f"{_values_preview(present)}."
            )
        mask &= np.isin(col, list(values))
    if not mask.any():
        shown = " and ".join(f"{k}={'|'.join(v)}" for k, v in where.items())
        raise ValueError(f"--where {shown}: every value occurs, but no cell matches all of them together.")
    return mask


def select_where(adata, where: Mapping[str, Sequence[str]] | Sequence[str] | None):
    """The cells of ``adata`` selected by ``where`` (see :func:`where_mask`), as a new AnnData with
    unused categories of categorical ``obs`` columns removed; ``adata`` itself when ``where`` is
    empty. A backed AnnData gives a view instead (its ``X`` stays on disk)."""
    if not where:
        return adata
    if adata.isbacked:
        return _subset_view(adata, where_mask(adata.obs, where), slice(None))
    return subset_copy(adata, where_mask(adata.obs, where))


def _subset_view(adata, obs, var):
    """``adata[obs, var]`` with anndata's category pruning switched off (see :func:`subset_copy`)."""
    import anndata as ad

    settings = ad.settings
    if hasattr(settings, "override") and hasattr(settings, "remove_unused_categories"):
        with settings.override(remove_unused_categories=False):
            return adata[obs, var]
    return adata[obs, var]  # pragma: no cover - older anndata


def subset_copy(adata, obs=slice(None), var=slice(None)):
    """A copy of ``adata[obs, var]`` with unused categories of categorical ``obs``/``var`` columns
    removed.

    The categories are pruned here, not by anndata's view machinery (its
    ``remove_unused_categories`` setting is switched off for the subset): anndata 0.12-0.13 does that
    under a pandas option that pandas 3 deprecates, which warns on every subset.
    """
    out = _subset_view(adata, obs, var).copy()
    for df in (out.obs, out.var):
        for col in df.columns:
            if isinstance(df[col].dtype, pd.CategoricalDtype):
                df[col] = df[col].cat.remove_unused_categories()
    return out
