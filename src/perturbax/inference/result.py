"""``FitResult``: what a fit returns, and its versioned on-disk form.

A saved fit is a folder::

    meta.json     format version, package version, model name, config, registry, gene names,
                  training design, fit settings and the parameter layout
    params.npz    fitted parameters (one array per leaf of the parameter pytree)
    basal.npz     basal states of the training control cells (prediction sources)
    history.npz   loss curves
"""

from __future__ import annotations

import json
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
from perturbax.models.batch import Batch

__all__ = ["FitResult", "FORMAT_VERSION"]

FORMAT = "perturbax.fit"
FORMAT_VERSION = 1


def _flatten(params: dict[str, Any]) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}


def _uses_time(config) -> bool:
    from perturbax.inference.guides import uses_time

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
        ``{"z": (n, d), "library": (n,), "c": (n, C)}`` basal states of training control cells
        (for models of time: encoder means of ``z(0)`` given each control cell and its time).
    history
        ``{"loss": per step, "val_step", "val_loss"}``.
    info
        Settings and run facts (seed, steps run, stop reason, timings; for models of time also
        ``"times"``, the distinct training times, ``"time_key"`` and ``"contexts"``, the
        (condition, time) context check of :func:`perturbax.theory.count_contexts`).
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
        ctrl = np.flatnonzero(data.env == data.control_index)
        C, _ = data.covariate_design()
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
            basal={"z": z, "library": lib[ctrl], "c": C[ctrl]},
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
    def save(self, path: str | Path) -> Path:
        """Write the fit to the folder ``path`` (created if needed; files inside are replaced)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if not hasattr(self.config, "to_dict"):
            raise TypeError(
                f"Cannot save a config of type {type(self.config).__name__}: it needs to_dict()/from_dict() "
                f"(e.g. a dataclass like perturbax.models.AdditiveShiftConfig)."
            )
        flat = _flatten(self.params)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "perturbax_version": self.version,
            "model_name": self.model_name,
            "config": self.config.to_dict(),
            "config_class": f"{type(self.config).__module__}.{type(self.config).__qualname__}",
            "registry": {"names": list(self.registry.names), "control": self.registry.control, "sep": self.registry.sep},
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
        np.savez(path / "params.npz", **flat)
        np.savez(path / "basal.npz", **self.basal)
        np.savez(path / "history.npz", **self.history)
        (path / "meta.json").write_text(json.dumps(meta, indent=1, default=_json_default))
        return path

    @classmethod
    def load(cls, path: str | Path, *, model: Callable | None = None, config: Any = None) -> FitResult:
        """Read a fit written by :meth:`save`.

        A built-in model is rebuilt from its name; a custom model function (and, if its config has
        no ``from_dict``, its config) must be passed. Fails with a clear message if the folder is not
        a perturbax fit, was written by an incompatible version, or is corrupted.
        """
        from perturbax.inference.fitting import BUILTIN_MODELS
        from perturbax.inference.guides import make_guide

        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} is not a saved perturbax fit (no meta.json). Save one with fit.save(dir).")
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{meta_file} is corrupted (not valid JSON: {err}). Re-save the fit.") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_file} is malformed (expected a JSON object). Re-save the fit.")
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} holds format {meta.get('format')!r}, not a perturbax fit ({FORMAT!r}).")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} was written in fit format version {meta.get('format_version')} by perturbax "
                f"{meta.get('perturbax_version')}; this perturbax ({__version__}) reads version {FORMAT_VERSION}. "
                f"Load it with perturbax=={meta.get('perturbax_version')} or refit."
            )
        required = ("model_name", "config", "registry", "gene_names", "perturbation_key", "train_conditions",
                    "train_design", "n_train", "objective", "global_guide")
        missing = [k for k in required if k not in meta]
        if missing:
            raise ValueError(f"{meta_file} is malformed: missing {missing}. Re-save the fit.")
        name = meta["model_name"]
        if model is None:
            if name not in BUILTIN_MODELS:
                raise ValueError(f"{path} holds the custom model {name!r}; pass model= (and config= if needed).")
            model = BUILTIN_MODELS[name][0]
        if config is None:
            cfg_cls = BUILTIN_MODELS[name][1] if name in BUILTIN_MODELS else None
            if cfg_cls is None:
                raise ValueError(f"{path} holds the custom model {name!r}; pass config= as well.")
            config = cfg_cls.from_dict(meta["config"])
        try:
            with np.load(path / "params.npz") as f:
                flat = {k: f[k] for k in f.files}
            with np.load(path / "basal.npz") as f:
                basal = {k: f[k] for k in f.files}
            with np.load(path / "history.npz") as f:
                history = {k: f[k] for k in f.files}
        except FileNotFoundError as err:
            raise ValueError(f"{path} is incomplete: {err.filename} is missing. Re-save the fit.") from None
        except Exception as err:  # zipfile/pickle errors of a damaged file
            raise ValueError(f"{path} is corrupted ({type(err).__name__}: {err}). Re-save the fit.") from None

        registry = PerturbationRegistry(tuple(meta["registry"]["names"]), meta["registry"]["control"], meta["registry"]["sep"])
        n_train = int(meta["n_train"])
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
    C, _ = data.covariate_design()
    lib = data.library_size
    # (the plate size only scales log densities, unused here; it must hold a whole chunk)
    kwargs = {"config": config, "n_cells": max(int(n_train), min(int(chunk), int(cells.size)))}
    timed = _uses_time(config)
    if timed:
        from perturbax.inference.fitting import training_times

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
            c=jnp.asarray(C[idx]) if C.shape[1] else None,
            library=jnp.asarray(lib[idx]),
            t=jnp.asarray(data.times[idx], dtype=jnp.float32) if timed else None,
        )
        out.append(np.asarray(enc(batch)))
    return np.concatenate(out) if out else np.zeros((0, config.latent_dim), np.float32)
