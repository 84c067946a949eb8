"""Flow-matching families (SD3, FLUX.1): the flow schedule's math, and tiny SD3 and FLUX
pipelines built from configs through erase (full tensors and LoRA) -> export -> strict load ->
generate -> audit, with plain diffusers loading each result."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loreun.cli.main import main
from loreun.erase.objectives import denoising_loss
from loreun.pipelines.schedule import DDPMSchedule, FlowSchedule

from .test_model_families import _batch

FAMILIES = ("sd3", "flux")
SIZE = ("--resolution", "32")


def _flow(shift: float = 3.0) -> FlowSchedule:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=shift))


def test_a_perfect_velocity_predictor_has_zero_loss_and_a_perfect_noise_predictor_does_not():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    flow = _flow()
    t = flow.draw_times(3, g)
    batch = _batch(flow, x0, t, noise)
    velocity = denoising_loss(lambda x, t, c: noise - x0, batch)[0]
    assert torch.allclose(velocity, torch.zeros(3), atol=1e-6)
    assert (denoising_loss(lambda x, t, c: noise, batch)[0] > 1e-2).all()
    betas = torch.linspace(1e-4, 2e-2, 1000)
    ddpm = DDPMSchedule(torch.cumprod(1 - betas, 0), "epsilon")
    ti = torch.tensor([10, 500, 990])
    eps_batch = _batch(ddpm, x0, ti, noise)
    assert torch.allclose(denoising_loss(lambda x, t, c: noise, eps_batch)[0], torch.zeros(3))
    assert (denoising_loss(lambda x, t, c: noise - x0, eps_batch)[0] > 1e-2).all()


def test_flow_noising_runs_from_the_image_to_the_noise_and_back():
    flow = _flow()
    x0, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    t = torch.tensor([0.0, 1000.0])
    xt = flow.add_noise(x0, t, noise)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[1], noise[1])
    t = torch.tensor([250.0, 800.0])
    sigma = (t / 1000).view(-1, 1, 1, 1)
    back = flow.add_noise(x0, t, noise) - sigma * flow.target(x0, t, noise)
    assert torch.allclose(back, x0, atol=1e-6)


def test_training_times_follow_the_shifted_table_and_buckets_split_sigma():
    flow, plain = _flow(3.0), _flow(1.0)
    g = torch.Generator().manual_seed(0)
    shifted, unshifted = flow.draw_times(4000, g), plain.draw_times(4000, g)
    assert 0 < shifted.min() and shifted.max() <= 1000
    assert shifted.median() > unshifted.median() + 100  # shift 3 moves training to more noise
    assert abs(float(unshifted.median()) - 500) < 40  # logit-normal: centred at sigma 0.5
    assert flow.bucket(torch.tensor([0.0, 99.9, 100.0, 999.0, 1000.0]), 10).tolist() == [
        0, 0, 1, 9, 9,
    ]  # fmt: skip
    assert len(flow.probe_times(10)) == 10


def test_the_euler_sampler_follows_a_straight_flow_to_its_end():
    """For v = (x - x0) / sigma the path is a straight line, which Euler integrates exactly."""
    flow = _flow()
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    target = torch.cat([x0, x0])

    def predict(x, t, cond):
        return (x - target) / (t / 1000).view(-1, 1, 1, 1)

    sampler = flow.sampler(6)
    cond = torch.zeros(2, 3, 4)
    out = sampler.sample(predict, cond, cond, noise, 4.0)
    assert torch.allclose(out, x0, atol=1e-4)
    path = sampler.trajectory(predict, cond, cond, noise, 4.0)
    assert path.shape == (2, 6, 4, 4, 4)
    assert torch.allclose(path[:, 2], sampler.sample(predict, cond, cond, noise, 4.0, stop=2))


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory):
    from loreun.pipelines.tiny import save_tiny_flow_pipeline

    root = tmp_path_factory.mktemp("flow")
    return {kind: save_tiny_flow_pipeline(root / kind, kind) for kind in FAMILIES}


def _erase(model, out, *extra) -> list[str]:
    return [
        "erase", "--model", str(model), "--out", str(out), "--concept", "a cat", "--steps", "3",
        "--sample-steps", "3", "--lr", "1e-3", *SIZE, "-q", *map(str, extra),
    ]  # fmt: skip


def _pipeline_class(kind):
    import diffusers

    return getattr(diffusers, "FluxPipeline" if kind == "flux" else "StableDiffusion3Pipeline")


def _absent(kind) -> dict:
    return {} if kind == "flux" else {"text_encoder_3": None, "tokenizer_3": None}


@pytest.mark.slow
@pytest.mark.parametrize("kind", FAMILIES)
def test_full_erasure_end_to_end(kind, flow_dirs, tmp_path):
    from loreun.pipelines import apply_erased_weights
    from loreun.pipelines.models import load_pipeline

    out = tmp_path / "erase"
    args = _erase(flow_dirs[kind], out, "--weighting", "loreun", "--save-pipeline")
    assert main(args + ["--objective", "ga", "--retain-concept", "a dog"]) == 0
    with safe_open(str(out / "erased.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["loreun"])
    assert meta["family"] == _pipeline_class(kind).__name__
    assert meta["prediction_type"] == "flow"
    folder = _pipeline_class(kind).from_pretrained(out / "pipeline", **_absent(kind))
    image = folder("a cat", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
    base = apply_erased_weights(load_pipeline(str(flow_dirs[kind])), out / "erased.safetensors")
    a, b = base.transformer.state_dict(), folder.transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    gen, audit = tmp_path / "gen", tmp_path / "audit"
    cmd = ["generate", "--model", str(flow_dirs[kind]), "--erased", str(out), "--steps", "2"]
    assert main(cmd + ["--prompts", "neutral", "--size", "32", "--out", str(gen)]) == 0
    record = json.loads((gen / "manifest.jsonl").read_text().splitlines()[0])
    assert record["guidance_kind"].startswith("embedded" if kind == "flux" else "classifier")
    assert main(["audit", "--images", str(gen), "--detector", "digits", "--out", str(audit)]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", FAMILIES)
def test_lora_erasure_loads_in_plain_diffusers(kind, flow_dirs, tmp_path):
    out = tmp_path / "lora"
    assert main(_erase(flow_dirs[kind], out, "--lora-rank", "2", "--method", "esd-x")) == 0
    assert not (out / "lora-kohya.safetensors").exists()  # ComfyUI reads diffusers' keys here
    assert "`pytorch_lora_weights.safetensors` itself" in (out / "README.md").read_text()
    pipe = _pipeline_class(kind).from_pretrained(flow_dirs[kind], **_absent(kind))
    pipe.load_lora_weights(out)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    merged = load_file(str(out / "erased.safetensors"))
    state = pipe.transformer.state_dict()
    assert merged and all(torch.allclose(state[k], v, atol=1e-6) for k, v in merged.items())
    assert all(k.split(".attn.")[1].split(".")[0] in TEXT_STREAM for k in merged)


TEXT_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def test_mmdit_presets_name_the_text_stream_as_the_cross_attention_analogue():
    from loreun.erase.presets import select_parameters
    from loreun.pipelines.family import MMDIT_PRESETS
    from loreun.pipelines.tiny import make_tiny_flux_pipeline

    transformer = make_tiny_flux_pipeline().transformer
    x = select_parameters(transformer, "esd-x", MMDIT_PRESETS)
    strict = select_parameters(transformer, "esd-x-strict", MMDIT_PRESETS)
    u = select_parameters(transformer, "esd-u", MMDIT_PRESETS)
    every = select_parameters(transformer, "esd-all", MMDIT_PRESETS)
    assert {k.split(".attn.")[1].split(".")[0] for k in x} == set(TEXT_STREAM)
    assert set(strict) < set(x) and all("add_k_proj" in k or "add_v_proj" in k for k in strict)
    assert not set(x) & set(u) and set(x) | set(u) == set(every)
    assert any("single_transformer_blocks" in k for k in u)


def test_what_flow_families_do_not_support_is_refused_by_name(flow_dirs, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(_erase(flow_dirs["flux"], out)) == 0
    export = ["export", str(out), "--single-file", str(tmp_path / "one.safetensors")]
    assert main(export) == 2
    assert "--single-file: FluxPipeline has no web-UI single-file layout" in capsys.readouterr().err
    gen = ["generate", "--model", str(flow_dirs["flux"]), "--prompts", "neutral", "--steps", "2"]
    assert main(gen + ["--scheduler", "ddim", "--out", str(tmp_path / "g")]) == 2
    assert "--scheduler: ddim is a DDPM sampler; FluxPipeline" in capsys.readouterr().err


def test_a_schnell_shaped_model_without_guidance_embedding_erases(tmp_path):
    from loreun.pipelines.tiny import save_tiny_flow_pipeline

    model = save_tiny_flow_pipeline(tmp_path / "schnell", "flux-schnell")
    out = tmp_path / "o"
    assert main(_erase(model, out, "--xt-source", "partial-train")) == 0
    assert load_file(str(out / "erased.safetensors"))


def test_flux_predict_matches_the_pipelines_own_packing_and_ids():
    """FluxFamily.predict packs, ids and unpacks as FluxPipeline does around its transformer."""
    from diffusers import FluxPipeline

    from loreun.pipelines.family import FLUX_TRAIN_GUIDANCE, Cond, family_of
    from loreun.pipelines.tiny import make_tiny_flux_pipeline

    pipe = make_tiny_flux_pipeline()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700.0, 250.0])
    cond = Cond(torch.randn(2, 5, 32, generator=g), torch.randn(2, 16, generator=g))
    with torch.no_grad():
        ours = family_of(pipe).predict(pipe.transformer, x, t, cond)
        packed = FluxPipeline._pack_latents(x, 2, 4, 8, 8)
        ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, x.device, x.dtype)
        out = pipe.transformer(
            packed, timestep=t / 1000, guidance=torch.full((2,), FLUX_TRAIN_GUIDANCE),
            pooled_projections=cond.pooled, encoder_hidden_states=cond.emb,
            txt_ids=torch.zeros(5, 3), img_ids=ids,
        ).sample  # fmt: skip
        theirs = FluxPipeline._unpack_latents(out, 32, 32, pipe.vae_scale_factor)
    assert torch.allclose(ours, theirs, atol=1e-6)
