"""``perturbax check-design``: which unseen perturbations a design can predict (no fitting).

A thin shell over :func:`perturbax.theory.check_design`; the JSON it writes is
``DesignReport.to_dict()`` (schema ``perturbax.check_design/1``, documented in
:mod:`perturbax.theory.design`).
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from perturbax.cli.fit import FiniteFloat, check_sep, where_option
from perturbax.cli.paths import check_outputs

__all__ = ["check_design", "design_from_csv", "design_from_h5ad", "parse_tests"]

_HELP = """Check which test perturbations a training design covers.

\b
Give the design either as
  DATA.h5ad --perturbation-key KEY --control LABEL   (the measured conditions of the cells;
                        --where KEY=VALUE keeps only some cells, e.g. --where dataset=norman19), or
  --design DESIGN.csv   one row per measured perturbation, one column per elementary
                        perturbation (header = names), doses as values; control = all zeros.

With DATA, --context-keys cell_type makes each (perturbation, context) pair a condition, written
"stimulated @ cell_type=CD4T" (several keys joined by &), and --holdout drops conditions (pairs)
from the design as `perturbax fit --holdout` does, so a held-out pair can be checked: a pair never
measured but identified through other contexts is a context transfer (identified only under the
additive model), never "interpolation".

\b
Tests are label strings, comma-separated and/or repeated:
  --perturbations "A+B,A:0.5+C:2"   (A:0.5 = A at dose 0.5; plain A = dose 1)

A test is identified (covered) when its label minus the control lies in the span of the
training labels minus the control (the affine hull of the design): the model can then predict
it from the measured perturbations. Each identified test is explained by the simplest
combination of training conditions (e.g. KLF1+SGK1 = KLF1 + SGK1; the minimum-norm weights are
shown too where they differ). Identified tests outside the convex hull of the training labels
need extrapolation (flagged). A test that is not identified names the perturbations to add; a
name the design never measured gets that verdict (measure it), not an error. The rank of the
design as a whole is reported separately.

\b
Prints a readable report; --json OUT.json also writes (--json - prints only) a JSON object:
  schema "perturbax.check_design/1", status ("ok"|"warning"|"fail"), message,
  elementary [names], reference, control_present, n_rows, n_distinct_rows,
  rank, full_rank, latent_dim, latent_dim_ok, method, rtol, tolerance, residual_rtol,
  hull_atol, singular_values, smallest_retained, largest_dropped, n_eliminated, min_pivot,
  identified_elementary [names], unidentified_elementary [names],
  elementary_residuals {name: float}, elementary_coefficient_norms {name: float|null},
  ill_conditioned_elementary [names], n_tests, n_covered, n_extrapolating,
  max_coefficient_norm, n_ill_conditioned,
  tests: [{label, covered, residual, relative_residual, in_convex_hull (bool|null),
           coefficients ({training label: float}|null), hull_coefficients,
           coefficient_norm, coefficient_l1, ill_conditioned, verdict ("identified"|"not identified"),
           simplest_coefficients ({training label: float}|null), equation (str|null), measured,
           unmeasured [names], missing_direction {name: float}, suggested_additions [labels],
           details, message}],
  unmeasured [names only tests use], design_additions [labels that identify every elementary one]
Coefficients c satisfy  test - control = sum_e c_e (training_e - control)  over the distinct
training labels (minimum-norm); they are computed for the first --max-details tests. --json must not name DATA or
the design CSV.
||c||_2 (coefficient_norm) is the factor by which the prediction amplifies the estimation error
of one measured condition; a covered test with ||c||_2 > 10 (e.g. reached only through a tiny
dose) is flagged ill-conditioned and the status is at least "warning".

Exit status 0 when the report was produced (whatever it says); 2 for bad usage; 1 for
unreadable or invalid input files.
"""


def design_from_csv(path: str | Path, *, control: str = "control", sep: str = "+"):
    """``(L, registry)`` from a design CSV (header = elementary names, rows = measured
    perturbations, doses as values). A first non-numeric column (row labels) is ignored."""
    import pandas as pd

    from perturbax.data.labels import PerturbationRegistry

    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise click.ClickException(f"{path}: the design CSV is empty.") from None
    except Exception as err:  # pragma: no cover - pandas parse errors
        raise click.ClickException(f"{path}: cannot read the design CSV ({err}).") from None
    if df.shape[1] and not pd.api.types.is_numeric_dtype(df.iloc[:, 0]):
        df = df.iloc[:, 1:]
    if df.shape[1] == 0 or df.shape[0] == 0:
        raise click.ClickException(
            f"{path}: the design needs a header of elementary perturbation names and one row per "
            f"measured perturbation (got {df.shape[0]} rows x {df.shape[1]} columns)."
        )
    bad = [str(c) for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise click.ClickException(
            f"{path}: column(s) {bad} are not numeric. Every column after an optional label column "
            f"must hold doses (0 = absent)."
        )
    L = df.to_numpy(dtype=np.float64)
    if not np.isfinite(L).all():
        rows, cols = np.nonzero(~np.isfinite(L))
        raise click.ClickException(
            f"{path}: missing or non-finite dose in row {int(rows[0]) + 1}, column "
            f"{df.columns[cols[0]]!r}; write 0 for an absent perturbation."
        )
    try:
        registry = PerturbationRegistry(tuple(str(c).strip() for c in df.columns), control=control, sep=sep)
    except ValueError as err:
        raise click.ClickException(f"{path}: {err}") from None
    return L, registry


def design_from_h5ad(
    path: str | Path, *, perturbation_key: str, control: str, sep: str = "+", dose_key: str | None = None,
    where=(), context_keys=(), holdout=(),
):
    """``(L, registry)`` of the measured conditions of an h5ad (``obs`` only is read), of the cells
    selected by ``where`` (``KEY=VALUE`` items), with ``context_keys`` (pairs as conditions) and
    without the ``holdout`` conditions."""
    from perturbax.cli.fit import held_out_conditions

    import anndata as ad
    import scipy.sparse as sp

    from perturbax.data import from_anndata, select_where

    try:
        backed = ad.read_h5ad(path, backed="r")
    except Exception as err:
        raise click.ClickException(f"{path}: cannot read the h5ad file ({err}).") from None
    try:
        obs = backed.obs.copy()
    finally:
        if getattr(backed, "file", None) is not None:
            backed.file.close()
    light = ad.AnnData(X=sp.csr_matrix((obs.shape[0], 1), dtype=np.float32), obs=obs)
    try:
        light = select_where(light, where)
        data = from_anndata(light, perturbation_key, control, sep=sep, dose_key=dose_key,
                            context_keys=tuple(context_keys))
        held = held_out_conditions(data, holdout, "--holdout")
        if held:
            data = data.select(held, exclude=True)
    except (KeyError, ValueError, TypeError) as err:
        msg = err.args[0] if err.args else str(err)
        raise click.ClickException(f"{path}: {msg}") from None
    return np.asarray(data.design, dtype=np.float64), data.registry


def parse_tests(values: tuple[str, ...], registry, sep: str) -> list[str]:
    """Split ``--perturbations`` values on commas and check that each parses as a label. Names the
    design never measured are allowed: the report gives them a verdict (never measured)."""
    tests: list[str] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                raise click.UsageError(f"Empty test label in --perturbations {value!r}.")
            tests.append(part)
    for label in tests:
        try:
            registry.unknown(label)
        except ValueError as err:
            raise click.UsageError(f"--perturbations {label!r}: {err}") from None
    return tests


@click.command("check-design", help=_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("data", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--perturbation-key", "-k", default=None, help="obs column with perturbation labels (with DATA).")
@click.option("--control", "-c", default=None, help="Control label (required with DATA; names the zero row of a CSV).")
@click.option("--design", "design_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Design CSV instead of DATA.")
@click.option("--perturbations", "-p", "tests", multiple=True,
              help="Test perturbations, comma-separated; repeatable.")
@click.option("--json", "json_out", default=None, help="Write the JSON report here ('-' for stdout only).")
@click.option("--latent-dim", "-d", type=click.IntRange(min=1), default=None,
              help="Requested latent dimension d (rank < d fails).")
@click.option("--sep", default="+", show_default=True, callback=check_sep,
              help="Separator of combined perturbations (not ',' or ':').")
@click.option("--dose-key", default=None, help="obs column of doses aligned with the components (with DATA).")
@click.option("--context-keys", default=None,
              help="Comma-separated obs columns of the contexts (with DATA), e.g. cell_type: conditions are "
                   "(perturbation, context) pairs such as 'stimulated @ cell_type=CD4T'.")
@click.option("--holdout", default=None,
              help="Comma-separated conditions (with --context-keys: pairs) to drop from the design of DATA, as "
                   "`perturbax fit --holdout` does.")
@click.option("--rtol", type=FiniteFloat(min=0, min_open=True, max=1, max_open=True), default=1e-8,
              show_default=True, help="Rank tolerance relative to the largest singular value.")
@click.option("--residual-rtol", type=FiniteFloat(min=0, max=1, max_open=True), default=1e-6,
              show_default=True, help="A test is covered if its relative residual is at most this.")
@click.option("--max-details", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Tests (from the first) that get coefficients, hull checks and suggestions.")
@where_option()
def check_design(data, perturbation_key, control, design_csv, tests, json_out, latent_dim, sep, dose_key,
                 context_keys, holdout, rtol, residual_rtol, max_details, where):
    from perturbax.cli.fit import split_list

    from perturbax.theory.design import check_design as run_check

    check_outputs({"--json": None if json_out == "-" else json_out}, inputs={"DATA": data, "--design": design_csv})

    if (data is None) == (design_csv is None):
        raise click.UsageError(
            "Give exactly one design: DATA.h5ad (with --perturbation-key and --control) or --design DESIGN.csv."
        )
    if data is not None:
        missing = [o for o, v in (("--perturbation-key", perturbation_key), ("--control", control)) if v is None]
        if missing:
            raise click.UsageError(f"DATA.h5ad needs {' and '.join(missing)}.")
        L, registry = design_from_h5ad(
            data, perturbation_key=perturbation_key, control=control, sep=sep, dose_key=dose_key, where=where,
            context_keys=split_list(context_keys, "context keys", "--context-keys"),
            holdout=split_list(holdout, "held-out conditions", "--holdout"),
        )
    else:
        if perturbation_key is not None or dose_key is not None or where or context_keys or holdout:
            raise click.UsageError(
                "--perturbation-key/--dose-key/--where/--context-keys/--holdout apply to DATA.h5ad, not to --design."
            )
        L, registry = design_from_csv(design_csv, control=control or "control", sep=sep)
    test_labels = parse_tests(tests, registry, sep)
    try:
        report = run_check(
            L, test_labels or None, registry=registry, latent_dim=latent_dim, rtol=rtol,
            residual_rtol=residual_rtol, max_details=max_details,
        )
    except (KeyError, ValueError) as err:
        msg = err.args[0] if err.args else str(err)
        raise click.ClickException(str(msg)) from None
    if json_out == "-":
        click.echo(report.to_json())
        return
    click.echo(report.render())
    if json_out is not None:
        out = Path(json_out)
        try:
            out.write_text(report.to_json() + "\n")
        except OSError as err:
            raise click.ClickException(f"Cannot write {out}: {err}") from None
        click.echo(f"JSON report written to {out}")
