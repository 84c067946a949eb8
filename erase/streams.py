"""The random streams of an erase run.

Every random draw is seeded from (seed, process rank, step), so a step is reproducible on its
own and a resumed run sees exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import torch

# Draws made outside the training loop use negative "steps", one range each, so that none
# repeats a training step's stream (steps are >= 0). A range holds 10,000 draws.
ORDER_STREAM = -1  # -1 - p: the order of the items in pass p
SAMPLE_STREAM = -10_000  # - i: the initial noise of concept prompt i's cached samples
PROBE_STREAM = -20_000  # - j: the noise at the j-th timestep of the difficulty probe
SALIENCY_STREAM = -30_000  # - k: the forward noise of the k-th (item, sample) in saliency
TRAJECTORY_STREAM = -40_000  # - i: the initial noise of concept prompt i's trajectory pool
ADVERSARIAL_STREAM = -50_000  # - r: which item the r-th attack of --adversarial targets
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
    from the retain set's (1) and the adversarial pool's (2).
    """
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, num_items)
        g = step_generator(seed + stream * RETAIN_SEED_OFFSET, rank, ORDER_STREAM - epoch)
        perm = torch.randperm(num_items, generator=g)
        out.append(perm[i])
    return torch.stack(out)
