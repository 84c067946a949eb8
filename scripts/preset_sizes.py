"""How many parameters each preset trains on SD 1.x, SD 2.x and SDXL, and the memory of training
them with loreun's default recipe (fp32 AdamW), computed from the UNet architectures.

The UNets are built on PyTorch's meta device from their published architecture settings, so
nothing is downloaded or allocated. Memory per trained parameter, fp32: weight 4 bytes +
gradient 4 + AdamW's two moments 8 + the teacher's frozen copy 4 = 20 bytes, on top of the whole
UNet's 4 bytes per parameter; activations come on top and depend on resolution and batch size.
A checkpoint holds the trained tensors and AdamW's two moments, 12 bytes per trained parameter,
or 4 with ``--checkpoint-without-optimizer``.

The low-memory recipe (``--optimizer adafactor --frozen-dtype bf16 --step-in-backward
--gradient-checkpointing``) keeps the UNet's 4 bytes per parameter, a 2-byte frozen copy per
trained parameter, Adafactor's factored state (a row and a column vector of each tensor's
``[out, fan_in]`` view) and one gradient at a time (the largest trained tensor's). Its
checkpoint is the trained tensors plus that small state.

The second table does the same for the MMDiT transformers of SD3.5 and FLUX.1-dev with the
erase recipe their size calls for (``--mixed-precision bf16 --gradient-checkpointing``):
frozen weights in bf16 (2 bytes each); a full-tensor preset adds per trained parameter an fp32
weight, gradient and two AdamW moments (16 bytes) and a bf16 frozen copy (2); a LoRA of rank r
adds r (fan_in + fan_out) fp32 adapter numbers per adapted module, 16 bytes each, and no copy
(the teacher is the model with its adapters off). Text embeddings are cached, so no text
encoder is on the device.

The fourth table is LoRA erasure on a quantized frozen base (``--quantize-base``): every
Linear layer's weight is stored at the base's bits per weight (scales included: NF4 with
double quantization 4.13, quanto's int4 4.25, int8 about 8), every other tensor in bf16, and
the LoRA's adapters as above (16 bytes per number). Its bf16 rows are the same arithmetic
without quantization, so each quantized row has its baseline beside it.

The third table does the same for text-encoder erasure (``--train text-encoder``), from the
CLIP text encoders' published configs.

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
# MMDiT transformers, as their diffusers configs give them.
TRANSFORMERS = {
    "SD3.5-medium": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    )),
    "SD3.5-large": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
    )),
    "FLUX.1-dev": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    )),
}  # fmt: skip
# FLUX.1-schnell: FLUX.1-dev's transformer without the guidance embedding
SCHNELL = ("FluxTransformer2DModel", dict(TRANSFORMERS["FLUX.1-dev"][1], guidance_embeds=False))
LORA_RANK = 16
BYTES_PER_TRAINED = 20  # fp32 weight, gradient, two AdamW moments, frozen teacher copy
BYTES_PER_WEIGHT = 4
CHECKPOINT_BYTES = (
    12  # fp32 trained tensor + AdamW's two moments; 4 with --checkpoint-without-optimizer
)


def adafactor_numbers(trained: dict) -> int:
    """Numbers Adafactor keeps for these tensors: out + fan_in per matrix, all of a vector."""
    return sum(
        p.shape[0] + p.numel() // p.shape[0] if p.ndim >= 2 else p.numel() for p in trained.values()
    )


def low_memory_bytes(total: int, trained: dict) -> tuple[int, int]:
    """(training memory before activations, checkpoint size) of the low-memory recipe."""
    n = sum(p.numel() for p in trained.values())
    state = 4 * adafactor_numbers(trained)
    largest_grad = 4 * max(p.numel() for p in trained.values())
    return total * BYTES_PER_WEIGHT + 2 * n + state + largest_grad, 4 * n + state


def table() -> str:
    import torch
    from diffusers import UNet2DConditionModel

    from loreun.erase.presets import select_parameters
    from loreun.pipelines.family import UNET_PRESETS

    lines = [
        "| model | UNet parameters | preset | trained parameters | share | "
        "training memory (GB, before activations) | checkpoint (GB) | "
        "checkpoint without optimizer (GB) | low-memory recipe (GB, before activations) | "
        "its checkpoint (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arch in ARCHITECTURES.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**arch)
        total = sum(p.numel() for p in unet.parameters())
        for preset in UNET_PRESETS:
            trained = select_parameters(unet, preset, UNET_PRESETS)
            n = sum(p.numel() for p in trained.values())
            gb = (total * BYTES_PER_WEIGHT + n * BYTES_PER_TRAINED) / 1e9
            ckpt, lean = n * CHECKPOINT_BYTES / 1e9, n * BYTES_PER_WEIGHT / 1e9
            low, low_ckpt = (b / 1e9 for b in low_memory_bytes(total, trained))
            lines.append(
                f"| {name} | {total / 1e6:.0f} M | {preset} | {n / 1e6:.1f} M | "
                f"{n / total:.1%} | {gb:.1f} | {ckpt:.2f} | {lean:.2f} | {low:.1f} | "
                f"{low_ckpt:.2f} |"
            )
    return "\n".join(lines)


def transformer_rows(name: str, model) -> list[str]:
    """One row per MMDiT preset: full tensors and a LoRA of ``LORA_RANK`` on its modules."""
    from loreun.erase.presets import select_parameters
    from loreun.pipelines.family import MMDIT_PRESETS

    total = sum(p.numel() for p in model.parameters())
    rows = []
    for preset in MMDIT_PRESETS:
        trained = select_parameters(model, preset, MMDIT_PRESETS)
        n = sum(p.numel() for p in trained.values())
        lora = sum(
            LORA_RANK * (p.shape[0] + p.numel() // p.shape[0])
            for k, p in trained.items()
            if k.endswith(".weight") and p.ndim >= 2
        )
        full_gb = (2 * total + 18 * n) / 1e9
        lora_gb = (2 * total + 16 * lora) / 1e9
        rows.append(
            f"| {name} | {total / 1e9:.2f} B | {preset} | {n / 1e6:.0f} M | {full_gb:.1f} | "
            f"{lora / 1e6:.1f} M | {lora_gb:.1f} |"
        )
    return rows


def transformer_table() -> str:
    import diffusers
    import torch

    lines = [
        f"| model | parameters | preset | trained parameters | full tensors, bf16 base (GB, "
        f"before activations) | LoRA rank {LORA_RANK} numbers | LoRA, bf16 base (GB, before "
        "activations) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (cls, arch) in TRANSFORMERS.items():
        with torch.device("meta"):
            model = getattr(diffusers, cls)(**arch)
        lines += transformer_rows(name, model)
    return "\n".join(lines)


# The CLIP text encoders that read the prompt, from their published configs: OpenAI's ViT-L/14
# (SD 1.x; SDXL's, SD3's and FLUX.1's first), OpenCLIP ViT-H/14 (SD 2.x, its last layer unused
# by the pipeline but present) and ViT-bigG/14 (SDXL's and SD3's second, with a projection).
CLIP_TEXT = {
    "ViT-L/14": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, projection_dim=768),
    "OpenCLIP ViT-H/14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, projection_dim=1024),
    "OpenCLIP ViT-bigG/14": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                 num_attention_heads=20, projection_dim=1280),
}  # fmt: skip
TEXT_FAMILIES = {  # the CLIP encoders --train text-encoder trains, per family
    "SD 1.x": ["ViT-L/14"],
    "SD 2.x": ["OpenCLIP ViT-H/14"],
    "SDXL, SD3": ["ViT-L/14", "OpenCLIP ViT-bigG/14"],
    "FLUX.1 (CLIP only; T5 stays)": ["ViT-L/14"],
}


def text_encoder_table() -> str:
    """--train text-encoder --text-encoder-part all: trained parameters per family and their
    fp32 AdamW memory (weight, gradient, two moments: 16 bytes each; no frozen copy, the
    teacher's conditionings are cached), and a LoRA of ``LORA_RANK`` on the layers' Linear
    modules (16 bytes per adapter number); the frozen denoiser comes on top. Each encoder is
    counted with a projection (0.6-1.6 M numbers more where a pipeline loads it without)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from loreun.erase.text_encoder import LAYER, _wanted

    lines = [
        f"| family | encoders | trained parameters | training memory (GB, fp32 AdamW) | "
        f"LoRA rank {LORA_RANK} numbers | LoRA memory (GB) |",
        "|---|---|---|---|---|---|",
    ]
    for family, names in TEXT_FAMILIES.items():
        full = lora = 0
        for name in names:
            with torch.device("meta"):
                model = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT[name]))
            layers = set(range(CLIP_TEXT[name]["num_hidden_layers"]))
            for key, p in model.named_parameters():
                if _wanted(key, "all", layers, True):
                    full += p.numel()
                    if LAYER.search(key) and key.endswith(".weight") and p.ndim == 2:
                        lora += LORA_RANK * (p.shape[0] + p.shape[1])
        lines.append(
            f"| {family} | {', '.join(names)} | {full / 1e6:.0f} M | {16 * full / 1e9:.1f} | "
            f"{lora / 1e6:.1f} M | {16 * lora / 1e9:.2f} |"
        )
    return "\n".join(lines)


QUANTIZED_MODELS = ("FLUX.1-dev", "FLUX.1-schnell", "SD3.5-large", "SD3.5-medium", "SDXL")


def _meta_model(name: str):
    """The denoiser on the meta device, and the preset table its names follow."""
    import diffusers
    import torch

    from loreun.pipelines.family import MMDIT_PRESETS, UNET_PRESETS

    with torch.device("meta"):
        if name == "SDXL":
            return diffusers.UNet2DConditionModel(**ARCHITECTURES["SDXL"]), UNET_PRESETS
        cls, arch = SCHNELL if name == "FLUX.1-schnell" else TRANSFORMERS[name]
        return getattr(diffusers, cls)(**arch), MMDIT_PRESETS


def lora_numbers(trained: dict, rank: int) -> int:
    """Adapter numbers of a rank-``rank`` LoRA on the preset's matrices."""
    return sum(
        rank * (p.shape[0] + p.numel() // p.shape[0])
        for k, p in trained.items()
        if k.endswith(".weight") and p.ndim >= 2
    )


def quantized_table(preset: str = "esd-x", ranks=(8, 16)) -> str:
    import torch

    from loreun.erase.presets import select_parameters
    from loreun.pipelines.quantize import QUANTIZED_BASES

    bases = {"bf16": 16.0, **{n: QUANTIZED_BASES[n].bits for n in ("nf4", "qint4", "int8")}}
    lines = [
        "| model | parameters | in Linear layers | frozen base | base (GB) | "
        + " | ".join(f"LoRA r{r} {preset} (GB, before activations)" for r in ranks)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(ranks),
    ]
    for name in QUANTIZED_MODELS:
        model, presets = _meta_model(name)
        total = sum(p.numel() for p in model.parameters())
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        trained = select_parameters(model, preset, presets)
        for base, bits in bases.items():
            frozen = linear * bits / 8 + (total - linear) * 2
            loras = [(frozen + 16 * lora_numbers(trained, r)) / 1e9 for r in ranks]
            lines.append(
                f"| {name} | {total / 1e9:.2f} B | {linear / total:.1%} | {base} | "
                f"{frozen / 1e9:.1f} | " + " | ".join(f"{g:.1f}" for g in loras) + " |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
    print()
    print(transformer_table())
    print()
    print(text_encoder_table())
    print()
    print(quantized_table())
