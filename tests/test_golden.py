"""Golden erased weights: the SHA-256 of the trained tensors of a tiny SD 1.x, SD 2.x (v-prediction)
and SDXL erasure from fixed seeds.

They pin the numbers a refactoring must not change: the noise schedule, the samplers, the prompt
encoding, the objectives, the weighting and the optimizer step. The hash covers the tensors' names,
dtypes, shapes and bytes in name order, not the file's header, which also records the package
version. The erasure runs on one thread, since the thread count changes how float sums are split.
A change that moves them on purpose updates them in the same commit and says why.
"""

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from loreun.cli.main import main

from .conftest import erase_args

GOLDEN = {
    "sd1": "5c5760e27d8e6678b801588eb22d92a32cb04e03f27224a7e728f7cead519b71",
    "sd2": "638c3e792d7def09c654027ca176e9ee59e727cde73b5c67a71ba46bbe000053",
    "sdxl": "922f86301f1bf3b2cb000c0a971d68f236c62a29f21537f1f732a9cb8024d0d0",
}

# Each family through a different path: partial sampling with the in-batch variant, GA with a
# retain term under the velocity target and the dynamic variant, cached x_t with the static one.
RECIPES = {
    "sd1": (
        "--method",
        "esd-x",
        "--xt-source",
        "partial-train",
        "--loreun-variant",
        "batch",
        "--batch-size",
        "2",
    ),
    "sd2": ("--objective", "ga", "--retain-concept", "a bird", "--loreun-variant", "dynamic"),
    "sdxl": ("--method", "esd-u", "--loreun-variant", "static"),
}


def tensor_digest(path) -> str:
    """SHA-256 over each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from loreun.pipelines.tiny import save_tiny_pipeline, save_tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("golden")
    return {
        "sd1": save_tiny_pipeline(root / "sd1", seed=3),
        "sd2": save_tiny_pipeline(root / "sd2", seed=4, prediction_type="v_prediction"),
        "sdxl": save_tiny_sdxl_pipeline(root / "sdxl", seed=5),
    }


@pytest.fixture
def one_thread():
    """Float sums are split across threads, so the bytes depend on the thread count: pin it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("family", sorted(GOLDEN))
def test_erased_tensors_match_their_golden_hash(family, family_dirs, tmp_path, one_thread):
    out = tmp_path / family
    # -1: LoReUn's own weights, not the uniform fallback a random tiny model's noisy
    # difficulty gets (what these hashes pin is the arithmetic, not that guard)
    args = erase_args(
        family_dirs[family],
        out,
        "--weighting",
        "loreun",
        "--min-reliability",
        "-1",
        "--seed",
        "11",
        "-q",
    )
    assert main(args + list(RECIPES[family])) == 0
    digest = tensor_digest(out / "unet-erased.safetensors")
    assert digest == GOLDEN[family]
