"""Forget and retain items for an erase run, built from prompts or image folders.

A forget (or retain) item is a concept prompt with one cached base-model sample, or one image
with its caption. This module reads the folders, encodes every prompt
once, and samples or encodes the latents x_0, caching them under ``OUT/cache``; the trainer only
consumes the ``ItemSet`` it returns. The retain set is an ``ItemSet`` too, without an anchor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loreun.pipelines.family import encode_prompts, family_of
from loreun.pipelines.files import atomic_save_safetensors, make_dir, refuse_link
from loreun.pipelines.models import model_files_key
from loreun.pipelines.runtime import say
from loreun.pipelines.schedule import schedule_of

from .config import EraseConfig
from .images import ImageItem, folder_key, read_image_folder
from .streams import SAMPLE_STREAM, TRAJECTORY_STREAM, step_generator


@dataclass
class ItemSet:
    """Embeddings of the forget (or retain) items and, when known, their x_0 latents.

    An item is a concept prompt (x_0: S base-model samples of it) or one image with its caption
    (x_0: the image's latent, S = 1).

    Attributes:
        cond: [N, L, D] one embedding per item: its prompt or caption (a ``Cond`` for SDXL).
        uncond: [1, L, D] the empty prompt.
        anchor: [1, L, D] the --erase-from or --anchor prompt, or None.
        x0: [N, S, C, H, W] S latents per item, or None.
        pool: [Q, P, K, C, H, W] for ``--xt-source trajectory``: P base-model sampling trajectories
            of each of the Q concept prompts, every latent a step can stop at, or None.
        pool_of: [N] the pool row of each item (items of one prompt share its trajectories).
        captions: [N] each item's prompt or caption, as text (adversarial erasure attacks it).
        prompt: [N, L, D] the student's prompt where it differs from ``cond`` (adversarial
            erasure's pool), or None.
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    anchor: torch.Tensor | None
    x0: torch.Tensor | None = None
    pool: torch.Tensor | None = None
    pool_of: torch.Tensor | None = None
    captions: list[str] | None = None
    prompt: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.cond)


def encode_captions(pipe, captions: list[str], device, size: int | None = None):
    """Encode each distinct caption once: -> [N, L, D] (or a ``Cond``), one row per caption."""
    unique = sorted(set(captions))
    emb = encode_prompts(pipe, unique, device, size)
    index = torch.tensor([unique.index(c) for c in captions])
    return emb[index]


@torch.no_grad()
def encode_images(pipe, paths: list[Path], size: int, device, batch: int = 16) -> torch.Tensor:
    """Latents of images, the VAE posterior mean times its scaling factor: -> [N, 1, C, H, W].

    The mean rather than a sample keeps the cache deterministic; the forward noise added at
    every step dominates the posterior's spread anyway.
    """
    from .images import load_image_tensor

    vae = pipe.vae.to(device)
    out = []
    for start in range(0, len(paths), batch):
        x = torch.stack([load_image_tensor(p, size) for p in paths[start : start + batch]])
        dist = vae.encode(x.to(device, vae.dtype)).latent_dist
        shift = getattr(vae.config, "shift_factor", None) or 0.0  # SD3's and FLUX's VAEs
        out.append(((dist.mean - shift) * vae.config.scaling_factor).float().cpu())
    pipe.vae.to("cpu")
    return torch.cat(out).unsqueeze(1)


def per_sample_items(items: ItemSet) -> ItemSet:
    """One item per (prompt, cached sample) pair: [P, S, ...] samples -> P * S items.

    LoReUn weighs items, and a concept prompt's samples differ in how well the model fits
    them, so each sample is an item with its own difficulty and weight; a single concept then
    still gives S items to weigh.
    """
    p, s = items.x0.shape[:2]
    return ItemSet(
        cond=items.cond.repeat_interleave(s, dim=0),
        uncond=items.uncond,
        anchor=items.anchor,
        x0=items.x0.reshape(p * s, 1, *items.x0.shape[2:]),
        pool=items.pool,
        pool_of=None if items.pool_of is None else items.pool_of.repeat_interleave(s),
        captions=None if items.captions is None else [c for c in items.captions for _ in range(s)],
    )


def sample_forget_latents(
    eps,
    pipe,
    forget: ItemSet,
    samples: int,
    steps: int,
    guidance: float,
    resolution: int | None,
    seed: int,
    device,
) -> torch.Tensor:
    """Sample ``samples`` x_0 latents per concept with ``eps``: -> [N, S, C, H, W]."""

    def run(sampler, cond, uncond, noise):
        return sampler.sample(eps, cond, uncond, noise, guidance)

    return _per_prompt(run, pipe, forget, samples, steps, resolution, seed, SAMPLE_STREAM, device)


def sample_trajectory_pool(
    eps, pipe, forget: ItemSet, pool: int, steps: int, guidance: float, resolution, seed, device
) -> torch.Tensor:
    """``pool`` full guided DDIM trajectories per concept prompt: -> [Q, P, K, C, H, W].

    Partial sampling (ESD) runs DDIM from fresh noise to a random stop at every step; keeping
    each step's latent of a fixed set of runs gives the same x_t distribution, drawn from a
    finite pool, for the cost of sampling the pool once.
    """

    def run(sampler, cond, uncond, noise):
        return sampler.trajectory(eps, cond, uncond, noise, guidance)

    return _per_prompt(run, pipe, forget, pool, steps, resolution, seed, TRAJECTORY_STREAM, device)


def _per_prompt(run, pipe, forget: ItemSet, n: int, steps, resolution, seed, stream, device):
    """``run(sampler, cond [n], uncond [n], noise [n, C, H, W])`` for each prompt i, its noise
    drawn from stream ``stream - i`` so that each cache is reproducible on its own; the
    results stacked on the CPU: -> [N, n, ...]."""
    # the run's own schedule: a resolution-shifted one (FLUX.1-dev) shifts with --resolution
    sampler = schedule_of(pipe, resolution).sampler(steps)
    from tqdm.auto import tqdm

    from loreun.pipelines.meta import quiet

    shape = family_of(pipe).latent_shape(pipe, resolution)
    out = []
    # one prompt's n samples at a time: a bar, since caching can take minutes on a large model
    bar = tqdm(range(len(forget)), desc="sampling", unit="prompt", disable=quiet(), leave=False)
    for i in bar:
        g = step_generator(seed, 0, stream - i)
        noise = torch.randn((n, *shape), generator=g).to(device)
        cond = forget.cond[i : i + 1].expand(n, -1, -1)
        out.append(run(sampler, cond, forget.uncond.expand(n, -1, -1), noise).cpu())
    return torch.stack(out)


def load_or_sample_cache(path: Path, key: dict, sample_fn) -> torch.Tensor:
    """Reuse cached latents whose key (concepts, steps, guidance, seed...) matches, else sample."""
    from safetensors import SafetensorError, safe_open

    wanted = json.dumps(key, sort_keys=True)
    make_dir(path.parent)
    if refuse_link(path).is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") == wanted:
                    return f.get_tensor("x0")
        except (SafetensorError, OSError, KeyError):
            pass  # a torn or foreign cache file is sampled again and replaced
    x0 = sample_fn()
    atomic_save_safetensors(path, {"x0": x0}, metadata={"key": wanted})
    return x0


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
        if cfg.reweights:
            cfg.weighting_slot().check_items(len(forget), f"{cfg.forget_images} holds 1 image")
        cfg.objective_slot().check_captions(cfg, sorted({it.caption for it in forget}))
    if cfg.retain_images:
        retain = read_image_folder(cfg.retain_images, cfg.retain_caption, "--retain-images")
    return Folders(forget, retain)


def build_forget_set(
    cfg: EraseConfig, pipe, teacher, acc, out: Path, images: list[ImageItem] | None
) -> ItemSet:
    """Encode every prompt once; take x_0 from the images, or sample and cache it when needed."""
    anchor_prompt = cfg.objective_slot().anchor_prompt(cfg)
    extra = [""] + ([anchor_prompt] if anchor_prompt else [])
    size = cfg.resolution or family_of(pipe).native_size(pipe)
    emb = encode_prompts(pipe, extra, acc.device, size)
    captions = [it.caption for it in images] if images else cfg.concepts
    forget = ItemSet(
        cond=encode_captions(pipe, captions, acc.device, size),
        uncond=emb[:1],
        anchor=emb[1:2] if anchor_prompt else None,
        captions=list(captions),
    )
    if cfg.xt_source == "trajectory":  # before items split per sample: they share the pool
        forget.pool = cached_trajectories(
            cfg, pipe, teacher, acc, out / "cache" / "forget", forget, captions
        )
        forget.pool_of = torch.arange(len(forget))
    needs_x0 = cfg.xt_source == "cached" or cfg.reweights or cfg.saliency is not None
    needs_x0 = needs_x0 or cfg.adversarial  # the attack's target is an item's sample
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
) -> ItemSet | None:
    """Retain items from a folder or from base-model samples of --retain-concept prompts.

    ``uncond`` ([1, L, D], the empty prompt) is the forget set's, encoded once.
    """
    if not cfg.retain_weight:
        return None
    captions = [it.caption for it in images] if images else cfg.retain_concepts
    size = cfg.resolution or family_of(pipe).native_size(pipe)
    cond = encode_captions(pipe, captions, acc.device, size)
    retain = ItemSet(cond, uncond, anchor=None, captions=list(captions))
    if images:
        retain.x0 = cached_image_latents(cfg, pipe, acc, out / "cache" / "retain-images", images)
    else:
        retain.x0 = cached_samples(
            cfg, pipe, teacher, acc, out / "cache" / "retain", retain, captions
        )
    return retain


def cached_image_latents(cfg, pipe, acc, stem: Path, images: list[ImageItem]) -> torch.Tensor:
    """VAE latents of a folder's images, cached under OUT/cache and reused while unchanged."""
    size = cfg.resolution or family_of(pipe).native_size(pipe)
    key = {"model": model_files_key(cfg.model), "images": folder_key(images, size)}

    def encode():
        say(acc, f"encoding {len(images)} images with the VAE")
        return encode_images(pipe, [it.path for it in images], size, acc.device)

    with acc.main_process_first():
        return load_or_sample_cache(stem.with_suffix(".safetensors"), key, encode)


def cached_samples(cfg, pipe, teacher, acc, stem: Path, items: ItemSet, prompts) -> torch.Tensor:
    """Base-model samples of each prompt, cached under OUT/cache and reused by a rerun."""
    steps, guidance = forget_sampling(cfg, pipe)
    key = {
        "model": model_files_key(cfg.model),
        "concepts": prompts,
        "samples": cfg.samples_per_concept,
        "steps": steps,
        "guidance": guidance,
        "resolution": cfg.resolution,
        "seed": cfg.seed,
    }

    def sample():
        n = len(prompts) * cfg.samples_per_concept
        say(acc, f"sampling {n} images of {len(prompts)} prompts ({steps} steps each)")
        with acc.autocast():
            return sample_forget_latents(
                teacher,
                pipe,
                items,
                cfg.samples_per_concept,
                steps,
                guidance,
                cfg.resolution,
                cfg.seed,
                acc.device,
            )

    with acc.main_process_first():  # the main process samples; the others read its cache
        return load_or_sample_cache(stem.with_name(stem.name + "-latents.safetensors"), key, sample)


def forget_sampling(cfg: EraseConfig, pipe) -> tuple[int, float]:
    """(steps, guidance) of the forget set's sampling: --sample-steps and --sample-guidance,
    unless the family samples its model otherwise (FLUX.1-schnell: 4 steps, no guidance)."""
    return family_of(pipe).forget_sampling(pipe, cfg.sample_steps, cfg.sample_guidance)


def trajectory_pool_bytes(cfg: EraseConfig, pipe, prompts: int) -> int:
    """Bytes of the pool: prompts x pool x sample steps float32 latents."""
    c, h, w = family_of(pipe).latent_shape(pipe, cfg.resolution)
    return prompts * cfg.trajectory_pool * forget_sampling(cfg, pipe)[0] * c * h * w * 4


def cached_trajectories(cfg, pipe, teacher, acc, stem: Path, items: ItemSet, prompts):
    """The trajectory pool [Q, P, K, C, H, W], sampled once with the frozen base and kept
    under OUT/cache, where a rerun (or --overwrite) finds and reuses it."""
    size = trajectory_pool_bytes(cfg, pipe, len(prompts))
    steps, guidance = forget_sampling(cfg, pipe)
    if size > cfg.trajectory_cache_mb * 2**20:
        raise ValueError(
            f"--trajectory-pool: {len(prompts)} prompts x {cfg.trajectory_pool} trajectories x "
            f"{steps} steps take {size / 2**20:.0f} MB, over --trajectory-cache-mb "
            f"{cfg.trajectory_cache_mb}; lower --trajectory-pool or --sample-steps, or raise "
            "--trajectory-cache-mb"
        )
    key = {
        "model": model_files_key(cfg.model),
        "prompts": prompts,
        "pool": cfg.trajectory_pool,
        "steps": steps,
        "guidance": guidance,
        "resolution": cfg.resolution,
        "seed": cfg.seed,
    }
    path = stem.with_name(stem.name + "-trajectories.safetensors")

    def sample():
        say(
            acc,
            f"sampling {len(prompts)} x {cfg.trajectory_pool} trajectories "
            f"({steps} steps each, {size / 2**20:.1f} MB in {path.parent.name}/)",
        )
        with acc.autocast():
            return sample_trajectory_pool(
                teacher,
                pipe,
                items,
                cfg.trajectory_pool,
                steps,
                guidance,
                cfg.resolution,
                cfg.seed,
                acc.device,
            )

    with acc.main_process_first():
        return load_or_sample_cache(path, key, sample)
