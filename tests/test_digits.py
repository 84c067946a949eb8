import pytest
import torch

from loreun.cli.main import main
from loreun.pipelines.digits_data import caption_table, digit_captions, load_digit_images
from loreun.pipelines.models import BUILTIN_CLASSIFIERS, BUILTIN_MODELS


def test_shipped_model_loads_offline_with_plain_diffusers_and_draws_the_digit():
    from diffusers import StableDiffusionPipeline

    from loreun.eval.classify import ImageClassifier

    pipe = StableDiffusionPipeline.from_pretrained(BUILTIN_MODELS["digits"])
    pipe.set_progress_bar_config(disable=True)
    prompts = [digit_captions(d)[k % 5] for d in range(10) for k in range(2)]
    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(prompts))]
    images = pipe(prompts, generator=gens, num_inference_steps=20, guidance_scale=3.0).images
    assert images[0].size == (16, 16)
    clf = ImageClassifier("digits")
    res = clf(images, [{"class": str(d)} for d in range(10) for _ in range(2)])
    accuracy = sum(r["top1_correct"] for r in res) / len(res)
    assert accuracy >= 0.85  # the shipped model scores 1.00 over 500 images (docs/digits.md)


def test_shipped_files_are_small_and_the_classifier_is_a_transformers_model():
    size = sum(p.stat().st_size for p in BUILTIN_MODELS["digits"].rglob("*") if p.is_file())
    assert size < 20 * 2**20
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(BUILTIN_CLASSIFIERS["digits"])
    assert model.config.id2label[3] == "3"


def test_classifier_accuracy_on_held_out_digits():
    from loreun.eval.classify import ImageClassifier
    from loreun.pipelines.digits import tensors_to_pil

    images, labels = load_digit_images("generator")  # the classifier never saw these
    images, labels = images[:300], labels[:300]
    res = ImageClassifier("digits")(
        tensors_to_pil(images), [{"class": str(int(y))} for y in labels]
    )
    assert sum(r["top1_correct"] for r in res) / len(res) >= 0.97


def test_retrain_reference_sees_no_image_or_caption_of_the_digit():
    table = caption_table(exclude_digit=3)
    assert table and all(d != 3 for d, _ in table)
    assert not any(c in {x for _, x in table} for c in digit_captions(3))
    images, labels = load_digit_images("generator")
    assert len(images) == len(labels) == 1200 and (labels == 3).any()
    assert {len(load_digit_images(s)[0]) for s in ("generator", "classifier")} == {1200, 597}


@pytest.mark.slow
def test_training_script_writes_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from loreun.pipelines.digits import DigitsTrainConfig, train_digits_pipeline

    cfg = DigitsTrainConfig(vae_steps=2, unet_steps=2, batch_size=8, exclude_digit=3)
    out = train_digits_pipeline(tmp_path / "digits", cfg)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a handwritten 3", num_inference_steps=2, guidance_scale=3.0).images[0]
    assert img.size == (16, 16)
    assert pipe.tokenizer("a handwritten 3").input_ids[1:4] != [1, 1, 1]


@pytest.mark.slow
def test_demo_end_to_end_reduced(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--samples-per-prompt", "1"]) == 0
    text = capsys.readouterr().out
    assert "erased digit (3)" in text and "retained digits" in text
    assert (out / "report.html").is_file() and (out / "erase" / "erased.safetensors").is_file()
    import json

    s = json.loads((out / "summary.json").read_text())["sources"]
    assert s["original"]["digits"]["erased_top1"] > s["erased"]["digits"]["erased_top1"]
    assert s["erased"]["digits"]["other_top1"] >= s["original"]["digits"]["other_top1"] - 0.1
    assert main(["demo", "--out", str(out)]) == 2  # an existing demo is not overwritten
