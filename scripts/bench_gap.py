"""The gap to exact unlearning on the digits model (docs/digits.md).

For each forgotten digit, a "retrain" reference is the digits model trained by the same script
without that digit's images and captions:

    python scripts/train_digits.py --out runs/retrain-3 --exclude-digit 3

Every erasure (method x weighting x x_t source x seed, at equal steps) and the retrain model
generate the bundled digits prompt set; the built-in classifier scores them:

- forget accuracy: the erased digit's prompts classified as that digit;
- retain accuracy: the other digits' prompts classified as their digit;
- Avg. Gap: mean of |forget - forget_retrain| and |retain - retain_retrain|;
- prompt gap (with ``--retrain``): the same at the resolution of one prompt row. The retrain
  model generates the evaluation's own prompts and seeds, and each row's accuracy is compared
  with the retrain model's on that row, so prompts erased too much and too little do not cancel.

Results are appended to ``--out/runs.jsonl`` as they finish (a rerun skips finished runs), and
``--out/results.md`` holds the mean +- std table. Run:

    python scripts/bench_gap.py --retrain 3=runs/retrain-3 --retrain 8=runs/retrain-8 \\
        --seeds 0 1 2 --steps 100 --out runs/gap

ESD erases each digit's caption prompts (methods x x_t sources). remap and ga erase from the
digit's training images (``loreun.pipelines.digit_images``), keep 20 images of every other digit
as the retain set, and run with and without a saliency mask.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

WEIGHTINGS = {
    "uniform": {"weighting": "uniform"},
    "loreun-static": {"weighting": "loreun", "loreun_variant": "static"},
    "loreun-dynamic": {"weighting": "loreun", "loreun_variant": "dynamic"},
    "loreun-batch": {"weighting": "loreun", "loreun_variant": "batch"},
    "loreun-static-t0.1": {"weighting": "loreun", "loreun_variant": "static", "temperature": 0.1},
    "loreun-dynamic-t0.1": {"weighting": "loreun", "loreun_variant": "dynamic", "temperature": 0.1},
    # the difficulty from a finer probe grid; the dynamic memory from re-probes, not single draws
    "loreun-static-p30": {"weighting": "loreun", "loreun_variant": "static", "probe_times": 30},
    "loreun-dynamic-reprobe": {
        "weighting": "loreun",
        "loreun_variant": "dynamic",
        "reprobe_every": 10,
    },  # fmt: skip
}


# Memory recipes: the default, and the low-memory one documented in docs/benchmarks.md.
RECIPES = {
    "default": {},
    "low-memory": {
        "optimizer": "adafactor",
        "frozen_dtype": "bf16",
        "step_in_backward": True,
        "gradient_checkpointing": True,
    },
    # LoRA on the same modules; adapters start at zero and need a larger step than full tensors
    "lora-r4": {"lora_rank": 4, "lr": 1e-3},
    "lora-r16": {"lora_rank": 16, "lr": 1e-3},
}


def score(model: str, erased, out: Path, digit: int, samples: int) -> dict:
    """Generate the digits prompt set and return forget/retain top-1 accuracy."""
    from loreun.eval.audit import AuditSettings, audit
    from loreun.pipelines.generate import GenerateSettings, generate

    generate(
        model,
        "digits",
        out / "gen",
        erased=erased,
        settings=GenerateSettings(samples_per_prompt=samples, batch_size=50),
    )
    s = audit(
        {"m": out / "gen"},
        out / "audit",
        AuditSettings(detectors=["digits"], erased_classes=[str(digit)]),
        overwrite=True,
    )["sources"]["m"]["digits"]
    return {"forget": s["erased_top1"], "retain": s["other_top1"]}


def forget_settings(digit: int, objective: str, root: Path, args) -> dict:
    """Where the forget (and retain) items come from for one objective.

    ESD erases the digit's caption prompts, as in the demo. remap and ga need images: the digit's
    training images as the forget folder, 20 images of every other digit as the retain folder.
    """
    from loreun.pipelines.digits_data import digit_captions, write_digit_folders

    if objective == "esd":
        return {"concepts": digit_captions(digit)}
    folders = root / (f"images-{digit}" + (f"-atypical{args.atypical}" if args.atypical else ""))
    if not folders.is_dir():
        write_digit_folders(folders, digit)
        add_atypical_images(folders / "forget", args.atypical)
    extra = {"anchor": args.anchor.format(other=(digit + 1) % 10)} if objective == "remap" else {}
    return {
        "forget_images": str(folders / "forget"),
        "retain_images": str(folders / "retain"),
        "retain_weight": args.retain_weight,
        **extra,
    }


def add_atypical_images(folder: Path, count: int) -> None:
    """Add ``count`` upside-down copies of the folder's first images, with their captions.

    The base model never saw a digit upside down, so it fits these poorly: a forget set whose
    items really differ in difficulty, which is LoReUn's premise.
    """
    from PIL import Image

    rows = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    extra = []
    for row in rows[:count]:
        name = "atypical-" + row["file_name"]
        Image.open(folder / row["file_name"]).rotate(180).save(folder / name)
        extra.append({"file_name": name, "text": row["text"]})
    lines = [json.dumps(r) for r in rows + extra]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def erase_and_score(run_key: dict, args, root: Path) -> dict:
    from loreun.erase import EraseConfig, erase

    k = run_key
    run = run_dir(root, k)
    saliency = None if k["saliency"] == "none" else float(k["saliency"])
    settings = dict(
        model="digits",
        out=str(run / "erase"),
        objective=k["objective"],
        method=k["method"],
        steps=args.steps,
        lr=args.lr,
        seed=k["seed"],
        xt_source="cached" if k["source"] == "images" else k["source"],
        sample_steps=args.sample_steps,
        saliency=saliency,
        checkpoint_every=0,
        overwrite=True,
        batch_size=args.batch_size,
        target_ess=args.target_ess if k["weighting"] != "uniform" else None,
        **forget_settings(k["digit"], k["objective"], root, args),
        **{"temperature": args.temperature, **WEIGHTINGS[k["weighting"]]},
    )
    cfg = EraseConfig(**{**settings, **RECIPES[k.get("recipe", "default")]})  # a recipe may set lr
    start = time.perf_counter()
    path = erase(cfg)
    seconds = time.perf_counter() - start
    return {
        **score("digits", path, run, k["digit"], args.samples),
        "erase_seconds": seconds,
        **shared_size_and_step(path.parent),
    }


def run_settings(key: dict, args) -> dict:
    """What else makes a run another run: its steps, the lr it erases with (a recipe's own, if
    it sets one) and LoReUn's target ESS."""
    lr = RECIPES[key.get("recipe", "default")].get("lr", args.lr)
    ess = args.target_ess if key["weighting"] != "uniform" else None
    return {"steps": args.steps, "lr": lr, "target_ess": ess}


def run_dir(root: Path, key: dict) -> Path:
    """A run's folder: its planned key's values, in order (``planned_runs``), then its
    ``run_settings`` where the key has them, so two lrs never share a folder."""
    names = ("digit", "objective", "method", "weighting", "source", "saliency", "seed")
    parts = [f"{key[n]}" for n in names]
    if key.get("recipe", "default") != "default":
        parts.append(key["recipe"])
    if "lr" in key:
        parts += [f"lr{key['lr']:g}", f"{key['steps']}steps"]
    if key.get("target_ess") is not None:
        parts.append(f"ess{key['target_ess']:g}")
    return root / "-".join(parts)


def prompt_accuracy(audit_csv: Path) -> dict[str, tuple[str, float]]:
    """Per prompt row id: its class and the share of its images the classifier calls that
    class, from an audit's results.csv."""
    import csv

    hits: dict[str, list] = {}
    with open(audit_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            hits.setdefault(row["id"], [row["class"], []])[1].append(
                row["digits_top1_correct"] == "True"
            )
    return {i: (c, sum(h) / len(h)) for i, (c, h) in hits.items()}


def prompt_gap(run: dict, ref: dict, digit: int) -> float:
    """Avg. Gap at the resolution of one prompt row: the mean |accuracy - retrain's| over the
    erased digit's rows, and over the other digits' rows, averaged. Rows are matched by id, so
    both models must have generated the same prompt file with the same seeds."""
    if run.keys() != ref.keys():
        raise ValueError("the run and the retrain model generated different prompt rows")
    forget = [abs(a - ref[i][1]) for i, (c, a) in run.items() if c == str(digit)]
    retain = [abs(a - ref[i][1]) for i, (c, a) in run.items() if c != str(digit)]
    return (statistics.fmean(forget) + statistics.fmean(retain)) / 2


def shared_size_and_step(folder: Path) -> dict:
    """The size of what a user shares (the LoRA file, else the erased tensors) and the median
    training step time, without the first 5 steps."""
    lora = folder / "pytorch_lora_weights.safetensors"
    shared = lora if lora.is_file() else folder / "erased.safetensors"
    seconds = [
        json.loads(x)["seconds"] for x in (folder / "train_log.jsonl").read_text().splitlines()
    ]
    return {
        "file_mb": shared.stat().st_size / 2**20,
        "step_ms": 1e3 * statistics.median(seconds[5:]),
    }


def planned_runs(args, digits: list[int]) -> list[dict]:
    """ESD over methods x sources without a mask; remap/ga on images, with and without one."""
    runs = []
    for digit, objective, weighting, seed, recipe in itertools.product(
        digits, args.objectives, args.weightings, args.seeds, args.recipes
    ):
        if objective == "esd":
            combos = [(m, src, "none") for m in args.methods for src in args.sources]
        else:
            combos = [(args.image_method, "images", sal) for sal in args.saliency]
        for method, source, saliency in combos:
            runs.append(
                {
                    "digit": digit,
                    "objective": objective,
                    "method": method,
                    "weighting": weighting,
                    "source": source,
                    "saliency": saliency,
                    "seed": seed,
                    **({"recipe": recipe} if recipe != "default" else {}),
                }
            )
    return runs


def _ms(rows: list[dict], name: str) -> str:
    vals = [r[name] for r in rows]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}"


GROUP = (
    "digit", "objective", "method", "weighting", "source", "saliency", "recipe", "lr", "steps",
    "target_ess",
)  # fmt: skip


def table(rows: list[dict], refs: dict) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in GROUP), []).append(r)
    out = [
        "| digit | objective | method | weighting | x_t source | saliency | recipe | lr | steps | "
        "ESS | forget acc | retain acc | Avg. Gap | prompt gap | erase s | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for digit, ref in sorted(refs.items()):
        out.append(
            f"| {digit} | retrain | - | - | - | - | - | - | - | - | {ref['forget']:.3f} | "
            f"{ref['retain']:.3f} | 0 | 0 | - | - |"
        )
    for key, rs in sorted(groups.items(), key=lambda kv: [str(k) for k in kv[0]]):
        pg = _ms(rs, "prompt_gap") if all("prompt_gap" in r for r in rs) else "-"
        cells = [f"{k:g}" if isinstance(k, float) else "-" if k is None else str(k) for k in key]
        out.append(
            f"| {' | '.join(cells)} | "
            f"{_ms(rs, 'forget')} | {_ms(rs, 'retain')} | {_ms(rs, 'gap')} | {pg} | "
            f"{statistics.mean(r['erase_seconds'] for r in rs):.1f} | {len(rs)} |"
        )
    return "\n".join(out)


def _ci(diffs: list[float]) -> str:
    """Mean of paired differences with its 95% t-interval."""
    if not diffs:
        return "-"
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.3f}"
    from scipy.stats import t

    half = t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"


def _weighting(r: dict) -> str:
    """A run's weighting, with its target ESS where it has one: two ESS values are two arms."""
    ess = r.get("target_ess")
    return r["weighting"] if ess is None else f"{r['weighting']} (ESS {ess:g})"


def weighting_summary(rows: list[dict], gap: str = "gap") -> str:
    """A gap (Avg. Gap, or the prompt gap) per weighting, pooled over digits and seeds, for
    each erasure setting (learning rate included).

    The "vs uniform" columns are the paired mean difference (same digit and seed) and how many
    of the pairs LoReUn made closer to the retrain model, so a reader sees at once whether
    LoReUn narrowed the gap and whether the difference is larger than the seed noise.
    """
    setting = ("objective", "method", "source", "saliency", "recipe", "lr", "steps")
    rows = [r for r in rows if gap in r]
    names = sorted({_weighting(r) for r in rows} - {"uniform"})
    out = [
        "| objective | method | x_t source | saliency | recipe | lr | steps | uniform gap |"
        + "".join(f" {n} gap | {n} - uniform, 95% CI (closer/pairs) |" for n in names),
        "|---|---|---|---|---|---|---|---|" + "---|---|" * len(names),
    ]
    for key in sorted({tuple(r.get(k) for k in setting) for r in rows}, key=str):
        sub = [r for r in rows if tuple(r.get(k) for k in setting) == key]
        base = {(r["digit"], r["seed"]): r[gap] for r in sub if r["weighting"] == "uniform"}
        if not base or all(r["weighting"] == "uniform" for r in sub):
            continue  # a uniform-only control: the per-setting table shows it
        cells = [_ms([r for r in sub if r["weighting"] == "uniform"], gap)]
        for n in names:
            mine = [r for r in sub if _weighting(r) == n and (r["digit"], r["seed"]) in base]
            diffs = [r[gap] - base[(r["digit"], r["seed"])] for r in mine]
            closer = sum(d < 0 for d in diffs)
            cells += [_ms(mine, gap) if mine else "-", f"{_ci(diffs)} ({closer}/{len(diffs)})"]
        shown = ["-" if k is None else f"{k:g}" if isinstance(k, float) else str(k) for k in key]
        out.append(f"| {' | '.join(shown)} | {' | '.join(cells)} |")
    return "\n".join(out)


def report(done: list[dict], refs: dict, root: Path, prompt_level: list[int]) -> str:
    """Score every run against its digit's reference and tabulate. ``prompt_level``: the digits
    whose retrain model generated here (root/retrain-D), so the prompt gap can be computed."""
    per_prompt = {d: prompt_accuracy(root / f"retrain-{d}/audit/results.csv") for d in prompt_level}
    for r in done:
        r.setdefault("recipe", "default")  # runs logged before memory recipes used the default
        ref = refs.get(r["digit"])
        if ref is None:
            continue
        r["gap"] = (abs(r["forget"] - ref["forget"]) + abs(r["retain"] - ref["retain"])) / 2
        if r["digit"] in per_prompt:
            mine = prompt_accuracy(run_dir(Path(r.get("_root", root)), r) / "audit/results.csv")
            r["prompt_gap"] = prompt_gap(mine, per_prompt[r["digit"]], r["digit"])
    scored = [r for r in done if r["digit"] in refs]
    parts = [table(scored, refs), weighting_summary(scored)]
    if per_prompt:
        parts.append(weighting_summary(scored, "prompt_gap"))
    return "\n\n".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--retrain", action="append", default=[], metavar="DIGIT=FOLDER")
    p.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="DIGIT=FORGET,RETAIN",
        help="a retrain reference's recorded forget and retain accuracy, instead of a folder",
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--target-ess", type=float, help="LoReUn: tau by target ESS fraction")
    p.add_argument(
        "--atypical", type=int, default=0, help="add this many upside-down forget images"
    )
    p.add_argument("--objectives", nargs="+", default=["esd", "remap", "ga"])
    p.add_argument("--methods", nargs="+", default=["esd-x", "esd-u"], help="for esd")
    p.add_argument("--image-method", default="esd-u", help="parameters remap and ga train")
    p.add_argument(
        "--weightings",
        nargs="+",
        default=["uniform", "loreun-static", "loreun-dynamic"],
        choices=list(WEIGHTINGS),
    )
    p.add_argument("--sources", nargs="+", default=["cached", "partial-train"], help="for esd")
    p.add_argument("--saliency", nargs="+", default=["none", "0.5"], help="for remap and ga")
    p.add_argument(
        "--anchor",
        default="a handwritten {other}",
        help="remap's anchor; {other} is (digit + 1) mod 10: SalUn remaps a class to another",
    )
    p.add_argument("--retain-weight", type=float, default=1.0)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--recipes", nargs="+", default=["default"], choices=list(RECIPES), help="memory recipes"
    )
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--samples", type=int, default=1, help="images per prompt row")
    p.add_argument("--out", required=True)
    p.add_argument("--report-only", action="store_true", help="tabulate finished runs only")
    p.add_argument(
        "--runs",
        nargs="+",
        type=Path,
        default=[],
        metavar="DIR",
        help="also tabulate the finished runs of these earlier --out folders",
    )
    a = p.parse_args()
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "runs.jsonl"
    done = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    retrain = {int(d): folder for d, folder in (x.split("=", 1) for x in a.retrain)}
    recorded = {int(d): v.split(",") for d, v in (x.split("=", 1) for x in a.reference)}
    digits = sorted({*retrain, *recorded})
    # Erasures first: they do not need the retrain models, which may still be training.
    for planned in [] if a.report_only else planned_runs(a, digits):
        key = {**planned, **run_settings(planned, a)}  # another lr or ESS is another run
        if any(all(r.get(k) == v for k, v in key.items()) for r in done):
            continue
        res = erase_and_score(key, a, root)
        done.append({**key, **res})
        with open(log, "a") as f:
            f.write(json.dumps(done[-1]) + "\n")
        print(json.dumps(done[-1]), flush=True)
    for d in a.runs:
        done += [{**json.loads(x), "_root": str(d)} for x in (d / "runs.jsonl").open()]
    refs = {d: score(f, None, root / f"retrain-{d}", d, a.samples) for d, f in retrain.items()}
    refs.update({d: {"forget": float(f), "retain": float(r)} for d, (f, r) in recorded.items()})
    text = report(done, refs, root, prompt_level=list(retrain))
    (root / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
