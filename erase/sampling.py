"""Where the noisy latents x_t of forget items come from, and the frozen teacher.

Three sources (DESIGN.md section 4):

* ``cached`` (default): sample each forget concept once with the frozen base model, cache the
  latents x_0, and forward-noise them at a random t each step. One student and one teacher call
  per step; the noise is known, so dynamic LoReUn difficulty comes free.
* ``partial-train``: ESD's original recipe, DDIM sampling from noise down to a random step with
  the model being trained (up to ``sample_steps`` guided UNet calls per step).
* ``partial-base``: the same with the frozen base, as ESD's diffusers code does.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from loreun.pipelines.conditioning import cat_cond, unet_kwargs

from .objectives import EpsFn


class FrozenTeacher:
    """The original model without a second UNet: frozen copies of the trained tensors only.

    Untrained tensors are shared with the student, so they are already the originals; the trained
    ones are swapped in for the call through ``torch.func.functional_call``.

    Args:
        unet: the UNet being trained (unwrapped).
        trained: name -> parameter for the tensors that training changes.
    """

    def __init__(self, unet: torch.nn.Module, trained: dict[str, torch.nn.Parameter]):
        self.unet = unet
        self.base = {n: p.detach().clone() for n, p in trained.items()}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W], [B], [B, L, D] -> [B, C, H, W] predicted noise, without gradient."""
        with torch.no_grad():
            out = functional_call(self.unet, self.base, (x, t), unet_kwargs(emb), strict=False)
        return out.sample


def unet_eps(unet: torch.nn.Module) -> EpsFn:
    """Wrap a UNet as ``eps(x, t, emb) -> [B, C, H, W]``."""
    return lambda x, t, emb: unet(x, t, **unet_kwargs(emb)).sample


def make_ddim(scheduler_config: dict, steps: int):
    """A DDIM scheduler with the model's betas, set to ``steps`` inference steps."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(steps)
    return ddim


@torch.no_grad()
def ddim_sample(
    eps: EpsFn,
    ddim,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    latents: torch.Tensor,
    guidance: float,
    stop: int | None = None,
) -> torch.Tensor:
    """Guided DDIM sampling from pure noise ``latents``, stopping before step index ``stop``.

    Conditional and unconditional predictions share one batched call per step.

    Args:
        eps: noise predictor.
        ddim: scheduler from ``make_ddim``.
        cond, uncond: [B, L, D] embeddings.
        latents: [B, C, H, W] initial noise (scaled by the scheduler's init sigma).
        stop: run ``ddim.timesteps[:stop]``; None runs them all and returns x_0.

    Returns:
        [B, C, H, W] latents at ``ddim.timesteps[stop]`` (or x_0).
    """
    x = latents * ddim.init_noise_sigma
    emb = cat_cond([cond, uncond])
    for t in ddim.timesteps[:stop]:
        tt = t.repeat(2 * len(x)).to(x.device)
        e_c, e_u = eps(torch.cat([x, x]), tt, emb).chunk(2)
        x = ddim.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    return x
