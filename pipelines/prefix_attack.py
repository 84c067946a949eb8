"""A text-gradient attack on an erased model: our reading of UnlearnDiffAtk (Zhang et al. 2023).

The attack asks whether the erased concept is still *in* the denoiser, reachable through the
text side. It prepends K adversarial tokens to a prompt and picks them so that the erased
denoiser denoises the original model's image for that prompt well: if some prompt makes the
erased model predict the concept's image, the concept was hidden, not removed.

It runs on every family through the family and schedule seams: the prefix reaches every encoder
that reads the prompt (one prefix per vocabulary: SDXL's and SD3's CLIPs share one, T5 has its
own), the conditioning is the family's own (``Family.encode_ids``), and the loss is the
denoiser's error in its own target (noise, v, or a flow's velocity) at a time drawn from the
family's schedule. FLUX.1-dev's transformer sees guidance 1 in the loss, as while erasing.

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

import contextlib

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
    """The tokens one prefix may use: a vocabulary without its special tokens, and the encoders
    that read that prefix.

    Encoders whose tokenizers share a vocabulary (SDXL's and SD3's two CLIPs) read one prefix,
    as they read one prompt; T5 (SD3, FLUX) has its own vocabulary and so its own prefix, which
    a user passes as the pipeline's ``prompt_3`` (SD3) or ``prompt_2`` (FLUX).

    Attributes:
        encoders: the ``PromptEncoder``s reading this prefix.
        ids: [V'] token ids.
        tables: per encoder, the ids' input embeddings [V', D_e], detached.
    """

    def __init__(self, encoders: list):
        special = set().union(*(e.tokenizer.all_special_ids for e in encoders))
        size = min(min(len(e.tokenizer), _embedding(e).shape[0]) for e in encoders)
        self.encoders = encoders
        self.ids = torch.tensor([i for i in range(size) if i not in special])
        self.tables = [_embedding(e).detach()[self.ids.to(_embedding(e).device)] for e in encoders]


def _embedding(encoder) -> torch.Tensor:
    return encoder.module.get_input_embeddings().weight


def token_spaces(encoders: list) -> list[TokenSpace]:
    """The prompt encoders grouped by vocabulary, in the family's encoder order."""
    groups: list[list] = []
    for enc in encoders:
        group = next((g for g in groups if _same_vocabulary(g[0].tokenizer, enc.tokenizer)), None)
        if group is None:
            groups.append([enc])
        else:
            group.append(enc)
    return [TokenSpace(g) for g in groups]


def _same_vocabulary(a, b) -> bool:
    return a is b or (type(a) is type(b) and a.get_vocab() == b.get_vocab())


def prefix_start(tokenizer) -> int:
    """Where a prefix goes: after the start token of tokenizers that add one (CLIP), first
    where there is none (T5)."""
    first = tokenizer("").input_ids
    bos = tokenizer.bos_token_id
    return int(bos is not None and len(first) > 0 and first[0] == bos)


def check_prefix_fits(encoders: list, k: int, flag: str) -> None:
    """K prefix tokens must leave room for a start token, one prompt token and the end token in
    every encoder's token length (77 for CLIP), or the prompt is cut to nothing."""
    for enc in encoders:
        room = enc.length - 3
        if k > room:
            raise ValueError(
                f"{flag}: {k} prefix tokens do not fit {enc.name}'s {enc.length} tokens with a "
                f"prompt; use at most {room}"
            )


def prefixed_ids(
    tokenizer, prompt: str, k: int, length: int | None = None, placeholder: int | None = None
) -> torch.Tensor:
    """[1, L] token ids: the start token (where the tokenizer adds one), K placeholders, then
    the prompt cut to fit L - K (its end token and padding kept), so the prefix never pushes
    the end token out. L is ``length`` (default: the tokenizer's own).

    The placeholders' embeddings are swapped out, but a pooled output is read at the end
    token's position, found from the ids: ``placeholder`` should be a plain token, not the
    end token (the default, the padding token, suits encoders whose output is not pooled).
    """
    length = length or tokenizer.model_max_length
    ids = tokenizer(
        prompt, padding="max_length", truncation=True, max_length=length - k, return_tensors="pt"
    ).input_ids
    fill = ids[0, -1].item() if placeholder is None else placeholder
    start = prefix_start(tokenizer)
    placeholders = torch.full((1, k), fill, dtype=ids.dtype)
    return torch.cat([ids[:, :start], placeholders, ids[:, start:]], dim=1)


@contextlib.contextmanager
def swapped_prefixes(swaps: list[tuple]):
    """While open, each ``(encoder, start, prefix [K, D] or [B, K, D])`` has its input
    embeddings at positions start..start+K replaced by ``prefix`` (one per row when batched).

    A forward hook on the embedding layer swaps them in, so the encoder's own forward (causal
    mask, positions, final norm) runs unchanged in any transformers version.
    """
    handles = []
    for encoder, start, prefix in swaps:

        def swap(module, args, output, start=start, prefix=prefix):
            output = output.clone()
            output[:, start : start + prefix.shape[-2]] = prefix.to(output.dtype)
            return output

        handles += [layer.register_forward_hook(swap) for layer in token_embeddings(encoder)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def token_embeddings(encoder) -> list:
    """The embedding layers that hold the encoder's input embeddings. T5's encoder stack
    reads its own layer, tied to the model's ``get_input_embeddings()`` (transformers 5), so
    every layer with that weight is hooked; the one the forward calls swaps."""
    weight = encoder.get_input_embeddings().weight
    return [
        m for m in encoder.modules() if isinstance(m, torch.nn.Embedding) and m.weight is weight
    ]


def encode_with_prefix(text_encoder, ids: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """A CLIP encoder's last hidden state [1, L, D] for ``ids`` [1, L] with the input
    embeddings at positions 1..K replaced by ``prefix`` [K, D]."""
    with swapped_prefixes([(text_encoder, 1, prefix)]):
        return text_encoder(ids.to(text_encoder.device))[0]


class _Attack:
    """What the two attacks share: the row's prompt as token ids per encoder (placeholders
    where the prefix goes), the target, the random stream, and the loss given the prefix
    embeddings each encoder reads.

    Args:
        pipe: a pipeline of any family holding the erased denoiser; its weights are not trained.
        schedule: the model's schedule (noising and the family's target: noise, v or velocity).
        prompt: the row's prompt.
        target: [1, C, h, w] the original model's final latent for the row.
        seed: seeds every draw (timesteps, noise, tokens).
    """

    def __init__(self, pipe, schedule, prompt: str, target, settings: AttackSettings, seed: int):
        self.pipe, self.schedule, self.settings = pipe, schedule, settings
        self.family = family_of(pipe)
        self.spaces = token_spaces(self.family.prompt_encoders(pipe))
        k = settings.prefix_tokens
        self.ids = {
            e.name: prefixed_ids(e.tokenizer, prompt, k, e.length, int(space.ids[0]))
            for space in self.spaces
            for e in space.encoders
        }
        scale = self.family.vae_scale(pipe)
        self.size = (target.shape[-2] * scale, target.shape[-1] * scale)  # SDXL's time ids
        self.target = target.detach()
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def swaps(self) -> list[tuple]:
        """(encoder module, prefix start, prefix [K, D]) for every encoder, for this step."""
        raise NotImplementedError

    def loss(self) -> torch.Tensor:
        """The erased denoiser's error on the target at a drawn timestep, conditioned on the
        prompt with this step's prefix, in the family's own target; a scalar."""
        t = self.schedule.draw_times(1, self.generator)
        noise = torch.randn(self.target.shape, generator=self.generator).to(self.target)
        with swapped_prefixes(self.swaps()):
            cond = self.family.encode_ids(self.pipe, self.ids, self.size)
        model = self.family.denoiser(self.pipe)
        x_t = self.schedule.add_noise(self.target, t, noise)
        pred = self.family.predict(model, x_t, t.to(x_t.device), cond.to(model.dtype))
        return F.mse_loss(pred.float(), self.schedule.target(self.target, t, noise))

    def run(self, on_step=None) -> list[float]:
        """``settings.steps`` optimizer steps; returns their losses, calling ``on_step(loss)``
        after each."""
        losses = []
        for _ in range(self.settings.steps):
            loss = self.loss()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.after_step()
            losses.append(loss.item())
            if on_step:
                on_step(losses[-1])
        return losses

    def after_step(self) -> None:
        pass


class PrefixAttack(_Attack):
    """UnlearnDiffAtk's discrete attack: a prefix distribution per vocabulary, moved by Adam and
    projected back on the simplex; the prompt found is each position's most likely token."""

    def __init__(self, pipe, schedule, prompt: str, target, settings: AttackSettings, seed: int):
        super().__init__(pipe, schedule, prompt, target, settings, seed)
        k = settings.prefix_tokens
        self.probs = [
            torch.full((k, len(s.ids)), 1.0 / len(s.ids), device=target.device).requires_grad_()
            for s in self.spaces
        ]
        self.optimizer = torch.optim.Adam(
            self.probs, lr=settings.lr, weight_decay=settings.weight_decay
        )

    def swaps(self) -> list[tuple]:
        """One token per position drawn from each vocabulary's distribution, as embeddings."""
        swaps = []
        for space, probs in zip(self.spaces, self.probs):
            one_hot = SampledOneHot.apply(probs, self.generator)
            for enc, table in zip(space.encoders, space.tables):
                start = prefix_start(enc.tokenizer)
                swaps.append((enc.module, start, one_hot @ table.to(probs.device, probs.dtype)))
        return swaps

    def after_step(self) -> None:
        with torch.no_grad():
            for probs in self.probs:
                probs.copy_(project_simplex(probs))

    def found_cond(self):
        """The found prompt's conditioning, as generating from its token ids gives it."""
        with torch.no_grad():
            return self.family.encode_ids(self.pipe, self.found_ids(), self.size)

    def found_ids(self) -> dict[str, torch.Tensor]:
        """Per encoder name, the adversarial prompt as token ids [1, L]: each position's most
        likely token of its vocabulary's prefix, then the prompt."""
        found = {}
        for space, probs in zip(self.spaces, self.probs):
            tokens = space.ids[probs.detach().argmax(dim=-1).cpu()]
            for enc in space.encoders:
                ids, start = self.ids[enc.name].clone(), prefix_start(enc.tokenizer)
                ids[0, start : start + len(tokens)] = tokens
                found[enc.name] = ids
        return found

    def found_texts(self) -> dict[str, str]:
        """Per encoder name, the adversarial prompt as text, for people (``found_ids`` is what
        was generated): what to pass as the pipeline's prompt for that encoder."""
        texts = {}
        for space in self.spaces:
            for enc in space.encoders:
                special = set(enc.tokenizer.all_special_ids)
                kept = [i for i in self.found_ids()[enc.name][0].tolist() if i not in special]
                texts[enc.name] = enc.tokenizer.decode(kept)
        return texts


class EmbeddingAttack(_Attack):
    """The worst case: K free prefix embeddings per encoder, optimised by Adam
    (``--attack-embedding-lr``), with no token they must be. No prompt a user can type reaches
    them, so its ASR bounds what any text prefix does from above (a concept-inversion attack in
    the spirit of textual inversion, our choice of parametrisation).

    Each encoder's prefix starts at the mean input embedding of its vocabulary, so every row and
    every rerun starts from the same point; all randomness is the row's seeded stream.
    """

    def __init__(self, pipe, schedule, prompt: str, target, settings: AttackSettings, seed: int):
        super().__init__(pipe, schedule, prompt, target, settings, seed)
        self.encoders, self.embeddings = [], []
        for space in self.spaces:
            for enc, table in zip(space.encoders, space.tables):
                mean = table.float().mean(dim=0, keepdim=True).to(target.device)
                self.encoders.append(enc)
                self.embeddings.append(mean.repeat(settings.prefix_tokens, 1).requires_grad_())
        self.optimizer = torch.optim.Adam(self.embeddings, lr=settings.embedding_lr)

    def swaps(self) -> list[tuple]:
        return [
            (enc.module, prefix_start(enc.tokenizer), emb)
            for enc, emb in zip(self.encoders, self.embeddings)
        ]

    def found_cond(self):
        """The conditioning of the prompt with the found embeddings in its prefix."""
        with torch.no_grad(), swapped_prefixes(self.swaps()):
            return self.family.encode_ids(self.pipe, self.ids, self.size)


ATTACKS = {"prefix": PrefixAttack, "embedding": EmbeddingAttack}
