"""``loreun erase``: flags are generated from ``EraseConfig``'s fields and their help text."""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from pathlib import Path

from loreun.erase.adversarial_settings import AdversarialSettings
from loreun.erase.config import OBJECTIVE_SLOTS, WEIGHTING_SLOTS, EraseConfig

from ._dataclass_flags import add_field_flag


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="erase concepts from a diffusion model's denoiser (UNet or transformer)",
        description="Fine-tune the denoiser's weights (the UNet of SD 1.x/2.x and SDXL, the "
        "transformer of SD3 and FLUX.1) so that the model forgets concepts, and export them as "
        "safetensors.",
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
        for name in names:  # default None: a --config-file fills what the flags leave
            f = fields[name]
            add_field_flag(group, f, hints[name], dest=name, default=None, help_default=f.default)
    p.set_defaults(run=run)


def slot_fields(slots: dict) -> list[str]:
    """The settings fields of every slot module in ``slots``, in their order."""
    return [f.name for m in slots.values() for f in dataclasses.fields(m.Settings)]


# The --help sections, in the order a user meets the decisions; every config field is in one,
# and each slot's settings join its slot's section.
GROUPS = {
    "model": ("model", "model_config", "resolution", "model_defaults"),
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
    "text encoders (erase where prompts are read; AdvUnlearn's robustness)": (
        "train",
        "text_encoder_part",
        "text_encoder_layers",
    ),
    "LoRA (train low-rank adapters instead of the full tensors)": (
        "lora_rank",
        "lora_alpha",
        "quantize_base",
    ),
    "weighting": ("weighting", *slot_fields(WEIGHTING_SLOTS)),
    "adversarial erasure (train against loreun attack's prompts)": tuple(
        f.name for f in dataclasses.fields(AdversarialSettings)
    ),
    "training": (
        "steps",
        "steps_per_concept",
        "batch_size",
        "gradient_accumulation_steps",
        "lr",
        "weight_decay",
        "max_grad_norm",
        "seed",
        "init_from",
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


def config_from_args(args) -> EraseConfig:
    """The config from the parsed flags (a ``--config-file``'s values are their defaults, as for
    every subcommand), then validated."""
    data = {}
    for f in dataclasses.fields(EraseConfig):
        value = getattr(args, f.name)
        if value is not None and (value is not False or f.default is True):
            data[f.name] = value
    for required in ("model", "out"):
        if required not in data:
            raise ValueError(f"--{required}: required")
    if "steps" in data and "steps_per_concept" in data:
        raise ValueError("--steps-per-concept: give it or --steps, not both")
    return EraseConfig.from_dict({**data, **model_settings(data)})


def model_settings(data: dict) -> dict:
    """The built-in model's own settings for what ``data`` (the given flags) leaves unset, said
    in the run's first line."""
    from loreun.pipelines.models import carried_erase_settings

    slot = OBJECTIVE_SLOTS.get(data.get("objective", "esd"))
    if not data.get("model_defaults", True) or (slot is not None and slot.CLOSED_FORM):
        return {}  # a closed-form edit has no steps or learning rate
    given = {**data, "steps": data.get("steps", data.get("steps_per_concept"))}
    carried = carried_erase_settings(data["model"])
    filled = {k: v for k, v in carried.items() if given.get(k) is None}
    if filled and os.environ.get("RANK", "0") == "0":
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in filled.items())
        print(
            f"loreun erase: {data['model']}'s own settings: {flags} (a flag overrides each; "
            "--no-model-defaults uses the library's)",
            file=sys.stderr,
        )
    return filled


def run(args) -> int:
    cfg = config_from_args(args)
    from loreun.erase.concept_losses import never_drawn, summary_lines, too_few_draws
    from loreun.erase.trainer import TrainingDiverged, TrainingInterrupted, erase
    from loreun.pipelines.files import TRAIN_LOG
    from loreun.pipelines.meta import quiet

    main = os.environ.get("RANK", "0") == "0"  # one message, not one per process
    if main and too_few_draws(cfg):
        print(f"loreun erase: warning: {too_few_draws(cfg)}", file=sys.stderr)

    try:
        path = erase(cfg)
    except TrainingInterrupted as e:
        print(f"loreun erase: {e}", file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        print(f"loreun erase: error: {e}", file=sys.stderr)
        return 1
    if main:
        log = Path(cfg.out) / TRAIN_LOG
        for line in [] if quiet() else summary_lines(log, cfg.concepts):
            print(line)
        if never_drawn(log, cfg.concepts):
            print(f"loreun erase: warning: {never_drawn(log, cfg.concepts)}", file=sys.stderr)
        print(f"erased weights: {path}")
    return 0
