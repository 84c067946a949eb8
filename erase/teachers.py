"""The frozen teachers: the original model's predictions while the student trains.

Both answer ``teacher(x_t [B, C, H, W], t [B], conditioning) -> [B, C, H, W]`` without gradient,
through the family's own denoiser call, and hold ``base`` (name -> the trained tensors' original
values, which a saliency mask restores untrained entries to) and ``exact`` (whether those
originals are bit-exact).

* ``FrozenTeacher``: full training; frozen copies of the trained tensors only.
* ``AdapterOffTeacher``: LoRA training; the same module with its adapters off.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from functools import partial

import torch

from loreun.pipelines.family import Family, family_of
from loreun.pipelines.loading import base_fingerprints
from loreun.pipelines.quantize import is_quantized, original_tensors, placement_line

from .config import EraseConfig
from .lora import add_lora
from .presets import select_parameters


class FrozenTeacher:
    """The original model without a second denoiser: frozen copies of the trained tensors only.

    Untrained tensors are shared with the student, so they are already the originals. The teacher
    is a second module tree over the same storage (``shared_copy``): the student's untrained
    tensors and the frozen copies of its trained ones, so a call is a plain forward, not a swap
    of the copies per call (docs/benchmarks.md, "The teacher call").

    With ``dtype`` (``--frozen-dtype bf16``) the copies are kept at half size and each module's
    own copies are cast back to the student's dtype only while that module runs, so the teacher
    never holds a full-precision copy of more than one module (its outputs then differ from the
    original model's by the rounding of the stored weights).

    Args:
        family: the model's ``Family``, which knows how its denoiser is called.
        denoiser: the module being trained (unwrapped).
        trained: name -> parameter for the tensors that training changes.
        dtype: dtype of the frozen copies; None keeps the trained tensors' own.
    """

    def __init__(
        self,
        family: Family,
        denoiser: torch.nn.Module,
        trained: dict[str, torch.nn.Parameter],
        dtype: torch.dtype | None = None,
    ):
        self.family = family
        self.denoiser = denoiser
        self.base = {n: p.detach().to(dtype or p.dtype, copy=True) for n, p in trained.items()}
        self.exact = all(self.base[n].dtype == p.dtype for n, p in trained.items())
        self._owners = _owners(denoiser, trained) if not self.exact else []
        self.module = shared_copy(denoiser, self.base) if self.exact else None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """[B, C, H, W], [B], conditioning of B -> [B, C, H, W] the original model's
        prediction, without gradient."""
        with torch.no_grad():
            if self.exact:
                return self.family.predict(self.module, x, t, cond)
            with self._cast_per_module():
                return self.family.predict(self.denoiser, x, t, cond)

    @contextmanager
    def _cast_per_module(self):
        """Hooks that swap each owning module's frozen copies in (cast) and its own tensors back."""
        handles, originals = [], {}

        def swap_in(names, module, args):
            for local, full in names:
                originals[(id(module), local)] = module._parameters[local]
                module._parameters[local] = self.base[full].to(originals[(id(module), local)])

        def swap_out(names, module, args, output):
            for local, _ in names:
                module._parameters[local] = originals.pop((id(module), local))

        try:
            for module, names in self._owners:
                handles.append(module.register_forward_pre_hook(partial(swap_in, names)))
                handles.append(module.register_forward_hook(partial(swap_out, names)))
            yield
        finally:
            for h in handles:
                h.remove()
            for module, names in self._owners:  # after an exception inside a module
                for local, _ in names:
                    if (id(module), local) in originals:
                        module._parameters[local] = originals.pop((id(module), local))


def shared_copy(module: torch.nn.Module, replace: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``module``'s tree that allocates no tensor: every parameter and buffer is the
    original's own, except the parameters named in ``replace``, which become those tensors
    (frozen, same storage).

    ``deepcopy`` consults its memo before copying an object, so pre-filling the memo with each
    tensor's stand-in makes it copy the modules and reuse the tensors.
    """
    memo: dict[int, object] = {}
    for name, p in module.named_parameters(remove_duplicate=False):  # tied tensors: any name
        if name in replace:
            memo[id(p)] = torch.nn.Parameter(replace[name], requires_grad=False)
        else:
            memo.setdefault(id(p), p)
    for b in module.buffers():
        memo[id(b)] = b
    return copy.deepcopy(module, memo)


def _owners(module: torch.nn.Module, trained: dict) -> list[tuple[torch.nn.Module, list]]:
    """[(module, [(its parameter name, full name)])] for every module owning a trained tensor."""
    owners: dict[str, list] = {}
    for full in trained:
        module_name, _, local = full.rpartition(".")
        owners.setdefault(module_name, []).append((local, full))
    return [(module.get_submodule(m), names) for m, names in owners.items()]


class AdapterOffTeacher:
    """The original model as the same denoiser with its adapters switched off, without gradient.

    ``base`` holds the adapters' initial values, which a saliency mask restores untrained
    entries to; they are tiny, so the copy is exact.
    """

    exact = True

    def __init__(
        self, family: Family, denoiser: torch.nn.Module, trained: dict[str, torch.nn.Parameter]
    ):
        self.family = family
        self.denoiser = denoiser
        self.base = {n: p.detach().clone() for n, p in trained.items()}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """[B, C, H, W], [B], conditioning -> [B, C, H, W] the base model's prediction."""
        self.denoiser.disable_adapters()
        try:
            with torch.no_grad():
                return self.family.predict(self.denoiser, x, t, cond)
        finally:
            self.denoiser.enable_adapters()


# --mixed-precision and --frozen-dtype names -> the dtype (None: leave as loaded)
TORCH_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_denoiser(cfg: EraseConfig, acc):
    """(pipe, family, denoiser): the model loaded (its denoiser quantized with
    ``--quantize-base``), the denoiser frozen on the device, the rest on the CPU."""
    from loreun.pipelines.models import load_pipeline
    from loreun.pipelines.runtime import say

    pipe = load_pipeline(cfg.model, cfg.model_config, quantize=cfg.quantize_base)
    family = family_of(pipe)
    family.check_size(pipe, cfg.resolution, "--resolution")
    denoiser = family.denoiser(pipe)
    if not getattr(denoiser, "is_loaded_in_4bit", False):  # bitsandbytes places it itself
        denoiser.to(acc.device)
    denoiser.requires_grad_(False)
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    visiting = "the attack" if cfg.adversarial else None
    visiting = "training" if cfg.train != "denoiser" else visiting
    say(acc, placement_line(pipe, family, acc.device, visiting))
    return pipe, family, denoiser


def trainable(
    cfg: EraseConfig, family: Family, denoiser, pipe=None
) -> tuple[dict, object, dict[str, str]]:
    """(name -> trained parameter, the teacher, the base fingerprints of the trained tensors).

    Full training trains the preset's tensors against frozen copies of them; ``--lora-rank``
    trains adapters on the same modules against the denoiser with its adapters off. With
    ``--train text-encoder`` or ``both`` the text encoders' tensors train too
    (``text_encoder.py``); the teacher's conditionings are the items' frozen embeddings, so
    the teacher needs no copy of them.
    """
    from .text_encoder import add_text_encoder_lora, text_encoder_parameters

    if cfg.lora_rank and cfg.train == "text-encoder":  # adapters on the encoders only
        trained, base = add_text_encoder_lora(cfg, pipe, family)
        return trained, FrozenTeacher(family, denoiser, {}), base_fingerprints(base)
    text = text_encoder_parameters(cfg, pipe, family)
    preset = {}
    if cfg.train != "text-encoder":
        preset = select_parameters(denoiser, cfg.method, family.presets)
    base_fp = base_fingerprints(base_values(denoiser, {**preset, **text}))
    if cfg.lora_rank:
        alpha = cfg.lora_alpha or cfg.lora_rank
        trained = add_lora(denoiser, preset, cfg.lora_rank, alpha, cfg.seed)
        cast_untrained(denoiser, trained, TORCH_DTYPES.get(cfg.mixed_precision))
        return trained, AdapterOffTeacher(family, denoiser, trained), base_fp
    for p in (*preset.values(), *text.values()):
        p.requires_grad_(True)
    cast_untrained(denoiser, preset, TORCH_DTYPES.get(cfg.mixed_precision))
    teacher = FrozenTeacher(family, denoiser, preset, TORCH_DTYPES[cfg.frozen_dtype])
    start_from(cfg, pipe, {**preset, **text})  # after the teacher copied the base
    return {**preset, **text}, teacher, base_fp


def base_values(denoiser, trained: dict) -> dict[str, torch.Tensor]:
    """name -> the base's own value of each trained tensor: the checkpoint's for tensors held
    quantized (``quantize.original_tensors``), so fingerprints match the unquantized base."""
    quantized = [n for n, p in trained.items() if is_quantized(p)]
    out = {n: p.detach() for n, p in trained.items() if n not in quantized}
    return out | (original_tensors(denoiser, quantized) if quantized else {})


def start_from(cfg: EraseConfig, pipe, trained: dict) -> None:
    """``--init-from``: copy an earlier erasure's tensors into the trained ones, so training
    continues from it (UCE's edit, then fine-tuning: the hybrid). The file must be of this base
    and change only tensors this run trains, or the teacher, which shares the untrained ones,
    would stop being the base model."""
    if cfg.init_from is None:
        return
    from loreun.pipelines.loading import check_compatible, erased_file, read_erased

    path = erased_file(cfg.init_from)
    tensors, meta, _ = read_erased(path)
    check_compatible(pipe, tensors, meta, source=f"--init-from: {path}")
    outside = sorted(set(tensors) - set(trained))
    if outside:
        raise ValueError(
            f"--init-from: {path} changes {len(outside)} tensors this run does not train, e.g. "
            f"{outside[0]}; train them too (--method, --train) or start from the base"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            trained[name].copy_(value.to(trained[name]))


def cast_untrained(denoiser: torch.nn.Module, trained: dict, dtype: torch.dtype | None) -> None:
    """Hold the denoiser's untrained floating-point parameters in ``dtype`` (``--mixed-precision``).

    Under autocast every convolution and matmul casts its weight to that dtype on each call, so
    a full-precision copy of a weight that never trains buys nothing but memory: this is what
    diffusers' training scripts do with their frozen weights. The trained tensors stay in full
    precision, so small updates are not rounded away. Buffers keep their dtype.

    Every other tensor is copied out of the checkpoint: diffusers maps a safetensors file into
    memory and its tensors are views of that one map, so a single tensor left on it keeps every
    page read so far resident (docs/benchmarks.md measures the difference on an SD-1.4-shaped
    model).
    """
    if dtype is None:
        return
    keep = {id(p) for p in trained.values()}
    for p in denoiser.parameters():
        if is_quantized(p):  # a quantized base (--quantize-base) keeps its own storage
            continue
        cast = id(p) not in keep and p.is_floating_point() and not p.requires_grad
        p.data = p.data.to(dtype) if cast else p.data.clone()
    for b in denoiser.buffers():
        b.data = b.data.clone()
