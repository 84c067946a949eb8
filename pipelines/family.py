"""The family seam: everything that depends on which diffusers pipeline a model is.

A ``Family`` says, for one pipeline class: which module denoises (``pipe.unet`` for the UNet
families), how prompts are encoded and handed to it, its latent shape and native image size,
the parameter presets an erasure trains, the LoRA keyword and key prefix diffusers and kohya
use, which schedule (``pipelines/schedule.py``) its noise follows, and which of loreun's
features it supports. ``FAMILIES`` is the literal table, keyed by the pipeline class name that a
model's ``model_index.json`` gives. Nothing else under ``erase/``, ``eval/`` or ``pipelines/``
reaches for ``pipe.unet`` or computes a native size.

This module imports no torch at load time, so the CLI can list the supported pipelines cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


# ----------------------------------------------------------------------------- conditioning


@dataclass
class Cond:
    """Prompt conditioning of B prompts for a family with extra inputs (SDXL).

    SD 1.x and 2.x condition on a plain [B, L, D] tensor, which every helper below accepts as
    well; SDXL also needs the second text encoder's pooled embedding and the size "time ids".
    Cond supports the few tensor operations the layers above use (indexing, ``expand``,
    ``repeat_interleave``, ``to``, ``len``), so they stay family-blind.

    Attributes:
        emb: [B, L, D] token embeddings (both encoders' concatenated for SDXL).
        pooled: [B, P] pooled embedding of the second text encoder.
        time_ids: [B, 6] (original h, w, crop top, left, target h, w).
    """

    emb: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.emb)

    def __getitem__(self, idx) -> Cond:
        return Cond(self.emb[idx], self.pooled[idx], self.time_ids[idx])

    def expand(self, n: int, *_) -> Cond:
        return Cond(
            self.emb.expand(n, -1, -1), self.pooled.expand(n, -1), self.time_ids.expand(n, -1)
        )

    def repeat_interleave(self, repeats: int, dim: int = 0) -> Cond:
        return Cond(*(t.repeat_interleave(repeats, dim=dim) for t in self._parts()))

    def to(self, *args, **kwargs) -> Cond:
        return Cond(*(t.to(*args, **kwargs) for t in self._parts()))

    def _parts(self) -> tuple[torch.Tensor, ...]:
        return self.emb, self.pooled, self.time_ids


def cat_cond(conds: list):
    """Concatenate conditionings along the batch, tensors or ``Cond`` alike."""
    import torch

    if isinstance(conds[0], Cond):
        return Cond(*(torch.cat(parts) for parts in zip(*(c._parts() for c in conds))))
    return torch.cat(conds)


def unet_kwargs(cond) -> dict:
    """The keyword arguments of a diffusers ``UNet2DConditionModel`` call for a conditioning."""
    if isinstance(cond, Cond):
        extra = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        return {"encoder_hidden_states": cond.emb, "added_cond_kwargs": extra}
    return {"encoder_hidden_states": cond}


def encode_one_clip(pipe, prompts: list[str], device, size: int | None = None):
    """SD 1.x/2.x: the text encoder's last hidden state, as their pipelines use it: -> [P, L, D]
    float32. ``size`` is unused: these models take no size conditioning."""
    tok = pipe.tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    )
    enc = pipe.text_encoder.to(device)
    emb = enc(tok.input_ids.to(device))[0]
    pipe.text_encoder.to("cpu")
    return emb.float()


def encode_two_clips(pipe, prompts: list[str], device, size: int | None = None) -> Cond:
    """SDXL: both encoders through the pipeline's own ``encode_prompt``, plus the time ids of a
    ``size`` x ``size`` image (default: the native size): -> ``Cond`` of P prompts."""
    import torch

    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    for enc in encoders:
        enc.to(device)
    emb, _, pooled, _ = pipe.encode_prompt(
        prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    for enc in encoders:
        enc.to("cpu")
    size = size or family_of(pipe).native_size(pipe)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
    return Cond(emb.float(), pooled.float(), time_ids.expand(len(prompts), -1).to(emb.device))


# ----------------------------------------------------------------------------- presets


def _in_cross_attn(name: str) -> bool:
    return ".attn2." in f".{name}."


def _cross_attn_kv(name: str) -> bool:
    return _in_cross_attn(name) and (name.endswith("attn2.to_k") or name.endswith("attn2.to_v"))


# ESD's presets over a UNet's Linear and Conv2d modules, by diffusers module name.
UNET_PRESETS: dict[str, Callable[[str], bool]] = {
    "esd-x": _in_cross_attn,
    "esd-x-strict": _cross_attn_kv,
    "esd-u": lambda name: not _in_cross_attn(name),
    "esd-all": lambda name: True,
}


# ----------------------------------------------------------------------------- kohya versions


def _sd_kohya_version(denoiser) -> str:
    """SD 2.x's text encoder (OpenCLIP ViT-H) is 1024 wide, SD 1.x's 768."""
    return "sd_v2" if denoiser.config.cross_attention_dim == 1024 else "sd_v1"


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Family:
    """What loreun needs to know of one diffusers pipeline class.

    Attributes:
        pipeline: the diffusers pipeline class name.
        encode: fn(pipe, prompts [P], device, size) -> [P, L, D] or a ``Cond``.
        denoiser_attr: the pipeline attribute of the module that denoises.
        call_kwargs: fn(conditioning) -> the denoiser's keyword arguments.
        schedule: the ``SCHEDULES`` entry its noise follows.
        presets: parameter preset name -> predicate on module names.
        lora_layers: the ``save_lora_weights`` keyword of the denoiser's adapters.
        lora_prefix: the denoiser's key prefix in LoRA files.
        kohya_version: fn(denoiser) -> kohya's ``ss_base_model_version``.
        single_file: web-UI single-file export is implemented.
        attack: loreun's prefix-token attack is implemented (one CLIP text encoder).
        own_loop: generate's per-image-guidance loop applies (else the pipeline's own call).
    """

    pipeline: str
    encode: Callable
    denoiser_attr: str = "unet"
    call_kwargs: Callable = unet_kwargs
    schedule: str = "ddpm"
    presets: dict = field(default_factory=lambda: UNET_PRESETS)
    lora_layers: str = "unet_lora_layers"
    lora_prefix: str = "unet"
    kohya_version: Callable = _sd_kohya_version
    single_file: bool = True
    attack: bool = False
    own_loop: bool = False

    def denoiser(self, pipe):
        """The module an erasure trains."""
        return getattr(pipe, self.denoiser_attr)

    def predict(self, module, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """One denoiser call: [B, C, H, W], [B], conditioning of B -> [B, C, H, W]."""
        return module(x, t, **self.call_kwargs(cond)).sample

    def predictor(self, module) -> Callable:
        """``module`` as ``fn(x, t, cond) -> [B, C, H, W]``, the form objectives call."""
        return lambda x, t, cond: self.predict(module, x, t, cond)

    def vae_scale(self, pipe) -> int:
        """Pixels per latent cell: 2 ** (number of VAE blocks - 1)."""
        return 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def native_size(self, pipe) -> int:
        """The pixel size the model was trained at."""
        return self.denoiser(pipe).config.sample_size * self.vae_scale(pipe)

    def latent_shape(self, pipe, resolution: int | None = None) -> tuple[int, int, int]:
        """(C, H, W) of the latents of a ``resolution``-pixel image (default: native)."""
        size = (resolution or self.native_size(pipe)) // self.vae_scale(pipe)
        return self.denoiser(pipe).config.in_channels, size, size


FAMILIES = {
    "StableDiffusionPipeline": Family(
        "StableDiffusionPipeline", encode_one_clip, attack=True, own_loop=True
    ),
    "StableDiffusionXLPipeline": Family(
        "StableDiffusionXLPipeline",
        encode_two_clips,
        kohya_version=lambda denoiser: "sdxl_base_v1-0",
    ),
}


def family_of(pipe) -> Family:
    """The family of a loaded pipeline (or a pipeline class), by its class name."""
    cls = pipe if isinstance(pipe, type) else type(pipe)
    if cls.__name__ not in FAMILIES:
        raise ValueError(f"{cls.__name__}: loreun supports {', '.join(FAMILIES)} models")
    return FAMILIES[cls.__name__]


def denoiser(pipe):
    """The pipeline's denoising module, whatever its family calls it."""
    return family_of(pipe).denoiser(pipe)


def native_size(pipe) -> int:
    return family_of(pipe).native_size(pipe)


def encode_prompts(pipe, prompts: list[str], device, size: int | None = None):
    """Encode prompts once with the pipeline's own text encoder(s).

    Args:
        prompts: P prompts; "" is encoded as a prompt like any other.
        size: the pixel size of the images trained on, which SDXL's time ids carry.

    Returns:
        [P, L, D] float32 for SD 1.x/2.x, or a ``Cond`` for SDXL, without gradient: they are
        constants of the run, computed once.
    """
    import torch

    with torch.no_grad():
        return family_of(pipe).encode(pipe, prompts, device, size)
