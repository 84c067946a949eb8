"""Prompt conditioning as the denoisers take it: a [B, L, D] tensor, or a ``Cond`` where a family
needs more (pooled embeddings, SDXL's time ids). Family-blind, so both the family table
(``family.py``) and the token-id encoders (``text_encoders.py``) build on it without importing
each other; ``family.py`` re-exports these names.

Imports no torch at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class Cond:
    """Prompt conditioning of B prompts for a family with more than token embeddings.

    SD 1.x and 2.x condition on a plain [B, L, D] tensor, which every helper below accepts as
    well; SDXL, SD3 and FLUX also need a pooled embedding, and SDXL the size "time ids". Cond
    supports the few tensor operations the layers above use (indexing, ``expand``,
    ``repeat_interleave``, ``to``, ``len``), so they stay family-blind.

    Attributes:
        emb: [B, L, D] token embeddings (SDXL: both encoders' concatenated; SD3: the CLIP and
            T5 tokens; FLUX: T5's).
        pooled: [B, P] pooled text embedding.
        time_ids: [B, 6] SDXL's (original h, w, crop top, left, target h, w), or None.
    """

    emb: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.emb)

    def _map(self, fn) -> Cond:
        extra = None if self.time_ids is None else fn(self.time_ids)
        return Cond(fn(self.emb), fn(self.pooled), extra)

    def __getitem__(self, idx) -> Cond:
        return self._map(lambda t: t[idx])

    def expand(self, n: int, *_) -> Cond:
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def repeat_interleave(self, repeats: int, dim: int = 0) -> Cond:
        return self._map(lambda t: t.repeat_interleave(repeats, dim=dim))

    def to(self, *args, **kwargs) -> Cond:
        return self._map(lambda t: t.to(*args, **kwargs))


def embeds_kwargs(cond) -> dict:
    """A conditioning of B prompts as a diffusers pipeline's ``prompt_embeds`` arguments."""
    if isinstance(cond, Cond):
        return {"prompt_embeds": cond.emb, "pooled_prompt_embeds": cond.pooled}
    return {"prompt_embeds": cond}


def cat_cond(conds: list):
    """Concatenate conditionings along the batch, tensors or ``Cond`` alike."""
    import torch

    if not isinstance(conds[0], Cond):
        return torch.cat(conds)
    extra = None if conds[0].time_ids is None else torch.cat([c.time_ids for c in conds])
    return Cond(torch.cat([c.emb for c in conds]), torch.cat([c.pooled for c in conds]), extra)


def unet_kwargs(cond) -> dict:
    """The keyword arguments of a diffusers ``UNet2DConditionModel`` call for a conditioning."""
    if isinstance(cond, Cond):
        extra = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        return {"encoder_hidden_states": cond.emb, "added_cond_kwargs": extra}
    return {"encoder_hidden_states": cond}


def sdxl_time_ids(size, native: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """SDXL's time ids [n, 6] of an uncropped image of ``size`` pixels a side, or (height,
    width) (default: ``native``, the model's size), on ``like``'s device."""
    import torch

    h, w = size if isinstance(size, tuple) else (size, size)
    h, w = h or native, w or native
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)
    return time_ids.expand(n, -1).to(like.device)
