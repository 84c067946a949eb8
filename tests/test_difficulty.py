"""LoReUn's difficulty: a mean over a shared probe grid is a property of the items, a single
draw is not; the split-half reliability says which, and a memory of noise falls back to
uniform weights."""

import json
import math

import pytest
import torch

from loreun.erase.weighting import LoReUnWeighting, rank_correlation, split_half_reliability
from loreun.erase.weighting_loreun import MIN_RELIABILITY


def test_split_half_reliability_tells_item_differences_from_noise():
    g = torch.Generator().manual_seed(0)
    items = torch.linspace(0, 3, 40).unsqueeze(1)
    assert split_half_reliability(items + 0.3 * torch.randn(40, 10, generator=g)) > 0.9
    assert abs(split_half_reliability(torch.randn(40, 10, generator=g))) < 0.4
    assert math.isnan(split_half_reliability(torch.randn(40, 1, generator=g)))


def test_a_noisy_fill_falls_back_to_uniform_and_says_so():
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(30, 10, generator=g)
    w = LoReUnWeighting(30, temperature=0.1, variant="static", min_reliability=0.5)
    w.fill(noise, torch.arange(10) * 100)
    assert w.fell_back and torch.equal(w.all_weights(), torch.ones(30))
    assert w.summary()["fell_back_to_uniform"] is True
    signal = torch.linspace(0, 1, 30).unsqueeze(1) + 0.01 * noise
    kept = LoReUnWeighting(30, temperature=0.1, variant="dynamic", min_reliability=0.5)
    kept.fill(signal, torch.arange(10) * 100)
    assert not kept.fell_back and kept.all_weights().std() > 0.1
    batch = LoReUnWeighting(30, temperature=0.1, variant="batch", min_reliability=0.5)
    batch.fill(noise, torch.arange(10) * 100)
    assert not batch.fell_back  # its weights come from each batch, not from the fill


def test_on_digits_the_grid_is_reliable_and_a_single_draw_is_not():
    """Forget items of digit 3 (5 captions x 8 base samples) on the built-in model."""
    from loreun.erase.difficulty import probe_difficulty, probe_grid
    from loreun.erase.items import ItemSet, per_sample_items, sample_forget_latents
    from loreun.pipelines.digits_data import digit_captions
    from loreun.pipelines.family import encode_prompts, family_of
    from loreun.pipelines.models import load_pipeline
    from loreun.pipelines.schedule import schedule_of

    pipe = load_pipeline("digits")
    family, schedule = family_of(pipe), schedule_of(pipe)
    predict = family.predictor(family.denoiser(pipe).eval())
    emb = encode_prompts(pipe, digit_captions(3) + [""], "cpu")
    items = ItemSet(cond=emb[:5], uncond=emb[5:], anchor=None)
    items.x0 = sample_forget_latents(predict, pipe, items, 8, 25, 3.0, None, 0, "cpu")
    items = per_sample_items(items)
    grid, _ = probe_grid(predict, items, schedule, seed=0, device="cpu", k=10)
    grid_rel = split_half_reliability(grid / grid.mean(0, keepdim=True))
    draws = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        ids = torch.arange(len(items))
        t, noise = schedule.draw_times(len(ids), g), torch.randn(items.x0[:, 0].shape, generator=g)
        draws.append(probe_difficulty(predict, items, ids, t, noise, schedule, "cpu"))
    single_rel = rank_correlation(*draws)
    print(f"grid split-half {grid_rel:.3f}, single draws {single_rel:.3f}")
    assert grid_rel >= MIN_RELIABILITY
    assert grid_rel > single_rel + 0.3


def test_the_paper_variant_softmaxes_the_batch_raw_losses_at_a_fixed_tau():
    import pytest

    w = LoReUnWeighting(10, temperature=0.5, variant="paper")
    assert w.normalizer is None and w.per_batch and w.observes and not w.gathers
    ids, loss = torch.tensor([3, 7, 1]), torch.tensor([0.2, 1.0, 0.6])
    w.observe(ids, torch.tensor([10, 500, 900]), loss)  # times do not matter: raw losses
    want = 3 * torch.softmax(-loss / 0.5, dim=0)
    assert torch.allclose(w.weights(ids), want) and w.weights(ids).mean() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="paper variant keeps tau fixed"):
        LoReUnWeighting(10, variant="paper", target_ess=0.5)


def test_the_ess_floor_keeps_memory_weights_from_collapsing_on_one_item():
    from loreun.erase.weighting import effective_sample_size

    memory = torch.cat([torch.tensor([0.0]), torch.full((49,), 5.0)])  # one easy item
    free = LoReUnWeighting(50, temperature=0.05, variant="static", normalize=False)
    floored = LoReUnWeighting(50, temperature=0.05, variant="static", normalize=False, min_ess=0.2)
    for w in (free, floored):
        w.fill(memory.unsqueeze(1).repeat(1, 2), torch.tensor([100, 600]))
    assert effective_sample_size(free.all_weights()) < 1.01  # all weight on the easy item
    assert effective_sample_size(floored.all_weights()) >= 0.2 * 50 - 1e-3
    assert floored.all_weights()[0] > floored.all_weights()[1]  # still the easy item first


def test_refill_replaces_the_memory_and_solves_tau_again():
    w = LoReUnWeighting(4, variant="dynamic", normalize=False, target_ess=0.8, reprobe_every=5)
    assert not w.observes and not w.gathers  # re-probes replace the single draws
    t = torch.tensor([100, 500, 900])
    w.fill(torch.tensor([[1.0, 1.1, 0.9]] * 2 + [[3.0, 3.2, 2.8]] * 2), t)
    tau = w.temperature
    w.refill(torch.tensor([[3.0, 3.1, 2.9]] * 2 + [[1.0, 1.2, 0.8]] * 2), t)
    assert torch.allclose(w.memory, torch.tensor([3.0, 3.0, 1.0, 1.0]))
    assert w.all_weights()[0] < w.all_weights()[2]  # the fitted pair is now the other one
    assert math.isfinite(w.temperature) and w.temperature == pytest.approx(tau, rel=1e-3)
    with pytest.raises(ValueError, match="dynamic variant"):
        LoReUnWeighting(4, variant="static", reprobe_every=5)


def test_an_erase_run_reprobes_every_m_steps(tiny_pipeline_dir, tmp_path):
    from loreun.cli.main import main

    from .conftest import erase_args

    out = tmp_path / "o"
    extra = ["--weighting", "loreun", "--min-reliability", "-1", "--reprobe-every", "2"]
    assert main(erase_args(tiny_pipeline_dir, out, *extra, "--steps", "5", "-q")) == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    drift = [r["memory_rank_corr"] for r in log]
    reliability = [r["difficulty_reliability"] for r in log]
    # no single draws folded in: the memory moves only at the re-probes, before steps 2 and 4
    assert drift[0] == drift[1] == 1.0 and drift[2] == drift[3]
    assert reliability[0] == reliability[1] != reliability[2] == reliability[3] != reliability[4]
    argv = erase_args(
        tiny_pipeline_dir,
        tmp_path / "p",
        "--reprobe-every",
        "2",
        "--weighting",
        "loreun",
        "--loreun-variant",
        "static",
    )
    assert main(argv) == 2


def test_the_set_up_line_gives_the_whole_probe_mean_s_reliability():
    """A split-half correlation is the reliability of a mean half as long; Spearman-Brown
    (2r / (1 + r)) gives that of the K-probe mean the weighting uses."""
    from loreun.erase.difficulty import reliability_line
    from loreun.erase.weighting import spearman_brown

    assert spearman_brown(0.85) == pytest.approx(0.9189, abs=1e-4)
    assert spearman_brown(0.0) == 0.0 and spearman_brown(1.0) == 1.0
    line = reliability_line({"difficulty_reliability": 0.85}, 0.5)
    assert line == (
        "difficulty: split-half reliability 0.85 (the whole probe mean's, by Spearman-Brown: 0.92)"
    )
