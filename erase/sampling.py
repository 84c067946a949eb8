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

import copy
from contextlib import contextmanager
from functools import partial

import torch

from loreun.pipelines.conditioning import cat_cond, unet_kwargs

from .objectives import EpsFn


class FrozenTeacher:
    """The original model without a second UNet: frozen copies of the trained tensors only.

    Untrained tensors are shared with the student, so they are already the originals. The teacher
    is a second module tree over the same storage (``shared_copy``): the student's untrained
    tensors and the frozen copies of its trained ones, so a call is a plain forward. (Swapping the
    copies in per call with ``torch.func.functional_call`` cost about 1 ms a call on the digits
    model, 5% of an esd-x step: ``scripts/bench_floor.py --parts``.)

    With ``dtype`` (``--frozen-dtype bf16``) the copies are kept at half size and each module's
    own copies are cast back to the student's dtype only while that module runs, so the teacher
    never holds a full-precision copy of more than one module (its outputs then differ from the
    original model's by the rounding of the stored weights).

    Args:
        unet: the UNet being trained (unwrapped).
        trained: name -> parameter for the tensors that training changes.
        dtype: dtype of the frozen copies; None keeps the trained tensors' own.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        trained: dict[str, torch.nn.Parameter],
        dtype: torch.dtype | None = None,
    ):
        self.unet = unet
        self.base = {n: p.detach().to(dtype or p.dtype, copy=True) for n, p in trained.items()}
        self.exact = all(self.base[n].dtype == p.dtype for n, p in trained.items())
        self._owners = _owners(unet, trained) if not self.exact else []
        self.module = shared_copy(unet, self.base) if self.exact else None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W], [B], [B, L, D] -> [B, C, H, W] predicted noise, without gradient."""
        with torch.no_grad():
            if self.exact:
                out = self.module(x, t, **unet_kwargs(emb))
            else:
                with self._cast_per_module():
                    out = self.unet(x, t, **unet_kwargs(emb))
        return out.sample

    @contextmanager
    def _cast_per_module(self):
        """Hooks that swap each owning module's frozen copies in (cast) and its own tensors back."""
        handles, originals = [], {}

        def swap_in(names, module, args):
            for local, full in names:
                originals[(id(module), local)] = module._parameters[local]
                module._parameters[local] = self.base[full].to(originals[(id(module), local)])

        def swap_out(names, module, args, output):
            for local, _ in names:
                module._parameters[local] = originals.pop((id(module), local))

        try:
            for module, names in self._owners:
                handles.append(module.register_forward_pre_hook(partial(swap_in, names)))
                handles.append(module.register_forward_hook(partial(swap_out, names)))
            yield
        finally:
            for h in handles:
                h.remove()
            for module, names in self._owners:  # after an exception inside a module
                for local, _ in names:
                    if (id(module), local) in originals:
                        module._parameters[local] = originals.pop((id(module), local))


def shared_copy(module: torch.nn.Module, replace: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``module``'s tree that allocates no tensor: every parameter and buffer is the
    original's own, except the parameters named in ``replace``, which become those tensors
    (frozen, same storage).

    ``deepcopy`` consults its memo before copying an object, so pre-filling the memo with each
    tensor's stand-in makes it copy the modules and reuse the tensors.
    """
    memo: dict[int, object] = {}
    for name, p in module.named_parameters(remove_duplicate=False):  # tied tensors: any name
        if name in replace:
            memo[id(p)] = torch.nn.Parameter(replace[name], requires_grad=False)
        else:
            memo.setdefault(id(p), p)
    for b in module.buffers():
        memo[id(b)] = b
    return copy.deepcopy(module, memo)


def _owners(unet: torch.nn.Module, trained: dict) -> list[tuple[torch.nn.Module, list]]:
    """[(module, [(its parameter name, full name)])] for every module owning a trained tensor."""
    owners: dict[str, list] = {}
    for full in trained:
        module_name, _, local = full.rpartition(".")
        owners.setdefault(module_name, []).append((local, full))
    return [(unet.get_submodule(m), names) for m, names in owners.items()]


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
        x = _guided_step(eps, ddim, emb, x, t, guidance)
    return x


def _guided_step(eps: EpsFn, ddim, emb, x: torch.Tensor, t, guidance: float) -> torch.Tensor:
    """One guided DDIM step at timestep ``t``: [B, C, H, W] -> [B, C, H, W]."""
    tt = t.repeat(2 * len(x)).to(x.device)
    e_c, e_u = eps(torch.cat([x, x]), tt, emb).chunk(2)
    return ddim.step(e_u + guidance * (e_c - e_u), t, x).prev_sample


def ddim_trajectory(
    eps: EpsFn, ddim, cond: torch.Tensor, uncond: torch.Tensor, latents: torch.Tensor, guidance
) -> torch.Tensor:
    """Every latent ``ddim_sample`` can stop at, from one full run: -> [B, K, C, H, W] with
    [:, k] the latent at ``ddim.timesteps[k]``, equal to ``ddim_sample(..., stop=k)`` from the
    same noise. K = len(ddim.timesteps); x_0 itself is never a stop, so it is not kept."""
    x = latents * ddim.init_noise_sigma
    emb = cat_cond([cond, uncond])
    kept = []
    for t in ddim.timesteps:
        kept.append(x.cpu())
        x = _guided_step(eps, ddim, emb, x, t, guidance)
    return torch.stack(kept, dim=1)
