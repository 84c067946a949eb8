"""A list of concepts: steps that grow with it, and each concept's own loss in the log."""

import json

import pytest
import torch

from loreun.cli.main import main
from loreun.erase import EraseConfig
from loreun.erase.concept_losses import (
    ConceptLosses,
    never_drawn,
    summary_lines,
    too_few_draws,
)

CONCEPTS = ["a handwritten 3", "a handwritten 7", "a handwritten 8"]


def test_steps_per_concept_sets_steps_and_reloads_to_the_same_config():
    cfg = EraseConfig(model="digits", out="o", concepts=CONCEPTS, steps_per_concept=40)
    assert cfg.steps == 120
    again = EraseConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg


@pytest.mark.parametrize(
    "extra, needle",
    [
        (dict(steps_per_concept=0), "--steps-per-concept: must be > 0"),
        (dict(steps_per_concept=5, objective="uce"), "--objective uce takes no steps"),
        (dict(steps_per_concept=5, concepts=[], forget_images="imgs"), "with --forget-images"),
    ],
)
def test_steps_per_concept_refusals_name_the_flag(extra, needle):
    with pytest.raises(ValueError, match=needle):
        EraseConfig(**{"model": "digits", "out": "o", "concepts": CONCEPTS, **extra})


def test_steps_and_steps_per_concept_together_are_refused_in_one_line(tmp_path, capsys):
    argv = ["erase", "--model", "digits", "--concept", "a", "--out", str(tmp_path / "o")]
    assert main([*argv, "--steps", "3", "--steps-per-concept", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["loreun erase: error: --steps-per-concept: give it or --steps, not both"]
    assert not (tmp_path / "o").exists()


def test_pop_gives_each_concept_the_mean_of_its_items_this_step():
    log = ConceptLosses(["a", "a", "b", "c"])
    log.add(torch.tensor([0, 2]), torch.tensor([1.0, 4.0]))
    log.add(torch.tensor([1]), torch.tensor([3.0]))  # a second micro-batch of the same step
    assert log.pop() == {"a": 2.0, "b": 4.0}
    assert log.pop() == {}  # the next step starts empty


def test_summary_names_a_concept_that_was_never_drawn(tmp_path):
    log = tmp_path / "train_log.jsonl"
    records = [{"step": i, "concepts": {"a": 1.0 - 0.1 * i}} for i in range(8)]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert summary_lines(log, ["a", "b"])[1] == "  'a': 0.95 -> 0.35 (8 draws)"  # 2 of 8 each
    assert never_drawn(log, ["a", "b"]).startswith("1 of 2 concepts were never drawn: 'b'")
    assert never_drawn(log, ["a"]) is None


def test_too_few_draws_warns_before_training():
    few = EraseConfig(model="digits", out="o", concepts=CONCEPTS, steps=2)
    assert "draws 2 forget items for 3 concepts" in too_few_draws(few)
    assert too_few_draws(EraseConfig(model="digits", out="o", concepts=CONCEPTS, steps=3)) is None


def test_a_list_erasure_logs_each_concept_and_prints_its_loss(tmp_path, capsys):
    out = tmp_path / "run"
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("\n".join(CONCEPTS) + "\n")
    argv = ["erase", "--model", "digits", "--concepts-file", str(concepts), "--out", str(out)]
    assert main([*argv, "--steps-per-concept", "4", "--method", "esd-x", "--lr", "1e-4"]) == 0
    records = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(records) == 12  # 4 steps for each of 3 concepts
    drawn = [c for r in records for c in r["concepts"]]
    assert set(drawn) <= set(CONCEPTS) and all(len(r["concepts"]) == 1 for r in records)
    printed = capsys.readouterr().out.splitlines()
    assert sum(ln.startswith("forget loss by concept") for ln in printed) == 1
    per_concept = [ln for ln in printed if ln.startswith("  '")]
    assert len(per_concept) == len(set(drawn))
    assert json.loads((out / "erase_config.json").read_text())["steps"] == 12
