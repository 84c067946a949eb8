"""Erasure objectives. Each returns per-sample losses [B]; none reduces over the batch.

The trainer multiplies these by per-sample weights and reduces them in one place, so any
objective composes with any weighting (the shape of torchtune's DPOLoss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ForgetBatch:
    """One batch of forget items, already noised.

    Attributes:
        xt: [B, C, H, W] noisy latents.
        t: [B] integer timesteps.
        cond: [B, L, D] prompt embeddings of each item's concept c.
        uncond: [B, L, D] embeddings of the empty prompt.
        anchor: [B, L, D] embeddings of --erase-from c', or None.
        noise: [B, C, H, W] the noise that made xt, when known (forward-noised sources).
        ids: [B] forget-item indices.
    """

    xt: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    anchor: torch.Tensor | None
    noise: torch.Tensor | None
    ids: torch.Tensor


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension: [B, ...] x [B, ...] -> [B]."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def esd_target(
    eps_anchor: torch.Tensor, eps_concept: torch.Tensor, eps_uncond: torch.Tensor, eta: float
) -> torch.Tensor:
    """ESD's negatively guided target (Gandikota et al., ICCV 2023, eq. 3).

    target = eps*(x_t, anchor) - eta * (eps*(x_t, c) - eps*(x_t, empty)), where the anchor is the
    empty prompt, or c' with --erase-from. All inputs and the output are [B, C, H, W].
    """
    return eps_anchor - eta * (eps_concept - eps_uncond)


def teacher_predictions(teacher: EpsFn, batch: ForgetBatch) -> tuple[torch.Tensor, ...]:
    """Frozen predictions for c, the empty prompt and (if set) the anchor, in one forward pass.

    Returns:
        (eps_concept, eps_uncond[, eps_anchor]), each [B, C, H, W].
    """
    conds = [batch.cond, batch.uncond] + ([batch.anchor] if batch.anchor is not None else [])
    k = len(conds)
    with torch.no_grad():
        eps = teacher(batch.xt.repeat(k, 1, 1, 1), batch.t.repeat(k), torch.cat(conds))
    return eps.chunk(k)


def esd_loss(
    student: EpsFn, teacher: EpsFn, batch: ForgetBatch, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """ESD per-sample loss.

    Returns:
        losses: [B] MSE between eps_theta(x_t, c) and the ESD target.
        pred: [B, C, H, W] the student's prediction, reused for dynamic LoReUn difficulty.
    """
    eps = teacher_predictions(teacher, batch)
    anchor = eps[2] if len(eps) == 3 else eps[1]
    target = esd_target(anchor, eps[0], eps[1], eta)
    pred = student(batch.xt, batch.t, batch.cond)
    return per_sample_mse(pred, target), pred


OBJECTIVES = {"esd": esd_loss}


def get_objective(name: str):
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
