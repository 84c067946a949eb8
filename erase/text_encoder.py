"""Text-encoder erasure (``--train text-encoder`` or ``both``): the CLIP encoders that read the
prompt train, and the student reads each prompt through them at every step.

AdvUnlearn (Zhang et al., 2024) found that an erasure holds against prompt attacks when it lives
in the text encoder: an attack can only reach the denoiser through the conditioning, and an
encoder that no longer maps the concept's prompts to the concept closes that path for every
prompt that goes through it. Our reading of its recipe:

* the teacher stays the original model: its conditionings are the items' embeddings, computed
  once by the frozen encoders before training, so ESD's target and the retain term's target are
  the original model's;
* the student reads each item's prompt as token ids through the encoders being trained
  (``Family.encode_ids``, with gradient), so the loss reaches their weights;
* token and position embeddings stay (AdvUnlearn's choice: the vocabulary keeps its meaning,
  what changes is how the layers read it); T5 (SD3, FLUX) does not train: it is 4.7B
  parameters in FLUX.1, and the CLIP encoders' pooled output already conditions every block
  (our choice).

The trained tensors are named ``<encoder attribute>.<its own name>`` (``text_encoder.text_model
.encoder.layers.0...``) in the run, its checkpoints and the erased file, so one file holds a
denoiser and a text-encoder erasure and ``pipelines/loading.py`` routes each tensor home.
"""

from __future__ import annotations

import re

import torch

from loreun.pipelines.family import Family

from .config import EraseConfig, parse_layers

LAYER = re.compile(r"\.layers\.(\d+)\.")
# --text-encoder-part's names for a subset of each CLIP layer (config.TEXT_ENCODER_PARTS)
PARTS = {"attn": ".self_attn.", "mlp": ".mlp."}


def clip_encoders(pipe, family: Family) -> list:
    """The ``PromptEncoder``s a text-encoder erasure trains: every CLIP encoder that reads the
    prompt (all but T5)."""
    return [e for e in family.prompt_encoders(pipe) if e.name != family.t5_encoder]


def text_encoder_parameters(cfg: EraseConfig, pipe, family: Family) -> dict[str, torch.Tensor]:
    """name -> parameter for the text-encoder tensors the run trains ({} with --train denoiser).

    Raises:
        ValueError: naming --text-encoder-layers when the range selects no layer.
    """
    if cfg.train == "denoiser":
        return {}
    layers = parse_layers(cfg.text_encoder_layers)
    selected = {}
    for enc in clip_encoders(pipe, family):
        names = [name for name, _ in enc.module.named_parameters()]
        count = len({m.group(1) for m in map(LAYER.search, names) if m})
        chosen = set(range(count)[layers])
        for name, param in enc.module.named_parameters():
            if _wanted(name, cfg.text_encoder_part, chosen, len(chosen) == count):
                selected[f"{enc.name}.{name}"] = param
    if not selected:
        raise ValueError(
            f"--text-encoder-layers: {cfg.text_encoder_layers} selects no layer of the text "
            "encoders"
        )
    return selected


def _wanted(name: str, part: str, chosen: set[int], every_layer: bool) -> bool:
    """Whether parameter ``name`` of a CLIP text model trains for ``part`` and ``chosen``
    layers; what lies outside the layers (the final norm, the projection) trains with ``all``
    over every layer."""
    if "embeddings." in name:
        return False
    match = LAYER.search(name)
    if match is None:
        return part == "all" and every_layer
    if int(match.group(1)) not in chosen:
        return False
    return part == "all" or PARTS[part] in name


class StudentText:
    """The student's prompts as token ids, encoded through the encoders being trained.

    Args:
        pipe: the run's pipeline; its prompt encoders move to ``device`` and stay there.
        forget: [N] each forget item's prompt; retain: [M] each retain item's, or None.
        size: the pixel size the items were encoded at (SDXL's time ids).
    """

    def __init__(self, pipe, family: Family, forget: list[str], retain, size: int, device):
        self.pipe, self.family, self.size = pipe, family, size
        self.encoders = family.prompt_encoders(pipe)
        for enc in self.encoders:
            enc.module.to(device)
        self.forget_ids = self.tokenize(forget)
        self.retain_ids = None if retain is None else self.tokenize(retain)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{encoder name: [P, L]} as the pipeline tokenizes each encoder's prompt."""
        return {e.name: e.tokenize(prompts) for e in self.encoders}

    def encode(self, ids: dict[str, torch.Tensor]):
        """The student's conditioning of token ids {name: [B, L]}, with gradient: [B, L, D] or
        a ``Cond``."""
        return self.family.encode_ids(self.pipe, ids, self.size)

    def forget(self, rows: torch.Tensor):
        """The conditioning of forget items ``rows`` [B]."""
        return self.encode({n: v[rows.cpu()] for n, v in self.forget_ids.items()})

    def retain(self, rows: torch.Tensor):
        """The conditioning of retain items ``rows`` [B]."""
        return self.encode({n: v[rows.cpu()] for n, v in self.retain_ids.items()})


def read_through(text: StudentText | None, batch, which: str):
    """``batch`` (an ``ItemBatch`` of forget or retain items, ``which``) with the student's
    conditioning read through the training encoders; unchanged without text-encoder
    training."""
    import dataclasses

    if text is None:
        return batch
    encode = text.forget if which == "forget" else text.retain
    return dataclasses.replace(batch, prompt=encode(batch.ids))


def build_student_text(cfg: EraseConfig, pipe, family: Family, forget, retain, acc):
    """The run's ``StudentText``, or None with --train denoiser."""
    if cfg.train == "denoiser":
        return None
    if acc.num_processes > 1:
        raise ValueError(
            f"--train {cfg.train}: runs on one process for now (the text encoders are not "
            "wrapped for gradient averaging)"
        )
    size = cfg.resolution or family.native_size(pipe)
    retain_prompts = None if retain is None else retain.captions
    return StudentText(pipe, family, forget.captions, retain_prompts, size, acc.device)


def linear_modules(encoder, names: list[str]) -> list[str]:
    """The ``nn.Linear`` modules of the layers among the owners of ``names`` (an encoder's own
    parameter names): what LoRA adapts, the modules kohya's trainer adapts too. Layer norms
    have no low-rank form, and the projection after the layers has no kohya name: they stay."""
    owners = sorted({n.rsplit(".", 1)[0] for n in names if LAYER.search(n)})
    return [m for m in owners if isinstance(encoder.get_submodule(m), torch.nn.Linear)]


def add_text_encoder_lora(cfg: EraseConfig, pipe, family: Family) -> tuple[dict, dict]:
    """Adapters of ``--lora-rank`` on the Linear modules of each CLIP encoder's selected part:
    (prefixed name -> adapter parameter, prefixed name -> base tensor of the adapted modules,
    which the erased file's merged tensors replace and its fingerprint covers)."""
    from peft import LoraConfig

    from .lora import ADAPTER, check_rank

    selected = text_encoder_parameters(cfg, pipe, family)
    trained, base = {}, {}
    for enc in clip_encoders(pipe, family):
        prefix = f"{enc.name}."
        own = [n[len(prefix) :] for n in selected if n.startswith(prefix)]
        modules = linear_modules(enc.module, own)
        check_rank(enc.module, modules, cfg.lora_rank)
        alpha = cfg.lora_alpha or cfg.lora_rank
        config = LoraConfig(
            r=cfg.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=modules
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            enc.module.add_adapter(config, adapter_name=ADAPTER)
        for name, param in enc.module.named_parameters():
            if ".lora_" in name:
                trained[prefix + name] = param.requires_grad_(True)
        for m in modules:
            for name, param in enc.module.get_submodule(m).get_base_layer().named_parameters():
                base[f"{prefix}{m}.{name}"] = param.detach()
    return trained, base


def merged_text_encoders(pipe, family: Family) -> dict[str, torch.Tensor]:
    """Each adapted encoder's tensors with the adapters' updates added, prefixed by its name:
    an ordinary erased file's text-encoder tensors."""
    from .lora import merged_tensors

    merged = {}
    for enc in clip_encoders(pipe, family):
        merged |= {f"{enc.name}.{k}": v for k, v in merged_tensors(enc.module).items()}
    return merged


def save_text_encoder_lora(pipe, family: Family, out) -> list:
    """diffusers' ``pytorch_lora_weights.safetensors`` (``<encoder>_lora_layers``, what
    ``load_lora_weights`` applies) and, for the families kohya names, kohya's ``lora_te``
    keys (what AUTOMATIC1111 and ComfyUI read) into ``out``; returns their paths."""
    import os
    import shutil

    from diffusers.utils import convert_state_dict_to_diffusers

    from loreun.pipelines.files import atomic_save_safetensors, refuse_link, temp_dir

    from .lora import KOHYA_FILE, LORA_FILE, kohya_metadata, lora_state_dict

    encoders = clip_encoders(pipe, family)
    names = [LORA_FILE] + ([KOHYA_FILE] if family.kohya_version else [])
    finals = [refuse_link(out / name) for name in names]
    states = {e.name: lora_state_dict(e.module) for e in encoders}
    tmp = temp_dir(finals[0])
    try:
        layers = {f"{n}_lora_layers": convert_state_dict_to_diffusers(s) for n, s in states.items()}
        type(pipe).save_lora_weights(
            save_directory=str(tmp), **layers, weight_name=LORA_FILE, safe_serialization=True
        )
        if family.kohya_version:
            kohya = kohya_text_encoders(states, single=len(encoders) == 1)
            version = family.kohya_version(family.denoiser(pipe))
            meta = kohya_metadata(version, encoders[0].module, "epsilon")
            atomic_save_safetensors(tmp / KOHYA_FILE, kohya, metadata=meta)
        for final in finals:
            os.replace(tmp / final.name, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return finals


def kohya_text_encoders(states: dict[str, dict], single: bool) -> dict[str, torch.Tensor]:
    """kohya's names for text-encoder adapters: ``lora_te_`` (SD 1.x/2.x's one encoder) or
    ``lora_te1_``/``lora_te2_`` (SDXL), over the module path of the original checkpoints
    (``text_model.encoder.layers...``, which transformers 5 shortens for ``CLIPTextModel``)."""
    from diffusers.utils import convert_state_dict_to_kohya

    prefixed = {}
    for name, state in states.items():
        for key, value in state.items():
            key = (
                key if key.startswith("text_model.") or "projection" in key else f"text_model.{key}"
            )
            prefixed[f"{name}.{key}"] = value
    kohya = convert_state_dict_to_kohya(prefixed)
    if single:
        kohya = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in kohya.items()}
    return kohya
