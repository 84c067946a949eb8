"""The ``loreun`` command. Subcommands live in their own thin modules and import the library
(and torch) only when they run, so ``loreun --help`` answers at once."""

from __future__ import annotations

import argparse
import os
import sys

from . import attack as attack_cmd
from . import audit as audit_cmd
from . import demo as demo_cmd
from . import erase as erase_cmd
from . import evaluate as evaluate_cmd
from . import export as export_cmd
from . import generate as generate_cmd
from ._settings_file import apply_settings_file, find_config_file

SUBCOMMANDS = {
    "erase": erase_cmd,
    "generate": generate_cmd,
    "audit": audit_cmd,
    "evaluate": evaluate_cmd,
    "export": export_cmd,
    "attack": attack_cmd,
    "demo": demo_cmd,
}

# User mistakes: one line and a non-zero exit, no traceback (LOREUN_DEBUG=1 shows it).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


class DefaultsFormatter(argparse.HelpFormatter):
    """Shows each flag's default where it has one worth showing and its help does not already
    say it (argparse's own formatter also prints "(default: None)")."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is True or default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: {default})"


def build_parser() -> argparse.ArgumentParser:
    from loreun.pipelines.meta import package_version

    parser = argparse.ArgumentParser(
        prog="loreun",
        description="Erase concepts from Stable Diffusion checkpoints, then generate and audit.",
    )
    parser.add_argument(
        "--version", action="version", version=f"loreun {package_version('loreun')}"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        module.add_parser(sub, name)
        add_common_flags(sub.choices[name])
        if sub.choices[name].formatter_class is argparse.HelpFormatter:
            sub.choices[name].formatter_class = DefaultsFormatter
    return parser


# Flags of diffusers' training scripts (and accelerate's spelling of ours) -> loreun's own, so a
# habit gets a pointer instead of the top-level usage.
FOREIGN_FLAGS = {
    "--pretrained_model_name_or_path": "--model",
    "--output_dir": "--out",
    "--learning_rate": "--lr",
    "--max_train_steps": "--steps",
    "--train_batch_size": "--batch-size",
    "--resume_from_checkpoint": "--resume",
    "--checkpointing_steps": "--checkpoint-every",
    "--adam_weight_decay": "--weight-decay",
    "--rank": "--lora-rank",
    "--num_inference_steps": "--steps",
    "--guidance_scale": "--guidance",
}


def foreign_flag(parser, argv: list[str]) -> str | None:
    """A one-line pointer for the first flag that is another tool's spelling of one of the
    subcommand's own (``--learning_rate`` for ``--lr``, ``--mixed_precision`` for
    ``--mixed-precision``), or None."""
    command = next((a for a in argv if a in SUBCOMMANDS), None)
    if command is None:
        return None
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    own = sub._option_string_actions
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--") or flag in own:
            continue
        ours = FOREIGN_FLAGS.get(flag) or flag.replace("_", "-")
        if ours in own:
            return f"loreun {command}: error: {flag} is not a loreun flag; use {ours}"
    return None


def settings_file(parser, argv: list[str]) -> None:
    """Apply a subcommand's ``--config-file`` before parsing, so that the flags it gives need
    not be on the command line; one path for every subcommand."""
    command = next((a for a in argv if a in SUBCOMMANDS), None)
    path = find_config_file(argv)
    if command and path:
        sub = next(a for a in parser._actions if a.dest == "command")
        apply_settings_file(sub.choices[command], path)


def add_common_flags(p) -> None:
    """Flags every subcommand takes: how loud it is, and how many CPU threads torch uses."""
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars, set-up lines or warnings"
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="also show diffusers' and transformers' info"
    )
    if not any("--config-file" in a.option_strings for a in p._actions):
        p.add_argument(
            "--config-file",
            metavar="YAML",
            help="read settings from a YAML file with the flags' names; flags given win",
        )
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's own; 1 for the small built-in model, "
        "which two threads slow down threefold when the cores are busy)",
    )


def builtin_model_threads(args) -> int | None:
    """Threads for the small built-in model: one. Its layers are too small to share, and two
    threads slowed down threefold when other processes kept the cores busy, while one thread
    lost little on an idle machine (docs/benchmarks.md, "Threads for the built-in model").
    None: torch's own choice."""
    from loreun.pipelines.models import BUILTIN_MODELS

    if args.command != "demo" and getattr(args, "model", None) not in BUILTIN_MODELS:
        return None
    return 1


class _DropFallbackNotice:
    """transformers says on every command that its CLIP image processor falls back to PIL
    without torchvision; the fallback is what loreun uses (docs/design-notes.md), so there is
    nothing for the user to act on. Shown with -v."""

    @staticmethod
    def filter(record) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


# More threads than CPUs only slows torch down; 100000 of them took a 2-core machine down.
MAX_THREADS = os.cpu_count() or 1


def apply_common_flags(args) -> int | None:
    """Set verbosity and threads before a subcommand runs.

    Returns:
        torch's thread count before, when it was changed, so an in-process caller gets it back.
    """
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise ValueError(
            f"--threads: must be in 1..{MAX_THREADS} (this machine's CPUs), got {args.threads}"
        )
    if args.quiet:
        os.environ["LOREUN_QUIET"] = "1"
        os.environ["TRANSFORMERS_VERBOSITY"] = os.environ["DIFFUSERS_VERBOSITY"] = "error"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    elif args.verbose:
        os.environ["TRANSFORMERS_VERBOSITY"] = os.environ["DIFFUSERS_VERBOSITY"] = "info"
    if not args.verbose:
        import logging

        logging.getLogger("transformers.utils.import_utils").addFilter(_DropFallbackNotice)
    if args.quiet or args.verbose:  # the libraries' own bars and messages (loading, ...)
        import importlib

        for lib in ("transformers", "diffusers"):
            logging = importlib.import_module(f"{lib}.utils.logging")
            (logging.set_verbosity_error if args.quiet else logging.set_verbosity_info)()
            if args.quiet:
                logging.disable_progress_bar()
    threads = args.threads if args.threads is not None else builtin_model_threads(args)
    if threads is None:
        return None
    if "torch" not in sys.modules:
        # torch reads it when it is first imported; importing torch here would make every
        # argument error wait for it
        os.environ["OMP_NUM_THREADS"] = str(threads)
        return None
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    return previous


def main(argv: list[str] | None = None) -> int:
    """Run the CLI in-process; returns the exit code."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    pointer = foreign_flag(parser, argv)
    if pointer:
        print(pointer, file=sys.stderr)
        return 2
    try:
        settings_file(parser, argv)
    except USER_ERRORS as e:
        command = next((a for a in argv if a in SUBCOMMANDS), "")
        print(f"loreun {command}: error: {e}".replace(" :", ":"), file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    previous_threads = None
    try:
        previous_threads = apply_common_flags(args)
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
    finally:
        if previous_threads is not None:
            import torch

            torch.set_num_threads(previous_threads)


def entry() -> None:
    sys.exit(main())
