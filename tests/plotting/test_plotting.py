"""The package's plot functions draw what they say (Agg backend)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from perturbax import plotting  # noqa: E402
from perturbax.theory import check_design  # noqa: E402


def test_predicted_vs_observed_marks_missed_genes():
    mean = np.array([0.0, 1.0, 2.0])
    ax = plotting.plot_predicted_vs_observed(mean, mean - 0.1, mean + 0.1, np.array([0.0, 1.0, 3.0]))
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("covers observed (67%)" in t for t in labels) and any("misses (33%)" in t for t in labels)
    with pytest.raises(ValueError, match="observed has 2 genes"):
        plotting.plot_predicted_vs_observed(mean, mean, mean, np.zeros(2))
    plt.close("all")


def test_gene_intervals_latent_loss_and_design():
    mean = np.linspace(0, 1, 30)
    ax = plotting.plot_gene_intervals(mean, mean - 0.1, mean + 0.1, [f"g{i}" for i in range(30)], top=5)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["g25", "g26", "g27", "g28", "g29"]
    rng = np.random.default_rng(0)
    z = rng.normal(size=(60, 3))
    ax = plotting.plot_latent(z, ["control"] * 30 + ["A"] * 30)
    assert len(ax.collections) == 2 and ax.get_xlabel() == "PC1 of z"
    with pytest.raises(ValueError, match="one label per cell"):
        plotting.plot_latent(z, ["A"])
    ax = plotting.plot_loss({"loss": np.linspace(2, 1, 100), "val_step": np.array([50, 100]), "val_loss": np.array([1.5, 1.1])})
    assert len(ax.lines) == 3
    report = check_design(["control", "A", "B"], ["A+B", "C"], names=["A", "B", "C"])
    ax = plotting.plot_design_coverage(report)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["A+B", "C"]
    assert {t.get_text() for t in ax.texts} == {"covered, extrapolation", "not covered"}
    ax = plotting.plot_design_spectrum(report)
    assert len(ax.patches) == report.singular_values.size
    plt.close("all")


def test_plot_trajectory_band_observed_baseline_and_labels():
    t = np.array([0.0, 1.0, 2.0, 4.0, 8.0])
    mean = 1 - np.exp(-t)
    ax = plotting.plot_trajectory(t, mean, mean - 0.1, mean + 0.1, observed_times=[1.0, 2.0], observed=[0.6, 0.9],
                                  baseline=np.zeros(5), baseline_label="control", train_times=[0.5, 1, 2])
    assert ax.get_xlabel() == "time since perturbation" and ax.get_ylabel() == "mean expression"
    legend = [x.get_text() for x in ax.get_legend().get_texts()]
    assert {"predicted mean", "control", "observed mean", "90% interval of the mean",
            "beyond the training times"} <= set(legend)
    band = ax.collections[0].get_paths()[0].vertices  # the fill_between polygon spans [lower, upper]
    assert np.isclose(band[:, 1].max(), mean.max() + 0.1) and np.isclose(band[:, 1].min(), -0.1)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), mean)
    with pytest.raises(ValueError, match="one value per time"):
        plotting.plot_trajectory(t[:3], mean, mean, mean)
    with pytest.raises(ValueError, match="observed_times"):
        plotting.plot_trajectory(t, mean, mean, mean, observed=[1.0])
    plt.close("all")
