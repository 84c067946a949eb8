"""Output folders of runs that resume: who may write into a folder, and their JSONL logs.

Generate, attack and erase share these rules: a folder holds one run, named by its config
file; a run that stopped before its first result does not hold the folder; a log line torn by a
kill is skipped (its work is done again), never glued to the next one.
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import FolderLock, atomic_write_text, read_json, refuse_link


def read_jsonl(path: Path) -> list:
    """The parsed lines of a JSONL log, in order; a torn or foreign line is skipped. A link at
    ``path`` is refused; a missing file reads as empty."""
    if not refuse_link(Path(path)).is_file():
        return []
    out = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def claim_output(
    out: Path, info: dict, create: bool, config: str, kind: str = "generation"
) -> None:
    """Refuse a folder that holds anything but this same run (its ``config`` file, whose
    ``info`` must match, says which), so that generate and attack resume only their own run.
    A run that stopped before its first image (its config and nothing else) does not hold the
    folder: the corrected command replaces its config."""
    path = out / config
    if refuse_link(path).is_file():
        old = read_json(path, f"--out: {out}")
        diff = [k for k in info if old.get(k) != info[k]]
        if diff and never_started(out, config):
            diff = []
            if create:
                atomic_write_text(path, json.dumps(info, indent=2))
        if diff:
            raise FileExistsError(
                f"--out: {out} holds another {kind} run ({', '.join(diff)}"
                " differ); choose another folder"
            )
        return
    if out.is_dir() and any(p.name != FolderLock.NAME for p in out.iterdir()):
        raise FileExistsError(
            f"--out: {out} is not empty and holds no loreun {kind}; choose an empty folder"
        )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out: {out} is a file")
    if create:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(info, indent=2))


def never_started(out: Path, config: str, keep: tuple[str, ...] = ()) -> bool:
    """Whether ``out`` holds only a run's ``config``, empty ``.jsonl`` logs, empty folders and
    the folders named in ``keep`` (self-checking caches): what a run that failed before its
    first image or step leaves, and nothing a user could lose."""
    for entry in out.iterdir():
        if entry.name in (config, FolderLock.NAME):
            continue
        if entry.name in keep and entry.is_dir() and not entry.is_symlink():
            continue
        if entry.is_symlink():
            return False
        if entry.is_dir() and not any(entry.iterdir()):
            continue
        if entry.is_file() and entry.suffix == ".jsonl" and entry.stat().st_size == 0:
            continue
        return False
    return True
