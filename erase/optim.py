"""Optimizers for the trained tensors, chosen by what they keep in memory.

Per trained weight, in bytes, besides the weight itself:

* ``adamw`` (default): torch's AdamW, two fp32 moments, 8 bytes. Its fused kernel where the
  tensors allow it: one pass per tensor instead of a dozen (docs/benchmarks.md has the
  figures of ``scripts/bench_floor.py --parts``).
* ``adafactor``: Adafactor without momentum (Shazeer & Stern, 2018). Its second moment is
  factored into a row and a column vector of each tensor's matrix view ``[out, fan_in]``, so a
  ``[1280, 1280, 3, 3]`` convolution keeps 1280 + 11520 numbers instead of 14.7 million. The
  update is normalised like Adam's (RMS clipped to 1), so the learning rate keeps its scale.
* ``adamw8bit``: bitsandbytes' 8-bit AdamW, 2 bytes, where bitsandbytes is installed.

``StepInBackward`` runs each tensor's update as soon as its gradient is complete and frees the
gradient, so the gradients of all trained tensors never exist at once (another 4 bytes per weight).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .config import OPTIMIZERS, EraseConfig  # the one list; config.py stays torch-free


class Adafactor(torch.optim.Optimizer):
    """Adafactor with a fixed learning rate, no momentum and a factored second moment.

    On 1-D and 2-D tensors this is transformers' ``Adafactor(scale_parameter=False,
    relative_step=False, warmup_init=False, beta1=None)`` (tested). Tensors with more dimensions
    are factored over their matrix view ``[shape[0], -1]`` rather than their last two dimensions,
    which for a 3x3 convolution would keep two thirds of the tensor's size.

    Args:
        params: the trained tensors.
        lr: step size; updates have RMS <= ``lr`` (before weight decay).
        weight_decay: decoupled, multiplied by ``lr`` as in AdamW.
        eps: added to the squared gradient, so zero gradients give zero updates without NaN.
        clip_threshold: the update's RMS is clipped to this before ``lr`` scales it.
        decay_rate: the second moment's decay is ``1 - step ** decay_rate``.
    """

    def __init__(
        self,
        params,
        lr: float,
        weight_decay: float = 0.0,
        eps: float = 1e-30,
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            eps=eps,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad.float()
        state = self.state[p]
        factored = grad.ndim >= 2
        view = grad.reshape(grad.shape[0], -1) if factored else grad
        if not state:
            state["step"] = torch.tensor(0.0)
            if factored:
                state["row"] = torch.zeros(view.shape[0], device=grad.device)
                state["col"] = torch.zeros(view.shape[1], device=grad.device)
            else:
                state["sq"] = torch.zeros_like(grad)
        state["step"] += 1
        beta = 1.0 - math.pow(state["step"].item(), group["decay_rate"])
        sq = view.square().add_(group["eps"])
        if factored:
            state["row"].mul_(beta).add_(sq.mean(dim=-1), alpha=1.0 - beta)
            state["col"].mul_(beta).add_(sq.mean(dim=-2), alpha=1.0 - beta)
            r = (state["row"] / state["row"].mean()).rsqrt_().unsqueeze(-1)
            update = (r * state["col"].rsqrt().unsqueeze(-2)).mul_(view)
        else:
            state["sq"].mul_(beta).add_(sq, alpha=1.0 - beta)
            update = state["sq"].rsqrt().mul_(grad)
        rms = update.norm(2) / math.sqrt(update.numel())
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0)).mul_(group["lr"])
        weight = p.float() if p.dtype != torch.float32 else p
        if group["weight_decay"]:
            weight.add_(weight, alpha=-group["weight_decay"] * group["lr"])
        weight.sub_(update.reshape(p.shape))
        if weight is not p:
            p.copy_(weight)


def build_optimizer(
    name: str, params: list[torch.Tensor], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The optimizer ``--optimizer`` names, over ``params``."""
    if name == "adamw":
        if can_fuse(params):
            try:
                return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
            except RuntimeError:  # torch < 2.4 fuses on CUDA only
                pass
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        return Adafactor(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ValueError(
                "--optimizer adamw8bit: needs bitsandbytes (pip install bitsandbytes)"
            ) from e
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"--optimizer: unknown value {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def can_fuse(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these tensors: floating point, on one CPU or CUDA device.

    The fused kernel updates a tensor in one pass where the default loop launches about a dozen
    element-wise ops per tensor; that loop was a quarter of an esd-u step on the digits model.
    """
    devices = {p.device for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)).type in ("cpu", "cuda")
        and all(p.is_floating_point() for p in params)
    )


class StepInBackward:
    """Update each trained tensor inside the backward pass, the moment its gradient is complete.

    A post-accumulate-grad hook steps that tensor's own optimizer and frees its gradient, so peak
    memory holds one tensor's gradient instead of all of them (docs/benchmarks.md). The
    updates equal a normal step for optimizers that update each tensor on its own (AdamW,
    Adafactor), which is why global-norm clipping and gradient accumulation are refused with it.

    It stands in for the optimizer in the trainer: ``step`` and ``zero_grad`` are no-ops, and the
    state dict gathers every tensor's optimizer state.

    Args:
        make: builds an optimizer over a list of tensors.
        trained: name -> trained parameter.
        mask: name -> bool tensor of weights that may change (saliency), applied to the gradient
            before the update; None trains every weight.
    """

    def __init__(self, make: Callable, trained: dict[str, torch.Tensor], mask: dict | None = None):
        self.optimizers = {name: make([p]) for name, p in trained.items()}
        self.mask = mask
        self.handles = [
            p.register_post_accumulate_grad_hook(self._hook(name)) for name, p in trained.items()
        ]

    def _hook(self, name: str) -> Callable:
        optimizer = self.optimizers[name]

        def step_now(p: torch.Tensor) -> None:
            if self.mask is not None:
                p.grad.mul_(self.mask[name].to(p.grad.device, p.grad.dtype))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step_now

    def step(self) -> None:
        """Nothing left to do: every tensor was updated during backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: each gradient was freed after its update."""

    def state_dict(self) -> dict:
        """``state`` lists every tensor's optimizer state (for the finiteness check)."""
        per_tensor = {name: opt.state_dict() for name, opt in self.optimizers.items()}
        state = {name: sd["state"].get(0, {}) for name, sd in per_tensor.items()}
        return {"state": state, "per_tensor": per_tensor}

    def load_state_dict(self, state: dict) -> None:
        if "per_tensor" not in state:
            raise ValueError("--resume: the checkpoint was saved without --step-in-backward")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["per_tensor"][name])

    def remove(self) -> None:
        """Take the hooks off the parameters."""
        for h in self.handles:
            h.remove()


def prepare_optimizer(cfg: EraseConfig, acc, denoiser, trained: dict, mask: dict | None):
    """(the denoiser as accelerate prepares it, the optimizer over the trained tensors).

    With ``--step-in-backward`` the optimizer is a ``StepInBackward`` that updates during
    backward; accelerate does not wrap it (it would step and clip it again).
    """

    def make(params):
        return build_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)

    if not cfg.step_in_backward:
        return acc.prepare(denoiser, make(list(trained.values())))
    if acc.num_processes > 1:
        raise ValueError(
            "--step-in-backward: runs on one process (several would update before the "
            "gradients are averaged)"
        )
    return acc.prepare(denoiser), StepInBackward(make, trained, mask)
