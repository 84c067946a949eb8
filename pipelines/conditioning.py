"""The conditioning layer's noise side: how a model's forward process and parametrisation turn
a clean latent into a noisy input and a denoising target.

Models differ in what the UNet predicts (``prediction_type`` in the scheduler config): SD 1.x
predicts the noise (``epsilon``), SD 2.x 768 and others the velocity (``v_prediction``,
Salimans & Ho 2022, section 4). Every loss that compares a prediction with a known target (the
denoising loss of retain items and of GA, LoReUn's difficulty, the saliency gradient) asks this
module for the target, so it always matches the model. Losses that compare the student with the
frozen teacher (ESD, remap) need nothing: both speak the same parametrisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


def prediction_type(scheduler_config) -> str:
    """The model's parametrisation from its scheduler config; any other one is an error."""
    kind = dict(scheduler_config).get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(
            f"model predicts {kind!r}; loreun supports prediction_type "
            f"{' and '.join(PREDICTION_TYPES)}"
        )
    return kind


@dataclass
class NoiseSchedule:
    """The forward process q(x_t | x_0) and the target a model predicts.

    Attributes:
        alphas_cumprod: [T] cumulative products of the scheduler's alphas.
        prediction_type: "epsilon" or "v_prediction".
    """

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"

    @classmethod
    def from_scheduler(cls, scheduler) -> NoiseSchedule:
        return cls(scheduler.alphas_cumprod.float().cpu(), prediction_type(scheduler.config))

    def __len__(self) -> int:
        return len(self.alphas_cumprod)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor):
        a = self.alphas_cumprod.to(like.device)[t.to(like.device)].float().view(-1, 1, 1, 1)
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for [B, C, H, W] x_0, noise and [B] t."""
        s, n = self._coefficients(t, x0)
        return (s * x0.float() + n * noise.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What a perfect model predicts at (x_t, t): eps, or v = sqrt(abar) eps - sqrt(1-abar) x_0.

        Shapes as ``add_noise``; returns [B, C, H, W] in float32.
        """
        if self.prediction_type == "epsilon":
            return noise.float()
        s, n = self._coefficients(t, x0)
        return s * noise.float() - n * x0.float()


# ----------------------------------------------------------------------------- prompts


@dataclass
class Cond:
    """Prompt conditioning of B prompts for a family with extra inputs (SDXL).

    SD 1.x and 2.x condition on a plain [B, L, D] tensor, which every helper below accepts as
    well; SDXL also needs the second text encoder's pooled embedding and the size "time ids".
    Cond supports the few tensor operations the layers above use (indexing, ``expand``,
    ``repeat_interleave``, ``to``, ``len``), so they stay family-blind.

    Attributes:
        emb: [B, L, D] token embeddings (both encoders' concatenated for SDXL).
        pooled: [B, P] pooled embedding of the second text encoder.
        time_ids: [B, 6] (original h, w, crop top, left, target h, w).
    """

    emb: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.emb)

    def __getitem__(self, idx) -> Cond:
        return Cond(self.emb[idx], self.pooled[idx], self.time_ids[idx])

    def expand(self, n: int, *_) -> Cond:
        return Cond(
            self.emb.expand(n, -1, -1), self.pooled.expand(n, -1), self.time_ids.expand(n, -1)
        )

    def repeat_interleave(self, repeats: int, dim: int = 0) -> Cond:
        return Cond(*(t.repeat_interleave(repeats, dim=dim) for t in self._parts()))

    def to(self, *args, **kwargs) -> Cond:
        return Cond(*(t.to(*args, **kwargs) for t in self._parts()))

    def _parts(self) -> tuple[torch.Tensor, ...]:
        return self.emb, self.pooled, self.time_ids


def cat_cond(conds: list) -> torch.Tensor | Cond:
    """Concatenate conditionings along the batch, tensors or ``Cond`` alike."""
    if isinstance(conds[0], Cond):
        return Cond(*(torch.cat(parts) for parts in zip(*(c._parts() for c in conds))))
    return torch.cat(conds)


def unet_kwargs(cond) -> dict:
    """The keyword arguments of a diffusers ``UNet2DConditionModel`` call for a conditioning."""
    if isinstance(cond, Cond):
        extra = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        return {"encoder_hidden_states": cond.emb, "added_cond_kwargs": extra}
    return {"encoder_hidden_states": cond}


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device, size: int | None = None):
    """Encode prompts once with the pipeline's own text encoder(s).

    Args:
        prompts: P prompts; "" is encoded as a prompt like any other.
        size: the pixel size of the images trained on, which SDXL's time ids carry.

    Returns:
        [P, L, D] float32 for SD 1.x/2.x, or a ``Cond`` for SDXL.
    """
    if getattr(pipe, "text_encoder_2", None) is None:
        return _encode_one(pipe, prompts, device)
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    for enc in encoders:
        enc.to(device)
    emb, _, pooled, _ = pipe.encode_prompt(
        prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    for enc in encoders:
        enc.to("cpu")
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
    return Cond(emb.float(), pooled.float(), time_ids.expand(len(prompts), -1).to(emb.device))


def _encode_one(pipe, prompts: list[str], device) -> torch.Tensor:
    """SD 1.x/2.x: the text encoder's last hidden state, as their pipelines use it."""
    tok = pipe.tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    )
    enc = pipe.text_encoder.to(device)
    emb = enc(tok.input_ids.to(device))[0]
    pipe.text_encoder.to("cpu")
    return emb.float()
