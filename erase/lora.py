"""LoRA erasure: low-rank adapters on exactly the preset's modules, through peft.

This is how diffusers' own LoRA training scripts add adapters (``unet.add_adapter``), so the
adapters save and load with diffusers' LoRA API. What changes against full training:

* the trained tensors are the adapters' ``lora_A`` / ``lora_B`` (a few MB instead of the
  preset's GB), and the objectives, weightings, saliency masks and checkpoints see only them;
* the teacher is the same UNet with its adapters switched off, so no frozen copy is needed.

The export writes three forms of one erasure: ``erased.safetensors`` with the preset's
tensors merged (base + B A, what ``loreun generate --erased`` loads), diffusers'
``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights``, and a kohya-format copy for
AUTOMATIC1111 and ComfyUI. ``lora_alpha / rank`` is folded into ``lora_B`` in the LoRA files,
so every loader, whatever scale it assumes for a missing alpha, applies the trained update.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from loreun.pipelines.family import Family
from loreun.pipelines.files import LORA_FILE  # noqa: F401  (re-exported: erase's name for it)

ADAPTER = "default"
KOHYA_FILE = "lora-kohya.safetensors"


def preset_modules(preset: dict[str, torch.nn.Parameter]) -> list[str]:
    """Names of the modules whose tensors the preset trains (each owns weight and maybe bias)."""
    return sorted({name.rsplit(".", 1)[0] for name in preset})


def add_lora(
    unet: torch.nn.Module, preset: dict, rank: int, alpha: float, seed: int
) -> dict[str, torch.nn.Parameter]:
    """Add adapters of ``rank`` to the modules of ``preset`` (``select_parameters``' result);
    returns name -> adapter parameter.

    ``lora_B`` starts at zero, so the adapted model starts as the base; ``lora_A`` is drawn from
    ``seed`` so that two runs with the same settings start alike.
    """
    from peft import LoraConfig

    modules = preset_modules(preset)
    check_rank(unet, modules, rank)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=modules
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=ADAPTER)
    trained = {n: p for n, p in unet.named_parameters() if ".lora_" in n}
    for p in trained.values():
        p.requires_grad_(True)
    return trained


def check_rank(unet: torch.nn.Module, modules: list[str], rank: int) -> None:
    """Refuse a rank above every module's full rank: the adapters would be larger than the
    weights they adapt, and the files many times the erasure's size."""
    weights = [unet.get_submodule(m).weight for m in modules]
    full = max(min(w.shape[0], w[0].numel()) for w in weights)
    if rank > full:
        raise ValueError(
            f"--lora-rank: {rank} is above the full rank of every module it adapts (at most "
            f"{full}); train the full tensors instead (no --lora-rank), or a rank of {full} or less"
        )


def merged_tensors(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapted modules' tensors with each adapter's update added: name -> base + B A (scaled).

    Names are the plain UNet's state-dict names, so the result is an ordinary erased file. A
    quantized base's weights are read from its checkpoint (``quantize.original_tensors``): the
    file must merge onto the unquantized model, free of quantization error.
    """
    from peft.tuners.lora import LoraLayer

    from loreun.pipelines.quantize import is_quantized, original_tensors

    layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    held = [f"{n}.weight" for n, m in layers.items() if is_quantized(m.get_base_layer().weight)]
    originals = original_tensors(unet, held) if held else {}
    out = {}
    for name, module in layers.items():
        base = module.get_base_layer()
        with torch.no_grad():
            weight = originals.get(f"{name}.weight", base.weight)
            delta = module.get_delta_weight(ADAPTER)
            out[f"{name}.weight"] = weight.to(delta) + delta
            if base.bias is not None:
                out[f"{name}.bias"] = base.bias.detach().clone()
    return out


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft-format adapter tensors, with ``alpha / rank`` folded into each ``lora_B``."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    config = unet.peft_config[ADAPTER]
    scale = config.lora_alpha / config.r
    return {
        k: (v * scale if ".lora_B." in k else v).detach().float().cpu().contiguous()
        for k, v in state.items()
    }


def save_lora_files(
    unet: torch.nn.Module, out: Path, pipeline_class, family: Family, prediction_type: str
) -> list[Path]:
    """Write diffusers' LoRA file and, for the families kohya names (SD 1.x, 2.x, SDXL), a
    kohya-format copy into ``out``; returns their paths. ComfyUI reads diffusers' own
    ``transformer.`` keys for FLUX and SD3 LoRAs, so those get no second file.

    Both are written in a new temporary folder and renamed into ``out``, so neither a crash nor
    a symlink planted at their names can leave a half file or redirect the write.
    """
    import shutil

    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya

    from loreun.pipelines.files import atomic_save_safetensors, refuse_link, temp_dir

    names = [LORA_FILE] + ([KOHYA_FILE] if family.kohya_version else [])
    finals = [refuse_link(out / name) for name in names]
    state = lora_state_dict(unet)
    tmp = temp_dir(finals[0])
    try:
        pipeline_class.save_lora_weights(
            save_directory=str(tmp),
            **{family.lora_layers: convert_state_dict_to_diffusers(state)},
            weight_name=LORA_FILE,
            safe_serialization=True,
        )
        if family.kohya_version:
            prefixed = {f"{family.lora_prefix}.{k}": v for k, v in state.items()}
            kohya = convert_state_dict_to_kohya(prefixed)
            meta = kohya_metadata(family.kohya_version(unet), unet, prediction_type)
            atomic_save_safetensors(tmp / KOHYA_FILE, kohya, metadata=meta)
        for final in finals:
            os.replace(tmp / final.name, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return finals


# kohya's names for the base model versions; AUTOMATIC1111 and ComfyUI managers read them to
# tell SD 1.x, SD 2.x and SDXL LoRAs apart (without them an SDXL LoRA is listed as SD 1).
KOHYA_VERSIONS = {
    "sd_v1": "stable-diffusion-v1/lora",
    "sd_v2": "stable-diffusion-v2/lora",
    "sdxl_base_v1-0": "stable-diffusion-xl-v1-base/lora",
}


def kohya_metadata(version: str, unet: torch.nn.Module, prediction_type: str) -> dict:
    """The ``ss_*`` and ``modelspec.*`` header fields kohya's trainer writes, as strings.

    ``version`` is kohya's base model version, which the family gives. The rank is also the
    network alpha: ``lora_state_dict`` folds ``alpha / rank`` into ``lora_B``, and the
    ``.alpha`` tensors diffusers writes equal the rank (scale 1).
    """
    config = unet.peft_config[ADAPTER]
    return {
        "ss_network_module": "networks.lora",
        "ss_base_model_version": version,
        "ss_v2": str(version == "sd_v2"),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_network_dim": str(config.r),
        "ss_network_alpha": str(config.r),
        "modelspec.architecture": KOHYA_VERSIONS[version],
        "modelspec.sai_model_spec": "1.0.0",
    }
