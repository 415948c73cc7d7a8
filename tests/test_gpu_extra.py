"""The GPU install line of the README names extras that pyproject.toml defines, each the CUDA build
of jax (issue 21; that `pip install --dry-run -e ".[cuda12]"` resolves needs the network: see
docs/scaling.md)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_gpu_extras_exist_and_pull_the_cuda_build_of_jax():
    readme = (ROOT / "README.md").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = set(re.findall(r'\.\[(cuda\d+)\]', readme)) | set(re.findall(r"\(or `(cuda\d+)`\)", readme))
    assert "cuda12" in named
    for extra in named:
        assert extras.get(extra) == [f"jax[{extra}]"], (extra, extras.get(extra))
