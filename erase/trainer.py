"""The erase recipe: setup -> train -> export, read top to bottom.

One loop combines the pieces that are tested on their own: an objective gives per-sample losses
[B], a weighting gives per-sample weights [B], and the loss is ``sum(w * l) / B`` (dividing by
``sum(w)`` instead would cancel any weight at batch size 1). Items come from ``items``,
checkpoints from ``checkpoint``, what trains and its teacher from ``teachers``, the mask from
``saliency``; the family and schedule answer through ``pipelines/family.py`` and ``schedule.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.state import AcceleratorState

from loreun.pipelines.family import Family
from loreun.pipelines.files import TRAIN_LOG, open_append
from loreun.pipelines.meta import quiet
from loreun.pipelines.runtime import StopFlag, multi_cpu_launch, restart_rate, say, warn
from loreun.pipelines.schedule import Sampler, Schedule, schedule_of

from .adversarial import AdversarialPool, build_pool, grow_pool, pool_term
from .checkpoint import (
    TrainingDiverged,
    check_finite_loss,
    restore_checkpoint,
    save_run_checkpoint,
    start_run,
)
from .concept_losses import ConceptLosses
from .config import EraseConfig
from .difficulty import observe_difficulty, probe_grid, reliability_line
from .export import export_run
from .items import Folders, ItemSet, build_forget_set, build_retain_set, read_folders
from .objectives import Objective, denoising_loss, objective_for
from .optim import prepare_optimizer
from .saliency import build_mask, mask_gradients, restore_masked
from .streams import item_ids, step_generator
from .teachers import AdapterOffTeacher, FrozenTeacher, load_denoiser, trainable
from .text_encoder import StudentText, build_student_text, read_through
from .uce import run_uce
from .weighting import Weighting, weighting_for, weighting_stats
from .xt_sources import cached_batch, draw_batch, partial_sampler

__all__ = ["erase", "TrainingDiverged", "TrainingInterrupted"]


class TrainingInterrupted(Exception):
    """Ctrl-C during training; a checkpoint was saved first."""


@dataclass
class Run:
    """Everything the loop needs, built once by ``setup``."""

    pipe: object
    family: Family
    denoiser: torch.nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    trained: dict[str, torch.nn.Parameter]
    teacher: FrozenTeacher | AdapterOffTeacher
    forget: ItemSet
    weighting: Weighting
    objective: Objective
    schedule: Schedule
    optimizer: torch.optim.Optimizer | None = None
    base_fingerprints: dict[str, str] | None = None  # header key -> fingerprint
    sampler: Sampler | None = None  # for the sampling x_t sources (partial, trajectory)
    retain: ItemSet | None = None
    mask: dict[str, torch.Tensor] | None = None
    adversarial: AdversarialPool | None = None  # --adversarial's prompts
    text: StudentText | None = None  # --train text-encoder/both: the student's prompts
    concept_losses: ConceptLosses | None = None  # each concept's loss, for the train log
    start_step: int = 0


def erase(cfg: EraseConfig) -> Path:
    """Erase ``cfg.concepts`` from ``cfg.model`` and export the result to ``cfg.out``.

    Runs on one process, or on several under ``accelerate launch`` / ``torchrun``.

    Returns:
        Path of the exported ``erased.safetensors``.
    """
    acc, ours = start_accelerator(cfg)
    # The precision accelerate chose is the run's: recorded in erase_config.json and compared
    # on resume like any other setting.
    cfg = dataclasses.replace(cfg, mixed_precision=acc.mixed_precision)
    lock = None
    try:
        folders = read_folders(cfg)  # bad images or captions fail before anything is written
        out, lock, resume = start_run(cfg, acc)
        if cfg.objective_slot().CLOSED_FORM:  # UCE solves once; nothing trains
            return run_uce(cfg, acc, out)
        say(acc, f"loading {cfg.model}")
        run = setup(cfg, acc, out, resume, folders)
        steps_done = train(run, cfg, acc, out)
        return export_run(run, cfg, acc, out, steps_done)
    finally:
        if lock is not None:
            lock.release()
        acc.end_training()
        if ours:
            # accelerate keeps one state per process; a later erase() in this process (a
            # notebook) may then choose another precision
            AcceleratorState._reset_state()


def start_accelerator(cfg: EraseConfig):
    """(the run's Accelerator, whether this call created accelerate's process-wide state).

    ``cfg.mixed_precision`` None leaves the choice to accelerate (``accelerate launch
    --mixed_precision``, ``accelerate config``), as diffusers' training scripts do.
    """
    from accelerate import Accelerator

    ours = not AcceleratorState._shared_state  # a caller's own Accelerator keeps its state
    acc = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=multi_cpu_launch(),
    )
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and acc.num_processes == 1:
        say(
            acc,
            "accelerate launch --cpu starts one process; for several CPU processes use "
            "torchrun --nproc_per_node N -m loreun.cli erase ...",
        )
    return acc, ours


def setup(
    cfg: EraseConfig, acc, out: Path, resume: Path | None = None, folders: Folders | None = None
) -> Run:
    """Load the model, pick trained tensors, build forget/retain items, mask, resume."""
    folders = folders or read_folders(cfg)
    pipe, family, denoiser = load_denoiser(cfg, acc)
    trained, teacher, fingerprints = trainable(cfg, family, denoiser, pipe)
    base_fp = fingerprints["base_fingerprint"]
    forget = build_forget_set(cfg, pipe, teacher, acc, out, folders.forget)
    retain = build_retain_set(cfg, pipe, teacher, acc, out, folders.retain, forget.uncond)
    text = build_student_text(cfg, pipe, family, forget, retain, acc)
    schedule = schedule_of(pipe, cfg.resolution)
    objective = objective_for(cfg)
    student = family.predictor(denoiser)
    parts = dict(student=student, teacher=teacher, forget=forget, trained=trained)
    mask = build_mask(
        cfg, acc, out, objective=objective, schedule=schedule, base_fp=base_fp, **parts
    )
    weighting = weighting_for(cfg, len(forget), schedule)
    probe = weighting.needs_difficulty and cfg.weighting_slot().can_differ(cfg)
    if probe and resume is None:
        # a resumed run reloads its memory; at tau = inf every weight is 1 whatever the memory
        k = weighting.probe_times
        say(acc, f"probing the difficulty of {len(forget)} forget items at {k} times")
        with acc.autocast():
            grid, t_grid = probe_grid(teacher, forget, schedule, cfg.seed, acc.device, k)
        weighting.fill(grid, t_grid)
        line = reliability_line(weighting.summary(), weighting.min_reliability)
        (warn if weighting.summary().get("fell_back_to_uniform") else say)(acc, line)
    prepared, optimizer = prepare_optimizer(cfg, acc, denoiser, trained, mask)
    sampler = partial_sampler(cfg, pipe, schedule)
    run = Run(
        pipe=pipe,
        family=family,
        denoiser=prepared,
        trained=trained,
        teacher=teacher,
        forget=forget,
        weighting=weighting,
        objective=objective,
        schedule=schedule,
        optimizer=optimizer,
        base_fingerprints=fingerprints,
        sampler=sampler,
        retain=retain,
        mask=mask,
        adversarial=build_pool(cfg, forget, schedule, pipe),
        text=text,
        concept_losses=ConceptLosses(forget.captions),
    )
    if not restore_checkpoint(run, resume):
        say(acc, f"{resume} holds no optimizer state: the optimizer restarts from zero moments")
    return run


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
    log = open_append(out / TRAIN_LOG) if acc.is_main_process else None
    step = run.start_step
    try:
        with stop.installed():
            while step < cfg.steps:
                started = time.perf_counter()
                found = adversarial_round(run, cfg, acc, step)
                reprobe(run, cfg, acc, step)
                stats = train_step(run, cfg, acc, step)
                seconds = time.perf_counter() - started
                step += 1
                bar.update(1)
                if step == run.start_step + 1:
                    restart_rate(bar)  # the first step (warm-up) would skew the ETA
                bar.set_postfix(loss=f"{stats['loss']:.4g}", ess=f"{stats['ess_fraction']:.2f}")
                concepts = run.concept_losses.pop()  # every process, so none holds on to them
                if log:
                    record = {"step": step, **stats, **found, "concepts": concepts}
                    record["seconds"] = seconds
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    save_run_checkpoint(run, cfg, acc, out, step)
                if stop.synced(acc):
                    path = save_run_checkpoint(run, cfg, acc, out, step)
                    raise TrainingInterrupted(
                        f"interrupted at step {step}; saved {path}; continue with --resume latest"
                    )
    finally:
        bar.close()
        if log:
            log.close()
    return step


def adversarial_round(run: Run, cfg: EraseConfig, acc, step: int) -> dict:
    """At every ``--adversarial-every``-th step, attack the current weights and grow the pool;
    returns what the train log records of it (nothing on other steps)."""
    if run.adversarial is None or step == 0 or step % cfg.adversarial_every:
        return {}
    entry = grow_pool(run, cfg, acc, step)
    say(acc, f"step {step}: the attack found {entry.text!r}; pool {len(run.adversarial)}")
    return {"adversarial_prompt": entry.text, "attack_loss": entry.loss}


def reprobe(run: Run, cfg: EraseConfig, acc, step: int) -> None:
    """Every ``reprobe_every`` steps, probe the forget items on the fill's grid under the
    current weights and hand the weighting the new difficulties (``LoReUnWeighting.refill``)."""
    every = run.weighting.reprobe_every
    if not every or step == 0 or step % every:
        return
    student = run.family.predictor(acc.unwrap_model(run.denoiser))
    with torch.no_grad(), acc.autocast():
        grid, t_grid = probe_grid(
            student, run.forget, run.schedule, cfg.seed, acc.device, run.weighting.probe_times
        )
    run.weighting.refill(grid, t_grid)


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
        with acc.accumulate(run.denoiser):
            loss, forget_term, retain_term = micro_batch_loss(run, cfg, acc, k)
            check_finite_loss(loss, step, acc, cfg)
            acc.backward(loss)
            if acc.sync_gradients and not cfg.step_in_backward:  # else the hooks did it
                if run.mask is not None:
                    mask_gradients(run.trained, run.mask)
                if cfg.max_grad_norm:
                    acc.clip_grad_norm_(list(run.trained.values()), cfg.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients and run.mask is not None and run.teacher.exact:
                # rounded frozen copies cannot restore; without weight decay (checked in the
                # config) a weight whose gradient is always zero does not move in the first place
                restore_masked(run.trained, run.mask, run.teacher.base)
        sums += torch.stack([loss.detach(), forget_term, retain_term]).float()
    if acc.num_processes > 1:  # report the mean over processes, not process 0's alone
        sums = acc.reduce(sums, reduction="mean")
    means = (sums / cfg.gradient_accumulation_steps).tolist()  # read once, for the log
    stats = {"loss": means[0], "forget": means[1], "retain": means[2]}
    if run.adversarial is not None:
        stats["pool"] = len(run.adversarial)
    return {**stats, **weighting_stats(run.weighting, len(run.forget))}


def micro_batch_loss(run: Run, cfg: EraseConfig, acc, k: int) -> tuple[torch.Tensor, ...]:
    """``sum(w * l_forget) / B + alpha * mean(l_retain)`` for micro-batch ``k``.

    Only the forget term is reweighted (LoReUn); the retain term is the plain denoising loss.

    Returns:
        (the loss to backpropagate, the forget term and the retain mean as detached scalars,
        left on the device so logging does not stall the step)
    """
    g = step_generator(cfg.seed, acc.process_index, k)
    ids = item_ids(len(run.forget), cfg.batch_size, cfg.seed, acc.process_index, k)
    batch = read_through(run.text, draw_batch(run, cfg, acc, ids, g), "forget")
    student = run.family.predictor(run.denoiser)
    with acc.autocast():
        losses, pred = run.objective(student, run.teacher, batch)
    observe_difficulty(run, acc, batch, pred, g)
    run.concept_losses.add(ids, losses)
    w = run.weighting.weights(ids).to(losses.device)
    loss = (w * losses).sum() / len(losses)
    adversarial = pool_term(run, cfg, acc, k, g, student)
    loss = loss if adversarial is None else loss + adversarial
    forget_term, retain_term = loss.detach(), torch.zeros((), device=loss.device)
    if run.retain is not None:
        rids = item_ids(len(run.retain), cfg.batch_size, cfg.seed, acc.process_index, k, stream=1)
        rbatch = cached_batch(run.retain, rids, g, run.schedule, acc.device)
        rbatch = read_through(run.text, rbatch, "retain")
        with acc.autocast():
            retain_losses, _ = denoising_loss(student, rbatch)
        retain_term = retain_losses.mean()
        loss = loss + cfg.retain_weight * retain_term
        retain_term = retain_term.detach()
    return loss, forget_term, retain_term
