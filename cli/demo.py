"""``loreun demo``: erase a digit from a built-in digits model and show that it is gone.

Erase (ESD) -> generate the bundled digits prompts before and after -> audit both with the
built-in digit classifier -> a before/after table and report.html. Minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="erase a digit from the built-in digits model, end to end",
        description=" ".join(__doc__.split("\n\n")[1].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--digit", type=int, default=3, help="digit to erase (0-9)")
    p.add_argument(
        "--model",
        default="digits",
        choices=["digits", "digits-flow"],
        help="built-in model: digits (SD 1.x's architecture) or digits-flow (SD3's, flow matching)",
    )
    p.add_argument("--out", default="loreun-demo", help="output folder")
    p.add_argument("--method", default="esd-x", help="ESD parameter preset")
    p.add_argument("--weighting", default="uniform", help="uniform or loreun")
    p.add_argument("--steps", type=int, help="erase steps (default: the model's own, 150 on both)")
    p.add_argument(
        "--lr",
        type=float,
        help="erase learning rate (default: the model's own, 1e-4 on digits, 5e-4 on "
        "digits-flow: its text-stream attention needs a larger one than the UNet's)",
    )
    p.add_argument(
        "--samples-per-prompt",
        type=int,
        default=2,
        help="images per prompt row (10 rows per digit)",
    )
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out")
    p.set_defaults(run=run)


def run(args) -> int:
    if not 0 <= args.digit <= 9:
        raise ValueError(f"--digit: must be 0-9, got {args.digit}")
    from loreun.erase import EraseConfig, erase
    from loreun.eval.audit import AuditSettings, audit
    from loreun.pipelines.digits_data import digit_captions
    from loreun.pipelines.generate import GenerateSettings, generate, remove_generation
    from loreun.pipelines.models import carried_erase_settings

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(
            f"--out: {out} holds an earlier demo; pass --overwrite to run it again, or choose "
            "another --out"
        )
    own = carried_erase_settings(args.model)
    cfg = EraseConfig(
        model=args.model,
        out=str(out / "erase"),
        concepts=digit_captions(args.digit),
        method=args.method,
        weighting=args.weighting,
        steps=args.steps or own["steps"],
        lr=args.lr or own["lr"],
        checkpoint_every=0,
        overwrite=args.overwrite,
    )
    what = f"{args.method}, {args.weighting}, {cfg.steps} steps, lr {cfg.lr:g}"
    print(f"[1/3] erasing digit {args.digit} from {args.model} ({what})")
    erased = erase(cfg)
    gen = GenerateSettings(samples_per_prompt=args.samples_per_prompt, batch_size=20)
    print("[2/3] generating the digits prompt set before and after")
    for name, weights in (("original", None), ("erased", erased)):
        try:
            generate(args.model, "digits", out / name, erased=weights, settings=gen)
        except FileExistsError:  # the earlier demo's images, of other weights or settings
            if not args.overwrite:
                raise
            remove_generation(out / name)
            generate(args.model, "digits", out / name, erased=weights, settings=gen)
    print("[3/3] auditing with the digit classifier")
    settings = AuditSettings(detectors=["digits"], erased_classes=[str(args.digit)])
    summary = audit(
        {"original": out / "original", "erased": out / "erased"},
        out,
        settings,
        overwrite=args.overwrite,
    )
    print_before_after(summary, args.digit)
    print(f"report: {out / 'report.html'}")
    return 0


def print_before_after(summary: dict, digit: int) -> None:
    """The demo's table: prompted-digit accuracy of the erased and the retained digits."""
    rows = [("erased digit", "erased_top1"), ("retained digits", "other_top1")]
    s = {k: v["digits"] for k, v in summary["sources"].items()}
    print(f"\n{'top-1 accuracy':<22}{'original':>10}{'erased':>10}")
    for label, key in rows:
        name = f"{label} ({digit})" if key == "erased_top1" else label
        print(f"{name:<22}{s['original'][key]:>10.3f}{s['erased'][key]:>10.3f}")
    print(
        "\nper digit: "
        + "  ".join(
            f"{c}: {s['original']['per_class'][c]['top1']:.2f}->"
            f"{s['erased']['per_class'][c]['top1']:.2f}"
            for c in sorted(s["original"]["per_class"])
        )
    )
