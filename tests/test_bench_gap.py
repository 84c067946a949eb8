"""The diffusion gap bench compares each prompt row with the retrain model's same row."""

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gap", ROOT / "scripts/bench_gap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _audit_csv(path: Path, rows: list[tuple[str, str, bool]]) -> Path:
    """An audit results.csv with the columns the bench reads: (id, class, top-1 correct)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["source", "path", "id", "class", "seed", "digits_top1_correct"])
        for n, (i, c, ok) in enumerate(rows):
            w.writerow(["m", f"images/{n}.png", i, c, n, str(ok)])
    return path


def test_prompt_gap_does_not_let_rows_cancel(tmp_path):
    bench = _bench()
    # two prompts of the erased digit 3, one of digit 5; two images each
    run = _audit_csv(
        tmp_path / "run.csv",
        [("0", "3", True), ("0", "3", True), ("1", "3", False), ("1", "3", False),
         ("2", "5", True), ("2", "5", False)],
    )  # fmt: skip
    ref = _audit_csv(
        tmp_path / "ref.csv",
        [("0", "3", False), ("0", "3", False), ("1", "3", True), ("1", "3", True),
         ("2", "5", True), ("2", "5", True)],
    )  # fmt: skip
    acc = bench.prompt_accuracy(run)
    assert acc == {"0": ("3", 1.0), "1": ("3", 0.0), "2": ("5", 0.5)}
    # the digit's accuracy is 0.5 for both models (Avg. Gap's forget term is 0); per row it is 1
    gap = bench.prompt_gap(acc, bench.prompt_accuracy(ref), 3)
    assert gap == pytest.approx((1.0 + 0.5) / 2)


def test_prompt_gap_refuses_different_prompt_rows(tmp_path):
    bench = _bench()
    run = bench.prompt_accuracy(_audit_csv(tmp_path / "a.csv", [("0", "3", True)]))
    ref = bench.prompt_accuracy(_audit_csv(tmp_path / "b.csv", [("1", "3", True)]))
    with pytest.raises(ValueError, match="different prompt rows"):
        bench.prompt_gap(run, ref, 3)


def test_run_dir_names_a_run_by_its_planned_key():
    bench = _bench()
    key = {"digit": 3, "objective": "ga", "method": "esd-u", "weighting": "uniform",
           "source": "images", "saliency": "none", "seed": 0}  # fmt: skip
    assert bench.run_dir(Path("r"), key) == Path("r/3-ga-esd-u-uniform-images-none-0")
    assert bench.run_dir(Path("r"), {**key, "recipe": "lora-r4"}).name.endswith("-0-lora-r4")
    assert bench.run_dir(Path("r"), {**key, "recipe": "default"}).name.endswith("-none-0")


def test_a_rerun_with_another_lr_steps_or_ess_is_another_run(tmp_path):
    """The rerun key and the folder carry the settings that make a run (a recipe's own lr
    included), so a rerun at another lr neither skips nor overwrites the first one's."""
    import argparse

    bench = _bench()
    key = {"digit": 3, "objective": "esd", "method": "esd-x", "weighting": "loreun",
           "source": "cached", "saliency": "none", "seed": 0}  # fmt: skip
    a = argparse.Namespace(steps=150, lr=1e-4, target_ess=0.5)
    one = {**key, **bench.run_settings(key, a)}
    other = {
        **key,
        **bench.run_settings(key, argparse.Namespace(steps=150, lr=1e-3, target_ess=0.5)),
    }
    assert one != other and bench.run_dir(tmp_path, one) != bench.run_dir(tmp_path, other)
    assert bench.run_dir(tmp_path, one).name.endswith("-0-lr0.0001-150steps-ess0.5")
    lora = {**key, "recipe": "lora-r4"}
    assert bench.run_settings(lora, a)["lr"] == 1e-3  # the recipe's own lr is the one recorded
    uniform = {**key, "weighting": "uniform"}
    assert bench.run_settings(uniform, a)["target_ess"] is None
