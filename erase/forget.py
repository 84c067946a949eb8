"""The forget set: prompt embeddings, cached base samples, and per-step batches.

Every random draw is seeded from (seed, process rank, step), so a step is reproducible on its
own and a resumed run sees exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loreun.pipelines.conditioning import NoiseSchedule, encode_prompts
from loreun.pipelines.files import atomic_save_safetensors, make_dir, refuse_link

from .objectives import ForgetBatch, per_sample_mse
from .sampling import ddim_sample, ddim_trajectory, make_ddim


@dataclass
class ForgetSet:
    """Embeddings of the forget (or retain) items and, when known, their x_0 latents.

    An item is a concept prompt (x_0: S base-model samples of it) or one image with its caption
    (x_0: the image's latent, S = 1).

    Attributes:
        cond: [N, L, D] one embedding per item: its prompt or caption (a ``Cond`` for SDXL).
        uncond: [1, L, D] the empty prompt.
        anchor: [1, L, D] the --erase-from or --anchor prompt, or None.
        x0: [N, S, C, H, W] S latents per item, or None.
        pool: [Q, P, K, C, H, W] for ``--xt-source trajectory``: P base-model DDIM trajectories
            of each of the Q concept prompts, every latent a step can stop at, or None.
        pool_of: [N] the pool row of each item (items of one prompt share its trajectories).
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    anchor: torch.Tensor | None
    x0: torch.Tensor | None = None
    pool: torch.Tensor | None = None
    pool_of: torch.Tensor | None = None

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
        out.append((dist.mean * vae.config.scaling_factor).float().cpu())
    pipe.vae.to("cpu")
    return torch.cat(out).unsqueeze(1)


# Draws made outside the training loop use negative "steps", one range each, so that none
# repeats a training step's stream (steps are >= 0). A range holds 10,000 draws.
ORDER_STREAM = -1  # -1 - p: the order of the items in pass p
SAMPLE_STREAM = -10_000  # - i: the initial noise of concept prompt i's cached samples
PROBE_STREAM = -20_000  # - j: the noise at the j-th timestep of the difficulty probe
SALIENCY_STREAM = -30_000  # - k: the forward noise of the k-th (item, sample) in saliency
TRAJECTORY_STREAM = -40_000  # - i: the initial noise of concept prompt i's trajectory pool
RETAIN_SEED_OFFSET = 7_777_777  # the retain items' order uses seed + this, not the forget one's


def step_generator(seed: int, rank: int, step: int, device="cpu") -> torch.Generator:
    """A generator whose state depends only on (seed, rank, step); see the streams above."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + rank * 10_007 + step * 7_919) % (2**63 - 1))
    return g


def item_ids(
    num_items: int, batch_size: int, seed: int, rank: int, step: int, stream: int = 0
) -> torch.Tensor:
    """[B] item indices for a step: consecutive slices of per-pass permutations.

    Each pass over the item set visits every item once (per process) before any repeats, so no
    item is starved whatever the batch size. ``stream`` separates the forget set's order (0)
    from the retain set's (1).
    """
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, num_items)
        g = step_generator(seed + stream * RETAIN_SEED_OFFSET, rank, ORDER_STREAM - epoch)
        perm = torch.randperm(num_items, generator=g)
        out.append(perm[i])
    return torch.stack(out)


def per_sample_items(items: ForgetSet) -> ForgetSet:
    """One item per (prompt, cached sample) pair: [P, S, ...] samples -> P * S items.

    LoReUn weighs items, and a concept prompt's samples differ in how well the model fits
    them, so each sample is an item with its own difficulty and weight; a single concept then
    still gives S items to weigh.
    """
    p, s = items.x0.shape[:2]
    return ForgetSet(
        cond=items.cond.repeat_interleave(s, dim=0),
        uncond=items.uncond,
        anchor=items.anchor,
        x0=items.x0.reshape(p * s, 1, *items.x0.shape[2:]),
        pool=items.pool,
        pool_of=None if items.pool_of is None else items.pool_of.repeat_interleave(s),
    )


def vae_scale(pipe) -> int:
    """Pixels per latent cell: 2 ** (number of VAE down blocks - 1)."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def pixel_size(pipe, resolution: int | None) -> int:
    """Training image size: ``resolution``, or the model's native size."""
    return resolution or pipe.unet.config.sample_size * vae_scale(pipe)


def latent_shape(pipe, resolution: int | None) -> tuple[int, int, int]:
    """(C, H, W) of the latents for a resolution (default: the model's native size)."""
    size = pixel_size(pipe, resolution) // vae_scale(pipe)
    return pipe.unet.config.in_channels, size, size


def sample_forget_latents(
    eps,
    pipe,
    forget: ForgetSet,
    samples: int,
    steps: int,
    guidance: float,
    resolution: int | None,
    seed: int,
    device,
) -> torch.Tensor:
    """Sample ``samples`` x_0 latents per concept with ``eps``: -> [N, S, C, H, W]."""

    def run(ddim, cond, uncond, noise):
        return ddim_sample(eps, ddim, cond, uncond, noise, guidance)

    return _per_prompt(run, pipe, forget, samples, steps, resolution, seed, SAMPLE_STREAM, device)


def sample_trajectory_pool(
    eps, pipe, forget: ForgetSet, pool: int, steps: int, guidance: float, resolution, seed, device
) -> torch.Tensor:
    """``pool`` full guided DDIM trajectories per concept prompt: -> [Q, P, K, C, H, W].

    Partial sampling (ESD) runs DDIM from fresh noise to a random stop at every step; keeping
    each step's latent of a fixed set of runs gives the same x_t distribution, drawn from a
    finite pool, for the cost of sampling the pool once.
    """

    def run(ddim, cond, uncond, noise):
        return ddim_trajectory(eps, ddim, cond, uncond, noise, guidance)

    return _per_prompt(run, pipe, forget, pool, steps, resolution, seed, TRAJECTORY_STREAM, device)


def _per_prompt(run, pipe, forget: ForgetSet, n: int, steps, resolution, seed, stream, device):
    """``run(ddim, cond [n], uncond [n], noise [n, C, H, W])`` for each prompt i, its noise
    drawn from stream ``stream - i`` so that each cache is reproducible on its own; the
    results stacked on the CPU: -> [N, n, ...]."""
    ddim = make_ddim(pipe.scheduler.config, steps)
    from tqdm.auto import tqdm

    from loreun.pipelines.meta import quiet

    shape = latent_shape(pipe, resolution)
    out = []
    # one prompt's n samples at a time: a bar, since caching can take minutes on a large model
    bar = tqdm(range(len(forget)), desc="sampling", unit="prompt", disable=quiet(), leave=False)
    for i in bar:
        g = step_generator(seed, 0, stream - i)
        noise = torch.randn((n, *shape), generator=g).to(device)
        cond = forget.cond[i : i + 1].expand(n, -1, -1)
        out.append(run(ddim, cond, forget.uncond.expand(n, -1, -1), noise).cpu())
    return torch.stack(out)


def trajectory_batch(forget: ForgetSet, ids: torch.Tensor, g: torch.Generator, ddim, device):
    """ESD's x_t from the pool: for each item a trajectory of its prompt and a stop, each
    drawn uniformly; t is the DDIM timestep of the stop. The target stays unknown, as with
    partial sampling."""
    rows = forget.pool_of[ids]
    pick = torch.randint(0, forget.pool.shape[1], (len(ids),), generator=g)
    stop = torch.randint(0, forget.pool.shape[2], (len(ids),), generator=g)
    xt = forget.pool[rows, pick, stop]
    return _batch(forget, ids, xt, ddim.timesteps.cpu()[stop], None, device)


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


def cached_batch(
    forget: ForgetSet, ids: torch.Tensor, g: torch.Generator, schedule: NoiseSchedule, device
) -> ForgetBatch:
    """Forward-noise one cached sample of each item at a random timestep."""
    n_samples = forget.x0.shape[1]
    pick = torch.randint(0, n_samples, (len(ids),), generator=g)
    x0 = forget.x0[ids, pick]
    t = torch.randint(0, len(schedule), (len(ids),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    xt = schedule.add_noise(x0, t, noise)
    return _batch(forget, ids, xt, t, schedule.target(x0, t, noise), device)


def partial_batch(
    eps,
    forget: ForgetSet,
    ids: torch.Tensor,
    g: torch.Generator,
    ddim,
    guidance: float,
    shape,
    device,
) -> ForgetBatch:
    """ESD's x_t: guided DDIM from noise down to a random step shared by the batch."""
    stop = int(torch.randint(0, len(ddim.timesteps), (1,), generator=g))
    noise = torch.randn((len(ids), *shape), generator=g).to(device)
    cond = forget.cond[ids].to(device)
    uncond = forget.uncond.expand(len(ids), -1, -1).to(device)
    xt = ddim_sample(eps, ddim, cond, uncond, noise, guidance, stop=stop)
    t = ddim.timesteps[stop].repeat(len(ids))
    return _batch(forget, ids, xt, t, None, device)


def _batch(forget: ForgetSet, ids, xt, t, target, device) -> ForgetBatch:
    b = len(ids)
    anchor = forget.anchor.expand(b, -1, -1).to(device) if forget.anchor is not None else None
    return ForgetBatch(
        xt=xt.to(device),
        t=t.to(device),
        cond=forget.cond[ids].to(device),
        uncond=forget.uncond.expand(b, -1, -1).to(device),
        anchor=anchor,
        target=target.to(device) if target is not None else None,
        ids=ids,
    )


@torch.no_grad()
def probe_difficulty(
    eps,
    forget: ForgetSet,
    ids: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    schedule: NoiseSchedule,
    device,
) -> torch.Tensor:
    """Denoising error of items under their own prompt, in the model's parametrisation: -> [B].

    Uses the first cached sample of each item, so difficulty compares items, not samples.

    Args:
        ids: [B] items; t: [B] timesteps; noise: [B, C, H, W] the noise to add.
    """
    x0 = forget.x0[ids, 0]
    xt = schedule.add_noise(x0, t.cpu(), noise)
    pred = eps(xt.to(device), t.to(device), forget.cond[ids].to(device))
    return per_sample_mse(pred, schedule.target(x0, t.cpu(), noise).to(device)).cpu()


def probe_grid(
    eps, forget: ForgetSet, schedule: NoiseSchedule, seed: int, device, k: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Difficulty of every item at k shared, evenly spaced timesteps: -> ([N, K], [K]).

    All items see the same timesteps and the same noise, so their difficulties differ only
    through the items themselves.
    """
    from tqdm.auto import tqdm

    from loreun.pipelines.meta import quiet

    n_train = len(schedule)
    t_grid = torch.arange(k) * n_train // k + n_train // (2 * k)
    shape = forget.x0.shape[2:]
    cols = []
    # k x N forward passes: on an SD-sized model and a large forget set, minutes
    for j, t in enumerate(tqdm(t_grid, desc="probing", unit="t", disable=quiet(), leave=False)):
        noise = torch.randn((1, *shape), generator=step_generator(seed, 0, PROBE_STREAM - j))
        cols.append(
            torch.cat(
                [
                    probe_difficulty(
                        eps,
                        forget,
                        chunk,
                        t.repeat(len(chunk)),
                        noise.expand(len(chunk), *shape),
                        schedule,
                        device,
                    )
                    for chunk in torch.arange(len(forget)).split(64)
                ]
            )
        )
    return torch.stack(cols, dim=1), t_grid
