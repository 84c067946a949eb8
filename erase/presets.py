"""Parameter presets: which UNet parameters an erasure trains.

Following ESD's code, only ``nn.Linear`` and ``nn.Conv2d`` modules are candidates; norms and
embeddings stay frozen. Names are diffusers module names, so the exported keys load in any
diffusers UNet of the same configuration.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn


def _in_cross_attn(name: str) -> bool:
    return ".attn2." in f".{name}."


def _cross_attn_kv(name: str) -> bool:
    return _in_cross_attn(name) and (name.endswith("attn2.to_k") or name.endswith("attn2.to_v"))


PRESETS: dict[str, Callable[[str], bool]] = {
    "esd-x": _in_cross_attn,
    "esd-x-strict": _cross_attn_kv,
    "esd-u": lambda name: not _in_cross_attn(name),
    "esd-all": lambda name: True,
}


def select_parameters(unet: nn.Module, method: str) -> dict[str, nn.Parameter]:
    """Return the parameters a preset trains, keyed by their state-dict names.

    Raises:
        ValueError: for an unknown preset, or one that selects nothing in this UNet.
    """
    if method not in PRESETS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(PRESETS)}")
    wanted = PRESETS[method]
    selected: dict[str, nn.Parameter] = {}
    for mod_name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and wanted(mod_name):
            for p_name, param in module.named_parameters(recurse=False):
                selected[f"{mod_name}.{p_name}"] = param
    if not selected:
        raise ValueError(f"method {method!r} selects no parameters in this UNet")
    return selected
