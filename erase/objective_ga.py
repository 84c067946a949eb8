"""The ``ga`` objective: bounded gradient ascent on the forget images' denoising loss.

A slot module: its settings, their checks, and the loss; no torch at load (``objectives.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .objectives import ItemBatch, PredictFn, denoising_loss

if TYPE_CHECKING:
    import torch

NAME = "ga"
FORWARD_NOISED_ONLY = True  # it ascends the error against a known noise
CLOSED_FORM = False  # it trains (objective_uce solves instead)


@dataclass
class GaSettings:
    ga_bound: float = field(
        default=1.0,
        metadata={
            "help": "ga: an item's denoising error stops rising at this value (1 is the error "
            "of predicting zero noise), so gradient ascent cannot diverge"
        },
    )


Settings = GaSettings


def check(cfg, chosen: bool) -> None:
    if not cfg.ga_bound > 0 or math.isnan(cfg.ga_bound):
        raise ValueError(f"--ga-bound: must be > 0, got {cfg.ga_bound}")


def check_captions(cfg, captions: list[str]) -> None:
    """Checks against the captions of a --forget-images folder, once it is read."""
    pass


def anchor_prompt(cfg) -> str | None:
    return None


def ga_loss(
    student: PredictFn, teacher: PredictFn, batch: ItemBatch, bound: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-min(||eps_theta(x_t, c) - eps||^2, bound) per item.

    Plain ascent diverges: the error can grow without limit and the weights with it. Clamping at
    ``bound`` zeroes an item's gradient once its error reaches the bound (1.0 is the error of
    predicting zero noise), so each item is pushed only until it is no longer denoised.

    ``teacher`` is unused: gradient ascent needs no frozen target.

    Returns:
        losses: [B] in [-bound, 0]; pred: [B, C, H, W] the student's prediction.
    """
    losses, pred = denoising_loss(student, batch)
    return -losses.clamp(max=bound), pred


def build(cfg):
    bound = cfg.ga_bound
    return lambda student, teacher, batch: ga_loss(student, teacher, batch, bound)
