"""How many parameters each preset trains on SD 1.x, SD 2.x and SDXL, and the memory of training
them with loreun's default recipe (fp32 AdamW), computed from the UNet architectures.

The UNets are built on PyTorch's meta device from their published architecture settings, so
nothing is downloaded or allocated. Memory per trained parameter, fp32: weight 4 bytes +
gradient 4 + AdamW's two moments 8 + the teacher's frozen copy 4 = 20 bytes, on top of the whole
UNet's 4 bytes per parameter; activations come on top and depend on resolution and batch size.
A checkpoint holds the trained tensors and AdamW's two moments, 12 bytes per trained parameter,
or 4 with ``--checkpoint-without-optimizer``.

    python scripts/preset_sizes.py
"""

from __future__ import annotations

ARCHITECTURES = {
    "SD 1.x": dict(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
    "SD 2.x": dict(
        sample_size=96,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
    "SDXL": dict(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ),
}
BYTES_PER_TRAINED = 20  # fp32 weight, gradient, two AdamW moments, frozen teacher copy
BYTES_PER_WEIGHT = 4
CHECKPOINT_BYTES = (
    12  # fp32 trained tensor + AdamW's two moments; 4 with --checkpoint-without-optimizer
)


def table() -> str:
    import torch
    from diffusers import UNet2DConditionModel

    from loreun.erase.presets import PRESETS, select_parameters

    lines = [
        "| model | UNet parameters | preset | trained parameters | share | "
        "training memory (GB, before activations) | checkpoint (GB) | "
        "checkpoint without optimizer (GB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, arch in ARCHITECTURES.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**arch)
        total = sum(p.numel() for p in unet.parameters())
        for preset in PRESETS:
            n = sum(p.numel() for p in select_parameters(unet, preset).values())
            gb = (total * BYTES_PER_WEIGHT + n * BYTES_PER_TRAINED) / 1e9
            ckpt, lean = n * CHECKPOINT_BYTES / 1e9, n * BYTES_PER_WEIGHT / 1e9
            lines.append(
                f"| {name} | {total / 1e6:.0f} M | {preset} | {n / 1e6:.1f} M | "
                f"{n / total:.1%} | {gb:.1f} | {ckpt:.2f} | {lean:.2f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
