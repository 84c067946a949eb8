"""Train the built-in digits text-to-image model and its digit classifier.

The pipeline is made of the same diffusers and transformers classes as Stable Diffusion 1.x
(CLIP tokenizer and text encoder, AutoencoderKL, UNet2DConditionModel with cross-attention, a DDIM
scheduler), at a size that trains in minutes on a CPU. Training it without one digit gives the
"retrain" reference that exact unlearning is measured against (docs/digits.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .digits_data import (
    IMAGE_SIZE,
    build_tokenizer,
    caption_table,
    digit_captions,
    load_digit_images,
    save_tokenizer,
)
from .schedule import DDPMSchedule, sd1_scheduler


@dataclass
class DigitsTrainConfig:
    """Settings of the digits training run; the defaults made the shipped model."""

    seed: int = 0
    exclude_digit: int | None = None
    vae_steps: int = 600
    unet_steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    uncond_prob: float = 0.1
    # CLIP's 0.02 init makes all prompts look alike to a small jointly trained encoder.
    token_embedding_std: float = 1.0
    log_every: int = 250


def build_components(vocab_size: int, max_length: int):
    """Untrained text encoder, VAE, UNet and scheduler of the digits pipeline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=max_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(48, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return text_encoder, vae, unet, sd1_scheduler()


def _log(msg: str) -> None:
    print(f"[digits {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_vae(vae, images: torch.Tensor, cfg: DigitsTrainConfig) -> float:
    """Train the autoencoder on [N, 3, 16, 16] images; return the latent scaling factor.

    The scaling factor makes the latents unit-variance, as SD's 0.18215 does for its VAE.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    for step in range(cfg.vae_steps):
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        x = images[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            _log(f"vae step {step} loss {loss.item():.4f}")
    with torch.no_grad():
        lat = vae.encode(images[:512]).latent_dist.mean
    return float(1.0 / lat.std())


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, scaling: float) -> torch.Tensor:
    """[N, 3, 16, 16] images -> [N, 4, 8, 8] scaled latent means."""
    return torch.cat([vae.encode(b).latent_dist.mean for b in images.split(256)]) * scaling


def _caption_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids


def train_unet(text_encoder, unet, scheduler, tokenizer, latents, labels, cfg: DigitsTrainConfig):
    """Jointly train the text encoder and UNet on (latent, caption) pairs with caption dropout.

    Args:
        latents: [N, 4, 8, 8] scaled latents.
        labels: [N] digits; each draw pairs an image with a random template of its digit.
    """
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    per_digit = {d: _caption_ids(tokenizer, digit_captions(d)) for d in range(10)}
    empty = _caption_ids(tokenizer, [""])[0]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / cfg.unet_steps))
    )
    schedule = DDPMSchedule.from_scheduler(scheduler)
    for step in range(cfg.unet_steps):
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=gen)
        x0, y = latents[idx], labels[idx]
        pick = torch.randint(0, per_digit[0].shape[0], (len(y),), generator=gen)
        ids = torch.stack([per_digit[int(d)][int(p)] for d, p in zip(y, pick)])
        drop = torch.rand(len(y), generator=gen) < cfg.uncond_prob
        ids[drop] = empty
        t = schedule.draw_times(len(y), gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = schedule.add_noise(x0, t, noise)
        emb = text_encoder(ids)[0]
        loss = F.mse_loss(
            unet(xt, t, encoder_hidden_states=emb).sample, schedule.target(x0, t, noise)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.unet_steps - 1:
            _log(f"unet step {step} loss {loss.item():.4f}")


def train_digits_pipeline(out: str | Path, cfg: DigitsTrainConfig) -> Path:
    """Train the digits pipeline from scratch and save it as a diffusers folder.

    With ``cfg.exclude_digit`` set, that digit's images and captions never reach training: the
    result is the exact-unlearning ("retrain") reference for erasing it.
    """
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(cfg.seed)
    tokenizer, vocab, merges = build_tokenizer()
    text_encoder, vae, unet, scheduler = build_components(len(vocab), tokenizer.model_max_length)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.normal_(0.0, cfg.token_embedding_std)
    images, labels = load_digit_images("generator")
    if cfg.exclude_digit is not None:
        keep = labels != cfg.exclude_digit
        images, labels = images[keep], labels[keep]
    _log(f"{len(images)} images, {len(caption_table(cfg.exclude_digit))} captions")
    scaling = train_vae(vae, images, cfg)
    vae.register_to_config(scaling_factor=scaling)
    latents = encode_latents(vae, images, scaling)
    train_unet(text_encoder, unet, scheduler, tokenizer, latents, labels, cfg)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, vocab, merges, out / "tokenizer")
    return out


def train_digit_classifier(out: str | Path, seed: int = 0, epochs: int = 80) -> dict:
    """Train the digit classifier on the held-out split and save it as a transformers model.

    It is an ordinary ``ResNetForImageClassification`` with its image processor, so the generic
    image-classifier audit loads it like any hub model. Its test set is the generator's split,
    which the classifier never sees.

    Returns:
        {"train_images": int, "test_images": int, "test_accuracy": float}
    """
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    processor = ViTImageProcessor(
        do_resize=True,
        size={"height": 32, "width": 32},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    model = ResNetForImageClassification(
        ResNetConfig(
            num_channels=3,
            embedding_size=32,
            hidden_sizes=[64, 128],
            depths=[1, 1],
            layer_type="basic",
            num_labels=10,
            id2label={i: str(i) for i in range(10)},
            label2id={str(i): i for i in range(10)},
        )
    )
    x_tr, y_tr = _processed(processor, "classifier")
    x_te, y_te = _processed(processor, "generator")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y_tr), generator=gen).split(64):
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
            x = torch.roll(x_tr[idx], shifts=shift, dims=(2, 3))  # small translations
            loss = F.cross_entropy(model(pixel_values=x).logits, y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(pixel_values=x_te).logits.argmax(-1) == y_te).float().mean().item()
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    _log(f"classifier test accuracy {acc:.4f} on {len(y_te)} held-out images")
    return {"train_images": len(y_tr), "test_images": len(y_te), "test_accuracy": acc}


def _processed(processor, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the real image processor over a split, as the audit will over generated PNGs."""
    images, labels = load_digit_images(split)
    pils = tensors_to_pil(images)
    return processor(images=pils, return_tensors="pt").pixel_values, labels


def tensors_to_pil(images: torch.Tensor) -> list:
    """[N, 3, H, W] in [-1, 1] -> list of RGB PIL images."""
    from PIL import Image

    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]
