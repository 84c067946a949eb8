"""The schedule seam: everything that depends on how a model's noise is added and removed.

A schedule answers, for one kind of forward process:

* which training times to draw, and the shared grid that probes an item's difficulty;
* a time's place in [0, 1), so that LoReUn can compare losses observed at different times;
* the forward noising x_t of a clean latent, and the denoising target a perfect model predicts
  there, in the model's own parametrisation;
* the sampler that partial runs, cached x_t and trajectory pools use.

``SCHEDULES`` is the table, keyed by the name a family gives (``pipelines/family.py``). Every
other module asks it; none computes ``alphas_cumprod`` or a DDIM step itself. The only entry
today is ``ddpm``: a discrete DDPM process with integer timesteps, whose models predict the
noise (``epsilon``, SD 1.x) or the velocity (``v_prediction``, SD 2.x 768; Salimans & Ho 2022).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .family import cat_cond, family_of

PREDICTION_TYPES = ("epsilon", "v_prediction")

# A denoiser as the schedules call it: (x_t [B, C, H, W], t [B], conditioning) -> [B, C, H, W].
Predictor = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


class Sampler(Protocol):
    """What a schedule's sampler gives: its inference times [K], from the noisiest, guided
    sampling that may stop early, and whole trajectories (shapes as ``DDIMSampler``)."""

    timesteps: torch.Tensor

    def sample(self, predict: Predictor, cond, uncond, latents, guidance, stop=None): ...

    def trajectory(self, predict: Predictor, cond, uncond, latents, guidance): ...


class Schedule(Protocol):
    """A schedule table entry's contract (shapes as ``DDPMSchedule``)."""

    name: str
    prediction_type: str

    def draw_times(self, n: int, generator: torch.Generator) -> torch.Tensor: ...

    def probe_times(self, k: int) -> torch.Tensor: ...

    def bucket(self, t: torch.Tensor, buckets: int) -> torch.Tensor: ...

    def add_noise(self, x0, t, noise) -> torch.Tensor: ...

    def target(self, x0, t, noise) -> torch.Tensor: ...

    def sampler(self, steps: int) -> Sampler: ...


def prediction_type(scheduler_config) -> str:
    """The model's parametrisation from its scheduler config; any other one is an error."""
    kind = dict(scheduler_config).get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(
            f"model predicts {kind!r}; loreun supports prediction_type "
            f"{' and '.join(PREDICTION_TYPES)}"
        )
    return kind


@dataclass
class DDPMSchedule:
    """The discrete forward process q(x_t | x_0) of DDPM models, and the target they predict.

    Attributes:
        alphas_cumprod: [T] cumulative products of the scheduler's alphas.
        prediction_type: "epsilon" or "v_prediction".
        config: the pipeline scheduler's config, from which the sampler takes its betas.
    """

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    config: dict = field(default_factory=dict)

    name = "ddpm"

    @classmethod
    def from_scheduler(cls, scheduler) -> DDPMSchedule:
        config = dict(scheduler.config)
        return cls(scheduler.alphas_cumprod.float().cpu(), prediction_type(config), config)

    def __len__(self) -> int:
        """T, the number of training timesteps."""
        return len(self.alphas_cumprod)

    def draw_times(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """[n] training timesteps, uniform over 0..T-1 as DDPM models were trained."""
        return torch.randint(0, len(self), (n,), generator=generator)

    def probe_times(self, k: int) -> torch.Tensor:
        """[k] evenly spaced timesteps, each at the middle of its 1/k of the range."""
        n = len(self)
        return torch.arange(k) * n // k + n // (2 * k)

    def bucket(self, t: torch.Tensor, buckets: int) -> torch.Tensor:
        """[B] times -> [B] indices of ``buckets`` equal slices of the time range, for comparing
        losses observed at different times."""
        return (t.long().cpu() * buckets // len(self)).clamp(0, buckets - 1)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor):
        a = self.alphas_cumprod.to(like.device)[t.to(like.device)].float().view(-1, 1, 1, 1)
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for [B, C, H, W] x_0, noise and [B] t."""
        s, n = self._coefficients(t, x0)
        return (s * x0.float() + n * noise.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What a perfect model predicts at (x_t, t): eps, or v = sqrt(abar) eps - sqrt(1-abar) x_0.

        Shapes as ``add_noise``; returns [B, C, H, W] in float32.
        """
        if self.prediction_type == "epsilon":
            return noise.float()
        s, n = self._coefficients(t, x0)
        return s * noise.float() - n * x0.float()

    def sampler(self, steps: int) -> DDIMSampler:
        """Deterministic DDIM with the model's own betas, at ``steps`` inference steps."""
        return DDIMSampler(self.config, steps)


class DDIMSampler:
    """Guided DDIM sampling for partial runs (ESD's x_t), cached samples and trajectory pools.

    Attributes:
        timesteps: [K] the inference timesteps, from the noisiest.
    """

    def __init__(self, scheduler_config: dict, steps: int):
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        self.scheduler.set_timesteps(steps)
        self.timesteps = self.scheduler.timesteps

    @torch.no_grad()
    def sample(self, predict: Predictor, cond, uncond, latents, guidance, stop=None):
        """Guided sampling from pure noise ``latents``, stopping before step index ``stop``.

        Conditional and unconditional predictions share one batched call per step.

        Args:
            cond, uncond: [B, L, D] embeddings (or the family's conditioning).
            latents: [B, C, H, W] initial noise (scaled by the scheduler's init sigma).
            stop: run ``timesteps[:stop]``; None runs them all and returns x_0.

        Returns:
            [B, C, H, W] latents at ``timesteps[stop]`` (or x_0).
        """
        x = latents * self.scheduler.init_noise_sigma
        emb = cat_cond([cond, uncond])
        for t in self.timesteps[:stop]:
            x = self._guided_step(predict, emb, x, t, guidance)
        return x

    @torch.no_grad()
    def trajectory(self, predict: Predictor, cond, uncond, latents, guidance) -> torch.Tensor:
        """Every latent ``sample`` can stop at, from one full run: -> [B, K, C, H, W] with
        [:, k] the latent at ``timesteps[k]``, equal to ``sample(..., stop=k)`` from the same
        noise. x_0 itself is never a stop, so it is not kept."""
        x = latents * self.scheduler.init_noise_sigma
        emb = cat_cond([cond, uncond])
        kept = []
        for t in self.timesteps:
            kept.append(x.cpu())
            x = self._guided_step(predict, emb, x, t, guidance)
        return torch.stack(kept, dim=1)

    def _guided_step(self, predict: Predictor, emb, x: torch.Tensor, t, guidance: float):
        """One guided step at timestep ``t``: [B, C, H, W] -> [B, C, H, W]."""
        tt = t.repeat(2 * len(x)).to(x.device)
        e_c, e_u = predict(torch.cat([x, x]), tt, emb).chunk(2)
        return self.scheduler.step(e_u + guidance * (e_c - e_u), t, x).prev_sample


# The schedule table: the name a family gives -> the class built from a pipeline's scheduler.
SCHEDULES = {"ddpm": DDPMSchedule}


def schedule_of(pipe):
    """The pipeline's noise schedule, from the table entry its family names."""
    return SCHEDULES[family_of(pipe).schedule].from_scheduler(pipe.scheduler)


def sd1_scheduler():
    """DDIM with Stable Diffusion 1.x's noise schedule, as its pipelines are configured (the
    built-in models and the tiny test pipelines use it)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
