"""LoReUn in its paper's main setting: machine unlearning for image classification, on a CPU.

The testbed follows SalUn's protocol (Fan et al., ICLR 2024) at laptop scale:

- testbeds (data and model): ``digits``, scikit-learn's bundled handwritten digits (1,797 8x8
  images) and an MLP (64 -> 256 -> 256 -> 10) that fits its training set to cross-entropies near
  1e-5, as ResNet-18 fits CIFAR-10 in the paper's setting; ``mnist1d``, MNIST-1D's 5,000
  signals of length 40 (generated offline by the ``mnist1d`` package) and a small 1-D CNN that
  does not fit them all, so forget losses spread over decades. Each is split into train (70%),
  validation (10%) and test (20%); the split is fixed, the model and forget set vary by seed;
- scenarios: random-data forgetting of 10% and of 50% of the training set, class-wise
  forgetting of one class (chosen by the seed), noisy-10: a random 10% whose items were 20%
  mislabelled before the original was trained (memorised items), and atypical-10: the same with
  20% of the items made odd, right labels kept (digits rotated by 90 degrees, MNIST-1D signals
  reversed in time); in the last two difficulty varies for a reason;
- reference: retraining from scratch on the retain set, same seed and recipe;
- methods: FT (fine-tune on the retain set), GA (gradient ascent on the forget set), RL
  (random labels on the forget set plus the retain loss), SalUn (RL on the 50% of weights with
  the largest forget-loss gradient);
- weightings of the forget term: uniform; LoReUn static, dynamic (memory) and batch with tau
  set by a target effective sample size (and the library's ESS floor), and paper (a fixed tau on
  the batch's raw losses), through ``loreun.erase.weighting``. Difficulty is an item's
  cross-entropy under its training label (low = still fitted = harder to forget). FT has no
  forget term, so it runs uniform only;
- metrics: UA = 1 - forget accuracy, RA (retain), TA (test; for class-wise, the test images of
  the other classes), MIA-efficacy (a confidence-based membership attack trained on retain vs.
  test, the share of forget images it calls non-members), Avg. Gap = mean |metric - retrain's|;
- fairness: every weighting is tuned alone on the method's one lr x epochs grid (LoReUn also
  over its own axis: target ESS 0.5/0.8, or tau 0.1/1 for paper), by the mean Avg. Gap on the
  validation split over 5 tuning seeds (100-104), apart from the 20 evaluation seeds (0-19);
  each row states its tuning budget (grid points x tuning seeds);
- statistics: the relative Avg. Gap reduction against uniform (same seed), -mean(d)/mean(uniform),
  with a paired 95% t interval, and Holm-adjusted paired t-test p-values over every LoReUn row;
- premise check: Spearman correlation between a forget item's loss before unlearning and after
  uniform unlearning (positive: items fitted well before stay fitted, i.e. resist forgetting).

Run (the tables do not depend on the thread count):

    OMP_NUM_THREADS=1 python scripts/bench_classification.py --out runs/cls

docs/results.md lists the parts its table was run in (``--testbeds``, ``--scenarios``,
``--methods``), each with its measured wall time; ``--report`` joins them under one Holm
correction, and the rows equal those of a single run.

``--smoke`` runs every testbed, scenario, method and weighting on 2 seeds, 1 tuning seed and
one grid point (MNIST-1D's models trained for 4 epochs), and prints the same tables; CI runs
it. ``--testbeds``, ``--scenarios`` and ``--methods`` choose a part of the full run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loreun.erase.weighting import build_weighting
from loreun.erase.weighting_loreun import MIN_ESS

WEIGHTINGS = ("uniform", "static", "dynamic", "batch", "paper")
# Controls that take dynamic LoReUn apart (``--controls``): its weights divided by their batch
# mean (the allocation alone); uniform with weight 0 on items already misclassified (the brake
# alone); uniform with each batch's forget term scaled by the dynamic run's batch-mean weight at
# that step, replayed on the same seed's batches (the step size alone); uniform at dynamic's own
# lr and epochs (the operating point alone).
CONTROLS = ("dynamic-mean", "brake", "step-replay", "uniform-at-dynamic")
METHODS = ("FT", "GA", "RL", "SalUn")
SCENARIOS = ("random-10", "random-50", "class", "noisy-10", "atypical-10")
NOISY_SHARE = 0.2  # noisy-10 / atypical-10: the share of forget items made odd before training
METRICS = ("UA", "RA", "TA", "MIA")


# ----------------------------------------------------------------------------- data and model


@dataclass
class Data:
    """Tensors of one scenario: x [n, d] (the testbed's inputs), y [n] class ids."""

    forget_x: torch.Tensor
    forget_y: torch.Tensor
    retain_x: torch.Tensor
    retain_y: torch.Tensor
    eval_x: torch.Tensor  # test (or validation, when tuning) images
    eval_y: torch.Tensor
    forgotten_class: int | None = None
    train_y: torch.Tensor | None = None  # the original's training labels, where not the split's
    train_x: torch.Tensor | None = None  # the original's training images, where not the split's


def _split(x: torch.Tensor, y: torch.Tensor, split_seed: int) -> dict:
    """train (70%) / validation (10%) / test (20%) of one pool of labelled examples."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    n_test, n_val = int(0.2 * len(x)), int(0.1 * len(x))
    parts = {
        "test": perm[:n_test],
        "val": perm[n_test : n_test + n_val],
        "train": perm[n_test + n_val :],
    }
    return {k: (x[i], y[i]) for k, i in parts.items()}


def load_digits_split(split_seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's digits: x [n, 64] in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    return _split(x, torch.tensor(d.target, dtype=torch.long), split_seed)


def load_mnist1d_split(split_seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """MNIST-1D (Greydanus, 2020), generated offline by the PyPI package from its fixed seed:
    5,000 signals x [n, 40], standardised. Its own train/test cut is pooled and re-split like
    digits, so both testbeds share one protocol."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise SystemExit(
            "the mnist1d testbed needs the mnist1d package: pip install -e '.[dev]' "
            "(or pip install mnist1d), or run --testbeds digits"
        ) from None

    state = np.random.get_state()  # the generator seeds numpy's global stream; put it back
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    x = torch.tensor(np.concatenate([d["x"], d["x_test"]]), dtype=torch.float32)
    y = torch.tensor(np.concatenate([d["y"], d["y_test"]]), dtype=torch.long)
    return _split(x, y, split_seed)


def make_mlp(seed: int) -> torch.nn.Module:
    """digits' model: it fits its 1,257 training images to a cross-entropy near 1e-5."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )


def make_cnn1d(seed: int) -> torch.nn.Module:
    """MNIST-1D's model: three strided 1-D convolutions (x [n, 40] -> [n, 25, 5]) and a linear
    head. It does not fit every training signal, so forget losses spread over decades."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 40)),
        torch.nn.Conv1d(1, 25, 5, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv1d(25, 25, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv1d(25, 25, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(125, 10),
    )


def rotate_8x8(x: torch.Tensor) -> torch.Tensor:
    """[n, 64] images rotated by 90 degrees."""
    return x.view(-1, 8, 8).rot90(1, (1, 2)).reshape(-1, 64)


@dataclass(frozen=True)
class Testbed:
    """A data set and the model trained on it; ``atypical`` makes the odd copies of
    atypical-10 (right labels, inputs the model rarely sees)."""

    load: Callable[[int], dict]
    make_model: Callable[[int], torch.nn.Module]
    atypical: Callable[[torch.Tensor], torch.Tensor]
    epochs: int  # of the original and the retrain reference
    smoke_epochs: int


TESTBEDS = {
    "digits": Testbed(load_digits_split, make_mlp, rotate_8x8, epochs=40, smoke_epochs=40),
    # a signal played backwards: the same values, in an order no training signal has
    "mnist1d": Testbed(
        load_mnist1d_split, make_cnn1d, lambda x: x.flip(1), epochs=40, smoke_epochs=4
    ),
}


def scenario_data(split: dict, scenario: str, seed: int, eval_part: str, atypical) -> Data:
    """Choose the forget set of a scenario for a seed; ``atypical`` makes atypical-10's odd
    copies."""
    x, y = split["train"]
    ex, ey = split[eval_part]
    g = torch.Generator().manual_seed(10_000 + seed)
    if scenario == "class":
        c = int(torch.randint(0, 10, (1,), generator=g))
        forget = y == c
        keep_eval = ey != c
        return Data(x[forget], y[forget], x[~forget], y[~forget], ex[keep_eval], ey[keep_eval], c)
    frac = int(scenario.split("-")[1]) / 100
    perm = torch.randperm(len(x), generator=g)
    k = int(round(frac * len(x)))
    f, r = perm[:k], perm[k:]
    odd = f[: int(round(NOISY_SHARE * k))]
    if scenario.startswith("noisy"):  # memorised items: wrong labels the original fitted
        y = y.clone()
        y[odd] = (y[odd] + torch.randint(1, 10, (len(odd),), generator=g)) % 10
        return Data(x[f], y[f], x[r], y[r], ex, ey, train_y=y)
    if scenario.startswith("atypical"):  # odd copies: right labels, unusual inputs
        x = x.clone()
        x[odd] = atypical(x[odd])
        return Data(x[f], y[f], x[r], y[r], ex, ey, train_x=x)
    return Data(x[f], y[f], x[r], y[r], ex, ey)


def batches(n: int, size: int, g: torch.Generator):
    perm = torch.randperm(n, generator=g)
    return [perm[i : i + size] for i in range(0, n, size)]


def train_from_scratch(make_model, x, y, seed: int, epochs: int) -> torch.nn.Module:
    """The recipe of both the original model (all training data) and the retrain reference."""
    model = make_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in batches(len(x), 64, g):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


# ----------------------------------------------------------------------------- metrics


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean()) if len(x) else float("nan")


@torch.no_grad()
def confidence(model, x, y) -> np.ndarray:
    """[n] probability of the true class: the MIA's feature."""
    return F.softmax(model(x), 1).gather(1, y[:, None]).squeeze(1).numpy()


def mia_efficacy(model, data: Data, seed: int) -> float:
    """Share of forget images that a confidence-based attack calls non-members.

    The attack (a logistic regression on log-confidence, as SalUn's SVC on confidence) is
    trained on retain images (members) against evaluation images (non-members), balanced.
    """
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    n = min(len(data.retain_x), len(data.eval_x))
    ri = rng.choice(len(data.retain_x), n, replace=False)
    member = confidence(model, data.retain_x[ri], data.retain_y[ri])
    non = confidence(model, data.eval_x, data.eval_y)[:n]
    feats = np.log(np.concatenate([member, non]) + 1e-12)[:, None]
    labels = np.concatenate([np.ones(len(member)), np.zeros(len(non))])
    attack = LogisticRegression().fit(feats, labels)
    forget = np.log(confidence(model, data.forget_x, data.forget_y) + 1e-12)[:, None]
    return float((attack.predict(forget) == 0).mean())


def metrics(model, data: Data, seed: int) -> dict[str, float]:
    return {
        "UA": 1 - accuracy(model, data.forget_x, data.forget_y),
        "RA": accuracy(model, data.retain_x, data.retain_y),
        "TA": accuracy(model, data.eval_x, data.eval_y),
        "MIA": mia_efficacy(model, data, seed),
    }


def avg_gap(m: dict, ref: dict) -> float:
    return statistics.fmean(abs(m[k] - ref[k]) for k in METRICS)


# ----------------------------------------------------------------------------- unlearning


@dataclass
class Setting:
    """One unlearning run's hyperparameters."""

    method: str
    lr: float
    epochs: int
    weighting: str = "uniform"
    target_ess: float = 0.8  # static, dynamic, batch: tau set by this ESS
    temperature: float = 1.0  # paper: a fixed tau on the batch's raw losses
    batch_size: int = 32
    extra: dict = field(default_factory=dict)


def saliency_mask(model, data: Data, fraction: float = 0.5) -> list[torch.Tensor]:
    """SalUn's mask: the weights with the largest |gradient of the forget loss|, per tensor
    set globally; 1 where a weight trains."""
    model.zero_grad()
    F.cross_entropy(model(data.forget_x), data.forget_y).backward()
    grads = [p.grad.abs() for p in model.parameters()]
    flat = torch.cat([g.flatten() for g in grads])
    k = int(round(fraction * flat.numel()))
    threshold = flat.kthvalue(flat.numel() - k + 1).values
    model.zero_grad()
    return [(g >= threshold).float() for g in grads]


def make_weighting(s: Setting, model, data: Data):
    """A LoReUn weighting over the forget items, its memory filled with their initial CE; the
    controls start from dynamic's (dynamic-mean) or uniform's (the others)."""
    n = len(data.forget_x)
    kind = {"dynamic-mean": "dynamic"}.get(s.weighting, s.weighting)
    if kind in ("uniform", *CONTROLS):
        return build_weighting("uniform", n)
    if s.weighting == "paper":
        w = build_weighting(
            "loreun", n, variant="paper", temperature=s.temperature, normalize=False
        )
    else:
        w = build_weighting(
            "loreun", n, variant=kind, momentum=0.5, normalize=False,
            target_ess=s.target_ess, min_ess=MIN_ESS,
        )  # fmt: skip
    with torch.no_grad():
        w.fill(
            F.cross_entropy(model(data.forget_x), data.forget_y, reduction="none")[:, None], None
        )
    return w


def forget_losses(s: Setting, model, data: Data, idx, g) -> tuple[torch.Tensor, ...]:
    """Per-sample forget losses [B] of the method, the items' true-label CE [B] (difficulty),
    and whether each is still classified right [B] (the brake control's test).

    GA ascends the true-label CE; RL and SalUn descend the CE of a random wrong label.
    """
    logits = model(data.forget_x[idx])
    ce = F.cross_entropy(logits, data.forget_y[idx], reduction="none")
    right = logits.detach().argmax(1) == data.forget_y[idx]
    if s.method == "GA":
        return -ce, ce.detach(), right
    wrong = (data.forget_y[idx] + torch.randint(1, 10, (len(idx),), generator=g)) % 10
    return F.cross_entropy(logits, wrong, reduction="none"), ce.detach(), right


def batch_weights(s: Setting, weighting, idx, right, k: int, replay) -> torch.Tensor:
    """[B] the forget weights of step ``k``: the weighting's, or a control's (``CONTROLS``);
    ``replay`` is the dynamic run's batch-mean weight per step (step-replay only)."""
    w = weighting.weights(idx)
    if s.weighting == "dynamic-mean":  # a batch whose weights all underflowed has no allocation
        return w / w.mean() if w.mean() > 0 else torch.ones_like(w)
    if s.weighting == "brake":
        return right.float()
    if s.weighting == "step-replay":
        return torch.full_like(w, replay[k])
    return w


def unlearn(original, data: Data, s: Setting, seed: int, replay=None):
    """Run one unlearning method from a copy of the original model.

    Returns:
        (the model, its trace: per step the batch-mean forget weight, the batch weights' ESS
        fraction and the gradient norm before clipping; what tells reweighting from a brake or
        a step size)
    """
    import copy

    model = copy.deepcopy(original)
    g = torch.Generator().manual_seed(seed)
    mask = saliency_mask(model, data) if s.method == "SalUn" else None
    weighting = make_weighting(s, model, data) if s.method != "FT" else None
    opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=0.9)
    trace = {"batch_mean_weight": [], "batch_ess": [], "grad_norm": []}
    for _ in range(s.epochs):
        if s.method == "FT":
            for idx in batches(len(data.retain_x), s.batch_size, g):
                loss = F.cross_entropy(model(data.retain_x[idx]), data.retain_y[idx])
                trace["grad_norm"].append(step(model, opt, mask, loss))
            continue
        for idx in batches(len(data.forget_x), s.batch_size, g):
            losses, ce, right = forget_losses(s, model, data, idx, g)
            weighting.observe(idx, torch.zeros(len(idx)), ce)
            w = batch_weights(s, weighting, idx, right, len(trace["grad_norm"]), replay)
            loss = (w * losses).sum() / len(idx)
            if s.method != "GA":
                r = torch.randint(0, len(data.retain_x), (s.batch_size,), generator=g)
                loss = loss + F.cross_entropy(model(data.retain_x[r]), data.retain_y[r])
            trace["batch_mean_weight"].append(float(w.mean()))
            ess = float(w.sum() ** 2 / (w * w).sum() / len(w)) if w.any() else 0.0
            trace["batch_ess"].append(ess)
            trace["grad_norm"].append(step(model, opt, mask, loss))
    return model, trace


def step(model, opt, mask, loss) -> float:
    """One SGD step (SalUn's mask, norm clipped at 5); returns the norm before clipping."""
    opt.zero_grad()
    loss.backward()
    if mask is not None:
        for p, m in zip(model.parameters(), mask):
            p.grad.mul_(m)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()
    return float(norm)


# ----------------------------------------------------------------------------- the grid

GRIDS = {  # one lr x epochs grid per method, shared by every weighting; smoke takes one point
    "FT": ([0.01, 0.03, 0.1, 0.3], [5, 10, 20, 40]),
    "GA": ([0.0003, 0.001, 0.003, 0.01], [1, 3, 5, 10]),
    "RL": ([0.0003, 0.001, 0.003, 0.01, 0.03], [1, 2, 5, 10]),
    "SalUn": ([0.0003, 0.001, 0.003, 0.01, 0.03], [1, 2, 5, 10]),
}
# LoReUn's own axis, tuned with lr and epochs: the target ESS of the tau-by-ESS variants, and
# the paper variant's fixed tau (cross-entropies of fitted items sit near 1e-5 to 1).
TARGET_ESS = (0.5, 0.8)
PAPER_TAUS = (0.1, 1.0)


class Bench:
    """Caches the original and retrained models, so each is trained once per seed."""

    def __init__(self, name: str, smoke: bool = False):
        self.name, self.bed = name, TESTBEDS[name]
        self.split = self.bed.load(0)
        self.epochs = self.bed.smoke_epochs if smoke else self.bed.epochs
        self._original: dict[int, torch.nn.Module] = {}
        self._retrain: dict[tuple, dict] = {}
        self._traces: dict[tuple, dict] = {}  # dynamic runs' traces, for step-replay
        self.rows: list[dict] = []

    def original(self, seed: int, data: Data, scenario: str) -> torch.nn.Module:
        """The model trained on the whole training set, or on the scenario's own training
        inputs or labels (the noisy and atypical scenarios, which change them)."""
        own = data.train_x is not None or data.train_y is not None
        key = (seed, scenario if own else None)
        if key not in self._original:
            x, y = self.split["train"]
            x = x if data.train_x is None else data.train_x
            y = y if data.train_y is None else data.train_y
            self._original[key] = self.train(x, y, seed)
        return self._original[key]

    def data(self, scenario: str, seed: int, part: str) -> Data:
        return scenario_data(self.split, scenario, seed, part, self.bed.atypical)

    def train(self, x, y, seed: int) -> torch.nn.Module:
        return train_from_scratch(self.bed.make_model, x, y, seed, self.epochs)

    def reference(self, scenario: str, seed: int, part: str) -> dict:
        key = (scenario, seed, part)
        if key not in self._retrain:
            d = self.data(scenario, seed, part)
            model = self.train(d.retain_x, d.retain_y, seed)
            self._retrain[key] = metrics(model, d, seed)
        return self._retrain[key]

    def run(self, scenario: str, s: Setting, seed: int, part: str, record=True) -> dict:
        """One unlearning run and its row; every row (tuning runs' too) is kept in ``rows``."""
        d = self.data(scenario, seed, part)
        original = self.original(seed, d, scenario)
        replay = (
            self.dynamic_trace(scenario, s, seed, part) if s.weighting == "step-replay" else None
        )
        started = time.perf_counter()
        model, trace = unlearn(original, d, s, seed, replay)
        seconds = time.perf_counter() - started
        m = metrics(model, d, seed)
        row = {"testbed": self.name, "scenario": scenario, "seed": seed, "part": part}
        row.update(**s.__dict__, **m)
        row.update(gap=avg_gap(m, self.reference(scenario, seed, part)), seconds=seconds)
        row.update(trace_summary(trace))
        if part == "test" and s.method != "FT":
            row["trace"] = trace
        if s.weighting == "uniform" and s.method != "FT":
            row.update(premise(original, model, d))
        if s.weighting == "dynamic":
            self._traces[(scenario, seed, part, s.lr, s.epochs, s.target_ess)] = trace
        if record:
            self.rows.append(row)
        return row

    def dynamic_trace(self, scenario: str, s: Setting, seed: int, part: str) -> list[float]:
        """The batch-mean weights of the dynamic run at ``s``'s lr, epochs and ESS, same seed
        (the run made for the table, or one made here and not recorded)."""
        key = (scenario, seed, part, s.lr, s.epochs, s.target_ess)
        if key not in self._traces:
            self.run(scenario, dataclasses.replace(s, weighting="dynamic"), seed, part, False)
        return self._traces[key]["batch_mean_weight"]


def trace_summary(trace: dict) -> dict:
    """What a row keeps of its trace: the mean, 5th and 95th percentile of the batch-mean
    forget weight, the mean batch ESS fraction, the mean gradient norm and the share of steps
    clipped (norm above 5)."""
    out = {}
    weights = trace["batch_mean_weight"]
    if weights:
        q5, q95 = np.percentile(weights, [5, 95])
        out.update(w_mean=statistics.fmean(weights), w_p5=float(q5), w_p95=float(q95))
        out["ess_mean"] = statistics.fmean(trace["batch_ess"])
    norms = trace["grad_norm"]
    if norms:
        out.update(
            grad_norm=statistics.fmean(norms), clipped=statistics.fmean(n > 5 for n in norms)
        )
    return out


def premise(original, model, d: Data) -> dict:
    """Does low initial loss predict resistance to forgetting? Spearman(initial CE, final CE)
    over the forget items, and forget accuracy after unlearning in the lowest and highest
    quartile of initial CE."""
    from scipy.stats import spearmanr

    with torch.no_grad():
        before = F.cross_entropy(original(d.forget_x), d.forget_y, reduction="none").numpy()
        after = F.cross_entropy(model(d.forget_x), d.forget_y, reduction="none").numpy()
        right = (model(d.forget_x).argmax(1) == d.forget_y).numpy()
    easiest, hardest = quartiles(before)
    return {
        "premise_rho": float(spearmanr(before, after).statistic),  # average ranks for ties
        "acc_easiest_quartile": float(right[easiest].mean()),
        "acc_hardest_quartile": float(right[hardest].mean()),
    }


def quartiles(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the lowest and the highest quarter of ``values``, a quarter each even where
    values tie (a threshold mask took every item tied at the quantile: with many forget
    losses at 0, the "easiest quartile" was most of the set). Ties go by position."""
    order = np.argsort(values, kind="stable")
    k = max(1, len(values) // 4)
    return order[:k], order[-k:]


def grid(method: str, weighting: str, smoke: bool) -> list[Setting]:
    """The settings a weighting is tuned over: the method's lr x epochs grid, times LoReUn's
    own axis (target ESS, or tau for the paper variant)."""
    lrs, epochs = GRIDS[method]
    if smoke:
        lrs, epochs = lrs[1:2], epochs[:1]
    if weighting in ("uniform", "brake"):
        points = itertools.product(lrs, epochs)
        return [Setting(method, lr, ep, weighting) for lr, ep in points]
    if weighting == "paper":
        taus = PAPER_TAUS[-1:] if smoke else PAPER_TAUS
        points = itertools.product(lrs, epochs, taus)
        return [Setting(method, lr, ep, weighting, temperature=t) for lr, ep, t in points]
    ess = TARGET_ESS[-1:] if smoke else TARGET_ESS
    points = itertools.product(lrs, epochs, ess)
    return [Setting(method, lr, ep, weighting, target_ess=e) for lr, ep, e in points]


def tune(
    bench: Bench, scenario: str, method: str, seeds, smoke: bool, controls: bool = False
) -> dict[str, Setting]:
    """Each weighting's setting, tuned alone on its grid (``grid``) over the tuning seeds by
    the mean Avg. Gap on the validation split. Returns the chosen setting per weighting, with
    its tuning budget (grid points x tuning seeds) in ``extra``. The step-replay and
    uniform-at-dynamic controls take dynamic's chosen setting, untuned."""
    chosen = {}
    arms = WEIGHTINGS if method != "FT" else WEIGHTINGS[:1]  # FT has no forget term
    for w in arms + (CONTROLS if controls and method != "FT" else ()):
        if w in ("step-replay", "uniform-at-dynamic"):
            chosen[w] = dataclasses.replace(chosen["dynamic"], weighting=w)
            chosen[w].extra = {"tuning_runs": 0}
            continue
        options = grid(method, w, smoke)

        def mean_gap(s):
            return statistics.fmean(bench.run(scenario, s, seed, "val")["gap"] for seed in seeds)

        print(f"{bench.name} {scenario} {method} {w}: tuning {len(options)} settings", flush=True)
        best = min(options, key=mean_gap)
        best.extra = {"tuning_runs": len(options) * len(seeds)}
        chosen[w] = best
    return chosen


# ----------------------------------------------------------------------------- tables


def _ci(diffs: list[float]) -> str:
    """Mean and 95% t-interval of paired differences."""
    from scipy.stats import t

    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return f"{m:+.4f}"
    half = t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{m:+.4f} [{m - half:+.4f}, {m + half:+.4f}]"


def _ms(values) -> str:
    values = list(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (in their order), for every row at once."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def compare(gaps: list[float], base: list[float]) -> dict:
    """LoReUn against uniform over paired seeds: the relative Avg. Gap reduction
    1 - mean(gaps) / mean(uniform) (positive: closer to retraining), the paired t-test's p, and
    how many seeds came closer.

    The interval is Fieller's for the ratio of the two paired means, so uniform's own spread
    counts (taking its mean as fixed made the interval too narrow); a gap is never below 0, so
    the reduction is at most 100% and the upper end is cut there. Where uniform's mean is not
    clearly above 0, the interval is unbounded (lo = -inf).
    """
    from scipy.stats import ttest_rel

    d = [g - u for g, u in zip(gaps, base)]
    same = all(x == 0 for x in d)
    p = 1.0 if same or len(d) < 2 else float(ttest_rel(gaps, base).pvalue)
    lo, hi = fieller(gaps, base)
    return {
        "rel": 1 - statistics.fmean(gaps) / statistics.fmean(base),
        "lo": 1 - hi, "hi": min(1.0, 1 - lo),
        "p": p if math.isfinite(p) else 1.0, "closer": sum(x < 0 for x in d), "pairs": len(d),
    }  # fmt: skip


def fieller(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float]:
    """Fieller's interval for mean(a) / mean(b) over paired samples: the rho whose
    (mean(a) - rho mean(b)) / se is inside the t quantile, with the pairs' covariance.
    (-inf, inf) where mean(b) is not clearly above zero; the point itself for one pair."""
    from scipy.stats import t

    n, ma, mb = len(a), statistics.fmean(a), statistics.fmean(b)
    if n < 2:
        return ma / mb, ma / mb
    q = t.ppf(0.5 + level / 2, n - 1) ** 2
    saa = statistics.variance(a) / n
    sbb = statistics.variance(b) / n
    sab = statistics.covariance(a, b) / n
    qa, qb, qc = mb * mb - q * sbb, ma * mb - q * sab, ma * ma - q * saa
    disc = qb * qb - qa * qc
    if qa <= 0 or disc < 0:
        return -math.inf, math.inf
    return (qb - math.sqrt(disc)) / qa, (qb + math.sqrt(disc)) / qa


def _setting(r: dict) -> str:
    untuned = {w: "" for w in ("uniform", "brake", "uniform-at-dynamic")}
    axis = {**untuned, "paper": f", tau {r['temperature']}"}.get(
        r["weighting"], f", ESS {r['target_ess']}"
    )
    return f"lr {r['lr']:g}, {r['epochs']} ep{axis}"


def gap_table(rows: list[dict]) -> str:
    """One line per (testbed, scenario, method, weighting); Holm's correction runs over every
    LoReUn line of the table."""
    lines = [
        "| testbed | scenario | method | weighting | setting | UA | RA | TA | MIA | Avg. Gap | "
        "gap reduction vs uniform (95% CI) | Holm p | closer/pairs | tuning runs | s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tb, sc in itertools.product(TESTBEDS, SCENARIOS):
        refs = [r for r in rows if _is(r, tb, sc, "retrain", None)]
        if refs:
            cells = [tb, sc, "retrain", "-", "-", *(_ms(r[k] for r in refs) for k in METRICS)]
            lines.append("| " + " | ".join(cells + ["0", "-", "-", "-", "-", "-"]) + " |")
    body, tests = [], []
    for tb, sc, me in itertools.product(TESTBEDS, SCENARIOS, METHODS):
        base = {r["seed"]: r["gap"] for r in rows if _is(r, tb, sc, me, "uniform")}
        for w in WEIGHTINGS + CONTROLS:
            sub = [r for r in rows if _is(r, tb, sc, me, w) and r["seed"] in base]
            if not sub:
                continue
            cells = [tb, sc, me, w, _setting(sub[0])]
            cells += [_ms(r[k] for r in sub) for k in (*METRICS, "gap")]
            cmp = None
            if w != "uniform":
                cmp = compare([r["gap"] for r in sub], [base[r["seed"]] for r in sub])
                tests.append((len(body), cmp["p"]))
            body.append((cells, cmp, sub))
    adjusted = dict(zip([i for i, _ in tests], holm([p for _, p in tests])))
    for i, (cells, cmp, sub) in enumerate(body):
        if cmp is None:
            cells += ["-", "-", "-"]
        else:
            cells += [
                f"{cmp['rel']:+.0%} [{cmp['lo']:+.0%}, {cmp['hi']:+.0%}]",
                f"{adjusted[i]:.3g}",
                f"{cmp['closer']}/{cmp['pairs']}",
            ]
        cells.append(str(sub[0].get("extra", {}).get("tuning_runs", "-")))
        cells.append(f"{statistics.median(r['seconds'] for r in sub):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _is(r, testbed, scenario, method, weighting) -> bool:
    """Whether a test run belongs to a table line (runs made before testbeds were named are
    digits'; tuning runs, part "val", are kept in runs.jsonl but in no table)."""
    key = (r.get("testbed", "digits"), r["scenario"], r["method"], r.get("weighting"))
    return key == (testbed, scenario, method, weighting) and r.get("part", "test") == "test"


def premise_table(rows: list[dict]) -> str:
    lines = [
        "| testbed | scenario | method | Spearman(initial CE, final CE) | "
        "forget acc., easiest quartile | forget acc., hardest quartile |",
        "|---|---|---|---|---|---|",
    ]
    keys = ("premise_rho", "acc_easiest_quartile", "acc_hardest_quartile")
    for tb, sc, me in itertools.product(TESTBEDS, SCENARIOS, METHODS[1:]):
        sub = [r for r in rows if _is(r, tb, sc, me, "uniform")]
        if sub:
            cells = [tb, sc, me, *(_ms(r[k] for r in sub) for k in keys)]
            lines.append("| " + " | ".join(cells))
    return "\n".join(ln if ln.endswith("|") else ln + " |" for ln in lines)


def mechanism_table(rows: list[dict]) -> str:
    """What each arm did to the step, median over seeds: the batch-mean forget weight (its
    mean, and 5th-95th percentile over steps), the batch weights' ESS fraction, the gradient
    norm before clipping and the share of steps the clip at 5 cut."""
    lines = [
        "| testbed | scenario | method | weighting | batch-mean weight (p5-p95) | batch ESS | "
        "grad norm | clipped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tb, sc, me in itertools.product(TESTBEDS, SCENARIOS, METHODS[1:]):
        for w in WEIGHTINGS + CONTROLS:
            sub = [r for r in rows if _is(r, tb, sc, me, w) and "w_mean" in r]
            if not sub:
                continue

            def med(k, sub=sub):
                return statistics.median(r[k] for r in sub)

            cells = [tb, sc, me, w, f"{med('w_mean'):.2f} ({med('w_p5'):.2f}-{med('w_p95'):.2f})"]
            cells += [f"{med('ess_mean'):.2f}", f"{med('grad_norm'):.2f}", f"{med('clipped'):.0%}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=20, help="evaluation seeds 0..N-1")
    p.add_argument("--tune-seeds", type=int, default=5, help="tuning seeds 100..100+N-1")
    p.add_argument("--testbeds", nargs="+", default=list(TESTBEDS), choices=list(TESTBEDS))
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--smoke", action="store_true", help="2 seeds, 1 tuning seed, one grid point")
    p.add_argument(
        "--controls", action="store_true", help=f"also run {', '.join(CONTROLS)} (not for FT)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, help="write runs.jsonl and results.md here")
    p.add_argument(
        "--report", type=Path, nargs="+", metavar="RUNS", help="only tabulate these runs.jsonl"
    )
    args = p.parse_args()
    if args.report:  # one table, one Holm correction, over runs made separately
        return publish(read_reports(args.report), args.out)
    torch.set_num_threads(args.threads)
    seeds = range(2 if args.smoke else args.seeds)
    tune_seeds = range(100, 101 if args.smoke else 100 + args.tune_seeds)
    rows, started = [], time.perf_counter()
    for tb in args.testbeds:
        bench = Bench(tb, args.smoke)
        for sc, me in itertools.product(args.scenarios, args.methods):
            print(f"{tb} {sc} {me}: tuning and running", flush=True)
            for s in tune(bench, sc, me, tune_seeds, args.smoke, args.controls).values():
                for seed in seeds:
                    bench.run(sc, s, seed, "test")
            print(f"{tb} {sc} {me}: done at {time.perf_counter() - started:.0f} s", flush=True)
        rows += bench.rows  # every run, the tuning runs (part "val") too
        for sc in args.scenarios:  # the reference itself, for the reader
            rows += [
                {"testbed": tb, "scenario": sc, "method": "retrain", "seed": seed}
                | bench.reference(sc, seed, "test")
                for seed in seeds
            ]
    if args.out:  # the raw runs first: a table can be rebuilt from them (--report)
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "runs.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    publish(rows, args.out)


def read_reports(paths: list[Path]) -> list[dict]:
    """The rows of each runs.jsonl once, however often (or by whatever path) it is named."""
    unique = dict.fromkeys(Path(p).resolve() for p in paths)
    return [json.loads(x) for f in unique for x in f.read_text().splitlines() if x.strip()]


def publish(rows: list[dict], out: Path | None) -> None:
    text = gap_table(rows) + "\n\n" + premise_table(rows)
    if any("w_mean" in r for r in rows):
        text += "\n\n" + mechanism_table(rows)
    print(text)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
