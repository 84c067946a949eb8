"""Erasure objectives. Each returns per-sample losses [B]; none reduces over the batch.

The trainer multiplies these by per-sample weights and reduces them in one place, so any
objective composes with any weighting (the shape of torchtune's DPOLoss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from loreun.pipelines.family import cat_cond

# A denoiser: (x_t [B, C, H, W], t [B], conditioning of B) -> [B, C, H, W], in the model's own
# parametrisation (the noise, v, or later a flow's velocity).
PredictFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


class Objective(Protocol):
    """The objective slot's contract, as ``build_objective`` returns it: per-sample forget
    losses [B], never reduced over the batch, and the student's prediction [B, C, H, W] at
    ``batch.xt``, which dynamic LoReUn reuses as its difficulty."""

    def __call__(
        self, student: PredictFn, teacher: PredictFn, batch: ItemBatch
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class ItemBatch:
    """One batch of forget items, already noised.

    Attributes:
        xt: [B, C, H, W] noisy latents.
        t: [B] integer timesteps.
        cond: [B, L, D] prompt embeddings of each item's concept c.
        uncond: [B, L, D] embeddings of the empty prompt.
        anchor: [B, L, D] embeddings of --erase-from c', or None.
        target: [B, C, H, W] what a perfect model predicts at (xt, t) in its own
            parametrisation (the noise, or v), when known: forward-noised sources only.
        ids: [B] forget-item indices.
    """

    xt: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    anchor: torch.Tensor | None
    target: torch.Tensor | None
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


def teacher_predictions(teacher: PredictFn, batch: ItemBatch) -> tuple[torch.Tensor, ...]:
    """Frozen predictions for c, the empty prompt and (if set) the anchor, in one forward pass.

    Returns:
        (eps_concept, eps_uncond[, eps_anchor]), each [B, C, H, W].
    """
    conds = [batch.cond, batch.uncond] + ([batch.anchor] if batch.anchor is not None else [])
    k = len(conds)
    with torch.no_grad():
        eps = teacher(batch.xt.repeat(k, 1, 1, 1), batch.t.repeat(k), cat_cond(conds))
    return eps.chunk(k)


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
    pred = student(batch.xt, batch.t, batch.cond)
    return per_sample_mse(pred, target), pred


def denoising_loss(student: PredictFn, batch: ItemBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The ordinary diffusion loss of each item under its own prompt: ||eps_theta(x_t, c) - y||^2,
    where y is the noise or, for a v-prediction model, the velocity (``batch.target``).

    It is the retain term of every objective, and ``ga`` ascends it on forget items.

    Returns:
        losses: [B]; pred: [B, C, H, W] the student's prediction.
    """
    if batch.target is None:
        raise ValueError("the denoising loss needs forward-noised items (a known noise)")
    pred = student(batch.xt, batch.t, batch.cond)
    return per_sample_mse(pred, batch.target), pred


def remap_loss(
    student: PredictFn, teacher: PredictFn, batch: ItemBatch
) -> tuple[torch.Tensor, ...]:
    """SalUn-style remapping (Fan et al., ICLR 2024): ||eps_theta(x_t, c) - sg eps*(x_t, a)||^2.

    The forget image, noised and prompted with its own caption c, should be denoised as the frozen
    model would denoise it under the anchor prompt a (``batch.anchor``, [B, L, D]).

    Returns:
        losses: [B]; pred: [B, C, H, W] the student's prediction.
    """
    if batch.anchor is None:
        raise ValueError("the remap objective needs an anchor prompt")
    with torch.no_grad():
        target = teacher(batch.xt, batch.t, batch.anchor)
    pred = student(batch.xt, batch.t, batch.cond)
    return per_sample_mse(pred, target), pred


def ga_loss(
    student: PredictFn, teacher: PredictFn, batch: ItemBatch, bound: float
) -> tuple[torch.Tensor, ...]:
    """Bounded gradient ascent: -min(||eps_theta(x_t, c) - eps||^2, bound) per item.

    Plain ascent diverges: the error can grow without limit and the weights with it. Clamping at
    ``bound`` zeroes an item's gradient once its error reaches the bound (1.0 is the error of
    predicting zero noise), so each item is pushed only until it is no longer denoised.

    ``teacher`` is unused: gradient ascent needs no frozen target.

    Returns:
        losses: [B] in [-bound, 0]; pred: [B, C, H, W] the student's prediction.
    """
    losses, pred = denoising_loss(student, batch)
    return -losses.clamp(max=bound), pred


OBJECTIVES = {"esd": esd_loss, "remap": remap_loss, "ga": ga_loss}


def build_objective(name: str, *, eta: float = 1.0, ga_bound: float = 1.0):
    """The forget objective as ``fn(student, teacher, batch) -> (losses [B], pred)``.

    Looked up in ``OBJECTIVES`` when built, with each objective's own settings bound.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    fn = OBJECTIVES[name]
    settings = {"esd": {"eta": eta}, "ga": {"bound": ga_bound}}.get(name, {})
    return lambda student, teacher, batch: fn(student, teacher, batch, **settings)
