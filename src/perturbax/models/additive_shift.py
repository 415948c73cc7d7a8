"""The additive latent shift model (PDAE, arXiv 2504.18522), DESIGN section 2.1."""

from __future__ import annotations

import numpyro

from perturbax.models.batch import Batch
from perturbax.models.blocks import (
    CELL_PLATE,
    base_distribution,
    gaussian_likelihood,
    implicit_likelihood,
    negative_binomial_likelihood,
    network,
    perturbation_effects,
)
from perturbax.models.config import AdditiveShiftConfig

__all__ = ["additive_shift_model", "decoder_input_size"]


def decoder_input_size(config: AdditiveShiftConfig) -> int:
    """Input width of the decoder: latent dim, plus the noise width for the implicit likelihood."""
    return config.latent_dim + (config.noise_dim if config.likelihood == "implicit" else 0)


def additive_shift_model(batch: Batch, *, config: AdditiveShiftConfig, n_cells: int) -> None:
    """z_base ~ base; z = z_base + W l (+ V c); x ~ likelihood(decoder(z)).

    Sites: ``W`` (d x K shifts), ``V`` (d x C covariate shifts, if any), ``z_base`` and ``x`` per
    cell in the plate ``"cells"`` of size ``n_cells``, ``x_mean`` where the likelihood has a mean.
    """
    d = config.latent_dim
    W = perturbation_effects("W", d, config.n_perturbations, prior=config.w_prior, scale=config.w_scale)
    V = None
    if config.n_covariates:
        V = perturbation_effects("V", d, config.n_covariates, prior="normal", scale=config.w_scale)
    decoder = network("decoder", decoder_input_size(config), config.n_genes, config.decoder_hidden, seed=config.seed)
    with numpyro.plate(CELL_PLATE, n_cells, subsample_size=batch.size):
        z_base = numpyro.sample("z_base", base_distribution(config.base, d))
        z = z_base + batch.l @ W.T
        if V is not None:
            z = z + batch.c @ V.T
        if config.likelihood == "gaussian":
            gaussian_likelihood(decoder, z, batch.x, n_genes=config.n_genes)
        elif config.likelihood == "negative_binomial":
            negative_binomial_likelihood(decoder, z, batch.x, batch.library, n_genes=config.n_genes)
        else:
            implicit_likelihood(decoder, z, batch.x, noise_dim=config.noise_dim)
