"""Shared by the benchmark scripts: replace one marked section of a benchmark page, stamped.

Each protocol has a detail page ``docs/benchmarks/<protocol>.md`` (:data:`PROTOCOLS` says which
sections live on which page; a section of a name it does not list gets a page of its own name).
Every section sits between ``<!-- name:start -->`` and ``<!-- name:end -->`` and starts with a
machine-readable stamp that says where its numbers come from::

    <!-- perturbax-benchmark section=NAME commit=abc1234 worktree=clean sources=benchmarks/x.py:SHA256 library=SHA256 -->

``commit`` is the ``git rev-parse --short HEAD`` of the run (``worktree=modified`` when ``src/`` or
``benchmarks/`` had uncommitted changes), ``sources`` the SHA-256 of the files the section's
numbers depend on beyond the library (its script, and local modules the script imports), and
``library`` the digest of the library code the numbers measure (:func:`library_digest`: every
module of ``src/perturbax`` except the user interface ``cli/`` and the figures ``plotting/``; a
module's docstrings, comments and blank lines do not count, so rewording them does not make a
section stale). :func:`write_section` writes the stamp, so a regenerated section is always
stamped. A script that rebuilds its section from results kept by an earlier run records
:func:`provenance` with those results and passes it back (``produced=``): the stamp then names the
commit and library digest of the run, not of the rebuild (``unknown`` when the results carry none,
which the check refuses).

:func:`check_sections` (run by tests/test_docs.py) reports a section whose script or library code
changed since its numbers, unless the section says it is stale in a visible line
``> **Stale:** ...`` naming the later change it predates (:func:`mark_stale`; rewriting the section
drops the line). From the command line (repository root)::

    python benchmarks/_docs.py check                    # problems, and the library files changed since each section
    python benchmarks/_docs.py mark-stale NAME "predates ... (commit): what changed"
    python benchmarks/_docs.py list                     # section -> page, commit, stale or current
    python benchmarks/_docs.py move                     # sections found on the wrong page move to their own
    python benchmarks/_docs.py backfill NAME            # a stamp of before library digests: the digest at its commit
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC = DOCS / "benchmarks.md"  # the index of the detail pages; write_section routes it to the section's page
LIBRARY = "src/perturbax"
#: Parts of the library no benchmark number depends on: the command-line shell and the figures.
LIBRARY_EXCLUDE = ("cli/", "plotting/")

#: Detail page (``docs/benchmarks/<key>.md``) -> (title, its sections in page order).
PROTOCOLS: dict[str, tuple[str, tuple[str, ...]]] = {
    "norman-doubles": ("norman-doubles: held-out double knock-downs of Norman et al. (2019)",
                       ("baselines", "norman-models", "norman_defaults", "norman-fold-time")),
    "pdae-sim": ("pdae-sim: simulated additive latent shifts", ("pdae-sim", "pdae-sim-ceiling")),
    "design-check": ("Design check: does coverage predict which extrapolations work?", ("theory-coverage",)),
    "dynamics": ("Latent dynamics: simulated and real time courses",
                 ("dynamics", "dynamics-ceiling", "dynamics-order-transients", "dynamics-real", "dynamics-speed",
                  "dynamics-target-mask")),
    "speed": ("Speed of the additive-shift fits", ("speed-additive",)),
    "scale": ("Scaling: devices and cells streamed from disk", ("scale",)),
    "contexts": ("Contexts: a perturbation predicted in a cell type or line where it was never measured",
                 ("contexts-kang", "contexts-mcfaline")),
}
HEADER = (
    "# Benchmarks\n\nThe headline numbers are on [results.md](results.md); the detail pages below hold each "
    "protocol's run logs, per-seed and per-fold tables and tuning history, written by the scripts in "
    "`benchmarks/` (`make benchmarks` reruns them; `benchmarks/regenerate.py` lists which command writes which "
    "section, and which are written by hand). Each section starts with a stamp (an HTML comment, "
    "written by `benchmarks/_docs.py`: the commit it was produced at, the SHA-256 of its scripts and the digest "
    "of the library code it measures); `tests/test_docs.py` fails when either changed after the section's "
    "numbers, unless the section says in a **Stale** line which later change it predates.\n"
)
STAMP = "<!-- perturbax-benchmark "
STALE = "> **Stale:**"
_SECTION = re.compile(r"<!-- ([\w.-]+):start -->\n(.*?)<!-- \1:end -->", re.DOTALL)
_STAMP = re.compile(r"^<!-- perturbax-benchmark (.*?) -->$", re.MULTILINE)
_LINK = re.compile(r"(\]\()([^)\s#]+)")


def protocol_of(name: str) -> str:
    """The detail page key of section ``name`` (its own name when :data:`PROTOCOLS` does not list it)."""
    return next((key for key, (_, names) in PROTOCOLS.items() if name in names), name)


def page_of(name: str, docs: Path | None = None) -> Path:
    """The detail page of section ``name`` (``docs``: the docs folder, default :data:`DOCS`)."""
    return (DOC.parent if docs is None else Path(docs)) / "benchmarks" / f"{protocol_of(name)}.md"


def page_header(key: str) -> str:
    title = PROTOCOLS.get(key, (key, ()))[0]
    return (
        f"# {title}\n\nDetail page of the benchmarks ([all protocols](../benchmarks.md), headline numbers on "
        f"[results.md](../results.md)). Each section is written by the script named in it, stamped with the commit "
        "it was produced at; `make benchmarks` regenerates it.\n"
    )


def source_digest(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def code_text(source: str) -> str:
    """A module's code without its docstrings, comment lines and blank lines (the part that can change
    numbers); the text itself when it does not parse."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    drop: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                drop.update(range(first.lineno, first.end_lineno + 1))
    kept = []
    for i, line in enumerate(source.splitlines(), start=1):
        stripped = line.rstrip()
        if i in drop or not stripped.strip() or stripped.lstrip().startswith("#"):
            continue
        kept.append(stripped)
    return "\n".join(kept) + "\n"


def _library_paths(paths) -> list[str]:
    prefix = LIBRARY + "/"
    out = []
    for p in paths:
        rel = p[len(prefix):] if p.startswith(prefix) else None
        if rel is not None and rel.endswith(".py") and not rel.startswith(LIBRARY_EXCLUDE):
            out.append(p)
    return sorted(out)


def _combine(items) -> str:
    h = hashlib.sha256()
    for path, text in items:
        h.update(f"{path}\0{hashlib.sha256(code_text(text).encode()).hexdigest()}\n".encode())
    return h.hexdigest()


def library_files(root: Path = ROOT) -> list[str]:
    """Paths (relative to ``root``) of the library modules the benchmark numbers measure."""
    base = Path(root) / LIBRARY
    found = [p.relative_to(root).as_posix() for p in base.rglob("*.py")] if base.is_dir() else []
    return _library_paths(found)


def library_digest(root: Path = ROOT) -> str:
    """Digest of the code of :func:`library_files` (docstrings, comments and blank lines left out)."""
    return _combine((p, (Path(root) / p).read_text()) for p in library_files(root))


def _git(*args: str, root: Path = ROOT) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def library_at(commit: str, root: Path = ROOT) -> dict[str, str] | None:
    """``{path: code text}`` of the library modules at a commit (None without git or the commit)."""
    listing = _git("ls-tree", "-r", "--name-only", commit, "--", LIBRARY, root=root)
    if listing is None:
        return None
    return {p: _git("show", f"{commit}:{p}", root=root) or "" for p in _library_paths(listing.splitlines())}


def library_digest_at(commit: str, root: Path = ROOT) -> str | None:
    """:func:`library_digest` of the library as it was at ``commit``."""
    files = library_at(commit, root)
    return None if files is None else _combine(sorted(files.items()))


def library_changes(commit: str, root: Path = ROOT) -> list[str] | None:
    """Library modules whose code differs between ``commit`` and the files now (added, removed or changed)."""
    then = library_at(commit, root)
    if then is None:
        return None
    now = {p: (Path(root) / p).read_text() for p in library_files(root)}
    return sorted(p for p in set(then) | set(now) if code_text(then.get(p, "")) != code_text(now.get(p, "")))


def provenance() -> dict[str, str]:
    """``{"commit", "worktree", "library"}`` of the checkout now; keep it with a run's results."""
    commit = _git("rev-parse", "--short=7", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--", "src", "benchmarks")
    worktree = "unknown" if dirty is None else ("modified" if dirty else "clean")
    return {"commit": commit, "worktree": worktree, "library": library_digest()}


def common_provenance(records, *, root: Path = ROOT) -> dict[str, str]:
    """The provenance shared by several kept results (``unknown`` where any lacks it or they differ).

    Results run at different commits of the same library digest (a run split over sessions) get
    the latest of those commits, when git can order them (each an ancestor of the next)."""
    provs = [r.get("provenance") or {} for r in records]
    out = {}
    for key in ("commit", "worktree", "library"):
        values = {p.get(key, "unknown") for p in provs}
        out[key] = values.pop() if len(values) == 1 else "unknown"
    commits = sorted({p.get("commit", "unknown") for p in provs})
    if out["commit"] == "unknown" and out["library"] != "unknown" and "unknown" not in commits:
        latest = commits[0]
        for c in commits[1:]:
            if _git("merge-base", "--is-ancestor", latest, c, root=root) is not None:
                latest = c
            elif _git("merge-base", "--is-ancestor", c, latest, root=root) is None:
                return out  # unrelated commits
        out["commit"] = latest
    return out


def stamp(name: str, sources, *, root: Path = ROOT, produced: dict | None = None) -> str:
    """The stamp line of section ``name`` (source paths relative to ``root``; ``produced``: the
    :func:`provenance` recorded with the results, default the checkout now)."""
    prov = provenance() if produced is None else produced
    commit, worktree = prov.get("commit") or "unknown", prov.get("worktree") or "unknown"
    library = prov.get("library") or "unknown"
    if produced is None and Path(root) != ROOT:
        library = library_digest(root)
    parts = []
    for src in sources:
        path = Path(src).resolve()
        parts.append(f"{path.relative_to(root).as_posix()}:{source_digest(path)}")
    if not parts:
        raise ValueError(f"section {name!r}: name at least one source file (its script).")
    return (f"{STAMP}section={name} commit={commit} worktree={worktree} sources={','.join(parts)} "
            f"library={library} -->")


def relink(text: str, written_for: Path, page_dir: Path) -> str:
    """Relative links of ``text`` written for a page in ``written_for`` (e.g. an image a script saved in
    docs/), rewritten to work from a page in ``page_dir``."""
    if Path(written_for).resolve() == Path(page_dir).resolve():
        return text

    def fix(m):
        link = m.group(2)
        if "://" in link or link.startswith(("/", "mailto:")):
            return m.group(0)
        target = Path(written_for) / link
        if target.exists() and not (Path(page_dir) / link).exists():
            return m.group(1) + Path(os.path.relpath(target, page_dir)).as_posix()
        return m.group(0)

    return _LINK.sub(fix, text)


def _target(name: str, doc) -> Path:
    """Where section ``name`` is written: its detail page unless ``doc`` names another file than the
    index (scripts written before the detail pages pass docs/benchmarks.md)."""
    if doc is None or Path(doc).resolve() == DOC.resolve():
        return page_of(name, DOC.parent)
    return Path(doc)


def _replace_block(text: str, name: str, block: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start in text and end in text:
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        return head + block + tail
    return text.rstrip() + "\n\n" + block + "\n"


def write_section(
    name: str, section: str, doc: Path | None = None, *, sources, root: Path = ROOT, produced: dict | None = None
) -> Path:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` (appended if absent)
    by a fresh stamp (``sources``: the script, ``Path(__file__)``, and local modules it uses;
    ``produced``: see :func:`stamp`) and ``section``. ``doc``: the page, by default (or when it is
    docs/benchmarks.md) the section's detail page :func:`page_of`; relative links the script wrote for
    a page in docs/ (its images) are rewritten for that page. Returns the page written."""
    page = _target(name, doc)
    if page.resolve().parent == (DOC.parent / "benchmarks").resolve():
        section = relink(section, DOC.parent, page.parent)
        fresh = page_header(page.stem)
    else:
        fresh = HEADER
    text = page.read_text() if page.exists() else fresh
    block = f"<!-- {name}:start -->\n{stamp(name, sources, root=root, produced=produced)}\n{section.rstrip()}\n<!-- {name}:end -->"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(_replace_block(text, name, block))
    return page


def _locate(name: str, doc) -> Path:
    if doc is not None:
        return Path(doc)
    for page in benchmark_pages():
        if page.exists() and name in sections(page.read_text()):
            return page
    return page_of(name)


def mark_stale(name: str, reason: str, doc: Path | None = None) -> None:
    """Put (or replace) the visible line ``> **Stale:** reason`` after the stamp of section ``name``
    (``doc``: its page; by default the page that holds it)."""
    doc = _locate(name, doc)
    text = doc.read_text() if doc.exists() else ""
    found = {m.group(1): m for m in _SECTION.finditer(text)}
    if name not in found:
        raise KeyError(f"no section {name!r} in {doc}; sections: {', '.join(found) or 'none'}.")
    m = found[name]
    lines = [ln for ln in m.group(2).split("\n") if not ln.startswith(STALE)]
    at = 1 if lines and lines[0].startswith(STAMP) else 0
    lines[at:at] = [f"{STALE} {reason.strip()}", ""]
    text = text[: m.start(2)] + "\n".join(lines) + text[m.end(2) :]
    doc.write_text(text)


def parse_stamp(line: str) -> dict[str, str | dict[str, str]]:
    """``{"section", "commit", "worktree", "library", "sources": {path: sha256}}`` of a stamp's attributes."""
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


def benchmark_pages(docs: Path | None = None) -> list[Path]:
    """The index and every detail page."""
    docs = DOC.parent if docs is None else Path(docs)
    return [docs / "benchmarks.md", *sorted((docs / "benchmarks").glob("*.md"))]


def all_sections(docs: Path | None = None) -> dict[str, dict]:
    """:func:`sections` of every benchmark page, each with its ``"page"``."""
    out = {}
    for page in benchmark_pages(docs):
        if page.exists():
            for name, sec in sections(page.read_text()).items():
                out[name] = {**sec, "page": page}
    return out


def check_sections(text: str, root: Path = ROOT) -> list[str]:
    """Problems of a benchmarks page: a section without exactly one well-formed stamp of its own
    name, or whose stamped sources or library digest no longer match the files (changed since the
    numbers) while the section does not say it is stale (a ``> **Stale:**`` line of at least a few
    words)."""
    problems = []
    digest = None
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
        for path, sha in st["sources"].items():
            file = root / path
            if not file.is_file():
                problems.append(f"section {name!r}: source {path} no longer exists; rerun it or mark it stale.")
            elif source_digest(file) != sha:
                problems.append(
                    f"section {name!r}: {path} changed since its numbers (commit {st['commit']}); rerun "
                    f"the script or mark the section stale (python benchmarks/_docs.py mark-stale {name} \"...\")."
                )
        library = st.get("library", "unknown")
        if not re.fullmatch(r"[0-9a-f]{64}", library):
            problems.append(f"section {name!r}: the stamp records no digest of the library code it measures; "
                            "rerun the script or mark the section stale.")
            continue
        digest = digest or library_digest(root)
        if library != digest:
            problems.append(
                f"section {name!r}: the library code it measures ({LIBRARY}, without {', '.join(LIBRARY_EXCLUDE)}) "
                f"changed since its numbers (commit {st['commit']}); rerun the script or mark the section stale "
                f"(python benchmarks/_docs.py check lists the changed modules; mark-stale {name} \"...\")."
            )
    return problems


def check_pages(docs: Path | None = None, root: Path = ROOT) -> list[str]:
    """:func:`check_sections` of every benchmark page, plus sections on the wrong page or on two."""
    docs = DOC.parent if docs is None else Path(docs)
    problems, seen = [], {}
    for page in benchmark_pages(docs):
        if not page.exists():
            continue
        text = page.read_text()
        problems += [f"{page.relative_to(docs.parent)}: {p}" for p in check_sections(text, root)]
        for name in sections(text):
            if name in seen:
                problems.append(f"section {name!r} is on {seen[name].name} and {page.name}.")
            seen[name] = page
            if page.resolve() != page_of(name, docs).resolve():
                problems.append(f"section {name!r} is on {page.relative_to(docs.parent)}, its page is "
                                f"{page_of(name, docs).relative_to(docs.parent)} (python benchmarks/_docs.py move).")
    return problems


def move_sections(docs: Path | None = None) -> list[str]:
    """Move every section found on another page than its own (e.g. written to docs/benchmarks.md by a
    script of before the detail pages) to its page, text unchanged but for relative links."""
    docs = DOC.parent if docs is None else Path(docs)
    moved = []
    for page in benchmark_pages(docs):
        if not page.exists():
            continue
        text = page.read_text()
        for m in list(_SECTION.finditer(text)):
            name, target = m.group(1), page_of(m.group(1), docs)
            if target.resolve() == page.resolve():
                continue
            block = relink(m.group(0), page.parent, target.parent)
            dest = target.read_text() if target.exists() else page_header(target.stem)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_replace_block(dest, name, block))
            text = text.replace(m.group(0) + "\n", "", 1) if m.group(0) + "\n" in text else text.replace(m.group(0), "", 1)
            moved.append(f"{name}: {page.relative_to(docs.parent)} -> {target.relative_to(docs.parent)}")
        text = re.sub(r"\n{3,}", "\n\n", text)
        page.write_text(text)
    return moved


def backfill_library(name: str, root: Path = ROOT) -> str:
    """Add the library digest to the stamp of a section written before stamps recorded one: the digest of
    the library at its stamped commit, which is what it measured only if the run's worktree was clean
    (refused otherwise). Returns the digest."""
    sec = all_sections().get(name)
    if sec is None or len(sec["stamps"]) != 1:
        raise KeyError(f"no section {name!r} with one stamp.")
    st = sec["stamps"][0]
    if st.get("library", "unknown") != "unknown":
        raise ValueError(f"section {name!r} already records library={st['library']}.")
    if st.get("worktree") != "clean":
        raise ValueError(f"section {name!r} was produced in a {st.get('worktree')} worktree at {st.get('commit')}: the "
                         "library it measured is not known; rerun it or mark it stale.")
    digest = library_digest_at(st["commit"], root)
    if digest is None:
        raise ValueError(f"commit {st['commit']} of section {name!r} is not in this checkout's history.")
    page = sec["page"]
    text = page.read_text()
    line = next(m.group(0) for m in _STAMP.finditer(text) if parse_stamp(m.group(1)).get("section") == name)
    page.write_text(text.replace(line, line[: -len(" -->")] + f" library={digest} -->", 1))
    return digest


def _main(argv: list[str]) -> int:
    usage = ("usage: python benchmarks/_docs.py check | list | move | backfill NAME | mark-stale NAME \"REASON (the "
             "later change it predates)\"")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "mark-stale" and len(rest) == 2:
        mark_stale(rest[0], rest[1])
        print(f"marked {rest[0]} stale on {_locate(rest[0], None).relative_to(ROOT)}")
        return 0
    if cmd == "backfill" and len(rest) == 1:
        print(f"{rest[0]}: library={backfill_library(rest[0])}")
        return 0
    if cmd == "move" and not rest:
        print("\n".join(move_sections()) or "every section is on its page")
        return 0
    if cmd == "list" and not rest:
        for name, sec in all_sections().items():
            st = sec["stamps"][0] if sec["stamps"] else {}
            state = "stale" if sec["stale"] else "current"
            print(f"{name:24s} {sec['page'].relative_to(ROOT)}  commit {st.get('commit', '?')}  {state}")
        return 0
    if cmd == "check" and not rest:
        problems = check_pages()
        for p in problems:
            print(p)
        for name, sec in all_sections().items():
            if sec["stamps"] and not sec["stale"]:
                commit = sec["stamps"][0].get("commit", "")
                changed = library_changes(commit) if re.fullmatch(r"[0-9a-f]{7,40}", commit) else None
                if changed:
                    log = _git("log", "--oneline", f"{commit}..HEAD", "--", *changed) or ""
                    print(f"  {name}: library modules changed since {commit}: {', '.join(changed)}\n    "
                          + "\n    ".join(log.splitlines()[:15]))
        return 1 if problems else 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        raise SystemExit(_main(sys.argv[1:]))
    except (KeyError, ValueError) as err:  # a wrong section name or a refused backfill: one line, no traceback
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        raise SystemExit(1) from None
