"""How erase behaves under the launchers and habits GPU users bring: accelerate's own settings,
a retry after a failed start, two erasures in one process, and a platform without fcntl."""

import json
import os
import subprocess
import sys

import pytest

from loreun.cli.main import main
from loreun.erase.config import EraseConfig
from loreun.erase.trainer import erase

from .conftest import erase_args


def _saved(out) -> dict:
    return json.loads((out / "erase_config.json").read_text())


def test_accelerates_mixed_precision_is_used_and_recorded(tiny_pipeline_dir, tmp_path, monkeypatch):
    """``accelerate launch --mixed_precision bf16`` sets ACCELERATE_MIXED_PRECISION; loreun must
    not override it with its own default, and the flag, when given, still wins."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert main(erase_args(tiny_pipeline_dir, tmp_path / "a", "-q")) == 0
    assert _saved(tmp_path / "a")["mixed_precision"] == "bf16"
    assert main(erase_args(tiny_pipeline_dir, tmp_path / "b", "-q", "--mixed-precision", "no")) == 0
    assert _saved(tmp_path / "b")["mixed_precision"] == "no"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert main(erase_args(tiny_pipeline_dir, tmp_path / "c", "-q")) == 0
    assert _saved(tmp_path / "c")["mixed_precision"] == "no"


def test_a_resume_compares_the_precision_accelerate_chose(tiny_pipeline_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert main(erase_args(tiny_pipeline_dir, out, "-q", "--checkpoint-every", "1")) == 0
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    argv = erase_args(tiny_pipeline_dir, out, "-q", "--resume", "latest", "--steps", "4")
    assert main(argv) == 2  # launched without bf16 this time: other settings
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert main(argv) == 0


def test_two_erasures_with_other_precisions_in_one_process(tiny_pipeline_dir, tmp_path):
    """A notebook: accelerate's process-wide state must not refuse the second call."""
    common = dict(model=str(tiny_pipeline_dir), concepts=["a cat", "a dog"], steps=2)
    common.update(sample_steps=2, checkpoint_every=0)
    for i, precision in enumerate(("bf16", "no", "bf16")):
        erase(EraseConfig(out=str(tmp_path / str(i)), mixed_precision=precision, **common))
        assert _saved(tmp_path / str(i))["mixed_precision"] == precision


def test_a_failed_start_does_not_block_the_corrected_command(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(erase_args(tmp_path / "typo", out, "-q")) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(erase_args(tiny_pipeline_dir, out, "-q")) == 0  # no --overwrite needed
    assert (out / "erased.safetensors").is_file()
    # a finished run, and a folder holding a user's file, are still refused
    assert main(erase_args(tiny_pipeline_dir, out, "-q")) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    other = tmp_path / "theirs"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(erase_args(tmp_path / "typo", other, "-q")) == 2
    assert (other / "notes.txt").read_text() == "mine"


def test_a_config_of_another_folder_is_not_taken_for_a_failed_start(tiny_pipeline_dir, tmp_path):
    """An erase_config.json copied from another run is the user's file, not a failed start."""
    first = tmp_path / "first"
    assert main(erase_args(tiny_pipeline_dir, first, "-q")) == 0
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "erase_config.json").write_bytes((first / "erase_config.json").read_bytes())
    assert main(erase_args(tiny_pipeline_dir, copy, "-q")) == 2


SCRIPT = """
import sys
sys.modules["fcntl"] = None  # as on Windows: importing it fails
from loreun.cli.main import main
code = main(sys.argv[1:])
assert "fcntl" not in sys.modules or sys.modules["fcntl"] is None
sys.exit(code)
"""


@pytest.mark.slow
def test_generate_and_erase_run_without_fcntl(tiny_pipeline_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    gen = ["generate", "--model", str(tiny_pipeline_dir), "--prompts", str(prompts)]
    gen += ["--steps", "2", "--samples-per-prompt", "1", "--size", "32", "-q"]
    for argv in (
        gen + ["--out", str(tmp_path / "g")],
        erase_args(tiny_pipeline_dir, tmp_path / "e"),
    ):
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, *argv], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "g" / "images").glob("*.png"))) == 1
    assert (tmp_path / "e" / "erased.safetensors").is_file()


def test_the_filelock_fallback_refuses_a_second_holder(tmp_path, monkeypatch):
    from loreun.pipelines import files

    monkeypatch.setattr(files, "fcntl", None)
    with files.FolderLock(tmp_path):
        with pytest.raises(FileExistsError, match="is in use by another loreun run"):
            files.FolderLock(tmp_path).acquire()
    files.FolderLock(tmp_path).acquire().release()  # free again once released
