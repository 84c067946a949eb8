"""loreun's ESD step against ESD's own training script, side by side on one model.

ESD's script (``esd_sd.py`` of rohitgandikota/erasing) is read from a local checkout given by
``--esd-repo`` and run from a temporary copy adapted in four places only: the model path, the
image size, the dtype and the device (its ``--device`` flag). Nothing of it is copied into
loreun. Both sides run the same algorithm and settings: partial DDIM sampling with the frozen
base (loreun's ``--xt-source partial-base``), 50 DDIM steps, guidance 3, negative guidance 2,
lr 5e-5, batch 1, Adam.

Each measurement is a fresh process; a run of ``--steps A`` and one of ``--steps B`` cancel the
loading, so step time = (wall_B - wall_A) / (B - A). Peak memory is the B run's max RSS (CPU)
or ``torch.cuda.max_memory_allocated`` (GPU). ESD and loreun alternate, ``--repeats`` times:

    OMP_NUM_THREADS=1 python scripts/bench_esd_reference.py --esd-repo ../erasing \\
        --model digits --steps 2 12 --repeats 3 --out runs/esd-reference

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

ESD_COMMIT = "25613d27892326e0c7770f7f3555bea4be150089"  # the version these edits were made for
WRAPPER = """
import json, resource, runpy, sys, time
kind, target, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
start = time.perf_counter()
if kind == "esd":
    sys.argv = [target, *args]
    runpy.run_path(target, run_name="__main__")
else:
    from loreun.cli.main import main
    assert main(args) == 0
import torch
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else (
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print("RESULT " + json.dumps({"wall": time.perf_counter() - start, "peak_bytes": peak}))
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
        env={**os.environ, "HF_HUB_OFFLINE": "1", "LOREUN_QUIET": "1"},
    )
    lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if res.returncode or not lines:
        raise SystemExit(f"{kind} run failed:\n{res.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def esd_args(steps: int, method: str, concept: str, device: str, save: Path) -> list[str]:
    return [
        "--erase_concept", concept, "--train_method", method, "--iterations", str(steps),
        "--lr", "5e-5", "--negative_guidance", "2", "--guidance_scale", "3",
        "--num_inference_steps", "50", "--device", device, "--save_path", str(save),
    ]  # fmt: skip


def loreun_args(steps: int, method: str, concept: str, model: str, size: int, dtype: str, out):
    low = ["--mixed-precision", "bf16", "--frozen-dtype", "bf16"] if dtype == "bfloat16" else []
    return [
        "erase", "--model", model, "--concept", concept, "--method", method,
        "--xt-source", "partial-base", "--sample-steps", "50", "--sample-guidance", "3",
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
    p.add_argument("--steps", type=int, nargs=2, default=[2, 12], metavar=("A", "B"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()

    from loreun.pipelines.models import resolve_model

    model = str(Path(resolve_model(args.model)).resolve())
    size = args.size or _native_size(model)
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    device = "cuda:0" if _has_cuda() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        script = adapted_esd(args.esd_repo.resolve(), model, size, dtype, Path(tmp))
        for rep in range(args.repeats):
            for kind in ("esd", "loreun"):
                walls = {}
                for steps in args.steps:
                    if kind == "esd":
                        a = esd_args(steps, args.method, args.concept, device, Path(tmp) / "s")
                        r = run("esd", str(script), a, args.esd_repo.resolve())
                    else:
                        out = Path(tmp) / "loreun"
                        a = loreun_args(steps, args.method, args.concept, model, size, dtype, out)
                        r = run("loreun", "", a, Path.cwd())
                    walls[steps] = r
                (a_, b_) = args.steps
                step = (walls[b_]["wall"] - walls[a_]["wall"]) / (b_ - a_)
                row = {
                    "repeat": rep,
                    "impl": kind,
                    "step_s": step,
                    "peak_bytes": walls[b_]["peak_bytes"],
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    write_table(args, rows, size, device)


def write_table(args, rows: list[dict], size: int, device: str) -> None:
    med = {
        k: (
            statistics.median(r["step_s"] for r in rows if r["impl"] == k),
            statistics.median(r["peak_bytes"] for r in rows if r["impl"] == k),
        )
        for k in ("esd", "loreun")
    }
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    lines = [
        f"model {args.model}, {size}px, {args.method}, {args.dtype}, {device}, "
        f"OMP_NUM_THREADS={threads}, steps {args.steps[0]} and {args.steps[1]}, "
        f"{args.repeats} repeats",
        "",
        "| implementation | s / step (median) | peak memory |",
        "|---|---|---|",
        *(f"| {k} | {v[0]:.3f} | {v[1] / 2**30:.2f} GB |" for k, v in med.items()),
        f"| loreun / ESD | {med['loreun'][0] / med['esd'][0]:.2f}x | "
        f"{med['loreun'][1] / med['esd'][1]:.2f}x |",
    ]
    (args.out / f"results-{args.method}-{args.dtype}.md").write_text("\n".join(lines) + "\n")
    with open(args.out / "runs.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({**r, "method": args.method, "dtype": args.dtype}) + "\n")
    print("\n".join(lines))


def _native_size(model: str) -> int:
    cfg = json.loads((Path(model) / "unet" / "config.json").read_text())
    vae = json.loads((Path(model) / "vae" / "config.json").read_text())
    return cfg["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
