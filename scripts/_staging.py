"""A copy of the repository laid out as it installs, for scripts that run the tests against
changed code (mutation.py, numerics_check.py): the package folders under ``loreun/``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "erase", "eval", "pipelines", "prompts")


def stage_repository(stage: Path, untracked: bool = False) -> list[str]:
    """Copy the tracked files (and, with ``untracked``, new ones git does not ignore) into a
    fresh ``stage``; returns the repository-relative names copied."""
    extra = ["--others", "--exclude-standard"] if untracked else []
    names = subprocess.run(
        ["git", "ls-files", "--cached", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    names = [n for n in names if n]
    shutil.rmtree(stage, ignore_errors=True)
    for name in names:
        top = name.split("/", 1)[0]
        dest = stage / ("loreun/" + name if top in PACKAGES else name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest)
    (stage / "loreun" / "__init__.py").write_text("")
    return names
