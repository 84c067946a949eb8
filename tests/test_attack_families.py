"""The attack on every family: each family's conditioning from token ids equals its pipeline's
own, a prefix reaches every encoder that reads the prompt (CLIP after its start token, T5
first), and ``loreun attack`` runs through the real command on tiny SDXL, SD3 (with and without
T5) and FLUX pipelines and on the built-in ``digits-flow``."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from loreun.cli.main import main
from loreun.pipelines.family import Cond, family_of
from loreun.pipelines.prefix_attack import (
    prefix_start,
    prefixed_ids,
    swapped_prefixes,
    token_spaces,
)

KINDS = ("sd", "sdxl", "sd3", "sd3-t5", "flux")
PROMPTS = ["a handwritten 3", "the digit seven zebra"]


def _pipeline(kind: str):
    from loreun.pipelines import tiny

    pipe = {
        "sd": lambda: tiny.make_tiny_pipeline(),
        "sdxl": lambda: tiny.make_tiny_sdxl_pipeline(),
        "sd3": lambda: tiny.make_tiny_sd3_pipeline(),
        "sd3-t5": lambda: tiny.make_tiny_sd3_pipeline(t5=True),
        "flux": lambda: tiny.make_tiny_flux_pipeline(),
    }[kind]()
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).eval()  # as loaded: T5's dropout off
    return pipe


def _close(got, want) -> float:
    if isinstance(want, Cond):
        errors = [(got.emb - want.emb).abs().max(), (got.pooled - want.pooled).abs().max()]
        if want.time_ids is not None:
            errors.append((got.time_ids - want.time_ids).abs().max())
        return max(float(e.detach()) for e in errors)
    return float((got - want).abs().max().detach())


@pytest.mark.parametrize("kind", KINDS)
def test_conditioning_from_token_ids_equals_the_pipelines_own(kind):
    pipe = _pipeline(kind)
    family = family_of(pipe)
    encoders = family.prompt_encoders(pipe)
    with torch.no_grad():
        got = family.encode_ids(pipe, {e.name: e.tokenize(PROMPTS) for e in encoders})
    want = family.encode(pipe, PROMPTS, "cpu")
    assert _close(got, want) < 1e-5
    expected = {"sd": 1, "sdxl": 2, "sd3": 2, "sd3-t5": 3, "flux": 2}[kind]
    assert len(encoders) == expected


def test_t5_takes_the_prefix_first_and_clip_after_its_start_token():
    from loreun.pipelines.digits_data import build_t5_tokenizer, build_tokenizer

    t5, (clip, _, _) = build_t5_tokenizer(32), build_tokenizer(16)
    assert prefix_start(t5) == 0 and prefix_start(clip) == 1
    plain = t5("a handwritten 3", padding="max_length", max_length=32).input_ids
    ids = prefixed_ids(t5, "a handwritten 3", 4, 32, placeholder=7)
    assert ids.shape == (1, 32) and ids[0, :4].tolist() == [7] * 4
    assert ids[0, 4:].tolist() == plain[:-4]
    long = prefixed_ids(t5, " ".join(["three"] * 60), 4, 32, placeholder=7)
    assert long[0, -1].item() == t5.eos_token_id


@pytest.mark.parametrize("kind", ["sdxl", "sd3-t5", "flux"])
def test_a_prefix_of_real_tokens_encodes_as_those_tokens(kind):
    """Swapping in real tokens' embeddings at every encoder gives those tokens' conditioning,
    pooled outputs included (the placeholders are plain tokens, so the end token is found)."""
    pipe = _pipeline(kind)
    family = family_of(pipe)
    spaces = token_spaces(family.prompt_encoders(pipe))
    k = 2
    real, placed, swaps = {}, {}, []
    for n, space in enumerate(spaces):
        chosen = space.ids[3 + n : 3 + n + k]
        for enc, table in zip(space.encoders, space.tables):
            start = prefix_start(enc.tokenizer)
            ids = prefixed_ids(enc.tokenizer, PROMPTS[0], k, enc.length, int(space.ids[0]))
            placed[enc.name], real[enc.name] = ids, ids.clone()
            real[enc.name][0, start : start + k] = chosen
            index = [space.ids.tolist().index(int(i)) for i in chosen]
            swaps.append((enc.module, start, table[index]))
    assert len(spaces) == (2 if kind == "sd3-t5" else 1)
    with torch.no_grad():
        want = family.encode_ids(pipe, real)
        with swapped_prefixes(swaps):
            got = family.encode_ids(pipe, placed)
    assert _close(got, want) < 1e-5


ATTACK = ["--detector", "digits", "--erased-class", "3", "--steps", "2", "--attack-steps", "2"]


@pytest.fixture(scope="module")
def two_rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "threes.csv"
    path.write_text("prompt,class,evaluation_seed\na handwritten 3,3,11\nthe digit three,3,12\n")
    return path


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "sd3-t5", "flux"])
def test_loreun_attack_runs_on_every_family(kind, two_rows, tmp_path):
    from loreun.pipelines.generate import pipeline_sample
    from loreun.pipelines.models import load_pipeline
    from loreun.pipelines.tiny import save_tiny_flow_pipeline, save_tiny_sdxl_pipeline

    model = tmp_path / "model"
    save_tiny_sdxl_pipeline(model) if kind == "sdxl" else save_tiny_flow_pipeline(model, kind)
    out = tmp_path / "attack"
    both = ["--attack-kind", "prefix", "--attack-kind", "embedding"] if kind == "flux" else []
    argv = ["attack", "--model", model, "--prompts", two_rows, "--out", out, "-q", *ATTACK]
    assert main([str(a) for a in [*argv, *both]]) == 0
    summary = json.loads((out / "summary.json").read_text())
    log = [json.loads(line) for line in (out / "attack.jsonl").read_text().splitlines()]
    assert summary["rows"] == len(log) == 2 and 0 <= summary["asr"] <= 1
    if both:  # the embedding attack reaches CLIP's pooled output and T5 alike
        assert set(summary["asr_by_kind"]) == {"prefix", "embedding"}
        assert all(r["embedding_rounds"] for r in log if not r["pre_success"])
    attacked = [r for r in log if r["adv_encoders"]]
    assert attacked, "no row was attacked: the test would check nothing"
    pipe = load_pipeline(str(model))
    names = [e.name for e in family_of(pipe).prompt_encoders(pipe)]
    rec = attacked[0]
    assert sorted(rec["adv_encoders"]) == names and len(rec["losses"]) == 2
    # the recorded ids, encoded and sampled at the row's seed, give the judged image
    ids = {n: torch.tensor([v["token_ids"]]) for n, v in rec["adv_encoders"].items()}
    with torch.no_grad():
        cond = family_of(pipe).encode_ids(pipe, ids)
    saved = Image.open(out / rec["attacked_image"]).convert("RGB")
    gen = [torch.Generator().manual_seed(rec["seed"])]
    _, image = pipeline_sample(pipe, cond, gen, rec["guidance"], 2, *saved.size)
    assert np.abs(np.asarray(saved, int) - np.asarray(image, int)).max() <= 1


def test_loreun_attack_runs_on_digits_flow(tmp_path):
    out = tmp_path / "attack"
    argv = ["attack", "--model", "digits-flow", "--prompts", "digits", "--out", str(out), "-q"]
    assert main([*argv, *ATTACK, "--attack-rounds", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 10 and summary["original_rate"] > 0.5  # the base draws 3s
