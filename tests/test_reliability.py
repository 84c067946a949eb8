"""Nothing is lost and every failure explains itself: each case of docs/reliability.md, through
the real ``loreun`` entry point."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loreun.cli.main import main

from .conftest import assert_same_images, erase_args, external_prompts_dir

ROOT = Path(__file__).resolve().parents[1]


def _err(capsys):
    return capsys.readouterr().err.strip().splitlines()


def _one_line(capsys, code, needle):
    """Exit 2 with one error line (progress bars of model loading may come before it)."""
    err = _err(capsys)
    assert code == 2, err
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("loreun ") and ": error: " in err[-1] and needle in err[-1], err


def _finite_checkpoint(folder: Path) -> bool:
    tensors = load_file(str(folder / "trained.safetensors"))
    optim = torch.load(folder / "optimizer.pt", weights_only=True)
    states = [v for st in optim["state"].values() for v in st.values() if v.ndim > 0]
    return all(torch.isfinite(t).all() for t in [*tensors.values(), *states])


# 1. A finite loss can give a non-finite update: no checkpoint may hold it.
@pytest.mark.numerics
def test_divergence_keeps_only_finite_checkpoints_and_the_advice_works(
    tiny_pipeline_dir, tmp_path, capsys
):
    """Divergence by construction, on every CPU: at lr 1e36 with weight decay 0.01, AdamW's
    first step multiplies each weight by 1 - 1e34 and moves it by about 1e36 (still finite, so
    checkpoint-1 is good); the second multiplies weights of ~1e35 by 1e34 again, far past
    float32's 3.4e38. No rounding keeps that finite, as it could a merely large lr. (At 1e38
    the first step already overflows: AdamW divides lr by its bias correction, 0.1.)"""
    out = tmp_path / "o"
    args = erase_args(tiny_pipeline_dir, out, "--steps", "6", "--checkpoint-every", "1")
    assert main(args + ["--lr", "1e36", "--weight-decay", "0.01", "--seed", "1"]) == 1
    err = _err(capsys)[-1]
    assert ("became NaN or inf by step 2" in err or " at step 2;" in err) and "checkpoint-1" in err
    found = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert [p.name for p in found] == ["checkpoint-1"] and _finite_checkpoint(found[0])
    assert not (out / "erased.safetensors").exists()
    assert main(args + ["--lr", "1e-4", "--seed", "1", "--overwrite"]) == 0  # the advice


# 2. --overwrite removes loreun's files only, and restarts the log.
def test_overwrite_keeps_user_files_in_loreun_folders(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "o"
    args = erase_args(tiny_pipeline_dir, out, "--save-pipeline", "--checkpoint-every", "2")
    args += ["--steps", "4", "--checkpoints-total-limit", "1"]
    assert main(args) == 0
    (out / "pipeline" / "notes.txt").write_text("mine")
    (out / "checkpoints" / "checkpoint-4" / "notes.txt").write_text("mine too")
    assert main(args + ["--overwrite"]) == 0
    assert (out / "pipeline" / "notes.txt").read_text() == "mine"
    assert (out / "checkpoints" / "checkpoint-4" / "notes.txt").read_text() == "mine too"
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # a rotated checkpoint with a user's file loses loreun's files, not the user's
    (out / "checkpoints" / "checkpoint-4" / "notes.txt").write_text("kept")
    assert main(args + ["--steps", "6", "--resume", "latest"]) == 0
    old = out / "checkpoints" / "checkpoint-4"
    assert [p.name for p in old.iterdir()] == ["notes.txt"]


# 3. An unwritable --out is one line, before any work.
@pytest.mark.parametrize("command", ["erase", "generate", "audit", "evaluate"])
def test_unwritable_out_is_one_line(tiny_pipeline_dir, tmp_path, capsys, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "out"  # a folder inside a file: no one, root included, can create it
    argv = {
        "erase": erase_args(tiny_pipeline_dir, out),
        "generate": ["generate", "--model", str(tiny_pipeline_dir), "--prompts", "neutral"],
        "audit": ["audit", "--images", str(tmp_path), "--detector", "digits"],
        "evaluate": ["evaluate", "--model", str(tiny_pipeline_dir), "--prompts", "neutral"],
    }[command]
    started = time.perf_counter()
    code = main(argv + ([] if command == "erase" else ["--out", str(out)]))
    _one_line(capsys, code, f"{out}")
    assert time.perf_counter() - started < 60  # failed before the work, not after


# 4. YAML numbers that YAML 1.1 reads as strings, and typos.
def test_yaml_numbers_are_read_as_numbers(tiny_pipeline_dir, tmp_path, capsys):
    cfg = tmp_path / "erase.yaml"
    cfg.write_text(f"model: {tiny_pipeline_dir}\nconcepts: [a cat]\nlr: 1e-4\nsteps: 2\n")
    out = tmp_path / "o"
    assert main(["erase", "--config-file", str(cfg), "--out", str(out), "--sample-steps", "2"]) == 0
    assert json.loads((out / "erase_config.json").read_text())["lr"] == 1e-4
    cfg.write_text(f"model: {tiny_pipeline_dir}\nconcepts: [a cat]\nsteps: abc\n")
    code = main(["erase", "--config-file", str(cfg), "--out", str(tmp_path / "p")])
    _one_line(capsys, code, f"--config-file: {cfg}: steps: expected int, got 'abc'")


# 5. A wrong --erased leaves no claim behind, and evaluate checks it before generating.
def test_wrong_erased_file_does_not_claim_the_output(
    tiny_pipeline_dir, other_pipeline_dir, tmp_path, capsys
):
    good, bad = tmp_path / "good", tmp_path / "bad"
    assert main(erase_args(tiny_pipeline_dir, good, "--method", "esd-x")) == 0
    assert main(erase_args(tiny_pipeline_dir, bad, "--method", "esd-u")) == 0
    _err(capsys)
    gen = ["generate", "--model", str(other_pipeline_dir), "--prompts", "neutral", "--steps", "2"]
    gen += ["--out", str(tmp_path / "gen")]
    code = main(gen + ["--erased", str(good / "erased.safetensors")])
    _one_line(capsys, code, "different base model")
    assert not (tmp_path / "gen" / "generate_config.json").exists()
    gen[2] = str(tiny_pipeline_dir)
    assert main(gen + ["--erased", str(good)]) == 0  # the folder names its erased file
    ev = ["evaluate", "--model", str(other_pipeline_dir), "--prompts", "neutral"]
    ev += ["--detector", "digits", "--steps", "2", "--out", str(tmp_path / "ev")]
    code = main(ev + ["--erased", str(bad / "erased.safetensors")])
    _one_line(capsys, code, "different base model")
    assert not (tmp_path / "ev" / "original").exists()


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from loreun.pipelines.files import FolderLock; "
        f"lock = FolderLock({str(folder)!r}).acquire(); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# 6. One run per folder.
@pytest.mark.parametrize("command", ["erase", "generate"])
def test_a_second_run_into_a_locked_folder_is_refused(tiny_pipeline_dir, tmp_path, capsys, command):
    out = tmp_path / "o"
    holder = _hold_lock(out)
    try:
        argv = {
            "erase": erase_args(tiny_pipeline_dir, out),
            "generate": ["generate", "--model", str(tiny_pipeline_dir), "--prompts", "neutral"]
            + ["--steps", "2", "--out", str(out)],
        }[command]
        _one_line(capsys, main(argv), "is in use by another loreun run (pid")
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0  # the lock died with its process


# 7. The settings are the run's identity.
def test_resume_refuses_changed_settings(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "o"
    args = erase_args(tiny_pipeline_dir, out, "--checkpoint-every", "1")
    assert main(args) == 0
    changed = ["--concept", "a bird", "--lr", "1e-2", "--seed", "7", "--resume", "latest"]
    code = main(args + ["--steps", "5"] + changed)
    _one_line(capsys, code, "--concept, --lr, --seed differ")
    assert main(args + ["--steps", "5", "--resume", "latest"]) == 0  # more steps is fine


# 8. Audit: a one-image grid, and manifests that point outside their folder.
def test_audit_grid_of_one_and_paths_outside_the_folder(tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "gen"
    (src / "images").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 80, 0, 0)).save(src / "images" / f"{i}.png")
    records = [{"path": f"images/{i}.png", "key": f"{i}:0", "prompt": "=cmd|' /C calc'!A0"}]
    records = [dict(r, path=f"images/{i}.png") for i, r in enumerate(records * 3)]
    (src / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    audit = ["audit", "--images", str(src), "--detector", "digits", "--grid-limit", "1"]
    assert main(audit + ["--out", str(tmp_path / "a")]) == 0
    csv_text = (tmp_path / "a" / "results.csv").read_text()
    assert "'=cmd|' /C calc'!A0" in csv_text  # no spreadsheet formula
    records[1]["path"] = "../../etc/passwd"
    (src / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code = main(audit + ["--out", str(tmp_path / "b")])
    _one_line(capsys, code, "record 2: image path '../../etc/passwd' is outside")


# 8. Prompt files: huge sizes, sizes the model cannot make, bytes that are not UTF-8.
def test_prompt_file_sizes_and_encodings(tiny_pipeline_dir, tmp_path, capsys):
    big = tmp_path / "big.csv"
    big.write_text("prompt,width,height\na cat,80000,80000\n")
    gen = ["generate", "--model", str(tiny_pipeline_dir), "--steps", "2"]
    code = main(gen + ["--prompts", str(big), "--out", str(tmp_path / "g1")])
    _one_line(capsys, code, f"{big}: row 1: width 80000 is over 4096")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("prompt\ncaf\xe9 au lait\n".encode("latin-1"))
    code = main(gen + ["--prompts", str(latin), "--out", str(tmp_path / "g2")])
    _one_line(capsys, code, f"{latin}: not UTF-8 text")
    i2p = external_prompts_dir() / "unlearndiffatk_nudity_142.csv"
    rows = i2p.read_text(encoding="utf-8").splitlines()
    few = tmp_path / "i2p-3.csv"  # three real I2P rows, 512 px each
    few.write_text("\n".join(rows[:4]) + "\n", encoding="utf-8")
    out = tmp_path / "g3"
    code = main(gen + ["--prompts", str(few), "--size", "32", "--force-size", "--out", str(out)])
    assert code == 0
    recs = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and {(r["width"], r["height"]) for r in recs} == {(32, 32)}
    code = main(gen + ["--prompts", str(few), "--force-size", "--out", str(tmp_path / "g4")])
    _one_line(capsys, code, "--force-size: needs --size")


def _cli(argv: list[str]) -> int:
    """Run ``loreun`` in a fresh process; its exit code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "loreun.cli", *argv]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, timeout=300).returncode


def _run_and_kill(argv: list[str], marker: Path, timeout: float = 120) -> None:
    """Start ``loreun`` in a subprocess and kill -9 it once ``marker`` exists."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "loreun.cli", *argv], env=env, cwd=ROOT)
    deadline = time.monotonic() + timeout
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# kill -9 mid-erase, then resume: the same weights as an uninterrupted run, no stale folders,
# no repeated log lines.
@pytest.mark.slow
def test_kill_9_mid_erase_resumes_to_the_same_weights(tiny_pipeline_dir, tmp_path):
    # Every part runs in a fresh process with one thread, as a user's would: the test process's
    # own state (threads, library flags set by other tests) must not enter the comparison.
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = ["--steps", "40", "--checkpoint-every", "5", "--threads", "1"]
    assert _cli(erase_args(tiny_pipeline_dir, straight, *common)) == 0
    _run_and_kill(erase_args(tiny_pipeline_dir, killed, *common), killed / "checkpoints")
    (killed / "checkpoints" / ".checkpoint-99.tmp-12345").mkdir(parents=True, exist_ok=True)
    args = erase_args(tiny_pipeline_dir, killed, *common, "--resume", "latest")
    if not list((killed / "checkpoints").glob("checkpoint-*")):
        args = erase_args(tiny_pipeline_dir, killed, *common, "--overwrite")
    assert _cli(args) == 0
    a = load_file(str(straight / "erased.safetensors"))
    b = load_file(str(killed / "erased.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((killed / "checkpoints").glob(".checkpoint-*"))
    steps = [json.loads(x)["step"] for x in (killed / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))


@pytest.mark.slow
def test_kill_9_mid_generate_resumes_to_the_same_images(tiny_pipeline_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(24)))
    gen = ["generate", "--model", str(tiny_pipeline_dir), "--prompts", str(prompts)]
    gen += ["--steps", "4", "--batch-size", "2", "--threads", "1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _cli(gen + ["--out", str(straight)]) == 0  # fresh processes, as for erase above
    _run_and_kill(gen + ["--out", str(killed)], killed / "images" / "000004-0.png")
    assert _cli(gen + ["--out", str(killed)]) == 0
    assert_same_images(straight, killed)
    recs = (killed / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in recs] == list(range(24))


def test_checkpoints_without_optimizer_state_are_small_and_resume(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "o"
    args = erase_args(tiny_pipeline_dir, out, "--method", "esd-u", "--checkpoint-every", "2")
    assert main(args + ["--steps", "2", "--checkpoint-without-optimizer"]) == 0
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert not (ckpt / "optimizer.pt").exists() and (ckpt / "trained.safetensors").is_file()
    assert main(args + ["--steps", "4", "--resume", "latest"]) == 0  # the optimizer restarts
    assert (out / "checkpoints" / "checkpoint-4" / "optimizer.pt").is_file()
