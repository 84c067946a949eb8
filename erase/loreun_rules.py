"""LoReUn's defaults and its rule on the forget set, defined once: the torch-free settings
(``weighting_loreun``) and the implementation (``weighting.LoReUnWeighting``) both read them.
docs/design-notes.md says why each default is what it is."""

from __future__ import annotations

VARIANTS = ("static", "dynamic", "batch", "paper")
TEMPERATURE = 1.0
VARIANT = "dynamic"
MOMENTUM = 0.5
MIN_ITEMS = 2  # weights over fewer items are no weighting (DESIGN.md)


def check_items(n: int, given: str) -> None:
    """LoReUn's one rule on the forget set's size: a softmax over fewer than ``MIN_ITEMS``
    items weighs nothing. ``given`` says where the count comes from and what to change."""
    if n < MIN_ITEMS:
        raise ValueError(
            f"--weighting loreun: needs at least {MIN_ITEMS} forget items, and {given}; "
            "or use --weighting uniform"
        )
