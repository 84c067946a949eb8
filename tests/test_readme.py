"""The README's runnable block is run as a user would run it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(name: str = "readme-test") -> str:
    text = README.read_text()
    block = re.search(
        rf"<!-- {name}:start -->\s*```bash\n(.*?)```\s*<!-- {name}:end -->", text, re.S
    )
    assert block, f"README lost its tested block {name}"
    return block.group(1)


def run_block(name: str, cwd):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_block(name)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.mark.slow
def test_readme_erase_load_and_evaluate(tmp_path):
    res = run_block("readme-test", tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("(16, 16)") == 2
    assert "erased weights: runs/erase-3/erased.safetensors" in res.stdout
    assert (tmp_path / "runs/eval-3/report.html").is_file()
    s = json.loads((tmp_path / "runs/eval-3/summary.json").read_text())["sources"]
    assert s["erased"]["digits"]["erased_top1"] < s["original"]["digits"]["erased_top1"]
    attack = json.loads((tmp_path / "runs/attack-3/summary.json").read_text())
    assert attack["rows"] == 10 and 0 <= attack["pre_asr"] <= attack["asr"] <= 1
    assert (tmp_path / "runs/attack-3/report.html").is_file()


@pytest.mark.slow
def test_readme_erase_a_digit_from_a_folder_of_images(tmp_path):
    res = run_block("readme-test-images", tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((tmp_path / "runs/digit-8/forget").glob("*.png"))) > 100
    s = json.loads((tmp_path / "runs/eval-8/summary.json").read_text())["sources"]
    before, after = s["original"]["digits"], s["erased"]["digits"]
    assert after["erased_top1"] <= 0.2 < before["erased_top1"] - 0.5
    assert after["other_top1"] >= before["other_top1"] - 0.05  # within 5 points
