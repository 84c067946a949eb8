"""The attack's settings, apart from torch so that ``loreun --help`` stays fast."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class AttackSettings:
    """UnlearnDiffAtk's published setting by default: 5 prefix tokens, 40 steps, Adam at lr 0.01
    with weight decay 0.1. ``rounds`` repeats the steps, generating and judging after each
    round and stopping at the first success (the published code runs up to 50 rounds)."""

    prefix_tokens: int = 5
    steps: int = 40
    lr: float = 0.01
    weight_decay: float = 0.1
    rounds: int = 1

    def __post_init__(self):
        for flag, value in (
            ("--attack-tokens", self.prefix_tokens),
            ("--attack-steps", self.steps),
            ("--attack-rounds", self.rounds),
        ):
            if value < 1:
                raise ValueError(f"{flag}: must be >= 1, got {value}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"--attack-lr: must be > 0 and finite, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(
                f"--attack-weight-decay: must be >= 0 and finite, got {self.weight_decay}"
            )
