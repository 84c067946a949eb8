"""The schedule seam: everything that depends on how a model's noise is added and removed.

A schedule answers, for one kind of forward process:

* which training times to draw, and the shared grid that probes an item's difficulty;
* a time's place in [0, 1), so that LoReUn can compare losses observed at different times;
* the forward noising x_t of a clean latent, and the denoising target a perfect model predicts
  there, in the model's own parametrisation;
* the sampler that partial runs, cached x_t and trajectory pools use.

``SCHEDULES`` is the table, keyed by the name a family gives (``pipelines/family.py``). Every
other module asks it; none computes ``alphas_cumprod`` or a DDIM step itself. The only entry
``ddpm`` is a discrete DDPM process with integer timesteps, whose models predict the noise
(``epsilon``, SD 1.x) or the velocity (``v_prediction``, SD 2.x 768; Salimans & Ho 2022);
``flow`` is rectified flow with continuous sigma, whose models (SD3, FLUX) predict eps - x_0.
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


@dataclass
class FlowSchedule:
    """Rectified flow (SD3, FLUX): x_t = (1 - sigma) x_0 + sigma eps, and the model predicts the
    velocity v = eps - x_0.

    Time is the model's own timestep, ``t = sigma * T`` (T = 1000), a float: the families hand
    it to their transformers as the pipelines do.

    Attributes:
        sigmas: [T] the scheduler's training sigmas, from 1 down (shifted by its ``shift``
            unless it shifts per resolution).
        config: the pipeline scheduler's config.
        image_seq_len: image tokens at the training resolution, for schedulers that shift
            with resolution (FLUX.1-dev's ``use_dynamic_shifting``).
    """

    sigmas: torch.Tensor
    config: dict = field(default_factory=dict)
    image_seq_len: int | None = None

    name = "flow"
    prediction_type = "flow"

    @classmethod
    def from_scheduler(cls, scheduler, image_seq_len: int | None = None) -> FlowSchedule:
        """From a pipeline's scheduler config (its ``sigmas`` change with every
        ``set_timesteps``, so the training table is rebuilt from the config)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        return cls(fresh.sigmas.float().cpu(), dict(scheduler.config), image_seq_len)

    @property
    def steps(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000))

    def __len__(self) -> int:
        return len(self.sigmas)

    def draw_times(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """[n] timesteps drawn as diffusers' SD3 and FLUX trainers draw them: u from a
        logit-normal (mean 0, std 1; Esser et al. 2024, section 3.1), then the training sigma at
        index u * T, so the scheduler's shift applies as in training."""
        u = torch.sigmoid(torch.randn(n, generator=generator))
        index = (u * len(self)).long().clamp(0, len(self) - 1)
        return self.sigmas[index] * self.steps

    def probe_times(self, k: int) -> torch.Tensor:
        """[k] timesteps at the middles of k equal slices of the training sigma table."""
        index = torch.arange(k) * len(self) // k + len(self) // (2 * k)
        return self.sigmas[index] * self.steps

    def bucket(self, t: torch.Tensor, buckets: int) -> torch.Tensor:
        """[B] timesteps -> [B] indices of ``buckets`` equal slices of sigma in [0, 1]."""
        sigma = t.float().cpu() / self.steps
        return (sigma * buckets).long().clamp(0, buckets - 1)

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (t.to(like.device).float() / self.steps).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - sigma) x_0 + sigma eps for [B, C, H, W] x_0, noise and [B] t."""
        s = self._sigma(t, x0)
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity d x_t / d sigma = eps - x_0, whatever the time: [B, C, H, W] float32."""
        return noise.float() - x0.float()

    def sampler(self, steps: int) -> FlowEulerSampler:
        """The pipelines' flow-matching Euler sampler, with their shift, at ``steps`` steps."""
        return FlowEulerSampler(self.config, steps, self.image_seq_len)


class FlowEulerSampler:
    """Guided Euler integration of the flow from sigma = 1 (noise) to 0, on the sigmas the
    pipelines' ``FlowMatchEulerDiscreteScheduler`` gives; the update is
    x <- x + (sigma_next - sigma) v. Guidance is classifier-free on the two predictions.

    Attributes:
        timesteps: [K] the model timesteps sigma * T, from the noisiest.
        sigmas: [K + 1] ending at 0.
    """

    def __init__(self, scheduler_config: dict, steps: int, image_seq_len: int | None = None):
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        if scheduler.config.get("use_dynamic_shifting"):
            # as FluxPipeline: linear sigmas shifted by mu, which grows with the image's tokens
            sigmas = np.linspace(1.0, 1 / steps, steps)
            scheduler.set_timesteps(sigmas=sigmas, mu=flux_shift(scheduler.config, image_seq_len))
        else:
            scheduler.set_timesteps(steps)
        self.sigmas = scheduler.sigmas.float().cpu()
        self.timesteps = scheduler.timesteps.float().cpu()

    @torch.no_grad()
    def sample(self, predict: Predictor, cond, uncond, latents, guidance, stop=None):
        """As ``DDIMSampler.sample``: from noise [B, C, H, W], stopping before step ``stop``."""
        x = latents
        emb = cat_cond([cond, uncond])
        for k in range(len(self.timesteps) if stop is None else stop):
            x = self._guided_step(predict, emb, x, k, guidance)
        return x

    @torch.no_grad()
    def trajectory(self, predict: Predictor, cond, uncond, latents, guidance) -> torch.Tensor:
        """As ``DDIMSampler.trajectory``: -> [B, K, C, H, W], the latent at each timestep."""
        x = latents
        emb = cat_cond([cond, uncond])
        kept = []
        for k in range(len(self.timesteps)):
            kept.append(x.cpu())
            x = self._guided_step(predict, emb, x, k, guidance)
        return torch.stack(kept, dim=1)

    def _guided_step(self, predict: Predictor, emb, x: torch.Tensor, k: int, guidance: float):
        tt = self.timesteps[k].repeat(2 * len(x)).to(x.device)
        v_c, v_u = predict(torch.cat([x, x]), tt, emb).chunk(2)
        v = v_u + guidance * (v_c - v_u)
        return (x.float() + (self.sigmas[k + 1] - self.sigmas[k]) * v.float()).to(x.dtype)


def flux_shift(config, image_seq_len: int | None) -> float:
    """FLUX's resolution-dependent shift mu: linear in the image's token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    if image_seq_len is None:
        raise ValueError("a scheduler that shifts with resolution needs the image's token count")
    base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    return lo + (hi - lo) * (image_seq_len - base) / (top - base)


# The schedule table: the name a family gives -> the class built from a pipeline's scheduler.
SCHEDULES = {"ddpm": DDPMSchedule, "flow": FlowSchedule}


def schedule_of(pipe, resolution: int | None = None):
    """The pipeline's noise schedule, from the table entry its family names, for images of
    ``resolution`` pixels (default: native), which a resolution-shifted schedule needs."""
    family = family_of(pipe)
    entry = SCHEDULES[family.schedule]
    if entry is FlowSchedule:
        return entry.from_scheduler(pipe.scheduler, family.image_seq_len(pipe, resolution))
    return entry.from_scheduler(pipe.scheduler)


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
