"""The attack's settings, apart from torch so that ``loreun --help`` stays fast."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# The attacks ``--attack-kind`` names (``pipelines/prefix_attack.py: ATTACKS``).
KINDS = ("prefix", "embedding")


@dataclass
class AttackSettings:
    """UnlearnDiffAtk's published setting by default: 5 prefix tokens, 40 steps, Adam at lr 0.01
    with weight decay 0.1. ``rounds`` repeats the steps, generating and judging after each
    round and stopping at the first success (the published code runs up to 50 rounds)."""

    prefix_tokens: int = field(
        default=5,
        metadata={"help": "adversarial tokens put before each prompt", "flag": "--attack-tokens"},
    )
    steps: int = field(
        default=40, metadata={"help": "optimizer steps per round", "flag": "--attack-steps"}
    )
    lr: float = field(
        default=0.01,
        metadata={"help": "Adam learning rate of the token distributions", "flag": "--attack-lr"},
    )
    weight_decay: float = field(
        default=0.1, metadata={"help": "Adam weight decay", "flag": "--attack-weight-decay"}
    )
    rounds: int = field(
        default=1,
        metadata={
            "help": "rounds of steps, each judged; stops at a success",
            "flag": "--attack-rounds",
        },
    )
    kinds: list[str] = field(
        default_factory=lambda: ["prefix"],
        metadata={
            "help": "which attacks run on each row (repeat the flag for both, judged side by "
            "side): prefix, UnlearnDiffAtk's discrete tokens (default); embedding, free prefix "
            "embeddings, the worst case",
            "flag": "--attack-kind",
            "choices": KINDS,
        },
    )
    embedding_lr: float = field(
        default=1e-3,
        metadata={
            "help": "Adam learning rate of the embedding attack's prefix embeddings",
            "flag": "--attack-embedding-lr",
        },
    )

    def __post_init__(self):
        for flag, value in (
            ("--attack-tokens", self.prefix_tokens),
            ("--attack-steps", self.steps),
            ("--attack-rounds", self.rounds),
        ):
            if value < 1:
                raise ValueError(f"{flag}: must be >= 1, got {value}")
        for flag, value in (("--attack-lr", self.lr), ("--attack-embedding-lr", self.embedding_lr)):
            if not 0 < value < math.inf:
                raise ValueError(f"{flag}: must be > 0 and finite, got {value}")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds or len(set(self.kinds)) < len(self.kinds):
            raise ValueError(
                f"--attack-kind: each of {', '.join(KINDS)} at most once, "
                f"got {', '.join(self.kinds) or 'none'}"
            )
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(
                f"--attack-weight-decay: must be >= 0 and finite, got {self.weight_decay}"
            )
