import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI draws the same examples on every run, so a red build is reproducible and never a fluke of
# the draw; locally each run draws new ones, which is how the property tests find new cases.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

ROOT = Path(__file__).resolve().parents[1]

# One of the kernel settings scripts/numerics_check.py runs the numerics tests under.
if os.environ.get("LOREUN_TEST_ONEDNN") == "0":
    import torch

    torch.backends.mkldnn.enabled = False


def external_prompts_dir() -> Path:
    """The team's shared prompt files sit in ``shared/`` beside the checkout.

    A clone made elsewhere (``git clone . /tmp/x``) finds them beside the repository it was
    cloned from, or at ``$LOREUN_SHARED_DIR``.
    """
    candidates = [ROOT.parent / "shared"]
    if os.environ.get("LOREUN_SHARED_DIR"):
        candidates.insert(0, Path(os.environ["LOREUN_SHARED_DIR"]))
    origin = subprocess.run(
        ["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if origin and Path(origin).is_dir():
        candidates.append(Path(origin).resolve().parent / "shared")
    found = [c / "prompts-external" for c in candidates if (c / "prompts-external").is_dir()]
    return found[0] if found else candidates[0] / "prompts-external"


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


QUIET_ENV = ("LOREUN_QUIET", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")
# As the session started: a module-scoped fixture that runs ``main([..., "-q"])`` sets them
# before any test's own snapshot is taken, so each test is restored to these instead.
SESSION_ENV = {k: os.environ.get(k) for k in QUIET_ENV}


@pytest.fixture(autouse=True)
def _restore_verbosity_env():
    """``main([..., "-q"])`` run in-process sets LOREUN_QUIET and the libraries' verbosity in
    os.environ, as it must for a real process; put them back so no test inherits another's."""
    yield
    for key, value in SESSION_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def assert_same_images(a: Path, b: Path) -> None:
    """Two generation folders hold the same image for every manifest key.

    Same means within one 8-bit level on a few pixels, not the same bytes: a batch of 4 and a
    batch of 1 (or a resumed run's different batches) go through other GEMM blockings, which
    round differently on some kernels (baseline SSE, two threads, oneDNN: at most 1 level on
    0.007% of the pixels, ``scripts/numerics_check.py``). Different seeds or settings change
    most pixels by far more.
    """
    import numpy as np
    from PIL import Image

    from loreun.pipelines.generate import read_manifest

    def images(out):
        recs = read_manifest(out)
        return {r["key"]: np.asarray(Image.open(out / r["path"])).astype(int) for r in recs}

    x, y = images(a), images(b)
    assert x.keys() == y.keys(), sorted(set(x) ^ set(y))
    for key in x:
        diff = np.abs(x[key] - y[key])
        assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (key, diff.max(), (diff > 0).mean())
