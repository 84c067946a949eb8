"""Generate images from prompt rows with I2P semantics, batched, resumable, multi-process.

Each image has its own generator seeded from its row's seed (plus the sample index), so a row
gives the same image alone, in a batch, or on another process. Rows that share guidance and size
are batched together. Every image is written atomically and recorded in ``manifest.jsonl``,
which the audit reads; file names are never parsed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .family import family_of
from .files import (
    GENERATE_CONFIG,
    MANIFEST,
    FolderLock,
    atomic_write_bytes,
    atomic_write_text,
    check_apart,
    check_writable,
    make_dir,
    open_append,
)
from .generate_settings import SCHEDULERS, GenerateSettings
from .loading import apply_erased, erased_file, read_erased
from .meta import quiet
from .models import load_pipeline
from .outputs import claim_output, read_jsonl
from .quantize import check_quantize_base
from .runtime import multi_cpu_launch, restart_rate


@dataclass
class Job:
    """One image to make: a row, a sample index, and the resolved settings."""

    index: int  # position of the row in the prompt file
    sample: int
    row: object
    seed: int
    guidance: float
    width: int
    height: int

    @property
    def key(self) -> str:
        return f"{self.index}:{self.sample}"

    @property
    def rel_path(self) -> str:
        return f"images/{self.index:06d}-{self.sample}.png"


def plan_jobs(rows, settings: GenerateSettings, native: int) -> list[Job]:
    """Resolve each row's seed, guidance and size, falling back to the settings."""
    jobs = []
    for i, row in enumerate(rows):
        base = row.seed if row.seed is not None else settings.seed + i
        if settings.force_size:
            w = h = settings.size
        else:
            w = row.width or settings.size or native
            h = row.height or settings.size or native
        g = row.guidance if row.guidance is not None else settings.guidance
        for k in range(settings.samples_per_prompt):
            jobs.append(Job(i, k, row, (base + k) % 2**64, g, w, h))
    return jobs


def batches(jobs: list[Job], batch_size: int, mixed_guidance: bool = False) -> list[list[Job]]:
    """Group jobs that share size (and guidance, unless one batch may mix guidances), then cut
    into batches, keeping file order."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        key = (job.width, job.height) if mixed_guidance else (job.guidance, job.width, job.height)
        groups.setdefault(key, []).append(job)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def mixes_guidance(pipe) -> bool:
    """Whether loreun's own loop can give each image of a batch its own guidance: families
    whose table says so (SD 1.x/2.x: classifier-free guidance, one text encoder), without a
    guidance embedding (LCM-distilled UNets have one)."""
    family = family_of(pipe)
    config = family.denoiser(pipe).config
    return family.own_loop and getattr(config, "time_cond_proj_dim", None) is None


def generate(
    model: str,
    prompts,
    out: str | Path,
    erased: str | Path | None = None,
    settings: GenerateSettings | None = None,
    model_config: str | None = None,
    torch_dtype=None,
    force: bool = False,
) -> Path:
    """Generate every (row, sample) image of a prompt file into ``out``; skip finished ones.

    Args:
        model: any ``--model`` reference (built-in name, folder, single file, hub id).
        prompts: a prompt file, a bundled set name, or a list of ``PromptRow``.
        erased: optional ``erased.safetensors`` applied to the model.
        force: apply ``erased`` even when its base fingerprint differs from the model's.

    Returns:
        Path of ``manifest.jsonl``.
    """
    from accelerate import PartialState

    from loreun.prompts import load_prompts

    settings = settings or GenerateSettings()
    rows = prompts if isinstance(prompts, list) else load_prompts(prompts)
    state = PartialState(cpu=multi_cpu_launch())
    out = Path(out)
    prompt_file = prompts if isinstance(prompts, (str, Path)) else None
    inputs = {"--model": model, "--config": model_config, "--erased": erased}
    check_apart(out, {**inputs, "--prompts": prompt_file})
    erased = erased_file(erased) if erased else None
    # read once: the hash recorded is of the very bytes the images are made with
    weights = read_erased(erased) if erased else None
    info = {
        "model": str(model),
        "erased": str(erased) if erased else None,
        "erased_sha256": weights[2] if weights else None,
        "dtype": str(torch_dtype or "the model's own").removeprefix("torch."),
        "prompts_sha256": _rows_hash(rows),
        "settings": _recorded(settings),
    }
    claim_output(out, info, False, GENERATE_CONFIG)  # refuse another run's folder before loading
    # Load and check --erased before the folder is claimed: a wrong file must not leave a
    # claim that refuses the rerun with the right one.
    pipe = prepare_pipeline(
        model,
        model_config,
        torch_dtype,
        weights and (weights, erased),
        settings,
        state.device,
        force,
    )
    check_sizes(pipe, rows, settings, prompt_file)
    lock = FolderLock(check_writable(out)).acquire() if state.is_main_process else None
    try:
        with state.main_process_first():  # the others then find the main process's claim
            claim_output(out, info, state.is_main_process, GENERATE_CONFIG)
        if state.is_main_process:
            merge_manifest(out)  # drop torn lines and records whose image is gone
        state.wait_for_everyone()
        _generate_missing(pipe, rows, settings, out, info, state)
    finally:
        if lock is not None:
            lock.release()
    return out / MANIFEST


def _recorded(settings: GenerateSettings) -> dict:
    """The settings a folder's images depend on (not the batch size; no quantized base unless
    one was asked for, so folders made before the option resume)."""
    out = {k: v for k, v in asdict(settings).items() if k != "batch_size"}
    if out["quantize_base"] is None:
        del out["quantize_base"]
    return out


def check_sizes(pipe, rows, settings: GenerateSettings, prompt_file=None) -> None:
    """Every size the run asks for fits the denoiser (SD3's position embeddings end), refused
    by flag or by row before any image is made."""
    family = family_of(pipe)
    family.check_size(pipe, settings.size, "--size")
    where = f"{prompt_file}: " if prompt_file else ""
    for job in plan_jobs(rows, settings, family.native_size(pipe))[:: settings.samples_per_prompt]:
        family.check_size(pipe, max(job.width, job.height), f"{where}row {job.row.id}")


def _generate_missing(pipe, rows, settings, out: Path, info: dict, state) -> None:
    """Generate the jobs not yet in the manifest, split over processes, then merge."""
    from tqdm.auto import tqdm

    done = {rec["key"] for rec in read_manifest(out) if is_image_record(rec, out)}
    native = family_of(pipe).native_size(pipe)
    jobs = [j for j in plan_jobs(rows, settings, native) if j.key not in done]
    mine = jobs[state.process_index :: state.num_processes]
    part = out / (
        MANIFEST if state.num_processes == 1 else f".manifest-rank{state.process_index}.jsonl"
    )
    make_dir(out / "images")
    common = {
        "model": info["model"],
        "erased": info["erased"],
        "erased_sha256": info["erased_sha256"],
        "dtype": info["dtype"],
        "steps": settings.steps,
        "scheduler": settings.scheduler,
        "guidance_kind": family_of(pipe).guidance_kind(pipe),  # FLUX.1-dev's is embedded
    }
    bar = tqdm(total=len(mine), desc="generate", disable=not state.is_main_process or quiet())
    with open_append(part) as manifest:
        for n, batch in enumerate(batches(mine, settings.batch_size, mixes_guidance(pipe))):
            for job, image in zip(batch, run_batch(pipe, batch, settings.steps)):
                manifest.write(json.dumps(_save(out, job, image, common), allow_nan=False) + "\n")
                manifest.flush()
                bar.update(1)
            if n == 0:
                restart_rate(bar)
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        merge_manifest(out)  # one manifest in prompt-file order, however the work was split
    state.wait_for_everyone()


def prepare_pipeline(model, model_config, torch_dtype, erased, settings, device, force=False):
    """The pipeline generate and attack sample with: loaded, ``erased`` (``(read_erased's
    result, its path)``) applied after its checks (``force`` skips the fingerprint),
    ``settings.scheduler`` set, on ``device``, silent."""
    check_quantize_base(settings.quantize_base)
    pipe = load_pipeline(model, model_config, torch_dtype, settings.quantize_base)
    if erased:
        apply_erased(pipe, erased[0], force, str(erased[1]))
    name = SCHEDULERS[settings.scheduler]
    if name and family_of(pipe).schedule != "ddpm":
        raise ValueError(
            f"--scheduler: {settings.scheduler} is a DDPM sampler; {type(pipe).__name__} is a "
            "flow-matching model and samples with its own scheduler (--scheduler default)"
        )
    if name:
        import diffusers

        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def run_batch(pipe, jobs: list[Job], steps: int) -> list:
    """Images for jobs of one size; one generator per image, each with its own seed."""
    gens = [torch.Generator("cpu").manual_seed(j.seed) for j in jobs]
    prompts = [j.row.prompt for j in jobs]
    first = jobs[0]
    if mixes_guidance(pipe):
        guidance = torch.tensor([j.guidance for j in jobs])
        return sample_with_guidances(
            pipe, prompts, gens, guidance, steps, first.width, first.height
        )
    return pipe(  # rows of this batch share their guidance (see ``batches``)
        prompts,
        generator=gens,
        num_inference_steps=steps,
        guidance_scale=first.guidance,
        width=first.width,
        height=first.height,
        output_type="pil",
        **family_of(pipe).pipe_kwargs(pipe),  # the text length erasing used
    ).images


def sample_with_guidances(
    pipe, prompts: list[str], generators: list, guidance: torch.Tensor, steps: int, width, height
) -> list:
    """The SD pipeline's own denoising loop, with a guidance per image.

    I2P gives almost every row its own guidance, and the pipeline takes one per call, so a
    prompt file would run at batch size 1. This loop runs the same steps as
    ``StableDiffusionPipeline.__call__`` (its encoder, latents, scheduler and decoder, driven
    from outside, nothing patched) with ``guidance`` [B]: an image with guidance <= 1 takes the
    conditional prediction alone, as the pipeline does when it skips guidance.

    Returns:
        B PIL images; each matches its row generated alone up to floating-point rounding.
    """
    latents = sample_latents(pipe, prompts, generators, guidance, steps, width, height)
    return decode_latents(pipe, latents, generators)


@torch.inference_mode()
def sample_latents(
    pipe,
    prompts,
    generators: list,
    guidance: torch.Tensor,
    steps: int,
    width,
    height,
    prompt_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sample_with_guidances``' loop up to the final latents [B, C, h, w].

    ``prompt_embeds`` [B, L, D] replaces ``prompts`` (then None) when the conditioning is not a
    plain string: the attack's prompts are token ids that need not survive a decode and
    re-encode. The unconditional side is the empty prompt either way, as in the pipeline.
    """
    device = pipe._execution_device
    cond, uncond = pipe.encode_prompt(prompts, device, 1, True, prompt_embeds=prompt_embeds)
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    latents = pipe.prepare_latents(
        len(cond), denoiser.config.in_channels, height, width, cond.dtype, device, generators
    )
    pipe.scheduler.set_timesteps(steps, device=device)
    extra = pipe.prepare_extra_step_kwargs(generators, 0.0)
    g = guidance.to(device, latents.dtype).view(-1, 1, 1, 1)
    emb = torch.cat([uncond, cond])
    for t in pipe.scheduler.timesteps:
        x = pipe.scheduler.scale_model_input(torch.cat([latents, latents]), t)
        e_u, e_c = family.predict(denoiser, x, t, emb).chunk(2)
        eps = torch.where(g > 1, e_u + g * (e_c - e_u), e_c)
        latents = pipe.scheduler.step(eps, t, latents, **extra).prev_sample
    return latents


@torch.inference_mode()
def pipeline_sample(pipe, prompt, generators: list, guidance: float, steps: int, width, height):
    """One image through the pipeline's own call: -> (final latents [1, C, h, w], PIL image).

    ``prompt`` is a string, or a conditioning of one prompt (a [1, L, D] tensor or a ``Cond``,
    such as ``Family.encode_ids`` gives for the attack's token ids). The final latents are
    taken from the last step's callback, so the image is exactly the pipeline's.
    """
    from .family import embeds_kwargs

    family = family_of(pipe)
    final = {}

    def keep(_pipe, _i, _t, tensors):
        final["latents"] = tensors["latents"]
        return {}

    if isinstance(prompt, str):
        text = {"prompt": [prompt]}
    else:
        text = embeds_kwargs(prompt.to(pipe._execution_device, family.denoiser(pipe).dtype))
    image = pipe(
        **text,
        generator=generators,
        num_inference_steps=steps,
        guidance_scale=guidance,
        width=width,
        height=height,
        output_type="pil",
        callback_on_step_end=keep,
        **family.pipe_kwargs(pipe),
    ).images[0]
    return family.unpack(pipe, final["latents"], height, width), image


@torch.inference_mode()
def decode_latents(pipe, latents: torch.Tensor, generators: list) -> list:
    """PIL images of final latents [B, C, h, w], through the pipeline's VAE and processor."""
    scale = pipe.vae.config.scaling_factor
    image = pipe.vae.decode(latents / scale, generator=generators[0]).sample
    return pipe.image_processor.postprocess(image, output_type="pil")


def _save(out: Path, job: Job, image, common: dict) -> dict:
    import io

    buf = io.BytesIO()
    image.save(buf, format="png")
    atomic_write_bytes(out / job.rel_path, buf.getvalue())
    row = job.row
    return {
        "path": job.rel_path,
        "key": job.key,
        "index": job.index,
        "sample": job.sample,
        "id": row.id,
        "prompt": row.prompt,
        "class": row.cls,
        "seed": job.seed,
        "guidance": job.guidance,
        "width": job.width,
        "height": job.height,
        "extra": row.extra,
        **common,
    }


def _rows_hash(rows) -> str:
    import hashlib

    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.id, r.prompt, r.seed, r.guidance, r.width, r.height]).encode())
    return "sha256:" + h.hexdigest()


def read_manifest(out: Path, include_parts: bool = False) -> list[dict]:
    """Records of ``manifest.jsonl`` (and unmerged per-process parts); a torn line is ignored,
    since the image it describes is generated again. The audit checks each record's path;
    generate's resume keeps only ``is_image_record`` ones."""
    files = [out / MANIFEST] + (sorted(out.glob(".manifest-rank*.jsonl")) if include_parts else [])
    return [rec for f in files for rec in read_jsonl(f)]


RECORD_KEYS = {"path": str, "key": str, "index": int, "sample": int}


def is_image_record(rec, out: Path) -> bool:
    """A manifest record as generate writes it, whose image lies inside ``out/images`` (a
    record pointing elsewhere would make a resume skip a row it never generated)."""
    if not isinstance(rec, dict):
        return False
    if any(
        not isinstance(rec.get(k), t) or isinstance(rec.get(k), bool)
        for k, t in RECORD_KEYS.items()
    ):
        return False
    images = (out / "images").resolve()
    return (out / rec["path"]).resolve().parent == images


def merge_manifest(out: Path) -> None:
    """Fold per-process parts into one manifest in prompt-file order, keeping only records
    whose image exists."""
    by_key = {
        rec["key"]: rec
        for rec in read_manifest(out, include_parts=True)
        if is_image_record(rec, out) and (out / rec["path"]).is_file()
    }
    ordered = sorted(by_key.values(), key=lambda r: (r["index"], r["sample"]))
    lines = "".join(json.dumps(r, allow_nan=False) + "\n" for r in ordered)
    atomic_write_text(out / MANIFEST, lines)
    for part in out.glob(".manifest-rank*.jsonl"):
        part.unlink()


def remove_generation(out: Path) -> None:
    """Remove what a generate run wrote into ``out`` (its images, manifest and config), and
    nothing else: a user's file in the folder or in ``images/`` stays. ``loreun demo
    --overwrite`` uses it when its settings changed."""
    from .files import remove_ours

    if not (out / GENERATE_CONFIG).is_file():
        return
    images = [
        Path(rec["path"]).name
        for rec in read_manifest(out, include_parts=True)
        if is_image_record(rec, out)
    ]
    if (out / "images").is_dir():
        remove_ours(out / "images", tuple(images))
    parts = tuple(p.name for p in out.glob(".manifest-rank*.jsonl"))
    remove_ours(out, (MANIFEST, GENERATE_CONFIG, *parts))
