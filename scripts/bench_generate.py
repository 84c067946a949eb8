"""Generation: loreun's ``generate`` against a plain loop of single diffusers pipeline calls.

Both load the pipeline, generate every row of the same prompt file with that row's seed and
guidance, and save PNGs; each configuration runs alternately ``--repeats`` times. Wall time and
process CPU time are both reported: CPU time is less disturbed by other load on the machine.
Run:

    python scripts/bench_generate.py --rows 24 --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loreun.pipelines.generate import GenerateSettings, generate
from loreun.pipelines.tiny import save_tiny_pipeline
from loreun.prompts import load_prompts


def plain_loop(model: str, rows, out: Path, steps: int) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True)
    for i, row in enumerate(rows):
        image = pipe(
            row.prompt,
            generator=torch.Generator().manual_seed(row.seed),
            guidance_scale=row.guidance or 7.5,
            num_inference_steps=steps,
        ).images[0]
        image.save(out / f"{i}.png")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = str(save_tiny_pipeline(tmp / "tiny"))
        rows = (load_prompts("neutral") * 10)[: a.rows]
        for i, r in enumerate(rows):
            r.guidance = 7.5  # one guidance, so batching is possible for every row
            r.id = str(i)
        runs = {
            "plain loop of pipeline calls": lambda d: plain_loop(model, rows, d, a.steps),
            "loreun generate, batch 1": lambda d: generate(
                model, rows, d, settings=GenerateSettings(steps=a.steps, batch_size=1)
            ),
            "loreun generate, batch 8": lambda d: generate(
                model, rows, d, settings=GenerateSettings(steps=a.steps, batch_size=8)
            ),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(a.repeats):
            for name, fn in runs.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(tmp / f"{len(times[name])}-{list(runs).index(name)}")
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    base = statistics.median(times["plain loop of pipeline calls"])
    base_cpu = statistics.median(cpu["plain loop of pipeline calls"])
    print(
        f"| {a.rows} rows, {a.steps} steps, tiny pipeline | median wall (s) | vs plain loop | "
        "median CPU (s) | vs plain loop |"
    )
    print("|---|---|---|---|---|")
    for name in times:
        w, c = statistics.median(times[name]), statistics.median(cpu[name])
        print(f"| {name} | {w:.2f} | {w / base:.2f}x | {c:.2f} | {c / base_cpu:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
