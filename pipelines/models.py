"""Resolve a ``--model`` argument to a loaded Stable Diffusion pipeline, failing loudly.

A model is one of: ``digits`` (the built-in model shipped with loreun), a local diffusers folder,
a single-file ``.safetensors`` checkpoint with a local config folder, or a hub id (which goes
through the ordinary diffusers cache).
"""

from __future__ import annotations

from pathlib import Path

from .family import FAMILIES
from .quantize import quanto_quietly

BUILTIN_DIR = Path(__file__).parent / "builtin"
# digits: SD 1.x's architecture; digits-flow: SD3's (rectified flow), on the same data and VAE.
BUILTIN_MODELS = {"digits": BUILTIN_DIR / "digits", "digits-flow": BUILTIN_DIR / "digits-flow"}
BUILTIN_CLASSIFIERS = {"digits": BUILTIN_DIR / "digits-classifier"}
# The erase settings a built-in model carries in its folder, used where no flag gives one: the
# library's defaults (lr 1e-5) suit SD 1.4, and leave a 1.5 M-parameter model unerased.
ERASE_DEFAULTS_FILE = "loreun_erase_defaults.json"


def carried_erase_settings(model: str) -> dict:
    """``{setting: value}`` that the built-in model ``model`` erases with (``{}`` for any other
    model: a folder of the user's own carries none)."""
    import json

    path = BUILTIN_MODELS[model] / ERASE_DEFAULTS_FILE if model in BUILTIN_MODELS else None
    if path is None or not path.is_file():
        return {}
    return json.loads(path.read_text())


def resolve_model(model: str) -> str:
    """Map a built-in name to its folder; check that a local path is a diffusers SD folder.

    Returns:
        A local folder, a local file, or a hub id, unchanged when it is not built in.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a folder that is not a diffusers pipeline.
    """
    if model in BUILTIN_MODELS:
        folder = BUILTIN_MODELS[model]
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"built-in model {model!r} is missing from this install")
        return str(folder)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(
                f"--model: {model} is not a diffusers pipeline folder (no model_index.json)"
            )
        return str(path)
    if path.is_file():
        return str(path)
    if _looks_like_path(model):
        raise FileNotFoundError(f"--model: {model}: no such file or folder")
    return model


def model_files_key(model: str) -> list:
    """What a cache made from ``model`` depends on: each file's path (relative to the folder),
    size and modification time, for a local folder or single file. Replacing the weights under
    the same ``--model`` path changes it, where the path alone would not. A hub id is its own
    key (the hub cache keeps one snapshot per revision)."""
    ref = Path(resolve_model(model))
    if ref.is_file():
        files, root = [ref], ref.parent
    elif ref.is_dir():
        files, root = sorted(p for p in ref.rglob("*") if p.is_file()), ref
    else:
        return [model]
    stats = [(p, p.stat()) for p in files]
    return [[str(p.relative_to(root)), st.st_size, st.st_mtime_ns] for p, st in stats]


def _looks_like_path(model: str) -> bool:
    return (
        model.startswith((".", "/", "~"))
        or model.count("/") != 1
        or model.endswith((".safetensors", ".ckpt", ".pt", ".bin"))
    )


def load_pipeline(
    model: str, config: str | None = None, torch_dtype=None, quantize: str | None = None
):
    """Load a ``StableDiffusionPipeline`` from any supported model reference.

    The safety checker is never loaded: it blanks the very images an audit must see.

    Args:
        model: see the module docstring.
        config: local diffusers folder holding the configs of a single-file checkpoint.
        torch_dtype: optional dtype for every component.
        quantize: a ``--quantize-base`` choice: the denoiser loads quantized
            (``quantize.py``); diffusers folders and hub ids only.
    """
    ref = resolve_model(model)
    kwargs = {} if torch_dtype is None else {_dtype_kwarg(): torch_dtype}
    if Path(ref).is_file():
        if quantize:
            raise ValueError(
                f"--quantize-base: {model} is a single file; quantized loading reads a diffusers "
                "folder or hub id (save the model as one with diffusers' save_pretrained)"
            )
        return _load_single_file(ref, config, kwargs)
    unreachable = None if Path(ref).is_dir() else hub_unreachable()
    if unreachable:  # the cache only, at once, instead of minutes of retries
        kwargs["local_files_only"] = True
    try:
        cls = pipeline_class(ref, model, local_files_only=bool(unreachable))
        absent = absent_components(cls, ref, bool(unreachable))
        if quantize:
            kwargs["quantization_config"] = _quantization(cls, quantize)
        with quanto_quietly():
            pipe = cls.from_pretrained(ref, **kwargs, **{**absent, **_no_safety_checker(cls)})
    except (OSError, ValueError) as e:
        if unreachable:
            raise ValueError(
                f"--model: {model!r} is not in the local Hugging Face cache, and the hub "
                f"cannot be reached ({unreachable}); download it where the hub is reachable, "
                "or give a local folder"
            ) from e
        raise ValueError(f"--model: could not load {model!r}: {_first_line(e)}") from e
    check_tokenizer(pipe.tokenizer, model)
    if quantize:
        from .quantize import match_input_dtype

        match_input_dtype(FAMILIES[type(pipe).__name__].denoiser(pipe))
    return pipe


def _quantization(cls, quantize: str):
    """diffusers' config quantizing the pipeline's denoiser only (``quantize.py``)."""
    from .quantize import quantization_config

    family = FAMILIES.get(cls.__name__)
    if family is None:
        raise ValueError(f"--quantize-base: {cls.__name__} is not a pipeline loreun erases")
    return quantization_config(quantize, family.denoiser_attr)


# Pipelines loreun implements: the family table's keys (``pipelines/family.py``).
SUPPORTED_PIPELINES = tuple(FAMILIES)


def absent_components(cls, ref: str, local_files_only: bool = False) -> dict:
    """Components a folder was saved without (``[null, null]`` in its ``model_index.json``,
    e.g. SD3 without T5), passed as None: diffusers refuses to load them otherwise."""
    config = cls.load_config(ref, local_files_only=local_files_only)
    return {k: None for k, v in config.items() if v == [None, None] and not k.startswith("_")}


def _no_safety_checker(cls) -> dict:
    """SD 1.x/2.x pipelines load a safety checker, which blanks the very images an audit must
    see; SDXL has none."""
    import inspect

    if "safety_checker" in inspect.signature(cls.__init__).parameters:
        return {"safety_checker": None, "requires_safety_checker": False}
    return {}


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when it answers (or when
    ``HF_HUB_OFFLINE`` already makes diffusers read the cache only).

    Without it, a hub id on a machine without network retried for over a minute before failing,
    and the message did not say the network was the cause.
    """
    import socket
    from urllib.parse import urlparse
    from urllib.request import getproxies, proxy_bypass

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    url = urlparse(constants.ENDPOINT)
    if url.hostname and not proxy_bypass(url.hostname):
        # behind a proxy the hub is reached through it: that is the connection to try
        url = urlparse(getproxies().get(url.scheme) or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{url.scheme}://{url.hostname}:{port}: {e.strerror or type(e).__name__}"
    return None


def pipeline_class(ref: str, model: str, local_files_only: bool = False):
    """The pipeline class that the model's own ``model_index.json`` names, if loreun supports it.

    Raises:
        ValueError: a pipeline of another family, named, instead of a confusing failure later.
    """
    import diffusers

    config = diffusers.DiffusionPipeline.load_config(ref, local_files_only=local_files_only)
    name = config.get("_class_name", "")
    if name not in SUPPORTED_PIPELINES:
        raise ValueError(
            f"its model_index.json names {name or 'no pipeline class'}; loreun supports "
            f"{', '.join(SUPPORTED_PIPELINES)} models"
        )
    return getattr(diffusers, name)


def _load_single_file(path: str, config: str | None, kwargs: dict):
    """A web-UI checkpoint: its configs come from ``config`` (a local diffusers folder, read
    offline) or, without one, from the hub, as diffusers' ``from_single_file`` fetches them."""
    if not path.endswith(".safetensors"):
        raise ValueError(
            f"--model: {path}: only .safetensors single-file checkpoints are "
            "loaded; pickled .ckpt/.pt files can run code when opened"
        )
    if config is None:
        from huggingface_hub import constants

        unreachable = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else hub_unreachable()
        if unreachable:
            raise ValueError(
                f"--model: {path} is a single file, whose configs diffusers fetches from the "
                f"hub, which cannot be reached ({unreachable}); pass --config with a local "
                "diffusers folder of the same architecture"
            )
        cls = single_file_class(path)
    else:
        resolve_model(config)
    try:
        if config is not None:
            cls = pipeline_class(config, config)  # the family comes from the configs' folder
            kwargs = {**kwargs, "config": config}
        pipe = cls.from_single_file(path, **kwargs, **_no_safety_checker(cls))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"--model: could not load {path}: {_first_line(e)}") from e
    check_tokenizer(pipe.tokenizer, path)
    return pipe


def single_file_class(path: str):
    """The pipeline class of a web-UI checkpoint, from its key names alone: SDXL's has a second
    text encoder under ``conditioner.embedders.1``; SD 1.x and 2.x share one class."""
    import diffusers
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            sdxl = any(k.startswith("conditioner.embedders.1.") for k in f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"--model: {path}: not a readable safetensors file ({e})") from None
    name = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    return getattr(diffusers, name)


def check_tokenizer(tokenizer, source: str, prompt: str = "a photo of a cat") -> None:
    """Reject tokenizers that load but cannot encode text.

    Offline loading from a hub id can quietly return a tokenizer with only special tokens; every
    prompt then encodes to BOS and EOS, and erasure would train on nothing.
    """
    ids = tokenizer(prompt, add_special_tokens=True).input_ids
    if len(tokenizer) <= 2 or len(ids) <= 2:
        raise ValueError(
            f"--model: the tokenizer of {source} is broken (vocabulary size "
            f"{len(tokenizer)}; {prompt!r} encodes to {len(ids)} tokens)"
        )


def _dtype_kwarg() -> str:
    """Newer diffusers call it ``dtype`` and warn on ``torch_dtype``; older ones know only the
    latter."""
    from diffusers.pipelines import pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
