"""The erase recipe: setup -> train -> export, read top to bottom.

One loop combines the pieces that are tested on their own: an objective gives per-sample losses
[B], a weighting gives per-sample weights [B], and the loss is ``sum(w * l) / B``. (DESIGN.md
writes ``sum(w * l) / sum(w)``; at batch size 1 that cancels any weight, so we divide by B. LoReUn
weights have mean 1 over the forget set, so the learning rate keeps its meaning.)
"""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from loreun.pipelines._meta import quiet
from loreun.pipelines.conditioning import NoiseSchedule, encode_prompts
from loreun.pipelines.files import (
    ERASE_CONFIG,
    ERASED_FILE,
    SALIENCY_MASK,
    TRAIN_LOG,
    atomic_write_text,
)
from loreun.pipelines.loading import fingerprint
from loreun.pipelines.models import load_pipeline

from .checkpoint import (
    checkpoint_config,
    load_checkpoint,
    prepare_output_dir,
    resolve_resume,
    save_checkpoint,
    start_log,
)
from .config import EraseConfig, changed_settings, check_anchor
from .export import export_erased, save_pipeline_folder
from .forget import (
    ForgetSet,
    cached_batch,
    encode_captions,
    encode_images,
    item_ids,
    latent_shape,
    load_or_sample_cache,
    partial_batch,
    per_sample_items,
    pixel_size,
    probe_difficulty,
    probe_grid,
    sample_forget_latents,
    step_generator,
)
from .images import ImageItem, folder_key, read_image_folder
from .objectives import build_objective, denoising_loss, per_sample_mse
from .presets import select_parameters
from .saliency import (
    forget_gradient,
    load_mask,
    mask_gradients,
    mask_key,
    restore_masked,
    save_mask,
    top_fraction_mask,
)
from .sampling import FrozenTeacher, make_ddim, unet_eps
from .weighting import build_weighting, effective_sample_size


class TrainingInterrupted(Exception):
    """Ctrl-C during training; a checkpoint was saved first."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; nothing was exported and earlier checkpoints are kept."""


@dataclass
class Run:
    """Everything the loop needs, built once by ``setup``."""

    pipe: object
    unet: torch.nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    trained: dict[str, torch.nn.Parameter]
    teacher: FrozenTeacher
    forget: ForgetSet
    weighting: object
    optimizer: object
    base_fingerprint: str
    schedule: NoiseSchedule
    ddim: object | None
    objective: object
    retain: ForgetSet | None = None
    mask: dict[str, torch.Tensor] | None = None
    start_step: int = 0


def erase(cfg: EraseConfig) -> Path:
    """Erase ``cfg.concepts`` from ``cfg.model`` and export the result to ``cfg.out``.

    Runs on one process, or on several under ``accelerate launch`` / ``torchrun``.

    Returns:
        Path of the exported ``unet-erased.safetensors``.
    """
    from accelerate import Accelerator

    acc = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=multi_cpu_launch(),
    )
    lock = None
    try:
        folders = read_folders(cfg)  # bad images or captions fail before anything is written
        with acc.main_process_first():  # one process creates and locks, the others check
            out, lock = prepare_output_dir(
                cfg.out, cfg.overwrite, cfg.resume, create=acc.is_main_process
            )
        resume = resolve_resume(out, cfg.resume)  # fail before the model loads
        check_resume_settings(resume, cfg)
        acc.wait_for_everyone()  # every process has checked --out before anything is written
        if acc.is_main_process:
            atomic_write_text(out / ERASE_CONFIG, cfg.to_json())
            start_log(out, load_step(resume))
        acc.wait_for_everyone()
        say(acc, f"loading {cfg.model}")
        run = setup(cfg, acc, out, resume, folders)
        steps_done = train(run, cfg, acc, out)
        path = out / ERASED_FILE
        if acc.is_main_process:
            say(acc, f"exporting {len(run.trained)} trained tensors")
            trained = {n: p.detach() for n, p in run.trained.items()}
            check_finite_state(trained, None, steps_done, cfg)
            path = export_erased(
                out,
                trained,
                cfg,
                run.base_fingerprint,
                steps_done,
                run.weighting.summary(),
                run.schedule.prediction_type,
            )
            if cfg.save_pipeline:
                save_pipeline_folder(run.pipe, out)
        acc.wait_for_everyone()
        return path
    finally:
        if lock is not None:
            lock.release()
        acc.end_training()


def say(acc, message: str) -> None:
    """One progress line from the main process, for set-up phases that take more than a second."""
    if acc.is_main_process and not quiet():
        print(message, flush=True)


def can_differ(cfg: EraseConfig) -> bool:
    """Whether LoReUn's weights can differ from 1: not at tau = inf without a target ESS."""
    import math

    return cfg.target_ess is not None or not math.isinf(cfg.temperature)


def check_resume_settings(resume: Path | None, cfg: EraseConfig) -> None:
    """Refuse a resume whose settings differ from the ones that made its checkpoint."""
    saved = checkpoint_config(resume) if resume is not None else None
    if saved is None:
        return
    changed = changed_settings(saved, cfg)
    if changed:
        raise ValueError(
            f"--resume: {resume} was made with other settings ({', '.join(changed)} differ); "
            "resume with the same ones, or start a new run with --overwrite or another --out"
        )


def load_step(resume: Path | None) -> int | None:
    return json.loads((resume / "state.json").read_text())["step"] if resume else None


def multi_cpu_launch() -> bool:
    """True under torchrun/MPI without CUDA: accelerate then needs ``cpu=True`` to use gloo."""
    import os

    world = int(os.environ.get("WORLD_SIZE", os.environ.get("PMI_SIZE", "1")))
    return world > 1 and not torch.cuda.is_available()


@dataclass
class Folders:
    """Image items read (and checked) before any model loads; None where prompts are used."""

    forget: list[ImageItem] | None
    retain: list[ImageItem] | None


def read_folders(cfg: EraseConfig) -> Folders:
    """Read --forget-images / --retain-images and check the anchor against their captions."""
    forget = retain = None
    if cfg.forget_images:
        forget = read_image_folder(cfg.forget_images, cfg.forget_caption, "--forget-images")
        if cfg.weighting == "loreun" and len(forget) < 2:
            raise ValueError(
                f"--weighting loreun: needs at least 2 forget items, and {cfg.forget_images} "
                "holds 1 image; add images or use --weighting uniform"
            )
        if cfg.objective == "remap":
            check_anchor(cfg.anchor, sorted({it.caption for it in forget}))
    if cfg.retain_images:
        retain = read_image_folder(cfg.retain_images, cfg.retain_caption, "--retain-images")
    return Folders(forget, retain)


def setup(
    cfg: EraseConfig, acc, out: Path, resume: Path | None = None, folders: Folders | None = None
) -> Run:
    """Load the model, pick trained tensors, build forget/retain items, mask, resume."""
    folders = folders or read_folders(cfg)
    pipe = load_pipeline(cfg.model, cfg.model_config)
    unet = pipe.unet.to(acc.device)
    unet.requires_grad_(False)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trained = select_parameters(unet, cfg.method)
    for p in trained.values():
        p.requires_grad_(True)
    teacher = FrozenTeacher(unet, trained)
    forget = build_forget_set(cfg, pipe, teacher, acc, out, folders.forget)
    retain = build_retain_set(cfg, pipe, teacher, acc, out, folders.retain, forget.uncond)
    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    objective = build_objective(cfg.objective, eta=cfg.negative_guidance, ga_bound=cfg.ga_bound)
    base_fp = fingerprint(teacher.base)
    mask = build_mask(cfg, acc, out, objective, unet, teacher, forget, trained, schedule, base_fp)
    weighting = build_weighting(
        cfg.weighting,
        len(forget),
        temperature=cfg.temperature,
        variant=cfg.loreun_variant,
        momentum=cfg.loreun_momentum,
        normalize=cfg.difficulty_norm == "timestep",
        num_train_timesteps=len(schedule),
        target_ess=cfg.target_ess,
    )
    if weighting.needs_difficulty and resume is None and can_differ(cfg):
        # a resumed run reloads its memory; at tau = inf every weight is 1 whatever the memory
        say(acc, f"probing the difficulty of {len(forget)} forget items")
        with acc.autocast():
            grid, t_grid = probe_grid(teacher, forget, schedule, cfg.seed, acc.device)
        weighting.fill(grid, t_grid)
    optimizer = torch.optim.AdamW(list(trained.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    prepared, optimizer = acc.prepare(unet, optimizer)
    ddim = make_ddim(pipe.scheduler.config, cfg.sample_steps) if cfg.xt_source != "cached" else None
    run = Run(
        pipe,
        prepared,
        trained,
        teacher,
        forget,
        weighting,
        optimizer,
        base_fp,
        schedule,
        ddim,
        objective,
        retain,
        mask,
    )
    resume_from(run, resume)
    return run


def build_forget_set(
    cfg: EraseConfig, pipe, teacher, acc, out: Path, images: list[ImageItem] | None
) -> ForgetSet:
    """Encode every prompt once; take x_0 from the images, or sample and cache it when needed."""
    anchor_prompt = cfg.erase_from if cfg.objective == "esd" else cfg.anchor
    extra = [""] + ([anchor_prompt] if anchor_prompt else [])
    size = pixel_size(pipe, cfg.resolution)
    emb = encode_prompts(pipe, extra, acc.device, size)
    captions = [it.caption for it in images] if images else cfg.concepts
    forget = ForgetSet(
        cond=encode_captions(pipe, captions, acc.device, size),
        uncond=emb[:1],
        anchor=emb[1:2] if anchor_prompt else None,
    )
    needs_x0 = cfg.xt_source == "cached" or cfg.weighting == "loreun" or cfg.saliency is not None
    if images:
        forget.x0 = cached_image_latents(cfg, pipe, acc, out / "cache" / "forget-images", images)
    elif needs_x0:
        forget.x0 = cached_samples(
            cfg, pipe, teacher, acc, out / "cache" / "forget", forget, cfg.concepts
        )
        forget = per_sample_items(forget)
    return forget


def build_retain_set(
    cfg: EraseConfig, pipe, teacher, acc, out: Path, images: list[ImageItem] | None, uncond
) -> ForgetSet | None:
    """Retain items from a folder or from base-model samples of --retain-concept prompts.

    ``uncond`` ([1, L, D], the empty prompt) is the forget set's, encoded once.
    """
    if not cfg.retain_weight:
        return None
    captions = [it.caption for it in images] if images else cfg.retain_concepts
    size = pixel_size(pipe, cfg.resolution)
    retain = ForgetSet(encode_captions(pipe, captions, acc.device, size), uncond, anchor=None)
    if images:
        retain.x0 = cached_image_latents(cfg, pipe, acc, out / "cache" / "retain-images", images)
    else:
        retain.x0 = cached_samples(
            cfg, pipe, teacher, acc, out / "cache" / "retain", retain, captions
        )
    return retain


def cached_image_latents(cfg, pipe, acc, stem: Path, images: list[ImageItem]) -> torch.Tensor:
    """VAE latents of a folder's images, cached under OUT/cache and reused while unchanged."""
    size = pixel_size(pipe, cfg.resolution)
    key = {"model": cfg.model, "images": folder_key(images, size)}

    def encode():
        say(acc, f"encoding {len(images)} images with the VAE")
        return encode_images(pipe, [it.path for it in images], size, acc.device)

    with acc.main_process_first():
        return load_or_sample_cache(stem.with_suffix(".safetensors"), key, encode)


def cached_samples(cfg, pipe, teacher, acc, stem: Path, items: ForgetSet, prompts) -> torch.Tensor:
    """Base-model samples of each prompt, cached under OUT/cache and reused by a rerun."""
    key = {
        "model": cfg.model,
        "concepts": prompts,
        "samples": cfg.samples_per_concept,
        "steps": cfg.sample_steps,
        "guidance": cfg.sample_guidance,
        "resolution": cfg.resolution,
        "seed": cfg.seed,
    }

    def sample():
        n = len(prompts) * cfg.samples_per_concept
        say(acc, f"sampling {n} images of {len(prompts)} prompts ({cfg.sample_steps} steps each)")
        with acc.autocast():
            return sample_forget_latents(
                teacher,
                pipe,
                items,
                cfg.samples_per_concept,
                cfg.sample_steps,
                cfg.sample_guidance,
                cfg.resolution,
                cfg.seed,
                acc.device,
            )

    with acc.main_process_first():  # the main process samples; the others read its cache
        return load_or_sample_cache(stem.with_name(stem.name + "-latents.safetensors"), key, sample)


def build_mask(cfg, acc, out, objective, unet, teacher, forget, trained, schedule, base_fp):
    """The saliency mask: loaded from --saliency-mask, reused from OUT, or computed and saved."""
    if cfg.saliency_mask:
        return load_mask(cfg.saliency_mask, trained, base_fp, "--saliency-mask")
    if cfg.saliency is None:
        return None
    path = out / SALIENCY_MASK
    key = {
        "fraction": cfg.saliency,
        "objective": cfg.objective,
        "method": cfg.method,
        "base_fingerprint": base_fp,
        "seed": cfg.seed,
    }
    with acc.main_process_first():
        if mask_key(path) == key:  # a resumed run keeps its mask
            return load_mask(path, trained, base_fp, "--resume")
        say(acc, f"saliency: the forget gradient of {len(forget)} items")
        with acc.autocast():
            grads = forget_gradient(
                objective, unet_eps(unet), teacher, forget, trained, schedule, cfg.seed, acc.device
            )
        mask = top_fraction_mask({n: g.abs() for n, g in grads.items()}, cfg.saliency)
        if acc.is_main_process:
            save_mask(path, mask, key)
        return mask


def resume_from(run: Run, folder: Path | None) -> None:
    """Restore trained tensors, optimizer and weighting memory from a checkpoint."""
    if folder is None:
        return
    step, tensors, optim_state, weighting_state = load_checkpoint(folder)
    missing = sorted(set(run.trained) - set(tensors))
    if missing:
        raise ValueError(
            f"--resume: {folder} was made with other settings (e.g. another "
            f"--method); it lacks {missing[0]}"
        )
    with torch.no_grad():
        for name, p in run.trained.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
    run.optimizer.load_state_dict(optim_state)
    run.weighting.load_state_dict(weighting_state)
    run.start_step = step


def train(run: Run, cfg: EraseConfig, acc, out: Path) -> int:
    """The loop. Returns the number of optimizer steps done."""
    from tqdm.auto import tqdm

    stop = StopFlag()
    bar = tqdm(
        total=cfg.steps,
        initial=run.start_step,
        desc="erase",
        disable=not acc.is_main_process or quiet(),
    )
    log = open(out / TRAIN_LOG, "a") if acc.is_main_process else None
    step = run.start_step
    try:
        with stop.installed():
            while step < cfg.steps:
                started = time.perf_counter()
                stats = train_step(run, cfg, acc, step)
                seconds = time.perf_counter() - started
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4g}", ess=f"{stats['ess_fraction']:.2f}")
                if log:
                    log.write(json.dumps({"step": step, **stats, "seconds": seconds}) + "\n")
                    log.flush()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpoint(run, cfg, acc, out, step)
                if stop.synced(acc):
                    path = checkpoint(run, cfg, acc, out, step)
                    raise TrainingInterrupted(
                        f"interrupted at step {step}; saved {path}; continue with --resume latest"
                    )
    finally:
        bar.close()
        if log:
            log.close()
    return step


def train_step(run: Run, cfg: EraseConfig, acc, step: int) -> dict[str, float]:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches.

    Returns:
        {"loss": mean total loss, "forget": its weighted forget term, "retain": its retain
        term (before alpha), "ess": effective sample size of the forget-set weights}; the
        losses are means over micro-batches and processes.
    """
    sums = torch.zeros(3, device=acc.device)
    for micro in range(cfg.gradient_accumulation_steps):
        k = step * cfg.gradient_accumulation_steps + micro
        with acc.accumulate(run.unet):
            loss, forget_term, retain_term = micro_batch_loss(run, cfg, acc, k)
            check_finite(loss, step, acc, cfg)
            acc.backward(loss)
            if acc.sync_gradients:
                if run.mask is not None:
                    mask_gradients(run.trained, run.mask)
                if cfg.max_grad_norm:
                    acc.clip_grad_norm_(list(run.trained.values()), cfg.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients and run.mask is not None:
                restore_masked(run.trained, run.mask, run.teacher.base)
        sums += torch.stack([loss.detach(), forget_term, retain_term]).float()
    if acc.num_processes > 1:  # report the mean over processes, not process 0's alone
        sums = acc.reduce(sums, reduction="mean")
    means = (sums / cfg.gradient_accumulation_steps).tolist()  # read once, for the log
    stats = {"loss": means[0], "forget": means[1], "retain": means[2]}
    return {**stats, **weighting_stats(run.weighting, len(run.forget))}


def weighting_stats(weighting, num_items: int) -> dict[str, float]:
    """ESS of the weights in force, absolute and as a fraction of the items they span, and the
    dynamic memory's rank correlation with its fill (how far it has moved)."""
    weights = weighting.all_weights()
    n = len(weights) if weights is not None else num_items
    ess = effective_sample_size(weights) if weights is not None else float(n)
    stats = {"ess": ess, "ess_fraction": ess / n}
    drift = weighting.drift()
    if drift is not None:
        stats["memory_rank_corr"] = drift
    return stats


def micro_batch_loss(run: Run, cfg: EraseConfig, acc, k: int) -> tuple[torch.Tensor, ...]:
    """``sum(w * l_forget) / B + alpha * mean(l_retain)`` for micro-batch ``k``.

    Only the forget term is reweighted (LoReUn); the retain term is the plain denoising loss.

    Returns:
        (the loss to backpropagate, the forget term and the retain mean as detached scalars,
        left on the device so logging does not stall the step)
    """
    g = step_generator(cfg.seed, acc.process_index, k)
    ids = item_ids(len(run.forget), cfg.batch_size, cfg.seed, acc.process_index, k)
    batch = draw_batch(run, cfg, acc, ids, g)
    student = unet_eps(run.unet)
    with acc.autocast():
        losses, pred = run.objective(student, run.teacher, batch)
    observe_difficulty(run, cfg, acc, batch, pred, g)
    w = run.weighting.weights(ids).to(losses.device)
    loss = (w * losses).sum() / len(losses)
    forget_term, retain_term = loss.detach(), torch.zeros((), device=loss.device)
    if run.retain is not None:
        rids = item_ids(len(run.retain), cfg.batch_size, cfg.seed, acc.process_index, k, stream=1)
        rbatch = cached_batch(run.retain, rids, g, run.schedule, acc.device)
        with acc.autocast():
            retain_losses, _ = denoising_loss(student, rbatch)
        retain_term = retain_losses.mean()
        loss = loss + cfg.retain_weight * retain_term
        retain_term = retain_term.detach()
    return loss, forget_term, retain_term


def draw_batch(run: Run, cfg: EraseConfig, acc, ids: torch.Tensor, g: torch.Generator):
    """x_t for the sampled items from the configured source (see ``sampling``)."""
    if cfg.xt_source == "cached":
        return cached_batch(run.forget, ids, g, run.schedule, acc.device)
    raw = acc.unwrap_model(run.unet)
    eps = unet_eps(raw) if cfg.xt_source == "partial-train" else run.teacher
    shape = latent_shape(run.pipe, cfg.resolution)
    with acc.autocast():
        return partial_batch(
            eps, run.forget, ids, g, run.ddim, cfg.sample_guidance, shape, acc.device
        )


def observe_difficulty(run: Run, cfg: EraseConfig, acc, batch, pred, g) -> None:
    """Feed dynamic LoReUn the current difficulty of the batch's items, gathered over processes.

    With a forward-noised source the student's prediction already is the denoising output, so
    difficulty is free; partial sampling needs one extra no-grad probe on the cached samples.
    """
    if not (run.weighting.needs_difficulty and cfg.loreun_variant != "static"):
        return
    if batch.target is not None:
        t, diff = batch.t, per_sample_mse(pred.detach(), batch.target)
    else:
        t = torch.randint(0, len(run.schedule), (len(batch.ids),), generator=g)
        noise = torch.randn((len(batch.ids), *run.forget.x0.shape[2:]), generator=g)
        with acc.autocast():
            diff = probe_difficulty(
                unet_eps(acc.unwrap_model(run.unet)),
                run.forget,
                batch.ids,
                t,
                noise,
                run.schedule,
                acc.device,
            )
    ids = batch.ids
    if acc.num_processes > 1 and cfg.loreun_variant == "dynamic":
        # every process folds in every process's items, identically
        ids, t, diff = (acc.gather(x.to(acc.device)).cpu() for x in (ids, t, diff))
    run.weighting.observe(ids, t, diff)


def check_finite(loss: torch.Tensor, step: int, acc, cfg: EraseConfig) -> None:
    """Stop every process together when any process's loss is NaN or inf."""
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=acc.device)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction="sum")
    if bad.item() > 0:
        raise TrainingDiverged(
            f"loss became {loss.item()} at step {step + 1}; stopped without exporting. "
            f"{_recovery_hint(cfg)}"
        )


def checkpoint(run: Run, cfg: EraseConfig, acc, out: Path, step: int) -> Path:
    """Save a checkpoint from the main process, after checking that the state is finite; every
    process waits for it."""
    path = out / "checkpoints" / f"checkpoint-{step}"
    acc.wait_for_everyone()
    if acc.is_main_process:
        trained = {n: p.detach() for n, p in run.trained.items()}
        check_finite_state(trained, run.optimizer, step, cfg)
        save_checkpoint(
            out,
            step,
            trained,
            run.optimizer,
            run.weighting.state_dict(),
            cfg.checkpoints_total_limit,
            cfg.to_json(),
        )
    acc.wait_for_everyone()
    return path


def check_finite_state(trained: dict[str, torch.Tensor], optimizer, step: int, cfg) -> None:
    """Raise TrainingDiverged if a trained tensor or the optimizer state holds NaN or inf.

    A finite loss can still give a non-finite update; checking the state itself, before it is
    saved, keeps every checkpoint on disk a good one, so ``--resume latest`` never picks a bad
    one.
    """
    tensors = list(trained.items())
    if optimizer is not None:
        for i, st in enumerate(optimizer.state_dict()["state"].values()):
            tensors += [(f"optimizer state {i}.{k}", v) for k, v in st.items() if v.ndim > 0]
    bad = next((n for n, t in tensors if not torch.isfinite(t).all()), None)
    if bad is not None:
        raise TrainingDiverged(
            f"{bad} became NaN or inf by step {step}; nothing was saved for this step. "
            f"{_recovery_hint(cfg)}"
        )


def _recovery_hint(cfg) -> str:
    from .checkpoint import list_checkpoints

    found = list_checkpoints(cfg.out)
    kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was kept"
    return (
        f"{kept.capitalize()}; lower --lr (or set --max-grad-norm) and start again with "
        "--overwrite, which reuses the cached samples"
    )


class StopFlag:
    """Turns the first Ctrl-C into a request to checkpoint and stop after the current step.

    A second Ctrl-C interrupts at once.
    """

    def __init__(self):
        self.requested = False

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        old = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, old)

    def synced(self, acc) -> bool:
        """True when any process was asked to stop, so all stop at the same step."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=acc.device)
        if acc.num_processes > 1:
            flag = acc.reduce(flag, reduction="sum")
        return flag.item() > 0
