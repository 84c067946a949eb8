"""How erase steps should grow with the number of concepts, on the built-in digits model.

For each set of erased digits (3; 3 and 7; 3, 7 and 8) and each step budget, one ESD erasure
(esd-x, lr 1e-4, every caption template of each digit as a concept, the README's settings) is
generated from and scored on the ``digits`` prompt set (10 prompts per digit, 2 samples each)
with the built-in classifier: the prompted-digit accuracy of each erased digit, and the mean of
the other digits. The base model is scored once. Each erasure runs in this process, one after
the other; nothing else need be idle (the figures are accuracies, not times).

    OMP_NUM_THREADS=1 python scripts/bench_multi_concept.py --out runs/multi-concept
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SETS = ((3,), (3, 7), (3, 7, 8))


def erase_set(digits: tuple, steps: int, out: Path, seed: int) -> Path:
    from loreun.erase import EraseConfig, erase
    from loreun.pipelines.digits_data import digit_captions

    concepts = [c for d in digits for c in digit_captions(d)]
    cfg = EraseConfig(
        model="digits", out=str(out), concepts=concepts, method="esd-x", steps=steps, lr=1e-4,
        seed=seed, checkpoint_every=0,
    )  # fmt: skip
    return erase(cfg)


def score(erased: Path | None, out: Path, samples: int) -> dict:
    """Per-digit top-1 accuracy of the digits set generated with ``erased`` (None: the base)."""
    from loreun.eval.audit import AuditSettings, audit
    from loreun.pipelines.generate import GenerateSettings, generate

    gen = GenerateSettings(samples_per_prompt=samples, batch_size=20)
    generate("digits", "digits", out / "images", erased=erased, settings=gen)
    summary = audit({"s": out / "images"}, out / "audit", AuditSettings(detectors=["digits"]))
    per_class = summary["sources"]["s"]["digits"]["per_class"]
    return {c: v["top1"] for c, v in per_class.items()}


def row(digits: tuple, steps, acc: dict) -> dict:
    erased = [str(d) for d in digits]
    others = [v for c, v in acc.items() if c not in erased]
    return {
        "digits": list(digits),
        "steps": steps,
        "erased": {d: acc[d] for d in erased},
        "others": sum(others) / len(others),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--budgets", type=int, nargs="+", default=[150, 300, 450])
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    base = score(None, a.out / "base", a.samples)
    rows = [{"digits": [], "steps": 0, "all": base}]
    print(json.dumps(rows[0]), flush=True)
    for digits in SETS:
        for steps in a.budgets:
            name = "-".join(map(str, digits)) + f"-{steps}"
            erased = erase_set(digits, steps, a.out / name / "erase", a.seed)
            rows.append(row(digits, steps, score(erased, a.out / name, a.samples)))
            print(json.dumps(rows[-1]), flush=True)
    (a.out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        "| erased digits | steps | erased digits' accuracy | other digits |",
        "|---|---|---|---|",
    ]
    for r in rows[1:]:
        erased = ", ".join(
            f"{d}: {v:.2f} (base {base['all'][d]:.2f})" for d, v in r["erased"].items()
        )
        lines.append(f"| {', '.join(map(str, r['digits']))} | {r['steps']} | {erased} | "
                     f"{r['others']:.2f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
