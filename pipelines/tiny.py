"""A tiny, randomly initialised Stable Diffusion pipeline for tests and benchmarks.

Real diffusers and transformers classes at toy size (the shape of diffusers' own
``get_dummy_components``), so every code path that runs on SD-1.x runs here in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _tiny_unet(sample_size: int) -> dict:
    """The UNet settings both tiny families share: two blocks, cross-attention in the lower."""
    return dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2,
        norm_num_groups=4,
    )


def _tiny_text_config(vocab_size: int, hidden: int = 16):
    """A two-layer CLIP text encoder config for loreun's offline 16-token tokenizer."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=hidden,
    )


def make_tiny_pipeline(seed: int = 0, sample_size: int = 8, prediction_type: str = "epsilon"):
    """Build a tiny ``StableDiffusionPipeline`` (32x32 images, 4x8x8 latents by default).

    ``prediction_type="v_prediction"`` gives the parametrisation of SD 2.x 768 models.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .digits_data import build_tokenizer
    from .schedule import sd1_scheduler

    torch.manual_seed(seed)
    tokenizer, vocab, _ = build_tokenizer(max_length=16)
    unet = UNet2DConditionModel(**_tiny_unet(sample_size), cross_attention_dim=16)
    vae = _tiny_vae(sample_size)
    text_encoder = CLIPTextModel(_tiny_text_config(len(vocab)))
    scheduler = sd1_scheduler()
    scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Build and save a tiny pipeline as a diffusers folder; returns the folder."""
    folder = Path(folder)
    pipe = make_tiny_pipeline(seed, prediction_type=prediction_type)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 8):
    """Build a tiny ``StableDiffusionXLPipeline``: two text encoders (the second with a
    projection, whose pooled output and the size time ids condition the UNet), 32x32 images.

    The shape of diffusers' own SDXL ``get_dummy_components``, with loreun's offline tokenizer.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .digits_data import build_tokenizer

    base = make_tiny_pipeline(seed, sample_size)  # the VAE, tokenizer and scheduler
    torch.manual_seed(seed)
    hidden, time_dim = 16, 4
    unet = UNet2DConditionModel(
        **_tiny_unet(sample_size),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + hidden,
        cross_attention_dim=2 * hidden,  # both encoders' hidden states, concatenated
    )
    tokenizer, vocab, _ = build_tokenizer(max_length=16)
    config = _tiny_text_config(len(vocab), hidden)
    return StableDiffusionXLPipeline(
        vae=base.vae,
        text_encoder=CLIPTextModel(config),
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=base.scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def save_tiny_sdxl_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny SDXL pipeline as a diffusers folder; returns the folder."""
    folder = Path(folder)
    make_tiny_sdxl_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder


def _tiny_vae(sample_size: int, latent_channels: int = 4, shift: float | None = None):
    """The tiny VAE (4x down), with SD3/FLUX's latent shift where ``shift`` is given."""
    from diffusers import AutoencoderKL

    extra = {} if shift is None else {"shift_factor": shift, "scaling_factor": 1.5}
    return AutoencoderKL(
        block_out_channels=(8, 8, 16),
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=4,
        sample_size=sample_size * 4,
        layers_per_block=1,
        **extra,
    )


def _tiny_t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=1,
            eos_token_id=1,
        )
    )  # fmt: skip


def make_tiny_sd3_pipeline(seed: int = 0, sample_size: int = 8, t5: bool = False):
    """Build a tiny ``StableDiffusion3Pipeline`` (32x32 images): an MMDiT of one joint block,
    two CLIP encoders with projections, flow matching with SD3's shift of 3. Without ``t5``
    there is no T5 (the pipeline then gives zeros for its tokens, as SD3 loaded with
    ``text_encoder_3=None`` does); with it, a small T5 encoder reads the prompt through a real
    T5 tokenizer (``digits_data.build_t5_tokenizer``).

    The shape of diffusers' own SD3 ``get_dummy_components``, with loreun's offline tokenizer.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    from .digits_data import build_t5_tokenizer, build_tokenizer

    torch.manual_seed(seed)
    tokenizer, vocab, _ = build_tokenizer(max_length=16)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
    )
    config = _tiny_text_config(len(vocab))
    text_encoder, text_encoder_2 = (CLIPTextModelWithProjection(config) for _ in range(2))
    tokenizer_3 = build_t5_tokenizer(max_length=32) if t5 else None
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(sample_size, shift=0.06),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=_tiny_t5(len(tokenizer_3)) if t5 else None,
        tokenizer_3=tokenizer_3,
    )


def make_tiny_flux_pipeline(seed: int = 0, sample_size: int = 8, dev: bool = True):
    """Build a tiny ``FluxPipeline`` (32x32 images): one double- and one single-stream block, a
    CLIP encoder for the pooled embedding and a small T5 for the tokens. ``dev`` gives it
    FLUX.1-dev's guidance embedding and resolution-dependent shift; otherwise it is shaped as
    schnell (no guidance embedding, no shift).

    The T5 tokenizer is loreun's offline BPE tokenizer (a real T5 vocabulary cannot be
    downloaded here); the T5 encoder itself is transformers' own model at toy size.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from .digits_data import build_tokenizer

    torch.manual_seed(seed)
    tokenizer, vocab, _ = build_tokenizer(max_length=16)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x a 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=dev,
        axes_dims_rope=(4, 6, 6),
    )
    t5 = _tiny_t5(len(vocab))
    if dev:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
            max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
        )  # fmt: skip
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    return FluxPipeline(
        scheduler=scheduler,
        vae=_tiny_vae(sample_size, shift=0.06),
        text_encoder=CLIPTextModel(_tiny_text_config(len(vocab))),
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer,
        transformer=transformer,
    )


def save_tiny_flow_pipeline(folder: str | Path, kind: str = "flux", seed: int = 0) -> Path:
    """Build and save a tiny SD3 (``sd3``; ``sd3-t5`` with a T5 encoder), FLUX.1-dev-shaped
    (``flux``) or schnell-shaped (``flux-schnell``) pipeline as a diffusers folder; returns the
    folder."""
    folder = Path(folder)
    builders = {
        "sd3": lambda: make_tiny_sd3_pipeline(seed),
        "sd3-t5": lambda: make_tiny_sd3_pipeline(seed, t5=True),
        "flux": lambda: make_tiny_flux_pipeline(seed, dev=True),
        "flux-schnell": lambda: make_tiny_flux_pipeline(seed, dev=False),
    }
    builders[kind]().save_pretrained(folder, safe_serialization=True)
    return folder
