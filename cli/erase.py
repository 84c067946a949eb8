"""``loreun erase``: flags are generated from ``EraseConfig``'s fields and their help text."""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing

from loreun.erase.config import OBJECTIVE_SLOTS, WEIGHTING_SLOTS, EraseConfig, flag_name

from ._settings_file import read_settings_file


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="erase concepts from a Stable Diffusion UNet",
        description="Fine-tune UNet weights so that the model forgets concepts, "
        "and export them as safetensors.",
        # --model and --out are needed, but a --config-file may give them, so argparse cannot
        # mark them required; the usage line says so
        usage="loreun erase --model MODEL --out OUT (--concept TEXT ... | --concepts-file FILE "
        "| --forget-images DIR) [options]",
    )
    p.add_argument(
        "--config-file",
        metavar="YAML",
        help="read settings from a YAML file; flags given on the command line win",
    )
    hints = typing.get_type_hints(EraseConfig)
    fields = {f.name: f for f in dataclasses.fields(EraseConfig)}
    for title, names in GROUPS.items():
        group = p.add_argument_group(title)
        for name in names:
            _add_field(group, fields[name], hints[name])
    p.set_defaults(run=run)


def slot_fields(slots: dict) -> list[str]:
    """The settings fields of every slot module in ``slots``, in their order."""
    return [f.name for m in slots.values() for f in dataclasses.fields(m.Settings)]


# The --help sections, in the order a user meets the decisions; every config field is in one,
# and each slot's settings join its slot's section.
GROUPS = {
    "model": ("model", "model_config", "resolution"),
    "memory": (
        "mixed_precision",
        "gradient_checkpointing",
        "optimizer",
        "frozen_dtype",
        "step_in_backward",
    ),
    "what to forget": (
        "concepts",
        "concepts_file",
        "forget_images",
        "forget_caption",
        "samples_per_concept",
        "sample_steps",
        "sample_guidance",
    ),
    "what to keep": ("retain_images", "retain_caption", "retain_concepts", "retain_weight"),
    "objective": (
        "objective",
        "method",
        *slot_fields(OBJECTIVE_SLOTS),
        "saliency",
        "saliency_mask",
        "xt_source",
        "trajectory_pool",
        "trajectory_cache_mb",
    ),
    "LoRA (train low-rank adapters instead of the full tensors)": ("lora_rank", "lora_alpha"),
    "weighting": ("weighting", *slot_fields(WEIGHTING_SLOTS)),
    "training": (
        "steps",
        "batch_size",
        "gradient_accumulation_steps",
        "lr",
        "weight_decay",
        "max_grad_norm",
        "seed",
    ),
    "output": (
        "out",
        "save_pipeline",
        "checkpoint_every",
        "checkpoints_total_limit",
        "checkpoint_without_optimizer",
        "resume",
        "overwrite",
    ),
}


def _help_with_default(f: dataclasses.Field) -> str:
    """The field's help, plus its default where it has a telling one (flags default to None so
    that a YAML file can fill them)."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if default is None or default is False or isinstance(default, list):  # 0 == False
        return f.metadata["help"]
    return f"{f.metadata['help']} (default: {default})"


def _add_field(p, f: dataclasses.Field, hint) -> None:
    kwargs: dict = {"help": _help_with_default(f), "dest": f.name, "default": None}
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kind = [a for a in typing.get_args(hint) if a is not type(None)][0] if optional else hint
    if kind is bool:
        kwargs["action"] = "store_true"
    elif typing.get_origin(kind) is list:
        kwargs["action"] = "append"
    else:
        kwargs["type"] = kind
        if "choices" in f.metadata:
            kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
    if f.name == "steps":
        kwargs["type"] = int
    p.add_argument(flag_name(f), **kwargs)


def config_from_args(args) -> EraseConfig:
    """Merge YAML settings (if any) under the flags given, then validate."""
    data: dict = {}
    if args.config_file:
        data = _read_yaml(args.config_file)
    for f in dataclasses.fields(EraseConfig):
        value = getattr(args, f.name)
        if value is not None and value is not False:
            data[f.name] = value
    for required in ("model", "out"):
        if required not in data:
            raise ValueError(f"--{required}: required")
    return EraseConfig.from_dict(data)


def _read_yaml(path: str) -> dict:
    """Settings for EraseConfig from a file: keys are the flags' names (``concept``, ``config``)
    or the config's field names (``concepts``, ``model_config``), with dashes or underscores,
    and values are typed by the dataclass."""
    data = read_settings_file(path)
    fields = dataclasses.fields(EraseConfig)
    names = {f.name: f.name for f in fields}
    names.update({flag_name(f)[2:].replace("-", "_"): f.name for f in fields})
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"--config-file: {path}: unknown settings: {', '.join(unknown)}")
    same = [k for k in data if names[k] != k and names[k] in data]
    if same:
        raise ValueError(f"--config-file: {path}: {same[0]} and {names[same[0]]} are one setting")
    hints = typing.get_type_hints(EraseConfig)
    return {
        names[k]: _coerce(v, hints[names[k]], f"--config-file: {path}: {k}")
        for k, v in data.items()
    }


def _coerce(value, hint, where: str):
    """A YAML value as the field's type: YAML 1.1 reads ``1e-4`` as a string, and a typo like
    ``steps: abc`` must fail here, naming the setting, not deep inside the trainer."""
    if value is None:
        return None
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kind = [a for a in typing.get_args(hint) if a is not type(None)][0] if optional else hint
    if typing.get_origin(kind) is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, str, where) for v in items]
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{where}: expected text, got {value!r}")
        return str(value)
    if isinstance(value, bool):  # YAML 1.1 reads yes/no/on/off as booleans; float(True) is 1.0
        raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
    try:
        number = float(value) if kind is float else _as_int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{where}: expected {kind.__name__}, got {_short(value)}") from None
    return number


def _short(value) -> str:
    """A value as an error message may show it: a 400-digit number is not a message."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _as_int(value) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    as_float = float(value)
    if not as_float.is_integer():
        raise ValueError(value)
    return int(as_float)


def run(args) -> int:
    cfg = config_from_args(args)
    from loreun.erase.trainer import TrainingDiverged, TrainingInterrupted, erase

    try:
        path = erase(cfg)
    except TrainingInterrupted as e:
        print(f"loreun erase: {e}", file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        print(f"loreun erase: error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process
        print(f"erased weights: {path}")
    return 0
