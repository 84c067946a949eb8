"""A quantized frozen denoiser for LoRA erasure (``--quantize-base``), through diffusers' own
quantization configs.

FLUX.1-dev's transformer is 23.8 GB in bf16: a LoRA erasure on a 24 GB card needs its frozen
weights quantized, as diffusers' FLUX QLoRA recipe does. Only the denoiser is quantized; the
adapters train in full precision on top, and the teacher is the same module with its adapters
off, so there is one quantized copy of the base and nothing else.

Two backends, because neither runs everywhere:

* bitsandbytes (``nf4``, ``int8``): diffusers' FLUX LoRA recipe; diffusers loads it on a CUDA
  GPU only.
* optimum-quanto (``qint4``, ``qint8``): weight-only integer quantization that also runs on a
  CPU, so the whole path is tested without a GPU. diffusers marks its ``QuantoConfig``
  deprecated (to go in diffusers 1.0); bitsandbytes stays the GPU recipe.

The erasure must serve the unquantized base, so nothing exported may carry quantization error:
the base tensors that fingerprints and the merged file need are read from the checkpoint's own
files (``original_tensors``), never dequantized from the training copy.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with the first model, not with the command line
    import torch


@dataclass(frozen=True)
class QuantizedBase:
    """One ``--quantize-base`` choice.

    Attributes:
        backend: diffusers' name of the quantization backend.
        package: the import name it needs.
        pip: what to install for it.
        cuda_only: diffusers refuses to load it without a CUDA GPU.
        bits: storage per weight, scales included, for memory arithmetic
            (NF4 with double quantization: 4 + 8/64 + 32/(64*256); quanto int4 with bf16 scale
            and shift per group of 128: 4 + 32/128).
        settings: the config's keyword arguments.
    """

    backend: str
    package: str
    pip: str
    cuda_only: bool
    bits: float
    settings: tuple


QUANTIZED_BASES = {
    "nf4": QuantizedBase(
        "bitsandbytes", "bitsandbytes", "bitsandbytes", True, 4 + 8 / 64 + 32 / (64 * 256),
        (("load_in_4bit", True), ("bnb_4bit_quant_type", "nf4"),
         ("bnb_4bit_use_double_quant", True)),
    ),
    "int8": QuantizedBase(
        "bitsandbytes", "bitsandbytes", "bitsandbytes", True, 8 + 32 / 4096,
        (("load_in_8bit", True),),
    ),
    "qint4": QuantizedBase(
        "quanto", "optimum.quanto", "optimum-quanto", False, 4 + 32 / 128,
        (("weights_dtype", "int4"),),
    ),
    "qint8": QuantizedBase(
        "quanto", "optimum.quanto", "optimum-quanto", False, 8 + 16 / 4096,
        (("weights_dtype", "int8"),),
    ),
}  # fmt: skip


def check_quantize_base(name: str | None) -> None:
    """Refuse a choice this machine cannot load, in one line naming the flag."""
    if name is None:
        return
    if name not in QUANTIZED_BASES:
        raise ValueError(
            f"--quantize-base: unknown value {name!r}; choose one of {', '.join(QUANTIZED_BASES)}"
        )
    import torch

    q = QUANTIZED_BASES[name]
    # no GPU is the first thing to say: installing bitsandbytes would not help
    if q.cuda_only and not torch.cuda.is_available():
        cpu = [n for n, b in QUANTIZED_BASES.items() if not b.cuda_only]
        raise ValueError(
            f"--quantize-base {name}: bitsandbytes quantization loads on a CUDA GPU only; "
            f"without one use {' or '.join(cpu)} (optimum-quanto)"
        )
    if importlib.util.find_spec(q.package.split(".")[0]) is None or (
        "." in q.package and importlib.util.find_spec(q.package) is None
    ):
        raise ValueError(f"--quantize-base {name}: needs {q.pip} (pip install {q.pip})")


def model_quantization_config(name: str):
    """diffusers' config that loads one model quantized as ``name`` says. bitsandbytes
    computes in bf16, the dtype FLUX and SD3 are released in, as diffusers' FLUX QLoRA
    recipe does."""
    import diffusers
    import torch

    q = QUANTIZED_BASES[name]
    settings = dict(q.settings)
    if q.backend == "bitsandbytes":
        settings["bnb_4bit_compute_dtype"] = torch.bfloat16
        return diffusers.BitsAndBytesConfig(**settings)
    with quanto_quietly():
        return diffusers.QuantoConfig(**settings)


def quantization_config(name: str, component: str):
    """diffusers' pipeline-level config that quantizes only ``component`` (the denoiser)."""
    from diffusers.quantizers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping={component: model_quantization_config(name)})


def match_input_dtype(module: torch.nn.Module) -> None:
    """Run each quanto layer in its weights' dtype, and hand its output on as torch's would.

    Under ``--mixed-precision bf16`` autocast reaches into quanto's forward (its matmul gives
    bf16) but not its backward, where a bf16 gradient then meets float32 weights and fails; a
    bf16 activation meeting float32 scales fails the same way. So the layer runs without
    autocast, in its own dtype, and the casts around it, autograd ops, carry the gradient
    back in the right dtype. bitsandbytes' layers cast for themselves.
    """
    for m in module.modules():
        if type(m).__module__.startswith("optimum.quanto") and not hasattr(m, "_loreun_cast"):
            m._loreun_cast = m.forward
            m.forward = partial(_in_weight_dtype, m)


def _in_weight_dtype(module, x, *args, **kwargs):
    """The layer in its weights' dtype; the output in the dtype torch's own Linear would give
    (autocast's, where it is on), so the gradient comes back through a cast, in that dtype."""
    import torch

    kind = x.device.type
    autocast = torch.is_autocast_enabled(kind)
    with torch.autocast(kind, enabled=False):  # quanto's backward runs without it
        out = module._loreun_cast(x.to(module.weight.dtype), *args, **kwargs)
    return out.to(torch.get_autocast_dtype(kind) if autocast else x.dtype)


def is_quantized(p: torch.Tensor) -> bool:
    """Whether a parameter holds quantized storage (quanto's tensors, bitsandbytes' params),
    which must be neither cast nor copied as a plain tensor."""
    import torch

    return type(p) not in (torch.nn.Parameter, torch.Tensor) or type(p.data) is not torch.Tensor


def quantized_name(module: torch.nn.Module) -> str | None:
    """The ``--quantize-base`` choice a loaded denoiser was quantized with, or None."""
    quantizer = getattr(module, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    if config is None:
        return None
    for name, q in QUANTIZED_BASES.items():
        if all(getattr(config, k, None) == v for k, v in q.settings):
            return name
    return "other"


@contextmanager
def quanto_quietly():
    """Load without diffusers' notice that its quanto backend is deprecated: the docs say it
    once, and every run printing it would bury the run's own first lines."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Qq]uanto.*deprecated", category=FutureWarning)
        yield


def original_tensors(module: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """name -> the tensor as stored in the checkpoint ``module`` was loaded from, in float32.

    A quantized module's weights are rounded copies; the fingerprints an erased file carries
    and the merged tensors it holds must be the base's own, or the file would not load onto
    the unquantized model. Reads only the named tensors, from single or sharded safetensors.
    """
    from safetensors import safe_open

    folder = Path(module.config._name_or_path)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        single = folder / "diffusion_pytorch_model.safetensors"
        if not single.is_file():
            raise ValueError(
                f"--quantize-base: {folder} holds no diffusion_pytorch_model.safetensors to "
                "read the base's own tensors from"
            )
        weight_map = dict.fromkeys(names, single.name)
    out: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for n in names:
        if n not in weight_map:
            raise ValueError(f"--quantize-base: {folder} has no tensor {n!r}")
        by_file.setdefault(weight_map[n], []).append(n)
    for file, wanted in by_file.items():
        with safe_open(str(folder / file), framework="pt") as f:
            for n in wanted:
                out[n] = f.get_tensor(n).float()
    return out


def placement_line(pipe, family, device, visiting: str | None = None) -> str:
    """What sits where while training, for the run's first lines: the denoiser (quantized or
    not) on the device, the encoders and the VAE on the CPU between their one-off uses;
    ``visiting`` names what brings the encoders to the device for a while (the attack of
    ``--adversarial``, text-encoder training)."""
    den = family.denoiser(pipe)
    q = quantized_name(den)
    size = sum(_nbytes(t) for t in (*den.parameters(), *den.buffers()))
    held = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.2f} MB"
    what = f"{family.denoiser_name} ({q or 'not quantized'}, {held})"
    others = [n for n in (*family.text_encoders, "vae") if getattr(pipe, n, None) is not None]
    line = (
        f"on {device}: the {what}; on cpu, used once and cached: {', '.join(others)} "
        "(prompt embeddings and forget latents are computed once)"
    )
    return line + (f"; the text encoders visit {device} for {visiting}" if visiting else "")


def _nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, quantized storage included."""
    import torch

    data = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(data) is torch.Tensor:
        return data.numel() * data.element_size()
    inner = getattr(data, "__tensor_flatten__", None)  # quanto: int data, scale, shift
    if inner is not None:
        return sum(_nbytes(getattr(data, n)) for n in inner()[0])
    return data.numel() * data.element_size()
