"""Atomic file writes: a file appears whole under its final name, or not at all."""

from __future__ import annotations

import os
from pathlib import Path


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write a safetensors file through a temporary name, so a crash never leaves half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _tmp_name(path)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata
    )
    os.replace(tmp, path)
