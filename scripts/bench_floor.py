"""loreun's erase step against its floor, in one process, with a profile of each.

The floor is the work no ESD implementation can skip: one student forward and backward at
batch B, and one teacher forward at batch 2B (concept and empty prompt together), on the same
UNet and the same tensors, with nothing else: no x_t drawing, no weighting, no logging. The
optimizer step is timed on its own beside it (loreun's AdamW over copies of the trained tensors),
since a step cannot skip it either but the floor, as defined, leaves it out.

loreun's step is ``trainer.train_step`` itself, on a run built by ``trainer.setup`` (cached x_t,
ESD objective, uniform or LoReUn weighting). The two alternate in rounds so both see the same
machine; the ratio is the median of the per-round ratios. Run alone, with the thread count set:

    OMP_NUM_THREADS=1 python scripts/bench_floor.py --methods esd-x esd-u --rounds 15 \
        --steps 20 --profile runs/floor-profile
    OMP_NUM_THREADS=1 python scripts/bench_floor.py --parts   # the pieces the profile named
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

CONCEPTS = ["3", "a handwritten 3", "the number three", "a drawing of the digit three", "digit 3"]


def build_run(method: str, weighting: str, out: Path, model: str = "digits"):
    """A trainer run on a built-in model, exactly as ``loreun erase`` builds it."""
    from accelerate import Accelerator

    from loreun.erase import EraseConfig
    from loreun.erase.trainer import setup

    cfg = EraseConfig(
        model=model,
        out=str(out),
        concepts=CONCEPTS,
        method=method,
        weighting=weighting,
        steps=10**6,
        lr=1e-4,
        checkpoint_every=0,
    )
    acc = Accelerator(cpu=True)
    return setup(cfg, acc, out), cfg, acc


def floor_step(family, model, batch, uncond) -> None:
    """Student forward + backward at [B], teacher forward at [2B]; gradients left for the caller.
    ``family.predict`` is the denoiser call itself (a UNet's, or a transformer's)."""
    from loreun.pipelines.family import cat_cond

    b = len(batch.xt)
    with torch.no_grad():
        pair = cat_cond([batch.cond, uncond.expand(b, -1, -1)])
        family.predict(model, batch.xt.repeat(2, 1, 1, 1), batch.t.repeat(2), pair)
    pred = family.predict(model, batch.xt, batch.t, batch.cond)
    (pred - batch.target).pow(2).mean().backward()


def time_loop(fn, steps: int) -> float:
    """Median seconds of ``fn(k)`` over ``steps`` calls."""
    times = []
    for k in range(steps):
        start = time.perf_counter()
        fn(k)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(
    method: str, weighting: str, rounds: int, steps: int, profile: Path | None, model: str
) -> dict:
    """Alternate floor and loreun blocks of ``steps`` steps for ``rounds`` rounds."""
    from loreun.erase.optim import build_optimizer
    from loreun.erase.streams import step_generator
    from loreun.erase.trainer import train_step
    from loreun.erase.xt_sources import cached_batch

    with tempfile.TemporaryDirectory() as tmp:
        run, cfg, acc = build_run(method, weighting, Path(tmp), model)
        params = list(run.trained.values())
        clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = build_optimizer(cfg.optimizer, clones, cfg.lr, cfg.weight_decay)
        for q in opt.param_groups[0]["params"]:
            q.grad = torch.zeros_like(q)
        ids = torch.zeros(cfg.batch_size, dtype=torch.long)

        def floor(k: int) -> None:
            batch = cached_batch(run.forget, ids, step_generator(0, 0, k), run.schedule, "cpu")
            floor_step(run.family, acc.unwrap_model(run.denoiser), batch, run.forget.uncond)
            for p in params:
                p.grad = None

        def loreun(k: int) -> None:
            train_step(run, cfg, acc, k)

        def adam(k: int) -> None:
            opt.step()

        for fn in (floor, loreun, adam):  # warm-up
            time_loop(fn, 3)
        res = {"floor": [], "loreun": [], "adam": []}
        for _ in range(rounds):
            for name, fn in (("floor", floor), ("loreun", loreun), ("adam", adam)):
                res[name].append(time_loop(fn, steps))
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            for name, fn in (("floor", floor), ("loreun", loreun)):
                write_profile(fn, steps, profile / f"{method}-{weighting}-{name}.txt")
    ratios = [lo / fl for lo, fl in zip(res["loreun"], res["floor"])]
    ratios_adam = [lo / (fl + ad) for lo, fl, ad in zip(res["loreun"], res["floor"], res["adam"])]
    return {
        **{k: statistics.median(v) for k, v in res.items()},
        "ratio": statistics.median(ratios),
        "ratio_range": (min(ratios), max(ratios)),
        "ratio_with_adam": statistics.median(ratios_adam),
    }


def parts(method: str, repeats: int = 5, calls: int = 30) -> dict[str, float]:
    """Median ms of the pieces the step's profile pointed at, each alternated ``repeats`` times:
    the AdamW update as torch's loop, foreach and fused kernels over the trained tensors, and
    the teacher's call through ``functional_call`` (the earlier teacher), through the shared
    module tree (the teacher now) and as a plain forward of the UNet."""
    from torch.func import functional_call

    from loreun.erase.presets import select_parameters
    from loreun.erase.teachers import FrozenTeacher
    from loreun.pipelines.family import FAMILIES, UNET_PRESETS, denoiser
    from loreun.pipelines.models import load_pipeline

    SD = FAMILIES["StableDiffusionPipeline"]
    unet = denoiser(load_pipeline("digits")).requires_grad_(False)
    trained = select_parameters(unet, method, UNET_PRESETS)
    teacher = FrozenTeacher(SD, unet, trained)
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size)
    t, emb = torch.tensor([500, 500]), torch.randn(2, 8, c.cross_attention_dim)

    def adam(kind: str):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in trained.values()]
        for p in ps:
            p.grad = torch.randn_like(p)
        flag = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
        return torch.optim.AdamW(ps, lr=1e-4, **flag[kind]).step

    @torch.no_grad()
    def swapped():
        functional_call(unet, teacher.base, (x, t), {"encoder_hidden_states": emb}, strict=False)

    @torch.no_grad()
    def plain():
        unet(x, t, encoder_hidden_states=emb)

    fns = {f"AdamW {k}": adam(k) for k in ("loop", "foreach", "fused")}
    fns |= {"teacher via functional_call": swapped, "teacher (shared module)": lambda: teacher(
        x, t, emb), "plain forward, batch 2": plain}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time_loop(lambda k, fn=fn: fn(), 3)
            times[name].append(time_loop(lambda k, fn=fn: fn(), calls))
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def write_profile(fn, steps: int, path: Path) -> None:
    """The top operators by self CPU time over ``steps`` calls, as torch.profiler prints them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for k in range(steps):
            fn(k)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    path.write_text(table)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["esd-x", "esd-u"])
    p.add_argument("--weighting", default="uniform", choices=["uniform", "loreun"])
    p.add_argument("--model", default="digits", choices=["digits", "digits-flow"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=20, help="steps per block")
    p.add_argument("--profile", type=Path, help="folder for the operator profiles")
    p.add_argument("--parts", action="store_true", help="time the update and teacher variants")
    a = p.parse_args()
    if a.parts:
        for method in a.methods:
            for name, ms in parts(method).items():
                print(f"| {method} | {name} | {ms:.2f} |", flush=True)
        return 0
    print(f"threads: {torch.get_num_threads()}; {a.model}; cached x_t; {a.weighting}")
    print(
        "| method | floor ms | loreun step ms | loreun / floor [min, max] | Adam ms "
        "| loreun / (floor + Adam) |"
    )
    print("|---|---|---|---|---|---|")
    for method in a.methods:
        m = measure(method, a.weighting, a.rounds, a.steps, a.profile, a.model)
        lo, hi = m["ratio_range"]
        print(
            f"| {method} | {1000 * m['floor']:.2f} | {1000 * m['loreun']:.2f} | "
            f"{m['ratio']:.2f}x [{lo:.2f}, {hi:.2f}] | {1000 * m['adam']:.2f} | "
            f"{m['ratio_with_adam']:.2f}x |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
