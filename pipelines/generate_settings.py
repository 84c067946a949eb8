"""How to generate: the settings of ``loreun generate`` and their defaults, torch-free, so the
CLI builds its flags from them without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loreun.prompts.reader import MAX_SIZE

from .quantize import QUANTIZED_BASES

SCHEDULERS = {
    "default": None,
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}


# Bounds no real run reaches, so a typo fails at once instead of never starting: a billion
# samples per prompt planned a billion jobs first; schedulers train on 1000 timesteps.
UPPER_BOUNDS = {"steps": 1_000, "samples_per_prompt": 10_000, "batch_size": 4_096}


@dataclass
class GenerateSettings:
    """Defaults for rows that do not say, and how to sample."""

    steps: int = field(default=25, metadata={"help": "denoising steps"})
    guidance: float = field(default=7.5, metadata={"help": "guidance for rows that give none"})
    size: int | None = field(
        default=None,
        metadata={"help": "image size for rows that give none (default: the model's native size)"},
    )
    samples_per_prompt: int = field(
        default=1, metadata={"help": "images per row, seeded seed, seed+1, ..."}
    )
    batch_size: int = field(default=4, metadata={"help": "images per pipeline call"})
    scheduler: str = field(
        default="default",
        metadata={
            "help": "the sampler; default keeps the pipeline's own",
            "choices": tuple(SCHEDULERS),
        },
    )
    quantize_base: str | None = field(
        default=None,
        metadata={
            "help": "load the denoiser quantized (nf4, int8: bitsandbytes, CUDA; qint4, qint8: "
            "optimum-quanto) and apply a LoRA erasure's adapters to it, to see how far a "
            "quantized base's images differ from the unquantized one's",
            "choices": tuple(QUANTIZED_BASES),
        },
    )
    seed: int = field(  # for rows without a seed: seed + row position
        default=0, metadata={"help": "seed for rows that give none (seed + the row's position)"}
    )
    force_size: bool = field(
        default=False,
        metadata={"help": "use --size for every row, overriding the sizes the prompt file gives"},
    )

    def __post_init__(self):
        if self.force_size and self.size is None:
            raise ValueError("--force-size: needs --size")
        for name, limit in UPPER_BOUNDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"--{name.replace('_', '-')}: expected a whole number, got {value!r}"
                )
            if not 0 < value <= limit:
                raise ValueError(f"--{name.replace('_', '-')}: must be in 1..{limit}, got {value}")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)):
            raise ValueError(f"--guidance: expected a number, got {self.guidance!r}")
        if not math.isfinite(self.guidance):
            raise ValueError(f"--guidance: must be a finite number, got {self.guidance}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed: must be in [0, 2^32-1], got {self.seed}")
        if self.size is not None and not (0 < self.size <= MAX_SIZE and self.size % 8 == 0):
            raise ValueError(
                f"--size: must be a positive multiple of 8 up to {MAX_SIZE}, got {self.size}"
            )
        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"--scheduler: unknown value {self.scheduler!r}; choose one of "
                f"{', '.join(SCHEDULERS)}"
            )
