"""Execute every notebook in ``notebooks/`` with tiny settings and fail on any cell error.

Each notebook has one code cell tagged ``parameters`` (``STEPS``, ``N_CELLS``, ``FAST``, ...). The
test inserts a cell right after it that overrides those values (papermill style), then runs the
notebook top to bottom in a fresh ``python3`` kernel of this interpreter through nbclient. The
kernel shares the suite's persistent XLA compilation cache, so a second run compiles little.

The notebooks in the repository carry no outputs; this is checked as well.
"""

from __future__ import annotations

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
TINY = "STEPS = 50\nN_CELLS = 40\nFAST = True\n"

#: Seconds one cell may run before the test fails (the whole notebook takes far less).
CELL_TIMEOUT = 300


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
    cache = request.config.cache.mkdir("jax-compilation-cache") if request.config.cache else None
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


def _execute(path: Path, parameters: str, kernel_env, monkeypatch, tmp_path):
    for k, v in kernel_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, as in Jupyter
    nb = _with_parameters(nbformat.read(path, as_version=4), parameters)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name=_kernel_name(),
        resources={"metadata": {"path": str(tmp_path)}},
    )
    t0 = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}")
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
    # Any error output (e.g. from a cell that printed a traceback) counts as a failure too.
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"{path.name}: {out.get('ename')}: {out.get('evalue')}"
    return nb


def _stdout(nb) -> str:
    return "".join(out.get("text", "") for c in nb.cells for out in c.get("outputs", []) if out.get("name") == "stdout")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_env, monkeypatch, tmp_path):
    _execute(path, TINY, kernel_env, monkeypatch, tmp_path)


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

