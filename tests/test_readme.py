"""The README's runnable block is run as a user would run it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block() -> str:
    text = README.read_text()
    block = re.search(
        r"<!-- readme-test:start -->\s*```bash\n(.*?)```\s*<!-- readme-test:end -->", text, re.S
    )
    assert block, "README lost its tested block"
    return block.group(1)


@pytest.mark.slow
def test_readme_erase_load_and_evaluate(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    res = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_block()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("(16, 16)") == 2
    assert "erased weights: runs/erase-3/unet-erased.safetensors" in res.stdout
    assert (tmp_path / "runs/eval-3/report.html").is_file()
    import json

    s = json.loads((tmp_path / "runs/eval-3/summary.json").read_text())["sources"]
    assert s["erased"]["digits"]["erased_top1"] < s["original"]["digits"]["erased_top1"]
