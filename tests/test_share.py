"""Sharing an erasure: single-file checkpoints in the original key layout, pipeline folders with a
model card and without local paths, LoRA on the built-in digits model."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loreun.cli.main import main

from .conftest import erase_args


@pytest.fixture(scope="module")
def sd1_shaped_dir(tmp_path_factory):
    """SD 1.x's block layout (four levels, two layers each, attention in the first three) at a
    tiny width, so every index of the LDM mapping is exercised."""
    from diffusers import UNet2DConditionModel

    from loreun.pipelines.tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline(seed=0)
    torch.manual_seed(1)
    pipe.unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=2,
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    folder = tmp_path_factory.mktemp("sd1") / "sd1-shaped"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def erased_sd1(sd1_shaped_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("erase") / "run"
    assert main(erase_args(sd1_shaped_dir, out, "--method", "esd-u", "--lr", "1e-2")) == 0
    return out


def _with_unet(pipe):
    """(pipe, its UNet): what the family hands ``to_ldm``."""
    return pipe, pipe.unet


def _tensors(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_single_file_loads_back_through_diffusers_to_the_same_tensors(
    erased_sd1, sd1_shaped_dir, tmp_path
):
    from diffusers import StableDiffusionPipeline

    from loreun.pipelines import load_erased_pipeline

    path = tmp_path / "erased.safetensors"
    assert main(["export", str(erased_sd1), "--single-file", str(path), "--dtype", "fp32"]) == 0
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        header = json.loads(f.metadata()["loreun.erasure"])
    # the names AUTOMATIC1111 and ComfyUI look for in an SD 1.x checkpoint
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in keys
    assert "model.diffusion_model.input_blocks.9.0.op.weight" in keys  # the third downsampler
    assert not any(k.startswith("model.diffusion_model.input_blocks.12.") for k in keys)
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in keys  # UpBlock2D's upsampler
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert header["method"] == "esd-u" and not header["base_model"].startswith("/")
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(sd1_shaped_dir))
    want = load_erased_pipeline(str(sd1_shaped_dir), erased_sd1)
    for name in ("unet", "vae", "text_encoder"):
        a, b = _tensors(getattr(want, name)), _tensors(getattr(loaded, name))
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k].reshape(a[k].shape)) for k in a), name
    base = StableDiffusionPipeline.from_pretrained(sd1_shaped_dir).unet.state_dict()
    assert any(not torch.equal(base[k], v) for k, v in _tensors(loaded.unet).items())


def test_the_default_single_file_is_half_precision(erased_sd1, sd1_shaped_dir, tmp_path):
    """What web UIs expect: fp16, half the size of fp32, loading to the fp32 file's values
    rounded."""
    from diffusers import StableDiffusionPipeline

    half, full = tmp_path / "half.safetensors", tmp_path / "full.safetensors"
    assert main(["export", str(erased_sd1), "--single-file", str(half)]) == 0
    assert main(["export", str(erased_sd1), "--single-file", str(full), "--dtype", "fp32"]) == 0
    with safe_open(str(half), framework="pt") as f:
        assert f.metadata()["dtype"] == "fp16"
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    weights = [sum(t.nbytes for t in load_file(str(p)).values()) for p in (half, full)]
    assert weights[0] * 2 == weights[1]  # the header aside, which a tiny model makes large
    kw = dict(config=str(sd1_shaped_dir), torch_dtype=torch.float16)
    a = StableDiffusionPipeline.from_single_file(str(half), **kw).unet.state_dict()
    b = StableDiffusionPipeline.from_single_file(str(full), **kw).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_local_path_in_the_erased_file_it_is_shared_as(tmp_path):
    """The header of erased.safetensors is what users share: no --out, --model or
    --forget-images path in it, only their last names."""
    from loreun.pipelines.digits_data import write_digit_folders

    forget, _ = write_digit_folders(tmp_path / "d", 8, 1)
    out = tmp_path / "runs" / "e"
    argv = ["erase", "--model", "digits", "--forget-images", str(forget), "--steps"]
    argv += ["2", "--objective", "remap", "--anchor", "a handwritten 0", "--out", str(out), "-q"]
    assert main(argv) == 0
    raw = (out / "erased.safetensors").read_bytes()[:200_000]
    header = raw[8 : 8 + int.from_bytes(raw[:8], "little")].decode()
    assert str(tmp_path) not in header
    meta = json.loads(json.loads(header)["__metadata__"]["loreun"])
    assert meta["hyperparameters"]["forget_images"] == "forget"  # the last name is kept
    assert (meta["base_model"], meta["hyperparameters"]["out"]) == ("digits", "e")


def test_pipeline_folder_has_a_model_card_and_no_local_paths(erased_sd1, tmp_path):
    out = tmp_path / "shared"
    audit = tmp_path / "eval"
    audit.mkdir()
    from loreun.pipelines.loading import read_erased

    sha = read_erased(erased_sd1)[2]  # the audit must be of this run's weights
    summary = {
        "protocol": "test protocol",
        "sources": {
            "erased": {
                "digits": {"rows": [["erased top-1", 0.125]]},
                "images": 8,
                "erasure": {"sha256": sha},
            }
        },
    }
    (audit / "summary.json").write_text(json.dumps(summary))
    assert main(["export", str(erased_sd1), "--pipeline", str(out), "--audit", str(audit)]) == 0
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: diffusers" in front and "- concept-erasure" in front
    assert "base_model:" not in front  # a local base is not a hub id
    assert "license: other" in front  # its README gives none
    assert "| erased | a cat, a dog |" in card and "| trained modules | esd-u |" in card
    assert "| erased | digits: erased top-1 | 0.125 |" in card
    assert "Intended use and limits" in card
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".md", ".txt"}:
            assert str(tmp_path.parent) not in path.read_text(), path


def test_the_card_names_the_base_and_its_license(erased_sd1, sd1_shaped_dir, tmp_path):
    """A base in the hub cache (or a git clone) names its hub id; its own README gives the
    license; --base-model-id names a plain folder's."""
    import shutil

    from loreun.erase.card import front_matter

    snapshot = tmp_path / "hub" / "models--CompVis--stable-diffusion-v1-4" / "snapshots" / "abc"
    shutil.copytree(sd1_shaped_dir, snapshot)
    (snapshot / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# SD\n")
    out = tmp_path / "p"
    assert main(["export", str(erased_sd1), "--pipeline", str(out), "--model", str(snapshot)]) == 0
    front = front_matter((out / "README.md").read_text())
    assert front["base_model"] == "CompVis/stable-diffusion-v1-4"
    assert front["license"] == "creativeml-openrail-m"
    argv = ["export", str(erased_sd1), "--pipeline", str(tmp_path / "q")]
    assert main(argv + ["--base-model-id", "someone/sd1-shaped"]) == 0
    front = front_matter((tmp_path / "q" / "README.md").read_text())
    assert (front["base_model"], front["license"]) == ("someone/sd1-shaped", "other")


def test_a_git_clone_of_a_hub_repository_names_it(tmp_path):
    from loreun.erase.card import hub_id

    (tmp_path / "sd" / ".git").mkdir(parents=True)
    remote = '[remote "origin"]\n\turl = https://huggingface.co/owner/model-name\n'
    (tmp_path / "sd" / ".git" / "config").write_text(remote)
    assert hub_id(str(tmp_path / "sd")) == "owner/model-name"
    assert hub_id(str(tmp_path)) is None and hub_id("owner/x") == "owner/x"


def test_export_refuses_what_it_cannot_do(erased_sd1, tmp_path, capsys):
    target = tmp_path / "x.safetensors"
    target.write_text("mine")
    assert main(["export", str(erased_sd1), "--single-file", str(target)]) == 2
    assert target.read_text() == "mine"  # not overwritten
    assert main(["export", str(erased_sd1)]) == 2
    assert main(["export", str(erased_sd1), "--single-file", str(tmp_path / "y.ckpt")]) == 2
    assert main(["export", str(tmp_path / "nothing"), "--pipeline", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    needles = ["--overwrite", "--single-file FILE and/or --pipeline DIR", ".safetensors", "nothing"]
    assert all(n in e for n, e in zip(needles, err[-4:], strict=True)), err


def test_single_file_refuses_layouts_it_does_not_write(tmp_path):
    from loreun.pipelines.single_file import to_ldm
    from loreun.pipelines.tiny import make_tiny_sdxl_pipeline

    with pytest.raises(ValueError, match="SD 1.x layouts; StableDiffusionXLPipeline is not one"):
        to_ldm(*_with_unet(make_tiny_sdxl_pipeline()))


@pytest.mark.slow
def test_digits_lora_erases_and_unloads_bit_for_bit(tmp_path):
    """The built-in model: an erase with --lora-rank 4 loads with diffusers' LoRA API, draws the
    erased digit as something else, and unloading gives back the base image exactly."""
    from diffusers import StableDiffusionPipeline

    from loreun.eval.classify import ImageClassifier
    from loreun.pipelines.models import BUILTIN_MODELS

    out = tmp_path / "lora"
    args = ["erase", "--model", "digits", "--concept", "a handwritten 3", "--out", str(out)]
    args += ["--lora-rank", "4", "--steps", "60", "--batch-size", "8", "--lr", "1e-3", "-q"]
    assert main(args) == 0
    pipe = StableDiffusionPipeline.from_pretrained(BUILTIN_MODELS["digits"])
    pipe.set_progress_bar_config(disable=True)

    def draw():
        gens = [torch.Generator().manual_seed(100 + i) for i in range(8)]
        return pipe(["a handwritten 3"] * 8, generator=gens, num_inference_steps=20).images

    clf = ImageClassifier("digits")

    def threes(images):
        return sum(r["top1_correct"] for r in clf(images, [{"class": "3"}] * len(images)))

    base = draw()
    pipe.load_lora_weights(str(out))
    erased = draw()
    pipe.unload_lora_weights()
    again = draw()
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base, again))
    assert threes(base) >= 7 and threes(erased) <= 2, (threes(base), threes(erased))


def test_a_single_file_base_is_checked_through_its_config_folder(
    erased_sd1, sd1_shaped_dir, tmp_path
):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from loreun.pipelines.loading import check_erased_files
    from loreun.pipelines.single_file import to_ldm

    base_file = tmp_path / "base.safetensors"
    save_file(
        to_ldm(*_with_unet(StableDiffusionPipeline.from_pretrained(sd1_shaped_dir))), str(base_file)
    )
    check_erased_files(str(base_file), [erased_sd1], model_config=str(sd1_shaped_dir))


def test_ldm_names_that_diffusers_would_also_accept_otherwise(sd1_shaped_dir):
    """diffusers' single-file reader is lenient where AUTOMATIC1111 is not: an upsampler after
    attention sits in slot 2, VAE attention projections are 1x1 convolutions."""
    from diffusers import StableDiffusionPipeline

    from loreun.pipelines.single_file import text_key, to_ldm, unet_key, vae_key

    sd = to_ldm(*_with_unet(StableDiffusionPipeline.from_pretrained(sd1_shaped_dir)))
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in sd  # CrossAttnUpBlock2D
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in sd  # UpBlock2D
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert sd["first_stage_model.decoder.mid.attn_1.proj_out.weight"].ndim == 4
    assert (
        text_key("embeddings.token_embedding.weight")
        == "text_model.embeddings.token_embedding.weight"
    )
    assert text_key("text_model.final_layer_norm.bias") == "text_model.final_layer_norm.bias"
    with pytest.raises(KeyError, match="no LDM name for UNet key 'add_embedding.linear_1.weight'"):
        unet_key("add_embedding.linear_1.weight", 2, [False])
    with pytest.raises(KeyError, match="no LDM name for 'norms' in input_blocks.1"):
        unet_key("down_blocks.0.norms.0.weight", 2, [False])
    with pytest.raises(KeyError, match="no LDM name for VAE key 'encoder.extra.weight'"):
        vae_key("encoder.extra.weight", 3)


def test_single_file_refuses_sd2_shaped_unets(sd1_shaped_dir):
    from diffusers import StableDiffusionPipeline

    from loreun.pipelines.single_file import to_ldm

    pipe = StableDiffusionPipeline.from_pretrained(sd1_shaped_dir)
    pipe.unet.register_to_config(use_linear_projection=True)
    with pytest.raises(
        ValueError, match="^single-file export writes SD 1.x layouts; this UNet is SD 2.x-shaped$"
    ):
        to_ldm(*_with_unet(pipe))


def test_export_from_a_single_file_base_into_an_empty_folder(erased_sd1, sd1_shaped_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from loreun.erase.export import export_shared
    from loreun.pipelines.loading import read_erased_file
    from loreun.pipelines.single_file import to_ldm

    base_file = tmp_path / "base.safetensors"
    save_file(
        to_ldm(*_with_unet(StableDiffusionPipeline.from_pretrained(sd1_shaped_dir))), str(base_file)
    )
    (tmp_path / "empty").mkdir()
    summary = tmp_path / "eval" / "summary.json"
    summary.parent.mkdir()
    from loreun.pipelines.loading import read_erased

    erasure = {"sha256": read_erased(erased_sd1)[2]}  # an audit of this very run
    summary.write_text(json.dumps({"sources": {"erased": {"erasure": erasure}}}))
    written = export_shared(
        erased_sd1,
        single_file=tmp_path / "e.safetensors",
        pipeline=tmp_path / "empty",
        audit=summary,  # the summary file itself, not only its folder
        model=str(base_file),
        model_config=str(sd1_shaped_dir),
    )
    assert written == [tmp_path / "e.safetensors", tmp_path / "empty"]
    with safe_open(str(written[0]), framework="pt") as f:
        header = json.loads(f.metadata()["loreun.erasure"])
    _, meta = read_erased_file(erased_sd1)
    assert header == {
        "method": "esd-u",
        "objective": "esd",
        "weighting": "uniform",
        "concepts": ["a cat", "a dog"],
        "steps_done": 3,
        "base_fingerprint": meta["base_fingerprint"],
        "base_fingerprint_bf16": meta["base_fingerprint_bf16"],
        "base_model": "sd1-shaped",
        "versions": meta["versions"],
    }
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_shared(erased_sd1, single_file=written[0])  # no overwrite by default
    with pytest.raises(FileNotFoundError, match="^--audit: .*: no summary.json from loreun audit"):
        export_shared(erased_sd1, pipeline=tmp_path / "p2", audit=tmp_path / "nowhere")
