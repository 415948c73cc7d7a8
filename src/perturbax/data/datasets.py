"""Loaders for the real data sets used by the evaluation protocols (DESIGN section 6).

The files are not shipped with the package. They are looked up in this order:

1. the ``path`` argument (a file or the folder that holds it);
2. the folder in the environment variable ``PERTURBAX_DATA_DIR``;
3. ``shared/data/`` next to the project checkout: every parent folder of the installed package
   and of the current working directory is tried (``<parent>/shared/data/<file>``), which finds
   ``../shared/data/`` relative to the repository root.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "NORMAN19_FILE",
    "NORMAN19_PERTURBATION_KEY",
    "NORMAN19_CONTROL",
    "find_data_file",
    "load_norman19",
]

NORMAN19_FILE = "perturbench_devel_norman19_mcfaline23.h5ad"
NORMAN19_PERTURBATION_KEY = "condition"
NORMAN19_CONTROL = "control"

_NORMAN19_SOURCE = (
    "altoslabs/perturbench @ d357dfae3b50968e800e9f5f273ff145080ae67c, "
    "src/perturbench/data/resources/devel.h5ad (BSD-3-Clause), saved as "
    f"{NORMAN19_FILE}; see shared/data/PROVENANCE.md"
)


def _candidates(filename: str) -> list[Path]:
    out: list[Path] = []
    env = os.environ.get("PERTURBAX_DATA_DIR")
    if env:
        out.append(Path(env).expanduser() / filename)
    starts = [Path(__file__).resolve().parent, Path.cwd().resolve()]
    for start in starts:
        for parent in [start, *start.parents]:
            cand = parent / "shared" / "data" / filename
            if cand not in out:
                out.append(cand)
    return out


def find_data_file(filename: str, path: str | os.PathLike | None = None, *, source: str = "") -> Path:
    """Locate ``filename`` (see the module docstring for the search order).

    Raises ``FileNotFoundError`` listing where it looked and where to get the file.
    """
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / filename
        if p.is_file():
            return p
        raise FileNotFoundError(
            f"No file at {str(p)!r}. Pass the path of {filename} (or the folder holding it)"
            + (f"; it comes from {source}." if source else ".")
        )
    tried = _candidates(filename)
    for cand in tried:
        if cand.is_file():
            return cand
    shown = ", ".join(str(c.parent) for c in tried[:4])
    raise FileNotFoundError(
        f"Could not find {filename}. Looked in $PERTURBAX_DATA_DIR and in shared/data/ above the "
        f"package and the working directory (e.g. {shown}, ...). Get it from {source or 'its source'} "
        f"and pass path=..., or set PERTURBAX_DATA_DIR to the folder holding it."
    )


def load_norman19(path: str | os.PathLike | None = None):
    """Norman et al. 2019 (K562 CRISPRa) cells of the PerturBench development file.

    Returns an AnnData (5,961 -> ~3,300 cells x 500 HVGs, log1p-normalised ``X``) with only the
    cells whose ``obs["dataset"] == "norman19"``: control + 18 singles + 15 doubles, ~100 cells
    each. Use perturbation key :data:`NORMAN19_PERTURBATION_KEY` (``"condition"``) and control
    label :data:`NORMAN19_CONTROL` (``"control"``)::

        adata = load_norman19()
        data = from_anndata(adata, "condition", "control")
    """
    import anndata as ad

    from perturbax.data.io import select_where

    file = find_data_file(NORMAN19_FILE, path, source=_NORMAN19_SOURCE)
    adata = ad.read_h5ad(file)
    if "dataset" not in adata.obs.columns:
        raise ValueError(
            f"{file} has no obs['dataset'] column; it is not the PerturBench development file "
            f"({_NORMAN19_SOURCE})."
        )
    try:
        out = select_where(adata, {"dataset": ["norman19"]})
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None
    out.uns["perturbax_source"] = {"file": file.name, "subset": "obs['dataset'] == 'norman19'"}
    return out
