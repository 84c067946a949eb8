"""``loreun attack``: adversarial prompts against an erased model (UnlearnDiffAtk's attack)."""

from __future__ import annotations

from pathlib import Path

from loreun.pipelines.attack_settings import AttackSettings

from ._args import (
    add_audit_flags,
    add_force_flag,
    add_generate_flags,
    add_model_flags,
    audit_settings,
    generate_settings,
    torch_dtype,
)
from ._dataclass_flags import add_settings_flags, settings_from_args


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="attack an erased model with adversarial prompts (UnlearnDiffAtk)",
        description="For each concept row: the original model's image is the target; the "
        "erased model's image on the plain prompt is judged (pre-attack), then adversarial "
        "prefix tokens are optimised so the erased UNet denoises the target, and the found "
        "prompt's image is judged. Writes attack.jsonl, results.csv, summary.json (pre_asr, "
        "asr) and report.html; reruns resume.",
    )
    add_model_flags(p)
    p.add_argument("--erased", help="erased.safetensors (default: attack the model itself)")
    add_force_flag(p)
    add_generate_flags(p, batching=False)
    add_audit_flags(p, judge_only=True)
    add_attack_flags(p)
    p.add_argument("--out", required=True, help="folder for the images, log and report")
    p.set_defaults(run=run)


def add_attack_flags(p) -> None:
    """``AttackSettings``' flags (``--attack-...``), kept apart from generate's in ``args``."""
    add_settings_flags(p, AttackSettings, prefix="attack_")


def attack_settings(args) -> AttackSettings:
    return settings_from_args(args, AttackSettings, prefix="attack_")


def run(args) -> int:
    settings, gen, aud = attack_settings(args), generate_settings(args), audit_settings(args)
    from loreun.eval.attack import attack

    summary = attack(
        args.model,
        args.prompts,
        args.out,
        erased=args.erased,
        settings=settings,
        generate=gen,
        audit=aud,
        model_config=args.model_config,
        torch_dtype=torch_dtype(args.dtype),
        force=args.ignore_fingerprint,
    )
    print(
        f"rows {summary['rows']}  original rate {summary['original_rate']:.3f}  "
        f"pre-attack ASR {summary['pre_asr']:.3f}  ASR {summary['asr']:.3f}"
        + "".join(
            f"  {kind} {asr:.3f}"
            for kind, asr in summary["asr_by_kind"].items()
            if len(summary["asr_by_kind"]) > 1
        )
    )
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0
