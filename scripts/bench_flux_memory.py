"""Peak GPU memory and step time of an erasure step on FLUX.1-dev's architecture.

The transformer has FLUX.1-dev's exact configuration with random weights (11.9 B parameters,
23.8 GB in bf16); nothing is downloaded. Each recipe runs in a fresh process, through loreun's
own pieces (``select_parameters`` with the MMDiT presets, ``add_lora``, the teachers,
``esd_loss`` through the FLUX family's ``predict``), as an erase run with ``--mixed-precision
bf16 --gradient-checkpointing`` holds them: frozen weights in bf16, trained tensors in fp32,
text embeddings cached (the encoders are off the device), one ESD step at batch size 1.

    python scripts/bench_flux_memory.py                 # on a GPU, a few minutes
    python scripts/bench_flux_memory.py --arch tiny     # the tiny test model, any machine

With ``--quantize-base`` (repeatable: nf4, int8, qint4, qint8) the LoRA recipes also run on a
frozen base loaded quantized through diffusers' config (``--quantize-base`` of ``loreun
erase``), from a checkpoint of the random weights written first. On a GPU the whole
transformer is measured. On a CPU (bitsandbytes needs CUDA, so qint4/qint8 only) the
transformer keeps FLUX.1-dev's full width but is cut to 1 and then 2 of its 19 units (a unit:
one double-stream block and two single-stream blocks), the peak resident memory of the
training step is measured for each, and the peak of all 19 is extrapolated as
peak(1) + 18 x (peak(2) - peak(1)); the rows say ``"extrapolated": true``. The CPU peak holds
the Python and torch runtime too (about 0.5 GB), and runs in float32 (a CPU without bf16
matmuls runs them a hundred times slower), so its activations are twice a GPU's: it overstates
a GPU's peak.

    OMP_NUM_THREADS=2 python scripts/bench_flux_memory.py --quantize-base qint4 \
        --recipe lora-r16-esd-x --resolution 512 --steps 1

Prints one JSON line per recipe: peak allocated GB, median step seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

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
    "lora-r16-esd-x": ("esd-x", 16, "adamw"),
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


def save_random(folder: str, units: int | None) -> None:
    """FLUX.1-dev's transformer with random weights (bf16 on a GPU, float32 on a CPU) written as
    a diffusers checkpoint, for the quantized loaders to read: whole (``units`` None) or cut
    to ``units`` of its 19."""
    import torch
    from diffusers import FluxTransformer2DModel

    arch = dict(
        FLUX_DEV, **({"num_layers": units, "num_single_layers": 2 * units} if units else {})
    )
    # quanto keeps the checkpoint's dtype: bf16 weights would run bf16 matmuls on a CPU
    torch.set_default_dtype(compute_dtype("cuda" if torch.cuda.is_available() else "cpu"))
    model = FluxTransformer2DModel(**arch)
    model.save_pretrained(folder, max_shard_size="5GB")


def load_quantized(folder: str, quantize: str, device):
    """The saved transformer loaded quantized, as ``loreun erase --quantize-base`` loads it:
    unquantized tensors in bf16 on a GPU, in float32 on a CPU (see ``compute_dtype``).

    The unquantized tensors are copied out of the checkpoint: diffusers maps the file and a
    tensor left on the map keeps every page of it resident, which a CPU's RSS would count
    (the whole float32 checkpoint); on a GPU they are copies anyway."""
    from diffusers import FluxTransformer2DModel

    from loreun.pipelines.quantize import (
        is_quantized,
        match_input_dtype,
        model_quantization_config,
        quanto_quietly,
    )

    with quanto_quietly():
        model = FluxTransformer2DModel.from_pretrained(
            folder,
            quantization_config=model_quantization_config(quantize),
            torch_dtype=compute_dtype(device),
        )
    if not getattr(model, "is_loaded_in_4bit", False) and not getattr(
        model, "is_loaded_in_8bit", False
    ):
        model.to(device)
    match_input_dtype(model)
    for t in (*model.parameters(), *model.buffers()):  # off the checkpoint's memory map (below)
        if not is_quantized(t):
            t.data = t.data.clone()
    return model.requires_grad_(False)


def compute_dtype(device: str):
    """bf16 on a GPU, as ``--mixed-precision bf16`` runs; float32 on a CPU, where bf16 matmuls
    without native support run a hundred times slower. A CPU's activations are then twice a
    GPU's, so its peak overstates the GPU's."""
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def _rss() -> int:
    """The process's resident memory now, in bytes."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The process's peak resident memory while a block runs, polled every 5 ms (the CPU's
    stand-in for CUDA's peak allocation counter)."""

    def __enter__(self):
        import os
        import threading

        self.peak, self._stop = 0, threading.Event()
        page = os.sysconf("SC_PAGE_SIZE")

        def poll():
            while not self._stop.is_set():
                with open("/proc/self/statm") as f:
                    self.peak = max(self.peak, int(f.read().split()[1]) * page)
                self._stop.wait(0.005)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def worker(recipe: str, arch: str, resolution: int, steps: int, quantize=None, folder=None):
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
    model = load_quantized(folder, quantize, device) if quantize else build(arch, device)
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
    text_len = 16 if arch == "tiny" else 512

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
    # the model, the adapters and the batch, before the step
    loaded = torch.cuda.memory_allocated() if device == "cuda" else _rss()
    with PeakRSS() as rss:
        for _ in range(steps):
            start = time.perf_counter()
            autocast = device == "cuda" or not quantize  # see compute_dtype
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                loss = esd_loss(flux.predictor(model), teacher, batch, 1.0)[0].mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss.peak
    return {
        "recipe": recipe,
        "arch": arch,
        "base": quantize or "bf16",
        "resolution": resolution,
        "parameters_B": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "trained_params": sum(p.numel() for p in trained.values()),
        "peak_GB": round(peak / 1e9, 2),
        "peak_kind": "cuda max allocated" if device == "cuda" else "process peak RSS",
        "before_step_GB": round(loaded / 1e9, 2),
        "step_s_median": round(statistics.median(times[1:] or times), 3),
    }


def run_worker(args: list[str]) -> dict:
    """One measurement in a fresh process, so no peak carries over."""
    # glibc returns freed activations to the system only above a fixed mmap threshold; without
    # one, peak RSS counts memory freed long before (bench_memory.py does the same)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    cmd = [sys.executable, __file__, "--worker", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def quantized_rows(quantize: str, recipes, resolutions, steps: int) -> None:
    """Print the quantized base's rows: measured whole on a GPU, extrapolated on a CPU."""
    import tempfile

    import torch

    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for units in [None] if gpu else [1, 2]:
            folders[units] = f"{tmp}/units-{units or 19}"
            code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            code += f"import bench_flux_memory as b; b.save_random({folders[units]!r}, {units})"
            subprocess.run([sys.executable, "-c", code], check=True)
        for recipe in recipes:
            for res in resolutions:
                common = ["--recipe", recipe, "--resolution", str(res), "--steps", str(steps)]
                common += ["--quantize-base", quantize]
                got = {u: run_worker([*common, "--folder", f]) for u, f in folders.items()}
                if gpu or any("error" in g for g in got.values()):
                    print(json.dumps(next(iter(got.values())) if gpu else got), flush=True)
                    continue
                one, two = got[1], got[2]
                row = dict(two, parameters_B=None, extrapolated=True, units_measured=[1, 2])
                row["peak_GB_units"] = [one["peak_GB"], two["peak_GB"]]
                row["before_step_GB_units"] = [one["before_step_GB"], two["before_step_GB"]]
                row["peak_GB"] = round(one["peak_GB"] + 18 * (two["peak_GB"] - one["peak_GB"]), 2)
                print(json.dumps(row), flush=True)


def main() -> None:
    from loreun.pipelines.quantize import QUANTIZED_BASES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["flux-dev", "tiny"], default="flux-dev")
    p.add_argument("--recipe", choices=list(RECIPES), action="append")
    p.add_argument("--resolution", type=int, action="append")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--quantize-base", choices=list(QUANTIZED_BASES), action="append")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        q = a.quantize_base[0] if a.quantize_base else None
        row = worker(a.recipe[0], a.arch, a.resolution[0], a.steps, q, a.folder)
        print(json.dumps(row), flush=True)
        return
    resolutions = a.resolution or ([512, 1024] if a.arch == "flux-dev" else [32])
    if a.quantize_base:
        lora = [r for r in a.recipe or list(RECIPES) if RECIPES[r][1]]
        for q in a.quantize_base:
            quantized_rows(q, lora, resolutions, a.steps)
        return
    for recipe in a.recipe or list(RECIPES):
        for res in resolutions:
            row = run_worker(
                [
                    "--arch",
                    a.arch,
                    "--recipe",
                    recipe,
                    "--resolution",
                    str(res),
                    "--steps",
                    str(a.steps),
                ]
            )
            print(json.dumps({"recipe": recipe, "resolution": res, **row}), flush=True)


if __name__ == "__main__":
    main()
