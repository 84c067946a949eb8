"""The erase configuration: one dataclass, validated on creation, saved next to the outputs.

``EraseConfig`` composes the run's own fields (``RunFields``) with the settings of every
objective and weighting slot: each slot module (``objective_esd``, ``weighting_loreun``, ...)
owns its settings dataclass, their checks and what it needs, and ``OBJECTIVE_SLOTS`` /
``WEIGHTING_SLOTS`` list them. The fields stay flat, so the flags and the saved JSON are flat.

This module and the slot modules import no torch, so the CLI builds its parser cheaply.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from loreun.pipelines.quantize import QUANTIZED_BASES

from . import (
    adversarial_settings,
    objective_esd,
    objective_ga,
    objective_remap,
    objective_uce,
    weighting_loreun,
    weighting_uniform,
)

# The slots, in the order --help and the choice lists show them; a new objective or weighting
# is its own module plus its line here.
OBJECTIVE_SLOTS = {m.NAME: m for m in (objective_esd, objective_remap, objective_ga, objective_uce)}
WEIGHTING_SLOTS = {m.NAME: m for m in (weighting_uniform, weighting_loreun)}
SLOT_MODULES = (*OBJECTIVE_SLOTS.values(), *WEIGHTING_SLOTS.values())

METHODS = ("esd-x", "esd-x-strict", "esd-u", "esd-all")
TRAIN_PARTS = ("denoiser", "text-encoder", "both")
TEXT_ENCODER_PARTS = ("all", "attn", "mlp")  # erase/text_encoder.py selects each
OBJECTIVES = tuple(OBJECTIVE_SLOTS)
WEIGHTINGS = tuple(WEIGHTING_SLOTS)
XT_SOURCES = ("cached", "trajectory", "partial-train", "partial-base")
MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adafactor", "adamw8bit")  # erase/optim.py builds each
FROZEN_DTYPES = ("fp32", "bf16", "fp16")
# Forget items per concept prompt: enough for a single concept to give LoReUn a set to weigh.
SAMPLES_PER_CONCEPT = 8

MAX_SEED = 2**32 - 1  # as prompt files' seeds; larger ones would alias in the step streams
UPPER_BOUNDS = {
    "steps": 10_000_000,
    "steps_per_concept": 10_000_000,
    "batch_size": 65_536,
    "gradient_accumulation_steps": 65_536,
    "samples_per_concept": 10_000,
    "sample_steps": 1_000,  # a DDPM model's training timesteps
    "trajectory_pool": 10_000,
    "resolution": 8_192,
    "lora_rank": 4_096,  # erase/lora.py also refuses a rank above its modules' own
}


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class RunFields:
    """The run's own fields, apart from the slots' settings. Every field is a flag."""

    model: str = field(
        metadata=_help(
            "base model: a local diffusers folder, a hub id, a single-file .safetensors checkpoint "
            "(with --config), or 'digits' for the built-in model"
        )
    )
    out: str = field(metadata=_help("output folder for weights, config and checkpoints"))
    concepts: list[str] = field(
        default_factory=list,
        metadata=_help("a concept to erase, as a prompt; repeat for several", flag="--concept"),
    )
    concepts_file: str | None = field(
        default=None, metadata=_help("a text file with one concept prompt per line")
    )
    model_config: str | None = field(
        default=None,
        metadata=_help(
            "local diffusers folder with the configs of a single-file checkpoint", flag="--config"
        ),
    )
    method: str = field(
        default="esd-x",
        metadata=_help(
            "which denoiser parameters train: esd-x (cross-attention; on SD3/FLUX the text "
            "stream's attention), esd-x-strict (its keys and values), esd-u (all but those), "
            "esd-all",
            choices=METHODS,
        ),
    )
    train: str = field(
        default="denoiser",
        metadata=_help(
            "what trains: the denoiser (--method's tensors), the CLIP text encoders that read "
            "the prompt (--text-encoder-part; where AdvUnlearn found robustness), or both",
            choices=TRAIN_PARTS,
        ),
    )
    text_encoder_part: str = field(
        default="all",
        metadata=_help(
            "with --train text-encoder or both: which tensors of each CLIP encoder train: all "
            "(every layer, the final norm and projection; token and position embeddings stay), "
            "attn (self-attention), mlp",
            choices=TEXT_ENCODER_PARTS,
        ),
    )
    text_encoder_layers: str | None = field(
        default=None,
        metadata=_help(
            "with --train text-encoder or both: the encoder layers that train, START:END as a "
            "Python slice (default: all)"
        ),
    )
    model_defaults: bool = field(
        default=True,
        metadata=_help(
            "use the settings a built-in model carries (its lr and steps) where no flag or "
            "settings file gives them; --no-model-defaults uses the library's own",
            flag="--no-model-defaults",
        ),
    )
    objective: str = field(
        default="esd",
        metadata=_help(
            "erasure objective: esd (negative guidance), remap (pull forget images towards "
            "--anchor, SalUn-style), ga (bounded gradient ascent on the forget images)",
            choices=OBJECTIVES,
        ),
    )
    forget_images: str | None = field(
        default=None,
        metadata=_help(
            "a folder of images of the concept to forget; captions from --forget-caption, "
            "metadata.jsonl / metadata.csv, or .txt files beside the images"
        ),
    )
    forget_caption: str | None = field(
        default=None, metadata=_help("one caption for every image in --forget-images")
    )
    retain_images: str | None = field(
        default=None,
        metadata=_help("a folder of images to keep (captions as for --forget-images)"),
    )
    retain_caption: str | None = field(
        default=None, metadata=_help("one caption for every image in --retain-images")
    )
    retain_concepts: list[str] = field(
        default_factory=list,
        metadata=_help(
            "a prompt whose base-model samples must be kept; repeat for several",
            flag="--retain-concept",
        ),
    )
    retain_weight: float | None = field(
        default=None,
        metadata=_help(
            "alpha: weight of the denoising loss on retain items (default 1 with a retain set, "
            "else 0)"
        ),
    )
    saliency: float | None = field(
        default=None,
        metadata=_help(
            "train only this fraction of the selected parameters, those with the largest forget "
            "gradient (SalUn uses 0.5)"
        ),
    )
    saliency_mask: str | None = field(
        default=None,
        metadata=_help(
            "reuse a saliency mask saved by an earlier run (its saliency-mask.safetensors)"
        ),
    )
    weighting: str = field(
        default="uniform",
        metadata=_help(
            "per-sample weighting of the forget term; with esd and remap loreun erased less than "
            "uniform on the digits model, so uniform is the default; with ga, loreun's dynamic "
            "variant kept the other digits (docs/results.md, 'When to turn LoReUn on')",
            choices=WEIGHTINGS,
        ),
    )
    xt_source: str = field(
        default="cached",
        metadata=_help(
            "where noisy latents come from: forward-noised cached base samples (cached), "
            "latents of a pool of base-model DDIM trajectories sampled once (trajectory), or "
            "partial DDIM sampling with the model being trained (partial-train) or the frozen base "
            "(partial-base)",
            choices=XT_SOURCES,
        ),
    )
    trajectory_pool: int = field(
        default=16,
        metadata=_help(
            "--xt-source trajectory: full DDIM trajectories sampled per concept prompt; each "
            "step draws one of them and a stop"
        ),
    )
    trajectory_cache_mb: int = field(
        default=2048,
        metadata=_help(
            "--xt-source trajectory: refuse a pool larger than this many MB (it is kept in "
            "memory and in OUT/cache)"
        ),
    )
    samples_per_concept: int = field(
        default=SAMPLES_PER_CONCEPT,
        metadata=_help(
            "base-model samples cached per concept prompt; each (prompt, sample) pair is one "
            "forget item with its own LoReUn difficulty and weight"
        ),
    )
    sample_steps: int = field(
        default=50,
        metadata=_help(
            "sampler steps for forget images and for partial sampling (FLUX.1-schnell: at most "
            "its own 4)"
        ),
    )
    sample_guidance: float = field(
        default=3.0,
        metadata=_help(
            "classifier-free guidance when sampling forget images (FLUX.1-schnell: none)"
        ),
    )
    resolution: int | None = field(
        default=None, metadata=_help("image size for sampling; default: the model's native size")
    )
    steps: int = field(default=200, metadata=_help("optimizer steps"))
    steps_per_concept: int | None = field(
        default=None,
        metadata=_help(
            "instead of --steps: N optimizer steps per --concept prompt, so a list's steps grow "
            "with it (--steps becomes N x the number of concepts; concepts share a run's steps)"
        ),
    )
    batch_size: int = field(default=1, metadata=_help("forget items per step and process"))
    gradient_accumulation_steps: int = field(
        default=1, metadata=_help("micro-batches per optimizer step")
    )
    lr: float = field(default=1e-5, metadata=_help("learning rate"))
    weight_decay: float = field(default=0.0, metadata=_help("decoupled weight decay"))
    max_grad_norm: float | None = field(
        default=None, metadata=_help("clip the gradient norm to this value")
    )
    seed: int = field(default=0, metadata=_help("random seed"))
    mixed_precision: str | None = field(
        default=None,
        metadata=_help(
            "autocast precision; default: accelerate's own setting (accelerate launch "
            "--mixed_precision, accelerate config), else no. The run records the one it used",
            choices=MIXED_PRECISION,
        ),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_help(
            "recompute the denoiser's activations in the backward pass: less memory (SDXL), "
            "more time, the same result"
        ),
    )
    lora_rank: int | None = field(
        default=None,
        metadata=_help(
            "train LoRA adapters of this rank on the preset's modules instead of the full tensors; "
            "also exports pytorch_lora_weights.safetensors and a kohya-format copy"
        ),
    )
    lora_alpha: float | None = field(
        default=None,
        metadata=_help("LoRA's alpha (the update is scaled by alpha / rank); default: the rank"),
    )
    quantize_base: str | None = field(
        default=None,
        metadata=_help(
            "with --lora-rank: load the frozen denoiser quantized (nf4, int8: bitsandbytes, "
            "CUDA; qint4, qint8: optimum-quanto, also CPU); the LoRA serves the unquantized base",
            choices=tuple(QUANTIZED_BASES),
        ),
    )
    optimizer: str = field(
        default="adamw",
        metadata=_help(
            "adamw; adafactor (factored second moment, no momentum: almost no state); adamw8bit "
            "(needs bitsandbytes)",
            choices=OPTIMIZERS,
        ),
    )
    frozen_dtype: str = field(
        default="fp32",
        metadata=_help(
            "dtype of the teacher's frozen copies of the trained tensors (bf16/fp16 halve them)",
            choices=FROZEN_DTYPES,
        ),
    )
    step_in_backward: bool = field(
        default=False,
        metadata=_help(
            "update each tensor during the backward pass and free its gradient at once, so all "
            "gradients never exist together; the same updates, without --max-grad-norm or "
            "gradient accumulation"
        ),
    )
    checkpoint_every: int = field(
        default=100,
        metadata=_help(
            "save a resumable checkpoint every N steps (0: only at the end or on Ctrl-C)"
        ),
    )
    checkpoints_total_limit: int = field(
        default=2, metadata=_help("keep at most this many checkpoints")
    )
    checkpoint_without_optimizer: bool = field(
        default=False,
        metadata=_help(
            "leave the optimizer state out of checkpoints (it is twice the trained tensors); "
            "a resume then restarts the optimizer and no longer continues exactly"
        ),
    )
    init_from: str | None = field(
        default=None,
        metadata=_help(
            "start training from this erased file or run folder (e.g. an --objective uce "
            "edit) instead of the base; the teacher stays the base model"
        ),
    )
    resume: str | None = field(
        default=None, metadata=_help("resume from 'latest' or a checkpoint folder")
    )
    overwrite: bool = field(
        default=False,
        metadata=_help(
            "write into a non-empty output folder (files loreun did not write are kept)"
        ),
    )
    save_pipeline: bool = field(
        default=False,
        metadata=_help("also save a full diffusers pipeline folder under OUT/pipeline"),
    )


@dataclass
class EraseConfig(
    *reversed([m.Settings for m in SLOT_MODULES]),
    adversarial_settings.AdversarialSettings,
    RunFields,
):
    """Everything an erase run needs: the run's fields, adversarial erasure's and every slot's
    settings, flat. Every field is a CLI flag of ``loreun erase``."""

    def __post_init__(self) -> None:
        self._check_types()
        self.concepts = [c.strip() for c in self.concepts]
        self.retain_concepts = [c.strip() for c in self.retain_concepts]
        if self.concepts_file:  # those already listed are not added twice, so a saved config
            # (whose concepts include the file's) reloads to the same config
            self.concepts += [
                c for c in read_concepts_file(self.concepts_file) if c not in self.concepts
            ]
        self._check_choices()
        self._check_forget()
        self._apply_steps_per_concept()
        self._check_objective()
        self._check_retain()
        self._check_numbers()
        for slot in SLOT_MODULES:  # each slot checks its own settings
            chosen = slot.NAME in (self.objective, self.weighting)
            slot.check(self, chosen)
        adversarial_settings.check(self)
        self._check_memory()
        self._check_text_encoder()

    def _check_text_encoder(self) -> None:
        """What text-encoder training cannot combine with yet, refused before the model loads."""
        if self.train == "denoiser":
            for name, value in (
                ("text_encoder_part", self.text_encoder_part != "all"),
                ("text_encoder_layers", self.text_encoder_layers is not None),
            ):
                if value:
                    flag = "--" + name.replace("_", "-")
                    raise ValueError(f"{flag}: only used with --train text-encoder or both")
            return
        parse_layers(self.text_encoder_layers)
        for bad, flag in (
            (self.lora_rank is not None and self.train == "both", "--lora-rank"),
            (self.saliency is not None or self.saliency_mask is not None, "--saliency"),
            (self.step_in_backward, "--step-in-backward"),
            (self.frozen_dtype != "fp32", "--frozen-dtype"),
        ):
            if bad:
                raise ValueError(f"{flag}: not available with --train {self.train} yet")

    def _check_memory(self) -> None:
        """Memory options that cannot combine, refused before the model loads."""
        if self.step_in_backward:
            for bad, why in (
                (self.gradient_accumulation_steps > 1, "--gradient-accumulation-steps above 1"),
                (self.max_grad_norm is not None, "--max-grad-norm (it needs every gradient)"),
                (self.mixed_precision == "fp16", "--mixed-precision fp16 (gradient scaling)"),
            ):
                if bad:
                    raise ValueError(f"--step-in-backward: cannot be combined with {why}")
        masked = self.saliency is not None or self.saliency_mask is not None
        if self.frozen_dtype != "fp32" and masked and self.weight_decay > 0:
            raise ValueError(
                f"--frozen-dtype {self.frozen_dtype}: with a saliency mask and --weight-decay, "
                "untrained weights would be restored from rounded copies; use fp32 or no decay"
            )
        self._check_lora()
        if self.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("--optimizer adamw8bit: needs bitsandbytes (pip install bitsandbytes)")

    def _check_lora(self) -> None:
        if self.lora_rank is None:
            if self.lora_alpha is not None:
                raise ValueError("--lora-alpha: only used with --lora-rank")
            if self.quantize_base is not None:
                raise ValueError(
                    "--quantize-base: full tensors cannot train on a quantized base; add "
                    "--lora-rank (adapters train on top of it)"
                )
            return
        if self.quantize_base is not None:
            self._check_quantize_base()
        if self.init_from is not None:
            raise ValueError("--init-from: starts full tensors; LoRA adapters start at zero")
        if self.lora_rank < 1:
            raise ValueError(f"--lora-rank: must be >= 1, got {self.lora_rank}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"--lora-alpha: must be > 0, got {self.lora_alpha}")
        if self.frozen_dtype != "fp32":
            raise ValueError(
                "--frozen-dtype: LoRA keeps no frozen copies (its teacher is the base)"
            )
        if importlib.util.find_spec("peft") is None:
            raise ValueError("--lora-rank: needs peft (pip install peft)")

    def _check_quantize_base(self) -> None:
        from loreun.pipelines.quantize import check_quantize_base

        if self.train != "denoiser":
            raise ValueError(
                f"--quantize-base: quantizes the denoiser, whose adapters --train {self.train} "
                "does not train; use --train denoiser"
            )
        if self.objective == "uce":
            raise ValueError("--quantize-base: UCE edits full tensors in closed form")
        check_quantize_base(self.quantize_base)

    def _check_forget(self) -> None:
        if self.forget_images is None:
            if self.forget_caption is not None:
                raise ValueError("--forget-caption: only used with --forget-images")
            if not self.concepts:
                raise ValueError(
                    "--concept: give at least one concept (or --concepts-file, or --forget-images)"
                )
        elif self.concepts:
            raise ValueError(
                "--forget-images: give either --concept prompts or a folder of images, not both "
                "(captions for the images come from --forget-caption or the folder)"
            )
        if any(not c for c in self.concepts):
            raise ValueError("--concept: a concept is empty")
        if self.forget_caption is not None and not self.forget_caption.strip():
            raise ValueError("--forget-caption: is empty")

    def _apply_steps_per_concept(self) -> None:
        """--steps-per-concept N sets ``steps`` to N x len(concepts): a run shares its steps
        between its concepts, and three digits at the steps one needed were left half-erased
        (README, "Several concepts"). A saved config reloads to the same steps."""
        n = self.steps_per_concept
        if n is None:
            return
        if self.forget_images is not None:
            raise ValueError(
                "--steps-per-concept: counts --concept prompts; with --forget-images give --steps"
            )
        if self.objective_slot().CLOSED_FORM:
            raise ValueError(f"--steps-per-concept: --objective {self.objective} takes no steps")
        if not n > 0:
            raise ValueError(f"--steps-per-concept: must be > 0, got {n}")
        self.steps = n * len(self.concepts)

    def _check_objective(self) -> None:
        if self.objective in OBJECTIVE_SLOTS and self.xt_source != "cached":
            if self.objective_slot().FORWARD_NOISED_ONLY:
                raise ValueError(
                    f"--xt-source: {self.objective} trains on forward-noised forget images; "
                    "use cached"
                )
        if self.saliency is not None and not 0 < self.saliency <= 1:
            raise ValueError(f"--saliency: must be in (0, 1], got {self.saliency}")
        if self.saliency is not None and self.saliency_mask is not None:
            raise ValueError(
                "--saliency-mask: a saved mask already fixes the fraction; drop --saliency"
            )

    def _check_retain(self) -> None:
        if any(not c for c in self.retain_concepts):
            raise ValueError("--retain-concept: a prompt is empty")
        if self.retain_images is not None and self.retain_concepts:
            raise ValueError("--retain-images: give either a folder or --retain-concept prompts")
        if self.retain_caption is not None and self.retain_images is None:
            raise ValueError("--retain-caption: only used with --retain-images")
        has_retain = self.retain_images is not None or bool(self.retain_concepts)
        if self.retain_weight is None:
            self.retain_weight = 1.0 if has_retain else 0.0
        if not self.retain_weight >= 0:
            raise ValueError(f"--retain-weight: must be >= 0, got {self.retain_weight}")
        if self.retain_weight > 0 and not has_retain:
            raise ValueError(
                f"--retain-weight: {self.retain_weight} needs a retain set "
                "(--retain-images or --retain-concept)"
            )

    def _check_types(self) -> None:
        """Numbers must be numbers: a string from a config file fails here, naming the flag."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), set(typing.get_args(hints[f.name]))
            kind = hints[f.name] if not kinds else (kinds - {type(None)}).pop()
            if value is None or kind not in (int, float):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{flag_name(f)}: expected a number, got {value!r}")
            if kind is int and not isinstance(value, int):
                raise ValueError(f"{flag_name(f)}: expected a whole number, got {value!r}")

    @property
    def reweights(self) -> bool:
        """Whether the forget term is reweighted by difficulty (so items need their x_0)."""
        return WEIGHTING_SLOTS[self.weighting].NEEDS_X0

    def objective_slot(self):
        """The chosen objective's slot module (its settings, checks and ``build``)."""
        return _slot(OBJECTIVE_SLOTS, self.objective, "objective")

    def weighting_slot(self):
        """The chosen weighting's slot module."""
        return _slot(WEIGHTING_SLOTS, self.weighting, "weighting")

    def _check_choices(self) -> None:
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(
                    f"{flag_name(f)}: unknown value {getattr(self, f.name)!r}; "
                    f"choose one of {', '.join(choices)}"
                )

    def _check_numbers(self) -> None:
        positive = (
            "steps",
            "lr",
            "batch_size",
            "gradient_accumulation_steps",
            "samples_per_concept",
            "sample_steps",
            "checkpoints_total_limit",
            "trajectory_pool",
            "trajectory_cache_mb",
        )
        for name in positive:
            value = getattr(self, name)
            if not value > 0 or (isinstance(value, float) and math.isnan(value)):
                raise ValueError(f"--{name.replace('_', '-')}: must be > 0, got {value}")
        self._check_finite()
        self._check_bounds()
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"--max-grad-norm: must be > 0, got {self.max_grad_norm} (a negative norm would "
                "flip every gradient)"
            )
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight-decay: must be >= 0, got {self.weight_decay}")
        if self.checkpoint_every < 0:
            raise ValueError("--checkpoint-every: must be >= 0")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise ValueError(
                f"--resolution: must be a positive multiple of 8, got {self.resolution}"
            )

    def _check_finite(self) -> None:
        """NaN or inf in a setting would run until the loss is NaN and then blame --lr; only a
        field marked ``allow_inf`` takes inf (--temperature: exactly uniform weights)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                if f.metadata.get("allow_inf") and value == math.inf:
                    continue
                raise ValueError(f"{flag_name(f)}: must be a finite number, got {value}")

    def _check_bounds(self) -> None:
        """Upper bounds that no real run reaches, so a typo fails at once instead of after
        hours or gigabytes."""
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed: must be in [0, {MAX_SEED}], got {self.seed}")
        for name, limit in UPPER_BOUNDS.items():
            value = getattr(self, name)
            if value is not None and value > limit:
                raise ValueError(f"--{name.replace('_', '-')}: must be <= {limit}, got {value}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> EraseConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data)


# Settings a resumed run may change: where and how often it saves, and how far it goes.
# Any other change would make the resumed steps differ from the ones already taken.
RESUMABLE_CHANGES = (
    "out",
    "resume",
    "overwrite",
    "steps",
    "steps_per_concept",
    "checkpoint_every",
    "checkpoints_total_limit",
    "checkpoint_without_optimizer",
    "save_pipeline",
)


def parse_layers(text: str | None) -> slice:
    """``--text-encoder-layers`` START:END as a slice (either end may be left out)."""
    if text is None:
        return slice(None)
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, end = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise ValueError(
            f"--text-encoder-layers: {text!r} is not START:END (e.g. 0:6, or :6)"
        ) from None
    return slice(start, end)


def changed_settings(saved: dict, cfg: EraseConfig) -> list[str]:
    """Flags whose value differs between a checkpoint's saved config and ``cfg``."""
    now = dataclasses.asdict(cfg)
    return [
        flag_name(f)
        for f in dataclasses.fields(cfg)
        if f.name not in RESUMABLE_CHANGES and f.name in saved and saved[f.name] != now[f.name]
    ]


def _slot(slots: dict, name: str, kind: str):
    if name not in slots:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {', '.join(slots)}")
    return slots[name]


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def read_concepts_file(path: str) -> list[str]:
    """One concept per non-empty line; lines starting with '#' are comments. A prompt file
    (.csv, .tsv, .jsonl) gives its rows' prompts, so its header is never erased as a concept."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--concepts-file: {path}: no such file")
    if p.suffix.lower() in (".csv", ".tsv", ".jsonl"):
        from loreun.prompts.reader import load_prompts

        try:
            prompts = [row.prompt.strip() for row in load_prompts(p)]
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"--concepts-file: {e}") from None
        return list(dict.fromkeys(c for c in prompts if c)) or _no_concepts(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"--concepts-file: {path}: not UTF-8 text (byte {e.start})") from None
    lines = [ln.strip() for ln in text.splitlines()]
    concepts = [ln for ln in lines if ln and not ln.startswith("#")]
    return concepts or _no_concepts(path)


def _no_concepts(path: str):
    raise ValueError(f"--concepts-file: {path}: holds no concepts")
