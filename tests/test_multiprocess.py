import json
import os
import shutil
import subprocess
import sys

import pytest

from loreun.pipelines import apply_erased_weights, load_pipeline

from .conftest import erase_args


@pytest.mark.slow
def test_two_cpu_processes_with_torchrun(tiny_pipeline_dir, tmp_path):
    """torchrun gives accelerate MULTI_CPU over gloo; one log, one export, clean exit."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun comes with torch"
    out = tmp_path / "ddp"
    argv = [
        torchrun,
        "--nproc_per_node",
        "2",
        "-m",
        "loreun.cli",
        *erase_args(
            tiny_pipeline_dir,
            out,
            "--steps",
            "4",
            "--checkpoint-every",
            "2",
            "--weighting",
            "loreun",
        ),
    ]
    res = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("erased weights:") == 1
    steps = [json.loads(line)["step"] for line in open(out / "train_log.jsonl")]
    assert steps == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    apply_erased_weights(load_pipeline(str(tiny_pipeline_dir)), out / "erased.safetensors")
    from loreun.pipelines.loading import read_erased_file

    assert read_erased_file(out / "erased.safetensors")[1]["world_size"] == 2
    # one process cannot continue what two began: each process draws its own batches
    res = subprocess.run(
        [sys.executable, "-m", "loreun.cli", *erase_args(tiny_pipeline_dir, out)]
        + ["--steps", "6", "--checkpoint-every", "2", "--weighting", "loreun"]
        + ["--resume", "latest"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 2 and "was made by 2 processes, this run has 1" in res.stderr
