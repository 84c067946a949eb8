"""Adversarial erasure: the pool grows as configured, lives in the checkpoint (a resume is
bit-exact), and every prompt in it is what ``loreun attack``'s optimisation finds."""

import json

import pytest
import torch
from safetensors.torch import load_file

from loreun.cli.main import main
from loreun.erase import EraseConfig

from .conftest import erase_args

ADV = (
    "--adversarial", "--adversarial-every", "2", "--adversarial-pool", "2",
    "--adversarial-steps", "2", "--adversarial-batch", "2",
)  # fmt: skip


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_the_pool_grows_every_k_steps_up_to_its_size(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "o"
    argv = erase_args(tiny_pipeline_dir, out, *ADV, "--steps", "7", "--checkpoint-every", "7", "-q")
    assert main(argv) == 0
    log = _log(out)
    # attacks before steps 2, 4 and 6 (0-based); a record's "step" counts the steps done
    assert [r["pool"] for r in log] == [0, 0, 1, 1, 2, 2, 2]
    found = [r["step"] for r in log if "adversarial_prompt" in r]
    assert found == [3, 5, 7]
    assert all(r["adversarial_prompt"].strip() for r in log if "adversarial_prompt" in r)
    state = json.loads((out / "checkpoints" / "checkpoint-7" / "state.json").read_text())
    entries = state["adversarial"]["entries"]
    assert [e["step"] for e in entries] == [4, 6]  # the oldest (step 2) left the full pool
    assert all(list(e["token_ids"]) == ["text_encoder"] for e in entries)
    assert len({len(e["token_ids"]["text_encoder"]) for e in entries}) == 1


def test_a_resumed_adversarial_run_is_bit_exact(tiny_pipeline_dir, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = [*ADV, "--checkpoint-every", "3", "-q"]
    assert main(erase_args(tiny_pipeline_dir, whole, *common, "--steps", "7")) == 0
    assert main(erase_args(tiny_pipeline_dir, split, *common, "--steps", "3")) == 0
    saved = json.loads((split / "checkpoints" / "checkpoint-3" / "state.json").read_text())
    assert len(saved["adversarial"]["entries"]) == 1  # found before step 2
    argv = erase_args(tiny_pipeline_dir, split, *common, "--steps", "7", "--resume", "latest")
    assert main(argv) == 0
    a = load_file(str(whole / "erased.safetensors"))
    b = load_file(str(split / "erased.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    prompts = [[r.get("adversarial_prompt") for r in _log(o)] for o in (whole, split)]
    assert prompts[0] == prompts[1]


def test_the_attack_leaves_no_gradient_on_the_trained_tensors():
    """The attack differentiates through the model being erased; the next step must see only
    its own gradient, and the tensors must train again after it."""
    from loreun.erase.adversarial import attacking, find_prompt
    from loreun.pipelines.attack_settings import AttackSettings
    from loreun.pipelines.schedule import schedule_of
    from loreun.pipelines.tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline()
    trained = dict(list(pipe.unet.named_parameters())[:4])
    pipe.unet.requires_grad_(False)
    for p in trained.values():
        p.requires_grad_(True)
    target = torch.randn(1, 4, 8, 8)
    with attacking(pipe, trained, "cpu"):
        ids, text, loss = find_prompt(
            pipe, schedule_of(pipe), "a cat", target, AttackSettings(steps=2), seed=3
        )
    assert all(p.grad is None and p.requires_grad for p in trained.values())
    assert all(p.grad is None for p in pipe.text_encoder.parameters())
    assert ids["text_encoder"].shape == (1, pipe.tokenizer.model_max_length) and loss > 0


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"adversarial_every": 0}, "--adversarial-every: must be >= 1, got 0"),
        ({"adversarial_pool": 0}, "--adversarial-pool: must be in 1..10000, got 0"),
        (
            {"adversarial": True, "weighting": "loreun", "adversarial_batch": 1},
            "--adversarial-batch: LoReUn weighs the pool's prompts within each batch",
        ),
        (
            {"adversarial": True, "weighting": "loreun", "xt_source": "partial-base"},
            "--adversarial with --weighting loreun: the pool's difficulty",
        ),
    ],
)
def test_adversarial_settings_are_checked_before_the_model_loads(extra, needle):
    with pytest.raises(ValueError, match=f"^{needle}"):
        EraseConfig(model="m", out="o", concepts=["a", "b"], **extra)


ENCODERS = {
    "sdxl": ["text_encoder", "text_encoder_2"],
    "sd3": ["text_encoder", "text_encoder_2"],
    "flux": ["text_encoder", "text_encoder_2"],
}


@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_adversarial_erasure_runs_on_every_family_and_resumes(kind, tmp_path):
    """The pool holds each prompt's ids for every encoder that reads it, and a resume rebuilds
    the pool's conditionings (SDXL's and the flow models' pooled ones too) exactly."""
    from loreun.pipelines.tiny import save_tiny_flow_pipeline, save_tiny_sdxl_pipeline

    model = tmp_path / kind
    save_tiny_sdxl_pipeline(model) if kind == "sdxl" else save_tiny_flow_pipeline(model, kind)
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = [*ADV, "--checkpoint-every", "3", "--sample-steps", "2", "-q"]
    assert main(erase_args(model, whole, *common, "--steps", "5")) == 0
    assert main(erase_args(model, split, *common, "--steps", "3")) == 0
    argv = erase_args(model, split, *common, "--steps", "5", "--resume", "latest")
    assert main(argv) == 0
    state = json.loads((whole / "checkpoints" / "checkpoint-3" / "state.json").read_text())
    entries = state["adversarial"]["entries"]
    assert entries and all(sorted(e["token_ids"]) == ENCODERS[kind] for e in entries)
    a = load_file(str(whole / "erased.safetensors"))
    b = load_file(str(split / "erased.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["pool"] for r in _log(whole)] == [0, 0, 1, 1, 2]


def test_adversarial_erasure_runs_on_a_v_prediction_model(tmp_path):
    """SD 2.x's v-prediction: the attack's target and the pool's objective follow the
    schedule's own target, so the same flags work."""
    from loreun.pipelines.tiny import save_tiny_pipeline

    model = save_tiny_pipeline(tmp_path / "sd2", prediction_type="v_prediction")
    out = tmp_path / "o"
    assert main(erase_args(model, out, *ADV, "--steps", "3", "-q")) == 0
    log = _log(out)
    assert [r["pool"] for r in log] == [0, 0, 1] and "adversarial_prompt" in log[2]


def test_loreun_weighs_the_pool_by_its_batch(tiny_pipeline_dir, tmp_path):
    """With --weighting loreun the pool gets LoReUn's batch form, whose normaliser is in the
    checkpoint with the pool."""
    out = tmp_path / "o"
    extra = ["--weighting", "loreun", "--min-reliability", "-1", "--checkpoint-every", "3"]
    assert main(erase_args(tiny_pipeline_dir, out, *ADV, *extra, "--steps", "3", "-q")) == 0
    state = json.loads((out / "checkpoints" / "checkpoint-3" / "state.json").read_text())
    assert len(state["adversarial"]["entries"]) == 1
    assert "timestep_means" in state["adversarial"]["weighting"]


@pytest.mark.parametrize("kind", ["sd", "flux"])
def test_the_embedding_attack_in_the_loop_trains_the_text_encoder_and_resumes(
    kind, tiny_pipeline_dir, tmp_path
):
    """--adversarial-attack embedding with --train text-encoder: each pool entry holds its
    found prefix embeddings per encoder; the student reads them through the training encoders;
    a resume rebuilds the pool from them and ends where the whole run ends."""
    from loreun.pipelines.tiny import save_tiny_flow_pipeline

    model = tiny_pipeline_dir if kind == "sd" else save_tiny_flow_pipeline(tmp_path / kind, kind)
    extra = ["--adversarial-attack", "embedding", "--train", "text-encoder"]
    common = [*ADV, *extra, "--checkpoint-every", "3", "--sample-steps", "2", "-q"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(erase_args(model, whole, *common, "--steps", "5")) == 0
    assert main(erase_args(model, split, *common, "--steps", "3")) == 0
    argv = erase_args(model, split, *common, "--steps", "5", "--resume", "latest")
    assert main(argv) == 0
    state = json.loads((whole / "checkpoints" / "checkpoint-3" / "state.json").read_text())
    (entry,) = state["adversarial"]["entries"]
    assert sorted(entry["embeddings"]) == sorted(entry["token_ids"])
    assert all(len(v) == 5 for v in entry["embeddings"].values())  # --adversarial-tokens
    assert entry["text"].startswith("<5 embeddings> ")
    a = load_file(str(whole / "erased.safetensors"))
    b = load_file(str(split / "erased.safetensors"))
    assert all(k.startswith("text_encoder") for k in a)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
