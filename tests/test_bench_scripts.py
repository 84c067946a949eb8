"""The benchmark scripts behind docs/benchmarks.md still run against the library they measure.

They import loreun's pieces directly, so a changed signature breaks them without breaking any
other test; each runs one step on the tiny UNet here, in this process.
"""

import argparse
import importlib
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # they import each other as plain modules
    yield lambda name: importlib.import_module(name)
    names = (
        "bench_memory",
        "bench_erase",
        "preset_sizes",
        "bench_esd_reference",
        "bench_flux_memory",
    )
    for name in (*names, "bench_time_to_erase", "bench_attack"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("recipe", ["default", "low-memory"])
def test_memory_bench_steps_each_recipe(scripts, recipe):
    bench = scripts("bench_memory")
    args = argparse.Namespace(device="cpu", arch="tiny", resolution=64)
    res = bench.worker("esd-u", recipe, args)
    assert res["peak_gb"] > 0.1 and res["step_s"] > 0


@pytest.mark.parametrize("variant", ["naive", "loreun"])
def test_erase_step_bench_runs(scripts, variant):
    res = scripts("bench_erase").worker("tiny", "esd-x", variant, 1)
    assert res["trained_params"] == 4160 and res["step_s"] > 0


@pytest.mark.parametrize("recipe", ["lora-r8-esd-x", "full-esd-x-strict"])
def test_flux_memory_bench_steps_each_recipe_on_the_tiny_flux(scripts, recipe):
    res = scripts("bench_flux_memory").worker(recipe, "tiny", 32, 2)
    assert res["trained_params"] > 0 and res["step_s_median"] > 0


def test_preset_table_has_the_mmdit_rows(scripts):
    text = scripts("preset_sizes").transformer_table()
    assert "| FLUX.1-dev | 11.90 B | esd-x |" in text and "| SD3.5-large | 8.06 B |" in text


def test_preset_table_has_the_low_memory_columns(scripts):
    sizes = scripts("preset_sizes")
    import torch
    from diffusers import UNet2DConditionModel

    from loreun.erase.presets import select_parameters
    from loreun.pipelines.family import UNET_PRESETS

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sizes.ARCHITECTURES["SD 1.x"])
    trained = select_parameters(unet, "esd-u", UNET_PRESETS)
    total = sum(p.numel() for p in unet.parameters())
    memory, checkpoint = sizes.low_memory_bytes(total, trained)
    # the recipe's goal: esd-u on SD 1.4 under 6 GB, before activations and the process itself
    assert 5.0e9 < memory < 5.5e9 and 3.2e9 < checkpoint < 3.4e9


def test_esd_reference_adapts_only_the_model_size_and_dtype(scripts, tmp_path):
    """The edits are checked, so an upstream change fails loudly instead of measuring
    something else; here on a stand-in file with the three lines the edits look for."""
    bench = scripts("bench_esd_reference")
    repo = tmp_path / "esd"
    repo.mkdir()
    (repo / "esd_sd.py").write_text(
        'BASE = "CompVis/stable-diffusion-v1-4"\nheight=width=1024\n'
        "torch_dtype = torch.bfloat16\nrest = 1\n"
    )
    out = bench.adapted_esd(repo, "/models/x", 64, "float32", tmp_path)
    assert out.read_text() == (
        'BASE = "/models/x"\nheight=width=64\ntorch_dtype = torch.float32\nrest = 1\n'
    )
    (repo / "esd_sd.py").write_text("height=width=512\n")
    with pytest.raises(SystemExit, match="has no '\"CompVis/stable-diffusion-v1-4\"'"):
        bench.adapted_esd(repo, "/models/x", 64, "float32", tmp_path)
    args = bench.loreun_args(3, "esd-x", "a cat", "/m", 64, "bfloat16", tmp_path / "o", 7)
    assert args[args.index("--xt-source") + 1] == "partial-base" and "--frozen-dtype" in args
    assert args[args.index("--sample-steps") + 1] == "7"
    esd = bench.esd_args(3, "esd-x", "a cat", "cpu", tmp_path / "s", 7)
    assert esd[esd.index("--num_inference_steps") + 1] == "7"


def test_esd_reference_times_steps_inside_the_process(scripts, tmp_path):
    """Step time comes from timestamps after each optimizer step of one process, not from the
    difference of two processes' wall times (which loading variance swamps on a GPU)."""
    bench = scripts("bench_esd_reference")
    assert bench.step_seconds([0.0, 5.0, 6.0, 6.5, 7.5, 8.0], warmup=1) == 0.75
    with pytest.raises(SystemExit, match="leave no gap"):
        bench.step_seconds([0.0, 1.0], warmup=2)
    args = bench.loreun_args(4, "esd-x", "a handwritten 3", "digits", 16, "float32", tmp_path, 2)
    result = bench.run("loreun", "", args, tmp_path)
    assert len(result["step_times"]) == 4
    assert 0 < bench.step_seconds(result["step_times"], 1) < result["wall"]


def test_time_to_erase_table_times_the_first_budget_on_target(scripts, tmp_path):
    bench = scripts("bench_time_to_erase")

    def run(source, seconds, forgets, retains):
        trace = [
            {"steps": 25 * (i + 1), "seconds": s, "forget": f, "retain": r}
            for i, (s, f, r) in enumerate(zip(seconds, forgets, retains))
        ]
        hit = next((t for t in trace if t["forget"] <= 0.05 and t["retain"] >= 0.95), None)
        return {
            "method": "esd-x", "source": source, "seed": 0, "setup": 1.0, "trace": trace,
            "reached": hit is not None, "seconds": hit and hit["seconds"],
            "steps": hit and hit["steps"], "step_seconds": 0.1,
        }  # fmt: skip

    rows = [
        run("partial-base", [10, 20, 40], [0.5, 0.2, 0.0], [1, 1, 1]),
        run("cached", [2, 4, 6], [0.3, 0.0, 0.0], [1, 0.9, 0.96]),
    ]
    bench.write_table(tmp_path, rows, 0.05)
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[2].split("|")[3:9] == [" 1/1 ", " 40.0 ", " 1.00x ", " 40.0 ", " 1.00x ", " 1.00 "]
    assert table[3].split("|")[3:9] == [" 1/1 ", " 6.0 ", " 0.15x ", " 4.0 ", " 0.10x ", " 0.90 "]


@pytest.mark.slow
def test_gpu_check_dry_run_prints_every_phase(tmp_path):
    """The GPU check's CPU dry run, through its shell entry: every phase runs on the digits
    model and lands in one table."""
    import os
    import subprocess

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    script = SCRIPTS / "gpu_check.sh"
    done = subprocess.run(
        ["bash", str(script), str(tmp_path / "w"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "w" / "gpu_check.md").read_text()
    for phase in ("| demo |", "| erase esd-x | default |", "| erase esd-u | low-memory |"):
        assert phase in table
    for phase in ("| generate | batch 1,", "| generate | batch 8,", "| audit |", "| attack |"):
        assert phase in table
    assert "s/step" in table and "s/image" in table and "s/row" in table
    assert table.startswith("digits (dry run); CPU, torch ")


def test_preset_table_counts_the_text_encoders_each_family_trains(scripts):
    text = scripts("preset_sizes").text_encoder_table()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    assert set(rows) == {"SD 1.x", "SD 2.x", "SDXL, SD3", "FLUX.1 (CLIP only; T5 stays)"}
    assert "| 86 M |" in rows["SD 1.x"] and "| 717 M |" in rows["SDXL, SD3"]


def test_flux_memory_bench_steps_a_lora_on_a_quantized_base(scripts, tmp_path):
    """The quantized rows' worker: the base loaded through diffusers' quanto config, LoRA on it."""
    from loreun.pipelines.tiny import make_tiny_flux_pipeline

    make_tiny_flux_pipeline().transformer.save_pretrained(tmp_path / "t")
    bench = scripts("bench_flux_memory")
    res = bench.worker("lora-r8-esd-x", "tiny", 32, 2, "qint4", str(tmp_path / "t"))
    assert res["base"] == "qint4" and res["trained_params"] > 0 and res["peak_GB"] > 0.1


def test_preset_table_has_quantized_rows_with_their_bf16_baseline(scripts):
    text = scripts("preset_sizes").quantized_table()
    rows = {tuple(c.strip() for c in r.split("|")[1:5]): r for r in text.splitlines()[2:]}
    for model in ("FLUX.1-dev", "FLUX.1-schnell", "SD3.5-large", "SD3.5-medium", "SDXL"):
        for base in ("bf16", "nf4", "qint4", "int8"):
            assert any(k[0] == model and k[3] == base for k in rows), (model, base)
    flux_nf4 = next(r for k, r in rows.items() if k[0] == "FLUX.1-dev" and k[3] == "nf4")
    r16 = float(flux_nf4.split("|")[-2])
    assert 5.5 < r16 <= 8.0  # FLUX.1-dev's LoRA r16 esd-x on a 4-bit base, before activations
