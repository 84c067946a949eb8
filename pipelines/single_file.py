"""One ``.safetensors`` in the original Stable Diffusion (LDM) key layout: what AUTOMATIC1111 and
ComfyUI load, and what diffusers reads back with ``from_single_file``.

The mapping from diffusers' names is written once here, from the block arithmetic of the LDM
UNet: input block 0 is ``conv_in``; down block i's resnet (and attention) j is input block
``1 + i (L + 1) + j``, its downsampler input block ``(i + 1)(L + 1)``; up block i's layer j
(of L + 1) is output block ``i (L + 1) + j``, its upsampler the last layer of output block
``i (L + 1) + L``, for ``L = layers_per_block``. Attention blocks keep their inner names. The
VAE's decoder counts its up blocks from the bottom in LDM, and its attention projections are
1x1 convolutions there. The text encoder is SD 1.x's CLIP, under ``cond_stage_model.transformer``.

SD 2.x's OpenCLIP text encoder and SDXL's two encoders use other layouts and are refused by name.
"""

from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

RESNET_UNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
RESNET_VAE = {"conv_shortcut": "nin_shortcut"}
ATTN_VAE = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, table: dict[str, str]) -> str:
    """Replace the leading module name of ``rest`` (``conv1.weight``) through ``table``."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def unet_key(key: str, layers: int, has_attention: list[bool]) -> str:
    """diffusers UNet key -> LDM key (without prefix).

    Args:
        layers: the UNet's ``layers_per_block``.
        has_attention: for each up block, whether it has attentions (the upsampler's index).
    """
    parts = key.split(".")
    fixed = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for old, new in fixed.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    if parts[0] == "down_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.weight
            return f"input_blocks.{(i + 1) * (layers + 1)}.0.op." + ".".join(parts[5:])
        j, rest = int(parts[3]), ".".join(parts[4:])
        block = f"input_blocks.{1 + i * (layers + 1) + j}"
        return _layer(block, kind, rest)
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        index = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, j)]
        return _layer(f"middle_block.{index}", kind, rest, sub=False)
    if parts[0] == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":  # up_blocks.i.upsamplers.0.conv.weight
            sub = 2 if has_attention[i] else 1
            return f"output_blocks.{i * (layers + 1) + layers}.{sub}." + ".".join(parts[4:])
        j, rest = int(parts[3]), ".".join(parts[4:])
        return _layer(f"output_blocks.{i * (layers + 1) + j}", kind, rest)
    raise KeyError(f"no LDM name for UNet key {key!r}")


def _layer(block: str, kind: str, rest: str, sub: bool = True) -> str:
    if kind == "resnets":
        return f"{block}{'.0' if sub else ''}.{_rename(rest, RESNET_UNET)}"
    if kind == "attentions":
        return f"{block}{'.1' if sub else ''}.{rest}"
    raise KeyError(f"no LDM name for {kind!r} in {block}")


def vae_key(key: str, num_up_blocks: int) -> str:
    """diffusers VAE key -> LDM key (without prefix)."""
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return key
    side, rest = parts[0], parts[1:]
    name = ".".join(rest)
    for old, new in (
        ("conv_norm_out", "norm_out"),
        ("conv_in", "conv_in"),
        ("conv_out", "conv_out"),
    ):
        if name.startswith(old + "."):
            return f"{side}.{new}{name[len(old) :]}"
    if rest[0] == "mid_block":
        kind, j, tail = rest[1], int(rest[2]), ".".join(rest[3:])
        if kind == "attentions":
            return f"{side}.mid.attn_1.{_rename(tail, ATTN_VAE)}"
        return f"{side}.mid.block_{j + 1}.{_rename(tail, RESNET_VAE)}"
    if rest[0] in ("down_blocks", "up_blocks"):
        i = int(rest[1])
        level, sample = ("down", "downsample") if side == "encoder" else ("up", "upsample")
        if side == "decoder":
            i = num_up_blocks - 1 - i  # LDM counts the decoder's levels from the bottom
        if rest[2] in ("downsamplers", "upsamplers"):
            return f"{side}.{level}.{i}.{sample}." + ".".join(rest[4:])
        j, tail = int(rest[3]), ".".join(rest[4:])
        return f"{side}.{level}.{i}.block.{j}.{_rename(tail, RESNET_VAE)}"
    raise KeyError(f"no LDM name for VAE key {key!r}")


def text_key(key: str) -> str:
    """CLIP text-encoder key -> LDM key (without prefix): always under ``text_model.``, which
    transformers 5 leaves out of the state dict and earlier versions keep."""
    return key if key.startswith("text_model.") else "text_model." + key


def to_ldm(pipe, unet) -> dict[str, torch.Tensor]:
    """The pipeline's UNet (``unet``, handed over by the family: ``FAMILIES[...].single_file``),
    VAE and text encoder as one LDM-layout state dict (contiguous)."""
    from diffusers import StableDiffusionPipeline

    if type(pipe) is not StableDiffusionPipeline:
        raise ValueError(
            f"single-file export writes SD 1.x layouts; {type(pipe).__name__} is not one"
        )
    if unet.config.use_linear_projection:
        raise ValueError("single-file export writes SD 1.x layouts; this UNet is SD 2.x-shaped")
    out = {}
    layers = unet.config.layers_per_block
    has_attn = ["CrossAttn" in t for t in unet.config.up_block_types]
    for k, v in unet.state_dict().items():
        out[UNET_PREFIX + unet_key(k, layers, has_attn)] = v
    n_up = len(pipe.vae.config.up_block_types)
    for k, v in pipe.vae.state_dict().items():
        ldm = vae_key(k, n_up)
        if ".attn_1." in ldm and ldm.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[VAE_PREFIX + ldm] = v
    for k, v in pipe.text_encoder.state_dict().items():
        out[TEXT_PREFIX + text_key(k)] = v
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}
