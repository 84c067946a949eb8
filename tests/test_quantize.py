"""LoRA erasure on a quantized frozen base (``--quantize-base``), through the real command on
tiny SD 1.x, SDXL, SD3 and FLUX pipelines and the built-in digits-flow: the adapters train on the
quantized denoiser, the exported LoRA serves the unquantized base, and a quantized base can
be audited with the adapters on it. optimum-quanto's qint4 is the backend that runs on a CPU."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from loreun.cli.main import main
from loreun.pipelines.files import LORA_FILE

from .conftest import erase_cli

FAMILIES = ("sd", "sdxl", "sd3", "flux")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from loreun.pipelines.tiny import (
        save_tiny_flow_pipeline,
        save_tiny_pipeline,
        save_tiny_sdxl_pipeline,
    )

    root = tmp_path_factory.mktemp("qbase")
    return {
        "sd": save_tiny_pipeline(root / "sd", seed=0),
        "sdxl": save_tiny_sdxl_pipeline(root / "sdxl"),
        "sd3": save_tiny_flow_pipeline(root / "sd3", "sd3"),
        "flux": save_tiny_flow_pipeline(root / "flux", "flux"),
    }


@pytest.fixture(scope="module")
def runs(bases, tmp_path_factory):
    """One qint4 LoRA erasure per family, with the run's printed lines."""
    import contextlib
    import io

    out = {}
    for kind, base in bases.items():
        run = tmp_path_factory.mktemp("qrun") / kind
        args = erase_cli(base, run, "--concept", "a cat", "--steps", "4", "--sample-steps", "3")
        args += ["--lr", "1e-2", "--lora-rank", "2", "--quantize-base", "qint4", "--method"]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            assert main(args + ["esd-x"]) == 0
        out[kind] = (run, printed.getvalue())
    return out


def _pipe(folder):
    """The unquantized base as diffusers loads it (SD3 saved without T5 passes it as None)."""
    from loreun.pipelines.models import load_pipeline

    pipe = load_pipeline(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe):
    g = torch.Generator().manual_seed(0)
    kw = dict(num_inference_steps=3, height=32, width=32, output_type="np", generator=g)
    return pipe("a cat", **kw).images[0]


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_lora_trained_on_a_quantized_base_serves_the_unquantized_one(kind, bases, runs):
    from loreun.pipelines import load_erased_pipeline

    run, printed = runs[kind]
    assert "(qint4," in printed and "on cpu, used once and cached" in printed  # what sits where
    pipe = _pipe(bases[kind])
    base = _image(pipe)
    pipe.load_lora_weights(str(run), weight_name=LORA_FILE)
    adapted = _image(pipe)
    assert np.abs(adapted - base).max() > 1e-3  # the adapters change the unquantized model
    # the merged file passes the fingerprint check of the unquantized base: its base tensors
    # are the checkpoint's own, not dequantized copies
    merged = _image(load_erased_pipeline(str(bases[kind]), run / "erased.safetensors"))
    # an adapter added at run time and the same update merged into the weight differ only by
    # float32 summation order; 1e-4 of the [0, 1] image is ten times test_lora's margin, for
    # the larger SDXL/SD3/FLUX denoisers
    np.testing.assert_allclose(adapted, merged, atol=1e-4)
    with safe_open(str(run / "erased.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["loreun"])
    assert meta["hyperparameters"]["quantize_base"] == "qint4"
    assert "qint4-quantized base" in (run / "README.md").read_text()


def test_the_merged_file_holds_the_base_tensors_plus_the_update(bases, runs):
    """Merged = checkpoint weight + B A exactly: no quantization error enters the export."""
    from safetensors.torch import load_file

    run, _ = runs["flux"]
    merged = load_file(str(run / "erased.safetensors"))
    base = load_file(str(bases["flux"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    lora = load_file(str(run / LORA_FILE))
    name = next(k for k in merged if k.endswith(".weight"))
    module = name.removesuffix(".weight")
    a, b = (lora[f"transformer.{module}.lora_{x}.weight"] for x in "AB")
    # one float32 matmul's rounding on weights of order 0.1 (a quantized base would be 1e-2 off)
    np.testing.assert_allclose(merged[name], base[name].float() + b @ a, atol=1e-6)


def test_a_quantized_base_is_audited_with_the_adapters_on_it(bases, runs):
    """Applying the erasure to a quantized base loads the run's LoRA file as adapters on the
    quantized denoiser: the erasure changes its images as it changes the unquantized model's."""
    from loreun.pipelines.loading import apply_erased, read_erased
    from loreun.pipelines.models import load_pipeline

    run, _ = runs["flux"]
    erased = read_erased(run / "erased.safetensors")

    def change(quantize):
        pipe = load_pipeline(str(bases["flux"]), quantize=quantize)
        pipe.set_progress_bar_config(disable=True)
        before = _image(pipe)
        apply_erased(pipe, erased, False, str(run / "erased.safetensors"))
        return _image(pipe) - before

    plain, quantized = change(None), change("qint4")
    # the adapters are on: the change is 5e-3 on both bases (measured), 50 times this floor
    assert np.abs(quantized).mean() > 1e-4
    corr = np.corrcoef(plain.ravel(), quantized.ravel())[0, 1]
    assert corr > 0.5, corr  # measured 0.98; unrelated changes would give about 0


def test_generate_records_the_quantized_base_it_sampled(bases, runs, tmp_path):
    run, _ = runs["flux"]
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,seed\na cat,1\n")
    args = ["generate", "--model", str(bases["flux"]), "--prompts", str(prompts), "--size", "32"]
    args += ["--erased", str(run), "--steps", "2", "--quantize-base", "qint4", "-q"]
    assert main(args + ["--out", str(tmp_path / "g")]) == 0
    config = json.loads((tmp_path / "g" / "generate_config.json").read_text())
    assert config["settings"]["quantize_base"] == "qint4"
    assert len(list((tmp_path / "g" / "images").glob("*.png"))) == 1


def test_a_full_tensor_erasure_cannot_be_applied_to_a_quantized_base(bases, tmp_path, capsys):
    run = tmp_path / "full"
    args = erase_cli(bases["sd"], run, "--concept", "a cat", "--steps", "1", "--sample-steps", "2")
    assert main(args) == 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    gen = ["generate", "--model", str(bases["sd"]), "--prompts", str(prompts), "--erased"]
    code = main(gen + [str(run), "--out", str(tmp_path / "g"), "--quantize-base", "qint4"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and f"no {LORA_FILE} sits beside" in err and "erased.safetensors" in err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--quantize-base", "qint4"], "--quantize-base: full tensors cannot train"),
        (["--lora-rank", "2", "--quantize-base", "nf4"], "loads on a CUDA GPU only"),
        (
            ["--lora-rank", "2", "--quantize-base", "qint4", "--train", "text-encoder"],
            "use --train denoiser",
        ),
        (["--lora-rank", "2", "--quantize-base", "q3"], "--quantize-base"),
    ],
)
def test_what_a_quantized_base_cannot_do_is_refused_by_name(bases, tmp_path, capsys, extra, needle):
    if "nf4" in extra and torch.cuda.is_available():
        extra = ["--quantize-base", "qint4"]  # on a GPU nf4 loads: check the LoRA refusal
        needle = "full tensors cannot train"
    args = erase_cli(bases["sd"], tmp_path / "r", "--concept", "a cat", *extra)
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own refusal of an unknown choice
        code = e.code
    assert code != 0 and needle in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_a_single_file_base_is_refused_with_its_name(tmp_path):
    from loreun.pipelines.models import load_pipeline

    single = tmp_path / "model.safetensors"
    single.write_bytes(b"not read")
    with pytest.raises(ValueError, match="--quantize-base: .*model.safetensors is a single file"):
        load_pipeline(str(single), quantize="qint4")


def test_base_tensors_are_read_from_a_sharded_checkpoint(tmp_path):
    """A large denoiser is saved in shards with an index: each tensor is read from its own."""
    from loreun.pipelines.quantize import original_tensors
    from loreun.pipelines.tiny import make_tiny_flux_pipeline

    model = make_tiny_flux_pipeline().transformer
    model.save_pretrained(tmp_path / "t", max_shard_size="20KB")
    assert (tmp_path / "t" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model.config._name_or_path = str(tmp_path / "t")
    names = ["transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.proj_out.weight"]
    got = original_tensors(model, names)
    state = model.state_dict()
    for n in names:
        torch.testing.assert_close(got[n], state[n].float())
    with pytest.raises(ValueError, match="has no tensor 'nope.weight'"):
        original_tensors(model, ["nope.weight"])


def test_digits_flow_erases_on_a_quantized_base_through_the_command(tmp_path):
    """The built-in flow model through ``loreun erase``; the merged file loads onto the
    unquantized built-in model (docs/results.md measures how well it erases)."""
    from loreun.pipelines import load_erased_pipeline

    run = tmp_path / "df"
    args = ["erase", "--model", "digits-flow", "--out", str(run), "--concept", "a digit 3"]
    args += ["--steps", "3", "--sample-steps", "4", "--lora-rank", "4", "--quantize-base", "qint4"]
    assert main(args + ["--checkpoint-every", "0", "-q"]) == 0
    load_erased_pipeline("digits-flow", run / "erased.safetensors")


@pytest.mark.parametrize("kind", ["sd", "flux"])
def test_the_large_model_recipe_runs_on_a_quantized_base(kind, bases, tmp_path):
    """--mixed-precision bf16 --gradient-checkpointing, as FLUX.1-dev on a 24 GB card runs:
    autocast reaches into quanto's forward but not its backward, which must still agree."""
    from loreun.pipelines import load_erased_pipeline

    run = tmp_path / "r"
    args = erase_cli(bases[kind], run, "--concept", "a cat", "--steps", "2", "--sample-steps", "2")
    args += ["--lora-rank", "2", "--quantize-base", "qint4", "--mixed-precision", "bf16"]
    assert main(args + ["--gradient-checkpointing", "-q"]) == 0
    load_erased_pipeline(str(bases[kind]), run / "erased.safetensors")


def test_the_attack_refuses_a_quantized_base(bases, tmp_path, capsys):
    """The attack copies full erased tensors into the denoiser: evaluate --attack refuses
    --quantize-base by name before any image is made; the attack command has no such flag."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    args = ["evaluate", "--model", str(bases["sd"]), "--prompts", str(prompts), "--attack"]
    code = main(args + ["--quantize-base", "qint4", "--out", str(tmp_path / "e")])
    assert (
        code != 0
        and "--quantize-base: the attack runs on the unquantized" in capsys.readouterr().err
    )
    assert not (tmp_path / "e").exists()
