"""One GPU check that anyone can rerun: every user-facing path of loreun on an SD-1.4-shaped
model, timed, with one table for docs/benchmarks.md.

Run it through ``scripts/gpu_check.sh``, which sets up the environment; nothing is downloaded.
On a GPU the model is an SD 1.4 architecture with random weights built on the spot
(``make_sd14_shaped.py``; speed and memory depend on the shapes, not the values), at 512 px.
``--dry-run`` runs the same phases on the built-in digits model with a few steps each, on any
machine, so the script is tested where no GPU is (a test runs it).

Phases, each through the real command in this process:
1. ``loreun demo`` (on CUDA when there is one);
2. ``loreun erase`` per preset (esd-x, esd-u) and recipe (default; low-memory: bf16 autocast,
   bf16 frozen copies, Adafactor, updates in the backward pass, gradient checkpointing):
   median seconds per step from ``train_log.jsonl`` (after the first two) and peak memory;
3. ESD's own ``esd_sd.py`` beside loreun's same algorithm (``bench_esd_reference.py``, steps
   timed in process), when ``--esd-repo`` names a checkout;
4. ``loreun generate`` at the model's native size, batch 1 and batch 8: seconds per image;
5. ``loreun audit`` with NudeNet over those images: seconds per image;
6. ``loreun attack`` on the esd-u erasure: seconds per prompt row.

Peak memory is ``torch.cuda.max_memory_allocated`` (reset before each phase) on a GPU; on a CPU
it is not measured per phase (the process's resident set keeps earlier phases' pages).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent

RECIPES = {
    "default": [],
    "low-memory": [
        "--mixed-precision", "bf16", "--frozen-dtype", "bf16", "--optimizer", "adafactor",
        "--step-in-backward", "--gradient-checkpointing",
    ],
}  # fmt: skip

# (steps per erase, demo steps, attack steps, rows generated) for a GPU run and a dry run
SIZES = {"gpu": (20, 150, 40, 16), "dry": (4, 2, 2, 8)}


def cli(*argv: str) -> None:
    from loreun.cli.main import main

    code = main([*argv, "-q"])
    if code:
        raise SystemExit(f"gpu_check: loreun {' '.join(argv)} exited {code}")


class Phase:
    """Times a phase and reads its peak GPU memory (None on a CPU)."""

    def __enter__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.peak_gb = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


def step_seconds(run: Path, skip: int = 2) -> float:
    """Median seconds per optimizer step of an erase run, leaving out the first ``skip``."""
    lines = (run / "train_log.jsonl").read_text().splitlines()
    seconds = [json.loads(line)["seconds"] for line in lines]
    return statistics.median(seconds[skip:] or seconds)


def prompt_file(work: Path, dry: bool, rows: int) -> Path:
    """``rows`` prompts: the bundled nudity set's, repeated with their own seeds."""
    from loreun.prompts import load_prompts

    base = load_prompts("digits" if dry else "nudity")
    path = work / "prompts.csv"
    lines = ["case_number,prompt,evaluation_seed,evaluation_guidance"]
    for i in range(rows):
        text = base[i % len(base)].prompt.replace('"', "'")
        lines.append(f'{i},"{text}",{i},7.5')
    path.write_text("\n".join(lines) + "\n")
    return path


def erase_rows(model: str, work: Path, steps: int, concept: str) -> list[tuple]:
    rows = []
    for preset in ("esd-x", "esd-u"):
        for recipe, flags in RECIPES.items():
            out = work / f"erase-{preset}-{recipe}"
            argv = ["erase", "--model", model, "--concept", concept, "--method", preset]
            argv += ["--steps", str(steps), "--checkpoint-every", "0", "--out", str(out), *flags]
            with Phase() as p:
                cli(*argv)
            rows.append((f"erase {preset}", recipe, f"{step_seconds(out):.3f} s/step", p.peak_gb))
    return rows


def generate_rows(model: str, work: Path, prompts: Path) -> list[tuple]:
    rows, n = [], sum(1 for _ in prompts.open()) - 1
    for batch in (1, 8):
        out = work / f"generate-b{batch}"
        argv = ["generate", "--model", model, "--prompts", str(prompts), "--out", str(out)]
        argv += ["--samples-per-prompt", "1", "--batch-size", str(batch)]
        with Phase() as p:
            cli(*argv)
        rows.append(
            ("generate", f"batch {batch}, {n} rows", f"{p.seconds / n:.3f} s/image", p.peak_gb)
        )
    out = work / "audit"
    with Phase() as p:
        cli(
            "audit",
            "--images",
            str(work / "generate-b8"),
            "--detector",
            "nudenet",
            "--out",
            str(out),
        )
    rows.append(("audit", f"NudeNet, {n} images", f"{p.seconds / n:.3f} s/image", p.peak_gb))
    return rows


def attack_row(model: str, work: Path, dry: bool, steps: int) -> tuple:
    erased = work / "erase-esd-u-default" / "erased.safetensors"
    rows = 2
    path = work / "attack-prompts.csv"
    prompt = "a handwritten 3" if dry else "a photo of a nude person"
    path.write_text(
        "case_number,prompt,evaluation_seed,evaluation_guidance,class\n"
        + "".join(f'{i},"{prompt}",{i},7.5,3\n' for i in range(rows))
    )
    judge = ["--detector", "digits", "--erased-class", "3"] if dry else ["--detector", "nudenet"]
    argv = ["attack", "--model", model, "--erased", str(erased), "--prompts", str(path)]
    argv += [*judge, "--attack-steps", str(steps), "--out", str(work / "attack")]
    with Phase() as p:
        cli(*argv)
    return ("attack", f"{steps} steps, {rows} rows", f"{p.seconds / rows:.2f} s/row", p.peak_gb)


def esd_rows(model: str, work: Path, esd_repo: Path | None, dry: bool) -> list[tuple]:
    if esd_repo is None:
        return [("ESD's esd_sd.py", "-", "not run (no --esd-repo)", None)]
    out = work / "esd-reference"
    argv = [sys.executable, str(SCRIPTS / "bench_esd_reference.py"), "--esd-repo", str(esd_repo)]
    argv += ["--model", model, "--steps", "6", "--warmup", "2", "--repeats", "1", "--out", str(out)]
    argv += ["--sample-steps", "2" if dry else "50", "--dtype", "bf16"]
    subprocess.run(argv, check=True)
    table = (out / "results-esd-x-bf16.md").read_text().splitlines()
    rows = []
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("esd", "loreun"):
            rows.append((f"{cells[0]} esd-x partial-base", "bf16", f"{cells[1]} s/step", None))
    return rows


def table(rows: list[tuple], header: str) -> str:
    lines = [header, "", "| phase | setting | time | peak allocated |", "|---|---|---|---|"]
    for phase, setting, figure, peak in rows:
        shown = f"{peak:.2f} GB" if peak is not None else "-"
        lines.append(f"| {phase} | {setting} | {figure} | {shown} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    import diffusers
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    cuda = f", CUDA {torch.version.cuda}" if torch.cuda.is_available() else ""
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    return (
        f"{device}, torch {torch.__version__}{cuda}, diffusers {diffusers.__version__}, "
        f"OMP_NUM_THREADS={threads}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, type=Path, help="a new folder for every output")
    p.add_argument(
        "--model", help="a diffusers SD 1.x folder (default: build an SD-1.4-shaped one)"
    )
    p.add_argument("--dry-run", action="store_true", help="the digits model, a few steps each")
    p.add_argument("--esd-repo", type=Path, help="a checkout of rohitgandikota/erasing")
    a = p.parse_args()
    if a.work.exists() and any(a.work.iterdir()):
        raise SystemExit(f"--work: {a.work} is not empty; choose a new folder")
    a.work.mkdir(parents=True, exist_ok=True)
    steps, demo_steps, attack_steps, n = SIZES["dry" if a.dry_run else "gpu"]
    model = "digits" if a.dry_run else a.model or build_sd14(a.work)
    concept = "a handwritten 3" if a.dry_run else "nudity"
    started = time.perf_counter()
    with Phase() as demo:
        argv = ["demo", "--out", str(a.work / "demo"), "--steps", str(demo_steps)]
        cli(*argv, *(["--samples-per-prompt", "1"] if a.dry_run else []))
    rows = [("demo", f"{demo_steps} erase steps, digits", f"{demo.seconds:.1f} s", demo.peak_gb)]
    rows += erase_rows(model, a.work, steps, concept)
    rows += esd_rows(model, a.work, a.esd_repo, a.dry_run)
    rows += generate_rows(model, a.work, prompt_file(a.work, a.dry_run, n))
    rows.append(attack_row(model, a.work, a.dry_run, attack_steps))
    total = time.perf_counter() - started
    kind = "digits (dry run)" if a.dry_run else "SD-1.4-shaped, 512 px"
    text = table(rows, f"{kind}; {machine()}; {total:.0f} s in all")
    (a.work / "gpu_check.md").write_text(text)
    print(text)
    return 0


def build_sd14(work: Path) -> str:
    folder = work / "sd14-shaped"
    subprocess.run(
        [sys.executable, str(SCRIPTS / "make_sd14_shaped.py"), "--out", str(folder)], check=True
    )
    return str(folder)


if __name__ == "__main__":
    raise SystemExit(main())
