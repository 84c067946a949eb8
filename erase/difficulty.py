"""An item's difficulty: its denoising error under its own prompt, for LoReUn's weights.

The fill probes every forget item at a shared grid of times and noises before training; during
training the dynamic variant observes each step's items (free with a forward-noised source,
one extra no-grad probe with partial sampling).
"""

from __future__ import annotations

import torch

from loreun.pipelines.schedule import Schedule

from .items import ItemSet
from .objectives import per_sample_mse
from .streams import PROBE_STREAM, step_generator
from .weighting import spearman_brown


@torch.no_grad()
def probe_difficulty(
    predict,
    forget: ItemSet,
    ids: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    schedule: Schedule,
    device,
) -> torch.Tensor:
    """Denoising error of items under their own prompt, in the model's parametrisation: -> [B].

    Uses the first cached sample of each item, so difficulty compares items, not samples.

    Args:
        ids: [B] items; t: [B] times; noise: [B, C, H, W] the noise to add.
    """
    x0 = forget.x0[ids, 0]
    xt = schedule.add_noise(x0, t.cpu(), noise)
    pred = predict(xt.to(device), t.to(device), forget.cond[ids].to(device))
    return per_sample_mse(pred, schedule.target(x0, t.cpu(), noise).to(device)).cpu()


def probe_grid(
    predict, forget: ItemSet, schedule: Schedule, seed: int, device, k: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Difficulty of every item at the schedule's k shared probe times: -> ([N, K], [K]).

    All items see the same times and the same noise, so their difficulties differ only
    through the items themselves.
    """
    from tqdm.auto import tqdm

    from loreun.pipelines.meta import quiet

    t_grid = schedule.probe_times(k)
    shape = forget.x0.shape[2:]
    cols = []
    # k x N forward passes: on an SD-sized model and a large forget set, minutes
    for j, t in enumerate(tqdm(t_grid, desc="probing", unit="t", disable=quiet(), leave=False)):
        noise = torch.randn((1, *shape), generator=step_generator(seed, 0, PROBE_STREAM - j))
        cols.append(
            torch.cat(
                [
                    probe_difficulty(
                        predict,
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


def observe_difficulty(run, acc, batch, pred, g) -> None:
    """Feed dynamic LoReUn the current difficulty of the batch's items, gathered over processes.

    With a forward-noised source the student's prediction already is the denoising output, so
    difficulty is free; partial sampling needs one extra no-grad probe on the cached samples.
    """
    if not run.weighting.observes:
        return
    if batch.target is not None:
        t, diff = batch.t, per_sample_mse(pred.detach(), batch.target)
    else:
        t = run.schedule.draw_times(len(batch.ids), g)
        noise = torch.randn((len(batch.ids), *run.forget.x0.shape[2:]), generator=g)
        with acc.autocast():
            diff = probe_difficulty(
                run.family.predictor(acc.unwrap_model(run.denoiser)),
                run.forget,
                batch.ids,
                t,
                noise,
                run.schedule,
                acc.device,
            )
    ids = batch.ids
    if acc.num_processes > 1 and run.weighting.gathers:
        # every process folds in every process's items, identically
        ids, t, diff = (acc.gather(x.to(acc.device)).cpu() for x in (ids, t, diff))
    run.weighting.observe(ids, t, diff)


def reliability_line(summary: dict, floor: float) -> str:
    """The set-up line that says whether LoReUn's difficulty is a property of the items."""
    rel = summary.get("difficulty_reliability")
    if rel is None:
        return "difficulty: too few items or probes for a split-half reliability"
    line = (
        f"difficulty: split-half reliability {rel:.2f} (the whole probe mean's, by "
        f"Spearman-Brown: {spearman_brown(rel):.2f})"
    )
    if summary.get("fell_back_to_uniform"):
        return (
            f"{line}, below --min-reliability {floor}: the memory is mostly noise, so the "
            "forget items are weighed uniformly (raise --probe-times, or lower --min-reliability)"
        )
    return line
