"""Output folders and resumable checkpoints of an erase run.

A checkpoint holds only what cannot be recomputed: the trained tensors, the optimizer state, the
weighting's memory and the step. Every random draw of a step is a pure function of (seed, process
rank, step), so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loreun.pipelines import outputs
from loreun.pipelines.files import (
    CHECKPOINTS,
    ERASE_CONFIG,
    TRAIN_LOG,
    FolderLock,
    atomic_save_safetensors,
    atomic_write_text,
    check_apart,
    check_writable,
    make_dir,
    read_json,
    refuse_link,
    remove_ours,
    replace_folder,
    temp_dir,
)
from loreun.pipelines.outputs import read_jsonl

from .adversarial import encode_ids
from .config import EraseConfig, changed_settings

CHECKPOINT_FILES = ("trained.safetensors", "optimizer.pt", "state.json", ERASE_CONFIG)


def prepare_output_dir(
    out: str | Path, overwrite: bool, resume: str | None, create: bool = True
) -> tuple[Path, FolderLock | None]:
    """Create and lock the output folder, refusing to write into someone's non-empty folder.

    With ``overwrite`` (and no ``resume``) loreun's own checkpoints are removed, file by file:
    a user's file inside one of them is kept. Leftovers of a killed checkpoint write go too.

    A folder that only a run stopped before its first step wrote into (``never_started``) is
    not a finished run: the retry goes ahead without ``overwrite``.

    Raises:
        FileExistsError: ``out`` is a non-empty folder and neither ``overwrite`` nor ``resume``
            was given, ``out`` is a file, or another run holds its lock.
        PermissionError: ``out`` cannot be written.

    Returns:
        (the folder, its lock); ``create=False`` only checks and returns no lock: with several
        processes, one creates and locks, and the others check.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out: {out} is a file, not a folder")
    found = [p for p in out.iterdir() if p.name != FolderLock.NAME] if out.is_dir() else []
    if found and not (overwrite or resumes_here(out, resume) or never_started(out)):
        raise FileExistsError(
            f"--out: {out} is not empty; pass --overwrite to write into it "
            "(files loreun did not write are kept) or --resume latest"
        )
    if not create:
        return out, None
    lock = FolderLock(check_writable(out)).acquire()
    for stale in (out / CHECKPOINTS).glob(".checkpoint-*.tmp-*"):  # a killed write's leftovers
        remove_ours(stale, CHECKPOINT_FILES)
    if overwrite and not resume:
        for ckpt in list_checkpoints(out):
            remove_ours(ckpt, CHECKPOINT_FILES)
    return out, lock


def resumes_here(out: Path, resume: str | None) -> bool:
    """Whether ``resume`` continues the run in ``out`` (``latest``, or one of its own
    checkpoints). A checkpoint of another folder starts a new run from it, into a folder that
    must be empty, like any new run's, or given with --overwrite."""
    if resume is None:
        return False
    if resume == "latest":
        return True
    return Path(resume).resolve().parent == (out / CHECKPOINTS).resolve()


def never_started(out: Path) -> bool:
    """Whether ``out`` holds only what a run into this same folder left before its first step
    (a typo in --model, a bad forget image, a failed sampling): its config, an empty log and
    its self-checking cache. The corrected command may then start there without --overwrite
    (the cache is reused where its key still matches, and nothing else is there to lose)."""
    if not (out / ERASE_CONFIG).is_file() or not outputs.never_started(
        out, ERASE_CONFIG, ("cache",)
    ):
        return False
    try:
        saved = json.loads((out / ERASE_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # not loreun's config: the user's file
    where = saved.get("out") if isinstance(saved, dict) else None
    return isinstance(where, str) and Path(where).resolve() == out.resolve()


def list_checkpoints(out: str | Path) -> list[Path]:
    """loreun's checkpoint folders under ``out``, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.glob("checkpoint-*")
        if p.is_dir() and p.name.split("-")[-1].isdigit() and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume(out: Path, resume: str | None) -> Path | None:
    """'latest' -> newest checkpoint under ``out``; a path -> that checkpoint; None -> None."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(out)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint under {out / CHECKPOINTS}")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume: {resume} is not a loreun checkpoint folder")
    return path


def save_checkpoint(
    out: Path,
    step: int,
    trained: dict[str, torch.Tensor],
    optimizer,
    weighting_state: dict,
    limit: int,
    config_json: str,
    world_size: int = 1,
    extra: dict | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` through a temporary folder, then keep the newest ``limit``.

    ``optimizer`` None leaves the optimizer state out (AdamW's moments are twice the trained
    tensors, most of a full-tensor checkpoint); a resume then restarts them.

    The run's config goes into each checkpoint, so a resume can compare its settings with the
    ones that made the steps it continues. ``extra`` (the adversarial pool) joins the state.
    """
    root = make_dir(Path(out) / CHECKPOINTS)
    final = refuse_link(root / f"checkpoint-{step}")
    tmp = temp_dir(final)
    atomic_save_safetensors(tmp / "trained.safetensors", trained, metadata={"step": str(step)})
    if optimizer is not None:
        try:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        except (RuntimeError, OSError) as e:  # torch.save reports a full disk as RuntimeError
            raise OSError(f"cannot write {tmp / 'optimizer.pt'}: {e}") from None
    atomic_write_text(tmp / ERASE_CONFIG, config_json)
    state = {"step": step, "weighting": weighting_state, "world_size": world_size, **(extra or {})}
    atomic_write_text(tmp / "state.json", json.dumps(state))
    replace_folder(tmp, final)
    for old in list_checkpoints(out)[:-limit]:
        remove_ours(old, CHECKPOINT_FILES)
    return final


def load_checkpoint(folder: Path) -> tuple[int, dict[str, torch.Tensor], dict, dict]:
    """Read a checkpoint written by ``save_checkpoint``.

    Returns:
        (step, trained tensors, optimizer state dict, weighting state dict)
    """
    from safetensors import SafetensorError, safe_open

    state = read_state(folder)
    path = folder / "trained.safetensors"
    try:
        with safe_open(str(refuse_link(path)), framework="pt") as f:
            saved_step = (f.metadata() or {}).get("step")
            trained = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"--resume: {path}: not a readable checkpoint file ({e})") from None
    if saved_step is not None and saved_step != str(state["step"]):
        raise ValueError(
            f"--resume: {path} holds step {saved_step}'s weights but {folder / 'state.json'} "
            f"says step {state['step']}; the checkpoint was edited or mixed with another"
        )
    # Our own file, loaded without arbitrary unpickling; absent when it was left out.
    path = folder / "optimizer.pt"
    try:
        optim = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    except Exception as e:  # torch reports a torn or foreign file in many ways
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--resume: {path}: not a readable optimizer state ({first})") from None
    return state["step"], trained, optim, state["weighting"]


def read_state(folder: Path) -> dict:
    """A checkpoint's ``state.json``, checked: a step that is a whole number agreeing with the
    folder's name, and a weighting state. An edited or torn file is refused by name."""
    path = folder / "state.json"
    state = read_json(path, "--resume")
    step = state.get("step")
    if (
        not isinstance(step, int)
        or isinstance(step, bool)
        or not isinstance(state.get("weighting"), dict)
    ):
        raise ValueError(f"--resume: {path}: not a loreun checkpoint state")
    if folder.name != f"checkpoint-{step}":
        raise ValueError(
            f"--resume: {path} says step {step} but its folder is {folder.name}; the "
            "checkpoint was edited or renamed"
        )
    return state


def checkpoint_config(folder: Path) -> dict:
    """The config saved with a checkpoint; without it nothing says which settings made its
    steps, so the resume is refused rather than continued with whatever is given."""
    path = folder / ERASE_CONFIG
    if not path.is_file():
        raise ValueError(
            f"--resume: {folder} holds no {ERASE_CONFIG}, so its settings cannot be checked "
            "against this run's; start a new run instead"
        )
    return read_json(path, "--resume")


def check_log_reaches(out: Path, step: int, checkpoint: Path) -> None:
    """The train log has a line for the checkpoint's step (it is written before the
    checkpoint), so it is never cut back on a checkpoint's word alone."""
    path = Path(out) / TRAIN_LOG
    if not path.is_file() or checkpoint.resolve().parent != (Path(out) / CHECKPOINTS).resolve():
        return  # a checkpoint of another folder has its log there
    steps = {rec.get("step") for rec in read_jsonl(path) if isinstance(rec, dict)}
    if step not in steps:
        raise ValueError(
            f"--resume: {path} has no line for step {step}, which {checkpoint} was saved at; "
            "the log and the checkpoint belong to different runs"
        )


def start_log(out: Path, resume_step: int | None) -> None:
    """Begin train_log.jsonl: empty for a new run; for a resumed one, cut the lines past the
    checkpoint's step, which the resumed run writes again."""
    path = Path(out) / TRAIN_LOG
    if resume_step is None or not path.is_file():
        atomic_write_text(path, "")
        return
    kept = [
        json.dumps(rec) + "\n"
        for rec in read_jsonl(path)  # a line torn by a kill is dropped
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= resume_step
    ]
    atomic_write_text(path, "".join(kept))


class TrainingDiverged(RuntimeError):
    """The loss or the trained state became NaN or inf; nothing was exported, and every
    checkpoint kept is finite."""


def check_resume_settings(resume: Path | None, cfg: EraseConfig, world_size: int = 1) -> None:
    """Refuse a resume whose settings, or number of processes, differ from the ones that made
    its checkpoint: each process draws its own batches, so either changes the steps to come."""
    if resume is None:
        return
    saved = checkpoint_config(resume)
    made_with = read_state(resume).get("world_size", world_size)
    if made_with != world_size:
        raise ValueError(
            f"--resume: {resume} was made by {made_with} processes, this run has {world_size}; "
            "resume with the same launcher settings"
        )
    changed = changed_settings(saved, cfg)
    if changed:
        raise ValueError(
            f"--resume: {resume} was made with other settings ({', '.join(changed)} differ); "
            "resume with the same ones, or start a new run with --overwrite or another --out"
        )


def load_step(resume: Path | None) -> int | None:
    return read_state(resume)["step"] if resume else None


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
            f"{recovery_hint(cfg)}"
        )


def recovery_hint(cfg) -> str:
    """What to do after a divergence, naming the last checkpoint whose weights are finite (one
    written elsewhere, or edited, may not be: it is read before it is called good)."""
    good = next((c for c in reversed(list_checkpoints(cfg.out)) if _finite_checkpoint(c)), None)
    kept = f"the last good checkpoint is {good}" if good else "no good checkpoint was kept"
    return (
        f"{kept.capitalize()}; lower --lr (or set --max-grad-norm) and start again with "
        "--overwrite, which reuses the cached samples"
    )


def _finite_checkpoint(folder: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(folder / "trained.safetensors"), framework="pt") as f:
            return all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
    except (SafetensorError, OSError):
        return False


def restore_checkpoint(run, folder: Path | None) -> bool:
    """Put a checkpoint's trained tensors, optimizer and weighting state into a trainer ``Run``.

    Returns:
        False when the checkpoint holds no optimizer state (the optimizer restarts).
    """
    if folder is None:
        return True
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
    if optim_state is not None:
        run.optimizer.load_state_dict(optim_state)
    run.weighting.load_state_dict(weighting_state)
    if run.adversarial is not None:
        saved = read_state(folder).get("adversarial")
        if not isinstance(saved, dict):
            raise ValueError(f"--resume: {folder} holds no adversarial pool")
        run.adversarial.load_state_dict(saved, lambda ids, e: encode_ids(run.pipe, ids, e))
    run.start_step = step
    return optim_state is not None


def check_finite_loss(loss: torch.Tensor, step: int, acc, cfg: EraseConfig) -> None:
    """Stop every process together when any process's loss is NaN or inf."""
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=acc.device)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction="sum")
    if bad.item() > 0:
        raise TrainingDiverged(
            f"loss became {loss.item()} at step {step + 1}; stopped without exporting. "
            f"{recovery_hint(cfg)}"
        )


def save_run_checkpoint(run, cfg: EraseConfig, acc, out: Path, step: int) -> Path:
    """Save a checkpoint from the main process, after checking that the state is finite; every
    process waits for it."""
    path = out / CHECKPOINTS / f"checkpoint-{step}"
    acc.wait_for_everyone()
    if acc.is_main_process:
        trained = {n: p.detach() for n, p in run.trained.items()}
        check_finite_state(trained, run.optimizer, step, cfg)
        save_checkpoint(
            out,
            step,
            trained,
            None if cfg.checkpoint_without_optimizer else run.optimizer,
            run.weighting.state_dict(),
            cfg.checkpoints_total_limit,
            cfg.to_json(),
            acc.num_processes,
            None if run.adversarial is None else {"adversarial": run.adversarial.state_dict()},
        )
    acc.wait_for_everyone()
    return path


def start_run(cfg: EraseConfig, acc) -> tuple[Path, FolderLock | None, Path | None]:
    """Claim and lock ``--out``, find the checkpoint to resume, check its settings, and write
    the config and a fresh (or cut back) log: everything that can fail before the model loads.

    Returns:
        (the output folder, its lock on the main process, the checkpoint to resume or None)
    """
    inputs = {
        "--model": cfg.model,
        "--config": cfg.model_config,
        "--concepts-file": cfg.concepts_file,
        "--forget-images": cfg.forget_images,
        "--retain-images": cfg.retain_images,
        "--saliency-mask": cfg.saliency_mask,
        "--init-from": cfg.init_from,
    }
    check_apart(cfg.out, inputs)
    with acc.main_process_first():  # one process creates and locks, the others check
        out, lock = prepare_output_dir(
            cfg.out, cfg.overwrite, cfg.resume, create=acc.is_main_process
        )
    resume = resolve_resume(out, cfg.resume)
    check_resume_settings(resume, cfg, acc.num_processes)
    if resume is not None:
        step = load_step(resume)
        if cfg.steps < step:
            raise ValueError(
                f"--steps: {cfg.steps} is below the {step} steps {resume} was saved at; give "
                f"--steps {step} or more, or start a new run"
            )
        check_log_reaches(out, step, resume)
    acc.wait_for_everyone()  # every process has checked --out before anything is written
    if acc.is_main_process:
        atomic_write_text(out / ERASE_CONFIG, cfg.to_json())
        start_log(out, load_step(resume))
    acc.wait_for_everyone()
    return out, lock, resume
