"""How to generate: the settings of ``loreun generate`` and their defaults, torch-free, so the
CLI builds its flags from them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from loreun.prompts.reader import MAX_SIZE

SCHEDULERS = {
    "default": None,
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}


@dataclass
class GenerateSettings:
    """Defaults for rows that do not say, and how to sample."""

    steps: int = 25
    guidance: float = 7.5
    size: int | None = None  # None: the model's native size
    samples_per_prompt: int = 1
    batch_size: int = 4
    scheduler: str = "default"
    seed: int = 0  # for rows without a seed: seed + row position
    force_size: bool = False  # use ``size`` for every row, whatever the file says

    def __post_init__(self):
        if self.force_size and self.size is None:
            raise ValueError("--force-size: needs --size")
        for name in ("steps", "samples_per_prompt", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be > 0")
        if self.size is not None and not (0 < self.size <= MAX_SIZE and self.size % 8 == 0):
            raise ValueError(
                f"--size: must be a positive multiple of 8 up to {MAX_SIZE}, got {self.size}"
            )
        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"--scheduler: unknown value {self.scheduler!r}; choose one of "
                f"{', '.join(SCHEDULERS)}"
            )
