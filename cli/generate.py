"""``loreun generate``: images from a prompt file, honouring each row's seed and guidance."""

from __future__ import annotations

import os

from ._args import (
    add_force_flag,
    add_generate_flags,
    add_model_flags,
    generate_settings,
    torch_dtype,
)


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="generate images from a prompt file",
        description="Generate one image per row (and sample) of a prompt file; "
        "rerunning skips finished images.",
    )
    add_model_flags(p)
    p.add_argument("--erased", help="erased.safetensors to apply to the model")
    add_force_flag(p)
    add_generate_flags(p)
    p.add_argument("--out", required=True, help="output folder for images and manifest.jsonl")
    p.set_defaults(run=run)


def run(args) -> int:
    settings = generate_settings(args)
    from loreun.pipelines.generate import generate

    manifest = generate(
        args.model,
        args.prompts,
        args.out,
        erased=args.erased,
        settings=settings,
        model_config=args.model_config,
        torch_dtype=torch_dtype(args.dtype),
        force=args.ignore_fingerprint,
    )
    if os.environ.get("RANK", "0") == "0":
        print(f"manifest: {manifest}")
    return 0
