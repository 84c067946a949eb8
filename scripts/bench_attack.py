"""Does a digits erasure survive UnlearnDiffAtk's attack? Pre-attack ASR and ASR per erasure.

Erases one digit from the built-in model at two strengths (the README's demo erasure, esd-x
150 steps at lr 1e-4, and a weak one of a few steps), over several erasure seeds, then runs
``loreun attack`` on the digit's ten prompts of the bundled digits set, judged by the built-in
classifier (success: top-1 is the erased digit). The unerased model is attacked too, as the
sanity row (its ASR should be about 1). Each run's summary is appended to ``--out/runs.jsonl``
(a rerun skips finished runs) and ``--out/results.md`` holds the table:

    OMP_NUM_THREADS=1 python scripts/bench_attack.py --seeds 0 1 2 --out runs/attack-bench

The cost column is the median wall time of an attacked row (40 steps, then one image), on the
threads given by OMP_NUM_THREADS; run it alone, since two torch jobs on two cores oversubscribe.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

STRENGTHS = {"readme": {"steps": 150}, "weak": {"steps": 60}}


def erase_digit(out: Path, digit: int, seed: int, steps: int) -> Path:
    from loreun.erase import EraseConfig, erase
    from loreun.pipelines.digits_data import digit_captions

    cfg = EraseConfig(
        model="digits",
        out=str(out),
        concepts=digit_captions(digit),
        method="esd-x",
        steps=steps,
        lr=1e-4,
        seed=seed,
        checkpoint_every=0,
        overwrite=True,
    )
    return Path(erase(cfg))


def attack_run(out: Path, erased, digit: int, rounds: int) -> dict:
    from loreun.eval.attack import attack
    from loreun.eval.audit import AuditSettings
    from loreun.pipelines.attack_settings import AttackSettings

    audit = AuditSettings(detectors=["digits"], erased_classes=[str(digit)])
    return attack(
        "digits", "digits", out, erased=erased, settings=AttackSettings(rounds=rounds), audit=audit
    )


def runs(seeds: list[int]):
    yield "unerased", None, 0
    for name in STRENGTHS:
        for seed in seeds:
            yield name, name, seed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--digit", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, nargs="+", default=[1], help="attack rounds to run")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    done = (
        {json.loads(line)["key"] for line in log.read_text().splitlines()}
        if log.exists()
        else set()
    )
    for name, strength, seed in runs(args.seeds):
        for rounds in args.rounds:
            key = f"{name}-{seed}-r{rounds}"
            if key in done:
                continue
            erased = None
            if strength:
                erased = erase_digit(
                    out / f"erase-{name}-{seed}", args.digit, seed, **STRENGTHS[strength]
                )
            s = attack_run(out / f"attack-{key}", erased, args.digit, rounds)
            row = {
                "key": key, "erasure": name, "seed": seed, "rounds": rounds,
                "original_rate": s["original_rate"], "pre_asr": s["pre_asr"], "asr": s["asr"],
                "attacked_rows": s["attacked_rows"],
                "median_seconds": s["median_seconds_per_attacked_row"],
                "threads": torch.get_num_threads(),
            }  # fmt: skip
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    write_table(out, [json.loads(line) for line in log.read_text().splitlines()])


def span(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows]
    return f"{statistics.mean(vals):.2f} [{min(vals):.1f}, {max(vals):.1f}]"


def write_table(out: Path, rows: list[dict]) -> None:
    """Mean and range over erasure seeds, one line per erasure strength and attack rounds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["erasure"], r["rounds"]), []).append(r)
    lines = [
        "| erasure | rounds | seeds | pre-attack ASR | ASR | attacked rows | s / attacked row |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, rounds), rs in groups.items():
        secs = [r["median_seconds"] for r in rs if r["median_seconds"] is not None]
        cost = f"{statistics.median(secs):.2f}" if secs else "-"
        lines.append(
            f"| {name} | {rounds} | {len(rs)} | {span(rs, 'pre_asr')} | {span(rs, 'asr')} | "
            f"{sum(r['attacked_rows'] for r in rs)} | {cost} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
