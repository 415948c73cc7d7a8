"""Where the commands may write: one check, run before any work, that no output overwrites an
input, the model folder or another output, and that a non-empty output folder is replaced only
with ``--overwrite``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import click

__all__ = ["check_outputs", "resolved"]

Named = Mapping[str, object]  # option or argument name -> path (str or os.PathLike) or None


def resolved(path) -> Path:
    """``path`` with ``~``, ``..`` and symbolic links resolved (the parts that exist)."""
    return Path(os.path.expanduser(os.fspath(path))).resolve()


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:  # hard links and other aliases of one existing file
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(a: Path, folder: Path) -> bool:
    """Whether ``a`` is ``folder`` or lies (at any depth) inside it."""
    return _same(a, folder) or folder in a.parents


def _named(items: Named | None) -> dict[str, tuple[str, Path]]:
    return {opt: (os.fspath(p), resolved(p)) for opt, p in (items or {}).items() if p is not None}


def check_outputs(
    files: Named | None = None,
    *,
    folders: Named | None = None,
    inputs: Named | None = None,
    input_folders: Named | None = None,
    overwrite: bool = False,
    replaceable: frozenset[str] = frozenset(),
) -> None:
    """Refuse (``click.UsageError``, one line, before any work) outputs that would destroy data.

    ``files`` and ``folders`` map an option (e.g. ``"--out"``) to the file or folder it writes;
    ``inputs`` and ``input_folders`` map an option or argument to what the command reads (an
    input folder, e.g. a model folder, is read as a whole). Refused: an output whose folder does
    not exist; an output that is an input, lies inside an input folder or is another output; an
    output folder that holds an input or another output; an output file that is an existing
    folder; an existing, non-empty output folder unless ``overwrite`` (and then only if every
    entry in it is in ``replaceable``, the names the command itself writes there). Paths are
    compared after resolving ``~``, ``..`` and symbolic links (and hard links of existing files).
    """
    out_files, out_dirs = _named(files), _named(folders)
    ins = {**_named(inputs), **_named(input_folders)}
    in_dirs = _named(input_folders)
    outs = {**out_files, **out_dirs}

    for opt, (text, path) in outs.items():
        if not path.parent.is_dir():
            raise click.UsageError(
                f"{opt} {text}: the folder {path.parent} does not exist. Create it first "
                f"(mkdir -p {path.parent}) or choose another path."
            )
        for src, (src_text, src_path) in ins.items():
            if _same(path, src_path):
                raise click.UsageError(
                    f"{opt} {text} is the same file as the input {src} {src_text}; writing it would destroy "
                    f"the input. Choose another {opt} path."
                )
            if src in in_dirs and _inside(path, src_path):
                raise click.UsageError(
                    f"{opt} {text} lies inside the input folder {src} {src_text}; choose an {opt} path outside it."
                )
            if opt in out_dirs and _inside(src_path, path):
                raise click.UsageError(
                    f"{opt} {text} would hold the input {src} {src_text}; choose an empty or new folder for {opt}."
                )
        for other, (other_text, other_path) in outs.items():
            if other == opt:
                continue
            if _same(path, other_path) or (other in out_dirs and _inside(path, other_path)):
                raise click.UsageError(
                    f"{opt} {text} and {other} {other_text} name the same path; give each output its own path."
                )
    for opt, (text, path) in out_files.items():
        if path.is_dir():
            raise click.UsageError(f"{opt} {text} is a folder; give the name of a file (e.g. one inside it).")
    for opt, (text, path) in out_dirs.items():
        if path.exists() and not path.is_dir():
            raise click.UsageError(f"{opt} {text} is a file; give a folder (new or empty).")
        if not path.is_dir():
            continue
        entries = sorted(p.name for p in path.iterdir())
        if not entries:
            continue
        if not overwrite:
            raise click.UsageError(
                f"{opt} {text} is not empty ({len(entries)} entries, e.g. {entries[0]!r}); pass --overwrite to "
                f"replace the fit saved there, or choose a new folder."
            )
        foreign = [e for e in entries if e not in replaceable]
        if foreign:
            raise click.UsageError(
                f"{opt} {text} holds files this command did not write (e.g. {foreign[0]!r}), so --overwrite "
                f"will not replace it; choose a new or empty folder."
            )
