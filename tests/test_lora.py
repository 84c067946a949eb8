"""LoRA erasure: trained through peft, loaded by diffusers' own LoRA API, exact at scale 0 and
after unloading, the same erasure as the merged erased file."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from loreun.cli.main import main
from loreun.erase.lora import KOHYA_FILE, LORA_FILE

from .conftest import erase_args


@pytest.fixture(scope="module")
def lora_run(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    args = erase_args(tiny_pipeline_dir, out, "--lora-rank", "2", "--lora-alpha", "4")
    assert main(args + ["--method", "esd-x", "--save-pipeline"]) == 0
    return out


def _pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe):
    g = torch.Generator().manual_seed(0)
    kw = dict(num_inference_steps=3, height=32, width=32, output_type="np", generator=g)
    return pipe("a cat", **kw).images[0]


def test_lora_loads_in_diffusers_and_unloads_to_the_base_bit_for_bit(lora_run, tiny_pipeline_dir):
    from loreun.pipelines import load_erased_pipeline

    pipe = _pipe(tiny_pipeline_dir)
    base = _image(pipe)
    pipe.load_lora_weights(str(lora_run), weight_name=LORA_FILE, adapter_name="erase")
    erased = _image(pipe)
    pipe.set_adapters(["erase"], adapter_weights=[0.0])
    assert np.array_equal(_image(pipe), base)  # scale 0 is the base model
    pipe.set_adapters(["erase"], adapter_weights=[1.0])
    pipe.unload_lora_weights()
    assert np.array_equal(_image(pipe), base)
    assert np.abs(erased - base).max() > 1e-3  # the erasure changes the image
    merged = _image(load_erased_pipeline(str(tiny_pipeline_dir), lora_run / "erased.safetensors"))
    np.testing.assert_allclose(erased, merged, atol=1e-5)  # alpha / rank = 2 is applied
    np.testing.assert_array_equal(_image(_pipe(lora_run / "pipeline")), merged)


def test_the_kohya_copy_is_the_same_adapter(lora_run, tiny_pipeline_dir):
    from safetensors import safe_open

    kohya = load_file(str(lora_run / KOHYA_FILE))
    assert all(k.startswith("lora_unet_") for k in kohya)
    with safe_open(str(lora_run / KOHYA_FILE), framework="pt") as f:
        meta = f.metadata()  # what kohya tools, AUTOMATIC1111 and ComfyUI managers read
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v1", "False")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "2")  # alpha folded in
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert downs and all(kohya[k.replace(".lora_down.weight", ".alpha")] == 2 for k in downs)
    pipe = _pipe(tiny_pipeline_dir)
    pipe.load_lora_weights(str(lora_run), weight_name=LORA_FILE)
    want = _image(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(lora_run), weight_name=KOHYA_FILE)
    np.testing.assert_allclose(_image(pipe), want, atol=1e-6)


def test_a_lora_run_writes_a_card_that_says_which_file_goes_where(lora_run, tiny_pipeline_dir):
    from loreun.erase.card import front_matter

    card = (lora_run / "README.md").read_text()
    front = front_matter(card)
    assert front["library_name"] == "diffusers" and "lora" in front["tags"]
    assert front["license"] == "other"  # the tiny base's README gives none
    assert f"ComfyUI (LoraLoader) and AUTOMATIC1111: `{KOHYA_FILE}`" in card
    assert f'weight_name="{LORA_FILE}"' in card and str(tiny_pipeline_dir) not in card


def test_lora_trains_only_adapters_on_the_preset_modules(lora_run, tiny_pipeline_dir):
    from loreun.pipelines.loading import read_erased_file

    merged, meta = read_erased_file(lora_run / "erased.safetensors")
    assert all(".attn2." in k for k in merged) and meta["hyperparameters"]["lora_rank"] == 2
    base = load_file(str(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(merged) == {k for k in base if ".attn2." in k}
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert changed and all(k.endswith(".weight") for k in changed)  # LoRA leaves biases alone
    adapters = load_file(str(lora_run / LORA_FILE))
    assert all(v.shape[0] == 2 or v.shape[1] == 2 for v in adapters.values())  # rank 2


def test_lora_resumes_exactly_and_works_with_saliency(tiny_pipeline_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--lora-rank", "2", "--checkpoint-every", "2", "--saliency", "0.5"]
    common += ["--objective", "ga", "--weighting", "loreun"]
    assert main(erase_args(tiny_pipeline_dir, straight, *common, "--steps", "4")) == 0
    assert main(erase_args(tiny_pipeline_dir, split, *common, "--steps", "2")) == 0
    assert (
        main(erase_args(tiny_pipeline_dir, split, *common, "--steps", "4", "--resume", "latest"))
        == 0
    )
    a, b = (load_file(str(d / LORA_FILE)) for d in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mask = load_file(str(straight / "saliency-mask.safetensors"))
    assert mask and all(".lora_" in k for k in mask)  # the mask is over the adapters
    saved = json.loads((straight / "erase_config.json").read_text())
    assert saved["lora_rank"] == 2 and saved["lora_alpha"] is None


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--lora-alpha", "4"], "--lora-alpha: only used with --lora-rank"),
        (["--lora-rank", "0"], "--lora-rank: must be >= 1"),
        (["--lora-rank", "4", "--frozen-dtype", "bf16"], "--frozen-dtype"),
    ],
)
def test_lora_settings_that_cannot_work(tiny_pipeline_dir, tmp_path, capsys, extra, needle):
    assert main(erase_args(tiny_pipeline_dir, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_adapters_start_at_the_base_with_the_given_rank_alpha_and_seed(tiny_pipeline_dir):
    from loreun.erase.lora import add_lora
    from loreun.erase.presets import select_parameters
    from loreun.pipelines import load_pipeline
    from loreun.pipelines.family import UNET_PRESETS

    unets = [load_pipeline(str(tiny_pipeline_dir)).unet for _ in range(3)]
    x, t, emb = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 16, 16)
    with torch.no_grad():
        base = unets[0](x, t, encoder_hidden_states=emb).sample
    presets = [select_parameters(u, "esd-x", UNET_PRESETS) for u in unets]
    trained = [add_lora(u, p, 2, 6.0, seed) for u, p, seed in zip(unets, presets, (0, 0, 1))]
    config = unets[0].peft_config["default"]
    assert (config.r, config.lora_alpha) == (2, 6.0)
    assert all(torch.equal(p, torch.zeros_like(p)) for k, p in trained[0].items() if "lora_B" in k)
    with torch.no_grad():
        assert torch.equal(unets[0](x, t, encoder_hidden_states=emb).sample, base)
    a = {k: p for k, p in trained[0].items() if "lora_A" in k}
    assert all(torch.equal(a[k], trained[1][k]) for k in a)  # the same seed draws the same A
    assert not all(torch.equal(a[k], trained[2][k]) for k in a)
    assert all(".attn2." in k for k in trained[0]) and all(p.requires_grad for p in a.values())
