"""Parameter presets: which denoiser parameters an erasure trains (each family's table,
``pipelines/family.py``, names its presets).

Following ESD's code, only ``nn.Linear`` and ``nn.Conv2d`` modules are candidates; norms and
embeddings stay frozen. Names are diffusers module names, so the exported keys load in any
diffusers UNet of the same configuration.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from loreun.pipelines.family import FAMILIES

# Every preset name any family offers, for the --method flag's help and checks.
PRESET_NAMES = tuple(dict.fromkeys(n for f in FAMILIES.values() for n in f.presets))


def select_parameters(
    denoiser: nn.Module, method: str, presets: dict[str, Callable[[str], bool]]
) -> dict[str, nn.Parameter]:
    """Return the parameters a preset of the family's ``presets`` trains, keyed by their
    state-dict names.

    Raises:
        ValueError: for an unknown preset, or one that selects nothing in this denoiser.
    """
    if method not in presets:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(presets)}")
    wanted = presets[method]
    selected: dict[str, nn.Parameter] = {}
    for mod_name, module in denoiser.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and wanted(mod_name):
            for p_name, param in module.named_parameters(recurse=False):
                selected[f"{mod_name}.{p_name}"] = param
    if not selected:
        raise ValueError(f"method {method!r} selects no parameters in this model")
    return selected
