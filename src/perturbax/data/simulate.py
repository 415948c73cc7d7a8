"""Simulators with ground truth for both model families (DESIGN 2.1, 2.2 and 6, ``pdae-sim``).

Both simulators return ``(adata, truth)``:

- ``adata.obs["perturbation"]`` holds canonical labels exactly as
  :meth:`~perturbax.data.PerturbationRegistry.decode` writes them (``"control"``, ``"P0+P3"``,
  ``"P0:0.5+P1:0.5"``, ``"P1+P2:-1"``), so ``from_anndata(adata, "perturbation", "control")``
  reads it directly; ``obs["split"]`` is ``"train"``/``"test"`` under the built-in protocol and
  ``obs["group"]`` names the protocol group of each condition;
- ``var_names`` are ``"g0" .. "g{G-1}"``; elementary perturbations are ``"P0" .. "P{K-1}"``
  (zero-padded when there are more than 10, so that sorting the names is numeric order);
- with ``counts=True``, ``layers["counts"]`` holds raw integer counts, ``obs["library_size"]`` the
  true (lognormal) size factor of each cell and ``X = log1p(counts / total * 1e4)`` with ``total``
  the observed count total of the cell; otherwise ``X`` is the continuous decoder output;
- ``obsm["z_true"]`` holds the true latent state of every cell and ``obsm["z_base_true"]`` its
  basal state (``z_base`` for the additive shift model, ``z(0)`` for the dynamics).

The ``truth`` objects can draw fresh cells from the *true* population of any label (including
labels never simulated), which is what calibration checks compare predictions against.

Everything is numpy and deterministic given ``seed``: the root generator
``numpy.random.default_rng(seed)`` is split into independent streams for the parameters
(shifts / dynamics, decoder), the protocol (which doubles are held out, dose choices) and the cells,
so changing ``n_cells`` changes neither the parameters nor the protocol.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.linalg
from scipy.optimize import linprog

from perturbax.data.labels import LabelLike, PerturbationRegistry

__all__ = [
    "SimulationDecoder",
    "AdditiveShiftTruth",
    "LatentDynamicsTruth",
    "simulate_additive_shift",
    "simulate_latent_dynamics",
    "sample_base",
]

BaseKind = Literal["normal", "laplace", "uniform"]
DoublesSpec = Literal["half", "all"] | Sequence[tuple[int | str, int | str]] | None


def _ro(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64, copy=True)
    a.flags.writeable = False
    return a


def _perturbation_names(k_total: int) -> tuple[str, ...]:
    width = len(str(k_total - 1)) if k_total > 10 else 1
    return tuple(f"P{k:0{width}d}" for k in range(k_total))


# --------------------------------------------------------------------------------------------
# Base distributions
# --------------------------------------------------------------------------------------------
def sample_base(kind: BaseKind, n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``(n, dim)`` i.i.d. standardised base values (mean 0, variance 1 per coordinate).

    ``"normal"``: N(0, 1); ``"laplace"``: Laplace with scale 1/sqrt(2) (excess kurtosis 3);
    ``"uniform"``: U(-sqrt(3), sqrt(3)) (excess kurtosis -1.2).
    """
    if kind == "normal":
        return rng.standard_normal((n, dim))
    if kind == "laplace":
        return rng.laplace(0.0, 1.0 / math.sqrt(2.0), size=(n, dim))
    if kind == "uniform":
        r = math.sqrt(3.0)
        return rng.uniform(-r, r, size=(n, dim))
    raise ValueError(f"base={kind!r} is not supported; use 'normal', 'laplace' or 'uniform'.")


# --------------------------------------------------------------------------------------------
# Decoder (shared by both simulators)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SimulationDecoder:
    """A random nonlinear decoder ``x = f([z, eta])`` with the noise ``eta`` fed into the network.

    The network is an MLP with ``tanh`` hidden layers and a linear output layer; its input is the
    concatenation of the latent state ``z`` (``latent_dim``) and the noise
    ``eta ~ N(0, noise_scale^2 I_noise_dim)``, so conditional on ``z`` the output noise is
    non-Gaussian and its covariance depends on ``z``.

    Observation model:

    - continuous (``counts=False``): ``x = f([z, eta]) + obs_noise * eps``, ``eps ~ N(0, I)``;
    - counts (``counts=True``): the network output are logits; with a library size
      ``s ~ LogNormal`` whose mean is ``mean_library_size`` (log-sd ``library_log_sd``), counts are
      negative binomial with mean ``s * softmax(logits)`` and inverse dispersion ``dispersion``
      (variance ``m + m^2 / dispersion``; ``inf`` gives Poisson). ``X`` is then
      ``log1p(counts / total * 1e4)`` with ``total`` the observed count total of the cell.
    """

    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    latent_dim: int
    noise_dim: int
    noise_scale: float
    obs_noise: float
    counts: bool = False
    mean_library_size: float = 2000.0
    library_log_sd: float = 0.25
    dispersion: float = 20.0

    @property
    def n_genes(self) -> int:
        return int(self.weights[-1].shape[1])

    @staticmethod
    def random(
        rng: np.random.Generator,
        *,
        latent_dim: int,
        n_genes: int,
        hidden: int | Sequence[int] = 64,
        noise_dim: int | None = None,
        noise_scale: float = 0.3,
        obs_noise: float = 0.1,
        counts: bool = False,
        mean_library_size: float = 2000.0,
        library_log_sd: float = 0.25,
        dispersion: float = 20.0,
        gain: float = 1.5,
    ) -> SimulationDecoder:
        """Draw a random decoder.

        ``hidden`` is the width of the two hidden layers (an int) or the list of widths. Hidden
        weights are ``N(0, gain^2 / fan_in)`` (pre-activations of order ``gain`` for standardised
        inputs, so ``tanh`` works in its nonlinear range); the output layer has weights
        ``N(0, 1 / fan_in)`` and per-gene offsets ``N(0, 1)`` (gene baselines).
        """
        noise_dim = latent_dim if noise_dim is None else int(noise_dim)
        widths = [int(hidden)] * 2 if isinstance(hidden, int | np.integer) else [int(h) for h in hidden]
        if any(w < 1 for w in widths):
            raise ValueError(f"decoder hidden widths must be positive, got {widths}.")
        if latent_dim < 1 or n_genes < 1 or noise_dim < 0:
            raise ValueError(
                f"latent_dim and n_genes must be >= 1 and noise_dim >= 0; got latent_dim={latent_dim}, "
                f"n_genes={n_genes}, noise_dim={noise_dim}."
            )
        _check_nonneg("noise_scale", noise_scale)
        _check_nonneg("obs_noise", obs_noise)
        if counts:
            if not mean_library_size > 0:
                raise ValueError(f"mean_library_size must be > 0, got {mean_library_size}.")
            _check_nonneg("library_log_sd", library_log_sd)
            if not dispersion > 0:
                raise ValueError(f"dispersion (NB inverse dispersion) must be > 0 (inf = Poisson), got {dispersion}.")
        dims = [latent_dim + noise_dim, *widths, n_genes]
        weights, biases = [], []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
            last = i == len(dims) - 2
            scale = (1.0 if last else gain) / math.sqrt(fan_in)
            weights.append(_ro(rng.normal(0.0, scale, size=(fan_in, fan_out))))
            biases.append(_ro(rng.normal(0.0, 1.0 if last else 0.3, size=fan_out)))
        return SimulationDecoder(
            weights=tuple(weights),
            biases=tuple(biases),
            latent_dim=int(latent_dim),
            noise_dim=noise_dim,
            noise_scale=float(noise_scale),
            obs_noise=float(obs_noise),
            counts=bool(counts),
            mean_library_size=float(mean_library_size),
            library_log_sd=float(library_log_sd),
            dispersion=float(dispersion),
        )

    def network(self, z: np.ndarray, eta: np.ndarray | None = None) -> np.ndarray:
        """Deterministic network output ``f([z, eta])``, shape ``(n, n_genes)`` (logits if counts).

        ``eta=None`` means ``eta = 0``.
        """
        z = np.atleast_2d(np.asarray(z, dtype=np.float64))
        if z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have {self.latent_dim} columns (latent_dim), got shape {z.shape}.")
        if eta is None:
            eta = np.zeros((z.shape[0], self.noise_dim))
        eta = np.atleast_2d(np.asarray(eta, dtype=np.float64))
        if eta.shape != (z.shape[0], self.noise_dim):
            raise ValueError(f"eta must have shape {(z.shape[0], self.noise_dim)}, got {eta.shape}.")
        h = np.concatenate([z, eta], axis=1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = np.tanh(h)
        return h

    def decode_full(self, z: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray | None]:
        """Decode latent states into cells.

        Returns ``{"X", "counts", "library_size", "eta"}``; ``counts`` and ``library_size`` are
        ``None`` for the continuous observation model.
        """
        z = np.atleast_2d(np.asarray(z, dtype=np.float64))
        n = z.shape[0]
        eta = self.noise_scale * rng.standard_normal((n, self.noise_dim))
        out = self.network(z, eta)
        if not self.counts:
            x = out + self.obs_noise * rng.standard_normal(out.shape)
            return {"X": x, "counts": None, "library_size": None, "eta": eta}
        s2 = self.library_log_sd**2
        lib = np.exp(rng.normal(math.log(self.mean_library_size) - 0.5 * s2, self.library_log_sd, size=n))
        logits = out - out.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        mean = lib[:, None] * p
        if math.isinf(self.dispersion):
            rate = mean
        else:
            rate = rng.gamma(shape=self.dispersion, scale=mean / self.dispersion)
        counts = rng.poisson(rate)
        return {"X": _lognormalise(counts), "counts": counts, "library_size": lib, "eta": eta}

    def decode(self, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Cells ``X`` (log-normalised if counts) for latent states ``z``, shape ``(n, n_genes)``."""
        return self.decode_full(z, rng)["X"]


def _check_nonneg(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}.")


def _lognormalise(counts: np.ndarray) -> np.ndarray:
    total = counts.sum(axis=1, keepdims=True).astype(np.float64)
    return np.log1p(counts / np.maximum(total, 1.0) * 1e4)


# --------------------------------------------------------------------------------------------
# Protocol helpers
# --------------------------------------------------------------------------------------------
def _resolve_train_pairs(
    doubles: DoublesSpec, names: Sequence[str], k: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Training doubles (index pairs ``i < j`` among the first ``k`` perturbations)."""
    all_pairs = list(itertools.combinations(range(k), 2))
    if doubles is None:
        return []
    if isinstance(doubles, str):
        if doubles == "all":
            return all_pairs
        if doubles == "half":
            n_train = len(all_pairs) // 2
            pick = np.sort(rng.permutation(len(all_pairs))[:n_train])
            return [all_pairs[i] for i in pick]
        raise ValueError(f"doubles={doubles!r} is not supported; use 'half', 'all', None or a list of pairs.")
    out: set[tuple[int, int]] = set()
    for pair in doubles:
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"Each training double must be a pair (a, b) of indices or names, got {pair!r}.")
        idx = []
        for item in pair:
            if isinstance(item, str):
                if item not in names[:k]:
                    raise ValueError(
                        f"Double {pair!r} names {item!r}, which is not one of the in-span perturbations "
                        f"{list(names[:k])}."
                    )
                idx.append(names.index(item))
            else:
                i = int(item)
                if not 0 <= i < k:
                    raise ValueError(f"Double {pair!r} has index {i} outside 0..{k - 1}.")
                idx.append(i)
        if idx[0] == idx[1]:
            raise ValueError(f"Double {pair!r} combines a perturbation with itself.")
        out.add((min(idx), max(idx)))
    return sorted(out)


def _in_span(train_design: np.ndarray, v: np.ndarray, tol: float = 1e-9) -> bool:
    """Is ``v`` in the affine hull of the training labels (which contain the control 0)?"""
    if not np.any(train_design):
        return not np.any(np.abs(v) > tol)
    coef, *_ = np.linalg.lstsq(train_design.T, v, rcond=None)
    return bool(np.linalg.norm(train_design.T @ coef - v) <= tol * max(1.0, np.linalg.norm(v)))


def _in_convex_hull(train_design: np.ndarray, v: np.ndarray) -> bool:
    """Is ``v`` a convex combination of the training label vectors (a small LP)?"""
    m = train_design.shape[0]
    a_eq = np.vstack([train_design.T, np.ones((1, m))])
    b_eq = np.concatenate([v, [1.0]])
    res = linprog(np.zeros(m), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    return bool(res.status == 0)


def _dose_group(train_design: np.ndarray, v: np.ndarray) -> str:
    if not _in_span(train_design, v):
        return "out-of-span"
    return "dose-in-hull" if _in_convex_hull(train_design, v) else "dose-outside-hull"


def _default_doses(k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Two dose vectors inside the convex hull of the training labels and two outside it (in span).

    In: ``0.5 e_i`` and ``0.5 e_i + 0.5 e_j``; out: ``2 e_m`` and ``e_i - e_j`` (``i != j``,
    chosen by the protocol stream).
    """
    if k < 1:
        return []
    out = []
    i = int(rng.integers(k))
    v = np.zeros(k)
    v[i] = 0.5
    out.append(v)
    if k >= 2:
        a, b = rng.choice(k, size=2, replace=False)
        v = np.zeros(k)
        v[[a, b]] = 0.5
        out.append(v)
    m = int(rng.integers(k))
    v = np.zeros(k)
    v[m] = 2.0
    out.append(v)
    if k >= 2:
        a, b = rng.choice(k, size=2, replace=False)
        v = np.zeros(k)
        v[a], v[b] = 1.0, -1.0
        out.append(v)
    return out


def _make_obs(
    labels: Sequence[str], n_per: Sequence[int], split: Mapping[str, str], groups: Mapping[str, str]
) -> pd.DataFrame:
    cell_labels = np.repeat(np.asarray(labels, dtype=object), n_per)
    n = cell_labels.size
    obs = pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n)]))
    cats = list(dict.fromkeys(labels))
    obs["perturbation"] = pd.Categorical(cell_labels, categories=cats)
    obs["split"] = pd.Categorical([split[lab] for lab in cell_labels], categories=["train", "test"])
    group_cats = list(dict.fromkeys(groups[lab] for lab in labels))
    obs["group"] = pd.Categorical([groups[lab] for lab in cell_labels], categories=group_cats)
    return obs


def _build_anndata(
    obs: pd.DataFrame,
    decoded: dict[str, np.ndarray | None],
    z: np.ndarray,
    z_base: np.ndarray,
    uns: dict[str, Any],
):
    import anndata as ad

    n_genes = decoded["X"].shape[1]
    var = pd.DataFrame(index=pd.Index([f"g{g}" for g in range(n_genes)]))
    adata = ad.AnnData(X=np.asarray(decoded["X"], dtype=np.float32), obs=obs, var=var)
    if decoded["counts"] is not None:
        adata.layers["counts"] = np.asarray(decoded["counts"], dtype=np.int32)
        adata.obs["library_size"] = np.asarray(decoded["library_size"], dtype=np.float64)
    adata.obsm["z_true"] = np.asarray(z, dtype=np.float64)
    adata.obsm["z_base_true"] = np.asarray(z_base, dtype=np.float64)
    adata.uns["simulation"] = uns
    return adata


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


# --------------------------------------------------------------------------------------------
# Additive latent shift (DESIGN 2.1)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AdditiveShiftTruth:
    """Ground truth of :func:`simulate_additive_shift`: ``z = z_base + W l``, ``x = f([z, eta])``.

    Attributes
    ----------
    W
        Latent shifts, shape ``(latent_dim, K_total)``; column ``k`` belongs to ``registry.names[k]``.
    decoder
        The :class:`SimulationDecoder` (weights, noise scale, observation model).
    base
        Base distribution kind of ``z_base`` (standardised: mean 0, variance 1 per coordinate).
    registry
        All elementary perturbations, the out-of-span ones included (the last ``n_out_of_span``).
    out_of_span
        Names of the perturbations that appear only in test conditions (never alone).
    train_labels, test_labels
        Canonical condition labels of the built-in protocol.
    groups
        ``{label: group}`` with groups ``control``, ``single``, ``double``, ``dose-in-hull``,
        ``dose-outside-hull``, ``out-of-span``.
    """

    W: np.ndarray
    decoder: SimulationDecoder
    base: str
    registry: PerturbationRegistry
    out_of_span: tuple[str, ...]
    train_labels: tuple[str, ...]
    test_labels: tuple[str, ...]
    groups: Mapping[str, str]
    seed: int

    @property
    def latent_dim(self) -> int:
        return int(self.W.shape[0])

    @property
    def names(self) -> tuple[str, ...]:
        return self.registry.names

    @property
    def noise_scale(self) -> float:
        return self.decoder.noise_scale

    def label_vector(self, label: LabelLike) -> np.ndarray:
        """Label vector of any accepted spelling (string, ``{name: dose}``, vector)."""
        return self.registry.encode(label)

    def latent_mean(self, label: LabelLike) -> np.ndarray:
        """True mean of ``z`` under ``label``: ``W l`` (the base has mean 0)."""
        return self.W @ self.label_vector(label)

    def sample_latent(self, label: LabelLike, n_cells: int, seed: int = 0) -> np.ndarray:
        """Fresh latent states ``z_base + W l``, shape ``(n_cells, latent_dim)``."""
        rng = np.random.default_rng(seed)
        return sample_base(self.base, n_cells, self.latent_dim, rng) + self.latent_mean(label)

    def decode(self, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Cells from latent states through the true decoder (with fresh noise from ``rng``)."""
        return self.decoder.decode(z, rng)

    def sample(self, label: LabelLike, n_cells: int, seed: int = 0, *, counts: bool = False) -> np.ndarray:
        """Fresh cells of the TRUE population under ``label`` (any label, simulated or not).

        Returns ``X`` as in the simulated AnnData (log-normalised if the decoder emits counts), or
        the raw counts with ``counts=True`` (count decoders only).
        """
        if counts and not self.decoder.counts:
            raise ValueError("counts=True needs a simulation run with counts=True.")
        rng = np.random.default_rng(seed)
        z = sample_base(self.base, n_cells, self.latent_dim, rng) + self.latent_mean(label)
        out = self.decoder.decode_full(z, rng)
        return out["counts"] if counts else out["X"]

    def population_mean(self, label: LabelLike, n_cells: int = 20000, seed: int = 12345) -> np.ndarray:
        """Monte-Carlo mean of ``X`` over ``n_cells`` fresh cells of the true population."""
        return self.sample(label, n_cells, seed).mean(axis=0)


def simulate_additive_shift(
    *,
    n_perturbations: int = 5,
    latent_dim: int = 5,
    n_genes: int = 20,
    n_cells: int = 200,
    base: BaseKind = "normal",
    doubles: DoublesSpec = "half",
    doses: Literal["default"] | Sequence[LabelLike] | None = "default",
    n_out_of_span: int = 1,
    decoder_hidden: int | Sequence[int] = 64,
    noise_scale: float = 0.3,
    noise_dim: int | None = None,
    obs_noise: float = 0.1,
    counts: bool = False,
    mean_library_size: float = 2000.0,
    library_log_sd: float = 0.25,
    dispersion: float = 20.0,
    shift_scale: float = 1.5,
    seed: int = 0,
) -> tuple[Any, AdditiveShiftTruth]:
    """Simulate the ``pdae-sim`` protocol under the additive latent shift model (DESIGN 2.1, 6).

    ``z = z_base + W l`` with ``z_base`` i.i.d. from a standardised ``base`` distribution, and
    ``x = f([z, eta]) (+ obs_noise * eps)`` with a random nonlinear MLP ``f`` that takes the noise
    ``eta ~ N(0, noise_scale^2 I)`` as input (see :class:`SimulationDecoder`).

    Conditions (``n_cells`` cells each):

    - ``control`` and every single ``P_k`` (``k < n_perturbations``): train;
    - doubles among the ``n_perturbations`` in-span perturbations: those chosen by ``doubles`` are
      train (``"half"``: half of all pairs, picked by ``seed``; ``"all"``; ``None``: none; or a list
      of pairs of indices/names), every other pair is test (group ``"double"``);
    - dose vectors (test): ``doses="default"`` gives ``0.5 e_i`` and ``0.5 e_i + 0.5 e_j`` (inside
      the convex hull of the training labels) and ``2 e_m`` and ``e_i - e_j`` (outside it, in the
      span); a list of labels (``"P0:0.5+P1:0.5"``, ``{"P0": 2}``) is classified automatically into
      ``dose-in-hull`` / ``dose-outside-hull`` / ``out-of-span``; ``None`` for no doses;
    - ``n_out_of_span`` extra perturbations (the last names) appear only in test conditions, each
      once combined with a random in-span perturbation (group ``"out-of-span"``).

    Shifts: column ``k`` of ``W`` is a uniformly random direction times a norm drawn uniformly in
    ``[2/3, 4/3] * shift_scale`` (default: 1 to 2 base standard deviations).

    Returns
    -------
    adata, truth
        ``obsm["z_true"]`` = ``z``, ``obsm["z_base_true"]`` = ``z_base``; see the module docstring
        for the layout and :class:`AdditiveShiftTruth` for the truth.
    """
    k = _check_int("n_perturbations", n_perturbations, 1)
    d = _check_int("latent_dim", latent_dim, 1)
    n_genes = _check_int("n_genes", n_genes, 1)
    n_cells = _check_int("n_cells", n_cells, 1)
    n_oos = _check_int("n_out_of_span", n_out_of_span, 0)
    if not (math.isfinite(shift_scale) and shift_scale > 0):
        raise ValueError(f"shift_scale must be a positive number, got {shift_scale}.")
    if base not in ("normal", "laplace", "uniform"):
        raise ValueError(f"base={base!r} is not supported; use 'normal', 'laplace' or 'uniform'.")
    seed = int(seed)
    rng_params, rng_protocol, rng_cells = np.random.default_rng(seed).spawn(3)

    k_total = k + n_oos
    names = _perturbation_names(k_total)
    registry = PerturbationRegistry(names)

    # --- parameters
    directions = rng_params.standard_normal((d, k_total))
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    norms = rng_params.uniform(2.0 / 3.0, 4.0 / 3.0, size=k_total) * shift_scale
    W = directions * norms
    decoder = SimulationDecoder.random(
        rng_params,
        latent_dim=d,
        n_genes=n_genes,
        hidden=decoder_hidden,
        noise_dim=noise_dim,
        noise_scale=noise_scale,
        obs_noise=obs_noise,
        counts=counts,
        mean_library_size=mean_library_size,
        library_log_sd=library_log_sd,
        dispersion=dispersion,
    )

    # --- protocol
    vectors: list[np.ndarray] = []
    split: dict[str, str] = {}
    groups: dict[str, str] = {}

    def add(v: np.ndarray, group: str, part: str) -> None:
        label = registry.decode(v)
        if label in groups:
            raise ValueError(
                f"Condition {label!r} would be simulated twice (as {groups[label]!r} and {group!r}); "
                f"give distinct dose vectors."
            )
        vectors.append(v)
        split[label] = part
        groups[label] = group

    add(np.zeros(k_total), "control", "train")
    for i in range(k):
        v = np.zeros(k_total)
        v[i] = 1.0
        add(v, "single", "train")
    train_pairs = set(_resolve_train_pairs(doubles, names, k, rng_protocol))
    all_pairs = list(itertools.combinations(range(k), 2))
    for i, j in all_pairs:
        if (i, j) in train_pairs:
            v = np.zeros(k_total)
            v[[i, j]] = 1.0
            add(v, "double", "train")
    for i, j in all_pairs:
        if (i, j) not in train_pairs:
            v = np.zeros(k_total)
            v[[i, j]] = 1.0
            add(v, "double", "test")
    train_design = np.stack([v for v, lab in zip(vectors, groups, strict=True) if split[lab] == "train"])

    if isinstance(doses, str):
        if doses != "default":
            raise ValueError(f"doses={doses!r} is not supported; use 'default', None or a list of labels.")
        dose_vectors = [np.concatenate([v, np.zeros(n_oos)]) for v in _default_doses(k, rng_protocol)]
    elif doses is None:
        dose_vectors = []
    else:
        dose_vectors = [registry.encode(lab) for lab in doses]
    for v in dose_vectors:
        add(v, _dose_group(train_design, v), "test")

    for q in range(k, k_total):
        v = np.zeros(k_total)
        v[q] = 1.0
        v[int(rng_protocol.integers(k))] = 1.0
        add(v, "out-of-span", "test")

    labels = list(groups)
    design = np.stack(vectors)

    # --- cells
    n_total = n_cells * len(labels)
    z_base = sample_base(base, n_total, d, rng_cells)
    shifts = np.repeat(design @ W.T, n_cells, axis=0)
    z = z_base + shifts
    decoded = decoder.decode_full(z, rng_cells)

    obs = _make_obs(labels, [n_cells] * len(labels), split, groups)
    uns = {
        "simulator": "additive_shift",
        "seed": seed,
        "n_perturbations": k,
        "n_out_of_span": n_oos,
        "latent_dim": d,
        "base": base,
        "noise_scale": float(noise_scale),
        "obs_noise": float(obs_noise),
        "counts": bool(counts),
        "shift_scale": float(shift_scale),
        "perturbation_names": list(names),
        "out_of_span": list(names[k:]),
    }
    adata = _build_anndata(obs, decoded, z, z_base, uns)
    truth = AdditiveShiftTruth(
        W=_ro(W),
        decoder=decoder,
        base=base,
        registry=registry,
        out_of_span=tuple(names[k:]),
        train_labels=tuple(lab for lab in labels if split[lab] == "train"),
        test_labels=tuple(lab for lab in labels if split[lab] == "test"),
        groups=MappingProxyType(dict(groups)),
        seed=seed,
    )
    return adata, truth


# --------------------------------------------------------------------------------------------
# Latent dynamical causal programs (DESIGN 2.2)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LatentDynamicsTruth:
    """Ground truth of :func:`simulate_latent_dynamics`.

    Basal state ``z(0) ~ N(mu, Sigma_0)``; the perturbation is switched on at ``t = 0``; cells are
    decoded as ``x = f([z(t), eta])``. Two readings of the drift (``heterogeneity``):

    - ``"persistent"`` (the default): every cell's basal state is its own steady state,
      ``dz/dt = (B - I)(z - z(0)) + S l``, so ``z(t) = z(0) + (I - e^{At}) W_eq l``; control cells
      stay at ``z(0)`` and the covariance stays ``Sigma_0``: the control population is stationary
      (mean-only context effects). Per snapshot this is the law an Ornstein-Uhlenbeck process started
      in a stationary law ``N(mu, Sigma_0)`` would give (where a diffusion making it stationary exists).
    - ``"relaxing"`` (DESIGN 2.2 literally): ``dz/dt = (B - I)(z - mu) + S l``; a cell's deviation
      from ``mu`` relaxes, so ``z(t) = mu + (I - e^{At}) W_eq l + e^{At}(z(0) - mu)`` and the
      covariance of ``z(t)`` shrinks from ``Sigma_0`` to 0 for every population, the control
      included (not stationary). Control cells are ``mu + e^{At}(z(0) - mu)``.

    With ``diffusion > 0`` a Brownian term ``diffusion * dW`` is added in both readings.
    The population mean ``mu + (I - e^{At}) W_eq l`` is the same for both.

    Attributes
    ----------
    B
        Causal weights among programs, ``(n_programs, n_programs)``, strictly lower triangular
        (program ``j`` can act on program ``i`` only if ``j < i``); ``B - I`` has all eigenvalues -1.
    S
        Targets ``(n_programs, K)``: how strongly perturbation ``k`` pushes each program.
    mu, Sigma_0
        Mean and the (diagonal) covariance of the basal (control) state ``z(0)``.
    diffusion
        Scale of the Brownian noise (0: deterministic dynamics given ``z(0)``).
    heterogeneity
        ``"relaxing"`` or ``"persistent"`` (see above).
    W_equilibrium
        ``(I - B)^{-1} S``: at long times the model is an additive shift model with this ``W``.
    """

    B: np.ndarray
    S: np.ndarray
    mu: np.ndarray
    Sigma_0: np.ndarray
    diffusion: float
    decoder: SimulationDecoder
    registry: PerturbationRegistry
    times: tuple[float, ...]
    train_labels: tuple[str, ...]
    test_labels: tuple[str, ...]
    groups: Mapping[str, str]
    seed: int
    heterogeneity: str = "persistent"

    @property
    def n_programs(self) -> int:
        return int(self.B.shape[0])

    @property
    def names(self) -> tuple[str, ...]:
        return self.registry.names

    @property
    def drift_matrix(self) -> np.ndarray:
        """``A = B - I``."""
        return self.B - np.eye(self.n_programs)

    @property
    def W_equilibrium(self) -> np.ndarray:
        """``(I - B)^{-1} S``, shape ``(n_programs, K)``."""
        return np.linalg.solve(np.eye(self.n_programs) - self.B, self.S)

    def label_vector(self, label: LabelLike) -> np.ndarray:
        return self.registry.encode(label)

    def expm(self, t: float) -> np.ndarray:
        """``e^{(B - I) t}``.

        For strictly triangular ``B`` (nilpotent, ``B^n = 0``) this is the exact finite sum
        ``e^{-t} sum_{k < n} (B t)^k / k!``; otherwise ``scipy.linalg.expm``.
        """
        t = float(t)
        n = self.n_programs
        if np.any(np.triu(self.B)):
            return scipy.linalg.expm(self.drift_matrix * t)
        out = np.eye(n)
        term = np.eye(n)
        for k in range(1, n):
            term = term @ self.B * (t / k)
            out = out + term
        return math.exp(-t) * out

    def drift(self, z: np.ndarray, label: LabelLike, z0: np.ndarray | None = None) -> np.ndarray:
        """Deterministic drift ``dz/dt`` at ``z`` (``z0`` is needed for ``"persistent"``)."""
        anchor = self.mu if self.heterogeneity == "relaxing" else z0
        if anchor is None:
            raise ValueError("heterogeneity='persistent' needs the basal state z0 to evaluate the drift.")
        return (np.asarray(z) - anchor) @ self.drift_matrix.T + self.S @ self.label_vector(label)

    def latent_mean(self, label: LabelLike, t: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """True mean of ``z(t)``: ``mu + (I - e^{(B-I)t}) W_equilibrium l``.

        Shape ``(n_programs,)`` for a scalar ``t``, ``(len(t), n_programs)`` for an array.
        """
        shift = self.W_equilibrium @ self.label_vector(label)
        eye = np.eye(self.n_programs)
        ts = np.asarray(t, dtype=np.float64)
        out = np.stack([self.mu + (eye - self.expm(ti)) @ shift for ti in ts.reshape(-1)])
        return out[0] if ts.ndim == 0 else out

    def stationary_noise_cov(self) -> np.ndarray:
        """Covariance the Brownian noise alone builds up as ``t -> inf`` (0 without diffusion):
        the solution ``P`` of ``A P + P A^T + diffusion^2 I = 0``."""
        if self.diffusion == 0:
            return np.zeros((self.n_programs, self.n_programs))
        return scipy.linalg.solve_continuous_lyapunov(
            self.drift_matrix, -(self.diffusion**2) * np.eye(self.n_programs)
        )

    def noise_cov(self, t: float) -> np.ndarray:
        """Covariance ``Q(t) = P - e^{At} P e^{A^T t}`` added by the diffusion up to time ``t``."""
        s_inf = self.stationary_noise_cov()
        e = self.expm(t)
        q = s_inf - e @ s_inf @ e.T
        return 0.5 * (q + q.T)

    def latent_cov(self, t: float) -> np.ndarray:
        """True covariance of ``z(t)`` (the same for every label): ``e^{At} Sigma_0 e^{A^T t} + Q(t)``
        (``"relaxing"``) or ``Sigma_0 + Q(t)`` (``"persistent"``)."""
        if self.heterogeneity == "relaxing":
            e = self.expm(t)
            return e @ self.Sigma_0 @ e.T + self.noise_cov(t)
        return self.Sigma_0 + self.noise_cov(t)

    def solve(self, z0: np.ndarray, label: LabelLike, t: float | np.ndarray) -> np.ndarray:
        """Noise-free solution ``z(t)`` from ``z(0) = z0`` in closed form (see the class docstring).

        ``z0``: ``(n_programs,)`` or ``(n, n_programs)``; ``t``: a scalar or one time per row.
        """
        z0 = np.asarray(z0, dtype=np.float64)
        single = z0.ndim == 1
        z0 = np.atleast_2d(z0)
        ts = np.broadcast_to(np.asarray(t, dtype=np.float64), (z0.shape[0],))
        out = _closed_form(self, z0, ts, self.W_equilibrium @ self.label_vector(label))
        return out[0] if single else out

    def sample_basal(self, n_cells: int, seed: int = 0) -> np.ndarray:
        """Fresh basal states ``z(0) ~ N(mu, Sigma_0)``."""
        return _sample_basal(self, n_cells, np.random.default_rng(seed))

    def sample_latent(self, label: LabelLike, t: float, n_cells: int, seed: int = 0) -> np.ndarray:
        """Fresh ``z(t)`` of the true population under ``label``, shape ``(n_cells, n_programs)``."""
        rng = np.random.default_rng(seed)
        z0 = _sample_basal(self, n_cells, rng)
        ts = np.full(n_cells, float(t))
        return _propagate(self, z0, ts, self.W_equilibrium @ self.label_vector(label), rng)

    def decode(self, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Cells from latent states through the true decoder (with fresh noise from ``rng``)."""
        return self.decoder.decode(z, rng)

    def sample(
        self, label: LabelLike, t: float, n_cells: int, seed: int = 0, *, counts: bool = False
    ) -> np.ndarray:
        """Fresh cells of the TRUE population under ``label`` at time ``t`` (``X``, or raw counts
        with ``counts=True``)."""
        if counts and not self.decoder.counts:
            raise ValueError("counts=True needs a simulation run with counts=True.")
        rng = np.random.default_rng(seed)
        z0 = _sample_basal(self, n_cells, rng)
        z = _propagate(self, z0, np.full(n_cells, float(t)), self.W_equilibrium @ self.label_vector(label), rng)
        out = self.decoder.decode_full(z, rng)
        return out["counts"] if counts else out["X"]

    def population_mean(self, label: LabelLike, t: float, n_cells: int = 20000, seed: int = 12345) -> np.ndarray:
        """Monte-Carlo mean of ``X`` over fresh cells of the true population at time ``t``."""
        return self.sample(label, t, n_cells, seed).mean(axis=0)


def _sample_basal(truth: LatentDynamicsTruth, n: int, rng: np.random.Generator) -> np.ndarray:
    sd = np.sqrt(np.diag(truth.Sigma_0))
    return truth.mu + sd * rng.standard_normal((n, truth.n_programs))


def _closed_form(truth: LatentDynamicsTruth, z0: np.ndarray, ts: np.ndarray, shift: np.ndarray) -> np.ndarray:
    out = np.empty_like(z0)
    eye = np.eye(truth.n_programs)
    for t in np.unique(ts):
        rows = ts == t
        e = truth.expm(t)
        if truth.heterogeneity == "relaxing":
            out[rows] = truth.mu + (eye - e) @ shift + (z0[rows] - truth.mu) @ e.T
        else:
            out[rows] = z0[rows] + (eye - e) @ shift
    return out


def _propagate(
    truth: LatentDynamicsTruth, z0: np.ndarray, ts: np.ndarray, shift: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """``z(t)`` given ``z(0)``: closed form, plus a draw from the exact OU transition noise
    ``N(0, Q(t))`` when ``diffusion > 0``."""
    z = _closed_form(truth, z0, ts, shift)
    if truth.diffusion > 0:
        for t in np.unique(ts):
            rows = np.flatnonzero(ts == t)
            evals, evecs = np.linalg.eigh(truth.noise_cov(t))
            root = evecs * np.sqrt(np.clip(evals, 0.0, None))
            z[rows] += rng.standard_normal((rows.size, truth.n_programs)) @ root.T
    return z


def simulate_latent_dynamics(
    *,
    n_programs: int = 4,
    n_perturbations: int = 4,
    times: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0),
    n_cells: int = 100,
    n_genes: int = 20,
    edge_prob: float = 0.5,
    target: Literal["single", "random"] | np.ndarray = "single",
    doubles: DoublesSpec = "half",
    diffusion: float = 0.0,
    heterogeneity: Literal["relaxing", "persistent"] = "persistent",
    edge_weight: tuple[float, float] = (0.5, 1.5),
    target_strength: tuple[float, float] = (1.0, 2.0),
    basal_sd: tuple[float, float] = (0.3, 0.6),
    decoder_hidden: int | Sequence[int] = 64,
    noise_scale: float = 0.3,
    noise_dim: int | None = None,
    obs_noise: float = 0.1,
    counts: bool = False,
    mean_library_size: float = 2000.0,
    library_log_sd: float = 0.25,
    dispersion: float = 20.0,
    seed: int = 0,
) -> tuple[Any, LatentDynamicsTruth]:
    """Simulate time courses under the linear latent dynamical causal model (DESIGN 2.2).

    ``dz/dt = (B - I)(z - a) + S l`` with ``a = z(0)`` (default) or ``mu`` (``heterogeneity``),
    ``z(0) ~ N(mu, Sigma_0)`` (the control state), the perturbation switched on at ``t = 0``; each cell is a snapshot at its own time
    (``obs["time"]``, hours) decoded by the same kind of random decoder as
    :func:`simulate_additive_shift`.

    ``heterogeneity`` chooses what happens to a cell's basal deviation ``z(0) - mu`` (see
    :class:`LatentDynamicsTruth`): ``"persistent"`` (default) makes ``z(0)`` each cell's own steady
    state, ``dz/dt = (B - I)(z - z(0)) + S l``, so control cells stay at ``z(0)`` and the covariance
    stays ``Sigma_0`` (the control population is stationary); ``"relaxing"`` (DESIGN 2.2 as
    written) lets it decay with ``e^{(B-I)t}``, so the latent covariance shrinks to 0 over time for
    every condition, the control included. Both have the same population mean
    ``mu + (I - e^{(B-I)t}) W_equilibrium l``.

    - ``B``: strictly lower triangular; each edge ``j -> i`` (``j < i``) present with probability
      ``edge_prob``, random sign, ``|w| ~ U(edge_weight)``. ``B - I`` then has all eigenvalues -1,
      so the dynamics are stable and relax at rate ~1 per hour.
    - ``S``: ``target="single"``: perturbation ``k`` targets program ``k mod n_programs``;
      ``"random"``: each program is targeted with probability 1/2 (at least one); or a given
      ``(n_programs, K)`` matrix. Strengths ``|s| ~ U(target_strength)`` with random signs.
    - ``mu ~ N(0, 0.5^2)``, ``Sigma_0 = diag(sd^2)`` with ``sd ~ U(basal_sd)``.
    - Solution: without diffusion the closed form
      ``z(t) = mu + (I - e^{(B-I)t})(I-B)^{-1} S l + e^{(B-I)t}(z(0) - mu)`` (``"relaxing"``) or
      ``z(t) = z(0) + (I - e^{(B-I)t})(I-B)^{-1} S l`` (``"persistent"``); ``e^{(B-I)t}`` is the
      exact finite series of the nilpotent ``B`` (equal to ``scipy.linalg.expm``).
      With ``diffusion > 0`` (``dz = ... dt + diffusion dW``) each snapshot is drawn from the exact
      Ornstein-Uhlenbeck transition law ``N(closed form, Q(t))``, ``Q(t) = P - e^{At} P e^{A^T t}``
      with ``A P + P A^T + diffusion^2 I = 0`` — the limit of Euler–Maruyama with step -> 0, without
      its discretisation error (and since every cell is a single snapshot, no path is needed).
      Control cells carry the same ``Q(t)``.

    Conditions: control, every single (train), doubles as in :func:`simulate_additive_shift`
    (``doubles`` picks the training pairs, the other pairs are test). Every condition, the control
    included, has ``n_cells`` cells at every time in ``times`` (time-matched controls; with
    ``"persistent"`` and no diffusion a control cell at any time is just its ``z(0)``).

    Returns
    -------
    adata, truth
        ``obs["time"]``, ``obsm["z_true"] = z(t_i)``, ``obsm["z_base_true"] = z(0)``; see
        :class:`LatentDynamicsTruth`.
    """
    ell = _check_int("n_programs", n_programs, 1)
    k = _check_int("n_perturbations", n_perturbations, 1)
    n_cells = _check_int("n_cells", n_cells, 1)
    n_genes = _check_int("n_genes", n_genes, 1)
    times_arr = np.asarray(times, dtype=np.float64).reshape(-1)
    if times_arr.size == 0 or not np.all(np.isfinite(times_arr)) or np.any(times_arr < 0):
        raise ValueError(f"times must be a non-empty list of finite times >= 0, got {list(times)}.")
    if len(np.unique(times_arr)) != times_arr.size:
        raise ValueError(f"times has duplicates: {list(times)}.")
    if not 0 <= edge_prob <= 1:
        raise ValueError(f"edge_prob must lie in [0, 1], got {edge_prob}.")
    _check_nonneg("diffusion", diffusion)
    if heterogeneity not in ("relaxing", "persistent"):
        raise ValueError(f"heterogeneity={heterogeneity!r} is not supported; use 'relaxing' or 'persistent'.")
    for nm, (lo, hi) in [("edge_weight", edge_weight), ("target_strength", target_strength), ("basal_sd", basal_sd)]:
        if not (0 <= lo <= hi and math.isfinite(hi)):
            raise ValueError(f"{nm} must be a range (low, high) with 0 <= low <= high, got {(lo, hi)}.")
    seed = int(seed)
    rng_params, rng_protocol, rng_cells = np.random.default_rng(seed).spawn(3)
    names = _perturbation_names(k)
    registry = PerturbationRegistry(names)

    # --- parameters
    B = np.zeros((ell, ell))
    for i in range(1, ell):
        for j in range(i):
            if rng_params.random() < edge_prob:
                B[i, j] = rng_params.choice([-1.0, 1.0]) * rng_params.uniform(*edge_weight)
    if isinstance(target, str):
        if target == "single":
            mask = np.zeros((ell, k), dtype=bool)
            mask[np.arange(k) % ell, np.arange(k)] = True
        elif target == "random":
            mask = rng_params.random((ell, k)) < 0.5
            for col in range(k):
                if not mask[:, col].any():
                    mask[rng_params.integers(ell), col] = True
        else:
            raise ValueError(f"target={target!r} is not supported; use 'single', 'random' or an (n_programs, K) matrix.")
        signs = rng_params.choice([-1.0, 1.0], size=(ell, k))
        S = np.where(mask, signs * rng_params.uniform(*target_strength, size=(ell, k)), 0.0)
    else:
        S = np.asarray(target, dtype=np.float64)
        if S.shape != (ell, k):
            raise ValueError(f"target matrix must have shape (n_programs, n_perturbations) = {(ell, k)}, got {S.shape}.")
        if not np.all(np.isfinite(S)):
            raise ValueError("target matrix has NaN/Inf entries.")
    mu = rng_params.normal(0.0, 0.5, size=ell)
    Sigma_0 = np.diag(rng_params.uniform(*basal_sd, size=ell) ** 2)
    decoder = SimulationDecoder.random(
        rng_params,
        latent_dim=ell,
        n_genes=n_genes,
        hidden=decoder_hidden,
        noise_dim=noise_dim,
        noise_scale=noise_scale,
        obs_noise=obs_noise,
        counts=counts,
        mean_library_size=mean_library_size,
        library_log_sd=library_log_sd,
        dispersion=dispersion,
    )

    # --- protocol
    vectors: list[np.ndarray] = []
    split: dict[str, str] = {}
    groups: dict[str, str] = {}

    def add(v: np.ndarray, group: str, part: str) -> None:
        label = registry.decode(v)
        vectors.append(v)
        split[label] = part
        groups[label] = group

    add(np.zeros(k), "control", "train")
    for i in range(k):
        add(np.eye(k)[i], "single", "train")
    train_pairs = set(_resolve_train_pairs(doubles, names, k, rng_protocol))
    all_pairs = list(itertools.combinations(range(k), 2))
    for part in ("train", "test"):
        for i, j in all_pairs:
            if ((i, j) in train_pairs) == (part == "train"):
                add(np.eye(k)[i] + np.eye(k)[j], "double", part)
    labels = list(groups)

    truth = LatentDynamicsTruth(
        B=_ro(B),
        S=_ro(S),
        mu=_ro(mu),
        Sigma_0=_ro(Sigma_0),
        diffusion=float(diffusion),
        decoder=decoder,
        registry=registry,
        times=tuple(float(t) for t in times_arr),
        train_labels=tuple(lab for lab in labels if split[lab] == "train"),
        test_labels=tuple(lab for lab in labels if split[lab] == "test"),
        groups=MappingProxyType(dict(groups)),
        seed=seed,
        heterogeneity=heterogeneity,
    )

    # --- cells: for each condition, for each time, n_cells cells
    n_t = times_arr.size
    design = np.stack(vectors)
    cell_cond = np.repeat(np.arange(len(labels)), n_t * n_cells)
    cell_time = np.tile(np.repeat(times_arr, n_cells), len(labels))
    z0 = _sample_basal(truth, cell_cond.size, rng_cells)
    shifts = (design @ truth.W_equilibrium.T)[cell_cond]
    z = np.empty_like(z0)
    for c in range(len(labels)):
        rows = cell_cond == c
        z[rows] = _propagate(truth, z0[rows], cell_time[rows], shifts[rows][0], rng_cells)
    decoded = decoder.decode_full(z, rng_cells)

    obs = _make_obs(labels, [n_t * n_cells] * len(labels), split, groups)
    obs["time"] = cell_time
    uns = {
        "simulator": "latent_dynamics",
        "seed": seed,
        "n_programs": ell,
        "n_perturbations": k,
        "times": [float(t) for t in times_arr],
        "diffusion": float(diffusion),
        "heterogeneity": heterogeneity,
        "noise_scale": float(noise_scale),
        "obs_noise": float(obs_noise),
        "counts": bool(counts),
        "perturbation_names": list(names),
    }
    adata = _build_anndata(obs, decoded, z, z0, uns)
    return adata, truth
