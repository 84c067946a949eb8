"""The settings of adversarial erasure (``--adversarial``), torch-free so that ``EraseConfig``
composes them into its flags like a slot's (``adversarial.py`` holds the method)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Bounds no real run needs, so a typo fails at once.
MAX_POOL = 10_000
MAX_ATTACK_STEPS = 10_000


@dataclass
class AdversarialSettings:
    adversarial: bool = field(
        default=False,
        metadata={
            "help": "adversarial erasure: every --adversarial-every steps, attack the model being "
            "erased with loreun attack's prefix tokens on a forget prompt, add the prompt found "
            "to a pool, and erase the pool's prompts too"
        },
    )
    adversarial_every: int = field(
        default=25, metadata={"help": "steps between two attacks (the first is at this step)"}
    )
    adversarial_pool: int = field(
        default=16,
        metadata={"help": "prompts the pool keeps; a new one replaces the oldest when it is full"},
    )
    adversarial_batch: int = field(
        default=4, metadata={"help": "pool prompts erased at every step, beside --batch-size"}
    )
    adversarial_steps: int = field(
        default=40, metadata={"help": "optimizer steps of each attack (loreun attack's default)"}
    )
    adversarial_tokens: int = field(
        default=5, metadata={"help": "prefix tokens of each attack (loreun attack's default)"}
    )
    adversarial_attack: str = field(
        default="prefix",
        metadata={
            "help": "the attack in the loop: prefix (loreun attack's discrete tokens) or "
            "embedding (free prefix embeddings, warm-started from the last one found; "
            "AdvUnlearn's kind)",
            "choices": ("prefix", "embedding"),
        },
    )


def check(cfg) -> None:
    """Refuse what cannot work before the model loads; ``cfg`` is the whole EraseConfig."""
    for name, low, high in (
        ("adversarial_every", 1, None),
        ("adversarial_pool", 1, MAX_POOL),
        ("adversarial_batch", 1, MAX_POOL),
        ("adversarial_steps", 1, MAX_ATTACK_STEPS),
        ("adversarial_tokens", 1, 64),
    ):
        value = getattr(cfg, name)
        if value < low or (high is not None and value > high):
            bound = f"in {low}..{high}" if high else f">= {low}"
            raise ValueError(f"--{name.replace('_', '-')}: must be {bound}, got {value}")
    if not cfg.adversarial:
        return
    if cfg.forget_images is not None:
        raise ValueError(
            "--adversarial: attacks concept prompts; give --concept prompts, not --forget-images"
        )
    cfg.weighting_slot().check_pool(cfg)  # what the weighting needs of the pool
