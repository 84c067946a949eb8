"""LoReUn on a single concept: per-sample items, refusals, ESS in the log, tau in the header."""

import json

import pytest
from safetensors import safe_open

from loreun.cli.main import main
from loreun.pipelines.loading import METADATA_KEY

from .conftest import erase_cli


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _header(out):
    with safe_open(str(out / "erased.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()[METADATA_KEY])


@pytest.mark.parametrize("variant", ["static", "dynamic"])
def test_single_concept_weighs_one_item_per_sample(tiny_pipeline_dir, tmp_path, variant):
    out = tmp_path / "o"
    args = erase_cli(tiny_pipeline_dir, out, "--concept", "a cat", "--samples-per-concept", "6")
    args += ["--steps", "4", "--sample-steps", "2", "--batch-size", "3", "--lr", "1e-3"]
    args += ["--weighting", "loreun", "--target-ess", "0.5", "--loreun-variant", variant]
    # a random tiny model's difficulty is noise; -1 keeps LoReUn's weights regardless
    assert main(args + ["--min-reliability", "-1"]) == 0
    rows = _log(out)
    assert all(0 < r["ess_fraction"] < 0.999 for r in rows)  # weights really differ
    assert all(-1 <= r["difficulty_reliability"] <= 1 for r in rows)
    if variant == "static":  # the memory stays at its fill: 0.5 of the 6 items
        assert all(r["ess"] == pytest.approx(3.0, abs=0.01) for r in rows)
    else:
        assert -1 <= rows[-1]["memory_rank_corr"] <= 1
    chosen = _header(out)["weighting_chosen"]
    assert chosen["num_items"] == 6 and 0 < chosen["temperature"] < 1e6


def test_an_unreliable_difficulty_falls_back_to_uniform_weights(
    tiny_pipeline_dir, tmp_path, capsys
):
    out = tmp_path / "o"
    args = erase_cli(tiny_pipeline_dir, out, "--concept", "a cat", "--samples-per-concept", "6")
    args += ["--steps", "2", "--sample-steps", "2", "--batch-size", "3", "--lr", "1e-3"]
    args += ["--weighting", "loreun", "--temperature", "0.01", "--probe-times", "4"]
    assert main(args + ["--min-reliability", "1"]) == 0
    assert "below --min-reliability 1.0: the memory is mostly noise" in capsys.readouterr().err
    assert all(r["ess_fraction"] == 1.0 for r in _log(out))
    chosen = _header(out)["weighting_chosen"]
    assert chosen["fell_back_to_uniform"] is True and chosen["temperature"] == "inf"


def test_batch_variant_logs_ess_over_the_batch(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "o"
    args = erase_cli(tiny_pipeline_dir, out, "--concept", "a cat", "--samples-per-concept", "4")
    args += ["--steps", "2", "--sample-steps", "2", "--batch-size", "2", "--lr", "1e-3"]
    args += ["--weighting", "loreun", "--loreun-variant", "batch", "--temperature", "0.01"]
    assert main(args) == 0
    rows = _log(out)
    assert all(1 <= r["ess"] <= 2 and r["ess_fraction"] == r["ess"] / 2 for r in rows)
    assert any(r["ess"] < 1.99 for r in rows)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (
            ["--samples-per-concept", "1"],
            "--weighting loreun: needs at least 2 forget items, and 1 concept x 1 sample gives 1",
        ),
        (["--loreun-variant", "batch"], "--loreun-variant batch: a softmax over one item"),
        (["--target-ess", "1.5"], "--target-ess: must be in (0, 1]"),
    ],
)
def test_loreun_settings_that_cannot_weigh_are_refused(tmp_path, capsys, flags, needle):
    args = erase_cli(tmp_path / "no-model", tmp_path / "out", "--concept", "a cat")
    code = main(args + ["--weighting", "loreun", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0]
    assert not (tmp_path / "out").exists()


def test_one_forget_image_is_refused_before_the_model_loads(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "one"
    folder.mkdir()
    Image.new("RGB", (16, 16), "white").save(folder / "a.png")
    args = erase_cli(tmp_path / "no-model", tmp_path / "out", "--forget-images", folder)
    code = main(args + ["--forget-caption", "a cat", "--objective", "ga", "--weighting", "loreun"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "holds 1 image" in err[0]


def test_the_probe_runs_once_and_only_where_weights_can_differ(
    tiny_pipeline_dir, tmp_path, monkeypatch
):
    from loreun.erase import trainer

    calls = []
    real = trainer.probe_grid
    monkeypatch.setattr(trainer, "probe_grid", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "o"
    args = erase_cli(tiny_pipeline_dir, out, "--concept", "a cat", "--sample-steps", "2")
    args += ["--weighting", "loreun", "--checkpoint-every", "2", "--lr", "1e-3"]
    assert main(args + ["--steps", "2"]) == 0 and len(calls) == 1
    assert main(args + ["--steps", "4", "--resume", "latest"]) == 0 and len(calls) == 1
    inf = erase_cli(tiny_pipeline_dir, tmp_path / "inf", "--concept", "a cat", "--steps", "1")
    assert main(inf + ["--weighting", "loreun", "--temperature", "inf"]) == 0
    assert len(calls) == 1  # tau = inf: every weight is 1, nothing to probe
