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

# the conditioning's names are re-exported: callers import them from the family seam
from .conditioning import Cond, cat_cond, embeds_kwargs, sdxl_time_ids, unet_kwargs  # noqa: F401
from .text_encoders import PromptEncoder, ids_flux, ids_one_clip, ids_sd3, ids_two_clips

if TYPE_CHECKING:
    import torch


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
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    for enc in encoders:
        enc.to(device)
    emb, _, pooled, _ = pipe.encode_prompt(
        prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    for enc in encoders:
        enc.to("cpu")
    native = family_of(pipe).native_size(pipe)
    return Cond(emb.float(), pooled.float(), sdxl_time_ids(size, native, len(prompts), emb))


def _on_device(encoders, device):
    for enc in encoders:
        if enc is not None:
            enc.to(device)


def encode_sd3(pipe, prompts: list[str], device, size: int | None = None) -> Cond:
    """SD3: two CLIP encoders and T5 through the pipeline's own ``encode_prompt``: -> ``Cond``
    with emb [P, 77 + L_t5, D_t5] (zeros for T5 where the pipeline was loaded without it) and
    pooled [P, 2 x CLIP width]."""
    encoders = (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
    _on_device(encoders, device)
    emb, _, pooled, _ = pipe.encode_prompt(
        prompts, None, None, device=device, num_images_per_prompt=1,
        do_classifier_free_guidance=False, **family_of(pipe).pipe_kwargs(pipe),
    )  # fmt: skip
    _on_device(encoders, "cpu")
    return Cond(emb.float(), pooled.float())


def encode_flux(pipe, prompts: list[str], device, size: int | None = None) -> Cond:
    """FLUX: T5 tokens and CLIP's pooled embedding through the pipeline's ``encode_prompt``, at
    the T5 tokenizer's length (512 for FLUX.1's): -> ``Cond`` emb [P, L, 4096], pooled [P, 768]."""
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    _on_device(encoders, device)
    emb, pooled, _ = pipe.encode_prompt(
        prompts, None, device=device, num_images_per_prompt=1, **family_of(pipe).pipe_kwargs(pipe)
    )
    _on_device(encoders, "cpu")
    return Cond(emb.float(), pooled.float())


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


# The text stream of MMDiT's joint attention: its own query/key/value and output projections.
# Image queries read the text through add_k_proj and add_v_proj, as a UNet's read it through
# attn2.to_k and attn2.to_v, so these are the cross-attention analogue.
TEXT_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def _text_stream(name: str) -> bool:
    return ".attn." in f".{name}" and name.rsplit(".", 1)[-1] in TEXT_STREAM


def _text_kv(name: str) -> bool:
    return ".attn." in f".{name}" and name.rsplit(".", 1)[-1] in ("add_k_proj", "add_v_proj")


# The same four names over an MMDiT transformer (SD3, FLUX): esd-x trains the joint blocks'
# text-stream attention, esd-x-strict its keys and values, esd-u everything else.
MMDIT_PRESETS: dict[str, Callable[[str], bool]] = {
    "esd-x": _text_stream,
    "esd-x-strict": _text_kv,
    "esd-u": lambda name: not _text_stream(name),
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
        call_kwargs: fn(conditioning) -> the denoiser's keyword arguments (with ``t``
            positional), for the UNet families.
        schedule: the ``SCHEDULES`` entry its noise follows.
        presets: parameter preset name -> predicate on module names (``UNET_PRESETS`` or
            ``MMDIT_PRESETS``: the same four names, each family's own modules).
        lora_layers: the ``save_lora_weights`` keyword of the denoiser's adapters.
        lora_prefix: the denoiser's key prefix in LoRA files.
        kohya_version: fn(denoiser) -> kohya's ``ss_base_model_version``; None: no kohya copy.
        single_file: fn(pipe) -> the web UIs' single-file state dict (SD 1.x's LDM layout);
            None where loreun has no such converter for the family.
        text_encoders: the pipeline attributes of the encoders that read the prompt, in the
            order of its ``prompt``, ``prompt_2``, ``prompt_3`` arguments.
        t5_encoder: which of them is T5 (its token length is ``pipe_kwargs``'), or None.
        ids_encoder: fn(family, pipe, {encoder name: [B, L] ids}, size) -> what ``encode``
            gives, with gradient (``pipelines/text_encoders.py``; ``encode_ids`` calls it).
        token_sequence: the encoders whose tokens make up the conditioning's sequence, in
            order (SDXL's two CLIPs share positions; SD3 puts T5's after CLIP's).
        uce_module: fn(module name) -> which conditioning a linear map reads, where UCE's
            closed form edits it ("tokens" or "pooled"), else None (``erase/uce.py``).
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
    kohya_version: Callable | None = _sd_kohya_version
    single_file: Callable | None = None  # set to to_ldm below, for SD 1.x
    text_encoders: tuple[str, ...] = ("text_encoder",)
    t5_encoder: str | None = None
    ids_encoder: Callable = ids_one_clip
    token_sequence: tuple[str, ...] = ("text_encoder",)
    uce_module: Callable = lambda name: "tokens" if _cross_attn_kv(name) else None  # noqa: E731
    own_loop: bool = False

    def denoiser(self, pipe):
        """The module an erasure trains."""
        return getattr(pipe, self.denoiser_attr)

    @property
    def denoiser_name(self) -> str:
        """What cards, help and errors call the denoiser: "UNet" or "transformer"."""
        return "UNet" if self.denoiser_attr == "unet" else self.denoiser_attr

    def prompt_encoders(self, pipe) -> list[PromptEncoder]:
        """The loaded encoders that read the prompt, each with its tokenizer and token length
        (an encoder the pipeline was loaded without, as SD3 without T5, is left out)."""
        found = []
        for name in self.text_encoders:
            module = getattr(pipe, name, None)
            if module is None:
                continue
            tokenizer = getattr(pipe, name.replace("text_encoder", "tokenizer"))
            length = tokenizer.model_max_length
            if name == self.t5_encoder:
                length = self.pipe_kwargs(pipe)["max_sequence_length"]
            found.append(PromptEncoder(name, tokenizer, module, length))
        return found

    def encode_ids(self, pipe, ids: dict, size=None):
        """The conditioning of token ids ({encoder name: [B, L]}), as ``encode`` gives it for
        the same prompts, with gradient; ``size`` as ``encode``'s (or (height, width))."""
        return self.ids_encoder(self, pipe, ids, size)

    def predict(self, module, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """One denoiser call: [B, C, H, W], [B] timesteps, conditioning of B -> [B, C, H, W] in
        the model's parametrisation (noise, v, or a flow's velocity)."""
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

    def image_seq_len(self, pipe, resolution: int | None = None) -> int | None:
        """Image tokens the denoiser sees, for schedules that shift with it; None for a UNet."""
        return None

    def max_size(self, pipe) -> int | None:
        """The largest pixel size the denoiser can take, where it has one; None: no bound."""
        return None

    def forget_sampling(self, pipe, steps: int, guidance: float) -> tuple[int, float]:
        """(steps, guidance) the forget set is sampled with, given --sample-steps and
        --sample-guidance: those, unless the model is meant to be sampled otherwise."""
        return steps, guidance

    def check_size(self, pipe, size: int | None, flag: str) -> None:
        """Refuse a size the denoiser cannot take, naming ``flag``, before any work."""
        largest = self.max_size(pipe)
        if size is not None and largest is not None and size > largest:
            raise ValueError(
                f"{flag}: {size} px is above the largest size this {type(pipe).__name__} "
                f"takes, {largest} px (its position embeddings end there)"
            )

    def unpack(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline's own latents of a ``height`` x ``width`` image as [B, C, h, w]."""
        return latents

    def guidance_kind(self, pipe) -> str:
        """How the pipeline's ``guidance_scale`` acts, for generate's manifest."""
        return "classifier-free"

    def pipe_kwargs(self, pipe) -> dict:
        """Keyword arguments of the pipeline's ``encode_prompt`` and ``__call__`` that erasing
        and generating must share (the T5 length of SD3 and FLUX)."""
        return {}


@dataclass(frozen=True)
class SD3Family(Family):
    """SD3 and SD3.5: an MMDiT over 2x2 patches, prompts through two CLIPs and T5."""

    def predict(self, module, x, t, cond):
        return module(
            x, timestep=t, encoder_hidden_states=cond.emb, pooled_projections=cond.pooled
        ).sample

    def image_seq_len(self, pipe, resolution=None) -> int:
        _, h, w = self.latent_shape(pipe, resolution)
        p = self.denoiser(pipe).config.patch_size
        return (h // p) * (w // p)

    def max_size(self, pipe) -> int | None:
        """``pos_embed_max_size`` patches a side (SD3's transformer crops its embeddings)."""
        config = self.denoiser(pipe).config
        patches = config.get("pos_embed_max_size")
        return None if patches is None else patches * config.patch_size * self.vae_scale(pipe)

    def pipe_kwargs(self, pipe) -> dict:
        """T5's tokens: the pipeline's default 256 with T5; without it they are zeros, and
        loreun pads them to the CLIP length (77 for SD3) instead of 256 tokens that carry
        nothing (our choice; the built-in ``digits-flow`` model was trained so)."""
        if pipe.text_encoder_3 is None:
            return {"max_sequence_length": pipe.tokenizer.model_max_length}
        return {"max_sequence_length": 256}


# FLUX.1-dev embeds its guidance instead of running an unconditional pass. While erasing, the
# student and the teacher see guidance 1, where a guidance-distilled model answers as the plain
# conditional prediction, the term ESD's target is built from (our choice; docs/design-notes.md).
FLUX_TRAIN_GUIDANCE = 1.0
# FLUX.1-schnell's steps (its model card's, and what it was distilled for)
SCHNELL_STEPS = 4


@dataclass(frozen=True)
class FluxFamily(Family):
    """FLUX.1: an MMDiT over packed 2x2 latent patches with rotary image and text ids, T5
    tokens and a pooled CLIP embedding; dev embeds its guidance, schnell has none.

    Latents stay [B, C, H, W] everywhere above this class: ``predict`` packs them into
    [B, H/2 * W/2, 4C] tokens for the transformer and unpacks its answer.
    """

    def predict(self, module, x, t, cond):
        import torch

        b, c, h, w = x.shape
        tokens = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        tokens = tokens.reshape(b, (h // 2) * (w // 2), c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device, dtype=x.dtype)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device, dtype=x.dtype)[None, :]
        txt_ids = torch.zeros(cond.emb.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = None
        if getattr(module, "module", module).config.guidance_embeds:  # DDP wraps it
            guidance = torch.full((b,), FLUX_TRAIN_GUIDANCE, device=x.device, dtype=torch.float32)
        out = module(
            tokens,
            timestep=t / 1000,  # as FluxPipeline: the transformer scales it back
            encoder_hidden_states=cond.emb,
            pooled_projections=cond.pooled,
            img_ids=img_ids.reshape(-1, 3),
            txt_ids=txt_ids,
            guidance=guidance,
        ).sample
        out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)

    def native_size(self, pipe) -> int:
        """FLUX's transformer config names no size: the pipeline's default (1024 for FLUX.1)."""
        return pipe.default_sample_size * self.vae_scale(pipe)

    def latent_shape(self, pipe, resolution=None) -> tuple[int, int, int]:
        size = (resolution or self.native_size(pipe)) // self.vae_scale(pipe)
        return self.denoiser(pipe).config.in_channels // 4, size, size

    def image_seq_len(self, pipe, resolution=None) -> int:
        _, h, w = self.latent_shape(pipe, resolution)
        return (h // 2) * (w // 2)

    def pipe_kwargs(self, pipe) -> dict:
        """T5's length: FLUX.1's 512 (the pipeline's default), or a shorter tokenizer's own."""
        return {"max_sequence_length": min(512, pipe.tokenizer_2.model_max_length)}

    def forget_sampling(self, pipe, steps: int, guidance: float) -> tuple[int, float]:
        """FLUX.1-schnell is timestep-distilled: it is sampled in a few steps without guidance
        (guidance 1 is the conditional prediction alone), as its pipeline samples it; dev as
        asked."""
        if self.denoiser(pipe).config.guidance_embeds:
            return steps, guidance
        return min(steps, SCHNELL_STEPS), 1.0

    def unpack(self, pipe, latents, height: int, width: int):
        """FluxPipeline's latents are packed tokens [B, h/2 * w/2, 4C]."""
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def guidance_kind(self, pipe) -> str:
        if self.denoiser(pipe).config.guidance_embeds:
            return "embedded (guidance-distilled, no unconditional pass)"
        return "none (timestep-distilled)"


# UCE's maps in an MMDiT: every text token enters through context_embedder, the pooled text
# embedding through the first layer of time_text_embed's text projection (erase/uce.py).
MMDIT_UCE = {"context_embedder": "tokens", "time_text_embed.text_embedder.linear_1": "pooled"}

# What the MMDiT flow families share: a transformer under flow matching, its LoRA names, no
# kohya copy (ComfyUI reads diffusers' keys) and no single-file layout.
MMDIT = dict(
    uce_module=MMDIT_UCE.get,
    denoiser_attr="transformer",
    schedule="flow",
    presets=MMDIT_PRESETS,
    lora_layers="transformer_lora_layers",
    lora_prefix="transformer",
    kohya_version=None,
    single_file=None,
)


def _ldm_single_file(pipe) -> dict:
    """SD 1.x's web-UI layout (``pipelines/single_file.py``; SD 2.x-shaped UNets are refused)."""
    from .single_file import to_ldm

    return to_ldm(pipe, denoiser(pipe))


FAMILIES = {
    "StableDiffusionPipeline": Family(
        "StableDiffusionPipeline",
        encode_one_clip,
        single_file=_ldm_single_file,
        own_loop=True,
    ),
    "StableDiffusionXLPipeline": Family(
        "StableDiffusionXLPipeline",
        encode_two_clips,
        kohya_version=lambda denoiser: "sdxl_base_v1-0",
        text_encoders=("text_encoder", "text_encoder_2"),
        ids_encoder=ids_two_clips,
    ),
    "StableDiffusion3Pipeline": SD3Family(
        "StableDiffusion3Pipeline",
        encode_sd3,
        **MMDIT,
        text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
        t5_encoder="text_encoder_3",
        ids_encoder=ids_sd3,
        token_sequence=("text_encoder", "text_encoder_3"),
    ),
    "FluxPipeline": FluxFamily(
        "FluxPipeline",
        encode_flux,
        **MMDIT,
        text_encoders=("text_encoder", "text_encoder_2"),
        t5_encoder="text_encoder_2",
        ids_encoder=ids_flux,
        token_sequence=("text_encoder_2",),
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
