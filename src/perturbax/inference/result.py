"""``FitResult``: what a fit returns, and its versioned on-disk form.

A saved fit is a folder::

    meta.json     format version, package version, model name, config, registry, gene names,
                  training design, fit settings, the parameter layout and the size and SHA-256
                  of each .npz (written last; load refuses a folder whose files differ)
    params.npz    fitted parameters (one array per leaf of the parameter pytree)
    basal.npz     basal states of the training control cells of every context (prediction sources)
    history.npz   loss curves
    nested.npz    (fits with the nested estimator only) its arrays, see
                  :mod:`perturbax.inference.selection`; what was selected is in ``info["selection"]``

:meth:`FitResult.save` writes the folder beside its destination and renames it into place, so an
interrupted save leaves the destination as it was.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from perturbax import __version__
from perturbax.data.core import PerturbationData
from perturbax.data.labels import PerturbationRegistry
from perturbax.inference.nested import NESTED_FILE, check_nested_arrays
from perturbax.models.batch import Batch

__all__ = ["FitResult", "FORMAT_VERSION"]

FORMAT = "perturbax.fit"
FORMAT_VERSION = 1


def _flatten(params: dict[str, Any]) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}


def _uses_time(config) -> bool:
    from perturbax.models.registry import uses_time

    return uses_time(config)


def _dummy_batch(config, n: int = 2) -> Batch:
    C = getattr(config, "n_covariates", 0)
    return Batch(
        x=jnp.zeros((n, config.n_genes)),
        l=jnp.zeros((n, config.n_perturbations)),
        c=jnp.zeros((n, C)) if C else None,
        library=jnp.ones((n,)),
        t=jnp.zeros((n,)) if _uses_time(config) else None,
    )


@dataclass(frozen=True, repr=False)
class FitResult:
    """A fitted model: parameters, the model and guide functions, and what prediction needs.

    Attributes
    ----------
    model_name, model, guide, config
        The model function (``model(batch, *, config, n_cells)``), its guide and configuration.
    params
        Fitted (constrained) parameters, ``{site name: array or pytree}``.
    global_names
        Global latent sites with a posterior (e.g. ``("W",)``).
    registry, gene_names
        Elementary perturbation names (design columns) and genes of the training data.
    train_conditions, train_design
        Training condition labels and their label vectors ``(E, K)``.
    basal
        ``{"z": (n, d), "library": (n,), "c": (n, C), "l": (n, K)}`` basal states of the training
        control cells of every context and their label vectors (zero but for the context columns;
        a prediction in a context starts from that context's control cells)
        (for models of time: encoder means of ``z(0)`` given each control cell and its time).
    history
        ``{"loss": per step, "val_step", "val_loss"}``.
    info
        Settings and run facts (seed, steps run, stop reason, timings; for models of time also
        ``"times"``, the distinct training times, ``"time_key"`` and ``"contexts"``, the
        (condition, time) context check of :func:`perturbax.theory.count_contexts`); with the
        nested estimator ``"selection"``: what the training-condition CV chose and scored.
    nested
        Arrays of the nested estimator (:mod:`perturbax.inference.selection`; empty without it).
        :func:`~perturbax.inference.predict` applies it when present.
    """

    model_name: str
    model: Callable
    guide: Callable
    config: Any
    params: dict[str, Any]
    global_names: tuple[str, ...]
    registry: PerturbationRegistry
    gene_names: tuple[str, ...]
    perturbation_key: str
    train_conditions: tuple[str, ...]
    train_design: np.ndarray
    n_train: int
    objective: str
    global_guide: str
    basal: dict[str, np.ndarray]
    history: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)
    nested: dict[str, np.ndarray] = field(default_factory=dict)
    version: str = __version__

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        *,
        model_name,
        model,
        guide,
        config,
        params,
        global_names,
        data: PerturbationData,
        train_cells: np.ndarray,
        objective,
        global_guide,
        history,
        info,
    ) -> FitResult:
        train = data.subset(train_cells)
        P = data.registry.n_perturbations
        L = np.asarray(data.L)
        ctrl = np.flatnonzero(~np.any(L[:, :P] != 0, axis=1))  # the control cells of every context
        lib = data.library_size
        z = _encode(model, guide, params, config, data, ctrl, len(train_cells))
        return cls(
            model_name=model_name,
            model=model,
            guide=guide,
            config=config,
            params=params,
            global_names=tuple(global_names),
            registry=data.registry,
            gene_names=data.gene_names,
            perturbation_key=data.perturbation_key,
            train_conditions=train.conditions,
            train_design=np.asarray(train.design),
            n_train=int(len(train_cells)),
            objective=objective,
            global_guide=global_guide,
            basal={"z": z, "library": lib[ctrl], "c": np.zeros((ctrl.size, 0), np.float32),
                   "l": L[ctrl].astype(np.float32)},
            history=history,
            info=info,
        )

    # ------------------------------------------------------------ properties
    @property
    def model_kwargs(self) -> dict[str, Any]:
        return {"config": self.config, "n_cells": self.n_train}

    @property
    def uses_time(self) -> bool:
        """Whether the model describes cells over time (predictions then need ``times=``)."""
        return _uses_time(self.config)

    @property
    def train_times(self) -> np.ndarray | None:
        """Distinct times of the training cells (models of time), else ``None``."""
        times = self.info.get("times")
        return None if times is None else np.asarray(times, dtype=np.float64)

    @property
    def seen_elementary(self) -> tuple[str, ...]:
        """Elementary perturbations that occur in at least one training condition."""
        used = np.any(self.train_design != 0, axis=0)
        return tuple(n for n, u in zip(self.registry.names, used) if u)

    def encode(self, data: PerturbationData) -> np.ndarray:
        """Basal states ``z_base`` (encoder means) of all cells of ``data``, shape ``(n, d)``."""
        self._check_genes(data.gene_names)
        data = data.with_registry(self.registry)
        return _encode(self.model, self.guide, self.params, self.config, data, np.arange(data.n_cells), self.n_train)

    def _check_genes(self, genes) -> None:
        genes = tuple(genes)
        if genes != self.gene_names:
            missing = [g for g in self.gene_names if g not in set(genes)]
            extra = [g for g in genes if g not in set(self.gene_names)]
            raise ValueError(
                f"Genes do not match the fitted model ({len(self.gene_names)} genes): {len(missing)} missing "
                f"(e.g. {missing[:5]}), {len(extra)} extra (e.g. {extra[:5]})"
                + ("" if missing or extra else ", same genes in another order")
                + ". Subset and order the AnnData to the model's genes: `adata[:, fit.gene_names]`."
            )

    def __repr__(self) -> str:
        loss = self.history["loss"]
        last = f"{loss[-1]:.4g}" if loss.size else "n/a"
        return (
            f"FitResult({self.model_name}, objective={self.objective}, steps={self.info.get('steps_run')}, "
            f"stop={self.info.get('stop_reason')}, final loss={last}, K={self.registry.K}, "
            f"genes={len(self.gene_names)}, globals={list(self.global_names)})"
        )

    # ------------------------------------------------------------------ save
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the fit to the folder ``path`` atomically.

        The files are written to a new folder beside ``path`` (``meta.json`` last, with the size
        and SHA-256 of every ``.npz``), which is then renamed to ``path``: an interrupted save
        leaves ``path`` as it was. An existing non-empty ``path`` is replaced only with
        ``overwrite=True`` and only if it holds nothing but a saved fit's files (the old folder is
        moved aside, the new one moved in, the old one deleted).
        """
        import os
        import shutil
        import tempfile
        import uuid

        path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
        if not hasattr(self.config, "to_dict"):
            raise TypeError(
                f"Cannot save a config of type {type(self.config).__name__}: it needs to_dict()/from_dict() "
                f"(e.g. a dataclass like perturbax.models.AdditiveShiftConfig)."
            )
        _check_replaceable(path, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = _flatten(self.params)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "perturbax_version": self.version,
            "model_name": self.model_name,
            "config": self.config.to_dict(),
            "config_class": f"{type(self.config).__module__}.{type(self.config).__qualname__}",
            "registry": {"names": list(self.registry.names), "control": self.registry.control, "sep": self.registry.sep,
                         "contexts": [[k, list(c)] for k, c in self.registry.contexts]},
            "gene_names": list(self.gene_names),
            "perturbation_key": self.perturbation_key,
            "train_conditions": list(self.train_conditions),
            "train_design": np.asarray(self.train_design).tolist(),
            "n_train": self.n_train,
            "objective": self.objective,
            "global_guide": self.global_guide,
            "global_names": list(self.global_names),
            "param_layout": {k: list(v.shape) for k, v in flat.items()},
            "info": self.info,
        }
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
        try:
            files = {}
            saved = [("params.npz", flat), ("basal.npz", self.basal), ("history.npz", self.history)]
            if self.nested:
                saved.append((NESTED_FILE, self.nested))
            for name, arrays in saved:
                np.savez(tmp / name, **arrays)
                files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
            meta["files"] = files
            # meta.json last: a folder without it, or whose npz files differ from what it records, never loads
            _write_synced(tmp / META_FILE, json.dumps(meta, indent=1, default=_json_default))
            if path.exists():
                old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(path, old)
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old, path)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, *, model: Callable | None = None, config: Any = None) -> FitResult:
        """Read a fit written by :meth:`save`.

        A built-in model is rebuilt from its name; a custom model function (and, if its config has
        no ``from_dict``, its config) must be passed. The folder is untrusted input: ``meta.json``
        is size- and depth-limited and type-checked, every ``.npz`` must have the size and SHA-256
        that ``meta.json`` records, and array shapes are read from the ``.npz`` headers and checked
        against the recorded layout and config before any array is read. Fails with a one-line
        ``ValueError`` (``FileNotFoundError`` without ``meta.json``) if the folder is not a
        perturbax fit, was written by an incompatible version, or is incomplete or corrupted.
        """
        from perturbax.models.registry import BUILTIN_MODELS
        from perturbax.inference.guides import make_guide

        path = Path(path)
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} is not a saved perturbax fit (no meta.json). Save one with fit.save(dir).")
        meta = _read_meta(meta_file)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} holds format {_short(meta.get('format'))}, not a perturbax fit ({FORMAT!r}).")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} was written in fit format version {_short(meta.get('format_version'))} by perturbax "
                f"{_short(meta.get('perturbax_version'))}; this perturbax ({__version__}) reads version "
                f"{FORMAT_VERSION}. Load it with the perturbax version that wrote it or refit."
            )
        _check_meta(meta, meta_file)
        headers = {name: _verified_npz(path, name, meta["files"]) for name in SAVED_FILES}
        _check_arrays(meta, headers, path)
        nested_shapes = _check_nested(meta, path, meta_file)
        name = meta["model_name"]
        if model is None:
            if name not in BUILTIN_MODELS:
                raise ValueError(f"{path} holds the custom model {name!r}; pass model= (and config= if needed).")
            model = BUILTIN_MODELS[name][0]
        if config is None:
            cfg_cls = BUILTIN_MODELS[name][1] if name in BUILTIN_MODELS else None
            if cfg_cls is None:
                raise ValueError(f"{path} holds the custom model {name!r}; pass config= as well.")
            try:
                config = cfg_cls.from_dict(meta["config"])
            except (TypeError, ValueError, KeyError) as err:
                raise ValueError(f"{meta_file} holds an invalid config ({_short(err, 200)}). Re-save the fit.") from None
        _check_config_sizes(config, meta, headers, path)
        try:
            flat, basal, history = ({k: v for k, v in _read_npz(path / n).items()} for n in SAVED_FILES)
            nested = _read_npz(path / NESTED_FILE) if nested_shapes is not None else {}
        except Exception as err:  # zipfile/format errors of a damaged file
            raise ValueError(f"{path} is corrupted ({type(err).__name__}: {_short(err, 200)}). Re-save the fit.") from None

        try:
            registry = PerturbationRegistry(tuple(meta["registry"]["names"]), meta["registry"]["control"],
                                            meta["registry"]["sep"], tuple(meta["registry"].get("contexts", ())))
        except ValueError as err:
            raise ValueError(f"{meta_file} holds an invalid registry ({_short(err, 200)}). Re-save the fit.") from None
        if "l" not in basal:  # (fits saved before contexts: control cells of the one context)
            basal = {**basal, "l": np.zeros((basal["z"].shape[0], registry.K), np.float32)}
        n_train = meta["n_train"]
        dummy = _dummy_batch(config)
        kwargs = {"config": config, "n_cells": n_train}
        guide, global_names = make_guide(
            model, dummy, kwargs, global_guide=meta["global_guide"],
            amortized="delta" if meta["objective"] == "energy" else "normal",
        )
        template = _param_template(model, guide, dummy, kwargs)
        tmpl_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
        keys = [jax.tree_util.keystr(p) for p, _ in tmpl_leaves]
        if set(keys) != set(flat) or any(tuple(flat[k].shape) != tuple(np.shape(v)) for k, (_, v) in zip(keys, tmpl_leaves)):
            diff = sorted(set(keys) ^ set(flat))[:5]
            raise ValueError(
                f"The parameters in {path} do not match the layout of model {name!r} with the saved config "
                f"(written by perturbax {meta.get('perturbax_version')}, this is {__version__}; differing "
                f"entries e.g. {diff}). Refit with this version or load with the version that wrote it."
            )
        params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(flat[k]) for k in keys])
        if meta.get("perturbax_version") != __version__:
            warnings.warn(
                f"{path} was written by perturbax {meta.get('perturbax_version')}; this is {__version__}. "
                f"The parameter layout matches, so it was loaded.",
                stacklevel=2,
            )
        return cls(
            model_name=name,
            model=model,
            guide=guide,
            config=config,
            params=params,
            global_names=tuple(global_names),
            registry=registry,
            gene_names=tuple(meta["gene_names"]),
            perturbation_key=meta["perturbation_key"],
            train_conditions=tuple(meta["train_conditions"]),
            train_design=np.asarray(meta["train_design"], dtype=np.float64).reshape(-1, registry.K),
            n_train=n_train,
            objective=meta["objective"],
            global_guide=meta["global_guide"],
            basal=basal,
            history=history,
            info=meta.get("info", {}),
            nested=nested,
            version=meta.get("perturbax_version", "unknown"),
        )


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _param_template(model, guide, batch, kwargs) -> dict[str, Any]:
    """Shapes of the parameter pytree of a model + guide, found by abstract evaluation (nothing is
    computed or compiled)."""
    sim = batch._replace(x=None)

    def params(b, s):
        out = {}
        for fn, arg in ((guide, b), (model, s)):
            with handlers.block():
                tr = handlers.trace(handlers.seed(fn, 0)).get_trace(arg, **kwargs)
            out.update({n: site["value"] for n, site in tr.items() if site["type"] == "param"})
        return out

    return jax.eval_shape(params, batch, sim)


def _encode(model, guide, params, config, data: PerturbationData, cells: np.ndarray, n_train: int, chunk: int = 4096):
    """Encoder means of the given cells (the basal states used as prediction sources)."""
    lib = data.library_size
    # (the plate size only scales log densities, unused here; it must hold a whole chunk)
    kwargs = {"config": config, "n_cells": max(int(n_train), min(int(chunk), int(cells.size)))}
    timed = _uses_time(config)
    if timed:
        from perturbax.inference.times import training_times

        if data.times is None:
            training_times(data)  # the error that says how to pass times
        from perturbax.models.dynamics import check_times

        check_times(data.times)

    @jax.jit
    def enc(batch):
        tr = handlers.trace(handlers.seed(handlers.substitute(guide, data=params), 0)).get_trace(batch, **kwargs)
        return tr["z_base"]["fn"].mean

    out = []
    for start in range(0, cells.size, chunk):
        idx = cells[start : start + chunk]
        batch = Batch(
            x=jnp.asarray(data.dense(idx)),
            l=jnp.asarray(data.L[idx], dtype=jnp.float32),
            c=None,  # (contexts are label columns)
            library=jnp.asarray(lib[idx]),
            t=jnp.asarray(data.times[idx], dtype=jnp.float32) if timed else None,
        )
        out.append(np.asarray(enc(batch)))
    return np.concatenate(out) if out else np.zeros((0, config.latent_dim), np.float32)


# ------------------------------------------------------------------ safe save / load helpers
META_FILE = "meta.json"
SAVED_FILES = ("params.npz", "basal.npz", "history.npz")
#: Every file a saved fit folder may hold.
FIT_FILES = (META_FILE, *SAVED_FILES, NESTED_FILE)
MAX_META_BYTES = 256 * 2**20  # gene names, design and settings; far above any real fit
MAX_META_DEPTH = 32
_NUMERIC_KINDS = "biuf"


def _short(value, n: int = 60) -> str:
    text = repr(value) if not isinstance(value, BaseException) else str(value.args[0] if value.args else value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _sha256(file: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_synced(file: Path, text: str) -> None:
    import os

    with open(file, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _check_replaceable(path: Path, overwrite: bool) -> None:
    """Refuse to replace anything but an empty folder or, with ``overwrite``, a saved fit."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder; save the fit to a new folder.")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    foreign = [e for e in entries if e not in FIT_FILES]
    if foreign:
        raise ValueError(
            f"{path} holds files that are not a saved fit (e.g. {foreign[0]!r}); save to a new or empty folder."
        )
    if not overwrite:
        raise FileExistsError(f"{path} already holds a saved fit; pass overwrite=True to replace it.")


def _read_meta(meta_file: Path) -> dict:
    size = meta_file.stat().st_size
    if size > MAX_META_BYTES:
        raise ValueError(f"{meta_file} is {size} bytes, more than a fit's meta.json can be ({MAX_META_BYTES}). Re-save the fit.")
    try:
        meta = json.loads(meta_file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_file} is corrupted (not valid JSON: {err}). Re-save the fit.") from None
    except RecursionError:
        raise ValueError(f"{meta_file} is malformed (nested too deeply). Re-save the fit.") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file} is malformed (expected a JSON object). Re-save the fit.")
    stack = [(meta, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > MAX_META_DEPTH:
            raise ValueError(f"{meta_file} is malformed (nested deeper than {MAX_META_DEPTH} levels). Re-save the fit.")
        if isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, list):
            stack.extend((v, depth + 1) for v in obj if isinstance(v, (dict, list)))
    return meta


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _check_meta(meta: dict, meta_file: Path) -> None:
    """Types and ranges of the entries of ``meta.json`` (one-line ``ValueError`` naming the entry)."""
    required = ("model_name", "config", "registry", "gene_names", "perturbation_key", "train_conditions",
                "train_design", "n_train", "objective", "global_guide", "param_layout")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f"{meta_file} is malformed: missing {missing}. Re-save the fit.")
    if "files" not in meta:
        raise ValueError(
            f"{meta_file} records no sizes and checksums of the .npz files (an older or incomplete save), so the "
            f"folder cannot be verified. Re-save the fit with this perturbax or refit."
        )
    reg = meta["registry"]
    checks = [
        ("model_name", isinstance(meta["model_name"], str), "a string"),
        ("config", isinstance(meta["config"], dict), "an object"),
        ("registry", isinstance(reg, dict) and _is_str_list(reg.get("names")) and len(reg.get("names")) > 0
         and isinstance(reg.get("control"), str) and isinstance(reg.get("sep"), str)
         and (isinstance(reg.get("contexts", []), list) and all(
             isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and _is_str_list(c[1])
             for c in reg.get("contexts", []))),
         "an object {names: [strings], control: string, sep: string, contexts: [[key, [categories]]]}"),
        ("gene_names", _is_str_list(meta["gene_names"]) and len(meta["gene_names"]) > 0, "a non-empty list of strings"),
        ("perturbation_key", isinstance(meta["perturbation_key"], str), "a string"),
        ("train_conditions", _is_str_list(meta["train_conditions"]), "a list of strings"),
        ("n_train", _is_int(meta["n_train"]) and 1 <= meta["n_train"] < 2**31, "a positive integer below 2**31"),
        ("objective", meta["objective"] in ("energy", "elbo"), "'energy' or 'elbo'"),
        ("global_guide", isinstance(meta["global_guide"], str), "a string"),
        ("param_layout", isinstance(meta["param_layout"], dict) and all(
            isinstance(v, list) and all(_is_int(n) and n >= 0 for n in v) for v in meta["param_layout"].values()),
         "an object {name: [non-negative integers]}"),
        ("info", isinstance(meta.get("info", {}), dict), "an object"),
        ("files", isinstance(meta["files"], dict) and all(
            isinstance(meta["files"].get(n), dict) and _is_int(meta["files"][n].get("bytes"))
            and isinstance(meta["files"][n].get("sha256"), str) for n in SAVED_FILES),
         f"an object {{file: {{bytes, sha256}}}} for {list(SAVED_FILES)}"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ValueError(f"{meta_file} is malformed: {key} must be {expected}, got {_short(meta[key])}. Re-save the fit.")
    design, K = meta["train_design"], len(reg["names"])
    if not (isinstance(design, list) and len(design) == len(meta["train_conditions"]) and all(
            isinstance(row, list) and len(row) == K
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in row)
            for row in design)):
        raise ValueError(
            f"{meta_file} is malformed: train_design must be a {len(meta['train_conditions'])} x {K} list of finite "
            f"numbers (training conditions x elementary perturbations). Re-save the fit."
        )


def _verified_npz(path: Path, name: str, files: dict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{member: (shape, dtype)}`` of ``path/name`` after checking its size and SHA-256 against
    ``meta.json``; shapes come from the member headers (no array data is read)."""
    import zipfile

    file = path / name
    if not file.is_file():
        raise ValueError(f"{path} is incomplete: {name} is missing. Re-save the fit.")
    rec = files[name]
    size = file.stat().st_size
    if size != rec["bytes"] or _sha256(file) != rec["sha256"]:
        raise ValueError(
            f"{path} is corrupted or mixes two saves (an interrupted save?): {name} ({size} bytes) is not the file "
            f"meta.json records ({rec['bytes']} bytes, sha256 {_short(rec['sha256'], 20)}). Re-save the fit."
        )
    out = {}
    try:
        with zipfile.ZipFile(file) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy") or info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"member {_short(info.filename)} is not an uncompressed .npy array")
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                    else:
                        raise ValueError(f"member {_short(info.filename)} has .npy version {version}")
                    header = fh.tell()
                if dtype.hasobject or dtype.kind not in _NUMERIC_KINDS:
                    raise ValueError(f"member {_short(info.filename)} has dtype {dtype}, not numeric")
                if header + math.prod(shape) * dtype.itemsize != info.file_size:
                    raise ValueError(
                        f"member {_short(info.filename)} declares shape {shape} of {dtype}, which does not fit its "
                        f"{info.file_size} bytes"
                    )
                out[info.filename[: -len(".npy")]] = (tuple(int(n) for n in shape), dtype)
    except ValueError as err:
        raise ValueError(f"{path} is corrupted: {name}: {err}. Re-save the fit.") from None
    except Exception as err:  # zipfile errors of a damaged file
        raise ValueError(f"{path} is corrupted: {name} ({type(err).__name__}: {_short(err, 200)}). Re-save the fit.") from None
    return out


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    with np.load(file, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _check_arrays(meta: dict, headers: dict, path: Path) -> None:
    """The ``.npz`` member shapes agree with the recorded layout and with each other."""
    params = headers["params.npz"]
    layout = {k: tuple(v) for k, v in meta["param_layout"].items()}
    if {k: s for k, (s, _) in params.items()} != layout:
        diff = sorted(set(layout) ^ set(params))[:3] or [k for k in layout if layout[k] != params[k][0]][:3]
        raise ValueError(
            f"{path} is corrupted: params.npz does not hold the parameter layout recorded in meta.json (e.g. {diff}). "
            f"Re-save the fit."
        )
    basal, history = headers["basal.npz"], headers["history.npz"]
    shapes = {k: s for k, (s, _) in basal.items()}
    K = len(meta["registry"]["names"])
    ok = set(shapes) - {"l"} == {"z", "library", "c"} and len(shapes["z"]) == 2 and len(shapes["library"]) == 1 \
        and len(shapes["c"]) == 2 and shapes["z"][0] == shapes["library"][0] == shapes["c"][0] \
        and shapes.get("l", (shapes["z"][0], K)) == (shapes["z"][0], K)
    if not ok:
        raise ValueError(
            f"{path} is corrupted: basal.npz must hold z (n, d), library (n,), c (n, C) and l (n, K={K}); got "
            f"{shapes}. Re-save the fit."
        )
    if not all(len(s) == 1 for s, _ in history.values()) or "loss" not in history:
        raise ValueError(f"{path} is corrupted: history.npz must hold 1-D loss curves. Re-save the fit.")


def _check_nested(meta: dict, path: Path, meta_file: Path) -> dict | None:
    """Shapes of ``nested.npz`` when ``meta.json`` records it (checked against the genes,
    perturbations and ``info["selection"]``), else ``None``."""
    rec = meta["files"].get(NESTED_FILE)
    if rec is None:
        return None
    if not (isinstance(rec, dict) and _is_int(rec.get("bytes")) and isinstance(rec.get("sha256"), str)):
        raise ValueError(f"{meta_file} is malformed: files.{NESTED_FILE} must be {{bytes, sha256}}. Re-save the fit.")

    headers = _verified_npz(path, NESTED_FILE, meta["files"])
    why = check_nested_arrays({k: s for k, (s, _) in headers.items()}, meta.get("info", {}).get("selection"),
                              len(meta["gene_names"]), len(meta["registry"]["names"]))
    if why:
        raise ValueError(f"{path} is corrupted: {why}. Re-save the fit.")
    return headers


def _check_config_sizes(config, meta: dict, headers: dict, path: Path) -> None:
    """Sizes of the config against what the folder holds, before anything is allocated from them:
    genes, perturbations, latent and covariate dimensions must match; any other size (hidden
    widths, noise dimension) cannot exceed the number of stored parameter values."""
    import dataclasses

    z, c = headers["basal.npz"]["z"][0], headers["basal.npz"]["c"][0]
    expected = {
        "n_genes": len(meta["gene_names"]),
        "n_perturbations": len(meta["registry"]["names"]),
        "latent_dim": z[1],
        "n_covariates": c[1],
    }
    for key, want in expected.items():
        have = getattr(config, key, want)
        if have != want:
            raise ValueError(
                f"The parameters in {path} do not match the layout of its config: {key} is {_short(have)} but the "
                f"saved fit has {want}. Re-save the fit."
            )
    if not dataclasses.is_dataclass(config):
        return
    n_values = sum(math.prod(s) for s, _ in headers["params.npz"].values())
    for f in dataclasses.fields(config):
        if f.name in expected or f.name in ("seed", "max_steps"):
            continue
        value = getattr(config, f.name)
        sizes = [value] if _is_int(value) else list(value) if isinstance(value, (tuple, list)) else []
        if any(_is_int(v) and v > max(n_values, 1) for v in sizes):
            raise ValueError(
                f"The parameters in {path} do not match the layout of its config: {f.name}={_short(value)} needs "
                f"more parameters than the {n_values} stored. Re-save the fit."
            )
