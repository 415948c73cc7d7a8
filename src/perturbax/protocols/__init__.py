"""Evaluation protocols of DESIGN section 6, shared by the demo, benchmarks and tests.

A protocol fits models and baselines on a fixed split, predicts the held-out perturbations and
scores them; it returns tables (pandas) and the fitted objects, and can write a report.
"""

from perturbax.protocols.pdae_sim import PDAESimResult, reading_paragraph, run_pdae_sim, write_pdae_sim_report

__all__ = ["PDAESimResult", "reading_paragraph", "run_pdae_sim", "write_pdae_sim_report"]
