"""Execute every notebook in ``notebooks/`` with tiny settings and fail on any cell error; with
``-m slow``, run each with its default parameters and check the statements its prose makes.

Each notebook has one code cell tagged ``parameters`` (``STEPS``, ``N_CELLS``, ``FAST``, ...). The
test inserts a cell right after it that overrides those values (papermill style), then runs the
notebook top to bottom in a fresh ``python3`` kernel of this interpreter through nbclient. The
kernel shares the suite's persistent XLA compilation cache, so a second run compiles little.

Each notebook ends with a summary computed from its run: ``SUMMARY`` (its key numbers) and
``CLAIMS`` (``{statement: holds in this run}``), whose statements are the ones its introduction
makes under "What works and what does not". The tiny run checks that structure; the slow run checks
that every statement holds with the default parameters.

The notebooks in the repository carry no outputs; this is checked as well.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = {
    "01_quickstart",
    "02_custom_model_variant",
    "03_identifiability_design",
    "04_latent_dynamics",
    "05_real_data_norman",
}

#: What the test injects after the ``parameters`` cell (a notebook uses the names it defines).
TINY = "STEPS = 50\nN_CELLS = 40\nFAST = True\nFOLDS = (0,)\n"

#: Appended to a run: the notebook's statements and whether they hold, as one line of JSON.
REPORT = (
    "import json as _json\n"
    "print('PERTURBAX_CLAIMS ' + _json.dumps({str(k): bool(v) for k, v in CLAIMS.items()}))\n"
    "print('PERTURBAX_SUMMARY ' + _json.dumps({str(k): float(v) for k, v in dict(SUMMARY).items()}))\n"
)

#: Seconds one cell may run before the test fails (the whole notebook takes far less).
CELL_TIMEOUT = 300
#: The same with the default parameters (05's cell fitting all five folds runs for minutes).
SLOW_CELL_TIMEOUT = 3600


def _kernel_name() -> str:
    """``python3`` if it resolves to a kernel of this interpreter, else install one into ``sys.prefix``."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm = KernelSpecManager()
    try:
        spec = ksm.get_kernel_spec("python3")
        exe = spec.argv[0]
        # jupyter_client runs a bare "python"/"python3" as sys.executable.
        if exe in {"python", "python3", f"python{sys.version_info[0]}"} or Path(exe).resolve() == Path(
            sys.executable
        ).resolve():
            return "python3"
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    install(prefix=sys.prefix, kernel_name="perturbax-test", display_name="perturbax (test)")
    return "perturbax-test"


def _with_parameters(nb, text: str):
    idx = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(idx) == 1, "a notebook needs exactly one code cell tagged 'parameters'"
    cell = nbformat.v4.new_code_cell(text)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx[0] + 1, cell)
    return nb


@pytest.fixture(scope="module")
def kernel_env(request):
    """Environment of the kernels: CPU, the suite's XLA cache, headless matplotlib (inline)."""
    cache = getattr(request.config, "cache", None)  # (absent under -p no:cacheprovider)
    cache = cache.mkdir("jax-compilation-cache") if cache is not None else None
    env = {"JAX_PLATFORMS": "cpu", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    if cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return env


def test_all_notebooks_present():
    assert EXPECTED <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: commit notebooks without outputs"


def _execute(path: Path, parameters: str, kernel_env, monkeypatch, tmp_path, *, report: bool = False,
             timeout: int = CELL_TIMEOUT):
    for k, v in kernel_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, as in Jupyter
    nb = _with_parameters(nbformat.read(path, as_version=4), parameters)
    if report:
        nb.cells.append(nbformat.v4.new_code_cell(REPORT))
    client = nbclient.NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=_kernel_name(),
        resources={"metadata": {"path": str(tmp_path)}},
    )
    t0 = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}")
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
    # Any error output (e.g. from a cell that printed a traceback) counts as a failure too, and so
    # does a warning a user would see on import (numpyro's tqdm.auto without ipywidgets).
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"{path.name}: {out.get('ename')}: {out.get('evalue')}"
            assert "TqdmWarning" not in out.get("text", ""), f"{path.name}: {out['text'].strip()}"
    return nb


def _stdout(nb) -> str:
    return "".join(out.get("text", "") for c in nb.cells for out in c.get("outputs", []) if out.get("name") == "stdout")


def _report(nb, key: str) -> dict:
    lines = [ln for ln in _stdout(nb).splitlines() if ln.startswith(key + " ")]
    assert len(lines) == 1, f"the notebook printed no {key} line"
    return json.loads(lines[0][len(key) + 1 :])


def _check_claims_are_stated(path: Path, nb) -> dict:
    """``CLAIMS`` is non-empty and each statement appears verbatim in a markdown cell (the
    introduction), so the checked statements are the ones a reader sees."""
    claims = _report(nb, "PERTURBAX_CLAIMS")
    assert claims, f"{path.name}: CLAIMS is empty"
    prose = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
    missing = [k for k in claims if k not in prose]
    assert not missing, f"{path.name}: statements checked but not written in the notebook's text: {missing}"
    return claims


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_env, monkeypatch, tmp_path):
    if path.stem == "05_real_data_norman" and not _norman_data_available():
        _execute(path, TINY, kernel_env, monkeypatch, tmp_path)
        return
    nb = _execute(path, TINY, kernel_env, monkeypatch, tmp_path, report=True)
    _check_claims_are_stated(path, nb)
    assert _report(nb, "PERTURBAX_SUMMARY"), f"{path.name}: SUMMARY is empty"


def _norman_data_available() -> bool:
    from perturbax.data.datasets import NORMAN19_FILE, find_data_file

    try:
        find_data_file(NORMAN19_FILE, None)
    except FileNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_statements_hold_with_default_parameters(path, kernel_env, monkeypatch, tmp_path):
    """Run with the defaults a user gets: every statement of "What works and what does not" holds."""
    if path.stem == "05_real_data_norman" and not _norman_data_available():
        pytest.skip("Norman 2019 data not found (see the notebook for where to get it)")
    nb = _execute(path, "", kernel_env, monkeypatch, tmp_path, report=True, timeout=SLOW_CELL_TIMEOUT)
    claims = _check_claims_are_stated(path, nb)
    for key, value in _report(nb, "PERTURBAX_SUMMARY").items():
        print(f"{path.stem} | {key} | {value:.3f}")
    for key, ok in claims.items():
        print(f"{path.stem} | {'holds' if ok else 'DOES NOT HOLD'} | {key}")
    failed = [k for k, ok in claims.items() if not ok]
    assert not failed, f"{path.name}: with the default parameters these statements of its text do not hold: {failed}"


def test_norman_notebook_skips_without_data(kernel_env, monkeypatch, tmp_path):
    """Without the data file the real-data notebook says where to get it and runs to the end."""
    nb = _execute(
        ROOT / "notebooks" / "05_real_data_norman.ipynb",
        TINY + f"DATA_PATH = {str(tmp_path / 'no_such_folder')!r}\n",
        kernel_env,
        monkeypatch,
        tmp_path,
    )
    text = _stdout(nb)
    assert "not found" in text and "perturbench" in text.lower()

