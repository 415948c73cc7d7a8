"""Every ```python block in README.md and docs/*.md runs, in order, in one fresh interpreter per file.

Blocks fenced as ```bash, ```text (or anything but ```python) are illustrative and not run. A failing
block is reported with its file and line. Also checked: docs/api.md is what docs/gen_api.py
generates from the current docstrings, every image the README links to exists, every section of the
benchmark pages (docs/benchmarks/*.md) is stamped with the commit, script hashes and library digest it
was produced from and neither changed since unless the section says it is stale (benchmarks/_docs.py),
docs/results.md is what benchmarks/results.py builds from those pages, and `make benchmarks`
(benchmarks/regenerate.py) reruns the script of every section.
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
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs" / "benchmarks").glob("*.md"))]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _docs  # noqa: E402  (benchmarks/_docs.py: the section writer and its checks)
import regenerate  # noqa: E402  (benchmarks/regenerate.py: what `make benchmarks` runs)
import results  # noqa: E402  (benchmarks/results.py: docs/results.md from the pages)

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
    """Each section of the benchmark pages records the commit, script hashes and library digest it was
    produced from; a script or library module changed since its numbers fails unless the section says
    it is stale (issue 16 item 17, issue 20)."""
    found = _docs.all_sections()
    assert {"baselines", "speed-additive", "theory-coverage", "pdae-sim", "norman-models", "dynamics"} <= set(found)
    assert _docs.check_pages() == []
    assert not _docs.sections(_docs.DOC.read_text()), "docs/benchmarks.md is the index; sections live on their pages"
    for page in _docs.benchmark_pages()[1:]:  # no text outside the markers below a page's title and intro
        outside = _docs._SECTION.sub("", page.read_text())
        assert re.findall(r"^#{2,} .*$", outside, re.MULTILINE) == [], page.name
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
    # a section rebuilt from kept results names the commit and library of the run that produced them
    run = {"commit": "23799d5", "worktree": "clean", "library": _docs.library_digest(tmp_path)}
    _docs.write_section("demo", "## Demo", doc, sources=[script], root=tmp_path, produced=run)
    assert _docs.sections(doc.read_text())["demo"]["stamps"][0]["commit"] == "23799d5"
    assert _docs.check_sections(doc.read_text(), root=tmp_path) == []
    _docs.write_section("demo", "## Demo", doc, sources=[script], root=tmp_path, produced={})  # not recorded
    assert "malformed stamp" in _docs.check_sections(doc.read_text(), root=tmp_path)[0]
    _docs.write_section("demo", "## Demo", doc, sources=[script], root=tmp_path, produced={**run, "library": ""})
    assert "no digest of the library" in _docs.check_sections(doc.read_text(), root=tmp_path)[0]
    assert _docs.common_provenance([{"provenance": run}, {}])["commit"] == "unknown"
    assert _docs.common_provenance([{"provenance": run}, {"provenance": run}]) == run
    # a section without a stamp is reported
    bare = text.replace(_docs._STAMP.search(text).group(0) + "\n", "")
    assert "has 0 stamps" in _docs.check_sections(bare, root=tmp_path)[0]


def test_results_of_one_library_over_several_commits_take_the_latest(tmp_path):
    """A run split over sessions (same library digest, commits in one line of history) is stamped
    with its latest commit; commits git cannot order, or other libraries, stay unknown."""
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], capture_output=True, text=True,  # noqa: E731
                                    check=True).stdout.strip()
    git("init", "-q")
    commits = []
    for i in range(2):
        (tmp_path / "f.txt").write_text(str(i))
        git("add", "f.txt")
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", str(i))
        commits.append(git("rev-parse", "--short=7", "HEAD"))
    rec = lambda c, lib="L": {"provenance": {"commit": c, "worktree": "clean", "library": lib}}  # noqa: E731
    both = [rec(commits[1]), rec(commits[0])]
    assert _docs.common_provenance(both, root=tmp_path)["commit"] == commits[1]
    assert _docs.common_provenance([rec(commits[0]), rec("0000000")], root=tmp_path)["commit"] == "unknown"
    assert _docs.common_provenance([rec(commits[0]), rec(commits[1], "M")], root=tmp_path)["commit"] == "unknown"


def test_section_check_catches_a_changed_library(tmp_path):
    """A headline's section is older than the code it measures: a change of the code of a library
    module (not of its docstrings or comments, nor of cli/ or plotting/) after the numbers fails the
    check until the section is rerun or marked stale."""
    lib = tmp_path / "src" / "perturbax"
    (lib / "cli").mkdir(parents=True)
    (lib / "fit.py").write_text('"""Fit."""\n\n\ndef fit(x):\n    """Docs."""\n    return x + 1  # one\n')
    (lib / "cli" / "main.py").write_text("print('hi')\n")
    script = tmp_path / "bench.py"
    script.write_text("print(1)\n")
    doc = tmp_path / "benchmarks.md"
    _docs.write_section("demo", "## Demo", doc, sources=[script], root=tmp_path)
    assert _docs.library_files(tmp_path) == ["src/perturbax/fit.py"]
    assert _docs.check_sections(doc.read_text(), root=tmp_path) == []
    # rewording docstrings and comments, blank lines, or changing the CLI does not change the numbers
    (lib / "fit.py").write_text('"""Fit, reworded\nover two lines."""\n\ndef fit(x):\n    """Other docs."""\n\n'
                                '    return x + 1  # one\n')
    (lib / "cli" / "main.py").write_text("print('hello')\n")
    assert _docs.check_sections(doc.read_text(), root=tmp_path) == []
    (lib / "fit.py").write_text('"""Fit."""\n\n\ndef fit(x):\n    """Docs."""\n    return x + 2  # one\n')
    (problem,) = _docs.check_sections(doc.read_text(), root=tmp_path)
    assert "library code it measures" in problem and "changed since its numbers" in problem
    (lib / "new.py").write_text("y = 1\n")  # a new module counts too
    _docs.mark_stale("demo", "numbers from before fit() added 2 instead of 1.", doc)
    assert _docs.check_sections(doc.read_text(), root=tmp_path) == []


def test_check_finds_library_changes_after_a_real_section():
    """On the real pages: a section whose stale line is removed is reported when the library changed
    after its commit (scale, produced at 8f68af7, before the nested.py refactor of da992d4)."""
    sec = _docs.all_sections()["scale"]
    assert sec["stale"] and re.fullmatch(r"[0-9a-f]{64}", sec["stamps"][0]["library"])
    text = sec["page"].read_text()
    unmarked = "\n".join(ln for ln in text.split("\n") if not ln.startswith(_docs.STALE))
    problems = _docs.check_sections(unmarked)
    assert any("'scale': the library code it measures" in p for p in problems), problems


def test_write_section_routes_sections_to_their_protocol_pages(tmp_path, monkeypatch):
    """Scripts call write_section(name, text, [docs/benchmarks.md], sources=...) as before; the section
    lands on its protocol's page, images saved in docs/ stay linked, and a section of a new protocol gets
    a page of its own."""
    docs = tmp_path / "docs"
    docs.mkdir()
    monkeypatch.setattr(_docs, "DOC", docs / "benchmarks.md")
    (docs / "plot.png").write_bytes(b"png")
    script = tmp_path / "bench.py"
    script.write_text("print(1)\n")
    page = _docs.write_section("baselines", "## B\n\n![plot](plot.png)", docs / "benchmarks.md", sources=[script],
                               root=tmp_path)
    assert page == docs / "benchmarks" / "norman-doubles.md" and not (docs / "benchmarks.md").exists()
    assert "![plot](../plot.png)" in page.read_text()
    new = _docs.write_section("contexts", "## Contexts", sources=[script], root=tmp_path)
    assert new == docs / "benchmarks" / "contexts.md"
    _docs.mark_stale("contexts", "numbers from before a change that moved them.")
    assert _docs.all_sections(docs)["contexts"]["stale"]
    # a section a script of before the pages appended to the index moves to its page unchanged
    (docs / "benchmarks.md").write_text(_docs.HEADER + "\n<!-- pdae-sim:start -->\nX ![p](plot.png)\n<!-- pdae-sim:end -->\n")
    assert any("pdae-sim" in p for p in _docs.check_pages(docs, root=tmp_path))
    assert _docs.move_sections(docs) == ["pdae-sim: docs/benchmarks.md -> docs/benchmarks/pdae-sim.md"]
    assert _docs.all_sections(docs)["pdae-sim"]["body"] == "X ![p](../plot.png)\n"
    assert not _docs.sections((docs / "benchmarks.md").read_text())


def test_results_page_is_built_from_the_sections():
    """docs/results.md and the index docs/benchmarks.md are what benchmarks/results.py builds from the
    detail pages now (run it after a benchmark), and every plot they show exists."""
    built, index = results.build(plots=False)
    assert (ROOT / "docs" / "results.md").read_text() == built, "run python benchmarks/results.py"
    assert _docs.DOC.read_text() == index, "run python benchmarks/results.py"
    for key in results.ORDER:
        assert f'<a id="{key}"></a>' in built
    for link in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", built):
        assert (ROOT / "docs" / link).is_file(), link
    # a number on the page is read from its section: the pdae-sim double row quotes the model's median
    rows = {(r["group"], r["method"]): r for r in results.table(_docs.all_sections()["pdae-sim"]["body"], "By group")}
    assert f"| held-out double | 100 | {results.fmt(float(rows[('double', 'model_energy')]['energy_median']))} |" in built


def test_results_page_says_when_a_headline_is_stale(tmp_path):
    """A protocol whose section is marked stale shows a Stale note next to its table; a current one none."""
    docs = tmp_path / "docs"
    (docs / "benchmarks").mkdir(parents=True)
    for page in (ROOT / "docs" / "benchmarks").glob("*.md"):
        (docs / "benchmarks" / page.name).write_text(page.read_text())
    page = docs / "benchmarks" / "pdae-sim.md"
    page.write_text("\n".join(ln for ln in page.read_text().split("\n") if not ln.startswith(_docs.STALE)))
    built, _ = results.build(docs, plots=False)
    block = built.split('<a id="pdae-sim"></a>')[1].split("<a id=")[0]
    assert _docs.STALE not in block and "| held-out double |" in block
    _docs.mark_stale("pdae-sim", "numbers from before the nested-estimator default of fit.", page)
    built, _ = results.build(docs, plots=False)
    block = built.split('<a id="pdae-sim"></a>')[1].split("<a id=")[0]
    assert "> **Stale:** the `pdae-sim` numbers predate" in block and "nested-estimator default" in block
    assert block.index(_docs.STALE) < block.index("| held-out double |")


def test_make_benchmarks_regenerates_every_section():
    """Every section of the benchmark pages is written by a script that `make benchmarks` runs (or is
    listed as written by hand, with why), and that script is the one its stamp names."""
    found = _docs.all_sections()
    assert set(found) == set(regenerate.RUNS) | set(regenerate.HAND_WRITTEN), (
        "add each new section to benchmarks/regenerate.py RUNS (the commands that write it)")
    assert not set(regenerate.RUNS) & set(regenerate.HAND_WRITTEN)
    for name, commands in regenerate.RUNS.items():
        scripts = {regenerate.script_of(c) for c in commands}
        assert len(scripts) == 1 and all(c.startswith("python benchmarks/") for c in commands), name
        (script,) = scripts
        assert (ROOT / script).is_file(), script
        assert f'"{name}"' in (ROOT / script).read_text(), f"{script} does not write section {name!r}"
        assert next(iter(found[name]["stamps"][0]["sources"])) == script, name
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^benchmarks:.*\n\t\$\(PY\) benchmarks/regenerate\.py", makefile, re.MULTILINE)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "regenerate.py"), "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = [ln.split("] ", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith("[") and "not regenerated" not in ln]
    assert listed == [c for cs in regenerate.RUNS.values() for c in cs] + [regenerate.REBUILD]


def test_readme_quotes_the_pdae_sim_errors_inside_and_outside_the_hull():
    """The README's "in the span means identified, not accurate" paragraph quotes the measured errors
    of docs/benchmarks/pdae-sim.md (by group); a rerun that changes them must update the README."""
    body = _docs.all_sections()["pdae-sim"]["body"]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        # group | method | n | energy_median | coverage_mean | coverage_observed_mean
        if len(cells) == 6 and cells[0] in ("dose-in-hull", "double", "dose-outside-hull"):
            rows[(cells[0], cells[1])] = (float(cells[3]), cells[4], cells[5])
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "identified, not accurate" in readme
    for group in ("dose-in-hull", "double", "dose-outside-hull"):
        energy, coverage, observed = rows[(group, "model_energy")]
        additive = rows[(group, "additive")][0]
        for quoted in (f"{energy:.2g}", f"{float(coverage):.2f}", f"{float(observed):.2f}", f"{additive:.2g}"):
            assert quoted in readme, f"README does not quote the pdae-sim {group} value {quoted}"
