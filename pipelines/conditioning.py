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
