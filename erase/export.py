"""Export erased weights: trained tensors with a self-describing header."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from loreun.pipelines.family import family_of
from loreun.pipelines.files import (
    ERASE_CONFIG,
    ERASED_FILE,
    LEGACY_ERASED_FILE,
    FolderLock,
    atomic_save_safetensors,
    atomic_write_text,
    check_apart,
    read_json,
    recover_folder,
    refuse_link,
    replace_folder,
    temp_dir,
)
from loreun.pipelines.loading import (
    FINGERPRINT_KEYS,
    FORMAT_VERSION,
    METADATA_KEY,
    content_hash,
    read_erased,
    read_erased_file,
)
from loreun.pipelines.meta import package_version
from loreun.pipelines.models import carried_erase_settings
from loreun.pipelines.runtime import say

from .card import (
    CARD,
    base_license,
    hub_id,
    lora_card,
    model_card,
    model_name,
    scrub_local_paths,
    shareable_settings,
)
from .checkpoint import check_finite_state
from .config import EraseConfig
from .export_formats import EXPORT_FORMATS, ExportFormat, ExportJob
from .lora import KOHYA_FILE, LORA_FILE, merged_tensors, save_lora_files
from .text_encoder import merged_text_encoders, save_text_encoder_lora

# The header's format name; loreun 0.1 wrote "loreun.unet-erased", read the same way.
ERASED_FORMAT = "loreun.erased"


def build_metadata(
    cfg: EraseConfig,
    fingerprints: dict[str, str],
    steps_done: int,
    num_tensors: int,
    weighting: dict | None = None,
    prediction_type: str = "epsilon",
    world_size: int = 1,
    family: str = "StableDiffusionPipeline",
) -> dict:
    """The JSON object stored in the erased file's header.

    ``fingerprints`` are the base's (``loading.base_fingerprints``: one per precision a pipeline
    is loaded in). ``weighting`` holds what the weighting chose during the run, e.g. the tau that
    a ``--target-ess`` picked, which the config alone does not say.
    """
    return {
        "format": ERASED_FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": model_name(cfg.model),  # shared files hold no local paths
        **fingerprints,
        "family": family,  # the pipeline class the tensors belong to
        "prediction_type": prediction_type,
        "method": cfg.method,
        "concepts": cfg.concepts,
        "erase_from": cfg.erase_from,
        "objective": cfg.objective,
        "weighting": cfg.weighting,
        "weighting_chosen": weighting or {},
        "hyperparameters": shareable_settings(dataclasses.asdict(cfg)),
        "model_settings": carried_erase_settings(cfg.model) if cfg.model_defaults else {},
        "steps_done": steps_done,
        "world_size": world_size,  # processes; the effective batch is batch_size times this
        "num_tensors": num_tensors,
        "versions": {p: package_version(p) for p in ("loreun", "diffusers", "torch")},
    }


def export_erased(
    out: Path,
    trained: dict[str, torch.Tensor],
    cfg: EraseConfig,
    fingerprints: dict[str, str],
    steps_done: int,
    weighting: dict | None = None,
    prediction_type: str = "epsilon",
    world_size: int = 1,
    family: str = "StableDiffusionPipeline",
    extra: dict | None = None,
) -> Path:
    """Write ``erased.safetensors`` and ``erase_config.json`` into ``out``.

    Args:
        trained: state-dict name -> current value of each trained tensor.
        weighting: the weighting's ``summary()``, recorded in the header.
        prediction_type: the base model's parametrisation (epsilon, v_prediction or flow).
        family: the base pipeline's class name (``pipelines/family.py``).
        extra: more header fields (a closed-form edit's LoRA rank and residual).
    """
    tensors = {k: v.detach().float().cpu() for k, v in trained.items()}
    meta = build_metadata(
        cfg, fingerprints, steps_done, len(tensors), weighting, prediction_type, world_size, family
    )
    meta.update(extra or {})
    meta["content_sha256"] = content_hash(tensors, meta)
    path = Path(out) / ERASED_FILE
    atomic_save_safetensors(path, tensors, metadata={METADATA_KEY: json.dumps(meta)})
    # a run of loreun 0.1 in this folder left the old name, which would now be stale
    legacy = Path(out) / LEGACY_ERASED_FILE
    if legacy.is_file() and not legacy.is_symlink():
        legacy.unlink()
    atomic_write_text(Path(out) / ERASE_CONFIG, cfg.to_json())
    return path


def save_pipeline_folder(
    pipe, final: Path, meta: dict, audit: dict | None = None, base: str = "", base_id=None
) -> Path:
    """Save the whole erased pipeline as a diffusers folder with its model card, through a
    temporary name; local paths in the components' configs are dropped (``erase/card.py``).

    ``base`` is the base model as the user gave it (its README gives the card's license);
    ``base_id`` its hub id where that path does not say it.
    """
    final = refuse_link(final)
    for left in recover_folder(final):
        print(f"finished the move of an interrupted export: {left} (its files are in {final})")
    tmp = temp_dir(final)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        scrub_local_paths(tmp)
        base_id = base_id or (hub_id(base) if base else None)
        atomic_write_text(tmp / CARD, model_card(meta, audit, base_id, base_license(base)))
    except BaseException as e:  # a full disk: nothing half-written is left behind
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)) or type(e).__name__ == "SafetensorError":
            raise OSError(f"cannot write the pipeline folder {final}: {e}") from None
        raise
    replace_folder(tmp, final)  # a user's files in an earlier folder are kept
    return final


def export_run(run, cfg: EraseConfig, acc, out: Path, steps_done: int) -> Path:
    """Check and export the trained tensors (and the pipeline folder) from the main process."""
    path = out / ERASED_FILE
    if acc.is_main_process:
        say(acc, f"exporting {len(run.trained)} trained tensors")
        trained = {n: p.detach() for n, p in run.trained.items()}
        check_finite_state(trained, None, steps_done, cfg)
        chosen = run.weighting.summary()
        kind, world = run.schedule.prediction_type, acc.num_processes
        denoiser = run.family.denoiser(run.pipe)
        if cfg.lora_rank and cfg.train == "text-encoder":
            save_text_encoder_lora(run.pipe, run.family, out)
            trained = merged_text_encoders(run.pipe, run.family)
        elif cfg.lora_rank:  # the erased file holds the merged tensors; the LoRA files the adapters
            save_lora_files(denoiser, out, type(run.pipe), run.family, kind)
            trained = merged_tensors(denoiser)
        path = export_erased(
            out, trained, cfg, run.base_fingerprints, steps_done, chosen, kind, world,
            run.family.pipeline,
        )  # fmt: skip
        meta = read_erased_file(path)[1]
        if cfg.lora_rank:
            files = {"diffusers": LORA_FILE}
            if run.family.kohya_version:
                files["kohya"] = KOHYA_FILE
            atomic_write_text(out / CARD, lora_card(meta, files, base_license(cfg.model)))
        if cfg.save_pipeline:
            pipe = _erased_pipeline(run, cfg, path)
            save_pipeline_folder(pipe, out / "pipeline", meta, base=cfg.model)
    acc.wait_for_everyone()
    return path


def _erased_pipeline(run, cfg: EraseConfig, path: Path):
    """The pipeline to save: the run's own, or, where ``--mixed-precision`` rounded the untrained
    weights (``teachers.cast_untrained``), the base model reloaded with the erased tensors."""
    reload = cfg.mixed_precision != "no" or cfg.quantize_base  # rounded or quantized weights
    if reload or (cfg.lora_rank and cfg.train == "text-encoder"):
        from loreun.pipelines.loading import load_erased_pipeline

        return load_erased_pipeline(cfg.model, path, config=cfg.model_config)
    if cfg.lora_rank:
        denoiser = run.family.denoiser(run.pipe)
        denoiser.fuse_lora()
        denoiser.unload_lora()
    return run.pipe


def export_shared(
    run: str | Path,
    audit: str | Path | None = None,
    model: str | None = None,
    model_config: str | None = None,
    overwrite: bool = False,
    force: bool = False,
    dtype: str = "fp16",
    base_id: str | None = None,
    **targets: str | Path | None,
) -> list[Path]:
    """Write a finished erasure in each form of ``EXPORT_FORMATS`` given a target by its name
    (``single_file=...``, ``pipeline=...``), in the table's order.

    The erased file is checked against its base model as ``generate --erased`` checks it, then
    merged into it. Existing outputs are refused unless ``overwrite``; nothing is written until
    every input has been read. ``force`` merges the erasure into a ``model`` whose fingerprint
    differs.

    Args:
        model: the base; default: the run's ``erase_config.json`` (the header names the base
            only by its hub id or folder name, since shared files hold no local paths).
        dtype: the single file's precision: fp16 (the size web UIs expect), bf16 or fp32.
        base_id: the base's hub id for the card, where its path does not say it.

    Returns:
        The paths written.
    """
    from loreun.pipelines.loading import erased_file, load_erased_pipeline

    if dtype not in SINGLE_FILE_DTYPES:
        raise ValueError(f"--dtype: unknown value {dtype!r}; choose one of fp16, bf16, fp32")
    unknown = sorted(set(targets) - set(EXPORT_FORMATS))
    if unknown:
        raise ValueError(f"export: no form {unknown[0]!r}; choose from {', '.join(EXPORT_FORMATS)}")
    targets = {name: Path(targets[name]) for name in EXPORT_FORMATS if targets.get(name)}
    path = erased_file(run)
    _, meta, sha = read_erased(path)
    summary = _audit_summary(audit, sha)
    base = model or _run_base(path, meta)
    inputs = {"--model": base, "--config": model_config, "RUN": run, "--audit": audit}
    for name, target in targets.items():
        check_target(EXPORT_FORMATS[name], target, inputs, overwrite)
    pipe = load_erased_pipeline(base, path, force=force, config=model_config)
    job = ExportJob(meta, summary, base, base_id, dtype)
    return [WRITERS[name](pipe, target, job) for name, target in targets.items()]


def check_target(fmt: ExportFormat, target: Path, inputs: dict, overwrite: bool) -> None:
    """A target apart from every input, new or replaced only with ``overwrite``, of the kind
    its format writes."""
    check_apart(target, inputs, fmt.flag)
    if (
        refuse_link(target).exists()
        and not overwrite
        and (target.is_file() or any(p.name != FolderLock.NAME for p in target.iterdir()))
    ):  # a lock left by a killed export is no content: it holds no lock once its owner died
        raise FileExistsError(f"export: {target} exists; pass --overwrite to replace it")
    if fmt.suffix and target.suffix != fmt.suffix:
        raise ValueError(f"{fmt.flag}: {target} must end in {fmt.suffix}")


def write_single_file(pipe, target: Path, job: ExportJob) -> Path:
    """The web UIs' single file, by the family's own converter, in ``job.dtype``."""
    converter = family_of(pipe).single_file
    if converter is None:
        raise ValueError(
            f"--single-file: {type(pipe).__name__} has no web-UI single-file layout in loreun; "
            "share the erased file, the LoRA files or a --pipeline folder"
        )
    header = {"loreun.erasure": json.dumps(_shareable(job.meta)), "dtype": job.dtype}
    cast = SINGLE_FILE_DTYPES[job.dtype]
    tensors = {k: v.to(cast) if v.is_floating_point() else v for k, v in converter(pipe).items()}
    atomic_save_safetensors(target, tensors, metadata=header)
    return target


def write_pipeline_folder(pipe, target: Path, job: ExportJob) -> Path:
    """A diffusers folder with its model card; locked, so a second export into the same folder
    is refused rather than interleaved."""
    with FolderLock(target, flag="--pipeline", remove=True):
        return save_pipeline_folder(pipe, target, job.meta, job.audit, job.base, job.base_id)


# Each form's writer: fn(pipe with the erasure merged, target, ExportJob) -> the path written.
WRITERS = {"single_file": write_single_file, "pipeline": write_pipeline_folder}
SINGLE_FILE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _run_base(path: Path, meta: dict) -> str:
    """The base model of an erased file: as the run's erase_config.json beside it gives it (a
    local path), else as its header names it (a hub id or the built-in name)."""
    config = path.parent / ERASE_CONFIG
    try:
        saved = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    except (OSError, ValueError):
        saved = {}
    model = saved.get("model") if isinstance(saved, dict) else None
    return model if isinstance(model, str) and model else meta["base_model"]


def _audit_summary(audit: str | Path | None, erased_sha256: str) -> dict | None:
    """The audit's summary, if one of its sources was made with these very erased weights:
    another run's numbers must not appear in this run's card."""
    if audit is None:
        return None
    path = Path(audit)
    path = path / "summary.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"--audit: {audit}: no summary.json from loreun audit or evaluate")
    summary = read_json(path, "--audit")
    sources = summary.get("sources", {})
    if not isinstance(sources, dict):
        raise ValueError(f"--audit: {path}: not a summary.json from loreun audit or evaluate")
    audited = [s.get("erasure") or {} for s in sources.values() if isinstance(s, dict)]
    if not any(isinstance(e, dict) and e.get("sha256") == erased_sha256 for e in audited):
        raise ValueError(
            f"--audit: {path} audits no images made with this run's erased file "
            f"({erased_sha256[:19]}...); audit this run (loreun evaluate --erased RUN)"
        )
    return summary


def _shareable(meta: dict) -> dict:
    """What a shared file says about its erasure: the settings, without local paths."""
    keep = ("method", "objective", "weighting", "concepts", "steps_done")
    keep += tuple(FINGERPRINT_KEYS.values())
    out = {k: meta.get(k) for k in keep}
    out["base_model"] = model_name(meta.get("base_model", ""))
    out["versions"] = meta.get("versions", {})
    return out
