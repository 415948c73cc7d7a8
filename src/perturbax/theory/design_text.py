"""Text of the design check: the messages of :func:`perturbax.theory.check_design` and the
rendering of its report for a terminal. Internal to :mod:`perturbax.theory`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from perturbax.theory.report import fmt, join_names

__all__ = [
    "covered_message",
    "format_combination",
    "ill_conditioned_message",
    "render_report",
    "uncovered_message",
    "unmeasured_message",
]


def render_report(report, max_tests: int = 50) -> str:
    """The report as text: a verdict per test, then the design as a whole, then the summary."""
    lines = [f"Design check: {report.status.upper()}"]
    if report.tests:
        n_ok, m = report.n_identified_tests, len(report.tests)
        head = f"{n_ok} of {m} test perturbation{'s' if m > 1 else ''} {'is' if m == 1 else 'are'} identified"
        if n_ok < m:
            bad = report.uncovered
            head += f"; {len(bad)} {'is' if len(bad) == 1 else 'are'} not: {join_names(bad, 8)}"
        lines[0] += f" -- {head}."
        lines.append("Tests (one verdict each; '=' gives the simplest combination of training conditions):")
        width = min(40, max(len(t.label) for t in report.tests))
        pad = " " * (2 + 14 + 2 + width + 2)
        for t in report.tests[:max_tests]:
            if t.covered:
                if t.equation is None:
                    text = t.message
                else:
                    text = "measured in training" if t.measured else f"= {t.equation}"
                    hull = {True: "inside the hull of the training conditions",
                            False: "outside the hull of the training conditions: extrapolation",
                            None: ""}[t.in_convex_hull]
                    if getattr(t, "context_transfer", False):
                        hull = ("never measured: a context transfer, identified only under the additive model "
                                "(the perturbation's latent shift is the same in every context)")
                    flag = f"; ILL-CONDITIONED (||c||_2 {fmt(t.coefficient_norm)})" if t.ill_conditioned else ""
                    if hull or flag:
                        text += f"  [{hull}{flag}]".replace("[; ", "[")
                lines.append(f"  {'identified':<14}  {t.label.ljust(width)}  {text}")
                if (t.coefficients is not None and t.simplest is not None and not t.measured
                        and not _same(t.coefficients, t.simplest)):
                    coefs = ", ".join(f"{k} {v:.3g}" for k, v in list(t.coefficients.items())[:6])
                    more = ", ..." if len(t.coefficients) > 6 else ""
                    lines.append(f"{pad}minimum-norm weights (||c||_2 {fmt(t.coefficient_norm)}): {coefs}{more}")
            else:
                lines.append(f"  {'NOT identified':<14}  {t.label.ljust(width)}  {_after_label(t.message, t.label)}")
        if len(report.tests) > max_tests:
            lines.append(f"  ... ({len(report.tests) - max_tests} more tests)")
    lines.append("Design as a whole (the training conditions, whatever the tests):")
    ref = "measured" if report.control_present else "NOT measured"
    lines.append(
        f"  {report.n_rows} training rows ({report.n_distinct_rows} distinct) over {report.K_measured} elementary "
        f"perturbations; reference {report.reference!r} ({ref})"
    )
    margin = f"tolerance {fmt(report.tolerance)}"
    if report.smallest_retained is not None:
        margin += f", smallest kept singular value {fmt(report.smallest_retained)}"
    if report.largest_dropped is not None:
        margin += f", largest dropped {fmt(report.largest_dropped)}"
    if report.n_eliminated:
        margin += f"; {report.n_eliminated} found from single-perturbation rows (min dose {fmt(report.min_pivot)})"
    if report.full_rank:
        lines.append(f"  rank {report.rank} of {report.K_measured}: full rank, every elementary perturbation is "
                     f"identified on its own [{report.method}: {margin}]")
    else:
        unident = report.unidentified_elementary
        lines.append(f"  rank {report.rank} of {report.K_measured} [{report.method}: {margin}]")
        lines.append(f"  identified on their own ({len(report.identified_elementary)}): "
                     f"{join_names(report.identified_elementary)}")
        lines.append(f"  not identified on their own ({len(unident)}; measured only in combinations that "
                     f"do not separate them): {join_names(unident)}")
        if report.design_additions:
            alone = "" if np.any(report.design.reference) else " alone"
            lines.append(f"  to identify every one, add: {join_names(report.design_additions)}{alone}")
    if report.unmeasured:
        lines.append(f"  named by tests but never measured: {join_names(report.unmeasured)}")
    ill_elem = report.ill_conditioned_elementary
    if ill_elem:
        norms = dict(zip(report.names, report.elementary_coefficient_norms))
        listed = ", ".join(f"{n} (||c||_2 {fmt(norms[n])})" for n in ill_elem[:8])
        more = f", ... ({len(ill_elem) - 8} more)" if len(ill_elem) > 8 else ""
        lines.append(f"  ill-conditioned at unit dose (reached only through much smaller or cancelling labels): "
                     f"{listed}{more}")
    if report.latent_dim is not None:
        ok = "ok" if report.latent_dim_ok else "TOO LOW"
        lines.append(f"  latent dimension {report.latent_dim}: rank {report.rank} {ok}")
    lines.append(f"Summary: {report.message}")
    return "\n".join(lines)


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-9) for k in a)


def _after_label(message: str, label: str) -> str:
    """A test's message without its leading ``"<label> is not identified: "``."""
    for lead in (f"{label} is not identifiable: ", f"{label} is not identified: "):
        if message.startswith(lead):
            return message[len(lead):]
    return message


def ill_conditioned_message(
    label: str, c: np.ndarray, keys: Sequence[str], norm: float, limit: float
) -> str:
    k = int(np.argmax(np.abs(c)))
    return (
        f"It is ill-conditioned: its coefficients have norm ||c||_2 = {fmt(norm)} (above {fmt(limit)}; "
        f"largest {fmt(float(c[k]))} on {keys[k]}), so its prediction amplifies the estimation error "
        f"of a measured condition {fmt(norm)}-fold -- it is reached only through training labels much "
        f"smaller than it or nearly cancelling each other; measure {label} or labels of comparable size."
    )


def _term(c: float, label: str, sep: str, first: bool, bracket: bool) -> str:
    mag = abs(c)
    wrapped = label.startswith("(") and label.endswith(")")
    body = label
    if sep in label and not wrapped and (bracket or not math.isclose(mag, 1.0, rel_tol=1e-9)):
        body = f"({label})"
    if not math.isclose(mag, 1.0, rel_tol=1e-9):
        body = f"{fmt(mag)}*{body}"
    if first:
        return ("-" if c < 0 else "") + body
    return ("- " if c < 0 else "+ ") + body


def format_combination(coefs: dict[str, float], *, sep: str = "+", reference: str | None = None) -> str:
    """``{"KLF1": 1, "SGK1": 1}`` -> ``"KLF1 + SGK1"`` (``"2*(A+B) - B"`` for other coefficients;
    with a non-control ``reference`` R, the terms are differences ``(A - R)``)."""
    if not coefs:
        return reference or "the reference"
    items = sorted(coefs.items(), key=lambda kv: (kv[1] < 0, -abs(kv[1])))
    parts = []
    for i, (lab, c) in enumerate(items):
        if reference is not None:
            lab = f"({lab} - {reference})"
        parts.append(_term(c, lab, sep, i == 0, len(items) > 1))
    text = " ".join(parts)
    return text if reference is None else f"{reference} + " + (text if not text.startswith("-") else f"({text})")


def covered_message(label: str, equation: str, inside: bool | None, measured: bool, lp_max_rows: int) -> str:
    head = (
        f"{label} is identified: it is a measured training condition"
        if measured
        else f"{label} is identified: {label} = {equation}"
    )
    if inside is True:
        return head + " (inside the convex hull of the training labels: interpolation)."
    if inside is False:
        return (
            head + "; this lies outside the convex hull of the training labels, so the model must "
            "extrapolate beyond the measured latent shifts -- expect larger errors."
        )
    return (
        head + f"; whether it lies inside the convex hull was not determined (more than {lp_max_rows} "
        f"distinct training labels, or the linear program did not finish)."
    )


def context_transfer_message(label: str, equation: str) -> str:
    """A (perturbation, context) pair never measured, identified through other contexts."""
    return (
        f"{label} was never measured; it is identified only under the additive model ({label} = {equation}): "
        f"the perturbation's latent shift, measured in other contexts, is added to this context's "
        f"(z = z_base + W l + V c) -- a context transfer that assumes the perturbation acts the same way in "
        f"latent space in every context (extrapolation, not interpolation; the decoder still makes the "
        f"gene-level response context-specific)."
    )


def unmeasured_message(
    label: str, never: Sequence[str], partners: Sequence[str], sep: str, in_test: Sequence[str],
    hints: dict[str, list[str]],
) -> str:
    """``partners``: identified elementary perturbations, to combine with a never-measured one."""
    named = ", ".join(n + (f" (did you mean {' or '.join(hints[n])}?)" if hints.get(n) else "") for n in never)
    verb = "was" if len(never) == 1 else "were"
    ok = set(partners)
    partner = next((m for m in in_test if m in ok), partners[0] if partners else None)
    example = f" (e.g. {sep.join([never[0], partner])})" if partner else ""
    what = "it" if len(never) == 1 else "each"
    return (
        f"{label} is not identifiable: {named} {verb} never measured (no training condition contains "
        f"{'it' if len(never) == 1 else 'them'}); measure {what} alone, or in a combination with measured "
        f"perturbations{example}."
    )


def uncovered_message(
    label: str,
    rel: float,
    missing: dict[str, float],
    additions: Sequence[str],
    control_reference: bool,
) -> str:
    if not missing:
        return f"{label} is not identified (relative residual {fmt(rel)})."
    names = list(missing)
    if len(names) == 1:
        why = f"the effect of {names[0]} is never separated from the rest of the design"
    else:
        why = f"the design never separates {join_names(names, 6)} from each other"
    text = f"{label} is not identified: {why}"
    if additions:
        how = f"{join_names(additions)} alone" if control_reference else join_names(additions)
        text += f"; add {how}"
    return text + "."
