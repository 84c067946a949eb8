"""Flag groups shared by the generate, audit and evaluate subcommands."""

from __future__ import annotations

from loreun.eval.audit import AuditSettings
from loreun.pipelines.generate_settings import GenerateSettings

from ._dataclass_flags import add_settings_flags, settings_from_args

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


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


# Generate's flags: the prompt file, then GenerateSettings' fields; a command that makes one
# image per row at a time (the attack) takes neither of the batching two, nor a quantized base
# (it copies full erased tensors into the denoiser).
GENERATE_FIELDS = ("steps", "guidance", "size", "force_size", "scheduler", "seed")
BATCHING_FIELDS = ("samples_per_prompt", "batch_size", "quantize_base")
# The detector that judges an image, without the report and set-metric flags (the attack's).
JUDGE_FIELDS = ("detectors", "classifier", "erased_classes", "nudity_threshold", "blur")


def add_generate_flags(p, batching: bool = True) -> None:
    """The prompt file and ``GenerateSettings``' flags."""
    p.add_argument(
        "--prompts",
        required=True,
        help="prompt file (.csv/.tsv/.jsonl/.txt) or bundled set: nudity, "
        "imagenette, neutral, digits",
    )
    add_settings_flags(p, GenerateSettings, _generate_fields(batching))


def _generate_fields(batching: bool) -> tuple[str, ...]:
    return GENERATE_FIELDS + (BATCHING_FIELDS if batching else ())


def add_audit_flags(p, judge_only: bool = False) -> None:
    """``AuditSettings``' flags; ``judge_only`` keeps those of the one detector that judges an
    image (the attack's), without the report and set-metric flags."""
    add_settings_flags(p, AuditSettings, JUDGE_FIELDS if judge_only else None)
    if not judge_only:
        p.add_argument("--overwrite", action="store_true", help="replace an earlier audit in --out")


def generate_settings(args) -> GenerateSettings:
    return settings_from_args(args, GenerateSettings, _generate_fields(hasattr(args, "batch_size")))


def audit_settings(args) -> AuditSettings:
    return settings_from_args(
        args, AuditSettings, None if hasattr(args, "grid_limit") else JUDGE_FIELDS
    )


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])
