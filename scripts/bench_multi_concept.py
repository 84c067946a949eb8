"""Erasing lists of digits on a built-in model: UCE, ESD and the hybrid, per-digit accuracy.

For each set of erased digits and each method, one erasure (every caption template of each
digit as a concept) is generated from and scored on the model's prompt set (10 prompts per
digit, 2 samples each) with the built-in classifier; every digit's prompted accuracy is kept,
so the table gives the erased digits and the others, and the matrix every digit (what else an
erasure took). Methods:

- ``uce``: the closed form (deterministic: run once, whatever ``--seeds``);
- ``esd``: esd-x fine-tuning, ``--steps-per-concept`` steps per caption (or ``--budgets``:
  fixed totals, the README's step table);
- ``hybrid``: UCE's file as the start of esd-x, ``--hybrid-steps-per-concept`` per caption.

The learning rate is the built-in model's own. Each erasure runs in this process, one after the
other; times are the erase call's wall time (loading included), so run it alone.

    OMP_NUM_THREADS=1 python scripts/bench_multi_concept.py --out runs/multi-concept
    OMP_NUM_THREADS=1 python scripts/bench_multi_concept.py --methods esd \\
        --sets 3 3,7 3,7,8 --budgets 150 300 450 --seeds 0 --out runs/multi-concept-steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SETS = ("3", "3,7,8", "3,7,8,0,5", "0,2,3,4,5,6,7,8,9")  # 1, 3, 5 and 9 digits
METHODS = ("uce", "esd", "hybrid")


def erase_set(a, method: str, digits: tuple, out: Path, seed: int, steps: int | None) -> Path:
    """One erasure of ``digits`` by ``method``; ``steps`` a fixed total for esd (else per
    caption). Returns the erased file."""
    from loreun.erase import EraseConfig, erase
    from loreun.pipelines.digits_data import digit_captions
    from loreun.pipelines.models import carried_erase_settings

    common = dict(
        model=a.model, concepts=[c for d in digits for c in digit_captions(d)], seed=seed,
        checkpoint_every=0, overwrite=True,  # a rerun redoes an erasure it did not finish
    )  # fmt: skip
    if method == "uce":
        return erase(EraseConfig(out=str(out), objective="uce", **common))
    tune = dict(method="esd-x", lr=carried_erase_settings(a.model)["lr"], **common)
    if method == "esd":
        budget = {"steps": steps} if steps else {"steps_per_concept": a.steps_per_concept}
        return erase(EraseConfig(out=str(out), **budget, **tune))
    start = erase_set(a, "uce", digits, out.parent / "uce-start", seed, None)
    spc = a.hybrid_steps_per_concept
    return erase(EraseConfig(out=str(out), init_from=str(start), steps_per_concept=spc, **tune))


def score(model: str, erased: Path | None, out: Path, samples: int) -> dict:
    """Per-digit top-1 accuracy of the model's prompt set generated with ``erased`` (None:
    the base)."""
    from loreun.eval.audit import AuditSettings, audit
    from loreun.pipelines.generate import GenerateSettings, generate

    gen = GenerateSettings(samples_per_prompt=samples, batch_size=20)
    generate(model, "digits", out / "images", erased=erased, settings=gen)
    summary = audit({"s": out / "images"}, out / "audit", AuditSettings(detectors=["digits"]))
    per_class = summary["sources"]["s"]["digits"]["per_class"]
    return {c: v["top1"] for c, v in per_class.items()}


def runs(a) -> list[tuple]:
    """(method, digits, seed, steps) of every erasure asked for."""
    todo = []
    for text in a.sets:
        digits = tuple(int(d) for d in text.split(","))
        for method in a.methods:
            seeds = a.seeds[:1] if method == "uce" else a.seeds
            budgets = a.budgets if method == "esd" and a.budgets else [None]
            todo += [(method, digits, s, b) for s in seeds for b in budgets]
    return todo


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", default="digits", choices=["digits", "digits-flow"])
    p.add_argument("--sets", nargs="+", default=list(SETS), help="comma-separated digits")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps-per-concept", type=int, default=30, help="esd, per caption")
    p.add_argument("--hybrid-steps-per-concept", type=int, default=10)
    p.add_argument("--budgets", type=int, nargs="+", help="esd: fixed step totals instead")
    p.add_argument("--samples", type=int, default=2)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    log = a.out / "rows.jsonl"
    done = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    have = {(r["method"], tuple(r["digits"]), r["seed"], r["steps"]) for r in done}
    if ("base", (), 0, None) not in have:
        done.append(record("base", (), 0, None, score(a.model, None, a.out / "base", a.samples), 0))
        append(log, done[-1])
    for method, digits, seed, steps in runs(a):
        if (method, digits, seed, steps) in have:
            continue  # a rerun resumes
        name = f"{method}-{'-'.join(map(str, digits))}-s{seed}" + (f"-{steps}" if steps else "")
        started = time.perf_counter()
        erased = erase_set(a, method, digits, a.out / name / "erase", seed, steps)
        seconds = time.perf_counter() - started
        acc = score(a.model, erased, a.out / name, a.samples)
        done.append(record(method, digits, seed, steps, acc, seconds))
        done[-1]["total_steps"] = trained_steps(erased)
        append(log, done[-1])
    print(table(done))
    print()
    print(matrix(done))
    return 0


def record(method, digits, seed, steps, acc: dict, seconds: float) -> dict:
    return dict(method=method, digits=list(digits), seed=seed, steps=steps, accuracy=acc,
                seconds=round(seconds, 2))  # fmt: skip


def trained_steps(erased: Path) -> int:
    """Optimizer steps of the fine-tuning that wrote ``erased`` (0 for the closed form)."""
    cfg = json.loads((erased.parent / "erase_config.json").read_text())
    return 0 if cfg["objective"] == "uce" else cfg["steps"]


def append(log: Path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with log.open("a") as f:
        f.write(json.dumps(row) + "\n")


def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by (digits, method, steps), base first, seeds together."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((tuple(r["digits"]), r["method"], r["steps"]), []).append(r)
    return out


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f}±{statistics.stdev(values):.2f}"


def table(rows: list[dict]) -> str:
    """Markdown: each erased digit's accuracy and the other digits' mean, mean±sd over seeds."""
    lines = [
        "| erased | method | steps | erased digits' accuracy | other digits | seconds | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for (digits, method, steps), rs in groups(rows).items():
        if not digits:
            continue
        erased = [str(d) for d in digits]
        each = ", ".join(f"{d}: {spread([r['accuracy'][d] for r in rs])}" for d in erased)
        others = [statistics.fmean(v for c, v in r["accuracy"].items() if c not in erased)
                  for r in rs]  # fmt: skip
        seconds = statistics.median(r["seconds"] for r in rs)
        total = rs[0].get("total_steps", steps)
        cells = [",".join(erased), method, total, each, spread(others), f"{seconds:.0f}", len(rs)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def matrix(rows: list[dict]) -> str:
    """Markdown: every digit's accuracy (mean over seeds) for the base and each erasure; an
    erased digit is marked with *."""
    digits = sorted(rows[0]["accuracy"])
    lines = ["| erasure | " + " | ".join(digits) + " |", "|---" * (len(digits) + 1) + "|"]
    for (erased, method, steps), rs in groups(rows).items():
        name = "base" if not erased else f"{method} {','.join(map(str, erased))}"
        cells = [
            f"{statistics.fmean(r['accuracy'][d] for r in rs):.2f}"
            + ("*" if int(d) in erased else "")
            for d in digits
        ]
        lines.append(f"| {name}{f' ({steps})' if steps else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
