"""The built-in flow model ``digits-flow``: the digits testbed under SD3's architecture.

A real ``StableDiffusion3Pipeline``: an ``SD3Transformer2DModel`` trained by rectified flow
matching, two CLIP text encoders with projections (SD3's first two; it is loaded without T5,
whose tokens SD3 then fills with zeros), the ``digits`` model's own VAE, and a
``FlowMatchEulerDiscreteScheduler``. It trains on the same handwritten digits and captions as
``digits`` and is judged by the same classifier, so erasure on a flow model is measured, not
only run (docs/digits.md).

Its T5 tokens are 16 zeros (the CLIP length), not diffusers' default 256: loreun pads them so
for every SD3 loaded without T5 (``pipelines/family.py``), and plain diffusers needs
``max_sequence_length=16`` to call it as it was trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .digits import _log, encode_latents
from .digits_data import build_tokenizer, digit_captions, load_digit_images, save_tokenizer


@dataclass
class FlowTrainConfig:
    """Settings of the flow model's training run; the defaults made the shipped model."""

    seed: int = 0
    exclude_digit: int | None = None
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    uncond_prob: float = 0.1
    token_embedding_std: float = 1.0  # as the digits model: distinct prompts from the start
    log_every: int = 250


def build_flow_components(vocab_size: int, max_length: int):
    """Untrained text encoders, transformer and scheduler of the flow model."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def text_encoder():
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=vocab_size, hidden_size=64, intermediate_size=256,
                num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=max_length,
                projection_dim=64, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            )
        )  # fmt: skip

    transformer = SD3Transformer2DModel(
        sample_size=8,  # the digits VAE's 4x8x8 latents, one token per cell
        patch_size=1,
        in_channels=4,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=128,  # both CLIPs' 64 channels, concatenated
        caption_projection_dim=128,
        pooled_projection_dim=128,
        out_channels=4,
        pos_embed_max_size=8,
    )
    # 64 image tokens: no shift (SD3's 3.0 is for 1024-pixel images)
    return text_encoder(), text_encoder(), transformer, FlowMatchEulerDiscreteScheduler(shift=1.0)


def train_flow_transformer(pipe, latents, labels, cfg: FlowTrainConfig) -> None:
    """Jointly train both text encoders and the transformer by flow matching, prompts encoded
    through the pipeline's own ``encode_prompt`` so that training and sampling agree.

    Args:
        latents: [N, 4, 8, 8] scaled latents; labels: [N] digits.
    """
    from .schedule import schedule_of

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    schedule = schedule_of(pipe)
    length = pipe.tokenizer.model_max_length
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
    )
    for m in modules:
        m.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=gen)
        x0, y = latents[idx], labels[idx]
        pick = torch.randint(0, 5, (len(y),), generator=gen).tolist()
        drop = (torch.rand(len(y), generator=gen) < cfg.uncond_prob).tolist()
        captions = [
            "" if d else digit_captions(int(c))[k] for c, k, d in zip(y.tolist(), pick, drop)
        ]
        emb, _, pooled, _ = pipe.encode_prompt(
            captions, None, None, device="cpu", do_classifier_free_guidance=False,
            max_sequence_length=length,
        )  # fmt: skip
        t = schedule.draw_times(len(y), gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = schedule.add_noise(x0, t, noise)
        pred = pipe.transformer(
            xt, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled
        ).sample
        loss = F.mse_loss(pred, schedule.target(x0, t, noise))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            _log(f"flow step {step} loss {loss.item():.4f}")
    for m in modules:
        m.eval()


def train_flow_pipeline(out: str | Path, cfg: FlowTrainConfig, vae_from: str | Path) -> Path:
    """Train the flow model on the digits model's VAE and save it as a diffusers folder.

    With ``cfg.exclude_digit`` set, that digit's images and captions never reach training.
    """
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline

    torch.manual_seed(cfg.seed)
    tokenizer, vocab, merges = build_tokenizer()
    te1, te2, transformer, scheduler = build_flow_components(len(vocab), tokenizer.model_max_length)
    with torch.no_grad():
        for te in (te1, te2):
            te.get_input_embeddings().weight.normal_(0.0, cfg.token_embedding_std)
    loaded = AutoencoderKL.from_pretrained(Path(vae_from) / "vae")
    # a fresh copy: from_pretrained records the folder it came from, a path of this machine;
    # shift_factor 0, which SD3's pipeline adds when decoding
    config = {k: v for k, v in loaded.config.items() if not k.startswith("_")}
    vae = AutoencoderKL.from_config({**config, "shift_factor": 0.0})
    vae.load_state_dict(loaded.state_dict())
    vae.eval()
    images, labels = load_digit_images("generator")
    if cfg.exclude_digit is not None:
        keep = labels != cfg.exclude_digit
        images, labels = images[keep], labels[keep]
    with torch.no_grad():
        latents = encode_latents(vae, images, vae.config.scaling_factor)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=te1,
        tokenizer=tokenizer, text_encoder_2=te2, tokenizer_2=tokenizer, text_encoder_3=None,
        tokenizer_3=None,
    )  # fmt: skip
    _log(f"{len(images)} images; transformer {sum(p.numel() for p in transformer.parameters())}")
    train_flow_transformer(pipe, latents, labels, cfg)
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        save_tokenizer(tokenizer, vocab, merges, out / name)
    return out
