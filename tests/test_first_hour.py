"""A new user's first hour: no silent or misleading waits, errors before torch, an offline hub
that fails fast, no warnings nobody can act on, help that shows defaults."""

import argparse
import io
import json
import os
import subprocess
import sys
import time

import pytest

from loreun.cli.main import builtin_model_threads, main

from .conftest import erase_args

NO_TORCH = """
import sys
from loreun.cli.main import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules, "torch was imported"
sys.exit(code)
"""


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "--model", "digits", "--prompts", "digits"], "--out"),
        (["erase", "--model", "digits", "--concept", "a 3"], "--out: required"),
        (["erase", "--model", "m", "--out", "o", "--steps", "0", "--concept", "x"], "--steps"),
        (["audit", "--images", "x"], "--out"),
    ],
)
def test_argument_errors_come_before_torch_is_imported(tmp_path, argv, needle):
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2 and needle in done.stderr, done.stderr[-2000:]


def test_an_unreachable_hub_fails_fast_and_says_so(tmp_path):
    """Without HF_HUB_OFFLINE a hub id used to retry for over a minute; the hub here is a port
    that refuses connections, so nothing leaves the machine."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    argv = ["generate", "--model", "someone/not-cached", "--prompts", "digits"]
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "loreun.cli", *argv, "--out", str(tmp_path / "g")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "not in the local Hugging Face cache" in line
    assert "the hub cannot be reached (http://127.0.0.1:9" in line
    assert time.perf_counter() - started < 60  # imports included; it was over 70 s of retries


def test_no_warning_a_user_cannot_act_on(tmp_path):
    """transformers' notice that its CLIP image processor falls back to PIL without torchvision
    came with every command; loreun uses that fallback, so it is shown only with -v."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten 3\n")
    argv = ["generate", "--model", "digits", "--prompts", str(prompts), "--steps", "2"]
    argv += ["--samples-per-prompt", "1", "--out", str(tmp_path / "g")]
    done = subprocess.run(
        [sys.executable, "-m", "loreun.cli", *argv], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torchvision" not in done.stderr


def test_the_built_in_model_runs_on_one_thread_by_default():
    """Two threads were 1.26x faster on an idle machine and three times slower on a busy one
    (docs/benchmarks.md), so one is the default for every command; other models keep torch's."""
    for command, batch in (("generate", 8), ("generate", 1), ("erase", 8), ("evaluate", 16)):
        args = argparse.Namespace(command=command, model="digits", batch_size=batch, threads=None)
        assert builtin_model_threads(args) == 1
    assert builtin_model_threads(argparse.Namespace(command="demo")) == 1
    other = argparse.Namespace(command="generate", model="./sd", batch_size=8, threads=None)
    assert builtin_model_threads(other) is None


def test_the_eta_is_not_taken_from_the_first_batch():
    from tqdm import tqdm

    from loreun.pipelines.runtime import restart_rate

    bar = tqdm(total=100, file=io.StringIO(), mininterval=0)
    time.sleep(1.0)  # the slow first batch: warm-up and first allocations
    bar.update(10)
    restart_rate(bar)
    for _ in range(5):
        time.sleep(0.02)
        bar.update(10)
    d = bar.format_dict
    eta = (d["total"] - d["n"]) * d["elapsed"] / (d["n"] - d["initial"])
    assert d["n"] == 60 and eta < 0.5  # the first batch's pace would say about 4 s


def test_sampling_the_forget_set_shows_a_bar(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOREUN_QUIET", raising=False)  # as a user runs it: not -q
    assert main(erase_args(tiny_pipeline_dir, tmp_path / "o")) == 0
    assert "sampling" in capsys.readouterr().err


def test_a_second_demo_points_to_its_own_flags(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "report.html").write_text("earlier")
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--overwrite" in err and "--resume" not in err


def test_help_shows_defaults_and_what_is_required(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "denoising steps (default: 25)" in text and "(default: None)" not in text
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "guidance for rows that give none (default: 7.5)" in " ".join(
        capsys.readouterr().out.split()
    )
    with pytest.raises(SystemExit):
        main(["erase", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: loreun erase --model MODEL --out OUT (")
    lora = out[out.index("LoRA (train low-rank adapters") :]
    assert (
        "--lora-rank" in lora
        and "--lora-rank" not in out[out.index("objective:") : out.index("LoRA (")]
    )


@pytest.mark.slow
def test_reports_say_what_was_erased_and_show_it(tmp_path, capsys):
    """The audit report names the erased concepts and how they were erased, keeps the erased
    classes' images in the grid (first, marked), blurs nothing on a digits page, and the
    console gives each erased class its own figure."""
    run = tmp_path / "erase"
    argv = ["erase", "--model", "digits", "--concept", "a handwritten 3", "--concept"]
    argv += ["a handwritten 7", "--steps", "3", "--out", str(run), "-q"]
    assert main(argv) == 0
    prompts = tmp_path / "p.csv"
    rows = [("a handwritten 1", 1), ("a handwritten 5", 5), ("a handwritten 3", 3)]
    rows += [("a handwritten 7", 7), ("a handwritten 0", 0)]
    prompts.write_text(
        "prompt,class,seed\n" + "".join(f"{p},{c},{i}\n" for i, (p, c) in enumerate(rows))
    )
    argv = ["evaluate", "--model", "digits", "--erased", str(run), "--prompts", str(prompts)]
    argv += ["--detector", "digits", "--erased-class", "3", "--erased-class", "7", "--steps", "5"]
    argv += ["--grid-limit", "2", "--out", str(tmp_path / "ev")]
    capsys.readouterr()
    assert main(argv) == 0
    console = capsys.readouterr().out
    assert "digits top1 class 3" in console and "digits top1 class 7" in console
    page = (tmp_path / "ev" / "report.html").read_text()
    assert "What was erased" in page
    assert "erased a handwritten 3, a handwritten 7 (esd-x, esd, uniform, 3 steps)" in page
    assert "no erased weights (the base model)" in page and "Erased classes: 3, 7" in page
    grid = page[page.index('id="grids"') :]
    assert grid.count('<figure class="erased">') == 4  # two per source: classes 3 and 7
    assert "erased: a handwritten 3" in grid and "erased: a handwritten 7" in grid
    assert "a handwritten 1" not in grid  # the two-image grid keeps the erased classes
    assert "blurred" not in page and "NudeNet" not in page[page.index("<h2>Images") :]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["sources"]["erased"]["erasure"]["concepts"] == [
        "a handwritten 3",
        "a handwritten 7",
    ]
    assert summary["sources"]["original"]["erasure"] is None


def test_a_single_file_without_config_says_why_it_needs_one(tmp_path):
    """Where the hub answers, diffusers fetches a single file's configs and --config is not
    needed; where it does not, the error says that the hub is the reason."""
    from loreun.pipelines.models import single_file_class

    ckpt = tmp_path / "model.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"conditioner.embedders.1.model.x": torch.zeros(1)}, str(ckpt))
    assert single_file_class(str(ckpt)).__name__ == "StableDiffusionXLPipeline"
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(ckpt))
    assert single_file_class(str(ckpt)).__name__ == "StableDiffusionPipeline"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    argv = ["generate", "--model", str(ckpt), "--prompts", "digits", "--out", str(tmp_path / "g")]
    done = subprocess.run(
        [sys.executable, "-m", "loreun.cli", *argv], capture_output=True, text=True, env=env
    )
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "cannot be reached (http://127.0.0.1:9" in line
    assert "pass --config" in line


def test_the_hub_probe_goes_through_a_proxy_when_one_is_set(monkeypatch):
    """Behind a proxy the direct connection fails while the hub works: the probe must try the
    proxy, or every hub id would be forced to the cache."""
    from huggingface_hub import constants

    from loreun.pipelines.models import hub_unreachable

    for var in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert hub_unreachable().startswith("http://127.0.0.1:9: ")  # the proxy, not hub.invalid
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_unreachable() is None  # offline: diffusers reads the cache by itself
