"""The flow models' forget sets are sampled as the run and the model ask: FLUX.1-dev's
resolution-dependent shift at --resolution, FLUX.1-schnell in its own few steps without
guidance."""

import json

import torch
from safetensors import safe_open

from loreun.cli.main import main
from loreun.erase.config import EraseConfig
from loreun.erase.items import ItemSet, forget_sampling, sample_forget_latents
from loreun.pipelines.family import encode_prompts
from loreun.pipelines.schedule import schedule_of
from loreun.pipelines.tiny import make_tiny_flux_pipeline


def _recorded_times(pipe, resolution, steps=6):
    """The timesteps the forget set's sampler calls the model at."""
    emb = encode_prompts(pipe, ["a cat", ""], "cpu")
    items = ItemSet(cond=emb[:1], uncond=emb[1:], anchor=None)
    seen = []

    def eps(x, t, cond):
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    sample_forget_latents(eps, pipe, items, 1, steps, 3.0, resolution, 0, "cpu")
    return seen


def test_dev_s_forget_set_is_sampled_with_the_run_s_resolution_shift():
    pipe = make_tiny_flux_pipeline(dev=True)
    native = _recorded_times(pipe, None)
    at_64 = _recorded_times(pipe, 64)
    want = schedule_of(pipe, 64).sampler(6).timesteps.tolist()
    assert at_64 == want and at_64 != native  # 4x the image tokens: a larger shift


def test_schnell_s_forget_set_takes_its_own_steps_and_no_guidance(tmp_path):
    schnell, dev = make_tiny_flux_pipeline(dev=False), make_tiny_flux_pipeline(dev=True)
    cfg = EraseConfig(model="x", out="o", concepts=["a"], sample_steps=50, sample_guidance=3.0)
    assert forget_sampling(cfg, schnell) == (4, 1.0)
    assert forget_sampling(cfg, dev) == (50, 3.0)
    folder = tmp_path / "schnell"
    schnell.save_pretrained(folder)
    out = tmp_path / "o"
    argv = ["erase", "--model", str(folder), "--concept", "a cat", "--concept", "a dog"]
    argv += ["--steps", "1", "--xt-source", "cached", "--out", str(out), "-q"]
    assert main(argv) == 0
    with safe_open(str(out / "cache" / "forget-latents.safetensors"), framework="pt") as f:
        key = json.loads(f.metadata()["key"])
    assert (key["steps"], key["guidance"]) == (4, 1.0)
