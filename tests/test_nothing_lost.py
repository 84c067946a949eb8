"""Nothing followed, nothing lost: links planted where loreun writes, outputs that would replace
their inputs, settings that switch safety off, and corrupt or hostile files. Each case runs the
real command and checks that the user's file is untouched and the error is one line."""

import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from loreun.cli.main import main

from .conftest import erase_args


def _victims(tmp_path):
    """A user's file and a user's folder that no command may touch."""
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    folder = tmp_path / "victim-dir"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    return victim, folder


def _untouched(victim, folder):
    assert victim.read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    assert (folder / "keep.txt").read_text() == "keep"


def _refused(capsys, code, needle="symlink"):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and needle in err[-1], err
    assert err[-1].startswith("loreun")


def _plant(path, victim, folder, is_dir):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if path.is_dir() and not path.is_symlink():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()
    path.symlink_to(folder if is_dir else victim)


@pytest.fixture(scope="module")
def finished(tiny_pipeline_dir, tmp_path_factory):
    """A finished erase run with every output kind: checkpoints, a saliency mask, LoRA files,
    the card and a pipeline folder."""
    out = tmp_path_factory.mktemp("done") / "run"
    extra = ("--lora-rank", "2", "--save-pipeline", "--saliency", "0.5", "--checkpoint-every")
    assert main(erase_args(tiny_pipeline_dir, out, *extra, "1", "-q")) == 0
    return out


ERASE_NAMES = [
    (".loreun.lock", False),
    ("erase_config.json", False),
    ("train_log.jsonl", False),
    ("erased.safetensors", False),
    ("saliency-mask.safetensors", False),
    ("pytorch_lora_weights.safetensors", False),
    ("lora-kohya.safetensors", False),
    ("README.md", False),
    ("checkpoints", True),
    ("checkpoints/checkpoint-2", True),
    ("checkpoints/checkpoint-3/state.json", False),
    ("cache", True),
    ("pipeline", True),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, is_dir", ERASE_NAMES)
def test_erase_follows_no_link_planted_at_a_name_it_writes(
    finished, tiny_pipeline_dir, tmp_path, capsys, name, is_dir
):
    """--overwrite into a finished run (every name exists) with one name turned into a link to
    a user's file or folder: the run is refused by name, or writes around the link, and the
    target is untouched either way."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    victim, folder = _victims(tmp_path)
    _plant(out / name, victim, folder, is_dir)
    extra = ("--lora-rank", "2", "--save-pipeline", "--saliency", "0.5", "--checkpoint-every")
    code = main(erase_args(tiny_pipeline_dir, out, *extra, "1", "--overwrite", "-q"))
    _refused(capsys, code)
    _untouched(victim, folder)


def test_a_lock_planted_in_an_empty_folder_is_refused(tiny_pipeline_dir, tmp_path, capsys):
    """The lock file is the one name that an empty --out may hold without --overwrite."""
    victim, folder = _victims(tmp_path)
    for command in ("erase", "generate"):
        out = tmp_path / command
        out.mkdir()
        (out / ".loreun.lock").symlink_to(victim)
        if command == "erase":
            code = main(erase_args(tiny_pipeline_dir, out, "-q"))
        else:
            code = main(_generate(tiny_pipeline_dir, out, tmp_path))
        _refused(capsys, code)
    _untouched(victim, folder)


def _generate(model, out, tmp_path, *extra):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    argv = ["generate", "--model", str(model), "--prompts", str(prompts), "--steps", "2"]
    return argv + ["--size", "32", "--out", str(out), "-q", *map(str, extra)]


@pytest.mark.parametrize(
    "name, is_dir", [("manifest.jsonl", False), ("images", True), ("generate_config.json", False)]
)
def test_generate_follows_no_link_on_resume(tiny_pipeline_dir, tmp_path, capsys, name, is_dir):
    out = tmp_path / "gen"
    assert main(_generate(tiny_pipeline_dir, out, tmp_path)) == 0
    victim, folder = _victims(tmp_path)
    (out / "manifest.jsonl").write_text("")  # every image is generated again
    _plant(out / name, victim, folder, is_dir)
    _refused(capsys, main(_generate(tiny_pipeline_dir, out, tmp_path)))
    _untouched(victim, folder)


@pytest.mark.parametrize("name", ["results.csv", "summary.json", "report.html"])
def test_audit_follows_no_link_on_overwrite(tiny_pipeline_dir, tmp_path, capsys, name):
    gen = tmp_path / "gen"
    assert main(_generate(tiny_pipeline_dir, gen, tmp_path)) == 0
    audit = ["audit", "--images", str(gen), "--detector", "digits", "--out", str(tmp_path / "a")]
    assert main(audit + ["-q"]) == 0
    victim, folder = _victims(tmp_path)
    _plant(tmp_path / "a" / name, victim, folder, False)
    _refused(capsys, main(audit + ["--overwrite", "-q"]))
    _untouched(victim, folder)


@pytest.fixture(scope="module")
def attack_run(tmp_path_factory):
    from .test_attack import attack_argv

    folder = tmp_path_factory.mktemp("attack")
    prompts = folder / "p.csv"
    prompts.write_text('case_number,prompt,evaluation_seed,class\n0,"a handwritten 3",0,3\n')
    argv = attack_argv(folder / "run")
    argv[argv.index("--prompts") + 1] = str(prompts)
    assert main(argv) == 0
    return folder / "run", argv


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, is_dir",
    [("attack.jsonl", False), ("targets", True), ("images", True), ("attack_config.json", False),
     ("summary.json", False), ("report.html", False), ("results.csv", False)],
)  # fmt: skip
def test_attack_follows_no_link_on_resume(attack_run, tmp_path, capsys, name, is_dir):
    import shutil

    run, argv = attack_run
    out = tmp_path / "run"
    shutil.copytree(run, out, symlinks=True)
    victim, folder = _victims(tmp_path)
    _plant(out / name, victim, folder, is_dir)
    argv = [*argv]
    argv[argv.index("--out") + 1] = str(out)
    _refused(capsys, main(argv))
    _untouched(victim, folder)


def test_export_follows_no_link(finished, tmp_path, capsys):
    victim, folder = _victims(tmp_path)
    (tmp_path / "linked.safetensors").symlink_to(victim)
    argv = ["export", str(finished), "--single-file", str(tmp_path / "linked.safetensors")]
    _refused(capsys, main(argv + ["--overwrite"]))
    (tmp_path / "pipe").symlink_to(folder)
    _refused(capsys, main(["export", str(finished), "--pipeline", str(tmp_path / "pipe")]))
    _untouched(victim, folder)


def test_overwrite_never_removes_a_linked_checkpoint(finished, tiny_pipeline_dir, tmp_path, capsys):
    """OUT/checkpoints/checkpoint-5 linked to another run's checkpoint: --overwrite used to
    delete that run's files through the link."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(finished / "checkpoints" / "checkpoint-3", other)
    before = sorted(p.name for p in other.iterdir())
    out = tmp_path / "run"
    assert main(erase_args(tiny_pipeline_dir, out, "-q")) == 0
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "checkpoints" / "checkpoint-5").symlink_to(other)
    _refused(capsys, main(erase_args(tiny_pipeline_dir, out, "--overwrite", "-q")))
    assert sorted(p.name for p in other.iterdir()) == before


def test_temporary_names_cannot_be_predicted(tmp_path):
    """A link planted at the old predictable name (.NAME.tmp-PID) is not written through."""
    from loreun.pipelines.files import atomic_write_text, check_writable

    victim, folder = _victims(tmp_path)
    (tmp_path / f".erase_config.json.tmp-{os.getpid()}").symlink_to(victim)
    (tmp_path / f".write-test-{os.getpid()}").symlink_to(victim)
    check_writable(tmp_path)
    atomic_write_text(tmp_path / "erase_config.json", "{}")
    _untouched(victim, folder)


# Outputs never overwrite inputs, and --overwrite comes from the command line only.


def test_a_reused_config_cannot_overwrite(finished, tiny_pipeline_dir, tmp_path, capsys):
    """A saved erase_config.json with "overwrite": true, reused as --config-file for another
    run's folder, must not replace that run's results."""
    saved = json.loads((finished / "erase_config.json").read_text())
    other = tmp_path / "other"
    assert main(erase_args(tiny_pipeline_dir, other, "-q")) == 0
    before = (other / "erased.safetensors").read_bytes()
    settings = tmp_path / "reused.json"
    settings.write_text(json.dumps({**saved, "overwrite": True, "out": str(other)}))
    code = main(["erase", "--config-file", str(settings), "-q"])
    _refused(capsys, code, "is not empty; pass --overwrite")
    assert (other / "erased.safetensors").read_bytes() == before


@pytest.mark.parametrize("where", ["base", "run-file", "inside-run"])
def test_export_never_writes_over_its_inputs(finished, tiny_pipeline_dir, tmp_path, capsys, where):
    before = {p: p.read_bytes() for p in tiny_pipeline_dir.rglob("*") if p.is_file()}
    erased = (finished / "erased.safetensors").read_bytes()
    argv = {
        "base": ["--pipeline", str(tiny_pipeline_dir), "--model", str(tiny_pipeline_dir)],
        "run-file": ["--single-file", str(finished / "erased.safetensors")],
        "inside-run": ["--single-file", str(finished / "shared.safetensors")],
    }[where]
    _refused(capsys, main(["export", str(finished), *argv, "--overwrite"]), "loreun never writes")
    assert {p: p.read_bytes() for p in tiny_pipeline_dir.rglob("*") if p.is_file()} == before
    assert (finished / "erased.safetensors").read_bytes() == erased


def test_erase_and_generate_refuse_an_output_inside_an_input(
    finished, tiny_pipeline_dir, tmp_path, capsys
):
    inside = tiny_pipeline_dir / "runs"
    _refused(capsys, main(erase_args(tiny_pipeline_dir, inside, "-q")), "lies inside the input")
    argv = _generate(tiny_pipeline_dir, finished / "gen", tmp_path, "--erased", finished)
    _refused(capsys, main(argv), "lies inside the input --erased")
    assert not inside.exists() and not (finished / "gen").exists()


def test_an_interrupted_export_is_finished_and_reported(finished, tmp_path, capsys):
    """A kill -9 while the older export moved a user's files into .DIR.tmp-PID/ left them
    hidden there; the next export moves them back and says so. The move itself no longer
    touches a user's files: they stay where they are."""
    shared = tmp_path / "shared"
    assert main(["export", str(finished), "--pipeline", str(shared)]) == 0
    (shared / "notes.txt").write_text("mine")
    left = tmp_path / ".shared.tmp-12345"
    left.mkdir()
    (left / "moved-by-a-killed-export.txt").write_text("also mine")
    (shared / "model_index.json").rename(left / "model_index.json")
    capsys.readouterr()
    assert main(["export", str(shared.parent / "nope")]) == 2  # nothing happens without a run
    assert main(["export", str(finished), "--pipeline", str(shared), "--overwrite"]) == 0
    assert "finished the move of an interrupted export" in capsys.readouterr().out
    assert (shared / "notes.txt").read_text() == "mine"
    assert (shared / "moved-by-a-killed-export.txt").read_text() == "also mine"
    assert (shared / "model_index.json").is_file() and not left.exists()
    assert not (shared / ".loreun.lock").exists()  # a shared folder keeps no lock file


def test_two_exports_into_one_folder_do_not_interleave(finished, tmp_path, capsys):
    from loreun.pipelines.files import FolderLock

    shared = tmp_path / "shared"
    with FolderLock(shared):
        code = main(["export", str(finished), "--pipeline", str(shared), "--overwrite"])
    _refused(capsys, code, "is in use by another loreun run")


# Checkpoints are checked.


def _checkpointed(tiny_pipeline_dir, out, steps=4):
    assert main(erase_args(tiny_pipeline_dir, out, "--steps", steps, "--checkpoint-every", 2)) == 0


def test_an_edited_checkpoint_step_is_refused(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "run"
    _checkpointed(tiny_pipeline_dir, out)
    state = out / "checkpoints" / "checkpoint-4" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "step": 2}))
    log = (out / "train_log.jsonl").read_text()
    code = main(erase_args(tiny_pipeline_dir, out, "--steps", 6, "--resume", "latest", "-q"))
    _refused(capsys, code, "says step 2 but its folder is checkpoint-4")
    assert (out / "train_log.jsonl").read_text() == log  # not cut on the checkpoint's word


def test_a_renamed_checkpoint_is_refused_by_its_weights(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "run"
    _checkpointed(tiny_pipeline_dir, out)
    ckpts = out / "checkpoints"
    (ckpts / "checkpoint-2").rename(ckpts / "old")
    (ckpts / "checkpoint-4").rename(ckpts / "checkpoint-2")
    state = ckpts / "checkpoint-2" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "step": 2}))
    code = main(erase_args(tiny_pipeline_dir, out, "--steps", 6, "--resume", "latest", "-q"))
    _refused(capsys, code, "holds step 4's weights")


def test_resume_refuses_fewer_steps_than_done(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "run"
    _checkpointed(tiny_pipeline_dir, out)
    code = main(erase_args(tiny_pipeline_dir, out, "--steps", 3, "--resume", "latest", "-q"))
    _refused(capsys, code, "--steps: 3 is below the 4 steps")


def test_a_log_from_another_run_is_refused(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "run"
    _checkpointed(tiny_pipeline_dir, out)
    (out / "train_log.jsonl").write_text('{"step": 1}\n')
    code = main(erase_args(tiny_pipeline_dir, out, "--steps", 6, "--resume", "latest", "-q"))
    _refused(capsys, code, "has no line for step 4")


@pytest.mark.parametrize("name", ["state.json", "trained.safetensors", "optimizer.pt"])
def test_a_torn_checkpoint_file_is_named(tiny_pipeline_dir, tmp_path, capsys, name):
    out = tmp_path / "run"
    _checkpointed(tiny_pipeline_dir, out)
    (out / "checkpoints" / "checkpoint-4" / name).write_bytes(b"\x00\xffgarbage")
    code = main(erase_args(tiny_pipeline_dir, out, "--steps", 6, "--resume", "latest", "-q"))
    _refused(capsys, code, name)


def test_the_divergence_hint_names_only_a_finite_checkpoint(tiny_pipeline_dir, tmp_path):
    from loreun.erase.checkpoint import recovery_hint
    from loreun.erase.config import EraseConfig

    out = tmp_path / "run"
    _checkpointed(tiny_pipeline_dir, out)
    path = out / "checkpoints" / "checkpoint-4" / "trained.safetensors"
    tensors = load_file(path)
    save_file({k: v * float("nan") for k, v in tensors.items()}, str(path), {"step": "4"})
    hint = recovery_hint(EraseConfig(model="m", out=str(out), concepts=["a"]))
    assert "checkpoint-2" in hint and "checkpoint-4" not in hint


# Numbers: finite, in range, bounded; settings files read safely.


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--max-grad-norm", "-1"], "--max-grad-norm: must be > 0"),
        (["--negative-guidance", "nan"], "--negative-guidance: must be a finite number"),
        (["--retain-concept", "a dog", "--retain-weight", "inf"], "--retain-weight: must be a"),
        (["--seed", str(2**63 - 1)], "--seed: must be in [0, 4294967295]"),
        (["--samples-per-concept", "1000000"], "--samples-per-concept: must be <= 10000"),
        (["--lora-rank", "100000"], "--lora-rank: must be <= 4096"),
        (["--lora-rank", "4000"], "--lora-rank: 4000 is above the full rank"),
    ],
)
def test_erase_numbers_fail_in_one_line(tiny_pipeline_dir, tmp_path, capsys, flags, needle):
    _refused(capsys, main(erase_args(tiny_pipeline_dir, tmp_path / "o", *flags, "-q")), needle)
    assert not (tmp_path / "o" / "erased.safetensors").exists()


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--guidance", "inf"], "--guidance: must be a finite number"),
        (["--guidance", "nan"], "--guidance: must be a finite number"),
        (["--samples-per-prompt", "1000000000"], "--samples-per-prompt: must be in 1..10000"),
        (["--steps", "5000"], "--steps: must be in 1..1000"),
    ],
)
def test_generate_numbers_fail_at_once(tiny_pipeline_dir, tmp_path, capsys, flags, needle):
    started = time.perf_counter()
    _refused(capsys, main(_generate(tiny_pipeline_dir, tmp_path / "g", tmp_path, *flags)), needle)
    assert time.perf_counter() - started < 30 and not (tmp_path / "g").exists()


@pytest.mark.parametrize(
    "text, needle",
    [
        ("lr: yes\n", "lr: expected float, got 'yes'"),  # YAML 1.1 read it as true
        ("steps: 3\nsteps: 4\n", "'steps' is given twice"),
        ("lr: " + "9" * 400 + "\n", "lr: expected float"),
        ("model: [a, b]\n", "model: expected one value"),
        ("a: &a [x, x]\nb: &b [*a, *a]\nmodel: *b\n", "YAML aliases (*name) are not read"),
        ("overwrite: true\n", "is not empty; pass --overwrite"),
    ],
)
def test_erase_settings_files_are_read_safely(finished, tmp_path, capsys, text, needle):
    settings = tmp_path / "s.yaml"
    settings.write_text(text)
    argv = ["erase", "--config-file", str(settings), "--concept", "a cat", "--out", str(finished)]
    _refused(capsys, main(argv + ["--model", "digits", "-q"]), needle)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("guidance: yes\n", "guidance: expected float, got 'yes'"),
        ("steps: [1, 2]\n", "steps: expected one value"),
        ("prompts: {a: 1}\n", "prompts: expected one value"),
    ],
)
def test_generate_settings_files_are_read_safely(tmp_path, capsys, text, needle):
    settings = tmp_path / "s.yaml"
    settings.write_text(text)
    argv = ["generate", "--config-file", str(settings), "--model", "digits", "--prompts"]
    _refused(capsys, main(argv + ["digits", "--out", str(tmp_path / "g")]), needle)


def test_a_fifo_or_device_is_never_read_as_a_file(tmp_path, capsys):
    """Each used to hang: a FIFO as --config-file, a FIFO named b.png in an audited folder;
    /dev/urandom as --config-file."""
    fifo = tmp_path / "settings.yaml"
    os.mkfifo(fifo)
    started = time.perf_counter()
    argv = ["generate", "--config-file", str(fifo), "--model", "digits", "--prompts", "digits"]
    _refused(capsys, main(argv + ["--out", str(tmp_path / "g")]), "not a regular file")
    argv[2] = "/dev/urandom"
    _refused(capsys, main(argv + ["--out", str(tmp_path / "g")]), "not a regular file")
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(images / "a.png")
    os.mkfifo(images / "b.png")
    audit = ["audit", "--images", str(images), "--detector", "digits", "--out", str(tmp_path / "a")]
    _refused(capsys, main(audit), "b.png: not a regular file")
    assert time.perf_counter() - started < 30


def test_a_yaml_bomb_as_model_ends_at_once(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    settings = tmp_path / "bomb.yaml"
    settings.write_text("\n".join(lines + ["model: *a8"]) + "\n")
    started = time.perf_counter()
    argv = ["erase", "--config-file", str(settings), "--concept", "x", "--out", str(tmp_path / "o")]
    _refused(capsys, main(argv), "YAML aliases")
    assert time.perf_counter() - started < 10


# Manifests, logs and summaries that were torn or edited.


def test_a_manifest_record_outside_out_is_generated_again(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "gen"
    assert main(_generate(tiny_pipeline_dir, out, tmp_path)) == 0
    records = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    (tmp_path / "elsewhere.png").write_bytes((out / records[0]["path"]).read_bytes())
    (out / records[0]["path"]).unlink()
    records[0]["path"] = "../elsewhere.png"
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(_generate(tiny_pipeline_dir, out, tmp_path)) == 0
    again = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert all(r["path"].startswith("images/") for r in again) and len(again) == 2
    assert all((out / r["path"]).is_file() for r in again)


def test_garbage_manifest_and_config_are_rebuilt_or_named(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(_generate(tiny_pipeline_dir, out, tmp_path)) == 0
    (out / "manifest.jsonl").write_bytes(os.urandom(2000) + b"\n[1, 2]\n{}\n")
    assert main(_generate(tiny_pipeline_dir, out, tmp_path)) == 0  # every image made again
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2
    (out / "generate_config.json").write_bytes(b"\xff\xfe{")
    _refused(capsys, main(_generate(tiny_pipeline_dir, out, tmp_path)), "generate_config.json")


def test_a_failed_generate_start_does_not_hold_its_folder(tiny_pipeline_dir, tmp_path):
    """A run that stopped before its first image (its config and an empty manifest) does not
    refuse the corrected command, whatever its settings were."""
    out = tmp_path / "gen"
    out.mkdir()
    (out / "generate_config.json").write_text(json.dumps({"model": "other", "settings": {}}))
    (out / "manifest.jsonl").write_text("")
    (out / "images").mkdir()
    assert main(_generate(tiny_pipeline_dir, out, tmp_path)) == 0
    assert len(list((out / "images").glob("*.png"))) == 2


def test_export_names_a_torn_summary_and_a_missing_folder(finished, tmp_path, capsys):
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "summary.json").write_bytes(b"\x00{not json")
    argv = ["export", str(finished), "--pipeline", str(tmp_path / "p"), "--audit", str(audit)]
    _refused(capsys, main(argv), "summary.json: not readable JSON")
    argv = ["export", str(finished), "--single-file", str(tmp_path / "no" / "x.safetensors")]
    _refused(capsys, main(argv), "no such folder")


def test_evaluate_refuses_names_that_would_replace_a_column(tmp_path, capsys):
    argv = ["evaluate", "--model", "digits", "--prompts", "digits", "--detector", "digits"]
    argv += ["--out", str(tmp_path / "e")]
    _refused(capsys, main(argv + ["--erased", "original=x.safetensors"]), "base model's column")
    both = ["--erased", "a=x.safetensors", "--erased", "a=y.safetensors"]
    _refused(capsys, main(argv + both), "'a' is given twice")


@pytest.mark.slow
def test_a_corrupt_attack_log_and_target_are_rebuilt(tmp_path):
    from .test_attack import attack_argv

    out = tmp_path / "attack"
    prompts = tmp_path / "p.csv"
    prompts.write_text('case_number,prompt,evaluation_seed,class\n0,"a handwritten 3",0,3\n')
    argv = attack_argv(out)
    argv[argv.index("--prompts") + 1] = str(prompts)
    assert main(argv) == 0
    first = (out / "attack.jsonl").read_text()
    (out / "attack.jsonl").write_text('{"index": 0}\n' + "\x00garbage\n")
    target = next((out / "targets").glob("*.safetensors"))
    target.write_bytes(b"torn")
    assert main(argv) == 0
    again = (out / "attack.jsonl").read_text()
    keep = ("index", "seed", "original_success", "pre_success")
    assert [json.loads(x)[k] for x in again.splitlines() for k in keep] == [
        json.loads(x)[k] for x in first.splitlines() for k in keep
    ]
    assert torch.isfinite(load_file(target)["latent"]).all()


def test_files_are_written_with_the_usual_permissions(finished, tmp_path):
    """Random temporary names (mkstemp, 0600) must not leave outputs unreadable to others: a
    web UI run by another user reads an exported single file."""
    from loreun.pipelines.files import UMASK

    single = tmp_path / "shared.safetensors"
    assert main(["export", str(finished), "--single-file", str(single), "--pipeline",
                 str(tmp_path / "p")]) == 0  # fmt: skip
    for path in (single, finished / "erased.safetensors", tmp_path / "p" / "README.md"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~UMASK, path
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o777 & ~UMASK
