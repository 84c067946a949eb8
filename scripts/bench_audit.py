"""NudeNet audit throughput: loreun's audit against one ``detect`` call per image.

All build the detector once and read the same PNG files from disk, alternating in each repeat:

* ``detect() per image``: ``NudeDetector.detect(path)`` in a loop (ONNX Runtime's own threads);
* ``audit, NudeNet's detect_batch``: loreun's audit path with NudeNet's own batched call (16
  images per ONNX run), as loreun ran it before the pooled detector;
* ``audit, pooled``: loreun's audit path as it runs now (threaded decoding, ``PooledNudeNet``).

Run alone (torch's thread count sets the pool's size):

    python scripts/bench_audit.py --images 64 --repeats 5
    python scripts/bench_audit.py --images 64 --repeats 5 --stages   # ms an image per stage
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
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


def stages(paths: list[Path], repeats: int) -> dict[str, float]:
    """Median ms an image of each stage of ``NudeDetector.detect``, run one after another as
    detect runs them: decoding, letterboxing, the ONNX run (its default threads, one thread,
    16 images a run) and NudeNet's post-processing."""
    import cv2
    import nudenet.nudenet as nn
    import onnxruntime as ort

    det = nn.NudeDetector()
    one = ort.SessionOptions()
    one.intra_op_num_threads = 1
    single = ort.InferenceSession(det.onnx_session._model_path, one)
    mats = [cv2.imread(str(p)) for p in paths]
    pre = [nn._read_image(m, 320) for m in mats]
    blob = np.vstack([p[0] for p in pre[:16]])
    outs = [det.onnx_session.run(None, {det.input_name: p[0]}) for p in pre]
    fns = {
        "decode (cv2.imread)": (lambda: [cv2.imread(str(p)) for p in paths], len(paths)),
        "letterbox": (lambda: [nn._read_image(m, 320) for m in mats], len(paths)),
        "ONNX, default threads": (
            lambda: [det.onnx_session.run(None, {det.input_name: p[0]}) for p in pre],
            len(paths),
        ),
        "ONNX, one thread": (
            lambda: [single.run(None, {det.input_name: p[0]}) for p in pre],
            len(paths),
        ),
        "ONNX, 16 images a run": (lambda: det.onnx_session.run(None, {det.input_name: blob}), 16),
        "NudeNet post-processing": (
            lambda: [
                nn._postprocess(o, p[3], p[4], p[1], p[2], p[5], p[6], 320, 320)
                for o, p in zip(outs, pre)
            ],
            len(paths),
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, (fn, n) in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - start) / n)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stages", action="store_true", help="time detect()'s stages instead")
    a = p.parse_args()
    if a.stages:
        with tempfile.TemporaryDirectory() as tmp:
            for name, ms in stages(make_images(Path(tmp), a.images), a.repeats).items():
                print(f"| {name} | {ms:.2f} |")
        return 0
    from nudenet import NudeDetector

    from loreun.eval.audit import AuditSettings, audit_source
    from loreun.eval.nudity import NudeNetDetector

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), a.images)
        plain = NudeDetector()
        batched = NudeNetDetector(batch_size=16, model=NudeDetector())
        pooled = NudeNetDetector(batch_size=16)
        settings = AuditSettings(batch_size=16)

        def per_image():
            return [plain.detect(str(path)) for path in paths]

        runs = {
            "detect() per image": per_image,
            "audit, NudeNet's detect_batch": lambda: audit_source("b", tmp, [batched], settings),
            "audit, pooled": lambda: audit_source("p", tmp, [pooled], settings),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(a.repeats):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["detect() per image"])
    print(f"torch threads (pool size): {torch.get_num_threads()}; {os.cpu_count()} CPUs")
    print(f"| {a.images} images, 512x512 | median wall (s) | images/s | vs per-image |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.2f} | {a.images / t:.1f} | {base / t:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
