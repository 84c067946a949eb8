"""The family seam's text side from token ids: each family's prompt conditioning computed from
the token ids of every encoder that reads the prompt, with gradient.

``Family.encode`` calls the pipeline's own ``encode_prompt`` on strings, which is what erasing
and generating need. The attack needs more: prompts whose leading token embeddings it swaps for
optimised ones (``pipelines/prefix_attack.py``), and the found prompt's token ids conditioned
exactly, since ids need not survive a decode and a re-encode. So each family also has an
``encode_ids`` here, which reproduces its pipeline's ``encode_prompt`` step by step (which hidden
state, which pooled output, how the encoders are joined); ``tests/test_attack_families.py``
checks each against the pipeline on the same prompt.

Only ``FAMILIES`` (``pipelines/family.py``) refers to these functions, each called with the
family (``Family.encode_ids``); like it, this module imports no torch at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PromptEncoder:
    """One loaded text encoder that reads the prompt.

    Attributes:
        name: its pipeline attribute ("text_encoder", "text_encoder_2", ...), the key of its
            token ids in ``encode_ids``.
        tokenizer: the pipeline's tokenizer for it.
        module: the encoder.
        length: the token length the family's pipeline pads and cuts its prompts to.
    """

    name: str
    tokenizer: object
    module: object
    length: int

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """[P, length] token ids, as the pipeline tokenizes for this encoder."""
        return self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.length,
            truncation=True,
            return_tensors="pt",
        ).input_ids


def _run(encoder, ids: torch.Tensor, **kwargs):
    return encoder(ids.to(encoder.device), **kwargs)


def _penultimate(encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A CLIP encoder's second-to-last hidden state [B, L, D] and its first output (the pooled
    projection [B, P] of ``CLIPTextModelWithProjection``), as SDXL and SD3 read them."""
    out = _run(encoder, ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def ids_one_clip(family, pipe, ids: dict, size=None) -> torch.Tensor:
    """SD 1.x/2.x: the last hidden state: ``ids["text_encoder"]`` [B, L] -> [B, L, D] float32."""
    return _run(pipe.text_encoder, ids["text_encoder"])[0].float()


def ids_two_clips(family, pipe, ids: dict, size=None):
    """SDXL: both encoders' penultimate hidden states side by side, the second's pooled
    projection, and the time ids of a ``size`` image: -> ``Cond`` of B prompts."""
    import torch

    from .conditioning import Cond, sdxl_time_ids

    first, _ = _penultimate(pipe.text_encoder, ids["text_encoder"])
    second, pooled = _penultimate(pipe.text_encoder_2, ids["text_encoder_2"])
    emb = torch.cat([first, second.to(first.device)], dim=-1).float()
    time_ids = sdxl_time_ids(size, family.native_size(pipe), len(emb), emb)
    return Cond(emb, pooled.float().to(emb.device), time_ids)


def ids_sd3(family, pipe, ids: dict, size=None):
    """SD3: both CLIPs' penultimate states side by side, zero-padded to T5's width, then T5's
    tokens (zeros when loaded without T5); the CLIPs' pooled projections side by side."""
    import torch
    import torch.nn.functional as F

    from .conditioning import Cond

    first, pooled_1 = _penultimate(pipe.text_encoder, ids["text_encoder"])
    second, pooled_2 = _penultimate(pipe.text_encoder_2, ids["text_encoder_2"])
    clip = torch.cat([first, second.to(first.device)], dim=-1)
    if pipe.text_encoder_3 is not None:
        t5 = _run(pipe.text_encoder_3, ids["text_encoder_3"])[0].to(clip.device)
    else:
        length = family.pipe_kwargs(pipe)["max_sequence_length"]
        width = pipe.transformer.config.joint_attention_dim
        t5 = torch.zeros(len(clip), length, width, device=clip.device, dtype=clip.dtype)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    emb = torch.cat([clip, t5.to(clip.dtype)], dim=-2).float()
    pooled = torch.cat([pooled_1, pooled_2.to(pooled_1.device)], dim=-1).float()
    return Cond(emb, pooled.to(emb.device))


def ids_flux(family, pipe, ids: dict, size=None):
    """FLUX: T5's last hidden state for the tokens, CLIP's pooled output."""
    from .conditioning import Cond

    pooled = _run(pipe.text_encoder, ids["text_encoder"], output_hidden_states=False)
    emb = _run(pipe.text_encoder_2, ids["text_encoder_2"], output_hidden_states=False)[0]
    return Cond(emb.float(), pooled.pooler_output.float().to(emb.device))
