"""NudeNet audit throughput: loreun's batched detector against one ``detect`` call per image.

Both build the detector once and read the same PNG files from disk. Run:

    python scripts/bench_audit.py --images 64 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image


def make_images(folder: Path, n: int) -> list[Path]:
    from skimage.data import astronaut, chelsea, coffee

    bases = [Image.fromarray(x()) for x in (astronaut, chelsea, coffee)]
    paths = []
    for i in range(n):
        im = bases[i % 3].resize((512, 512)).rotate(i * 7 % 30)
        paths.append(folder / f"{i:04d}.png")
        im.save(paths[-1])
    return paths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    from nudenet import NudeDetector

    from loreun.eval.audit import AuditSettings, audit_source
    from loreun.eval.nudity import NudeNetDetector

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), a.images)
        plain = NudeDetector()
        ours = NudeNetDetector(batch_size=16)
        settings = AuditSettings(batch_size=16)
        times: dict[str, list[float]] = {"detect() per image": [], "loreun audit (batched)": []}
        for _ in range(a.repeats):
            start = time.perf_counter()
            for path in paths:
                plain.detect(str(path))
            times["detect() per image"].append(time.perf_counter() - start)
            start = time.perf_counter()
            audit_source("bench", tmp, [ours], settings)
            times["loreun audit (batched)"].append(time.perf_counter() - start)
    base = statistics.median(times["detect() per image"])
    print(f"| {a.images} images, 512x512 | median wall (s) | images/s | vs per-image |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.2f} | {a.images / t:.1f} | {base / t:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
