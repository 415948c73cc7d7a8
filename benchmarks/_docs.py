"""Shared by the benchmark scripts: replace one marked section of docs/benchmarks.md, stamped.

Every section sits between ``<!-- name:start -->`` and ``<!-- name:end -->`` and starts with a
machine-readable stamp that says where its numbers come from::

    <!-- perturbax-benchmark section=NAME commit=abc1234 worktree=clean sources=benchmarks/x.py:SHA256 -->

``commit`` is the ``git rev-parse --short HEAD`` of the run (``worktree=modified`` when ``src/`` or
``benchmarks/`` had uncommitted changes), ``sources`` the SHA-256 of the files the section's
numbers depend on beyond the library (its script, and local modules the script imports).
:func:`write_section` writes the stamp, so a regenerated section is always stamped. A script that
rebuilds its section from results kept by an earlier run records :func:`provenance` with those
results and passes it back (``produced=``): the stamp then names the commit of the run, not of
the rebuild (``commit=unknown`` when the results carry none, which the check refuses).
:func:`check_sections` (run by tests/test_docs.py) reports a section whose sources changed since
its numbers, unless the section says it is stale in a visible line ``> **Stale:** ...`` naming
the later change it predates (:func:`mark_stale`; rewriting the section drops the line).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\nTables written by the scripts in `benchmarks/`; each section names the command that "
    "produced it. Protocols: DESIGN.md section 6. Each section starts with a stamp (an HTML comment, written "
    "by `benchmarks/_docs.py`: the commit it was produced at and the SHA-256 of its scripts); "
    "`tests/test_docs.py` fails when a script changed after its section's numbers, unless the section says "
    "in a **Stale** line which later change it predates.\n"
)
STAMP = "<!-- perturbax-benchmark "
STALE = "> **Stale:**"
_SECTION = re.compile(r"<!-- ([\w.-]+):start -->\n(.*?)<!-- \1:end -->", re.DOTALL)
_STAMP = re.compile(r"^<!-- perturbax-benchmark (.*?) -->$", re.MULTILINE)


def source_digest(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> dict[str, str]:
    """``{"commit", "worktree"}`` of the checkout now; keep it with a run's results."""
    commit = _git("rev-parse", "--short=7", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--", "src", "benchmarks")
    worktree = "unknown" if dirty is None else ("modified" if dirty else "clean")
    return {"commit": commit, "worktree": worktree}


def common_provenance(records) -> dict[str, str]:
    """The provenance shared by several kept results (``commit=unknown`` if any lacks one or they
    differ)."""
    provs = [r.get("provenance") or {} for r in records]
    commits = {p.get("commit", "unknown") for p in provs}
    worktrees = {p.get("worktree", "unknown") for p in provs}
    return {
        "commit": commits.pop() if len(commits) == 1 else "unknown",
        "worktree": worktrees.pop() if len(worktrees) == 1 else "unknown",
    }


def stamp(name: str, sources, *, root: Path = ROOT, produced: dict | None = None) -> str:
    """The stamp line of section ``name`` (source paths relative to ``root``; ``produced``: the
    :func:`provenance` recorded with the results, default the checkout now)."""
    prov = provenance() if produced is None else produced
    commit, worktree = prov.get("commit") or "unknown", prov.get("worktree") or "unknown"
    parts = []
    for src in sources:
        path = Path(src).resolve()
        parts.append(f"{path.relative_to(root).as_posix()}:{source_digest(path)}")
    if not parts:
        raise ValueError(f"section {name!r}: name at least one source file (its script).")
    return f"{STAMP}section={name} commit={commit} worktree={worktree} sources={','.join(parts)} -->"


def write_section(
    name: str, section: str, doc: Path = DOC, *, sources, root: Path = ROOT, produced: dict | None = None
) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` (appended if absent)
    by a fresh stamp (``sources``: the script, ``Path(__file__)``, and local modules it uses;
    ``produced``: see :func:`stamp`) and ``section``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.exists() else HEADER
    block = f"{start}\n{stamp(name, sources, root=root, produced=produced)}\n{section.rstrip()}\n{end}"
    if start in text and end in text:
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def mark_stale(name: str, reason: str, doc: Path = DOC) -> None:
    """Put (or replace) the visible line ``> **Stale:** reason`` after the stamp of section ``name``."""
    text = doc.read_text()
    sections = {m.group(1): m for m in _SECTION.finditer(text)}
    if name not in sections:
        raise KeyError(f"no section {name!r} in {doc}; sections: {', '.join(sections)}.")
    m = sections[name]
    lines = [ln for ln in m.group(2).split("\n") if not ln.startswith(STALE)]
    at = 1 if lines and lines[0].startswith(STAMP) else 0
    lines[at:at] = [f"{STALE} {reason.strip()}", ""]
    text = text[: m.start(2)] + "\n".join(lines) + text[m.end(2) :]
    doc.write_text(text)


def parse_stamp(line: str) -> dict[str, str | dict[str, str]]:
    """``{"section", "commit", "worktree", "sources": {path: sha256}}`` of a stamp's attributes."""
    fields = dict(item.split("=", 1) for item in line.split())
    sources = dict(s.rsplit(":", 1) for s in fields.get("sources", "").split(",") if s)
    return {**fields, "sources": sources}


def sections(text: str) -> dict[str, dict]:
    """``{name: {"body", "stamps": [parsed stamps], "stale": [reasons]}}`` of a benchmarks page."""
    out = {}
    for m in _SECTION.finditer(text):
        body = m.group(2)
        out[m.group(1)] = {
            "body": body,
            "stamps": [parse_stamp(s) for s in _STAMP.findall(body)],
            "stale": [ln[len(STALE) :].strip() for ln in body.split("\n") if ln.startswith(STALE)],
        }
    return out


def check_sections(text: str, root: Path = ROOT) -> list[str]:
    """Problems of a benchmarks page: a section without exactly one well-formed stamp of its own
    name, or whose stamped sources no longer match the files (changed since the numbers) while the
    section does not say it is stale (a ``> **Stale:**`` line of at least a few words)."""
    problems = []
    for name, sec in sections(text).items():
        if len(sec["stamps"]) != 1:
            problems.append(f"section {name!r} has {len(sec['stamps'])} stamps (needs exactly one).")
            continue
        st = sec["stamps"][0]
        if st.get("section") != name or not re.fullmatch(r"[0-9a-f]{7,40}", st.get("commit", "")):
            problems.append(f"section {name!r}: malformed stamp {st}.")
            continue
        if not st["sources"]:
            problems.append(f"section {name!r}: the stamp names no source file.")
        if any(len(reason.split()) < 5 for reason in sec["stale"]):
            problems.append(f"section {name!r}: a stale line must say which later change it predates.")
        if sec["stale"]:
            continue
        for path, digest in st["sources"].items():
            file = root / path
            if not file.is_file():
                problems.append(f"section {name!r}: source {path} no longer exists; rerun it or mark it stale.")
            elif source_digest(file) != digest:
                problems.append(
                    f"section {name!r}: {path} changed since its numbers (commit {st['commit']}); rerun "
                    f"the script or mark the section stale (benchmarks/_docs.py mark_stale)."
                )
    return problems
