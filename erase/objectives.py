"""The objective slot's contract and what every objective shares.

Each objective is its own module (``objective_esd``, ``objective_remap``, ``objective_ga``)
named in ``config.OBJECTIVE_SLOTS``; each returns per-sample losses [B] and none reduces over
the batch. The trainer multiplies them by per-sample weights and reduces them in one place, so
any objective composes with any weighting (the shape of torchtune's DPOLoss).

This module and the objectives import no torch at load: the config composes the objectives'
settings, and ``loreun erase --help`` must not wait for torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

# A denoiser: (x_t [B, C, H, W], t [B], conditioning of B) -> [B, C, H, W], in the model's own
# parametrisation (the noise, v, or later a flow's velocity).
PredictFn = Callable[["torch.Tensor", "torch.Tensor", object], "torch.Tensor"]


class Objective(Protocol):
    """The objective slot's contract, as ``objective_for`` returns it: per-sample forget
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
        prompt: [B, L, D] what the student is prompted with instead of ``cond``, or None
            (adversarial erasure: the prompt an attack found, while the teacher's targets
            stay those of the item's own concept).
    """

    xt: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    anchor: torch.Tensor | None
    target: torch.Tensor | None
    ids: torch.Tensor
    prompt: torch.Tensor | None = None

    @property
    def student_cond(self) -> torch.Tensor:
        """The student's conditioning: ``prompt`` where set, else ``cond``."""
        return self.cond if self.prompt is None else self.prompt


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension: [B, ...] x [B, ...] -> [B]."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def teacher_predictions(teacher: PredictFn, batch: ItemBatch) -> tuple[torch.Tensor, ...]:
    """Frozen predictions for c, the empty prompt and (if set) the anchor, in one forward pass.

    Returns:
        (eps_concept, eps_uncond[, eps_anchor]), each [B, C, H, W].
    """
    import torch

    from loreun.pipelines.family import cat_cond

    conds = [batch.cond, batch.uncond] + ([batch.anchor] if batch.anchor is not None else [])
    k = len(conds)
    with torch.no_grad():
        eps = teacher(batch.xt.repeat(k, 1, 1, 1), batch.t.repeat(k), cat_cond(conds))
    return eps.chunk(k)


def denoising_loss(student: PredictFn, batch: ItemBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The ordinary diffusion loss of each item under its own prompt: ||eps_theta(x_t, c) - y||^2,
    where y is the noise or, for a v-prediction model, the velocity (``batch.target``).

    It is the retain term of every objective, and ``ga`` ascends it on forget items.

    Returns:
        losses: [B]; pred: [B, C, H, W] the student's prediction.
    """
    if batch.target is None:
        raise ValueError("the denoising loss needs forward-noised items (a known noise)")
    pred = student(batch.xt, batch.t, batch.student_cond)
    return per_sample_mse(pred, batch.target), pred


def objective_for(cfg) -> Objective:
    """The run's forget objective, ``fn(student, teacher, batch) -> (losses [B], pred)``, with
    its own settings bound: its slot module (``config.OBJECTIVE_SLOTS``) reads them."""
    return cfg.objective_slot().build(cfg)
