"""``loreun export``: share a finished erasure in the forms people load, without retraining."""

from __future__ import annotations

from loreun.erase.export_formats import EXPORT_FORMATS

from ._args import add_force_flag


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="write a finished erasure as one single-file checkpoint or a pipeline folder",
        description="Merge an erase run's weights into its base model and write them as a "
        "single .safetensors in the original Stable Diffusion key layout (AUTOMATIC1111, "
        "ComfyUI, diffusers' from_single_file) and/or a diffusers folder with a model card. "
        "LoRA runs (erase --lora-rank) already hold pytorch_lora_weights.safetensors and, for "
        "SD 1.x, 2.x and SDXL, a kohya-format copy.",
    )
    p.add_argument(
        "erase_run", metavar="RUN", help="an erase --out folder, or its erased.safetensors"
    )
    for name, fmt in EXPORT_FORMATS.items():  # one flag per form (erase/export_formats.py)
        p.add_argument(fmt.flag, dest=name, metavar=fmt.metavar, help=fmt.help)
    p.add_argument(
        "--dtype",
        choices=("fp16", "bf16", "fp32"),
        default="fp16",
        help="the single file's precision (default fp16: half the size of fp32, as web UIs expect)",
    )
    p.add_argument(
        "--base-model-id",
        metavar="OWNER/NAME",
        help="the base's hub id for the model card, when --model is a local folder that does "
        "not say it (a hub cache snapshot or a git clone does)",
    )
    p.add_argument("--audit", metavar="DIR", help="a loreun evaluate/audit folder for the card")
    p.add_argument(
        "--model", help="the base model, when it is no longer where the erase run found it"
    )
    p.add_argument("--config", dest="model_config", help="configs folder for a single-file base")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_force_flag(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from loreun.erase.export import export_shared

    targets = {name: getattr(args, name) for name in EXPORT_FORMATS}
    if not any(targets.values()):
        flags = " and/or ".join(f"{f.flag} {f.metavar}" for f in EXPORT_FORMATS.values())
        raise ValueError(f"export: give {flags}")
    for path in export_shared(
        args.erase_run,
        **targets,
        audit=args.audit,
        model=args.model,
        model_config=args.model_config,
        overwrite=args.overwrite,
        force=args.ignore_fingerprint,
        dtype=args.dtype,
        base_id=args.base_model_id,
    ):
        print(f"wrote {path}")
    return 0
