"""Model families: v-prediction models (SD 2.x 768 and others), whose denoising target is the
velocity, and pipelines of families loreun does not handle yet, refused by name."""

import json

import pytest
import torch
from safetensors import safe_open

from loreun.cli.main import main
from loreun.erase.objectives import ItemBatch, denoising_loss
from loreun.pipelines.schedule import DDPMSchedule, prediction_type

from .conftest import erase_args


def _schedule(kind):
    betas = torch.linspace(1e-4, 2e-2, 1000)
    return DDPMSchedule(torch.cumprod(1 - betas, 0), kind)


def _batch(schedule, x0, t, noise):
    return ItemBatch(
        xt=schedule.add_noise(x0, t, noise),
        t=t,
        cond=torch.zeros(len(t), 3, 4),
        uncond=torch.zeros(len(t), 3, 4),
        anchor=None,
        target=schedule.target(x0, t, noise),
        ids=torch.arange(len(t)),
    )


def _perfect(schedule, x0, noise, kind):
    """A model that knows x_0 and the noise and answers in parametrisation ``kind``."""
    other = DDPMSchedule(schedule.alphas_cumprod, kind)
    return lambda x, t, emb: other.target(x0, t, noise)


def test_the_denoising_loss_of_a_v_model_is_zero_only_for_a_v_predictor():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    v = _schedule("v_prediction")
    batch = _batch(v, x0, t, noise)
    assert torch.allclose(
        denoising_loss(_perfect(v, x0, noise, "v_prediction"), batch)[0], torch.zeros(3)
    )
    assert (denoising_loss(_perfect(v, x0, noise, "epsilon"), batch)[0] > 1e-3).all()
    eps = _schedule("epsilon")
    batch = _batch(eps, x0, t, noise)
    assert torch.allclose(
        denoising_loss(_perfect(eps, x0, noise, "epsilon"), batch)[0], torch.zeros(3)
    )


def test_v_is_the_velocity_of_the_forward_process():
    """v = sqrt(abar) eps - sqrt(1 - abar) x_0, so x_0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
    s = _schedule("v_prediction")
    x0, noise, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([100, 800])
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0_back = a.sqrt() * s.add_noise(x0, t, noise) - (1 - a).sqrt() * s.target(x0, t, noise)
    assert torch.allclose(x0_back, x0, atol=1e-5)


def test_other_parametrisations_are_refused_by_name():
    assert prediction_type({"prediction_type": "v_prediction"}) == "v_prediction"
    assert prediction_type({}) == "epsilon"
    with pytest.raises(ValueError, match="model predicts 'sample'; loreun supports"):
        prediction_type({"prediction_type": "sample"})


@pytest.fixture(scope="module")
def v_pipeline_dir(tmp_path_factory):
    from loreun.pipelines.tiny import save_tiny_pipeline

    return save_tiny_pipeline(
        tmp_path_factory.mktemp("v") / "tiny-v", prediction_type="v_prediction"
    )


@pytest.mark.slow
def test_v_prediction_model_end_to_end(v_pipeline_dir, tmp_path):
    """erase (GA, whose target is the velocity here) -> export -> strict load -> generate ->
    audit, on a tiny v-prediction pipeline."""
    from loreun.pipelines import apply_erased_weights
    from loreun.pipelines.models import load_pipeline

    out = tmp_path / "erase"
    args = erase_args(v_pipeline_dir, out, "--objective", "ga", "--retain-concept", "a dog")
    assert main(args + ["--weighting", "loreun", "--save-pipeline"]) == 0
    with safe_open(str(out / "erased.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["loreun"])
    assert meta["prediction_type"] == "v_prediction"
    pipe = apply_erased_weights(load_pipeline(str(v_pipeline_dir)), out / "erased.safetensors")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    gen = tmp_path / "gen"
    cmd = ["generate", "--model", str(out / "pipeline"), "--prompts", "neutral", "--steps", "2"]
    assert main(cmd + ["--out", str(gen)]) == 0
    audit = ["audit", "--images", str(gen), "--detector", "digits", "--out", str(tmp_path / "a")]
    assert main(audit) == 0


def test_a_pipeline_of_another_family_is_refused_by_name(tiny_pipeline_dir, tmp_path, capsys):
    import shutil

    other = tmp_path / "pixart-like"
    shutil.copytree(tiny_pipeline_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "PixArtAlphaPipeline"})
    )
    assert main(erase_args(other, tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model_index.json names PixArtAlphaPipeline; loreun supports" in err
    assert "FluxPipeline" in err and "StableDiffusion3Pipeline" in err


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from loreun.pipelines.tiny import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.mark.slow
def test_sdxl_end_to_end(sdxl_dir, tmp_path):
    """A tiny SDXL from diffusers configs: erase -> --save-pipeline folder that plain
    StableDiffusionXLPipeline loads -> strict load of the erased file -> generate -> audit."""
    from diffusers import StableDiffusionXLPipeline

    from loreun.pipelines import apply_erased_weights
    from loreun.pipelines.models import load_pipeline

    out = tmp_path / "erase"
    args = erase_args(sdxl_dir, out, "--save-pipeline", "--weighting", "loreun")
    assert main(args + ["--retain-concept", "a dog", "--objective", "ga"]) == 0
    folder = StableDiffusionXLPipeline.from_pretrained(out / "pipeline")
    image = folder("a cat", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
    base = apply_erased_weights(load_pipeline(str(sdxl_dir)), out / "erased.safetensors")
    a, b = base.unet.state_dict(), folder.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    gen = tmp_path / "gen"
    cmd = ["generate", "--model", str(sdxl_dir), "--erased", str(out), "--prompts", "neutral"]
    assert main(cmd + ["--steps", "2", "--out", str(gen)]) == 0
    audit = ["audit", "--images", str(gen), "--detector", "digits", "--out", str(tmp_path / "a")]
    assert main(audit) == 0


def test_an_sdxl_lora_says_it_is_one_to_web_uis(sdxl_dir, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "lora"
    assert main(erase_args(sdxl_dir, out, "--lora-rank", "2", "-q")) == 0
    with safe_open(str(out / "lora-kohya.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


@pytest.mark.slow
@pytest.mark.parametrize("source", ["cached", "partial-train"])
def test_sdxl_esd_presets_train_cross_attention(sdxl_dir, tmp_path, source):
    from safetensors.torch import load_file

    out = tmp_path / "o"
    assert main(erase_args(sdxl_dir, out, "--method", "esd-x", "--xt-source", source)) == 0
    keys = load_file(str(out / "erased.safetensors")).keys()
    assert keys and all(".attn2." in k for k in keys)


def test_gradient_checkpointing_gives_the_same_weights(tiny_pipeline_dir, tmp_path):
    from safetensors.torch import load_file

    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    assert main(erase_args(tiny_pipeline_dir, plain, "--method", "esd-u")) == 0
    assert (
        main(erase_args(tiny_pipeline_dir, ckpt, "--method", "esd-u", "--gradient-checkpointing"))
        == 0
    )
    a = load_file(str(plain / "erased.safetensors"))
    b = load_file(str(ckpt / "erased.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
