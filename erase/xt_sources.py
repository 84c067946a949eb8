"""The x_t source slot: where the noisy latents of a step's forget items come from.

* ``cached`` (default): forward-noise cached x_0 latents (base-model samples, or the images'
  own) at a drawn time; the noise is known, so the denoising target and dynamic LoReUn's
  difficulty come free.
* ``trajectory``: ESD's x_t drawn from a pool of base-model sampling trajectories.
* ``partial-train`` / ``partial-base``: ESD's original recipe, sampling from noise down to a
  random step with the model being trained, or with the frozen base as ESD's diffusers code does.

Each returns an ``ItemBatch``; the schedule (``pipelines/schedule.py``) does the noising and
the sampling, the family (``pipelines/family.py``) the denoiser calls.
"""

from __future__ import annotations

import torch

from loreun.pipelines.schedule import Sampler, Schedule

from .items import ItemSet, forget_sampling
from .objectives import ItemBatch


def draw_batch(run, cfg, acc, ids: torch.Tensor, g: torch.Generator):
    """x_t for the sampled items from the configured source (see the module docstring)."""
    return XT_SOURCES[cfg.xt_source](run, cfg, acc, ids, g)


def _cached_xt(run, cfg, acc, ids: torch.Tensor, g: torch.Generator):
    """Forward-noised cached x_0: the noise, hence the denoising target, is known."""
    return cached_batch(run.forget, ids, g, run.schedule, acc.device)


def partial_sampler(cfg, pipe, schedule: Schedule) -> Sampler | None:
    """The sampler partial runs stop inside (None for cached x_0), at the forget set's steps."""
    if cfg.xt_source == "cached":
        return None
    return schedule.sampler(forget_sampling(cfg, pipe)[0])


def _partial_xt(sampler: str):
    """ESD's x_t: guided sampling from noise with the model being trained or the frozen base."""

    def draw(run, cfg, acc, ids: torch.Tensor, g: torch.Generator):
        raw = acc.unwrap_model(run.denoiser)
        predict = run.family.predictor(raw) if sampler == "train" else run.teacher
        shape = run.family.latent_shape(run.pipe, cfg.resolution)
        guidance = forget_sampling(cfg, run.pipe)[1]
        with acc.autocast():
            return partial_batch(
                predict, run.forget, ids, g, run.sampler, guidance, shape, acc.device
            )

    return draw


def _trajectory_xt(run, cfg, acc, ids: torch.Tensor, g: torch.Generator):
    """ESD's x_t (partial sampling with the base) drawn from the sampled trajectory pool."""
    return trajectory_batch(run.forget, ids, g, run.sampler, acc.device)


# The x_t source slot: name -> fn(run, cfg, acc, ids [B], generator) -> ItemBatch.
XT_SOURCES = {
    "cached": _cached_xt,
    "trajectory": _trajectory_xt,
    "partial-train": _partial_xt("train"),
    "partial-base": _partial_xt("base"),
}


def cached_batch(
    forget: ItemSet, ids: torch.Tensor, g: torch.Generator, schedule: Schedule, device
) -> ItemBatch:
    """Forward-noise one cached sample of each item at a time the schedule draws."""
    n_samples = forget.x0.shape[1]
    pick = torch.randint(0, n_samples, (len(ids),), generator=g)
    x0 = forget.x0[ids, pick]
    t = schedule.draw_times(len(ids), g)
    noise = torch.randn(x0.shape, generator=g)
    xt = schedule.add_noise(x0, t, noise)
    return _batch(forget, ids, xt, t, schedule.target(x0, t, noise), device)


def partial_batch(
    predict,
    forget: ItemSet,
    ids: torch.Tensor,
    g: torch.Generator,
    sampler: Sampler,
    guidance: float,
    shape,
    device,
) -> ItemBatch:
    """ESD's x_t: guided sampling from noise down to a random step shared by the batch."""
    stop = int(torch.randint(0, len(sampler.timesteps), (1,), generator=g))
    noise = torch.randn((len(ids), *shape), generator=g).to(device)
    cond = forget.cond[ids].to(device)
    uncond = forget.uncond.expand(len(ids), -1, -1).to(device)
    xt = sampler.sample(predict, cond, uncond, noise, guidance, stop=stop)
    t = sampler.timesteps[stop].repeat(len(ids))
    return _batch(forget, ids, xt, t, None, device)


def _batch(forget: ItemSet, ids, xt, t, target, device) -> ItemBatch:
    b = len(ids)
    anchor = forget.anchor.expand(b, -1, -1).to(device) if forget.anchor is not None else None
    return ItemBatch(
        xt=xt.to(device),
        t=t.to(device),
        cond=forget.cond[ids].to(device),
        uncond=forget.uncond.expand(b, -1, -1).to(device),
        anchor=anchor,
        target=target.to(device) if target is not None else None,
        ids=ids,
        prompt=None if forget.prompt is None else forget.prompt[ids].to(device),
    )


def trajectory_batch(
    forget: ItemSet, ids: torch.Tensor, g: torch.Generator, sampler: Sampler, device
) -> ItemBatch:
    """ESD's x_t from the pool: for each item a trajectory of its prompt and a stop, each
    drawn uniformly; t is the sampler's time at the stop. The target stays unknown, as with
    partial sampling."""
    rows = forget.pool_of[ids]
    pick = torch.randint(0, forget.pool.shape[1], (len(ids),), generator=g)
    stop = torch.randint(0, forget.pool.shape[2], (len(ids),), generator=g)
    xt = forget.pool[rows, pick, stop]
    return _batch(forget, ids, xt, sampler.timesteps.cpu()[stop], None, device)
