"""Configuration of the built-in models: small frozen objects that set dimensions and choices."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["AdditiveShiftConfig", "LIKELIHOODS", "BASES", "W_PRIORS"]

LIKELIHOODS = ("gaussian", "negative_binomial", "implicit")
BASES = ("normal", "laplace", "uniform")
W_PRIORS = ("normal", "horseshoe")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}.")


@dataclass(frozen=True)
class AdditiveShiftConfig:
    """Dimensions and choices of the additive latent shift model (DESIGN 2.1).

    z_base ~ base, z = z_base + W l (+ V c), x ~ likelihood(decoder(z)).

    Attributes
    ----------
    n_genes, n_perturbations, n_covariates
        G, K and the number of covariate one-hot columns C (0 for none).
    latent_dim
        d, the latent dimension (>= 1).
    likelihood
        ``"gaussian"`` (log-normalised data, per-gene scale), ``"negative_binomial"`` (raw counts,
        mean = library size x softmax) or ``"implicit"`` (noise fed into the decoder; no density,
        fit with ``objective="energy"``).
    base
        Distribution of z_base: ``"normal"``, ``"laplace"`` or ``"uniform"`` (unit variance).
    w_prior, w_scale
        Prior on W: ``"normal"`` with scale ``w_scale``, or a ``"horseshoe"`` (global scale
        ``w_scale``) for sparse effects.
    decoder_hidden, encoder_hidden
        Hidden layer widths of the MLPs.
    noise_dim
        Width of the noise fed into the decoder (``implicit`` only).
    seed
        Seed of the network initialisation.
    """

    n_genes: int
    n_perturbations: int
    latent_dim: int = 10
    n_covariates: int = 0
    likelihood: Literal["gaussian", "negative_binomial", "implicit"] = "gaussian"
    base: Literal["normal", "laplace", "uniform"] = "normal"
    w_prior: Literal["normal", "horseshoe"] = "normal"
    w_scale: float = 1.0
    decoder_hidden: tuple[int, ...] = (128, 128)
    encoder_hidden: tuple[int, ...] = (128, 128)
    noise_dim: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_genes", "n_perturbations", "n_covariates", "noise_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}.")
        if self.n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {self.n_genes}.")
        if not isinstance(self.latent_dim, int) or self.latent_dim < 1:
            raise ValueError(
                f"latent_dim must be an integer >= 1, got {self.latent_dim!r}. It is the number of "
                f"latent dimensions perturbations shift; try 5-20."
            )
        _choice("likelihood", self.likelihood, LIKELIHOODS)
        _choice("base", self.base, BASES)
        _choice("w_prior", self.w_prior, W_PRIORS)
        if not self.w_scale > 0:
            raise ValueError(f"w_scale must be > 0, got {self.w_scale}.")
        object.__setattr__(self, "decoder_hidden", tuple(int(h) for h in self.decoder_hidden))
        object.__setattr__(self, "encoder_hidden", tuple(int(h) for h in self.encoder_hidden))
        if self.likelihood == "implicit" and self.noise_dim < 1:
            raise ValueError("The implicit likelihood needs noise_dim >= 1 (noise fed into the decoder).")

    @property
    def name(self) -> str:
        return "additive_shift"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["decoder_hidden"] = list(self.decoder_hidden)
        d["encoder_hidden"] = list(self.encoder_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdditiveShiftConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - known
        if extra:
            raise ValueError(f"Unknown AdditiveShiftConfig fields {sorted(extra)}; was this saved by another version?")
        d = dict(d)
        for k in ("decoder_hidden", "encoder_hidden"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)
