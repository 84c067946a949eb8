"""UCE's closed-form edit (``--objective uce``): our reading of Unified Concept Editing
(Gandikota et al., WACV 2024) and of its released ``uce_sd_erase.py``.

Every linear map W [O, I] that reads the text conditioning is replaced, in one solve, by the W'
that minimises

    s_e sum_i ||W' c_i - W g_i||^2 + s_p sum_j ||W' k_j - W k_j||^2 + lambda ||W' - W||_F^2,

where c_i are the erased concepts' vectors, g_i their guide's (the empty prompt by default),
k_j the kept prompts' (``--retain-concept``, and the run's other concepts are not kept: they
are erased too). Setting the gradient to zero gives

    W' = (lambda W + s_e sum_i W g_i c_i^T + s_p sum_j W k_j k_j^T)
         (lambda I + s_e sum_i c_i c_i^T + s_p sum_j k_j k_j^T)^-1,

solved in float64. A prompt's vectors are its last word token's embedding in each encoder's
stretch of the conditioning (UCE's choice: the token that has read the whole prompt; for the
empty prompt the start token, or T5's end token). A bias, where the map has one, cancels from
both sides and stays.

Which maps the family says (``Family.uce_module``): a UNet's cross-attention keys and values
(UCE's), or an MMDiT's ``context_embedder``, the one linear map every text token passes through
before the joint blocks, and the first layer of its pooled text projection, solved on the
prompts' pooled embeddings (our reading: the blocks' own text projections see tokens already
mixed with the image and the time, where a closed form is no longer exact; without the pooled
path, which modulates every block, the edit alone did not erase a digit from digits-flow).
Seconds, no sampling; the result is an ordinary erased file.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from loreun.pipelines.family import Cond, Family, encode_prompts, family_of
from loreun.pipelines.loading import base_fingerprints
from loreun.pipelines.runtime import say

from .config import EraseConfig


def token_positions(pipe, family: Family, prompt: str) -> list[int]:
    """Where ``prompt``'s last word token sits in the conditioning's sequence, once per encoder
    stretch of it (``Family.token_sequence``; SD3: CLIP's, then T5's)."""
    encoders = {e.name: e for e in family.prompt_encoders(pipe)}
    positions, offset = [], 0
    for name in family.token_sequence:
        enc = encoders.get(name)
        if enc is None:  # SD3 without T5: zeros in its place
            offset += family.pipe_kwargs(pipe)["max_sequence_length"]
            continue
        mask = enc.tokenizer(
            prompt, padding="max_length", max_length=enc.length, truncation=True
        ).attention_mask
        positions.append(offset + max(sum(mask) - 2, 0))
        offset += enc.length
    return positions


def prompt_vectors(
    pipe, family: Family, prompts: list[str], device, batch: int = 64
) -> dict[str, torch.Tensor]:
    """{"tokens": [P * T, I], "pooled": [P, I_p] where the family has a pooled embedding}, float64:
    each prompt's T last-word vectors (``token_positions``) and its pooled embedding, encoded
    ``batch`` prompts at a time."""
    tokens, pooled = [], []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        cond = encode_prompts(pipe, chunk, device)
        emb = cond.emb if isinstance(cond, Cond) else cond
        for i, prompt in enumerate(chunk):
            tokens.append(emb[i, token_positions(pipe, family, prompt)].double().cpu())
        if isinstance(cond, Cond):
            pooled.append(cond.pooled.double().cpu())
    empty = torch.zeros(0, 1, dtype=torch.float64)
    out = {"tokens": torch.cat(tokens) if tokens else empty}
    if pooled:
        out["pooled"] = torch.cat(pooled)
    return out


def uce_weight(
    w: torch.Tensor,
    erase: torch.Tensor,
    guide: torch.Tensor,
    keep: torch.Tensor,
    erase_scale: float,
    preserve_scale: float,
    lamb: float,
) -> torch.Tensor:
    """The closed form of the module docstring: W [O, I], erased vectors [N, I] with their
    guides' [N, I], kept vectors [M, I] (M may be 0) -> W' [O, I] in W's dtype."""
    w64 = w.detach().double().cpu()
    eye = torch.eye(w64.shape[1], dtype=torch.float64)
    left = lamb * w64 + erase_scale * (guide @ w64.T).T @ erase
    right = lamb * eye + erase_scale * erase.T @ erase
    if len(keep):
        left = left + preserve_scale * (keep @ w64.T).T @ keep
        right = right + preserve_scale * keep.T @ keep
    # right is symmetric positive definite: W' = left right^-1 = (right^-1 left^T)^T
    return torch.linalg.solve(right, left.T).T.to(w.dtype)


def uce_edit(cfg: EraseConfig, pipe, family: Family, device) -> dict[str, torch.Tensor]:
    """name -> edited weight, for every linear map the family's ``uce_module`` names, each
    solved on the vectors of the conditioning it reads (tokens, or the pooled embedding)."""
    n = len(cfg.concepts)
    erase = prompt_vectors(pipe, family, cfg.concepts, device)
    guide = {
        k: v.repeat(n, 1) for k, v in prompt_vectors(pipe, family, [cfg.uce_guide], device).items()
    }
    keep = prompt_vectors(pipe, family, cfg.retain_concepts, device)
    edited = {}
    for name, module in family.denoiser(pipe).named_modules():
        kind = family.uce_module(name)
        if not isinstance(module, torch.nn.Linear) or kind is None:
            continue
        kept = keep.get(kind, torch.zeros(0, module.in_features, dtype=torch.float64))
        edited[f"{name}.weight"] = uce_weight(
            module.weight, erase[kind], guide[kind], kept,
            cfg.uce_erase_scale, cfg.uce_preserve_scale, cfg.uce_lambda,
        )  # fmt: skip
    if not edited:
        raise ValueError(f"--objective uce: {type(pipe).__name__} has no module UCE edits")
    return edited


def run_uce(cfg: EraseConfig, acc, out: Path) -> Path:
    """Load, solve, export: the whole ``erase`` of a closed-form run. Returns the erased file."""
    from loreun.pipelines.files import atomic_write_text
    from loreun.pipelines.loading import read_erased_file
    from loreun.pipelines.models import load_pipeline
    from loreun.pipelines.schedule import schedule_of

    from .export import export_erased, save_pipeline_folder

    say(acc, f"loading {cfg.model}")
    pipe = load_pipeline(cfg.model, cfg.model_config)
    family = family_of(pipe)
    start = time.perf_counter()
    with torch.no_grad():
        edited = uce_edit(cfg, pipe, family, acc.device)
    say(acc, f"edited {len(edited)} tensors in {time.perf_counter() - start:.1f} s")
    denoiser = family.denoiser(pipe)
    state = denoiser.state_dict()
    fingerprints = base_fingerprints({n: state[n] for n in edited})
    kind = schedule_of(pipe).prediction_type
    extra = save_uce_lora(cfg, pipe, family, edited, out, kind) if cfg.lora_rank else {}
    path = export_erased(out, edited, cfg, fingerprints, 0, None, kind, 1, family.pipeline, extra)
    if cfg.lora_rank:
        from .card import CARD, base_license, lora_card
        from .lora import KOHYA_FILE, LORA_FILE

        files = {"diffusers": LORA_FILE} | ({"kohya": KOHYA_FILE} if family.kohya_version else {})
        meta = read_erased_file(path)[1]
        atomic_write_text(out / CARD, lora_card(meta, files, base_license(cfg.model)))
    if cfg.save_pipeline:
        with torch.no_grad():
            for name, value in edited.items():
                state[name].copy_(value)
        save_pipeline_folder(pipe, out / "pipeline", read_erased_file(path)[1], base=cfg.model)
    return path


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` factorisation of an edit (truncated SVD, Eckart-Young): (B [O, r],
    A [r, I], ||delta - B A||_F / ||delta||_F)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, len(s))
    b, a = u[:, :r] * s[:r], vh[:r]
    residual = float((delta.double() - b @ a).norm() / delta.double().norm().clamp_min(1e-30))
    return b.float(), a.float(), residual


def save_uce_lora(cfg: EraseConfig, pipe, family: Family, edited: dict, out: Path, kind) -> dict:
    """``--lora-rank`` with UCE: each edit ``W' - W`` factorised to the rank and written as the
    LoRA files a trained LoRA has (``lora.save_lora_files``: diffusers' and kohya's); returns
    the header fields that say how close the factorisation is (the erased file keeps the exact
    edit)."""
    from peft import LoraConfig

    from .lora import ADAPTER, save_lora_files

    denoiser = family.denoiser(pipe)
    modules = sorted(name[: -len(".weight")] for name in edited)
    alpha = cfg.lora_alpha or cfg.lora_rank
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, target_modules=modules)
    denoiser.add_adapter(config, adapter_name=ADAPTER)
    residuals = {}
    with torch.no_grad():
        for module in modules:
            layer = denoiser.get_submodule(module)
            delta = edited[f"{module}.weight"].double() - layer.base_layer.weight.double()
            b, a, residuals[module] = low_rank(delta, cfg.lora_rank)
            layer.lora_A[ADAPTER].weight.zero_()[: a.shape[0]].copy_(a)
            layer.lora_B[ADAPTER].weight.zero_()[:, : b.shape[1]].copy_(b * cfg.lora_rank / alpha)
    save_lora_files(denoiser, out, type(pipe), family, kind)
    denoiser.unload_lora()  # the modules as they were: the pipeline is saved with the edit
    worst = max(residuals.values())
    return {"uce_lora": {"rank": cfg.lora_rank, "largest_relative_residual": worst}}
