"""The forms ``loreun export`` writes a finished erasure in: a literal table, as the family and
schedule tables are. A new form is one line here and its writer in ``erase/export.py``
(``WRITERS``); ``loreun export`` makes a flag of each entry and ``export_shared`` checks and
writes each target it is given.

This module imports no torch: ``loreun export --help`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExportJob:
    """What every writer may use: the erased file's header, the audit summary for a card, the
    base as the user gave it and its hub id, and the single file's precision."""

    meta: dict
    audit: dict | None
    base: str
    base_id: str | None
    dtype: str


@dataclass(frozen=True)
class ExportFormat:
    """One form: its ``loreun export`` option and what its target must be. Its writer is
    ``erase.export.WRITERS[name]`` (that module imports torch; a test ties the two tables).

    Attributes:
        flag: the ``loreun export`` option that names its target.
        metavar, help: the option's help.
        suffix: a file target must end in it; None: the target is a folder.
    """

    flag: str
    metavar: str
    help: str
    suffix: str | None


EXPORT_FORMATS = {
    "single_file": ExportFormat(
        "--single-file",
        "FILE",
        "write this .safetensors (SD 1.x; share other families as the erased file, LoRA or "
        "--pipeline)",
        ".safetensors",
    ),
    "pipeline": ExportFormat("--pipeline", "DIR", "write a diffusers folder with README.md", None),
}
