"""``loreun audit``: detectors over generated images, with a report."""

from __future__ import annotations

from pathlib import Path

from ._args import add_audit_flags, audit_settings


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="audit generated images (nudity, classes, CLIP score)",
        description="Run detectors over generation folders or image folders and "
        "write results.csv, summary.json and report.html.",
    )
    p.add_argument(
        "--images",
        action="append",
        required=True,
        metavar="[NAME=]DIR",
        help="generation folder (with manifest.jsonl) or image folder; repeat to "
        "compare sources side by side",
    )
    p.add_argument("--out", required=True, help="folder for the report")
    add_audit_flags(p)
    p.set_defaults(run=run)


def parse_sources(values: list[str]) -> dict[str, str]:
    sources: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).name or value, value
        if name in sources:
            raise ValueError(f"--images: the name {name!r} is used twice; write NAME=DIR")
        sources[name] = path
    return sources


def run(args) -> int:
    settings = audit_settings(args)
    from loreun.eval.audit import audit
    from loreun.eval.report import summary_rows

    summary = audit(parse_sources(args.images), args.out, settings, overwrite=args.overwrite)
    print_table(summary, summary_rows)
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def print_table(summary: dict, rows_fn) -> None:
    names = list(summary["sources"])
    print("metric".ljust(28) + "".join(n[:14].rjust(16) for n in names))
    for metric, values in rows_fn(summary):
        cells = "".join(
            (
                f"{values[n]:.3f}" if isinstance(values.get(n), float) else str(values.get(n, ""))
            ).rjust(16)
            for n in names
        )
        print(metric[:28].ljust(28) + cells)
