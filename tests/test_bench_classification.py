"""The classification testbed runs, and its table puts LoReUn beside uniform weighting."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    header = "| scenario | method | weighting | target ESS | UA | RA | TA | MIA | Avg. Gap"
    assert header in res.stdout
    lines = res.stdout.split("\n\n")[0].splitlines()  # the gap table, before the premise one
    rows = [ln.split(" | ") for ln in lines if ln.startswith("| random-10 | RL")]
    assert [r[2] for r in rows] == ["uniform", "static", "dynamic", "batch"]
    assert (tmp_path / "runs.jsonl").read_text().count("\n") == 3 * (1 + 3 * 4) * 2 + 3 * 2


def test_testbed_weighs_with_the_library_weighting():
    """The testbed imports loreun's own weighting; it keeps no copy of it."""
    text = (ROOT / "scripts" / "bench_classification.py").read_text()
    assert "from loreun.erase.weighting import build_weighting" in text
    assert "def softmax_weights" not in text
