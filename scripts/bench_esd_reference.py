"""loreun's ESD step against ESD's own training script, side by side on one model.

ESD's script (``esd_sd.py`` of rohitgandikota/erasing) is read from a local checkout given by
``--esd-repo`` and run from a temporary copy adapted in four places only: the model path, the
image size, the dtype and the device (its ``--device`` flag). Nothing of it is copied into
loreun. Both sides run the same algorithm and settings: partial DDIM sampling with the frozen
base (loreun's ``--xt-source partial-base``), 50 DDIM steps, guidance 3, negative guidance 2,
lr 5e-5, batch 1, Adam.

Each measurement is a fresh process that times its own steps: a hook after every optimizer step
takes a timestamp (after ``torch.cuda.synchronize()`` on a GPU, so queued kernels are counted
where they run), and the step time is the median gap between consecutive steps after the first
``--warmup``. Differencing the wall times of two processes instead (a run of A steps against one
of B) was swamped on a GPU by the variance of loading: it once gave ESD a step of -0.015 s. Peak
memory is the run's max RSS (CPU) or ``torch.cuda.max_memory_allocated`` (GPU); the peak while
training is the largest resident set (sampled every 5 ms) or allocation after the first
optimizer step, so that loading, which briefly holds a checkpoint twice, does not hide the
training loop's own memory. ESD and loreun alternate, ``--repeats`` times:

    OMP_NUM_THREADS=1 python scripts/bench_esd_reference.py --esd-repo ../erasing \\
        --model digits --steps 12 --repeats 3 --out runs/esd-reference

For an SD-1.4-shaped run without downloads, ``scripts/make_sd14_shaped.py`` writes a folder with
SD 1.4's architectures and random weights; ``--sample-steps 2`` keeps each step short on a CPU.

``--dtype bf16`` runs ESD in bf16 (its default: weights, Adam and all) and loreun with
``--mixed-precision bf16 --frozen-dtype bf16`` (fp32 trained weights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# freed tensors go back to the system at once, so resident memory follows live memory
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}
ESD_COMMIT = "25613d27892326e0c7770f7f3555bea4be150089"  # the version these edits were made for
WRAPPER = """
import json, os, resource, runpy, sys, threading, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
kind, target, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
page, samples, steps = os.sysconf("SC_PAGE_SIZE"), [], []

def sample():  # resident set size every 5 ms, to find the peak after the first optimizer step
    while True:
        with open("/proc/self/statm") as f:
            samples.append((time.perf_counter(), int(f.read().split()[1]) * page))
        time.sleep(0.005)

def stepped(optimizer, a, kw):
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the step's kernels have run, not only been queued
    steps.append(time.perf_counter())
    if len(steps) == 1 and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

register_optimizer_step_post_hook(stepped)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
if kind == "esd":
    sys.argv = [target, *args]
    runpy.run_path(target, run_name="__main__")
else:
    from loreun.cli.main import main
    assert main(args) == 0
if torch.cuda.is_available():
    peak = train = torch.cuda.max_memory_allocated()
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    train = max((b for t, b in samples if steps and t > steps[0]), default=0)
print("RESULT " + json.dumps({"wall": time.perf_counter() - start, "peak_bytes": peak,
                             "train_peak_bytes": train, "step_times": steps}))
"""


def adapted_esd(repo: Path, model: str, size: int, dtype: str, folder: Path) -> Path:
    """A copy of esd_sd.py with the model path, image size and dtype replaced."""
    text = (repo / "esd_sd.py").read_text()
    edits = [
        ('"CompVis/stable-diffusion-v1-4"', json.dumps(model)),
        ("height=width=1024", f"height=width={size}"),
        ("torch_dtype = torch.bfloat16", f"torch_dtype = torch.{dtype}"),
    ]
    for old, new in edits:
        if old not in text:
            raise SystemExit(
                f"--esd-repo: {repo / 'esd_sd.py'} has no {old!r}; these edits were made for "
                f"commit {ESD_COMMIT}"
            )
        text = text.replace(old, new)
    out = folder / "esd_sd_adapted.py"
    out.write_text(text)
    return out


def run(kind: str, target: str, args: list[str], cwd: Path) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", WRAPPER, kind, target, json.dumps(args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "LOREUN_QUIET": "1", **MALLOC},
    )
    lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if res.returncode or not lines:
        raise SystemExit(f"{kind} run failed:\n{res.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def esd_args(steps: int, method: str, concept: str, device: str, save: Path, ddim: int):
    return [
        "--erase_concept", concept, "--train_method", method, "--iterations", str(steps),
        "--lr", "5e-5", "--negative_guidance", "2", "--guidance_scale", "3",
        "--num_inference_steps", str(ddim), "--device", device, "--save_path", str(save),
    ]  # fmt: skip


def loreun_args(steps, method, concept, model, size, dtype, out, ddim: int) -> list[str]:
    low = ["--mixed-precision", "bf16", "--frozen-dtype", "bf16"] if dtype == "bfloat16" else []
    return [
        "erase", "--model", model, "--concept", concept, "--method", method,
        "--xt-source", "partial-base", "--sample-steps", str(ddim), "--sample-guidance", "3",
        "--negative-guidance", "2", "--lr", "5e-5", "--batch-size", "1", "--steps", str(steps),
        "--resolution", str(size), "--checkpoint-every", "0", "--overwrite", "--out", str(out),
        "-q", *low,
    ]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--esd-repo", required=True, type=Path, help="a checkout of ESD's repository")
    p.add_argument("--model", default="digits", help="'digits' or a diffusers SD 1.x folder")
    p.add_argument("--method", default="esd-x")
    p.add_argument("--concept", default="a handwritten 3")
    p.add_argument("--size", type=int, help="image size (default: the model's native size)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument(
        "--warmup", type=int, default=2, help="steps left out of the timing (allocation, caches)"
    )
    p.add_argument(
        "--sample-steps",
        type=int,
        default=50,
        help="DDIM steps of partial sampling, both sides (ESD's default 50; fewer keeps an "
        "SD-sized CPU run short, and does not change peak memory: sampling runs without grad)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()

    from loreun.pipelines.models import resolve_model

    model = str(Path(resolve_model(args.model)).resolve())
    size = args.size or _native_size(model)
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    device = "cuda:0" if _has_cuda() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    rows, ddim = [], args.sample_steps
    with tempfile.TemporaryDirectory() as tmp:
        script = adapted_esd(args.esd_repo.resolve(), model, size, dtype, Path(tmp))
        for rep in range(args.repeats):
            for kind in ("esd", "loreun"):
                if kind == "esd":
                    a = esd_args(
                        args.steps, args.method, args.concept, device, Path(tmp) / "s", ddim
                    )
                    r = run("esd", str(script), a, args.esd_repo.resolve())
                else:
                    out = Path(tmp) / "loreun"
                    a = loreun_args(
                        args.steps, args.method, args.concept, model, size, dtype, out, ddim
                    )
                    r = run("loreun", "", a, Path.cwd())
                row = {
                    "repeat": rep,
                    "impl": kind,
                    "step_s": step_seconds(r["step_times"], args.warmup),
                    "peak_bytes": r["peak_bytes"],
                    "train_peak_bytes": r["train_peak_bytes"],
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    write_table(args, rows, size, device)


def write_table(args, rows: list[dict], size: int, device: str) -> None:
    med = {
        k: (
            statistics.median(r["step_s"] for r in rows if r["impl"] == k),
            statistics.median(r["peak_bytes"] for r in rows if r["impl"] == k),
            statistics.median(r["train_peak_bytes"] for r in rows if r["impl"] == k),
        )
        for k in ("esd", "loreun")
    }
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    lines = [
        f"model {args.model}, {size}px, {args.method}, {args.dtype}, {device}, "
        f"OMP_NUM_THREADS={threads}, {args.steps} steps timed in process after "
        f"{args.warmup}, "
        f"{args.sample_steps} DDIM steps, "
        f"{args.repeats} repeats",
        "",
        "| implementation | s / step (median) | peak memory | peak while training |",
        "|---|---|---|---|",
        *(
            f"| {k} | {v[0]:.3f} | {v[1] / 2**30:.2f} GB | {v[2] / 2**30:.2f} GB |"
            for k, v in med.items()
        ),
        f"| loreun / ESD | {med['loreun'][0] / med['esd'][0]:.2f}x | "
        f"{med['loreun'][1] / med['esd'][1]:.2f}x | {med['loreun'][2] / med['esd'][2]:.2f}x |",
    ]
    (args.out / f"results-{args.method}-{args.dtype}.md").write_text("\n".join(lines) + "\n")
    with open(args.out / "runs.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({**r, "method": args.method, "dtype": args.dtype}) + "\n")
    print("\n".join(lines))


def step_seconds(stamps: list[float], warmup: int) -> float:
    """Median gap between consecutive optimizer steps, leaving out the first ``warmup`` steps.

    Args:
        stamps: the time after each optimizer step, in order.
    """
    gaps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]
    if not gaps:
        raise SystemExit(f"--steps: {len(stamps)} steps leave no gap to time after --warmup")
    return statistics.median(gaps)


def _native_size(model: str) -> int:
    cfg = json.loads((Path(model) / "unet" / "config.json").read_text())
    vae = json.loads((Path(model) / "vae" / "config.json").read_text())
    return cfg["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
