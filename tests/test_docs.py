"""Every ```python block in README.md and docs/*.md runs, in order, in one fresh interpreter per file.

Blocks fenced as ```bash, ```text (or anything but ```python) are illustrative and not run. A failing
block is reported with its file and line. Also checked: docs/api.md is what docs/gen_api.py
generates from the current docstrings, and every image the README links to exists.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)

# Runs the blocks of one page in one namespace; a traceback names the page and line of the block.
_RUNNER = """
import json, sys
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for block in blocks:
    code = compile("\\n" * (block["line"] - 1) + block["source"], block["page"], "exec")
    exec(code, namespace)
    print(f"--- ok: {block['page']} line {block['line']}", flush=True)
"""


def blocks_of_text(text: str, name: str) -> list[dict]:
    """``[{"page", "line", "source"}]`` of the ```python blocks of Markdown text (line = first code line)."""
    out = []
    for m in _FENCE.finditer(text):
        if m.group(1).lower() == "python":
            line = text.count("\n", 0, m.start(2)) + 1
            out.append({"page": name, "line": line, "source": m.group(2)})
    return out


def python_blocks(page: Path) -> list[dict]:
    return blocks_of_text(page.read_text(), str(page.relative_to(ROOT)))


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


def test_fence_parser():
    sample = "x\n```python\na = 1\n```\n\n```bash\nmake test\n```\n```text\nnot run\n```\n```python\nb = a + 1\n```\n"
    blocks = blocks_of_text(sample, "sample.md")
    assert [b["source"] for b in blocks] == ["a = 1\n", "b = a + 1\n"]
    assert [b["line"] for b in blocks] == [3, 13]


def test_readme_has_python_example():
    assert ROOT / "README.md" in PAGES_WITH_CODE


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=[p.name for p in PAGES_WITH_CODE])
def test_doc_code_blocks_run(page, tmp_path, request):
    blocks = python_blocks(page)
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "runner.py").write_text(_RUNNER)
    env = dict(os.environ)
    env.update({"JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg"})
    cache = request.config.cache.mkdir("jax-compilation-cache") if request.config.cache else None
    if cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "blocks.json")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"a python block of {page.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    assert proc.stdout.count("--- ok:") == len(blocks)


def test_api_reference_is_current():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_api.py"), "--check"],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


def test_readme_images_exist():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert links, "the README shows the rendered plots from docs/"
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, f"README links to missing images: {missing}"


def test_doc_links_resolve():
    """Relative links between the pages (e.g. docs/concepts.md) point to files that exist."""
    for page in PAGES:
        for link in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in link or link.startswith("mailto:"):
                continue
            target = (page.parent / link).resolve()
            assert target.exists(), f"{page.relative_to(ROOT)} links to missing {link}"
