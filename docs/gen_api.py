"""Write docs/api.md from the docstrings of the public API (``__all__`` of each subpackage).

    .venv/bin/python docs/gen_api.py           # rewrite docs/api.md
    .venv/bin/python docs/gen_api.py --check   # exit 1 if docs/api.md is out of date

The page lists, per subpackage, the subpackage's docstring and every public name with its signature
and docstring (verbatim, in ``text`` blocks, so NumPy-style sections survive). Only the intro below
is hand-written; edit docstrings in ``src/`` and re-run this script instead of editing api.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent / "api.md"

SUBPACKAGES = ("data", "models", "inference", "theory", "metrics", "baselines", "protocols", "plotting")

INTRO = """\
# API reference

Generated from the docstrings by `docs/gen_api.py` (do not edit by hand: change the docstring and
run `.venv/bin/python docs/gen_api.py`; `tests/test_docs.py` checks that this page is current).
Concepts: [concepts.md](concepts.md). Worked examples: the notebooks in `notebooks/`.

| subpackage | what it is for |
|---|---|
| [`perturbax.data`](#perturbaxdata) | AnnData in and out, labels, splits, simulators, data sets |
| [`perturbax.models`](#perturbaxmodels) | NumPyro model functions and the blocks to build your own |
| [`perturbax.inference`](#perturbaxinference) | `fit` (ELBO / energy score), `predict`, save/load, ArviZ |
| [`perturbax.theory`](#perturbaxtheory) | identifiability and design checks (pure functions) |
| [`perturbax.metrics`](#perturbaxmetrics) | distances between cell sets, gene-level metrics, calibration |
| [`perturbax.baselines`](#perturbaxbaselines) | control, pooled-mean, additive and linear baselines |
| [`perturbax.protocols`](#perturbaxprotocols) | the evaluation protocols shared by demo, benchmarks and tests |
| [`perturbax.plotting`](#perturbaxplotting) | matplotlib plots of predictions, intervals and training |

Every public name is importable from its subpackage, e.g.:

```python
from perturbax.data import from_anndata, simulate_additive_shift, split_from_column
from perturbax.inference import fit, predict
from perturbax.models import AdditiveShiftConfig, additive_shift_model
from perturbax.theory import check_design, suggest_additions
from perturbax.metrics import evaluate_conditions
from perturbax.baselines import standard_baselines
from perturbax.plotting import plot_predicted_vs_observed
```
"""

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _clean(text: str) -> str:
    return _ADDRESS.sub("", text)


def _unquote(annotation):
    """String annotations (``from __future__ import annotations``) shown without quotes."""
    if annotation is inspect.Parameter.empty:
        return annotation
    if isinstance(annotation, str):
        return _Bare(annotation)
    if hasattr(annotation, "__forward_arg__"):  # typing.ForwardRef (e.g. NamedTuple fields)
        return _Bare(annotation.__forward_arg__)
    return _Bare(inspect.formatannotation(annotation))


class _Bare(str):
    def __repr__(self) -> str:
        return str(self)


def _signature(name: str, obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    params = [p.replace(annotation=_unquote(p.annotation)) for p in sig.parameters.values()]
    sig = sig.replace(parameters=params, return_annotation=_unquote(sig.return_annotation))
    return _clean(f"{name}{sig}")


def _doc(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip()


def _split_doc(doc: str) -> tuple[str, str]:
    """First paragraph (prose) and the rest (kept verbatim)."""
    parts = doc.split("\n\n", 1)
    return parts[0].replace("\n", " ").strip(), (parts[1].strip() if len(parts) > 1 else "")


def _text_block(text: str) -> list[str]:
    return ["```text", text.replace("```", "'''"), "```", ""] if text else []


def _members(cls) -> list[tuple[str, str]]:
    """Public methods and properties defined on the class itself: (signature, first line of doc)."""
    out = []
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for name, attr in cls.__dict__.items():
        if name.startswith("_") or name in fields:
            continue
        if isinstance(attr, property):
            doc = (inspect.getdoc(attr) or "").split("\n\n")[0].replace("\n", " ")
            out.append((f"{name} (property)", doc))
        elif isinstance(attr, (staticmethod, classmethod)) or inspect.isfunction(attr):
            fn = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
            doc = (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
            sig = _signature(name, fn)
            out.append((sig.replace("(self, ", "(").replace("(self)", "()").replace("(cls, ", "(").replace("(cls)", "()"), doc))
    return out


def _entry(qual: str, name: str, obj) -> list[str]:
    lines = [f"### `{name}`", ""]
    if not callable(obj):
        value = _clean(repr(obj))
        if len(value) > 300:
            value = value[:300] + " ..."
        return lines + ["```text", f"{qual}.{name} = {value}", "```", ""]
    kind = "class" if inspect.isclass(obj) else "function"
    lines += ["```text", f"{kind} {qual}.{_signature(name, obj)}", "```", ""]
    summary, rest = _split_doc(_doc(obj))
    if summary:
        lines += [summary, ""]
    lines += _text_block(rest)
    if inspect.isclass(obj):
        members = _members(obj)
        if members:
            lines += ["Members:", ""]
            lines += [f"- `{sig}`" + (f": {doc}" if doc else "") for sig, doc in members]
            lines += [""]
    return lines


def render() -> str:
    lines = [INTRO]
    for sub in SUBPACKAGES:
        qual = f"perturbax.{sub}"
        mod = importlib.import_module(qual)
        lines += [f"## `{qual}`", ""]
        doc = inspect.getdoc(mod) or ""
        lines += _text_block(doc)
        for name in sorted(getattr(mod, "__all__", ()), key=str.lower):
            lines += _entry(qual, name, getattr(mod, name))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is out of date; run: .venv/bin/python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
