"""Load erased weights into diffusers models, checking everything and unpickling nothing.

An erased file (``erased.safetensors``) holds only the tensors that erasure trained, under
diffusers key names, plus a JSON header (docs/design-notes.md). Loading it checks that every key
exists in the target UNet with the same shape, that the file is whole, and that the target's base
values are the ones erasure started from (the fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .files import ERASED_FILE, LEGACY_ERASED_FILE, LORA_FILE

METADATA_KEY = "loreun"
# How a user applies an erased file to a base whose fingerprint differs, from the CLI or Python.
FORCE_FLAG = "--ignore-fingerprint"
ANYWAY = f"apply it anyway with {FORCE_FLAG} (force=True in Python)"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")


def fingerprint(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float16) -> str:
    """Hash the values of named tensors, independent of their order and device.

    Values are rounded to ``dtype`` before hashing, so a base loaded in any precision at least as
    fine as ``dtype`` gives the same fingerprint: with float16, one loaded in float32 or float16
    (cast from the same float32 weights). bfloat16 keeps fewer mantissa bits than float16, so a
    pipeline loaded in bfloat16 is checked against a second fingerprint rounded to bfloat16
    (``base_fingerprints``); the two roundings of one weight cannot be compared with each other.

    Args:
        tensors: name -> tensor of any shape.
        dtype: torch.float16 or torch.bfloat16.

    Returns:
        "sha256:<hex>"
    """
    return _hash_tensors(tensors, dtype, torch.int16)


# The erased file's header keys for the base fingerprint at each precision a pipeline is loaded in.
FINGERPRINT_KEYS = {torch.float16: "base_fingerprint", torch.bfloat16: "base_fingerprint_bf16"}


def base_fingerprints(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The header's base fingerprints: header key -> fingerprint, one per rounding."""
    return {key: fingerprint(tensors, dtype) for dtype, key in FINGERPRINT_KEYS.items()}


def fingerprint_key(tensors: dict[str, torch.Tensor]) -> str:
    """The header key to check a base's tensors against: bfloat16 ones against the bfloat16
    fingerprint (``fingerprint``'s docstring says why), every other precision against float16's."""
    bf16 = any(t.dtype == torch.bfloat16 for t in tensors.values())
    return FINGERPRINT_KEYS[torch.bfloat16 if bf16 else torch.float16]


def content_hash(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> str:
    """Hash the exact float32 values of named tensors and the header, for the file's integrity.

    Unlike ``fingerprint`` nothing is rounded: two tensors swapped, or one flipped byte,
    change it. ``meta`` (the header's loreun object, less ``content_sha256`` itself) is hashed
    too, as canonical JSON, from format 2 on. It detects corruption, not a malicious edit:
    anyone who edits a file can recompute it.
    """
    digest = _hash_tensors(tensors, torch.float32, torch.int32)
    if meta is None:
        return digest
    rest = {k: v for k, v in meta.items() if k != "content_sha256"}
    header = json.dumps(rest, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256((digest + header).encode()).hexdigest()


def _hash_tensors(tensors: dict[str, torch.Tensor], dtype, bits) -> str:
    """sha256 over names, shapes and the raw bytes of the values cast to ``dtype``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", dtype).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.view(bits).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def erased_file(path: str | Path) -> Path:
    """The erased file a path names: itself, or the ``erased.safetensors`` of a folder (a run of
    loreun 0.1 wrote ``unet-erased.safetensors``, still read)."""
    path = Path(path)
    if path.is_dir():
        for name in (ERASED_FILE, LEGACY_ERASED_FILE):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: a folder without {ERASED_FILE} in it")
    return path


def read_erased_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an erased file's tensors and its loreun metadata, and check them.

    A folder is read as the ``erased.safetensors`` inside it (an erase run's ``--out``).

    Raises:
        ValueError: a pickle-based file, a corrupt or truncated file, no loreun metadata,
            tensors that do not match the content hash in the header, NaN/inf values, or a
            path that is not a regular file (a FIFO or a device would block or never end).
        FileNotFoundError: no such file.
    """
    tensors, meta, _ = read_erased(path)
    return tensors, meta


def read_erased(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """``read_erased_file`` plus the sha256 of the very bytes the tensors were read from, so a
    manifest's ``erased_sha256`` names the weights its images came from even if the file is
    replaced while a run loads."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = erased_file(path)
    data = _read_regular_file(path)
    try:
        header = _safetensors_metadata(data)
        tensors = load(data)
    except (SafetensorError, ValueError) as e:
        raise ValueError(
            f"{path}: not a readable safetensors file (truncated or corrupt): {e}"
        ) from e
    if METADATA_KEY not in header:
        raise ValueError(f"{path}: no loreun metadata in its header; not a loreun export")
    try:
        meta = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its loreun metadata is not a JSON object; not a loreun export")
    check_contents(path, tensors, meta)
    return tensors, meta, "sha256:" + hashlib.sha256(data).hexdigest()


def _read_regular_file(path: Path) -> bytes:
    """The bytes of an erased file, after refusing pickles and anything but a regular file."""
    import stat

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path}: refusing to unpickle a {path.suffix} file, which can run "
            "code; use the erased.safetensors that loreun exports"
        )
    try:
        with open(path, "rb", opener=_nonblocking) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError(f"{path}: not a regular file (a FIFO, a device or a socket)")
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such erased-weights file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a folder, not an erased-weights file") from None


def _nonblocking(path, flags: int) -> int:
    """Open without blocking, so a FIFO with no writer is refused instead of waited on."""
    return os.open(path, flags | os.O_NONBLOCK)


def _safetensors_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file held in memory (8-byte little-endian header
    length, then the JSON header)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("its header runs past the end of the file")
    try:
        header = json.loads(data[8 : 8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"its header is not JSON ({e.__class__.__name__})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


# Format 2: the content hash is required and covers the header too. Format 1 files hashed
# their tensors only, and the first of them hashed nothing.
FORMAT_VERSION = 2


def check_contents(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """The tensors are all there, are the ones the header's hash names, and are finite."""
    version, expected = meta.get("format_version"), meta.get("num_tensors")
    if version not in (1, FORMAT_VERSION) or isinstance(version, bool):
        raise ValueError(f"{path}: unknown erased-file format {version!r}; upgrade loreun")
    if not isinstance(expected, int) or isinstance(expected, bool) or expected != len(tensors):
        raise ValueError(
            f"{path}: holds {len(tensors)} tensors but its header lists {expected!r}; the file "
            "is incomplete or was edited"
        )
    wanted = meta.get("content_sha256")
    if wanted is None and version >= 2:
        raise ValueError(
            f"{path}: its header has no content hash, which every format-{version} file has; "
            "the header was edited"
        )
    got = content_hash(tensors, meta if version >= 2 else None)
    if wanted is not None and got != wanted:  # format 1 files made before the hash have none
        raise ValueError(
            f"{path}: its tensors or header do not match the content hash in its header; the "
            "file was edited or corrupted after export"
        )
    bad = sorted(k for k, v in tensors.items() if not torch.isfinite(v).all())
    if bad:
        raise ValueError(
            f"{path}: {len(bad)} tensors hold NaN or inf values, e.g. {bad[0]}; the erasure "
            "diverged, and these weights would give black or noise images"
        )


def erasable_state(model) -> tuple[dict[str, torch.Tensor], str]:
    """(what an erased file may hold, by its names; what to call it in errors).

    A pipeline's are its denoiser's tensors under their own names and each prompt encoder's
    under its pipeline attribute ("text_encoder.text_model.encoder..."), as a text-encoder
    erasure writes them; a bare denoiser's are its own. The tensors share the modules' storage,
    so copying into them changes the model.
    """
    from .family import FAMILIES, family_of

    if type(model).__name__ not in FAMILIES:
        return model.state_dict(), "UNet"
    family = family_of(model)
    state = dict(family.denoiser(model).state_dict())
    for enc in family.prompt_encoders(model):
        state.update({f"{enc.name}.{k}": v for k, v in enc.module.state_dict().items()})
    return state, f"{family.denoiser_name} or its text encoders"


def check_compatible(
    model,
    tensors: dict[str, torch.Tensor],
    meta: dict,
    force: bool = False,
    source: str = "erased file",
) -> None:
    """Raise ValueError naming what differs between an erased file and a pipeline (its
    denoiser and text encoders) or a bare UNet.

    ``force`` skips the fingerprint check only; names and shapes are always checked.
    """
    state, what = erasable_state(model)
    unknown = sorted(set(tensors) - set(state))
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} tensors not in this {what}, e.g. {', '.join(unknown[:3])}"
        )
    wrong = [
        (k, tuple(v.shape), tuple(state[k].shape))
        for k, v in tensors.items()
        if v.shape != state[k].shape
    ]
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(
            f"{source}: {len(wrong)} tensors have the wrong shape, e.g. {k}: "
            f"file {got}, model {want}"
        )
    if not force:
        check_fingerprint({k: state[k] for k in tensors}, meta, source)


def check_fingerprint(base: dict[str, torch.Tensor], meta: dict, source: str) -> None:
    """The base values of the erased tensors are the ones erasure started from, in whatever
    precision the pipeline was loaded (fp32, fp16 or bf16).

    Raises:
        ValueError: naming the base the file was erased from, and how to apply it anyway.
    """
    key = fingerprint_key(base)
    dtype = torch.bfloat16 if key == FINGERPRINT_KEYS[torch.bfloat16] else torch.float16
    wanted = meta.get(key)
    if wanted is None:
        raise ValueError(
            f"{source}: records no {key} (it was exported by an older loreun), so a base loaded "
            f"in bfloat16 cannot be checked; load the base in float32 or float16, or {ANYWAY}"
        )
    if fingerprint(base, dtype) != wanted:
        raise ValueError(
            f"{source}: was erased from a different base model ({meta.get('base_model')}); "
            f"its fingerprint does not match this model's weights. Load the same base, or {ANYWAY}"
        )


def apply_erased_weights(pipe_or_unet, path: str | Path, force: bool = False):
    """Copy erased tensors into a pipeline's UNet (or a UNet) in place, after strict checks.

    Args:
        pipe_or_unet: a diffusers pipeline with a ``unet`` or a ``UNet2DConditionModel``.
        path: an ``erased.safetensors`` written by loreun.
        force: apply even when the base fingerprint differs.

    Returns:
        The object passed in, for chaining.
    """
    apply_erased(pipe_or_unet, read_erased_file(path), force, str(path))
    return pipe_or_unet


def apply_erased(pipe_or_unet, erased: tuple[dict, dict], force: bool, source: str) -> None:
    """Check and copy already-read ``(tensors, meta)`` into a pipeline's denoiser and text
    encoders (or a bare UNet)."""
    tensors, meta = erased[:2]
    if _quantized_denoiser(pipe_or_unet) is not None:
        apply_lora_to_quantized(pipe_or_unet, tensors, meta, force, source)
        return
    check_compatible(pipe_or_unet, tensors, meta, force=force, source=source)
    copy_into(pipe_or_unet, tensors)


def _quantized_denoiser(pipe):
    """The pipeline's denoiser where it was loaded quantized (``--quantize-base``), else None."""
    from .family import FAMILIES, family_of
    from .quantize import quantized_name

    if type(pipe).__name__ not in FAMILIES:
        return None
    denoiser = family_of(pipe).denoiser(pipe)
    return denoiser if quantized_name(denoiser) else None


def apply_lora_to_quantized(pipe, tensors: dict, meta: dict, force: bool, source: str) -> None:
    """Apply a LoRA erasure to a pipeline whose denoiser is quantized: its quantized weights
    cannot take merged tensors, so the run's LoRA file beside ``source`` is loaded as an
    adapter, as the erasure ran while training. The merged file is still checked, names,
    shapes and fingerprint, against the base's own tensors read from its checkpoint."""
    from .family import family_of
    from .quantize import original_tensors

    lora = Path(source).parent / LORA_FILE
    if any(k.startswith("text_encoder") for k in tensors) or not lora.is_file():
        raise ValueError(
            f"{source}: a quantized base (--quantize-base) takes a denoiser LoRA erasure as its "
            f"adapters, and no {LORA_FILE} sits beside this file"
        )
    denoiser = _quantized_denoiser(pipe)
    try:
        base = original_tensors(denoiser, sorted(tensors))
    except ValueError as e:
        raise ValueError(f"{source}: {e}".replace("--quantize-base: ", "")) from None
    wrong = [k for k, v in tensors.items() if v.shape != base[k].shape]
    if wrong:
        raise ValueError(f"{source}: {len(wrong)} tensors have the wrong shape, e.g. {wrong[0]}")
    if not force:
        check_fingerprint(base, meta, source)
    # the denoiser's own loader: FLUX's pipeline-level one reads the base weights by their plain
    # names, which quanto's state dict does not have
    denoiser.load_lora_adapter(
        str(lora.parent),
        weight_name=LORA_FILE,
        prefix=family_of(pipe).lora_prefix,
        adapter_name="erasure",
    )


def copy_into(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checked tensors into a pipeline's (or a UNet's) parameters and buffers in place,
    each in its own dtype and device."""
    state, _ = erasable_state(model)
    with torch.no_grad():
        for name, value in tensors.items():
            target = state[name]
            target.copy_(value.to(device=target.device, dtype=target.dtype))


def check_erased_files(
    model: str, paths: list, model_config: str | None = None, force: bool = False, torch_dtype=None
) -> None:
    """Check erased files against a model (names, shapes, fingerprint) without applying them,
    so a run over several fails before it has done any work."""
    if not paths:
        return
    from .models import load_pipeline

    pipe = load_pipeline(model, model_config, torch_dtype)
    for path in paths:
        tensors, meta = read_erased_file(path)
        check_compatible(pipe, tensors, meta, force=force, source=str(path))


def load_erased_pipeline(base: str, erased: str | Path, force: bool = False, **kwargs):
    """Load a base pipeline (any ``--model`` reference) and apply erased weights to it."""
    from .models import load_pipeline

    pipe = load_pipeline(base, **kwargs)
    return apply_erased_weights(pipe, erased, force=force)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, recorded in manifests to tie images to exact weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()
