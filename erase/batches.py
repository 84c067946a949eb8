"""What one training step draws and observes: x_t of the sampled items from the configured
source (the x_t source slot), and the items' current difficulty for dynamic LoReUn.

Functions here read a trainer ``Run`` (``erase/trainer.py``): its forget items, noise schedule,
UNet, teacher and weighting.
"""

from __future__ import annotations

import torch

from .forget import (
    cached_batch,
    latent_shape,
    partial_batch,
    probe_difficulty,
    trajectory_batch,
)
from .objectives import per_sample_mse
from .sampling import unet_eps


def draw_batch(run, cfg, acc, ids: torch.Tensor, g: torch.Generator):
    """x_t for the sampled items from the configured source (see ``sampling``)."""
    return XT_SOURCES[cfg.xt_source](run, cfg, acc, ids, g)


def _cached_xt(run, cfg, acc, ids: torch.Tensor, g: torch.Generator):
    """Forward-noised cached x_0: the noise, hence the denoising target, is known."""
    return cached_batch(run.forget, ids, g, run.schedule, acc.device)


def _partial_xt(sampler: str):
    """ESD's x_t: guided DDIM from noise with the model being trained or the frozen base."""

    def draw(run, cfg, acc, ids: torch.Tensor, g: torch.Generator):
        raw = acc.unwrap_model(run.unet)
        eps = unet_eps(raw) if sampler == "train" else run.teacher
        shape = latent_shape(run.pipe, cfg.resolution)
        with acc.autocast():
            return partial_batch(
                eps, run.forget, ids, g, run.ddim, cfg.sample_guidance, shape, acc.device
            )

    return draw


def _trajectory_xt(run, cfg, acc, ids: torch.Tensor, g: torch.Generator):
    """ESD's x_t (partial sampling with the base) drawn from the sampled trajectory pool."""
    return trajectory_batch(run.forget, ids, g, run.ddim, acc.device)


# The x_t source slot: name -> fn(run, cfg, acc, ids [B], generator) -> ForgetBatch.
XT_SOURCES = {
    "cached": _cached_xt,
    "trajectory": _trajectory_xt,
    "partial-train": _partial_xt("train"),
    "partial-base": _partial_xt("base"),
}


def observe_difficulty(run, cfg, acc, batch, pred, g) -> None:
    """Feed dynamic LoReUn the current difficulty of the batch's items, gathered over processes.

    With a forward-noised source the student's prediction already is the denoising output, so
    difficulty is free; partial sampling needs one extra no-grad probe on the cached samples.
    """
    if not (run.weighting.needs_difficulty and cfg.loreun_variant != "static"):
        return
    if batch.target is not None:
        t, diff = batch.t, per_sample_mse(pred.detach(), batch.target)
    else:
        t = torch.randint(0, len(run.schedule), (len(batch.ids),), generator=g)
        noise = torch.randn((len(batch.ids), *run.forget.x0.shape[2:]), generator=g)
        with acc.autocast():
            diff = probe_difficulty(
                unet_eps(acc.unwrap_model(run.unet)),
                run.forget,
                batch.ids,
                t,
                noise,
                run.schedule,
                acc.device,
            )
    ids = batch.ids
    if acc.num_processes > 1 and cfg.loreun_variant == "dynamic":
        # every process folds in every process's items, identically
        ids, t, diff = (acc.gather(x.to(acc.device)).cpu() for x in (ids, t, diff))
    run.weighting.observe(ids, t, diff)
