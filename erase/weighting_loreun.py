"""The ``loreun`` weighting's settings, checks and construction (arXiv 2507.22499; our reading
is in ``weighting.py``, which holds ``LoReUnWeighting``).

A slot module: ``EraseConfig`` composes ``LoReUnSettings`` into its flags without importing
torch, and this is the one module outside ``weighting.py`` that reads the LoReUn settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# the settings' defaults, and the slot's check_items, are LoReUn's one set of rules
from .loreun_rules import MOMENTUM, TEMPERATURE, VARIANT, VARIANTS, check_items  # noqa: F401

NAME = "loreun"
NEEDS_X0 = True  # difficulty is the denoising error of each item's own clean latent

DIFFICULTY_NORMS = ("timestep", "none")
# Split-half reliability of the probed difficulty below which its memory is treated as noise:
# the digits forget set measured 0.78-0.85 at 10 probe times and about 0 for single draws
# (docs/results.md), so 0.5 sits between.
MIN_RELIABILITY = 0.5
# The memory variants' weights at a tau fixed on the fill fell to an ESS of 0.3% of the forget
# set on the classification testbed (one item at weight 142.7); a floor keeps them soft.
MIN_ESS = 0.1
MAX_PROBE_TIMES = 1_000  # a DDPM model's training timesteps


@dataclass
class LoReUnSettings:
    loreun_variant: str = field(
        default=VARIANT,
        metadata={
            "help": "difficulty from a memory filled under the original weights (static), that "
            "memory updated under the current weights (dynamic), the current batch's own losses "
            "(batch; needs --batch-size >= 2), or our reading of the paper's form: the batch's "
            "raw losses under the current model at a fixed --temperature (paper)",
            "choices": VARIANTS,
        },
    )
    temperature: float = field(
        default=TEMPERATURE,
        metadata={
            "help": "LoReUn softmax temperature tau; inf gives uniform weights",
            "allow_inf": True,
        },
    )
    target_ess: float | None = field(
        default=None,
        metadata={
            "help": "choose tau instead: the one at which the weights of the filled difficulty "
            "memory have this effective sample size, as a fraction of the forget items (e.g. "
            "0.8); overrides --temperature, and the chosen tau is recorded in the erased file"
        },
    )
    loreun_momentum: float = field(
        default=MOMENTUM,
        metadata={
            "help": "dynamic: the share of an item's remembered difficulty kept at each visit; "
            "after P visits the initial fill keeps momentum**P of it"
        },
    )
    difficulty_norm: str = field(
        default="timestep",
        metadata={
            "help": "divide difficulty by the running mean loss at its timestep, removing the "
            "timestep confound (timestep), or use it raw (none)",
            "choices": DIFFICULTY_NORMS,
        },
    )
    probe_times: int = field(
        default=10,
        metadata={
            "help": "LoReUn: the shared times (each with its own noise) every forget item is "
            "probed at before training; its difficulty is the mean, whose split-half "
            "reliability is logged"
        },
    )
    min_reliability: float = field(
        default=MIN_RELIABILITY,
        metadata={
            "help": "LoReUn's static and dynamic variants: below this split-half reliability "
            "the difficulty memory is mostly noise, and the run warns and weighs uniformly "
            "(-1 keeps LoReUn's weights whatever it is)"
        },
    )
    reprobe_every: int = field(
        default=0,
        metadata={
            "help": "dynamic: every N steps, probe every forget item again on the probe grid "
            "under the current weights and replace the memory, instead of folding in each "
            "step's single draws, which are mostly noise (0: single draws)"
        },
    )
    min_ess: float = field(
        default=MIN_ESS,
        metadata={
            "help": "LoReUn's static and dynamic variants: the weights never concentrate on "
            "fewer than this fraction of the forget items (effective sample size); tau rises "
            "to keep it"
        },
    )


Settings = LoReUnSettings


def check(cfg, chosen: bool) -> None:
    """Ranges always (a saved config must reload whatever the weighting); the rest only when
    LoReUn weighs the run."""
    _check_ranges(cfg)
    if not chosen:
        return
    if cfg.reprobe_every and cfg.loreun_variant != "dynamic":
        raise ValueError(
            f"--reprobe-every: re-probes the dynamic variant's memory; --loreun-variant is "
            f"{cfg.loreun_variant}"
        )
    if cfg.loreun_variant == "paper" and cfg.target_ess is not None:
        raise ValueError("--target-ess: the paper variant keeps tau fixed; set --temperature")
    if cfg.loreun_variant in ("batch", "paper") and cfg.batch_size < 2:
        raise ValueError(
            f"--loreun-variant {cfg.loreun_variant}: a softmax over one item is a no-op; "
            "use --batch-size 2 or more, or the dynamic variant"
        )
    items = len(cfg.concepts) * cfg.samples_per_concept
    if cfg.forget_images is None:
        given = f"{len(cfg.concepts)} concept x {cfg.samples_per_concept} sample gives {items}"
        check_items(items, f"{given}; raise --samples-per-concept")


def _check_ranges(cfg) -> None:
    if not cfg.temperature > 0:  # NaN fails too
        raise ValueError(f"--temperature: must be > 0, got {cfg.temperature}")
    if cfg.target_ess is not None and not 0 < cfg.target_ess <= 1:
        raise ValueError(f"--target-ess: must be in (0, 1], got {cfg.target_ess}")
    if not 2 <= cfg.probe_times <= MAX_PROBE_TIMES:
        raise ValueError(
            f"--probe-times: needs 2 to {MAX_PROBE_TIMES} (2 for a split half), "
            f"got {cfg.probe_times}"
        )
    if not 0 <= cfg.min_ess <= 1:
        raise ValueError(f"--min-ess: must be in [0, 1], got {cfg.min_ess}")
    if not -1 <= cfg.min_reliability <= 1:
        raise ValueError(f"--min-reliability: must be in [-1, 1], got {cfg.min_reliability}")
    if cfg.reprobe_every < 0:
        raise ValueError(f"--reprobe-every: must be >= 0, got {cfg.reprobe_every}")
    if not 0 <= cfg.loreun_momentum < 1:
        raise ValueError(f"--loreun-momentum: must be in [0, 1), got {cfg.loreun_momentum}")


def can_differ(cfg) -> bool:
    """Whether LoReUn's weights can differ from 1: not at tau = inf without a target ESS."""
    return cfg.target_ess is not None or not math.isinf(cfg.temperature)


def _weighting(cfg, n: int, schedule, **variant):
    """``LoReUnWeighting`` over ``n`` items with the run's tau, normalisation and buckets;
    ``variant`` sets what differs between the forget set's and the pool's."""
    from .weighting import LoReUnWeighting

    return LoReUnWeighting(
        n,
        temperature=cfg.temperature,
        normalize=cfg.difficulty_norm == "timestep",
        bucket=schedule.bucket,
        target_ess=cfg.target_ess,
        **variant,
    )


def build(cfg, num_items: int, schedule):
    """LoReUn over ``num_items`` forget items, as the run's settings say."""
    return _weighting(
        cfg,
        num_items,
        schedule,
        variant=cfg.loreun_variant,
        momentum=cfg.loreun_momentum,
        min_reliability=cfg.min_reliability,
        min_ess=cfg.min_ess,
        reprobe_every=cfg.reprobe_every,
        probe_times=cfg.probe_times,
    )


def check_pool(cfg) -> None:
    """What LoReUn's batch form needs of ``--adversarial``'s pool batches."""
    if cfg.adversarial_batch < 2:
        raise ValueError(
            "--adversarial-batch: LoReUn weighs the pool's prompts within each batch; use 2 or more"
        )
    if cfg.xt_source != "cached":
        raise ValueError(
            "--adversarial with --weighting loreun: the pool's difficulty is its denoising error, "
            "known for forward-noised items only; use --xt-source cached"
        )


def build_pool(cfg, capacity: int, schedule):
    """The weighting over ``--adversarial``'s pool of ``capacity`` prompts: LoReUn's batch
    form (each pool batch weighed by its own current losses), since the pool changes every few
    steps and a memory filled once would be stale (our choice)."""
    return _weighting(cfg, capacity, schedule, variant="batch")
