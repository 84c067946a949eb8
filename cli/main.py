"""The ``loreun`` command. Subcommands live in their own thin modules and import the library
(and torch) only when they run, so ``loreun --help`` answers at once."""

from __future__ import annotations

import argparse
import os
import sys

from . import audit as audit_cmd
from . import demo as demo_cmd
from . import erase as erase_cmd
from . import evaluate as evaluate_cmd
from . import generate as generate_cmd

SUBCOMMANDS = {
    "erase": erase_cmd,
    "generate": generate_cmd,
    "audit": audit_cmd,
    "evaluate": evaluate_cmd,
    "demo": demo_cmd,
}

# User mistakes: one line and a non-zero exit, no traceback (LOREUN_DEBUG=1 shows it).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loreun",
        description="Erase concepts from Stable Diffusion checkpoints, then generate and audit.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        module.add_parser(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI in-process; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except USER_ERRORS as e:
        if os.environ.get("LOREUN_DEBUG"):
            raise
        print(f"loreun {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full disk, a folder where a file was expected, ...
        if os.environ.get("LOREUN_DEBUG"):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"loreun {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loreun {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
