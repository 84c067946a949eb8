"""Per-sample weightings of the forget term: uniform, and LoReUn (arXiv 2507.22499).

LoReUn's premise: forget items that the model still fits well (low denoising loss under their
own prompt) are harder to forget, so they get more weight. Our reading of it, from the paper's
abstract and Figure 1 (its method section was not available):

* difficulty ``L_i`` is the denoising error of item i, computed without gradient;
* weights are ``n * softmax(-L / tau)``, mean 1, so the learning rate keeps its meaning;
* variants (our choices where the paper is silent):
  - ``static``: a memory filled once, under the original weights, before training;
  - ``dynamic``: that memory, also updated with each step's difficulty under the current
    weights, as an exponential moving average per item. It works at batch size 1, which ESD
    uses and where a batch softmax is a no-op;
  - ``batch``: the softmax over the current batch's own difficulties, with no memory; the form
    most loss-reweighting methods use;
  - ``paper``: our reading of the paper's own form: the batch's raw denoising losses under the
    current model, no timestep normalisation, a fixed tau, weights of mean 1 per batch;
* denoising error depends strongly on the timestep, so each observation is divided by a running
  mean of the loss at its timestep (our choice);
* tau can be set by a target effective sample size on the filled memory, so that it means the
  same thing whatever the spread of the difficulties (our choice).

Weightings return weights only, with no gradient; the trainer combines them with the losses.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

# The variants and defaults of ``LoReUnWeighting``, defined once for it and its settings.
from .loreun_rules import MOMENTUM, TEMPERATURE, VARIANT, VARIANTS, check_items


class Weighting(Protocol):
    """What the trainer needs of a weighting (the slot's contract; docs/architecture.md).

    ``weights`` returns per-sample weights [B] without gradient whose mean over what they span
    is 1; ``observe`` receives the batch's difficulties [B] at timesteps [B]; ``all_weights``
    the weights in force, for the effective sample size (None: all ones).
    """

    name: str
    needs_difficulty: bool  # a fill of every item's difficulty before training, through ``fill``
    observes: bool  # each step's difficulties, through ``observe``
    gathers: bool  # those of every process, not only its own
    probe_times: int  # K, the times of the difficulty probe's grid (``fill``, ``refill``)
    min_reliability: float  # the run says so when the fill's reliability is below it
    reprobe_every: int  # re-probe every item on the grid every this many steps; 0: never
    reliability: float | None  # split-half reliability of the last fill (None: no fill)

    def fill(self, losses: torch.Tensor, t: torch.Tensor) -> None:
        """[N, K] difficulties of every item at the [K] probe times, before training."""

    def refill(self, losses: torch.Tensor, t: torch.Tensor) -> None:
        """The same, under the current weights, every ``reprobe_every`` steps."""

    def weights(self, ids: torch.Tensor) -> torch.Tensor: ...

    def observe(self, ids: torch.Tensor, t: torch.Tensor, loss: torch.Tensor) -> None: ...

    def all_weights(self) -> torch.Tensor | None: ...

    def drift(self) -> float | None: ...

    def summary(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


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


def temperature_for_ess(scores: torch.Tensor, target: float, iters: int = 100) -> float:
    """The tau at which ``softmax_weights(scores, tau)`` has ESS = ``target * n``.

    ESS grows monotonically with tau, from (number of minima) at tau -> 0 to n at tau -> inf,
    so a bisection on log tau finds it. A fixed tau means nothing on its own: the same tau is
    uniform on items whose difficulties barely differ and one-hot on widely spread ones.

    Args:
        scores: [n] difficulties, n >= 2.
        target: ESS / n in (0, 1]; 1 returns ``inf`` (uniform).

    Returns:
        tau > 0, or ``inf`` when the target is 1 or the scores are all equal (to 1e-30).

    Raises:
        ValueError: the target is below what any usable tau reaches (ties with the minimum).
    """
    scores = scores.detach().float().double()  # the precision softmax_weights works in
    n = scores.numel()
    spread = float(scores.max() - scores.min())
    if target >= 1 or spread < 1e-30:  # no difference a float32 softmax could weigh
        return math.inf
    floor = float((scores == scores.min()).sum()) / n
    if target <= floor:
        raise ValueError(f"target ESS {target} is below {floor:.3g}, reached only as tau -> 0")
    lo, hi = math.log(spread * 1e-6), math.log(spread * 1e6)
    for _ in range(iters):
        mid = (lo + hi) / 2
        ess = effective_sample_size(softmax_weights(scores, math.exp(mid))) / n
        lo, hi = (mid, hi) if ess < target else (lo, mid)
    tau = math.exp((lo + hi) / 2)
    reached = effective_sample_size(softmax_weights(scores, tau)) / n
    if reached > target + 1e-3:  # near-ties with the minimum act as minima at any usable tau
        raise ValueError(f"target ESS {target} is below {reached:.3g}, reached only as tau -> 0")
    return tau


def split_half_reliability(losses: torch.Tensor) -> float:
    """How far items' mean difficulty is a property of the items rather than of the draws:
    Spearman's rho between the means over the even and the odd probe columns.

    Args:
        losses: [N, K] difficulty of N items at K shared (time, noise) probes, K >= 2.

    Returns:
        rho in [-1, 1] (uncorrected for the halved length); nan for fewer than 2 items.
    """
    if losses.shape[0] < 2 or losses.shape[1] < 2:
        return float("nan")
    return rank_correlation(losses[:, 0::2].mean(1), losses[:, 1::2].mean(1))


def spearman_brown(half: float) -> float:
    """The reliability of the whole K-probe mean from the split-half correlation of two K/2
    halves: 2 r / (1 + r). The split-half figure is that of a mean half as long, so it
    understates the mean the weighting uses (0.85 -> 0.92)."""
    return 2 * half / (1 + half) if half > -1 else float("nan")


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho of two [n] vectors, tied values sharing their average rank (breaking
    ties by position made two constant vectors correlate perfectly); nan where either vector is
    constant, since no order is there to agree on (n >= 2)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom else float("nan")


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """[n] ranks 0..n-1 of ``x``, each group of equal values at the mean of its ranks."""
    x = x.detach().double().cpu()
    ranks = torch.empty_like(x)
    ranks[x.argsort(stable=True)] = torch.arange(len(x), dtype=torch.float64)
    _, group = torch.unique(x, return_inverse=True)
    sums = torch.zeros(int(group.max()) + 1, dtype=torch.float64).index_add_(0, group, ranks)
    return (sums / torch.bincount(group).double())[group]


def thousand_steps(t: torch.Tensor, buckets: int) -> torch.Tensor:
    """Buckets of integer times 0..999, for a weighting built without a schedule (the
    classification testbed, tests); an erase run passes its schedule's own ``bucket``."""
    return (t.long().cpu() * buckets // 1000).clamp(0, buckets - 1)


class TimestepNormalizer:
    """Running mean of the denoising loss per time bucket.

    Dividing an item's loss by the mean loss at its time makes items observed at different
    times comparable, which a memory filled one item at a time needs.

    Args:
        bucket: fn(t [B], buckets) -> [B] bucket indices; the schedule's ``bucket``.
    """

    def __init__(self, bucket=thousand_steps, buckets: int = 10, momentum: float = 0.9):
        self._bucket = bucket
        self.momentum = momentum
        self.means = torch.full((buckets,), float("nan"))

    def bucket(self, t: torch.Tensor) -> torch.Tensor:
        return self._bucket(t, len(self.means))

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
    observes = False
    gathers = False
    probe_times = 0
    min_reliability = -1.0
    reprobe_every = 0
    reliability = None

    def fill(self, losses, t) -> None:
        pass  # nothing to probe: needs_difficulty is False

    def refill(self, losses, t) -> None:
        pass

    def weights(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(ids))

    def all_weights(self) -> torch.Tensor | None:
        return None

    def observe(self, ids, t, loss) -> None:
        pass

    def drift(self) -> None:
        return None

    def summary(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LoReUnWeighting:
    """LoReUn weights: more weight on forget items that the model still fits well.

    Args:
        num_items: N, the size of the forget set.
        temperature: tau of ``softmax_weights``; ignored when ``target_ess`` is given.
        variant: "static", "dynamic", "batch" or "paper" (see the module docstring).
        momentum: EMA momentum of the dynamic memory: the share an item's old value keeps at
            each visit. After P visits the fill keeps ``momentum ** P`` of the memory.
        normalize: divide each observation by the running mean loss at its timestep.
        bucket: the schedule's ``bucket`` (time -> slice of the time range) for ``normalize``.
        target_ess: if given, tau is chosen at ``fill`` so that the filled memory's weights
            have ESS = target_ess * N.
        min_reliability: below this split-half reliability of the fill, the memory variants
            weigh uniformly.
        min_ess: the memory variants' weights keep an ESS of at least this fraction of N
            (tau rises where the memory has spread).
        probe_times: K, the times of the probe grid the fill (and every re-probe) uses.
        reprobe_every: dynamic only: the trainer re-probes every item on the probe grid every
            this many steps (``refill``) instead of folding in each step's single draws, which
            are noise (docs/results.md); 0 keeps the single draws.
    """

    name = "loreun"
    needs_difficulty = True

    def __init__(
        self,
        num_items: int,
        temperature: float = TEMPERATURE,
        variant: str = VARIANT,
        momentum: float = MOMENTUM,
        normalize: bool = True,
        bucket=thousand_steps,
        target_ess: float | None = None,
        min_reliability: float = -1.0,
        min_ess: float = 0.0,
        reprobe_every: int = 0,
        probe_times: int = 10,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"unknown LoReUn variant {variant!r}; choose one of {VARIANTS}")
        if variant == "paper" and target_ess is not None:
            raise ValueError("the paper variant keeps tau fixed; it takes no target ESS")
        check_items(num_items, f"{num_items} forget items")
        self.temperature = temperature
        self.target_ess = target_ess
        self.variant = variant
        self.per_batch = variant in ("batch", "paper")  # weights from each batch alone
        self.min_ess = min_ess
        if reprobe_every and variant != "dynamic":
            raise ValueError(f"re-probing updates the dynamic variant's memory, not {variant}'s")
        self.reprobe_every, self.probe_times = reprobe_every, probe_times
        # each step's difficulties, unless re-probes replace them
        self.observes = variant != "static" and not reprobe_every
        self.gathers = self.observes and variant == "dynamic"  # every process's items
        self.momentum = momentum
        raw = variant == "paper"  # the current model's plain losses
        self.normalizer = TimestepNormalizer(bucket) if normalize and not raw else None
        self.memory = torch.full((num_items,), float("nan"))
        self.filled: torch.Tensor | None = None
        self.min_reliability = min_reliability
        self.reliability: float | None = None  # split-half, of the fill
        self.fell_back = False  # the fill was noise: uniform weights
        self._batch = None  # (ids [B], weights [B]) of the last observed batch ("batch")
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
        self.filled = self.memory.clone()
        self.reliability = split_half_reliability(losses)
        if not self.per_batch and self.reliability < self.min_reliability:  # nan: untold
            self.fell_back = True  # a memory of noise draws reweights noise, not items
            self.temperature = math.inf
            self._weights = None
            return
        if self.target_ess is not None:
            try:
                self.temperature = temperature_for_ess(self.memory, self.target_ess)
            except ValueError as e:  # more items tie for easiest than the target allows
                raise ValueError(f"--target-ess: {e}; choose a larger fraction") from None
        self._weights = None

    def refill(self, losses: torch.Tensor, t: torch.Tensor) -> None:
        """Replace the memory with a new probe [N, K] at the fill's times [K], under the
        current weights; tau is solved again where a target ESS sets it.

        The same grid (times and noises) as the fill, so the memory moves only where the
        items' fit has moved. Below ``min_reliability`` the run keeps its uniform fallback.
        """
        if self.fell_back:
            return
        losses = losses.detach().float().cpu()
        if self.normalizer is not None:
            losses = losses / losses.mean(0, keepdim=True).clamp_min(1e-12)
        self.memory = losses.mean(1)
        self.reliability = split_half_reliability(losses)
        if self.target_ess is not None:
            try:
                self.temperature = temperature_for_ess(self.memory, self.target_ess)
            except ValueError:  # ties with the easiest item: keep the last tau
                pass
        self._weights = None

    def observe(self, ids: torch.Tensor, t: torch.Tensor, loss: torch.Tensor) -> None:
        """Fold [B] difficulties of items ``ids`` at timesteps ``t`` into the weighting."""
        if self.variant == "static":
            return
        loss = loss.detach().float().cpu()
        if self.normalizer is not None:
            self.normalizer.update(t, loss)
            loss = self.normalizer.normalize(t, loss)
        if self.per_batch:
            self._batch = (ids.cpu(), softmax_weights(loss, self._batch_temperature(loss)))
            return
        memory, m = self.memory.tolist(), self.momentum
        for i, v in zip(ids.tolist(), loss.tolist()):
            memory[i] = v if math.isnan(memory[i]) else m * memory[i] + (1 - m) * v
        self.memory = torch.tensor(memory)
        self._weights = None

    def _batch_temperature(self, loss: torch.Tensor) -> float:
        """tau for one batch: with a target ESS, solved on the batch itself.

        The losses of items being forgotten grow during training, so a tau fixed on the fill
        would turn one-hot as their spread grows; solving per batch keeps the ESS at its target.
        """
        if self.target_ess is None or len(loss) < 2:
            return self.temperature
        floor = float((loss == loss.min()).sum()) / len(loss)
        return temperature_for_ess(loss, max(self.target_ess, floor + 1e-6), iters=40)

    def all_weights(self) -> torch.Tensor:
        """The weights in force: [N] over the forget set, or [B] over the last batch."""
        if self.per_batch:
            return self._batch[1] if self._batch is not None else torch.ones(len(self.memory))
        if self._weights is None:  # recomputed only when the memory changes
            self._weights = self._compute_weights()
        return self._weights

    def _compute_weights(self) -> torch.Tensor:
        mem = self.memory
        seen = ~torch.isnan(mem)
        fill = mem[seen].mean() if seen.any() else torch.tensor(0.0)
        scores = torch.where(seen, mem, fill)
        weights = softmax_weights(scores, self.temperature)
        if effective_sample_size(weights) >= self.min_ess * len(weights):
            return weights
        try:  # the floor: the tau at which the ESS is min_ess, never a lower one
            return softmax_weights(scores, temperature_for_ess(scores, self.min_ess, iters=60))
        except ValueError:  # ties with the easiest item already exceed the floor's reach
            return weights

    def weights(self, ids: torch.Tensor) -> torch.Tensor:
        """[B] weights of the sampled items.

        memory variants: ``N * softmax(-memory / tau)[ids]``; batch: ``B * softmax(-L / tau)``
        over the batch just observed, which must be ``ids``.
        """
        if not self.per_batch:
            return self.all_weights()[ids.cpu()]
        if self._batch is None or not torch.equal(self._batch[0], ids.cpu()):
            raise RuntimeError("batch LoReUn: observe() the batch before asking for its weights")
        return self._batch[1]

    def drift(self) -> float | None:
        """Rank correlation of the memory with its fill: 1 while it has not moved."""
        if self.variant != "dynamic" or self.filled is None:
            return None
        rho = rank_correlation(self.filled, self.memory)
        return rho if math.isfinite(rho) else None  # a constant memory has no order to keep

    def summary(self) -> dict:
        """What the run chose, for the erased file's header: tau and the items weighed."""
        tau = self.temperature if math.isfinite(self.temperature) else "inf"  # strict JSON
        out = {"variant": self.variant, "temperature": tau, "num_items": len(self.memory)}
        if self.reliability is not None and math.isfinite(self.reliability):
            out["difficulty_reliability"] = round(self.reliability, 4)
            out["fell_back_to_uniform"] = self.fell_back
        return out

    def state_dict(self) -> dict:
        state = {"memory": self.memory.tolist(), "temperature": self.temperature}
        if self.reliability is not None:
            state["reliability"] = self.reliability
            state["fell_back"] = self.fell_back
        if self.filled is not None:
            state["filled"] = self.filled.tolist()
        if self.normalizer is not None:
            state["timestep_means"] = self.normalizer.means.tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.memory = torch.tensor(state["memory"], dtype=torch.float32)
        self.temperature = state.get("temperature", self.temperature)
        self.reliability = state.get("reliability", self.reliability)
        self.fell_back = state.get("fell_back", self.fell_back)
        if "filled" in state:
            self.filled = torch.tensor(state["filled"], dtype=torch.float32)
        self._weights = None
        if self.normalizer is not None and "timestep_means" in state:
            self.normalizer.means = torch.tensor(state["timestep_means"], dtype=torch.float32)


def build_weighting(name: str, num_items: int, **settings):
    """A weighting from keyword settings, outside an erase run (the classification testbed
    builds its own); erase runs go through ``weighting_for``.

    Args:
        name: "uniform" or "loreun".
        num_items: N, the size of the forget set.
        **settings: keyword arguments of ``LoReUnWeighting`` (ignored by uniform).
    """
    table = {
        "uniform": lambda: UniformWeighting(),
        "loreun": lambda: LoReUnWeighting(num_items, **settings),
    }
    if name not in table:
        raise ValueError(f"unknown weighting {name!r}; choose one of {', '.join(table)}")
    return table[name]()


def weighting_for(cfg, num_items: int, schedule) -> Weighting:
    """The run's weighting, built by its slot module (``config.WEIGHTING_SLOTS``) from the
    settings that slot owns; ``schedule.bucket`` gives LoReUn's time buckets."""
    return cfg.weighting_slot().build(cfg, num_items, schedule)


def weighting_stats(weighting, num_items: int) -> dict[str, float]:
    """ESS of the weights in force, absolute and as a fraction of the items they span, and the
    dynamic memory's rank correlation with its fill (how far it has moved)."""
    weights = weighting.all_weights()
    n = len(weights) if weights is not None else num_items
    ess = effective_sample_size(weights) if weights is not None else float(n)
    stats = {"ess": ess, "ess_fraction": ess / n}
    drift = weighting.drift()
    if drift is not None:
        stats["memory_rank_corr"] = drift
    reliability = weighting.reliability
    if reliability is not None and math.isfinite(reliability):
        stats["difficulty_reliability"] = reliability
    return stats
