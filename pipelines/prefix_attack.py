"""A text-gradient attack on an erased model: our reading of UnlearnDiffAtk (Zhang et al. 2023).

The attack asks whether the erased concept is still *in* the UNet, reachable through the text
side. It prepends K adversarial tokens to a prompt and picks them so that the erased UNet
denoises the original model's image for that prompt well: if some prompt makes the erased model
predict the concept's image, the concept was hidden, not removed.

The tokens are discrete, so each is relaxed to a distribution over the vocabulary (a row of
``probs`` [K, V] on the probability simplex). Each step draws a one-hot token from every row,
runs the text encoder and the UNet on the drawn prompt, and passes the gradient straight
through the draw (clipped to [-1, 1]) back to the distribution; Adam with weight decay moves it
and a Euclidean projection puts it back on the simplex. The tokens found are each row's argmax.

Where this differs from UnlearnDiffAtk's published code (docs/results.md lists them too):
- special tokens (start, end, padding) are never drawn, so the found prompt is plain text;
- each step draws its own timestep uniformly from the training schedule, where the published
  code spends every round of steps at one timestep of an evenly spaced grid;
- the projection is the exact sort-based one (Duchi et al. 2008), not a bisection to 1e-5;
- the target's latent is the original model's final latent, not a VAE re-encoding of its PNG;
- all randomness comes from a generator seeded by the row's seed, so a rerun finds the same
  tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attack_settings import AttackSettings
from .family import family_of


def project_simplex(p: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``p`` [K, V] onto {x >= 0, sum(x) = 1}.

    Sort each row, find the largest rho with u_rho > (sum_{i<=rho} u_i - 1) / rho, and shift
    by that threshold: O(V log V), exact, with no tolerance to choose.
    """
    u = p.sort(dim=-1, descending=True).values
    css = u.cumsum(dim=-1) - 1
    ranks = torch.arange(1, p.shape[-1] + 1, device=p.device, dtype=p.dtype)
    rho = ((u - css / ranks) > 0).sum(dim=-1, keepdim=True)  # the condition holds on a prefix
    theta = css.gather(-1, rho - 1) / rho.to(p.dtype)
    return (p - theta).clamp_min(0)


class SampledOneHot(torch.autograd.Function):
    """Forward: one token drawn from each row of ``probs`` [K, V], as one-hot rows [K, V].
    Backward: the gradient passes straight through to ``probs``, clipped to [-1, 1] (the
    straight-through estimator of UnlearnDiffAtk's code)."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        drawn = torch.multinomial(probs.detach().cpu().float(), 1, generator=generator)
        return F.one_hot(drawn.squeeze(-1), probs.shape[-1]).to(probs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return F.hardtanh(grad), None


class TokenSpace:
    """The tokens a prefix may use: the text encoder's vocabulary without the special tokens.

    Attributes:
        ids: [V'] token ids.
        table: [V', D] their input embeddings, detached.
    """

    def __init__(self, tokenizer, text_encoder):
        weight = text_encoder.get_input_embeddings().weight
        special = set(tokenizer.all_special_ids)
        size = min(len(tokenizer), weight.shape[0])
        self.ids = torch.tensor([i for i in range(size) if i not in special])
        self.table = weight.detach()[self.ids.to(weight.device)]


def check_prefix_fits(tokenizer, k: int, flag: str) -> None:
    """K prefix tokens must leave the start token, one prompt token and the end token room in
    the text encoder's context (77 for CLIP), or the prompt is cut to nothing."""
    room = tokenizer.model_max_length - 3
    if k > room:
        raise ValueError(
            f"{flag}: {k} prefix tokens do not fit the text encoder's "
            f"{tokenizer.model_max_length} tokens with a prompt; use at most {room}"
        )


def prefixed_ids(tokenizer, prompt: str, k: int) -> torch.Tensor:
    """[1, L] token ids: start token, K placeholders, then the prompt cut to fit L - K - 1
    (its end token and padding kept), so the prefix never pushes the end token out."""
    length = tokenizer.model_max_length
    ids = tokenizer(
        prompt, padding="max_length", truncation=True, max_length=length - k, return_tensors="pt"
    ).input_ids
    placeholder = torch.full((1, k), ids[0, -1].item(), dtype=ids.dtype)
    return torch.cat([ids[:, :1], placeholder, ids[:, 1:]], dim=1)


def encode_with_prefix(text_encoder, ids: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden state [1, L, D] for ``ids`` [1, L] with the input
    embeddings at positions 1..K replaced by ``prefix`` [K, D].

    A forward hook on the embedding layer swaps them in, so the encoder's own forward (causal
    mask, positions, final norm) runs unchanged in any transformers version.
    """
    k = prefix.shape[0]

    def swap(module, args, output):
        output = output.clone()
        output[:, 1 : 1 + k] = prefix.to(output.dtype)
        return output

    handle = text_encoder.get_input_embeddings().register_forward_hook(swap)
    try:
        return text_encoder(ids.to(text_encoder.device))[0]
    finally:
        handle.remove()


class PrefixAttack:
    """One row's attack: the prefix distribution, its optimizer and its random stream.

    Args:
        pipe: an SD 1.x/2.x pipeline holding the erased UNet; its weights are not trained.
        schedule: the model's ``DDPMSchedule`` (noising and the epsilon/v target).
        prompt: the row's prompt.
        target: [1, C, h, w] the original model's final latent for the row.
        seed: seeds every draw (timesteps, noise, tokens).
    """

    def __init__(self, pipe, schedule, prompt: str, target, settings: AttackSettings, seed: int):
        self.pipe, self.schedule, self.settings = pipe, schedule, settings
        self.space = TokenSpace(pipe.tokenizer, pipe.text_encoder)
        self.ids = prefixed_ids(pipe.tokenizer, prompt, settings.prefix_tokens)
        self.target = target.detach()
        self.generator = torch.Generator("cpu").manual_seed(seed)
        n = len(self.space.ids)
        start = torch.full((settings.prefix_tokens, n), 1.0 / n, device=target.device)
        self.probs = start.requires_grad_(True)
        self.optimizer = torch.optim.Adam(
            [self.probs], lr=settings.lr, weight_decay=settings.weight_decay
        )

    def loss(self) -> torch.Tensor:
        """The erased UNet's denoising error on the target at a drawn timestep, conditioned on
        a prompt drawn from the prefix distribution; a scalar."""
        t = self.schedule.draw_times(1, self.generator)
        noise = torch.randn(self.target.shape, generator=self.generator).to(self.target)
        one_hot = SampledOneHot.apply(self.probs, self.generator)
        cond = encode_with_prefix(self.pipe.text_encoder, self.ids, one_hot @ self.table())
        family = family_of(self.pipe)
        model = family.denoiser(self.pipe)
        x_t = self.schedule.add_noise(self.target, t, noise)
        pred = family.predict(model, x_t, t.to(x_t.device), cond.to(model.dtype))
        return F.mse_loss(pred.float(), self.schedule.target(self.target, t, noise))

    def table(self) -> torch.Tensor:
        return self.space.table.to(self.probs.device, self.probs.dtype)

    def run(self, on_step=None) -> list[float]:
        """``settings.steps`` optimizer steps; returns their losses, calling ``on_step(loss)``
        after each."""
        losses = []
        for _ in range(self.settings.steps):
            loss = self.loss()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            with torch.no_grad():
                self.probs.copy_(project_simplex(self.probs))
            losses.append(loss.item())
            if on_step:
                on_step(losses[-1])
        return losses

    def tokens(self) -> torch.Tensor:
        """[K] the most likely token of each prefix position."""
        return self.space.ids[self.probs.detach().argmax(dim=-1).cpu()]

    def found_ids(self) -> torch.Tensor:
        """[1, L] the adversarial prompt as token ids: the prefix, then the prompt."""
        ids = self.ids.clone()
        ids[0, 1 : 1 + self.settings.prefix_tokens] = self.tokens()
        return ids

    def found_text(self) -> str:
        """The adversarial prompt as text, for people; ``found_ids`` is what was generated."""
        special = set(self.pipe.tokenizer.all_special_ids)
        kept = [i for i in self.found_ids()[0].tolist() if i not in special]
        return self.pipe.tokenizer.decode(kept)
