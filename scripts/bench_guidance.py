"""Generation of a prompt file whose rows each have their own guidance, as I2P's do.

The whole ``loreun generate`` command on the built-in digits model, at ``--batch-size 8`` (rows
of different guidance share one denoising batch) against ``--batch-size 1``, alternating,
``--repeats`` times; then the largest pixel difference between the two runs' images.

    python scripts/bench_guidance.py --rows 160 --repeats 3
    python scripts/bench_guidance.py --rows 160 --repeats 1 --threads 1
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_prompts(path: Path, rows: int) -> None:
    """``rows`` digit prompts, each with its own seed and a distinct guidance in [1.5, 6.3]."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_number", "prompt", "evaluation_seed", "evaluation_guidance"])
        for i in range(rows):
            w.writerow([i, f"a handwritten {i % 10}", 1000 + i, round(1.5 + 4.8 * i / rows, 4)])


def run(prompts: Path, out: Path, batch: int, threads: int | None) -> float:
    cmd = [sys.executable, "-m", "loreun.cli", "generate", "--model", "digits", "-q"]
    cmd += ["--prompts", str(prompts), "--batch-size", str(batch), "--out", str(out)]
    cmd += ["--threads", str(threads)] if threads else []
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def max_difference(a: Path, b: Path) -> int:
    import numpy as np
    from PIL import Image

    worst = 0
    for png in sorted((a / "images").glob("*.png")):
        x = np.asarray(Image.open(png), dtype=int)
        y = np.asarray(Image.open(b / "images" / png.name), dtype=int)
        worst = max(worst, int(np.abs(x - y).max()))
    return worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=160)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, help="pin torch's threads for both (default: loreun's)")
    a = p.parse_args()
    times: dict[int, list[float]] = {1: [], 8: []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts = tmp / "prompts.csv"
        write_prompts(prompts, a.rows)
        for r in range(a.repeats):
            for batch in (1, 8):
                times[batch].append(run(prompts, tmp / f"b{batch}-{r}", batch, a.threads))
        diff = max_difference(tmp / "b1-0", tmp / "b8-0")
    one, eight = statistics.median(times[1]), statistics.median(times[8])
    threads = a.threads or "loreun's default"
    print(
        f"| {a.rows} rows, {a.rows} guidances, threads: {threads} | median wall (s) | vs batch 1 |"
    )
    print("|---|---|---|")
    print(f"| loreun generate --batch-size 1 | {one:.1f} | 1.00x |")
    print(f"| loreun generate --batch-size 8 | {eight:.1f} | {eight / one:.2f}x |")
    print(f"\nlargest pixel difference between the two runs' images: {diff} gray levels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
