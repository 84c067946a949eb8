"""The ``uce`` objective: UCE's closed-form edit (Gandikota et al., WACV 2024), no training.

A slot module like the others (its settings, their checks), but closed-form: ``erase`` solves
for the edited weights once (``erase/uce.py``) instead of running the training loop, so there is
no per-sample loss to build. No torch at load (``objectives.py`` says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

NAME = "uce"
FORWARD_NOISED_ONLY = False
CLOSED_FORM = True  # erase solves, it does not train


@dataclass
class UceSettings:
    uce_guide: str = field(
        default="",
        metadata={
            "help": "uce: the prompt each erased concept is mapped to (default: the empty "
            "prompt, UCE's 'uncond')"
        },
    )
    uce_erase_scale: float = field(
        default=1.0, metadata={"help": "uce: the weight of the erased concepts' terms"}
    )
    uce_preserve_scale: float = field(
        default=1.0,
        metadata={"help": "uce: the weight of the kept prompts' terms (--retain-concept)"},
    )
    uce_lambda: float = field(
        default=0.5,
        metadata={"help": "uce: how strongly the edit stays near the original weights"},
    )


Settings = UceSettings

# What a closed-form edit has no use for: the flag and whether it was given.
UNUSED = {
    "--forget-images": lambda cfg: cfg.forget_images is not None,
    "--retain-images": lambda cfg: cfg.retain_images is not None,
    "--adversarial": lambda cfg: cfg.adversarial,
    "--train": lambda cfg: cfg.train != "denoiser",
    "--saliency": lambda cfg: cfg.saliency is not None or cfg.saliency_mask is not None,
    "--resume": lambda cfg: cfg.resume is not None,
    "--init-from": lambda cfg: cfg.init_from is not None,
}


def check(cfg, chosen: bool) -> None:
    """Refuse what cannot work, before the model loads. ``cfg`` is the whole EraseConfig."""
    defaults = UceSettings()
    if not chosen:
        for name in ("uce_guide", "uce_erase_scale", "uce_preserve_scale", "uce_lambda"):
            if getattr(cfg, name) != getattr(defaults, name):
                raise ValueError(f"--{name.replace('_', '-')}: only used by --objective uce")
        return
    for flag, used in UNUSED.items():
        if used(cfg):
            raise ValueError(f"{flag}: not used by --objective uce (a closed-form edit)")
    if not cfg.uce_lambda > 0:
        raise ValueError(f"--uce-lambda: must be > 0, got {cfg.uce_lambda}")
    for name in ("uce_erase_scale", "uce_preserve_scale"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(cfg, name)}")
    if cfg.uce_guide.strip() in cfg.concepts:
        raise ValueError("--uce-guide: must differ from the concepts being erased")


def check_captions(cfg, captions: list[str]) -> None:
    pass


def anchor_prompt(cfg) -> str | None:
    return None


def build(cfg):
    raise ValueError("--objective uce: is a closed-form edit, solved by erase/uce.py, not a loss")
