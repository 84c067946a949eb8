"""The ``uniform`` weighting: every forget item weighs 1. A slot module (``weighting.py``
holds the contract); no settings, no torch at load."""

from __future__ import annotations

from dataclasses import dataclass

NAME = "uniform"
NEEDS_X0 = False  # weights need no item's clean latent


@dataclass
class UniformSettings:
    """No settings: the slot has none to add to ``EraseConfig``."""


Settings = UniformSettings


def check(cfg, chosen: bool) -> None:
    pass


def can_differ(cfg) -> bool:
    """Whether the weights can ever differ from 1 (no difficulty probe is needed if not)."""
    return False


def build(cfg, num_items: int, schedule):
    from .weighting import UniformWeighting

    return UniformWeighting()


def check_pool(cfg) -> None:
    """Uniform weights need nothing of ``--adversarial``'s pool batches."""


def build_pool(cfg, capacity: int, schedule):
    """The weighting over ``--adversarial``'s pool: uniform too."""
    from .weighting import UniformWeighting

    return UniformWeighting()


def check_items(n: int, given: str) -> None:
    """Uniform weights take a forget set of any size."""
