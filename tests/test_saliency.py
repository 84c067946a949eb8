"""Saliency masks, the forget-set loader, and erasing from image folders end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from loreun.cli.main import main
from loreun.erase.saliency import top_fraction_mask
from loreun.erase.streams import item_ids

from .conftest import erase_cli


def test_mask_keeps_exactly_the_top_fraction_with_ties():
    scores = {"a": torch.tensor([3.0, 1.0, 1.0, 1.0]), "b": torch.tensor([[1.0, 0.0], [2.0, 5.0]])}
    mask = top_fraction_mask(scores, 0.5)
    # sorted: 5 3 2 1 1 1 1 0 -> keep 5, 3, 2 and the first 1 by position (a[1])
    assert mask["a"].tolist() == [True, True, False, False]
    assert mask["b"].tolist() == [[False, False], [True, True]]
    assert all(m.all() for m in top_fraction_mask(scores, 1.0).values())


@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.5, 0.99])
def test_mask_count_and_order_on_random_scores(fraction):
    g = torch.Generator().manual_seed(0)
    scores = {
        "w": torch.rand(37, 11, generator=g).round(decimals=1),  # many ties
        "b": torch.rand(50, generator=g),
    }
    mask = top_fraction_mask(scores, fraction)
    flat_s = torch.cat([scores[n].flatten() for n in scores])
    flat_m = torch.cat([mask[n].flatten() for n in scores])
    assert int(flat_m.sum()) == round(fraction * flat_s.numel())
    assert flat_s[flat_m].min() >= flat_s[~flat_m].max()


def test_every_item_is_visited_once_per_pass():
    n, b = 7, 3
    ids = torch.cat([item_ids(n, b, seed=4, rank=0, step=s) for s in range(14)])  # 6 passes
    for p in range(len(ids) // n):
        assert sorted(ids[p * n : (p + 1) * n].tolist()) == list(range(n))
    retain = torch.cat([item_ids(n, b, seed=4, rank=0, step=s, stream=1) for s in range(14)])
    assert not torch.equal(ids, retain)  # the retain set has its own order
    assert sorted(retain[:n].tolist()) == list(range(n))


def _images(root, n, caption=None, seed=0):
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        arr = rng.integers(0, 255, (24 + 4 * i, 20, 3), dtype=np.uint8)  # mixed sizes
        Image.fromarray(arr).save(root / f"x{i}.png")
        rows.append(json.dumps({"file_name": f"x{i}.png", "text": caption or f"a cat {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows))
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    return _images(root / "forget", 4), _images(root / "retain", 3, caption="a dog", seed=1)


def _trained_base(tiny_pipeline_dir, names):
    state = load_file(str(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    return {n: state[n] for n in names}


@pytest.mark.parametrize("objective", ["remap", "ga", "esd"])
def test_masked_weights_stay_bit_identical_under_weight_decay(
    tiny_pipeline_dir, tmp_path, folders, objective
):
    forget, retain = folders
    out = tmp_path / objective
    anchor = ["--anchor", "a bird"] if objective == "remap" else []
    code = main(
        erase_cli(tiny_pipeline_dir, out, "--forget-images", forget, "--retain-images", retain)
        + ["--objective", objective, *anchor, "--steps", "3", "--lr", "1e-2"]
        + ["--saliency", "0.3", "--weight-decay", "0.5", "--method", "esd-x"]
    )
    assert code == 0
    mask = load_file(str(out / "saliency-mask.safetensors"))
    erased = load_file(str(out / "erased.safetensors"))
    base = _trained_base(tiny_pipeline_dir, erased)
    kept = sum(int(m.sum()) for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    assert kept == round(0.3 * total)
    for name, m in mask.items():
        assert torch.equal(erased[name][~m], base[name][~m]), name
    changed = sum(int((erased[n][m] != base[n][m]).sum()) for n, m in mask.items())
    assert changed > 0.9 * kept


def test_saved_mask_is_reused_and_checked(tiny_pipeline_dir, tmp_path, folders, capsys):
    forget, _ = folders
    first = tmp_path / "first"
    base_args = ["--forget-images", forget, "--objective", "ga", "--steps", "2", "--lr", "1e-2"]
    assert main(erase_cli(tiny_pipeline_dir, first, *base_args, "--saliency", "0.2")) == 0
    mask_path = first / "saliency-mask.safetensors"
    second = tmp_path / "second"
    assert main(erase_cli(tiny_pipeline_dir, second, *base_args, "--saliency-mask", mask_path)) == 0
    mask = load_file(str(mask_path))
    erased = load_file(str(second / "erased.safetensors"))
    base = _trained_base(tiny_pipeline_dir, erased)
    assert all(torch.equal(erased[n][~m], base[n][~m]) for n, m in mask.items())
    capsys.readouterr()
    code = main(
        erase_cli(tiny_pipeline_dir, tmp_path / "third", *base_args, "--saliency-mask", mask_path)
        + ["--method", "esd-u"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "covers other parameters" in err[-1]


def test_loader_visits_every_forget_image(tiny_pipeline_dir, tmp_path, folders, monkeypatch):
    from loreun.erase.weighting import LoReUnWeighting

    seen = []
    real = LoReUnWeighting.observe

    def record(self, ids, t, loss):
        seen.extend(ids.tolist())
        return real(self, ids, t, loss)

    monkeypatch.setattr(LoReUnWeighting, "observe", record)
    forget, _ = folders
    code = main(
        erase_cli(tiny_pipeline_dir, tmp_path / "o", "--forget-images", forget, "--objective", "ga")
        + ["--steps", "6", "--batch-size", "2", "--weighting", "loreun"]
    )
    assert code == 0
    assert sorted(seen[:4]) == sorted(seen[4:8]) == [0, 1, 2, 3]


def _assert_rerun_reuses(args, cache, items_and_samples):
    """The cache holds [N, S, ...] latents and a rerun into the same folder leaves it alone."""
    assert load_file(str(cache))["x0"].shape[:2] == items_and_samples
    before = cache.stat().st_mtime_ns
    assert main(args + ["--overwrite"]) == 0
    assert cache.stat().st_mtime_ns == before


def test_folder_erase_exports_weights_that_load(tiny_pipeline_dir, tmp_path, folders):
    from loreun.pipelines import apply_erased_weights
    from loreun.pipelines.models import load_pipeline

    forget, retain = folders
    out = tmp_path / "o"
    args = erase_cli(tiny_pipeline_dir, out, "--forget-images", forget, "--retain-images", retain)
    args += ["--objective", "remap", "--anchor", "a bird", "--steps", "2", "--lr", "1e-3"]
    assert main(args) == 0
    _assert_rerun_reuses(args, out / "cache" / "forget-images.safetensors", (4, 1))
    pipe = load_pipeline(str(tiny_pipeline_dir))
    apply_erased_weights(pipe, out / "erased.safetensors")
    config = json.loads((out / "erase_config.json").read_text())
    assert config["forget_images"] == str(forget) and config["retain_weight"] == 1.0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    for row in log:  # the logged total is the forget term plus alpha times the retain mean
        assert row["retain"] > 0
        assert row["loss"] == pytest.approx(row["forget"] + 1.0 * row["retain"], rel=1e-5)


def test_retain_prompts_are_sampled_once_and_cached(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "o"
    args = erase_cli(tiny_pipeline_dir, out, "--concept", "a cat", "--retain-concept", "a dog")
    args += ["--steps", "2", "--sample-steps", "2", "--objective", "ga", "--lr", "1e-3"]
    assert main(args) == 0
    _assert_rerun_reuses(args, out / "cache" / "retain-latents.safetensors", (1, 8))


def test_resumed_run_keeps_its_mask(tiny_pipeline_dir, tmp_path, folders):
    forget, _ = folders
    out = tmp_path / "o"
    args = erase_cli(tiny_pipeline_dir, out, "--forget-images", forget, "--objective", "ga")
    args += ["--lr", "1e-2", "--saliency", "0.4", "--checkpoint-every", "1"]
    assert main(args + ["--steps", "2"]) == 0
    mask_file = out / "saliency-mask.safetensors"
    written = mask_file.stat().st_mtime_ns
    assert main(args + ["--steps", "4", "--resume", "latest"]) == 0
    assert mask_file.stat().st_mtime_ns == written
    mask = load_file(str(mask_file))
    erased = load_file(str(out / "erased.safetensors"))
    base = _trained_base(tiny_pipeline_dir, erased)
    assert all(torch.equal(erased[n][~m], base[n][~m]) for n, m in mask.items())


def _saved_mask(tmp_path, key, **tensors):
    from loreun.erase.saliency import save_mask

    path = tmp_path / "mask.safetensors"
    save_mask(path, tensors, key)
    return path


@pytest.mark.parametrize(
    "key, tensors, needle",
    [
        (
            {"base_fingerprint": "sha256:other"},
            {"w": torch.ones(2, 3, dtype=torch.bool)},
            "another base",
        ),
        ({"base_fingerprint": "sha256:base"}, {"w": torch.ones(2, 3)}, "wrong shape or type"),
        (
            {"base_fingerprint": "sha256:base"},
            {"w": torch.ones(3, 2, dtype=torch.bool)},
            "wrong shape",
        ),
        (
            {"base_fingerprint": "sha256:base"},
            {"v": torch.ones(2, 3, dtype=torch.bool)},
            "other parameters",
        ),
    ],
)
def test_a_saved_mask_must_fit_this_base_and_its_tensors(tmp_path, key, tensors, needle):
    from loreun.erase.saliency import load_mask

    trained = {"w": torch.zeros(2, 3)}
    path = _saved_mask(tmp_path, key, **tensors)
    with pytest.raises(ValueError, match=needle):
        load_mask(path, trained, "sha256:base", "--saliency-mask")
    good = _saved_mask(tmp_path, {"base_fingerprint": "sha256:base"}, w=torch.eye(2, 3).bool())
    assert torch.equal(
        load_mask(good, trained, "sha256:base", "--saliency-mask")["w"], torch.eye(2, 3).bool()
    )


def test_mask_gradients_zeroes_exactly_the_masked_entries():
    from loreun.erase.saliency import mask_gradients

    w = torch.nn.Parameter(torch.zeros(2, 3))
    w.grad = torch.arange(1.0, 7.0).reshape(2, 3)
    mask = {"w": torch.tensor([[True, False, True], [False, False, True]])}
    mask_gradients({"w": w}, mask)
    assert w.grad.tolist() == [[1.0, 0.0, 3.0], [0.0, 0.0, 6.0]]


def test_mask_files_that_are_not_masks_are_named_errors(tmp_path):
    from safetensors.torch import save_file

    from loreun.erase.saliency import load_mask, mask_key

    trained = {"w": torch.zeros(2, 3)}
    flag = "--saliency-mask"
    with pytest.raises(FileNotFoundError, match=f"^{flag}: {tmp_path / 'none'}: no such file$"):
        load_mask(tmp_path / "none", trained, "sha256:base", flag)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match=f"^{flag}: {junk}: not a saliency mask \\(\\w+\\)$"):
        load_mask(junk, trained, "sha256:base", flag)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2, 3, dtype=torch.bool)}, str(plain))  # no loreun header
    with pytest.raises(ValueError, match=f"^{flag}: {plain}: not a loreun saliency mask$"):
        load_mask(plain, trained, "sha256:base", flag)
    assert mask_key(plain) is None and mask_key(tmp_path / "none") is None
    other = _saved_mask(tmp_path, {"method": "esd-u"}, v=torch.ones(1, dtype=torch.bool))
    with pytest.raises(ValueError, match="covers other parameters \\(made with --method esd-u\\)"):
        load_mask(other, trained, "sha256:base", flag)
    assert mask_key(other) == {"method": "esd-u"}


def test_the_same_seed_computes_the_same_mask(tiny_pipeline_dir, tmp_path, folders):
    forget, _ = folders
    masks = []
    for name in ("a", "b"):
        out = tmp_path / name
        args = ["--forget-images", forget, "--objective", "ga", "--steps", "1", "--saliency", "0.3"]
        assert main(erase_cli(tiny_pipeline_dir, out, *args)) == 0
        masks.append(load_file(str(out / "saliency-mask.safetensors")))
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
