"""The built-in flow model: SD3's architecture on the digits data, loaded with plain diffusers,
drawing the prompted digit, erased end to end by the demo."""

import json

import pytest
import torch

from loreun.cli.main import main
from loreun.pipelines.digits_data import digit_captions
from loreun.pipelines.models import BUILTIN_MODELS


def test_shipped_flow_model_loads_with_plain_diffusers_and_draws_the_digit():
    from diffusers import StableDiffusion3Pipeline

    from loreun.eval.classify import ImageClassifier

    pipe = StableDiffusion3Pipeline.from_pretrained(
        BUILTIN_MODELS["digits-flow"], text_encoder_3=None, tokenizer_3=None
    )
    pipe.set_progress_bar_config(disable=True)
    prompts = [digit_captions(d)[k % 5] for d in range(10) for k in range(2)]
    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(prompts))]
    images = pipe(
        prompts, generator=gens, num_inference_steps=20, guidance_scale=3.0, max_sequence_length=16
    ).images
    assert images[0].size == (16, 16)
    res = ImageClassifier("digits")(
        images, [{"class": str(d)} for d in range(10) for _ in range(2)]
    )
    accuracy = sum(r["top1_correct"] for r in res) / len(res)
    assert accuracy >= 0.85  # docs/digits.md has the 500-image figure


def test_shipped_models_name_no_local_folder():
    """from_pretrained records where a component came from; a shipped config must not."""
    for name in ("digits", "digits-flow"):
        for path in BUILTIN_MODELS[name].rglob("*.json"):
            data = json.loads(path.read_text())
            assert not (isinstance(data, dict) and "_name_or_path" in data), path


def test_shipped_flow_model_is_small():
    folder = BUILTIN_MODELS["digits-flow"]
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 20 * 2**20
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"


@pytest.mark.slow
def test_flow_training_script_writes_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from loreun.pipelines.digits_flow import FlowTrainConfig, train_flow_pipeline

    cfg = FlowTrainConfig(steps=2, batch_size=8, exclude_digit=3)
    out = train_flow_pipeline(tmp_path / "flow", cfg, vae_from=BUILTIN_MODELS["digits"])
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a handwritten 3", num_inference_steps=2, max_sequence_length=16).images[0]
    assert img.size == (16, 16)


@pytest.mark.slow
def test_flow_demo_end_to_end_reduced(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--model", "digits-flow", "--out", str(out), "--samples-per-prompt", "1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "from digits-flow" in text and "erased digit (3)" in text
    s = json.loads((out / "summary.json").read_text())["sources"]
    assert s["original"]["digits"]["erased_top1"] > s["erased"]["digits"]["erased_top1"]
    assert s["erased"]["digits"]["other_top1"] >= s["original"]["digits"]["other_top1"] - 0.1
