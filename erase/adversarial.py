"""Adversarial erasure (``--adversarial``): erase the prompts an attack finds, not only the
ones the user gave. Our reading of AdvUnlearn (Zhang et al., 2024) and RECE (Gong et al., 2024),
built on loreun's own attack:

* every ``--adversarial-every`` steps, ``loreun attack``'s prefix-token attack
  (``pipelines/prefix_attack.py``, the same class and settings) runs against the model being
  erased: for one forget item (drawn from a seeded stream), K prefix tokens are optimised so
  that the current model denoises that item's cached base-model sample under the prefixed
  prompt; the target is the item's own x_0, where ``loreun attack`` generates it from the row's
  seed;
* the prompt found joins a pool of at most ``--adversarial-pool`` prompts (the oldest leaves
  first), each tied to the item it was found for (its x_0);
* every step also erases ``--adversarial-batch`` pool prompts with the run's own objective:
  the student is prompted with the adversarial prompt and pulled to the target of the item's
  own concept (as AdvUnlearn does: ESD's target of ``c``, not of the prompt found, which the
  frozen model may not read as the concept at all); the retain term is unchanged;
* with ``--weighting loreun`` the pool's prompts are weighed within each pool batch by their
  current denoising error (LoReUn's batch form): an adversarial prompt the model still fits is
  exactly an item "the model still fits". The pool changes every few steps, so a memory filled
  once would be stale (our choice).

Only the text side is attacked; the UNet (or transformer) trains as the preset says. The pool
is in every checkpoint, as token ids, so a resume rebuilds it exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import asdict, dataclass

import torch

from loreun.pipelines.attack_settings import AttackSettings
from loreun.pipelines.family import cat_cond, family_of
from loreun.pipelines.prefix_attack import PrefixAttack

from .items import ItemSet
from .objectives import per_sample_mse
from .streams import ADVERSARIAL_STREAM, item_ids, step_generator
from .xt_sources import draw_batch


@dataclass
class PoolEntry:
    """One adversarial prompt: the forget item it was found for, its token ids [L] per text
    encoder name (what the encoders read), the step it was found at, its text (for people) and
    the attack's last loss."""

    item: int
    token_ids: dict[str, list[int]]
    step: int
    text: str
    loss: float
    embeddings: dict[str, list] | None = None  # --adversarial-attack embedding: [K, D] each

    def prefix(self, name: str) -> torch.Tensor | None:
        """Encoder ``name``'s found prefix embeddings [K, D], or None (a token prompt)."""
        return None if self.embeddings is None else torch.tensor(self.embeddings[name])


class AdversarialPool:
    """The prompts found so far, their embeddings, and the weighting over them.

    Args:
        forget: the run's forget items (their x_0, anchor and empty-prompt embedding).
        capacity: P, the most prompts kept.
        weighting: over pool slots [P]: uniform, or LoReUn's batch form.
    """

    def __init__(self, forget: ItemSet, capacity: int, weighting):
        self.forget, self.capacity, self.weighting = forget, capacity, weighting
        self.entries: list[PoolEntry] = []
        self.cond = None  # [len, L, D], or a Cond of len prompts

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: PoolEntry, emb) -> None:
        """Keep ``entry`` with its conditioning ([1, L, D] or a ``Cond``); the oldest leaves a
        full pool."""
        emb = emb.to("cpu", torch.float32)
        self.entries.append(entry)
        self.cond = emb if self.cond is None else cat_cond([self.cond, emb])
        if len(self.entries) > self.capacity:
            self.entries, self.cond = self.entries[1:], self.cond[1:]

    def student_cond(self, text, slots: torch.Tensor):
        """The conditioning of pool ``slots`` [B] through the training text encoders
        (``text``, a ``StudentText``): their token ids, with each embedding prompt's found
        prefix swapped in (rows of token prompts keep their own tokens)."""
        from loreun.pipelines.prefix_attack import prefix_start, swapped_prefixes

        picked = [self.entries[i] for i in slots.tolist()]
        ids = {n: torch.tensor([e.token_ids[n] for e in picked]) for n in picked[0].token_ids}
        swaps = []
        if picked[0].embeddings is not None:  # one pool holds one kind of prompt
            for enc in text.encoders:
                prefix = torch.stack([e.prefix(enc.name) for e in picked]).to(enc.module.device)
                swaps.append((enc.module, prefix_start(enc.tokenizer), prefix))
        with swapped_prefixes(swaps):
            return text.encode(ids)

    def items(self) -> ItemSet:
        """The pool as forget items: each item's own conditioning, x_0 (and trajectory row), with
        the adversarial prompt as the student's (``ItemSet.prompt``)."""
        f, idx = self.forget, torch.tensor([e.item for e in self.entries])
        return ItemSet(
            cond=f.cond[idx],
            prompt=self.cond,
            uncond=f.uncond,
            anchor=f.anchor,
            x0=None if f.x0 is None else f.x0[idx],
            pool=f.pool,
            pool_of=None if f.pool_of is None else f.pool_of[idx],
            captions=[e.text for e in self.entries],
        )

    def state_dict(self) -> dict:
        return {
            "entries": [asdict(e) for e in self.entries],
            "weighting": self.weighting.state_dict(),
        }

    def load_state_dict(self, state: dict, encode) -> None:
        """Rebuild the pool from saved token ids (and prefix embeddings); ``encode({name: ids
        [1, L]}, entry)`` gives the conditioning. A pool saved by loreun 0.1 holds one
        encoder's ids as a list."""
        self.entries, self.cond = [], None
        for saved in state["entries"]:
            entry = PoolEntry(**saved)
            if isinstance(entry.token_ids, list):
                entry.token_ids = {"text_encoder": entry.token_ids}
            ids = {k: torch.tensor([v]) for k, v in entry.token_ids.items()}
            self.add(entry, encode(ids, entry))
        self.weighting.load_state_dict(state["weighting"])


def build_pool(cfg, forget: ItemSet, schedule, pipe) -> AdversarialPool | None:
    """The run's pool, or None without ``--adversarial``; the attack's prefix must leave every
    text encoder of ``pipe`` room for the prompt."""
    if not cfg.adversarial:
        return None
    from loreun.pipelines.prefix_attack import check_prefix_fits

    encoders = family_of(pipe).prompt_encoders(pipe)
    check_prefix_fits(encoders, cfg.adversarial_tokens, "--adversarial-tokens")
    weighting = cfg.weighting_slot().build_pool(cfg, cfg.adversarial_pool, schedule)
    return AdversarialPool(forget, cfg.adversarial_pool, weighting)


def attack_settings(cfg) -> AttackSettings:
    """``loreun attack``'s settings with the run's tokens and steps (one round, no judging)."""
    return AttackSettings(prefix_tokens=cfg.adversarial_tokens, steps=cfg.adversarial_steps)


def encode_ids(pipe, ids: dict, entry: PoolEntry | None = None):
    """The conditioning of token ids ({encoder name: [1, L]}), with ``entry``'s found prefix
    embeddings swapped in where it has them, as the attack and the forget items' embeddings
    have it."""
    from loreun.pipelines.prefix_attack import prefix_start, swapped_prefixes

    swaps = []
    if entry is not None and entry.embeddings is not None:
        for enc in family_of(pipe).prompt_encoders(pipe):
            prefix = entry.prefix(enc.name).to(enc.module.device)
            swaps.append((enc.module, prefix_start(enc.tokenizer), prefix))
    with torch.no_grad(), swapped_prefixes(swaps):
        return family_of(pipe).encode_ids(pipe, ids)


@contextlib.contextmanager
def attacking(pipe, trained: dict, device):
    """The attack differentiates through the model but must leave no gradient on the trained
    tensors (the next step would add it to its own), and needs the text encoders beside it."""
    encoders = [e.module for e in family_of(pipe).prompt_encoders(pipe)]
    places = [(e.device, [p.requires_grad for p in e.parameters()]) for e in encoders]
    for encoder in encoders:
        encoder.to(device).requires_grad_(False)
    for p in trained.values():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trained.values():
            p.requires_grad_(True)
        for encoder, (place, grads) in zip(encoders, places):
            for p, g in zip(encoder.parameters(), grads):
                p.requires_grad_(g)
            encoder.to(place)


def find_embeddings(pipe, schedule, prompt, target, settings, seed: int, start=None):
    """``loreun attack --attack-kind embedding``'s optimisation, one round, from ``start``
    ({encoder name: [K, D]}, the last entry's; AdvUnlearn warm-starts its attack so): the
    prompt's token ids with placeholders ({name: [1, L]}), the embeddings found ({name:
    [K, D]}), the conditioning they give, and the last loss."""
    from loreun.pipelines.prefix_attack import EmbeddingAttack

    attack = EmbeddingAttack(pipe, schedule, prompt, target, settings, seed)
    if start is not None:
        with torch.no_grad():
            for enc, emb in zip(attack.encoders, attack.embeddings):
                emb.copy_(start[enc.name].to(emb))
    losses = attack.run()
    found = {e.name: emb.detach().cpu() for e, emb in zip(attack.encoders, attack.embeddings)}
    return attack.ids, found, attack.found_cond(), losses[-1]


def find_prompt(pipe, schedule, prompt: str, target: torch.Tensor, settings, seed: int):
    """``loreun attack``'s optimisation, one round: the found token ids ({encoder name:
    [1, L]}), the first encoder's text and the last loss. ``target`` [1, C, h, w] is the
    latent the model should denoise."""
    attack = PrefixAttack(pipe, schedule, prompt, target, settings, seed)
    losses = attack.run()
    ids = attack.found_ids()
    return ids, attack.found_texts()[next(iter(ids))], losses[-1]


def grow_pool(run, cfg, acc, step: int) -> PoolEntry:
    """The attack of ``step`` against the current weights; its prompt joins the pool.

    Every process runs the same attack (the same seed and weights), so their pools agree.
    """
    r = step // cfg.adversarial_every - 1
    g = step_generator(cfg.seed, 0, ADVERSARIAL_STREAM - r)
    item = int(torch.randint(len(run.forget), (1,), generator=g))
    seed = int(torch.randint(2**31 - 1, (1,), generator=g))
    target = run.forget.x0[item, :1].to(acc.device)
    prompt, settings = run.forget.captions[item], attack_settings(cfg)
    if cfg.adversarial_attack == "embedding":
        last = run.adversarial.entries[-1] if len(run.adversarial) else None
        start = None if last is None else {n: last.prefix(n) for n in last.embeddings}
        with attacking(run.pipe, run.trained, acc.device), acc.autocast():
            ids, found, cond, loss = find_embeddings(
                run.pipe, run.schedule, prompt, target, settings, seed, start
            )
        embeddings = {n: v.tolist() for n, v in found.items()}
        text = f"<{cfg.adversarial_tokens} embeddings> {prompt}"
    else:
        with attacking(run.pipe, run.trained, acc.device), acc.autocast():
            ids, text, loss = find_prompt(run.pipe, run.schedule, prompt, target, settings, seed)
        embeddings, cond = None, encode_ids(run.pipe, ids)
    token_ids = {name: v[0].tolist() for name, v in ids.items()}
    entry = PoolEntry(item, token_ids, step, text, loss, embeddings)
    run.adversarial.add(entry, cond)
    return entry


def pool_term(run, cfg, acc, k: int, g: torch.Generator, student) -> torch.Tensor | None:
    """The pool's forget term of micro-batch ``k``: ``sum(w * l) / B_pool`` over
    ``--adversarial-batch`` pool prompts, by the run's objective; None while the pool is empty.

    ``w`` is 1, or LoReUn's batch form over the prompts' denoising errors [B_pool].
    """
    pool = run.adversarial
    if pool is None or not len(pool):
        return None
    items = pool.items()
    ids = item_ids(len(items), cfg.adversarial_batch, cfg.seed, acc.process_index, k, stream=2)
    batch = draw_batch(dataclasses.replace(run, forget=items), cfg, acc, ids, g)
    if run.text is not None:  # the found prompts, through the training text encoders
        batch = dataclasses.replace(batch, prompt=pool.student_cond(run.text, ids))
    with acc.autocast():
        losses, pred = run.objective(student, run.teacher, batch)
    if pool.weighting.observes:  # LoReUn: needs the known target (checked in the config)
        pool.weighting.observe(ids, batch.t, per_sample_mse(pred.detach(), batch.target))
    w = pool.weighting.weights(ids).to(losses.device)
    return (w * losses).sum() / len(losses)
