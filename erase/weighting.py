"""Per-sample weightings of the forget term: uniform, and LoReUn (arXiv 2507.22499).

LoReUn's premise: forget items that the model still fits well (low denoising loss under their
own prompt) are harder to forget, so they get more weight. Our reading of it, from the paper's
abstract and Figure 1 (its method section was not available):

* difficulty ``L_i`` is the denoising error of item i, computed without gradient;
* weights are ``n * softmax(-L / tau)``, mean 1, so the learning rate keeps its meaning;
* because ESD trains at batch size 1, where a batch softmax is a no-op, weights come from a
  memory over the whole forget set: an exponential moving average of each item's difficulty
  (our choice);
* denoising error depends strongly on the timestep, so each observation is divided by a running
  mean of the loss at its timestep before it enters the memory (our choice).

Weightings return weights only, with no gradient; the trainer combines them with the losses.
"""

from __future__ import annotations

import math

import torch


def softmax_weights(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """``n * softmax(-scores / temperature)``: lower score, higher weight; the mean is 1.

    Args:
        scores: [n] difficulties (lower = fits better).
        temperature: tau > 0; ``inf`` returns exact ones (uniform weighting).

    Returns:
        [n] weights without gradient.
    """
    scores = scores.detach().float()
    if math.isinf(temperature):
        return torch.ones_like(scores)
    return scores.numel() * torch.softmax(-scores / temperature, dim=0)


def effective_sample_size(weights: torch.Tensor) -> float:
    """``(sum w)^2 / sum w^2``: n for uniform weights, 1 when one item takes all the weight."""
    w = weights.detach().double()
    return float(w.sum() ** 2 / w.pow(2).sum())


class TimestepNormalizer:
    """Running mean of the denoising loss per timestep bucket.

    Dividing an item's loss by the mean loss at its timestep makes items observed at different
    timesteps comparable, which a memory filled one item at a time needs.
    """

    def __init__(self, num_train_timesteps: int = 1000, buckets: int = 10, momentum: float = 0.9):
        self.num_train_timesteps = num_train_timesteps
        self.momentum = momentum
        self.means = torch.full((buckets,), float("nan"))

    def bucket(self, t: torch.Tensor) -> torch.Tensor:
        n = len(self.means)
        return (t.long().cpu() * n // self.num_train_timesteps).clamp(0, n - 1)

    def update(self, t: torch.Tensor, loss: torch.Tensor) -> None:
        means, m = self.means.tolist(), self.momentum  # plain floats: this runs every step
        for b, v in zip(self.bucket(t).tolist(), loss.detach().float().cpu().tolist()):
            means[b] = v if math.isnan(means[b]) else m * means[b] + (1 - m) * v
        self.means = torch.tensor(means)

    def normalize(self, t: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """[B] losses at [B] timesteps -> [B] losses divided by their bucket's running mean."""
        means = self.means[self.bucket(t)]
        fallback = (
            self.means[~torch.isnan(self.means)].mean()
            if (~torch.isnan(self.means)).any()
            else torch.tensor(1.0)
        )
        means = torch.where(torch.isnan(means), fallback, means).clamp_min(1e-12)
        return loss.detach().float().cpu() / means


class UniformWeighting:
    """Every forget item weighs 1."""

    name = "uniform"
    needs_difficulty = False

    def weights(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(ids))

    def all_weights(self) -> torch.Tensor | None:
        return None

    def observe(self, ids, t, loss) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LoReUnWeighting:
    """LoReUn weights from a loss memory over the whole forget set.

    Args:
        num_items: N, the size of the forget set.
        temperature: tau of ``softmax_weights``.
        variant: "static" (memory filled once under the original weights) or "dynamic" (also
            updated with each step's difficulty under the current weights).
        momentum: EMA momentum of the memory.
        normalize: divide each observation by the running mean loss at its timestep.
    """

    name = "loreun"
    needs_difficulty = True

    def __init__(
        self,
        num_items: int,
        temperature: float,
        variant: str = "dynamic",
        momentum: float = 0.9,
        normalize: bool = True,
        num_train_timesteps: int = 1000,
    ):
        self.temperature = temperature
        self.variant = variant
        self.momentum = momentum
        self.normalizer = TimestepNormalizer(num_train_timesteps) if normalize else None
        self.memory = torch.full((num_items,), float("nan"))
        self._weights = None

    def fill(self, losses: torch.Tensor, t: torch.Tensor) -> None:
        """Initialise the memory from a probe of every item at a shared grid of timesteps.

        Args:
            losses: [N, K] difficulty of each item at each of K timesteps.
            t: [K] those timesteps. Sharing them across items removes the timestep confound
                from the initial memory; the per-timestep means seed the normalizer.
        """
        losses = losses.detach().float().cpu()
        if self.normalizer is not None:
            for k in range(len(t)):
                self.normalizer.update(t[k].repeat(len(losses)), losses[:, k])
            losses = losses / losses.mean(0, keepdim=True).clamp_min(1e-12)
        self.memory = losses.mean(1)
        self._weights = None

    def observe(self, ids: torch.Tensor, t: torch.Tensor, loss: torch.Tensor) -> None:
        """Fold [B] difficulties of items ``ids`` at timesteps ``t`` into the memory."""
        if self.variant == "static":
            return
        loss = loss.detach().float().cpu()
        if self.normalizer is not None:
            self.normalizer.update(t, loss)
            loss = self.normalizer.normalize(t, loss)
        memory, m = self.memory.tolist(), self.momentum
        for i, v in zip(ids.tolist(), loss.tolist()):
            memory[i] = v if math.isnan(memory[i]) else m * memory[i] + (1 - m) * v
        self.memory = torch.tensor(memory)
        self._weights = None

    def all_weights(self) -> torch.Tensor:
        """[N] weights of every forget item; unseen items get the mean difficulty."""
        if self._weights is None:  # recomputed only when the memory changes
            self._weights = self._compute_weights()
        return self._weights

    def _compute_weights(self) -> torch.Tensor:
        mem = self.memory
        seen = ~torch.isnan(mem)
        fill = mem[seen].mean() if seen.any() else torch.tensor(0.0)
        return softmax_weights(torch.where(seen, mem, fill), self.temperature)

    def weights(self, ids: torch.Tensor) -> torch.Tensor:
        """[B] weights of the sampled items, ``N * softmax(-memory / tau)[ids]``."""
        return self.all_weights()[ids.cpu()]

    def state_dict(self) -> dict:
        state = {"memory": self.memory.tolist()}
        if self.normalizer is not None:
            state["timestep_means"] = self.normalizer.means.tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.memory = torch.tensor(state["memory"], dtype=torch.float32)
        self._weights = None
        if self.normalizer is not None and "timestep_means" in state:
            self.normalizer.means = torch.tensor(state["timestep_means"], dtype=torch.float32)


def build_weighting(
    name: str,
    num_items: int,
    temperature: float = 1.0,
    variant: str = "dynamic",
    momentum: float = 0.9,
    normalize: bool = True,
    num_train_timesteps: int = 1000,
):
    """The weighting slot: a literal table of names."""
    table = {
        "uniform": lambda: UniformWeighting(),
        "loreun": lambda: LoReUnWeighting(
            num_items, temperature, variant, momentum, normalize, num_train_timesteps
        ),
    }
    if name not in table:
        raise ValueError(f"unknown weighting {name!r}; choose one of {', '.join(table)}")
    return table[name]()
