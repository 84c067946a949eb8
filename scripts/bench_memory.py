"""Peak memory of one erase step on Stable Diffusion 1.4's UNet: the default recipe against the
low-memory one, per preset.

The UNet has SD 1.4's exact architecture with random weights (860 M parameters, 3.4 GB in fp32);
nothing is downloaded. Each (preset, recipe) runs one ESD step at 512x512 (64x64 latents), batch
1, in a fresh process, through loreun's own pieces: ``select_parameters``, ``FrozenTeacher``,
``build_optimizer`` / ``StepInBackward`` and ``esd_loss``, as ``erase`` combines them. On CPU the
figure is the process's peak RSS, which includes Python and the libraries (about 0.45 GB, the
``weights only`` row shows it); with ``--device cuda`` it is ``torch.cuda.max_memory_allocated``.
Workers run with ``MALLOC_MMAP_THRESHOLD_=131072``, so that glibc returns freed activations to the
system and RSS follows live memory, as a GPU's allocated memory does (``--glibc-default`` drops it;
the heap then keeps up to 0.7 GB of freed blocks in RSS).

    python scripts/bench_memory.py --presets esd-x,esd-u
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

RECIPES = {
    "weights only": None,  # the UNet and nothing else: the floor every recipe starts from
    "default": dict(optimizer="adamw", frozen_dtype=None, step_in_backward=False, ckpt=False),
    "low-memory": dict(
        optimizer="adafactor", frozen_dtype="bf16", step_in_backward=True, ckpt=True
    ),
}


def build_unet(arch: str, resolution: int):
    """(UNet, latent side, text length, text width): SD 1.4's architecture, or the tiny test one."""
    import torch
    from diffusers import UNet2DConditionModel
    from preset_sizes import ARCHITECTURES  # this folder's own script

    torch.manual_seed(0)
    if arch == "tiny":
        from loreun.pipelines.tiny import make_tiny_pipeline

        return make_tiny_pipeline().unet, 8, 16, 16
    return UNet2DConditionModel(**ARCHITECTURES["SD 1.x"]), resolution // 8, 77, 768


def worker(preset: str, recipe: str, a) -> dict:
    import torch

    from loreun.erase.objective_esd import esd_loss
    from loreun.erase.objectives import ItemBatch
    from loreun.erase.optim import StepInBackward, build_optimizer
    from loreun.erase.presets import select_parameters
    from loreun.erase.teachers import FrozenTeacher
    from loreun.pipelines.family import FAMILIES, UNET_PRESETS

    SD = FAMILIES["StableDiffusionPipeline"]

    device = a.device
    unet, side, seq, dim = build_unet(a.arch, a.resolution)
    unet = unet.to(device)
    unet.requires_grad_(False)
    r = RECIPES[recipe]
    started = time.perf_counter()
    if r is not None:
        trained = select_parameters(unet, preset, UNET_PRESETS)
        for p in trained.values():
            p.requires_grad_(True)
        if r["ckpt"]:
            unet.enable_gradient_checkpointing()
        dtype = {"bf16": torch.bfloat16, None: None}[r["frozen_dtype"]]
        teacher = FrozenTeacher(SD, unet, trained, dtype)

        def make(params):
            return build_optimizer(r["optimizer"], params, lr=1e-5, weight_decay=0.0)

        if r["step_in_backward"]:
            opt = StepInBackward(make, trained)
        else:
            opt = make(list(trained.values()))
        g = torch.Generator().manual_seed(0)
        batch = ItemBatch(
            xt=torch.randn(1, 4, side, side, generator=g).to(device),
            t=torch.tensor([500], device=device),
            cond=torch.randn(1, seq, dim, generator=g).to(device),
            uncond=torch.randn(1, seq, dim, generator=g).to(device),
            anchor=None,
            target=None,
            ids=torch.tensor([0]),
        )
        loss = esd_loss(SD.predictor(unet), teacher, batch, 1.0)[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 1e9
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return {"peak_gb": peak_gb, "step_s": time.perf_counter() - started}


def run_one(preset: str, recipe: str, a) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", preset, recipe]
        + ["--device", a.device, "--resolution", str(a.resolution), "--arch", a.arch],
        capture_output=True,
        text=True,
        env=dict(os.environ)
        if a.glibc_default
        else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    if out.returncode:
        raise SystemExit(f"{preset} {recipe} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", default="esd-x,esd-u")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--arch", default="sd14", choices=["sd14", "tiny"], help="tiny: a smoke test")
    p.add_argument("--glibc-default", action="store_true", help="keep glibc's mmap threshold")
    p.add_argument("--worker", nargs=2, metavar=("PRESET", "RECIPE"))
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker, a)))
        return 0
    unit = "peak RSS" if a.device == "cpu" else "peak allocated"
    print(f"| preset | recipe | {unit} (GB) | step (s) |")
    print("|---|---|---|---|")
    floor = run_one("esd-x", "weights only", a)
    print(f"| - | weights only | {floor['peak_gb']:.2f} | |", flush=True)
    for preset in a.presets.split(","):
        for recipe in ("default", "low-memory"):
            res = run_one(preset, recipe, a)
            print(
                f"| {preset} | {recipe} | {res['peak_gb']:.2f} | {res['step_s']:.1f} |", flush=True
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
