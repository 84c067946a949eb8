"""Forget and retain items for an erase run, built from prompts or image folders.

A forget (or retain) item is a concept prompt with one cached base-model sample, or one image
with its caption (DESIGN.md section 3). This module reads the folders, encodes every prompt
once, and samples or encodes the latents x_0, caching them under ``OUT/cache``; the trainer only
consumes the ``ForgetSet`` it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loreun.pipelines.conditioning import encode_prompts
from loreun.pipelines.runtime import say

from .config import EraseConfig, check_anchor
from .forget import (
    ForgetSet,
    encode_captions,
    encode_images,
    latent_shape,
    load_or_sample_cache,
    per_sample_items,
    pixel_size,
    sample_forget_latents,
    sample_trajectory_pool,
)
from .images import ImageItem, folder_key, read_image_folder


@dataclass
class Folders:
    """Image items read (and checked) before any model loads; None where prompts are used."""

    forget: list[ImageItem] | None
    retain: list[ImageItem] | None


def read_folders(cfg: EraseConfig) -> Folders:
    """Read --forget-images / --retain-images and check the anchor against their captions."""
    forget = retain = None
    if cfg.forget_images:
        forget = read_image_folder(cfg.forget_images, cfg.forget_caption, "--forget-images")
        if cfg.reweights and len(forget) < 2:
            raise ValueError(
                f"--weighting loreun: needs at least 2 forget items, and {cfg.forget_images} "
                "holds 1 image; add images or use --weighting uniform"
            )
        if cfg.objective == "remap":
            check_anchor(cfg.anchor, sorted({it.caption for it in forget}))
    if cfg.retain_images:
        retain = read_image_folder(cfg.retain_images, cfg.retain_caption, "--retain-images")
    return Folders(forget, retain)


def build_forget_set(
    cfg: EraseConfig, pipe, teacher, acc, out: Path, images: list[ImageItem] | None
) -> ForgetSet:
    """Encode every prompt once; take x_0 from the images, or sample and cache it when needed."""
    anchor_prompt = cfg.erase_from if cfg.objective == "esd" else cfg.anchor
    extra = [""] + ([anchor_prompt] if anchor_prompt else [])
    size = pixel_size(pipe, cfg.resolution)
    emb = encode_prompts(pipe, extra, acc.device, size)
    captions = [it.caption for it in images] if images else cfg.concepts
    forget = ForgetSet(
        cond=encode_captions(pipe, captions, acc.device, size),
        uncond=emb[:1],
        anchor=emb[1:2] if anchor_prompt else None,
    )
    if cfg.xt_source == "trajectory":  # before items split per sample: they share the pool
        forget.pool = cached_trajectories(
            cfg, pipe, teacher, acc, out / "cache" / "forget", forget, captions
        )
        forget.pool_of = torch.arange(len(forget))
    needs_x0 = cfg.xt_source == "cached" or cfg.reweights or cfg.saliency is not None
    if images:
        forget.x0 = cached_image_latents(cfg, pipe, acc, out / "cache" / "forget-images", images)
    elif needs_x0:
        forget.x0 = cached_samples(
            cfg, pipe, teacher, acc, out / "cache" / "forget", forget, cfg.concepts
        )
        forget = per_sample_items(forget)
    return forget


def build_retain_set(
    cfg: EraseConfig, pipe, teacher, acc, out: Path, images: list[ImageItem] | None, uncond
) -> ForgetSet | None:
    """Retain items from a folder or from base-model samples of --retain-concept prompts.

    ``uncond`` ([1, L, D], the empty prompt) is the forget set's, encoded once.
    """
    if not cfg.retain_weight:
        return None
    captions = [it.caption for it in images] if images else cfg.retain_concepts
    size = pixel_size(pipe, cfg.resolution)
    retain = ForgetSet(encode_captions(pipe, captions, acc.device, size), uncond, anchor=None)
    if images:
        retain.x0 = cached_image_latents(cfg, pipe, acc, out / "cache" / "retain-images", images)
    else:
        retain.x0 = cached_samples(
            cfg, pipe, teacher, acc, out / "cache" / "retain", retain, captions
        )
    return retain


def cached_image_latents(cfg, pipe, acc, stem: Path, images: list[ImageItem]) -> torch.Tensor:
    """VAE latents of a folder's images, cached under OUT/cache and reused while unchanged."""
    size = pixel_size(pipe, cfg.resolution)
    key = {"model": cfg.model, "images": folder_key(images, size)}

    def encode():
        say(acc, f"encoding {len(images)} images with the VAE")
        return encode_images(pipe, [it.path for it in images], size, acc.device)

    with acc.main_process_first():
        return load_or_sample_cache(stem.with_suffix(".safetensors"), key, encode)


def cached_samples(cfg, pipe, teacher, acc, stem: Path, items: ForgetSet, prompts) -> torch.Tensor:
    """Base-model samples of each prompt, cached under OUT/cache and reused by a rerun."""
    key = {
        "model": cfg.model,
        "concepts": prompts,
        "samples": cfg.samples_per_concept,
        "steps": cfg.sample_steps,
        "guidance": cfg.sample_guidance,
        "resolution": cfg.resolution,
        "seed": cfg.seed,
    }

    def sample():
        n = len(prompts) * cfg.samples_per_concept
        say(acc, f"sampling {n} images of {len(prompts)} prompts ({cfg.sample_steps} steps each)")
        with acc.autocast():
            return sample_forget_latents(
                teacher,
                pipe,
                items,
                cfg.samples_per_concept,
                cfg.sample_steps,
                cfg.sample_guidance,
                cfg.resolution,
                cfg.seed,
                acc.device,
            )

    with acc.main_process_first():  # the main process samples; the others read its cache
        return load_or_sample_cache(stem.with_name(stem.name + "-latents.safetensors"), key, sample)


def trajectory_pool_bytes(cfg: EraseConfig, pipe, prompts: int) -> int:
    """Bytes of the pool: prompts x pool x sample steps float32 latents."""
    c, h, w = latent_shape(pipe, cfg.resolution)
    return prompts * cfg.trajectory_pool * cfg.sample_steps * c * h * w * 4


def cached_trajectories(cfg, pipe, teacher, acc, stem: Path, items: ForgetSet, prompts):
    """The trajectory pool [Q, P, K, C, H, W], sampled once with the frozen base and kept
    under OUT/cache, where a rerun (or --overwrite) finds and reuses it."""
    size = trajectory_pool_bytes(cfg, pipe, len(prompts))
    if size > cfg.trajectory_cache_mb * 2**20:
        raise ValueError(
            f"--trajectory-pool: {len(prompts)} prompts x {cfg.trajectory_pool} trajectories x "
            f"{cfg.sample_steps} steps take {size / 2**20:.0f} MB, over --trajectory-cache-mb "
            f"{cfg.trajectory_cache_mb}; lower --trajectory-pool or --sample-steps, or raise "
            "--trajectory-cache-mb"
        )
    key = {
        "model": cfg.model,
        "prompts": prompts,
        "pool": cfg.trajectory_pool,
        "steps": cfg.sample_steps,
        "guidance": cfg.sample_guidance,
        "resolution": cfg.resolution,
        "seed": cfg.seed,
    }
    path = stem.with_name(stem.name + "-trajectories.safetensors")

    def sample():
        say(
            acc,
            f"sampling {len(prompts)} x {cfg.trajectory_pool} trajectories "
            f"({cfg.sample_steps} steps each, {size / 2**20:.1f} MB in {path.parent.name}/)",
        )
        with acc.autocast():
            return sample_trajectory_pool(
                teacher,
                pipe,
                items,
                cfg.trajectory_pool,
                cfg.sample_steps,
                cfg.sample_guidance,
                cfg.resolution,
                cfg.seed,
                acc.device,
            )

    with acc.main_process_first():
        return load_or_sample_cache(path, key, sample)
