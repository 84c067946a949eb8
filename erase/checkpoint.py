"""Output folders and resumable checkpoints of an erase run.

A checkpoint holds only what cannot be recomputed: the trained tensors, the optimizer state, the
weighting's memory and the step. Every random draw of a step is a pure function of (seed, process
rank, step), so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from loreun.pipelines._files import atomic_save_safetensors, atomic_write_text

CHECKPOINTS = "checkpoints"
OUR_FILES = ("unet-erased.safetensors", "erase_config.json", "train_log.jsonl")
OUR_DIRS = ("pipeline", "cache", CHECKPOINTS)


def prepare_output_dir(
    out: str | Path, overwrite: bool, resume: str | None, create: bool = True
) -> Path:
    """Create the output folder, refusing to write into someone's non-empty folder.

    Raises:
        FileExistsError: ``out`` is a non-empty folder and neither ``overwrite`` nor ``resume``
            was given, or ``out`` is a file.

    ``create=False`` only checks: with several processes, one creates and the others check.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out: {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise FileExistsError(
            f"--out: {out} is not empty; pass --overwrite to write into it "
            "(files loreun did not write are kept) or --resume latest"
        )
    if not create:
        return out
    if overwrite and not resume:
        for ckpt in list_checkpoints(out):
            shutil.rmtree(ckpt)  # only folders that hold loreun's own state.json
    out.mkdir(parents=True, exist_ok=True)
    return out


def list_checkpoints(out: str | Path) -> list[Path]:
    """loreun's checkpoint folders under ``out``, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.glob("checkpoint-*")
        if p.is_dir() and p.name.split("-")[-1].isdigit() and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume(out: Path, resume: str | None) -> Path | None:
    """'latest' -> newest checkpoint under ``out``; a path -> that checkpoint; None -> None."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(out)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint under {out / CHECKPOINTS}")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume: {resume} is not a loreun checkpoint folder")
    return path


def save_checkpoint(
    out: Path,
    step: int,
    trained: dict[str, torch.Tensor],
    optimizer,
    weighting_state: dict,
    limit: int,
) -> Path:
    """Write ``checkpoint-<step>`` through a temporary folder, then keep the newest ``limit``."""
    root = Path(out) / CHECKPOINTS
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tmp / "trained.safetensors", trained)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    atomic_write_text(tmp / "state.json", json.dumps({"step": step, "weighting": weighting_state}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out)[:-limit]:
        shutil.rmtree(old)
    return final


def load_checkpoint(folder: Path) -> tuple[int, dict[str, torch.Tensor], dict, dict]:
    """Read a checkpoint written by ``save_checkpoint``.

    Returns:
        (step, trained tensors, optimizer state dict, weighting state dict)
    """
    from safetensors.torch import load_file

    state = json.loads((folder / "state.json").read_text())
    trained = load_file(str(folder / "trained.safetensors"))
    # Our own file, loaded without arbitrary unpickling.
    optim = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    return state["step"], trained, optim, state["weighting"]
