"""Erase step time and peak memory: loreun's step against a naive one, side by side.

naive:  a second full UNet as teacher (deepcopy), separate teacher calls for c and empty, and
        torch's default AdamW.
loreun: frozen copies of the trained tensors only (a module tree sharing the other tensors),
        one batched teacher call, and loreun's AdamW (fused where the tensors allow it).

Each (model, preset, variant) runs in a fresh process so peak RSS is its own. Run:

    python scripts/bench_erase.py --model tiny --steps 20 --repeats 3
    python scripts/bench_erase.py --model sd14 --steps 1 --repeats 1
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time


def build_unet(name: str):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if name == "tiny":
        from loreun.pipelines.tiny import make_tiny_pipeline

        return make_tiny_pipeline().unet, (4, 8, 8), 16, 16
    from preset_sizes import ARCHITECTURES  # this folder's own script

    # Stable Diffusion 1.4's UNet configuration, random weights (860M parameters).
    unet = UNet2DConditionModel(**ARCHITECTURES["SD 1.x"])
    return unet, (4, 64, 64), 77, 768


def naive_loss(student, teacher_unet, batch, eta):
    import torch

    from loreun.erase.objective_esd import esd_target
    from loreun.erase.objectives import per_sample_mse

    with torch.no_grad():
        e_c = teacher_unet(batch.xt, batch.t, encoder_hidden_states=batch.cond).sample
        e_u = teacher_unet(batch.xt, batch.t, encoder_hidden_states=batch.uncond).sample
    pred = student(batch.xt, batch.t, batch.cond)
    return per_sample_mse(pred, esd_target(e_u, e_c, e_u, eta))


def worker(model: str, preset: str, variant: str, steps: int) -> dict:
    import torch

    from loreun.erase.objective_esd import esd_loss
    from loreun.erase.objectives import ItemBatch
    from loreun.erase.optim import build_optimizer
    from loreun.erase.presets import select_parameters
    from loreun.erase.teachers import FrozenTeacher
    from loreun.pipelines.family import FAMILIES, UNET_PRESETS

    SD = FAMILIES["StableDiffusionPipeline"]

    unet, shape, seq, dim = build_unet(model)
    unet.requires_grad_(False)
    trained = select_parameters(unet, preset, UNET_PRESETS)
    for p in trained.values():
        p.requires_grad_(True)
    if variant == "naive":
        teacher_unet = copy.deepcopy(unet).requires_grad_(False)
    else:
        teacher = FrozenTeacher(SD, unet, trained)
    if variant == "naive":
        opt = torch.optim.AdamW(list(trained.values()), lr=1e-5)
    else:
        opt = build_optimizer("adamw", list(trained.values()), lr=1e-5, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps + 1):  # the first step warms up and is not timed
        batch = ItemBatch(
            xt=torch.randn(1, *shape, generator=g),
            t=torch.randint(0, 1000, (1,), generator=g),
            cond=torch.randn(1, seq, dim, generator=g),
            uncond=torch.randn(1, seq, dim, generator=g),
            anchor=None,
            target=None,
            ids=torch.tensor([0]),
        )
        start = time.perf_counter()
        if variant == "naive":
            loss = naive_loss(SD.predictor(unet), teacher_unet, batch, 1.0).mean()
        else:
            loss = esd_loss(SD.predictor(unet), teacher, batch, 1.0)[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_trained = sum(p.numel() for p in trained.values())
    return {
        "step_s": statistics.median(times[1:]) if steps else times[0],
        "peak_rss_mib": peak_mib,
        "trained_params": n_trained,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["tiny", "sd14"], default="tiny")
    p.add_argument("--presets", default="esd-x,esd-u")
    p.add_argument("--steps", type=int, default=20, help="timed steps per process")
    p.add_argument("--repeats", type=int, default=3, help="paired processes per variant")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "PRESET", "VARIANT"))
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker, a.steps)))
        return 0
    print("| model | preset | variant | step time (median s) | peak RSS (MiB) | trained params |")
    print("|---|---|---|---|---|---|")
    for preset in a.presets.split(","):
        res: dict[str, list] = {"naive": [], "loreun": []}
        for _ in range(a.repeats):  # alternate, so both variants see the same machine noise
            for variant in res:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        a.model,
                        preset,
                        variant,
                        "--steps",
                        str(a.steps),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                res[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for variant, runs in res.items():
            t = statistics.median(r["step_s"] for r in runs)
            m = statistics.median(r["peak_rss_mib"] for r in runs)
            print(
                f"| {a.model} | {preset} | {variant} | {t:.4f} | {m:.0f} | "
                f"{runs[0]['trained_params']:,} |"
            )
        ratio = statistics.median(r["step_s"] for r in res["naive"]) / statistics.median(
            r["step_s"] for r in res["loreun"]
        )
        print(f"| {a.model} | {preset} | naive / loreun time | {ratio:.2f}x | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
