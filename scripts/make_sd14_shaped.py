"""Write a diffusers folder with Stable Diffusion 1.4's architecture and random weights.

Memory and speed depend on the shapes, not on the values, so benchmarks that need "an SD 1.4
folder" (``bench_esd_reference.py --model``) can run on this one where the real weights cannot be
downloaded. The UNet (860 M parameters), the VAE (84 M) and the CLIP ViT-L/14 text encoder
(123 M) have SD 1.4's configurations; the tokenizer is the built-in digits model's (its ids fit
CLIP's vocabulary), padding to SD's 77 tokens. About 4.3 GB in fp32:

    python scripts/make_sd14_shaped.py --out runs/sd14-shaped
"""

from __future__ import annotations

import argparse
from pathlib import Path

from preset_sizes import ARCHITECTURES  # this folder's own script

VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=512,
)
TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def build(out: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from loreun.pipelines.models import resolve_model

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(Path(resolve_model("digits")) / "tokenizer")
    tokenizer.model_max_length = TEXT["max_position_embeddings"]
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**ARCHITECTURES["SD 1.x"]),
        vae=AutoencoderKL(**VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    if args.out.exists():
        raise SystemExit(f"--out: {args.out} exists; choose a new folder")
    build(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
