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
    # 2 testbeds x 5 scenarios x (FT + 3 methods x 5 weightings) x 2 seeds, and the references
    runs = (tmp_path / "runs.jsonl").read_text().count("\n")
    assert runs == 2 * (5 * (1 + 3 * 5) * 2 + 5 * 2)
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
