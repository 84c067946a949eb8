"""Saliency masks (SalUn, Fan et al., ICLR 2024): train only the weights the forget loss leans on.

The saliency of a weight is the magnitude of the forget loss's gradient over the whole forget
set, ``|grad_theta mean_i l_i|``. The mask keeps the top fraction of the trained weights by
saliency, counted over all trained tensors together (one global threshold, as SalUn does), with
ties at the threshold broken by position so the count is exact.

During training, masked gradients are zeroed before clipping and the optimizer step, and masked
weights are copied back from the frozen originals after it, so they stay bit-identical even under
weight decay (which AdamW applies whatever the gradient).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loreun.pipelines.files import SALIENCY_MASK, atomic_save_safetensors
from loreun.pipelines.runtime import say

from .items import ItemSet
from .streams import SALIENCY_STREAM, step_generator
from .xt_sources import cached_batch


def forget_gradient(
    objective, student, teacher, forget: ItemSet, trained: dict, schedule, seed: int, device
) -> dict[str, torch.Tensor]:
    """Gradient of the mean forget loss over every (item, cached sample) pair: name -> tensor.

    Each pair is forward-noised once at a timestep drawn from a generator of its own, so the
    result does not depend on batching.
    """
    for p in trained.values():
        p.grad = None
    n, s = forget.x0.shape[:2]
    for i in range(n):
        for j in range(s):
            g = step_generator(seed, 0, SALIENCY_STREAM - i * s - j)
            sub = ItemSet(
                forget.cond[i : i + 1],
                forget.uncond,
                forget.anchor,
                forget.x0[i : i + 1, j : j + 1],
            )
            batch = cached_batch(sub, torch.tensor([0]), g, schedule, device)
            losses, _ = objective(student, teacher, batch)
            (losses.sum() / (n * s)).backward()
    grads = {name: p.grad.detach().clone() for name, p in trained.items()}
    for p in trained.values():
        p.grad = None
    return grads


def top_fraction_mask(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Keep exactly ``round(fraction * total)`` entries with the largest scores: name -> bool.

    Args:
        scores: name -> tensor of non-negative saliencies (any shapes).
        fraction: in (0, 1].
    """
    names = list(scores)
    flat = torch.cat([scores[n].detach().float().flatten().cpu() for n in names])
    total = flat.numel()
    keep = max(1, round(fraction * total))
    if keep >= total:
        chosen = torch.ones(total, dtype=torch.bool)
    else:
        threshold = torch.kthvalue(flat, total - keep + 1).values
        chosen = flat > threshold
        ties = flat == threshold
        need = keep - int(chosen.sum())
        chosen |= ties & (torch.cumsum(ties, 0) <= need)
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = chosen[start : start + size].view(scores[n].shape).clone()
        start += size
    return out


def save_mask(path: Path, mask: dict[str, torch.Tensor], key: dict) -> None:
    """Write a mask with the settings it was made under (``key``) in its header."""
    atomic_save_safetensors(path, mask, metadata={"loreun.saliency": json.dumps(key)})


def mask_key(path: Path) -> dict | None:
    """The settings a saved mask was made under, or None when there is none."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("loreun.saliency", "null"))
    except Exception:
        return None


def load_mask(path: str | Path, trained: dict, fingerprint: str, flag: str) -> dict:
    """Read a saved mask and check it covers exactly the trained tensors of this base model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag}: {path}: no such file")
    try:
        with safe_open(str(p), framework="pt") as f:
            key = json.loads((f.metadata() or {}).get("loreun.saliency", "null"))
        mask = load_file(str(p))
    except Exception as e:
        raise ValueError(f"{flag}: {path}: not a saliency mask ({e.__class__.__name__})") from e
    if not isinstance(key, dict):
        raise ValueError(f"{flag}: {path}: not a loreun saliency mask")
    if set(mask) != set(trained):
        raise ValueError(
            f"{flag}: {path}: covers other parameters (made with --method {key.get('method')})"
        )
    if key.get("base_fingerprint") != fingerprint:
        raise ValueError(f"{flag}: {path}: was made for another base model")
    for name, m in mask.items():
        if m.dtype != torch.bool or m.shape != trained[name].shape:
            raise ValueError(f"{flag}: {path}: {name} has the wrong shape or type")
    return mask


def mask_gradients(trained: dict, mask: dict) -> None:
    """Zero the gradient of every masked weight (before clipping and the optimizer step)."""
    for name, p in trained.items():
        if p.grad is not None:
            p.grad.mul_(mask[name].to(p.grad.device, p.grad.dtype))


@torch.no_grad()
def restore_masked(trained: dict, mask: dict, base: dict) -> None:
    """Copy the original value back into every masked weight (after the optimizer step)."""
    for name, p in trained.items():
        m = mask[name].to(p.device)
        p.copy_(torch.where(m, p, base[name].to(p.device, p.dtype)))


def build_mask(cfg, acc, out, *, objective, student, teacher, forget, trained, schedule, base_fp):
    """The saliency mask: loaded from --saliency-mask, reused from OUT, or computed and saved."""
    if cfg.saliency_mask:
        return load_mask(cfg.saliency_mask, trained, base_fp, "--saliency-mask")
    if cfg.saliency is None:
        return None
    path = out / SALIENCY_MASK
    key = {
        "fraction": cfg.saliency,
        "objective": cfg.objective,
        "method": cfg.method,
        "base_fingerprint": base_fp,
        "seed": cfg.seed,
    }
    with acc.main_process_first():
        if mask_key(path) == key:  # a resumed run keeps its mask
            return load_mask(path, trained, base_fp, "--resume")
        say(acc, f"saliency: the forget gradient of {len(forget)} items")
        with acc.autocast():
            grads = forget_gradient(
                objective, student, teacher, forget, trained, schedule, cfg.seed, acc.device
            )
        mask = top_fraction_mask({n: g.abs() for n, g in grads.items()}, cfg.saliency)
        if acc.is_main_process:
            save_mask(path, mask, key)
        return mask
