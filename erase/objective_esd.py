"""The ``esd`` objective: ESD's negative guidance (Gandikota et al., ICCV 2023).

A slot module: its settings (flags of ``loreun erase``), their checks, and the loss. It imports
no torch at load (``objectives.py`` says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .objectives import ItemBatch, PredictFn, per_sample_mse, teacher_predictions

if TYPE_CHECKING:
    import torch

NAME = "esd"
FORWARD_NOISED_ONLY = False  # it also trains on partially sampled x_t (no known noise needed)
CLOSED_FORM = False  # it trains (objective_uce solves instead)


@dataclass
class EsdSettings:
    erase_from: str | None = field(
        default=None,
        metadata={
            "help": "map the concept towards this prompt instead of the empty prompt (ESD's "
            "erase_from)"
        },
    )
    negative_guidance: float = field(
        default=1.0,
        metadata={"help": "ESD's eta: how far the target moves away from the concept"},
    )


Settings = EsdSettings


def check(cfg, chosen: bool) -> None:
    """Refuse what cannot work, before the model loads. ``cfg`` is the whole EraseConfig."""
    if cfg.erase_from is None:
        return
    if not chosen:
        raise ValueError("--erase-from: only used by --objective esd")
    if cfg.erase_from.strip() in cfg.concepts:
        raise ValueError("--erase-from: must differ from the concepts being erased")


def check_captions(cfg, captions: list[str]) -> None:
    """Checks against the captions of a --forget-images folder, once it is read."""
    pass


def anchor_prompt(cfg) -> str | None:
    """The prompt whose embedding ``ItemBatch.anchor`` carries: ESD's c' (or none: the empty
    prompt's prediction is the anchor)."""
    return cfg.erase_from


def esd_target(
    eps_anchor: torch.Tensor, eps_concept: torch.Tensor, eps_uncond: torch.Tensor, eta: float
) -> torch.Tensor:
    """ESD's negatively guided target (eq. 3 of the paper).

    target = eps*(x_t, anchor) - eta * (eps*(x_t, c) - eps*(x_t, empty)), where the anchor is the
    empty prompt, or c' with --erase-from. All inputs and the output are [B, C, H, W].
    """
    return eps_anchor - eta * (eps_concept - eps_uncond)


def esd_loss(
    student: PredictFn, teacher: PredictFn, batch: ItemBatch, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """ESD per-sample loss.

    Returns:
        losses: [B] MSE between eps_theta(x_t, c) and the ESD target.
        pred: [B, C, H, W] the student's prediction, reused for dynamic LoReUn difficulty.
    """
    eps = teacher_predictions(teacher, batch)
    anchor = eps[2] if len(eps) == 3 else eps[1]
    target = esd_target(anchor, eps[0], eps[1], eta)
    pred = student(batch.xt, batch.t, batch.student_cond)
    return per_sample_mse(pred, target), pred


def build(cfg):
    """``fn(student, teacher, batch) -> (losses [B], pred)`` with eta bound from ``cfg``."""
    eta = cfg.negative_guidance
    return lambda student, teacher, batch: esd_loss(student, teacher, batch, eta)
