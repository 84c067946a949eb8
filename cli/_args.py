"""Flag groups shared by the generate, audit and evaluate subcommands."""

from __future__ import annotations

from loreun.eval.nudity import DEFAULT_THRESHOLD
from loreun.pipelines.generate_settings import GenerateSettings

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEFAULTS = GenerateSettings()  # one source for generate's defaults


def add_model_flags(p) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="base model: 'digits', a diffusers folder, a hub id, or a single-file "
        ".safetensors with --config",
    )
    p.add_argument("--config", dest="model_config", help="configs folder for a single file")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights precision")


def add_force_flag(p) -> None:
    """``--ignore-fingerprint``: apply an erased file to a base whose fingerprint differs
    (names and shapes are still checked). The library's error names this flag."""
    p.add_argument(
        "--ignore-fingerprint",
        action="store_true",
        help="apply --erased even when it was erased from a base with other weights (names and "
        "shapes are still checked)",
    )


def add_generate_flags(p, batching: bool = True) -> None:
    """Prompt file and sampling flags; ``batching`` adds --samples-per-prompt and
    --batch-size, which a command that makes one image per row at a time does not take."""
    p.add_argument(
        "--prompts",
        required=True,
        help="prompt file (.csv/.tsv/.jsonl/.txt) or bundled set: nudity, "
        "imagenette, neutral, digits",
    )
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help="denoising steps")
    p.add_argument(
        "--guidance",
        type=float,
        default=DEFAULTS.guidance,
        help="guidance for rows that give none",
    )
    p.add_argument(
        "--size",
        type=int,
        help="image size for rows that give none (default: the model's native size)",
    )
    p.add_argument(
        "--force-size",
        action="store_true",
        help="use --size for every row, overriding the sizes the prompt file gives",
    )
    if batching:
        p.add_argument(
            "--samples-per-prompt",
            type=int,
            default=DEFAULTS.samples_per_prompt,
            help="images per row, seeded seed, seed+1, ...",
        )
        p.add_argument(
            "--batch-size", type=int, default=DEFAULTS.batch_size, help="images per pipeline call"
        )
    p.add_argument(
        "--scheduler", default=DEFAULTS.scheduler, help="default, ddim, pndm, euler, euler-a or dpm"
    )
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed for rows that give none")


def add_audit_flags(p, judge_only: bool = False) -> None:
    """Detector flags; ``judge_only`` keeps those of the one detector that judges an image
    (the attack's), without the report and set-metric flags."""
    p.add_argument(
        "--detector",
        action="append",
        dest="detectors",
        help="nudenet (default), classifier or digits"
        if judge_only
        else "nudenet (default), classifier, digits, clip or fid; repeat for several",
    )
    p.add_argument("--classifier", help="image-classification model folder or hub id")
    if not judge_only:
        p.add_argument("--clip-model", help="CLIP model folder or hub id for the clip detector")
        p.add_argument(
            "--reference",
            metavar="DIR",
            help="images the fid detector compares against (evaluate: the original model's)",
        )
        p.add_argument(
            "--fid-features",
            default="inception",
            help="fid features: inception (needs loreun[fid]), digits, or an image-classifier "
            "folder (its penultimate layer)",
        )
    p.add_argument(
        "--erased-class",
        action="append",
        default=[],
        dest="erased_classes",
        help="prompt class that was erased (classifier accuracy is split by it)",
    )
    p.add_argument(
        "--nudity-threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="NudeNet score above which an exposed class counts",
    )
    p.add_argument("--no-blur", action="store_true", help="show flagged images unblurred")
    if judge_only:
        return
    p.add_argument("--grid-limit", type=int, default=48, help="images per source in the grid")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier audit in --out")


def generate_settings(args):
    return GenerateSettings(
        steps=args.steps,
        guidance=args.guidance,
        size=args.size,
        samples_per_prompt=getattr(args, "samples_per_prompt", DEFAULTS.samples_per_prompt),
        batch_size=getattr(args, "batch_size", DEFAULTS.batch_size),
        scheduler=args.scheduler,
        seed=args.seed,
        force_size=args.force_size,
    )


def audit_settings(args):
    from loreun.eval.audit import AuditSettings

    return AuditSettings(
        detectors=args.detectors or ["nudenet"],
        nudity_threshold=args.nudity_threshold,
        classifier=args.classifier,
        clip_model=getattr(args, "clip_model", None),
        reference=getattr(args, "reference", None),
        fid_features=getattr(args, "fid_features", "inception"),
        erased_classes=args.erased_classes,
        blur=not args.no_blur,
        grid_limit=getattr(args, "grid_limit", 48),
    )


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])
