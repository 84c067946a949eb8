"""The classification testbed runs, and its table puts LoReUn beside uniform weighting."""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("random-10", "random-50", "class", "noisy-10", "atypical-10")


@pytest.mark.slow
def test_smoke_prints_the_gap_table(tmp_path):
    res = subprocess.run(
        [sys.executable, "scripts/bench_classification.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    header = "| testbed | scenario | method | weighting | setting | UA | RA | TA | MIA | Avg. Gap"
    assert header in res.stdout
    lines = res.stdout.split("\n\n")[0].splitlines()  # the gap table, before the premise one
    rows = [ln.split(" | ") for ln in lines if ln.startswith("| digits | random-10 | RL")]
    assert [r[3] for r in rows] == ["uniform", "static", "dynamic", "batch", "paper"]
    for testbed, scenario in itertools.product(("digits", "mnist1d"), SCENARIOS):
        assert f"| {testbed} | {scenario} | SalUn | paper |" in res.stdout
    # 2 testbeds x 5 scenarios x (FT + 3 methods x 5 weightings) x (2 seeds and 1 tuning run),
    # and the references
    runs = (tmp_path / "runs.jsonl").read_text().count("\n")
    assert runs == 2 * (5 * (1 + 3 * 5) * (2 + 1) + 5 * 2)
    report = ["scripts/bench_classification.py", "--report", str(tmp_path / "runs.jsonl")]
    again = subprocess.run(
        [sys.executable, *report], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    table = (tmp_path / "results.md").read_text().split("\n\n")[0]
    assert again.returncode == 0 and again.stdout.split("\n\n")[0] == table


def test_holm_adjusts_in_step_down_order():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts/bench_classification.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench  # dataclasses look their module up while it loads
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules["bench"]
    # by hand: sorted 0.01, 0.02, 0.04 -> 3*0.01, max(0.03, 2*0.02), max(0.04, 1*0.04)
    assert bench.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert bench.holm([0.5, 0.9]) == [1.0, 1.0]


def test_testbed_weighs_with_the_library_weighting():
    """The testbed imports loreun's own weighting; it keeps no copy of it."""
    text = (ROOT / "scripts" / "bench_classification.py").read_text()
    assert "from loreun.erase.weighting import build_weighting" in text
    assert "def softmax_weights" not in text


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / f"scripts/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it loads
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_the_ratio_interval_counts_uniform_s_spread_and_stops_at_100():
    """Fieller's interval, against a Monte Carlo of the same ratio; LoReUn's gaps near 0 with a
    spread-out uniform gave [46%, 104%] when uniform's mean was taken as fixed."""
    import numpy as np

    bench = _script("bench_classification")
    gaps = [0.002, 0.0, 0.004, 0.001, 0.0]
    base = [0.010, 0.002, 0.020, 0.004, 0.001]
    cmp = bench.compare(gaps, base)
    assert cmp["hi"] <= 1.0 and cmp["lo"] < cmp["rel"] < cmp["hi"]
    # wider than the old fixed-denominator interval on data where uniform's mean varies
    d = np.subtract(gaps, base)
    from scipy.stats import t

    half = t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5) / np.mean(base)
    assert cmp["hi"] - cmp["lo"] > min(1.0, cmp["rel"] + half) - (cmp["rel"] - half)
    # coverage: the interval holds the true ratio about 95% of the time
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        u = rng.normal(1.0, 0.3, 8)
        g = 0.5 * u + rng.normal(0, 0.1, 8)
        lo, hi = bench.fieller(list(g), list(u))
        hits += lo <= 0.5 <= hi
    assert 0.9 <= hits / 400 <= 0.99
    lo, hi = bench.fieller([1.0, -1.0, 2.0], [0.1, -0.1, 0.05])  # uniform's mean not above 0
    assert (lo, hi) == (float("-inf"), float("inf"))


def test_quartiles_hold_a_quarter_each_whatever_ties(tmp_path):
    import numpy as np

    bench = _script("bench_classification")
    values = np.array([0.0] * 12 + [1.0, 2.0, 3.0, 4.0])  # most forget losses at 0
    easiest, hardest = bench.quartiles(values)
    assert len(easiest) == len(hardest) == 4 and set(hardest) == {12, 13, 14, 15}


def test_a_runs_file_named_twice_is_read_once(tmp_path):
    bench = _script("bench_classification")
    runs = tmp_path / "runs.jsonl"
    runs.write_text('{"a": 1}\n{"a": 2}\n')
    same = tmp_path / "x" / ".." / "runs.jsonl"
    assert bench.read_reports([runs, runs, same]) == [{"a": 1}, {"a": 2}]


def test_the_robust_bench_uses_t_for_every_seed_count():
    from scipy.stats import t

    robust = _script("bench_robust")
    assert robust.t_975(10) == pytest.approx(t.ppf(0.975, 10)) and robust.t_975(10) > 2.2
    assert robust.paired([1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [0.0] * 11).startswith("+6.000 [")


def test_the_robust_bench_s_exact_interval_is_clopper_pearson():
    """Pooled attack rates carry the exact binomial interval: 0 of 60 bounds ASR below 0.06,
    as the robust bench's resolution needs."""
    from scipy.stats import binomtest

    robust = _script("bench_robust")
    for hits, n in ((0, 60), (3, 50), (50, 50), (7, 40)):
        want = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="exact")
        low, high = robust.clopper_pearson(hits, n)
        assert low == pytest.approx(want.low, abs=1e-9) and high == pytest.approx(want.high)
    assert robust.clopper_pearson(0, 60)[1] < 0.06
    rows = [{"rows": 10, "asr_5": 0.1}, {"rows": 10, "asr_5": 0.0}]
    assert robust.pooled(rows, "asr_5").startswith("1/20 [0.001, 0.249]")


def _digits_class(bench, seed=0):
    b = bench.Bench("digits", smoke=True)
    d = b.data("class", seed, "val")
    return b, d, b.original(seed, d, "class")


def test_each_control_takes_one_part_of_dynamic_loreun_apart():
    """dynamic-mean keeps dynamic's allocation at batch mean 1; brake zeroes the items already
    misclassified; step-replay weighs uniformly at the dynamic run's batch mean, step by step,
    on the same batches; uniform-at-dynamic is uniform at dynamic's own setting."""
    import torch

    bench = _script("bench_classification")
    b, d, original = _digits_class(bench)
    dynamic = bench.Setting("RL", 0.01, 2, "dynamic", target_ess=0.5)
    _, trace = bench.unlearn(original, d, dynamic, 0)
    assert max(trace["batch_mean_weight"]) - min(trace["batch_mean_weight"]) > 0.01
    mean = bench.dataclasses.replace(dynamic, weighting="dynamic-mean")
    _, trace_mean = bench.unlearn(original, d, mean, 0)
    assert trace_mean["batch_mean_weight"] == pytest.approx([1.0] * len(trace_mean["grad_norm"]))
    assert min(trace_mean["batch_ess"]) < 0.99  # the allocation is still uneven
    replay = bench.dataclasses.replace(dynamic, weighting="step-replay")
    _, trace_replay = bench.unlearn(original, d, replay, 0, trace["batch_mean_weight"])
    assert trace_replay["batch_mean_weight"] == pytest.approx(trace["batch_mean_weight"])
    weighed = [e for e, m in zip(trace_replay["batch_ess"], trace["batch_mean_weight"]) if m > 0]
    assert weighed == pytest.approx([1.0] * len(weighed))  # uniform wherever it weighs at all
    brake = bench.Setting("RL", 0.01, 2, "brake")
    right = torch.tensor([True, False, True])
    uniform = bench.make_weighting(brake, original, d)
    w = bench.batch_weights(brake, uniform, torch.arange(3), right, 0, None)
    assert w.tolist() == [1.0, 0.0, 1.0]


def test_controls_run_after_dynamic_and_the_replay_is_untuned():
    bench = _script("bench_classification")
    b = bench.Bench("digits", smoke=True)
    chosen = bench.tune(b, "class", "RL", [100], smoke=True, controls=True)
    assert list(chosen) == [*bench.WEIGHTINGS, *bench.CONTROLS]
    for arm in ("step-replay", "uniform-at-dynamic"):
        assert (chosen[arm].lr, chosen[arm].epochs) == (
            chosen["dynamic"].lr,
            chosen["dynamic"].epochs,
        )
        assert chosen[arm].extra == {"tuning_runs": 0}
    assert all(r["part"] == "val" for r in b.rows)  # the tuning runs, kept
    replayed = b.run("class", chosen["step-replay"], 0, "test")
    assert len(b.rows) == len([*bench.WEIGHTINGS, "dynamic-mean", "brake"]) + 1  # no extra row
    assert replayed["trace"]["batch_mean_weight"] != [1.0] * len(replayed["trace"]["grad_norm"])
