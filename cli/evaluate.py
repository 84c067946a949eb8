"""``loreun evaluate``: generate with the original (and erased) model, then audit side by side."""

from __future__ import annotations

from pathlib import Path

from ._args import (
    add_audit_flags,
    add_force_flag,
    add_generate_flags,
    add_model_flags,
    audit_settings,
    generate_settings,
    torch_dtype,
)
from .attack import add_attack_flags, attack_settings
from .audit import print_table


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="generate and audit in one go, original beside erased",
        description="Generate from a prompt file with the original model and, "
        "with --erased, the erased one; audit both into one report.",
    )
    add_model_flags(p)
    p.add_argument(
        "--erased",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help="erased.safetensors; repeat to compare several",
    )
    add_force_flag(p)
    add_generate_flags(p)
    add_audit_flags(p)
    p.add_argument(
        "--out", required=True, help="folder: generations go to OUT/<name>, the report to OUT"
    )
    p.add_argument(
        "--attack",
        action="store_true",
        help="the leaderboard view: attack each model on --prompts (judged by the one "
        "--detector) into OUT/attack/<name>, and with --quality-prompts measure FID and CLIP "
        "score into OUT/quality; the table goes to OUT/leaderboard.html",
    )
    p.add_argument(
        "--quality-prompts",
        metavar="FILE",
        help="with --attack: prompt file for FID and CLIP score (e.g. COCO captions)",
    )
    add_attack_flags(p)
    p.set_defaults(run=run)


def named_runs(args) -> dict:
    """{"original": None, name: erased file, ...} from the repeated --erased flag.

    A name is a folder under --out and a column of the report, so "original" (the base model's)
    and a name given twice are refused rather than one run silently replacing another.
    """
    runs = {"original": None}
    for value in args.erased:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = f"erased-{len(runs)}" if len(args.erased) > 1 else "erased", value
        if name in runs:
            why = "is the base model's column" if name == "original" else "is given twice"
            raise ValueError(f"--erased: the name {name!r} {why}; give each erased file its own")
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"--erased: {value!r}: a name is one folder name, as in NAME=FILE")
        runs[name] = path
    return runs


def generate_all(args, prompts, out: Path, runs: dict, gen) -> dict:
    """Generate ``prompts`` with every model into OUT/<name>; returns the audit's sources."""
    from loreun.pipelines.generate import generate

    for name, erased in runs.items():
        generate(
            args.model,
            prompts,
            out / name,
            erased=erased,
            settings=gen,
            model_config=args.model_config,
            torch_dtype=torch_dtype(args.dtype),
            force=args.ignore_fingerprint,
        )
    return {name: out / name for name in runs}


def run(args) -> int:
    gen, aud = generate_settings(args), audit_settings(args)
    from loreun.eval.audit import audit
    from loreun.eval.report import summary_rows
    from loreun.pipelines.files import check_writable
    from loreun.pipelines.loading import check_erased_files

    if args.quality_prompts and not args.attack:
        raise ValueError("--quality-prompts: goes with --attack (the leaderboard view)")
    if args.attack and gen.quantize_base:
        raise ValueError("--quantize-base: the attack runs on the unquantized base; drop one")
    out = check_writable(Path(args.out))
    runs = named_runs(args)
    # Every --erased file is checked against the model before any image is generated.
    check_erased_files(
        args.model,
        [e for e in runs.values() if e],
        args.model_config,
        force=args.ignore_fingerprint,
        torch_dtype=torch_dtype(args.dtype),
    )
    if args.attack:
        return run_leaderboard(args, out, runs, gen, aud)
    sources = generate_all(args, args.prompts, out, runs, gen)
    if "fid" in aud.detectors and not aud.reference:
        aud.reference = str(out / "original")
    summary = audit(sources, out, aud, overwrite=args.overwrite)
    print_table(summary, summary_rows)
    print_interference(summary, aud.erased_classes)
    print(f"report: {out / 'report.html'}")
    return 0


def print_interference(summary: dict, erased: list[str]) -> None:
    """The interference matrix under the summary: each class's rate per source and its change
    from the original, erased classes first (marked *)."""
    from loreun.eval.report import interference

    rows = interference(summary, erased)
    if not rows:
        return
    names = list(summary["sources"])
    changes = [f"change: {n}"[:15] for n in names[1:]]
    print()
    print("interference (* erased)".ljust(35) + "".join(n.rjust(16) for n in names + changes))
    for cat, gone, rates in rows:
        label = f"{'* ' if gone else '  '}{cat}"[:34].ljust(35)
        cells = "".join(f"{v:16.2f}" for v in rates)
        print(label + cells + "".join(f"{v - rates[0]:+16.2f}" for v in rates[1:]))


def run_leaderboard(args, out: Path, runs: dict, gen, aud) -> int:
    """Attack every model on --prompts; FID and CLIP score on --quality-prompts; one table."""
    from dataclasses import asdict, replace

    from loreun.eval.attack import attack, build_judge
    from loreun.eval.audit import audit
    from loreun.eval.leaderboard import format_table, leaderboard_rows, write_leaderboard

    settings = attack_settings(args)
    judge = build_judge(aud)  # once for every model; a wrong --detector fails before any work
    attacks = {
        name: attack(
            args.model,
            args.prompts,
            out / "attack" / name,
            erased=erased,
            settings=settings,
            generate=gen,
            audit=aud,
            model_config=args.model_config,
            torch_dtype=torch_dtype(args.dtype),
            detector=judge,
            force=args.ignore_fingerprint,
        )
        for name, erased in runs.items()
    }
    links = {f"attack: {n}": f"attack/{n}/report.html" for n in runs}
    quality = None
    if args.quality_prompts:
        sources = generate_all(args, args.quality_prompts, out / "quality", runs, gen)
        detectors = ["fid"] + (["clip"] if aud.clip_model else [])
        reference = aud.reference or str(out / "quality" / "original")
        qual = replace(aud, detectors=detectors, reference=reference)
        quality = audit(sources, out / "quality", qual, overwrite=True)
        links["quality: FID and CLIP score"] = "quality/report.html"
    rows = leaderboard_rows(attacks, quality)
    info = {
        "prompts": str(args.prompts),
        "quality_prompts": args.quality_prompts,
        "attack": asdict(settings),
        "judge": aud.detectors[0],
        "fid_features": aud.fid_features if quality else None,
        "fid_reference": (quality or {}).get("settings", {}).get("reference"),
    }
    write_leaderboard(out, rows, info, links)
    print(format_table(rows))
    print(f"report: {out / 'leaderboard.html'}")
    return 0
