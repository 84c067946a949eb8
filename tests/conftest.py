import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny random SD pipeline saved as a diffusers folder, shared by the session."""
    from loreun.pipelines.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def other_pipeline_dir(tmp_path_factory):
    """Same configuration, different random weights: a different base model."""
    from loreun.pipelines.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "other-sd", seed=1)


@pytest.fixture
def tiny_unet():
    from loreun.pipelines.tiny import make_tiny_pipeline

    return make_tiny_pipeline(seed=0).unet


def _erase_base(model, out):
    return ["erase", "--model", str(model), "--out", str(out)]


def erase_args(model, out, *extra):
    """argv for a fast erase on a tiny pipeline."""
    return _erase_base(model, out) + [
        "--concept",
        "a cat",
        "--concept",
        "a dog",
        "--steps",
        "3",
        "--sample-steps",
        "3",
        "--lr",
        "1e-3",
        *map(str, extra),
    ]


def erase_cli(model, out, *extra):
    """argv for an erase whose forget items and settings the test gives, without checkpoints."""
    return _erase_base(model, out) + ["--checkpoint-every", "0", *map(str, extra)]
