"""LoReUn's per-step overhead against uniform weighting, in the real trainer.

Runs ``erase`` on the digits model with each weighting, alternating, and compares the median
step time from ``train_log.jsonl`` (the first steps are warm-up and are dropped). Run:

    python scripts/bench_loreun.py --steps 100 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from loreun.erase import EraseConfig, erase


def one_run(weighting: str, steps: int, source: str, root: Path, k: int) -> tuple[float, float]:
    out = root / f"{weighting}-{k}"
    cfg = EraseConfig(
        model="digits",
        out=str(out),
        concepts=[
            "3",
            "a handwritten 3",
            "the number three",
            "a drawing of the digit three",
            "digit 3",
        ],
        method="esd-x",
        weighting=weighting,
        steps=steps,
        lr=1e-4,
        checkpoint_every=0,
        xt_source=source,
    )
    erase(cfg)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return statistics.median(r["seconds"] for r in log[5:]), statistics.median(
        r["ess"] for r in log
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--xt-source", default="cached")
    a = p.parse_args()
    times: dict[str, list[float]] = {"uniform": [], "loreun": []}
    ess: dict[str, list[float]] = {"uniform": [], "loreun": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(a.repeats):
            for w in times:
                t, e = one_run(w, a.steps, a.xt_source, Path(tmp), k)
                times[w].append(t)
                ess[w].append(e)
    ratios = [lo / un for lo, un in zip(times["loreun"], times["uniform"])]
    print("| weighting | median step (ms) | median ESS (of 5) |")
    print("|---|---|---|")
    for w in times:
        print(
            f"| {w} | {1000 * statistics.median(times[w]):.2f} | {statistics.median(ess[w]):.3f} |"
        )
    print(f"| loreun / uniform (median of paired ratios) | {statistics.median(ratios):.3f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
