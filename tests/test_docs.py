"""Every ```python block in README.md and docs/*.md runs, in order, in one fresh interpreter per file.

Blocks fenced as ```bash, ```text (or anything but ```python) are illustrative and not run. A failing
block is reported with its file and line. Also checked: docs/api.md is what docs/gen_api.py
generates from the current docstrings, every image the README links to exists, and every section of
docs/benchmarks.md is stamped with the commit and script hashes it was produced from, and its
scripts have not changed since unless the section says it is stale (benchmarks/_docs.py).
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
sys.path.insert(0, str(ROOT / "benchmarks"))
import _docs  # noqa: E402  (benchmarks/_docs.py: the section writer and its checks)

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


def test_benchmark_sections_are_stamped_and_current():
    """Each section of docs/benchmarks.md records the commit and script hashes it was produced from;
    a script changed since its numbers fails unless the section says it is stale (issue 16 item 17)."""
    text = _docs.DOC.read_text()
    found = _docs.sections(text)
    assert {"baselines", "speed-additive", "theory-coverage", "pdae-sim", "norman-models", "dynamics"} <= set(found)
    assert _docs.check_sections(text) == []
    # no section outside the markers: every heading below the title lies in a stamped section
    outside = _docs._SECTION.sub("", text)
    assert re.findall(r"^#{2,} .*$", outside, re.MULTILINE) == []
    commits = {sec["stamps"][0]["commit"] for sec in found.values()}
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--git-dir"], capture_output=True)
    if git.returncode == 0:  # a checkout with history: the stamped commits exist
        for commit in commits:
            probe = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"])
            assert probe.returncode == 0, f"stamped commit {commit} is not in the history"


def test_section_check_catches_a_changed_script(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text("print(1)\n")
    doc = tmp_path / "benchmarks.md"
    _docs.write_section("demo", "## Demo\n\n| a |\n|---|\n| 1 |", doc, sources=[script], root=tmp_path)
    text = doc.read_text()
    (st,) = _docs.sections(text)["demo"]["stamps"]
    assert st["section"] == "demo" and st["sources"] == {"bench.py": _docs.source_digest(script)}
    assert _docs.check_sections(text, root=tmp_path) == []
    script.write_text("print(2)\n")  # the script changed after its numbers
    (problem,) = _docs.check_sections(doc.read_text(), root=tmp_path)
    assert "bench.py changed since its numbers" in problem
    _docs.mark_stale("demo", "old", doc)  # a stale line must say what it predates
    assert "stale line must say" in _docs.check_sections(doc.read_text(), root=tmp_path)[0]
    _docs.mark_stale("demo", "numbers from before the change of bench.py to print 2.", doc)
    text = doc.read_text()
    assert "> **Stale:** numbers from before" in text and text.count("**Stale:**") == 1
    assert _docs.check_sections(text, root=tmp_path) == []
    # regenerating the section stamps the new hash and drops the stale line
    _docs.write_section("demo", "## Demo\n\n| a |\n|---|\n| 2 |", doc, sources=[script], root=tmp_path)
    text = doc.read_text()
    assert _docs.STALE not in text and _docs.check_sections(text, root=tmp_path) == []
    # a section rebuilt from kept results names the commit of the run that produced them
    _docs.write_section("demo", "## Demo", doc, sources=[script], root=tmp_path,
                        produced={"commit": "23799d5", "worktree": "clean"})
    assert _docs.sections(doc.read_text())["demo"]["stamps"][0]["commit"] == "23799d5"
    _docs.write_section("demo", "## Demo", doc, sources=[script], root=tmp_path, produced={})  # not recorded
    assert "malformed stamp" in _docs.check_sections(doc.read_text(), root=tmp_path)[0]
    assert _docs.common_provenance([{"provenance": {"commit": "abc1234", "worktree": "clean"}}, {}])["commit"] == "unknown"
    # a section without a stamp is reported
    bare = text.replace(_docs._STAMP.search(text).group(0) + "\n", "")
    assert "has 0 stamps" in _docs.check_sections(bare, root=tmp_path)[0]


def test_readme_quotes_the_pdae_sim_errors_inside_and_outside_the_hull():
    """The README's "in the span means identified, not accurate" paragraph quotes the measured errors
    of docs/benchmarks.md (pdae-sim, by group); a rerun that changes them must update the README."""
    body = _docs.sections(_docs.DOC.read_text())["pdae-sim"]["body"]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in ("dose-in-hull", "double", "dose-outside-hull"):
            rows[(cells[0], cells[1])] = (float(cells[3]), cells[4])
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "identified, not accurate" in readme
    for group in ("dose-in-hull", "double", "dose-outside-hull"):
        energy, coverage = rows[(group, "model_energy")]
        additive, _ = rows[(group, "additive")]
        for quoted in (f"{energy:.2g}", f"{float(coverage):.2f}", f"{additive:.2g}"):
            assert quoted in readme, f"README does not quote the pdae-sim {group} value {quoted}"
