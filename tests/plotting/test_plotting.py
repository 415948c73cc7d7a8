"""The package's plot functions draw what they say (Agg backend)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from perturbax import plotting  # noqa: E402
from perturbax.theory import (  # noqa: E402
    check_design,
    linear_dynamics_mask,
    linear_dynamics_summary_fn,
    local_identifiability,
)


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
    plt.close("all")


def test_spectra_show_zero_singular_values_below_a_visible_tolerance():
    # K = 3 but only 2 measured directions: the third singular value is zero and must be drawn
    report = check_design(["control", "A", "B"], ["A+B", "C"], names=["A", "B", "C"])
    ax = plotting.plot_design_spectrum(report)
    x, y = ax.lines[0].get_data()
    assert list(x) == [1, 2, 3] and y[2] < report.tolerance < y[1]
    lo, hi = ax.get_ylim()
    assert ax.get_yscale() == "log" and lo < report.tolerance < hi  # the tolerance line is inside the axis
    assert "1 unmeasured" in ax.get_title()
    # a Jacobian with fewer summaries than parameters: the missing singular values are null directions
    rng = np.random.default_rng(0)
    ell = K = 3
    params = {"B": np.tril(rng.normal(size=(ell, ell)), -1), "S": rng.normal(size=(ell, K)), "mu": rng.normal(size=ell)}
    design = np.vstack([np.zeros(K), np.eye(K)])
    steady = local_identifiability(linear_dynamics_summary_fn(design, [np.inf]), params, mask=linear_dynamics_mask(ell))
    assert steady.singular_values.size < steady.n_params and steady.n_unexpected == 3
    ax = plotting.plot_jacobian_spectrum({"steady state": steady})
    x, y = ax.lines[0].get_data()
    assert x.size == steady.n_params and int((y <= steady.rtol).sum()) == steady.n_null == 3
    assert "3 unexpected" in ax.get_legend().get_texts()[0].get_text()
    plt.close("all")


def test_cell_distributions_and_scores():
    import pandas as pd

    rng = np.random.default_rng(0)
    held_out, predicted = rng.normal(size=(50, 5)), rng.normal(1.0, 1.0, size=(400, 5))
    ax = plotting.plot_cell_distributions({"held out": held_out, "model": predicted}, max_cells=100)
    # one cloud (subsampled to max_cells) and one mean marker per set
    assert [len(c.get_offsets()) for c in ax.collections] == [50, 1, 100, 1]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["held out (50 cells)", "model (400 cells)"]
    with pytest.raises(ValueError, match="same genes"):
        plotting.plot_cell_distributions({"a": held_out, "b": predicted[:, :3]})
    table = pd.DataFrame({"method": ["model", "additive", "model", "additive"], "condition": ["A+B", "A+B", "C+D", "C+D"],
                          "energy_pca": [0.1, 0.3, 0.2, 0.4]})
    ax = plotting.plot_scores(table)
    assert len(ax.patches) == 4 and sorted(p.get_height() for p in ax.patches) == [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ValueError, match="no column 'r2'"):
        plotting.plot_scores(table, metric="r2")
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
