"""Peak GPU memory and step time of an erasure step on FLUX.1-dev's architecture.

The transformer has FLUX.1-dev's exact configuration with random weights (11.9 B parameters,
23.8 GB in bf16); nothing is downloaded. Each recipe runs in a fresh process, through loreun's
own pieces (``select_parameters`` with the MMDiT presets, ``add_lora``, the teachers,
``esd_loss`` through the FLUX family's ``predict``), as an erase run with ``--mixed-precision
bf16 --gradient-checkpointing`` holds them: frozen weights in bf16, trained tensors in fp32,
text embeddings cached (the encoders are off the device), one ESD step at batch size 1.

    python scripts/bench_flux_memory.py                 # on a GPU, a few minutes
    python scripts/bench_flux_memory.py --arch tiny     # the tiny test model, any machine

Prints one JSON line per recipe: peak allocated GB, median step seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# recipe -> (preset, LoRA rank or 0 for the full tensors, optimizer)
RECIPES = {
    "lora-r8-esd-x": ("esd-x", 8, "adamw"),
    "lora-r16-esd-all": ("esd-all", 16, "adamw"),
    "full-esd-x-strict": ("esd-x-strict", 0, "adafactor"),
}


def build(arch: str, device):
    """The transformer in bf16, built on the device (no fp32 copy is ever made)."""
    import torch
    from diffusers import FluxTransformer2DModel

    if arch == "tiny":  # the test suite's tiny FLUX
        from loreun.pipelines.tiny import make_tiny_flux_pipeline

        return (
            make_tiny_flux_pipeline().transformer.to(device, torch.bfloat16).requires_grad_(False)
        )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = FluxTransformer2DModel(**FLUX_DEV)
    torch.set_default_dtype(torch.float32)
    return model.requires_grad_(False)


def worker(recipe: str, arch: str, resolution: int, steps: int) -> dict:
    import torch

    from loreun.erase.lora import add_lora
    from loreun.erase.objective_esd import esd_loss
    from loreun.erase.objectives import ItemBatch
    from loreun.erase.optim import build_optimizer
    from loreun.erase.presets import select_parameters
    from loreun.erase.teachers import AdapterOffTeacher, FrozenTeacher
    from loreun.pipelines.family import FAMILIES, MMDIT_PRESETS, Cond

    flux = FAMILIES["FluxPipeline"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(arch, device)
    model.enable_gradient_checkpointing()
    preset_name, rank, optimizer = RECIPES[recipe]
    preset = select_parameters(model, preset_name, MMDIT_PRESETS)
    if rank:
        trained = add_lora(model, preset, rank, rank, 0)
        teacher = AdapterOffTeacher(flux, model, trained)
    else:
        trained = preset
        teacher = FrozenTeacher(flux, model, trained, torch.bfloat16)
    for p in trained.values():  # trained tensors in full precision, as the trainer keeps them
        p.data = p.data.float()
        p.requires_grad_(True)
    opt = build_optimizer(optimizer, list(trained.values()), 1e-5, 0.0)
    cfg = model.config
    side = resolution // 8  # FLUX's VAE: 8 pixels a latent cell, 16 channels
    text_len = 512 if arch == "flux-dev" else 16

    def cond():
        emb = torch.randn(1, text_len, cfg.joint_attention_dim, device=device)
        return Cond(emb, torch.randn(1, cfg.pooled_projection_dim, device=device))

    batch = ItemBatch(
        xt=torch.randn(1, cfg.in_channels // 4, side, side, device=device),
        t=torch.tensor([500.0], device=device),
        cond=cond(),
        uncond=cond(),
        anchor=None,
        target=None,
        ids=torch.tensor([0]),
    )
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = esd_loss(flux.predictor(model), teacher, batch, 1.0)[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan")
    return {
        "recipe": recipe,
        "arch": arch,
        "resolution": resolution,
        "parameters_B": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "trained_params": sum(p.numel() for p in trained.values()),
        "peak_allocated_GB": round(peak, 2),
        "step_s_median": round(statistics.median(times[1:] or times), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["flux-dev", "tiny"], default="flux-dev")
    p.add_argument("--recipe", choices=list(RECIPES), action="append")
    p.add_argument("--resolution", type=int, action="append")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.recipe[0], a.arch, a.resolution[0], a.steps)), flush=True)
        return
    for recipe in a.recipe or list(RECIPES):
        for res in a.resolution or ([512, 1024] if a.arch == "flux-dev" else [32]):
            cmd = [sys.executable, __file__, "--worker", "--arch", a.arch, "--recipe", recipe]
            cmd += ["--resolution", str(res), "--steps", str(a.steps)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
                print(json.dumps({"recipe": recipe, "resolution": res, "error": tail[0]}))
            else:
                print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
