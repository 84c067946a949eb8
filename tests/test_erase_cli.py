import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from safetensors.torch import load_file

from loreun.cli.main import main
from loreun.erase import EraseConfig, objective_esd

from .conftest import erase_args


def _err(capsys):
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--method", "xattn"], "--method: unknown value 'xattn'; choose one of esd-x"),
        (["--steps", "0"], "--steps: must be > 0"),
        (["--lr", "-1"], "--lr: must be > 0"),
        (["--temperature", "0"], "--temperature: must be > 0"),
        (["--concept", "  "], "--concept: a concept is empty"),
        (["--weighting", "focal"], "--weighting: unknown value"),
        (["--resolution", "30"], "--resolution: must be a positive multiple of 8"),
        (["--concepts-file", "missing.txt"], "--concepts-file: missing.txt: no such file"),
    ],
)
def test_bad_flags_fail_before_loading(tmp_path, capsys, flags, needle):
    # The model does not exist: these errors must come before any model is touched.
    code = main(erase_args(tmp_path / "no-model", tmp_path / "out", *flags))
    err = _err(capsys)
    assert code == 2 and len(err) == 1 and needle in err[0]
    assert not (tmp_path / "out").exists()


def test_missing_model_path(tmp_path, capsys):
    assert main(erase_args(tmp_path / "nope", tmp_path / "out")) == 2
    assert "no such file or folder" in _err(capsys)[0]


def test_folder_that_is_not_a_pipeline(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "readme.txt").write_text("hi")
    assert main(erase_args(tmp_path / "model", tmp_path / "out")) == 2
    assert "not a diffusers pipeline folder" in _err(capsys)[0]


def test_hub_id_offline_fails_in_one_line(tmp_path, capsys):
    assert main(erase_args("someone/not-cached-model", tmp_path / "out")) == 2
    err = _err(capsys)
    assert len(err) == 1 and "could not load 'someone/not-cached-model'" in err[0]


def test_single_file_needs_config(tmp_path, capsys, tiny_pipeline_dir):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"")
    assert main(erase_args(ckpt, tmp_path / "out")) == 2
    assert "pass --config" in _err(capsys)[0]


def test_non_empty_output_is_refused_and_overwrite_keeps_foreign_files(
    tiny_pipeline_dir, tmp_path, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(erase_args(tiny_pipeline_dir, out)) == 2
    assert "is not empty; pass --overwrite" in _err(capsys)[0]
    assert main(erase_args(tiny_pipeline_dir, out, "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "erased.safetensors").is_file()


def test_yaml_config_file_with_flag_override(tiny_pipeline_dir, tmp_path, capsys):
    cfg = tmp_path / "erase.yaml"
    cfg.write_text(f"model: {tiny_pipeline_dir}\nconcepts: [a cat]\nconcepz: [a dog]\n")
    assert main(["erase", "--config-file", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert f"--config-file: {cfg}: unknown settings: concepz" in _err(capsys)[0]
    cfg.write_text(f"model: {tiny_pipeline_dir}\nconcept: [a cat]\nconcepts: [a dog]\n")
    assert main(["erase", "--config-file", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "concept and concepts are one setting" in _err(capsys)[0]
    cfg.write_text(
        f"model: {tiny_pipeline_dir}\nconcepts: [a cat]\nsteps: 2\nsample-steps: 2\nmethod: esd-u\n"
    )
    assert (
        main(
            [
                "erase",
                "--config-file",
                str(cfg),
                "--out",
                str(tmp_path / "o"),
                "--method",
                "esd-x-strict",
            ]
        )
        == 0
    )
    saved = json.loads((tmp_path / "o" / "erase_config.json").read_text())
    assert saved["method"] == "esd-x-strict" and saved["steps"] == 2


def test_resume_continues_the_step_count_exactly(tiny_pipeline_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--steps", "4", "--checkpoint-every", "2", "--weighting", "loreun"]
    assert main(erase_args(tiny_pipeline_dir, straight, *common)) == 0
    assert main(erase_args(tiny_pipeline_dir, split, *common[:1], "2", *common[2:])) == 0
    assert (split / "checkpoints" / "checkpoint-2").is_dir()
    assert main(erase_args(tiny_pipeline_dir, split, *common, "--resume", "latest")) == 0
    steps = [json.loads(line)["step"] for line in open(split / "train_log.jsonl")]
    assert steps == [1, 2, 3, 4]
    a = load_file(str(straight / "erased.safetensors"))
    b = load_file(str(split / "erased.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint(tiny_pipeline_dir, tmp_path, capsys):
    assert main(erase_args(tiny_pipeline_dir, tmp_path / "o", "--resume", "latest")) == 2
    err = _err(capsys)
    assert len(err) == 1 and "--resume latest: no checkpoint" in err[0]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    tiny_pipeline_dir, tmp_path, capsys, monkeypatch
):
    real = objective_esd.esd_loss
    calls = {"n": 0}

    def nan_after_two(student, teacher, batch, eta):
        calls["n"] += 1
        losses, pred = real(student, teacher, batch, eta)
        return (losses * float("nan") if calls["n"] > 2 else losses), pred

    monkeypatch.setattr(objective_esd, "esd_loss", nan_after_two)
    out = tmp_path / "o"
    code = main(erase_args(tiny_pipeline_dir, out, "--steps", "5", "--checkpoint-every", "2"))
    err = _err(capsys)
    assert code == 1 and "loss became nan at step 3" in err[-1]
    assert (out / "checkpoints" / "checkpoint-2" / "trained.safetensors").is_file()
    assert not (out / "erased.safetensors").exists()


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "o"
    argv = [
        sys.executable,
        "-m",
        "loreun.cli",
        *erase_args(tiny_pipeline_dir, out, "--steps", "100000", "--checkpoint-every", "0"),
    ]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    log = out / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume latest" in err
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1
    step = int(ckpts[0].name.split("-")[1])
    assert step >= 2
    assert (
        main(erase_args(tiny_pipeline_dir, out, "--steps", str(step + 2), "--resume", "latest"))
        == 0
    )
    steps = [json.loads(line)["step"] for line in open(log)]
    assert steps == list(range(1, step + 3))


@pytest.mark.parametrize("source", ["partial-train", "partial-base"])
def test_partial_sampling_sources(tiny_pipeline_dir, tmp_path, source):
    out = tmp_path / source
    assert (
        main(
            erase_args(
                tiny_pipeline_dir,
                out,
                "--xt-source",
                source,
                "--steps",
                "2",
                "--erase-from",
                "a bird",
                "--batch-size",
                "2",
            )
        )
        == 0
    )
    assert (out / "erased.safetensors").is_file()


def test_saved_config_reloads_to_the_same_config(tiny_pipeline_dir, tmp_path):
    """erase_config.json, given back as --config-file, is the same run (concepts not doubled)."""
    from loreun.erase.config import EraseConfig

    concepts = tmp_path / "concepts.txt"
    concepts.write_text("a cat\na dog\n")
    first = tmp_path / "first"
    argv = ["erase", "--model", str(tiny_pipeline_dir), "--concepts-file", str(concepts)]
    assert main(argv + ["--steps", "1", "--sample-steps", "2", "--out", str(first)]) == 0
    saved = json.loads((first / "erase_config.json").read_text())
    again = tmp_path / "again"
    cfg_file = first / "erase_config.json"
    assert main(["erase", "--config-file", str(cfg_file), "--out", str(again)]) == 0
    reloaded = json.loads((again / "erase_config.json").read_text())
    assert {**reloaded, "out": None} == {**saved, "out": None}
    assert saved["concepts"] == ["a cat", "a dog"]
    assert EraseConfig.from_dict(saved).to_json() == cfg_file.read_text()


def test_every_config_field_has_one_help_group():
    import dataclasses

    from loreun.cli.erase import GROUPS
    from loreun.erase.config import EraseConfig

    grouped = [name for names in GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(EraseConfig))


def test_config_choice_lists_match_the_slots():
    """config.py names the choices without importing torch; each list must be its slot's keys,
    and each slot module builds what its name says."""
    from loreun.erase import config, presets, weighting, xt_sources

    assert config.METHODS == presets.PRESET_NAMES
    assert config.XT_SOURCES == tuple(xt_sources.XT_SOURCES)
    assert config.OBJECTIVES == ("esd", "remap", "ga", "uce")
    closed = {n for n, m in config.OBJECTIVE_SLOTS.items() if m.CLOSED_FORM}
    assert closed == {"uce"}  # every objective says whether erase trains or solves
    for name in config.WEIGHTINGS:
        cfg = EraseConfig(model="m", out="o", concepts=["a", "b"], weighting=name)
        built = weighting.weighting_for(cfg, 2, types.SimpleNamespace(bucket=None))
        assert built.name == name and cfg.weighting_slot().NAME == name
    with pytest.raises(ValueError, match="choose one of uniform, loreun"):
        weighting.build_weighting("other", 2)
    from loreun.erase import weighting_loreun as settings

    assert settings.VARIANTS == weighting.VARIANTS
    assert (settings.TEMPERATURE, settings.VARIANT, settings.MOMENTUM) == (
        weighting.TEMPERATURE,
        weighting.VARIANT,
        weighting.MOMENTUM,
    )


def test_a_slot_owns_its_settings_and_checks():
    """Each slot module's settings are EraseConfig fields (flat flags), checked by the slot:
    a setting of an objective that is not chosen is refused, naming the flag."""
    from loreun.erase import config

    names = {f.name for f in dataclasses.fields(EraseConfig)}
    for slot in config.SLOT_MODULES:
        own = {f.name for f in dataclasses.fields(slot.Settings)}
        assert own <= names, slot.NAME
    assert {f.name for f in dataclasses.fields(config.RunFields)}.isdisjoint(
        {"anchor", "erase_from", "ga_bound", "loreun_variant", "temperature"}
    )
    with pytest.raises(ValueError, match="^--anchor: only used by --objective remap"):
        EraseConfig(model="m", out="o", concepts=["a"], anchor="b")
    with pytest.raises(ValueError, match="^--ga-bound: must be > 0"):
        EraseConfig(model="m", out="o", concepts=["a"], objective="ga", ga_bound=0.0)
    with pytest.raises(ValueError, match="^--loreun-variant batch: a softmax over one item"):
        EraseConfig(model="m", out="o", concepts=["a"], weighting="loreun", loreun_variant="batch")
    EraseConfig(model="m", out="o", concepts=["a"], loreun_variant="batch")  # uniform: unused


def test_quiet_prints_only_the_result(tiny_pipeline_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # --min-reliability -1: no fallback warning (a warning is printed under -q by design)
    argv = erase_args(
        tiny_pipeline_dir, tmp_path / "o", "--weighting", "loreun", "--min-reliability", "-1", "-q"
    )
    res = subprocess.run(
        [sys.executable, "-m", "loreun.cli", *argv], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith("erased weights:") and len(res.stdout.splitlines()) == 1
    assert res.stderr.strip() == ""


def test_threads_must_be_positive(tmp_path, capsys):
    assert main(erase_args(tmp_path / "m", tmp_path / "o", "--threads", "0")) == 2
    assert "--threads: must be in 1.." in _err(capsys)[-1]


def test_every_subcommand_reads_settings_from_a_file(tiny_pipeline_dir, tmp_path, capsys):
    """The flags' own names, dashes or underscores; flags on the command line win."""
    settings = tmp_path / "gen.yaml"
    settings.write_text(
        f"model: {tiny_pipeline_dir}\nprompts: neutral\nsteps: 2\nsamples-per-prompt: 1\n"
        "guidance: 1e0\n"
    )
    out = tmp_path / "gen"
    assert (
        main(["generate", "--config-file", str(settings), "--out", str(out), "--steps", "3"]) == 0
    )
    recs = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert recs[0]["steps"] == 3 and len(recs) == 20
    audit = tmp_path / "audit.yaml"
    audit.write_text(f"images: [{out}]\ndetector: [digits]\ngrid_limit: 4\n")
    assert main(["audit", "--config-file", str(audit), "--out", str(tmp_path / "a")]) == 0
    audit.write_text("detectr: [digits]\n")
    code = main(["audit", "--config-file", str(audit), "--out", str(tmp_path / "b")])
    assert code == 2 and "unknown settings: detectr" in _err(capsys)[-1]


def test_erase_settings_file_takes_the_flag_names(tiny_pipeline_dir, tmp_path):
    cfg = tmp_path / "erase.yaml"
    cfg.write_text(f"model: {tiny_pipeline_dir}\nconcept: [a cat]\nsteps: 1\nsample-steps: 2\n")
    assert main(["erase", "--config-file", str(cfg), "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "erase_config.json").read_text())["concepts"] == ["a cat"]


@pytest.mark.parametrize(
    "argv, pointer",
    [
        (["erase", "--pretrained_model_name_or_path", "m"], "--model"),
        (["erase", "--output_dir=o"], "--out"),
        (["erase", "--learning_rate", "1e-5"], "--lr"),
        (["erase", "--max_train_steps", "5"], "--steps"),
        (["erase", "--mixed_precision", "bf16"], "--mixed-precision"),
        (["erase", "--gradient_accumulation_steps", "2"], "--gradient-accumulation-steps"),
        (["generate", "--num_inference_steps", "5"], "--steps"),
    ],
)
def test_a_diffusers_training_flag_points_to_loreuns(argv, pointer, capsys):
    assert main(argv) == 2
    err = _err(capsys)
    flag = argv[1].split("=")[0]
    assert err == [f"loreun {argv[0]}: error: {flag} is not a loreun flag; use {pointer}"]


def test_help_shows_defaults_of_zero(capsys):
    with pytest.raises(SystemExit):
        main(["erase", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "random seed (default: 0)" in text and "decoupled weight decay (default: 0.0)" in text


def test_flags_are_generated_from_each_subcommands_settings_dataclass():
    """generate, audit and attack flags come from GenerateSettings, AuditSettings and
    AttackSettings as erase's come from EraseConfig: a field with a flag is an option of the
    subcommand, with the field's help and default."""
    from loreun.cli.main import build_parser
    from loreun.eval.audit import AuditSettings
    from loreun.pipelines.attack_settings import AttackSettings
    from loreun.pipelines.generate_settings import GenerateSettings

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices

    def options(command):
        return {o: a for a in sub[command]._actions for o in a.option_strings}

    for command, cls in [
        ("generate", GenerateSettings),
        ("audit", AuditSettings),
        ("attack", AttackSettings),
        ("erase", EraseConfig),
    ]:
        found = options(command)
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            if flag is None:
                continue
            assert flag in found, (command, flag)
            assert f.metadata["help"] in found[flag].help, (command, flag)
    assert options("attack")["--attack-steps"].default == AttackSettings().steps
    assert options("generate")["--steps"].default == GenerateSettings().steps


def test_one_settings_file_path_types_values_alike_for_every_subcommand(tmp_path, capsys):
    settings = tmp_path / "s.yaml"
    settings.write_text("steps: 2.5\n")
    for argv in (["erase", "--concept", "x"], ["generate", "--prompts", "digits"]):
        code = main(
            [
                argv[0],
                "--config-file",
                str(settings),
                "--model",
                "digits",
                *argv[1:],
                "--out",
                str(tmp_path / argv[0]),
            ]
        )
        err = _err(capsys)
        assert code == 2 and err[-1] == (
            f"loreun {argv[0]}: error: --config-file: {settings}: steps: expected int, got 2.5"
        )
    assert not (tmp_path / "erase").exists() and not (tmp_path / "generate").exists()
