"""The ``remap`` objective: SalUn-style remapping of forget images (Fan et al., ICLR 2024).

A slot module: its settings, their checks, and the loss; no torch at load (``objectives.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .objectives import ItemBatch, PredictFn, per_sample_mse

if TYPE_CHECKING:
    import torch

NAME = "remap"
FORWARD_NOISED_ONLY = True  # it trains on forward-noised forget images
CLOSED_FORM = False  # it trains (objective_uce solves instead)


@dataclass
class RemapSettings:
    anchor: str | None = field(
        default=None,
        metadata={"help": "remap: the prompt whose prediction forget images are pulled towards"},
    )


Settings = RemapSettings


def check(cfg, chosen: bool) -> None:
    if not chosen:
        if cfg.anchor is not None:
            raise ValueError("--anchor: only used by --objective remap (ESD's is --erase-from)")
        return
    if cfg.anchor is None:
        raise ValueError("--anchor: the remap objective needs an anchor prompt")
    check_anchor(cfg.anchor, cfg.concepts + [cfg.forget_caption or ""])


def check_anchor(anchor: str, forget_prompts: list[str]) -> None:
    """Remapping a concept onto itself erases nothing: refuse an anchor equal to a forget prompt."""
    a = anchor.strip()
    if not a:
        raise ValueError("--anchor: is empty")
    same = [p for p in forget_prompts if p.strip().casefold() == a.casefold()]
    if same:
        raise ValueError(f"--anchor: {anchor!r} is also a forget prompt; choose another anchor")


def check_captions(cfg, captions: list[str]) -> None:
    """Checks against the captions of a --forget-images folder, once it is read."""
    check_anchor(cfg.anchor, captions)


def anchor_prompt(cfg) -> str | None:
    return cfg.anchor


def remap_loss(
    student: PredictFn, teacher: PredictFn, batch: ItemBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """||eps_theta(x_t, c) - sg eps*(x_t, a)||^2 per item.

    The forget image, noised and prompted with its own caption c, should be denoised as the frozen
    model would denoise it under the anchor prompt a (``batch.anchor``, [B, L, D]). The teacher
    runs without gradient (the teacher slot's contract), which is the stop-gradient.

    Returns:
        losses: [B]; pred: [B, C, H, W] the student's prediction.
    """
    if batch.anchor is None:
        raise ValueError("the remap objective needs an anchor prompt")
    target = teacher(batch.xt, batch.t, batch.anchor).detach()
    pred = student(batch.xt, batch.t, batch.student_cond)
    return per_sample_mse(pred, target), pred


def build(cfg):
    return lambda student, teacher, batch: remap_loss(student, teacher, batch)
