"""Files that an earlier release wrote still load.

``data/release-0.1/unet-erased.safetensors`` was written by loreun 0.1.0 (``loreun erase --model
digits --concept "a handwritten 3" --concept "the number three" --method esd-x-strict --steps 2
--samples-per-concept 2 --sample-steps 2``): the erased file's name was ``unet-erased`` and its
header's format ``loreun.unet-erased``. The built-in model is its base, so its fingerprint holds
on every machine.
"""

import json
import shutil
from pathlib import Path

import pytest

from loreun.cli.main import main

RELEASE = Path(__file__).parent / "data" / "release-0.1"


def test_the_old_name_and_format_load_and_apply():
    from loreun.pipelines import apply_erased_weights
    from loreun.pipelines.loading import erased_file, read_erased_file
    from loreun.pipelines.models import load_pipeline

    assert erased_file(RELEASE).name == "unet-erased.safetensors"  # a folder of that release
    tensors, meta = read_erased_file(RELEASE)
    assert meta["format"] == "loreun.unet-erased" and meta["base_model"] == "digits"
    pipe = load_pipeline("digits")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items() if k in tensors}
    apply_erased_weights(pipe, RELEASE / "unet-erased.safetensors")
    assert any(not (pipe.unet.state_dict()[k] == before[k]).all() for k in tensors)


def test_a_new_run_folder_prefers_the_new_name(tmp_path):
    from loreun.pipelines.loading import erased_file

    run = tmp_path / "run"
    shutil.copytree(RELEASE, run)
    assert erased_file(run).name == "unet-erased.safetensors"
    (run / "erased.safetensors").write_bytes((run / "unet-erased.safetensors").read_bytes())
    assert erased_file(run).name == "erased.safetensors"


@pytest.mark.slow
def test_generate_evaluate_and_export_take_the_old_file(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten 3\n")
    gen = ["generate", "--model", "digits", "--prompts", str(prompts), "--steps", "2", "-q"]
    assert main(gen + ["--erased", str(RELEASE), "--out", str(tmp_path / "g")]) == 0
    record = json.loads((tmp_path / "g" / "manifest.jsonl").read_text())
    assert record["erased"].endswith("unet-erased.safetensors")
    ev = ["evaluate", "--model", "digits", "--prompts", str(prompts), "--steps", "2"]
    ev += ["--detector", "digits", "--erased", str(RELEASE), "--out", str(tmp_path / "e"), "-q"]
    assert main(ev) == 0
    out = tmp_path / "shared"
    assert main(["export", str(RELEASE), "--pipeline", str(out), "--model", "digits"]) == 0
    from diffusers import StableDiffusionPipeline

    assert StableDiffusionPipeline.from_pretrained(out).unet is not None


@pytest.mark.parametrize(
    "family, name",
    [("StableDiffusionPipeline", "UNet"), ("StableDiffusionXLPipeline", "UNet"),
     ("StableDiffusion3Pipeline", "transformer"), ("FluxPipeline", "transformer")],
)  # fmt: skip
def test_the_card_names_the_family_s_denoiser(family, name):
    from loreun.erase.card import model_card

    card = model_card({"family": family, "concepts": ["a cat"]})
    assert f"fine-tuned the {name} only" in card


def test_every_export_form_has_a_writer_and_a_flag():
    """The torch-free table (flags) and the writers are one list of forms."""
    from loreun.cli.main import build_parser
    from loreun.erase.export import WRITERS
    from loreun.erase.export_formats import EXPORT_FORMATS

    assert list(WRITERS) == list(EXPORT_FORMATS)
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["export"]
    flags = {o for a in sub._actions for o in a.option_strings}
    assert {f.flag for f in EXPORT_FORMATS.values()} <= flags
