"""``loreun attack``: adversarial prompts against an erased model (UnlearnDiffAtk's attack)."""

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

ATTACK_FLAGS = (
    ("--attack-tokens", "prefix_tokens", int, "adversarial tokens put before each prompt"),
    ("--attack-steps", "steps", int, "optimizer steps per round"),
    ("--attack-lr", "lr", float, "Adam learning rate of the token distributions"),
    ("--attack-weight-decay", "weight_decay", float, "Adam weight decay"),
    ("--attack-rounds", "rounds", int, "rounds of steps, each judged; stops at a success"),
)


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
    p.add_argument("--erased", help="unet-erased.safetensors (default: attack the model itself)")
    add_force_flag(p)
    add_generate_flags(p, batching=False)
    add_audit_flags(p, judge_only=True)
    add_attack_flags(p)
    p.add_argument("--out", required=True, help="folder for the images, log and report")
    p.set_defaults(run=run)


def add_attack_flags(p) -> None:
    from loreun.eval.attack_settings import AttackSettings

    defaults = AttackSettings()
    for flag, field, kind, text in ATTACK_FLAGS:
        default = getattr(defaults, field)
        p.add_argument(
            flag,
            dest=f"attack_{field}",
            type=kind,
            default=default,
            help=f"{text} (default {default})",
        )


def attack_settings(args):
    from loreun.eval.attack_settings import AttackSettings

    return AttackSettings(
        **{field: getattr(args, f"attack_{field}") for _, field, _, _ in ATTACK_FLAGS}
    )


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
    )
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0
