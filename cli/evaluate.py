"""``loreun evaluate``: generate with the original (and erased) model, then audit side by side."""

from __future__ import annotations

from pathlib import Path

from ._args import (
    add_audit_flags,
    add_generate_flags,
    add_model_flags,
    audit_settings,
    generate_settings,
    torch_dtype,
)
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
        help="unet-erased.safetensors; repeat to compare several",
    )
    add_generate_flags(p)
    add_audit_flags(p)
    p.add_argument(
        "--out", required=True, help="folder: generations go to OUT/<name>, the report to OUT"
    )
    p.set_defaults(run=run)


def run(args) -> int:
    gen, aud = generate_settings(args), audit_settings(args)
    from loreun.eval.audit import audit
    from loreun.eval.report import summary_rows
    from loreun.pipelines.files import check_writable
    from loreun.pipelines.generate import generate
    from loreun.pipelines.loading import check_erased_files

    out = check_writable(Path(args.out))
    runs = {"original": None}
    for value in args.erased:
        name, sep, path = value.partition("=")
        runs[name if sep else f"erased-{len(runs)}" if len(args.erased) > 1 else "erased"] = (
            path if sep else value
        )
    # Every --erased file is checked against the model before any image is generated.
    check_erased_files(args.model, [e for e in runs.values() if e], args.model_config)
    sources = {}
    for name, erased in runs.items():
        generate(
            args.model,
            args.prompts,
            out / name,
            erased=erased,
            settings=gen,
            model_config=args.model_config,
            torch_dtype=torch_dtype(args.dtype),
        )
        sources[name] = out / name
    summary = audit(sources, out, aud, overwrite=args.overwrite)
    print_table(summary, summary_rows)
    print(f"report: {out / 'report.html'}")
    return 0
