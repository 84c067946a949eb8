"""Settings, resumes and files that mean what they say: each case a careless user (or an
attacker) met, through the real ``loreun`` command. docs/reliability.md lists them by cause."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from loreun.cli.main import main

from .conftest import erase_args

ROOT = Path(__file__).resolve().parents[1]


def _refused(capsys, code, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and needle in err[-1], err
    assert err[-1].startswith("loreun") and "Traceback" not in "\n".join(err)


def _saved(out) -> dict:
    return json.loads((out / "erase_config.json").read_text())


def _settings(tmp_path, text: str) -> str:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return str(path)


def _erase_with_file(model, out, settings, *extra):
    """An erase whose concepts come from the settings file (erase_args minus its concepts)."""
    argv = ["erase", "--model", str(model), "--out", str(out), "--steps", "2"]
    argv += ["--sample-steps", "2", "--samples-per-concept", "2", "--lr", "1e-3", "-q"]
    return argv + ["--config-file", settings, *extra]


# Cause 1: a settings file's values mean what the same flag means.
@pytest.mark.parametrize(
    "text, extra, concepts",
    [
        ("concept: three\n", [], ["three"]),  # not "t", "h", "r", "e", "e"
        ("concept: a handwritten 3\n", [], ["a handwritten 3"]),
        ("concept: a handwritten 3\n", ["--concept", "7"], ["a handwritten 3", "7"]),
        ("concept: [a cat, a dog]\n", ["--concept", "7"], ["a cat", "a dog", "7"]),
    ],
)
def test_one_value_for_a_repeatable_flag_is_one_value(
    tiny_pipeline_dir, tmp_path, text, extra, concepts
):
    out = tmp_path / "o"
    assert main(_erase_with_file(tiny_pipeline_dir, out, _settings(tmp_path, text), *extra)) == 0
    assert _saved(out)["concepts"] == concepts


def test_yaml_numbers_read_as_the_flag_reads_them(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "o"
    text = "concept: a cat\nseed: 010\nlr: 1e-3\n"  # YAML 1.1 would read 010 as octal 8
    assert main(_erase_with_file(tiny_pipeline_dir, out, _settings(tmp_path, text))) == 0
    assert (_saved(out)["seed"], _saved(out)["lr"]) == (10, 1e-3)
    bad_values = {
        "steps: 0x10\n": "steps: expected int, got '0x10'",
        "steps: 1:30\n": "steps: expected int, got '1:30'",  # YAML 1.1: 90 (sexagesimal)
        "save-pipeline: yes\n": "save_pipeline: expected true or false, got 'yes'",
    }
    for bad, needle in bad_values.items():
        settings = _settings(tmp_path, "concept: a cat\n" + bad)
        _refused(
            capsys, main(_erase_with_file(tiny_pipeline_dir, tmp_path / "x", settings)), needle
        )


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--config-file", "a.yaml", "--config-file", "b.yaml"], "--config-file: given 2 times"),
        (["--config-f", "a.yaml"], "--config-f: write --config-file in full"),
        (["--config-file=a.yaml", "--config-file", "b.yaml"], "given 2 times"),
    ],
)
def test_a_second_or_abbreviated_config_file_is_refused(tmp_path, capsys, flags, needle):
    argv = ["generate", "--model", "digits", "--prompts", "digits", "--out", str(tmp_path / "g")]
    _refused(capsys, main(argv + flags), needle)


def test_a_saved_config_over_one_mib_reloads(tiny_pipeline_dir, tmp_path):
    """A run's own erase_config.json is JSON (no aliases to expand): it reloads at any size a
    run writes, here 2 MiB (a thousands-of-concepts run writes such files)."""
    first = tmp_path / "first"
    assert main(erase_args(tiny_pipeline_dir, first, "-q")) == 0
    saved = _saved(first)
    big = tmp_path / "big.json"
    big.write_text(json.dumps(saved, indent=2) + " " * (2 << 20))
    again = tmp_path / "again"
    assert main(["erase", "--config-file", str(big), "--out", str(again), "-q"]) == 0
    assert {**_saved(again), "out": None} == {**saved, "out": None}


# Cause 2: a resume is the run it claims to be.
@pytest.fixture(scope="module")
def two_runs(tiny_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name in ("a", "b"):
        argv = erase_args(tiny_pipeline_dir, root / name, "--checkpoint-every", "1", "-q")
        assert main(argv) == 0
    return root


def _contents(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_resume_from_another_folder_never_writes_over_a_run(
    two_runs, tiny_pipeline_dir, tmp_path, capsys
):
    finished, before = two_runs / "b", _contents(two_runs / "b")
    ckpt = two_runs / "a" / "checkpoints" / "checkpoint-2"
    argv = erase_args(tiny_pipeline_dir, finished, "--resume", ckpt, "-q")
    _refused(capsys, main(argv), f"--out: {finished} is not empty")
    assert _contents(finished) == before
    mine = tmp_path / "mine"  # a user's folder
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    argv = erase_args(tiny_pipeline_dir, mine, "--resume", ckpt, "-q")
    _refused(capsys, main(argv), "is not empty")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    fresh = tmp_path / "fresh"  # an empty folder may start from another run's checkpoint
    assert main(erase_args(tiny_pipeline_dir, fresh, "--resume", ckpt, "-q")) == 0


def test_a_checkpoint_without_its_config_is_refused(two_runs, tiny_pipeline_dir, tmp_path, capsys):
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(two_runs / "a" / "checkpoints" / "checkpoint-2", ckpt)
    (ckpt / "erase_config.json").unlink()
    argv = erase_args(tiny_pipeline_dir, tmp_path / "new", "--resume", ckpt, "--steps", "4")
    _refused(capsys, main(argv + ["--lr", "0.5", "-q"]), "holds no erase_config.json")
    assert not (tmp_path / "new" / "erased.safetensors").exists()


def test_blur_true_in_a_settings_file_blurs(tmp_path):
    """A switch's setting name gives its value (``blur: true``, as a saved config writes it);
    the switch's own name means typing it (``no-blur: true``)."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16), "gray").save(images / "a.png")
    for text, blur in (
        ("blur: true\n", True),
        ("blur: false\n", False),
        ("no-blur: true\n", False),
    ):
        out = tmp_path / f"audit-{len(text)}-{blur}"
        argv = ["audit", "--images", str(images), "--detector", "digits", "--out", str(out)]
        assert main(argv + ["--config-file", _settings(tmp_path, text), "-q"]) == 0
        assert json.loads((out / "summary.json").read_text())["settings"]["blur"] is blur


def test_generate_resumed_with_another_dtype_is_refused(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten 3\n")
    argv = ["generate", "--model", "digits", "--prompts", str(prompts), "--steps", "2"]
    argv += ["--out", str(tmp_path / "g"), "-q"]
    assert main(argv + ["--dtype", "fp32"]) == 0
    record = json.loads((tmp_path / "g" / "manifest.jsonl").read_text().splitlines()[0])
    assert record["dtype"] == "float32"
    _refused(capsys, main(argv + ["--dtype", "bf16"]), "dtype differ")


def test_a_changed_base_is_sampled_again(tmp_path, other_pipeline_dir, tiny_pipeline_dir):
    """The forget-sample cache is keyed by the model's files, not its path: new weights under
    the same --model path are sampled again by --overwrite."""
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    out = tmp_path / "o"
    assert main(erase_args(model, out, "--xt-source", "cached", "-q")) == 0
    cache = out / "cache" / "forget-latents.safetensors"
    before = load_file(str(cache))["x0"]
    shutil.rmtree(model / "unet")
    shutil.copytree(other_pipeline_dir / "unet", model / "unet")
    assert main(erase_args(model, out, "--xt-source", "cached", "--overwrite", "-q")) == 0
    assert not np.allclose(load_file(str(cache))["x0"].numpy(), before.numpy())


# Cause 3: files that are not what they seem.
@pytest.mark.parametrize("command", ["generate", "attack"])
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_as_erased_is_refused_at_once(tmp_path, command, kind):
    path = tmp_path / "w.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
    argv = [command, "--model", "digits", "--prompts", "digits", "--erased", str(path)]
    argv += ["--out", str(tmp_path / "o"), "-q"]
    if command == "attack":
        argv += ["--detector", "digits", "--erased-class", "3"]
    res = subprocess.run(
        [sys.executable, "-m", "loreun.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2, res.stderr
    assert (
        res.stderr.strip()
        .splitlines()[-1]
        .endswith("not a regular file (a FIFO, a device or a socket)")
    )


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height, with no pixel data to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_an_image_declaring_30000_pixels_a_side_is_named(tiny_pipeline_dir, tmp_path, capsys):
    folder = tmp_path / "forget"
    folder.mkdir()
    Image.new("RGB", (32, 32), "gray").save(folder / "ok.png")
    _png_declaring(folder / "huge.png", 30000, 30000)
    argv = ["erase", "--model", str(tiny_pipeline_dir), "--out", str(tmp_path / "o")]
    argv += ["--forget-images", str(folder), "--forget-caption", "a cat", "-q"]
    _refused(capsys, main(argv), "huge.png: declares over")


def test_a_fifo_among_images_is_never_read(tiny_pipeline_dir, tmp_path):
    """A FIFO named b.png is no image: the folder scan passes it over (erase), the reader
    refuses it by name (audit), and neither blocks on it."""
    folder = tmp_path / "forget"
    folder.mkdir()
    Image.new("RGB", (32, 32), "gray").save(folder / "ok.png")
    os.mkfifo(folder / "b.png")
    argv = ["erase", "--model", str(tiny_pipeline_dir), "--out", str(tmp_path / "o"), "-q"]
    argv += ["--forget-images", str(folder), "--forget-caption", "a cat", "--steps", "1"]
    run = [sys.executable, "-m", "loreun.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(run + argv, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    from loreun.pipelines.image_files import open_rgb

    with pytest.raises(ValueError, match="b.png: not a regular file"):
        open_rgb(folder / "b.png")


def _gradient_pair(folder: Path) -> None:
    """The same gradient as a 16-bit and an 8-bit grayscale PNG."""
    folder.mkdir()
    deep = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")
    Image.fromarray(np.round(deep / 257).astype(np.uint8), "L").save(folder / "flat.png")


def test_a_16_bit_png_reads_as_its_8_bit_copy(tmp_path):
    from loreun.pipelines.image_files import open_rgb

    _gradient_pair(tmp_path / "pair")
    deep, flat = (np.asarray(open_rgb(tmp_path / "pair" / n)) for n in ("deep.png", "flat.png"))
    assert deep.mean() < 140 and np.abs(deep.astype(int) - flat).max() <= 1  # not clipped white


def test_16_bit_pngs_erase_and_audit_as_their_8_bit_copies(tiny_pipeline_dir, tmp_path):
    _gradient_pair(tmp_path / "pair")
    latents = {}
    for name in ("deep", "flat"):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(tmp_path / "pair" / f"{name}.png", folder / "x.png")
        out = tmp_path / f"erase-{name}"
        argv = ["erase", "--model", str(tiny_pipeline_dir), "--out", str(out), "--steps", "1"]
        argv += ["--forget-images", str(folder), "--forget-caption", "a cat", "-q"]
        argv += ["--objective", "ga", "--forget-images", str(folder)]
        assert main(argv[:-2]) == 0
        latents[name] = load_file(str(out / "cache" / "forget-images.safetensors"))["x0"]
        audit = ["audit", "--images", str(folder), "--detector", "digits", "-q"]
        assert main(audit + ["--out", str(tmp_path / f"audit-{name}")]) == 0
    assert np.allclose(latents["deep"].numpy(), latents["flat"].numpy(), atol=0.05)
    rows = {
        n: (tmp_path / f"audit-{n}" / "results.csv").read_text().splitlines()[1].split(",")[1:]
        for n in ("deep", "flat")
    }
    assert rows["deep"] == rows["flat"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "--model", "digits", "--prompts", "digits", "--threads", "100000"],
         "--threads: must be in 1.."),
        (["attack", "--model", "digits", "--prompts", "digits", "--detector", "digits",
          "--erased-class", "3", "--attack-tokens", "80"],
         "--attack-tokens: 80 prefix tokens do not fit text_encoder's 16 tokens"),
    ],
)  # fmt: skip
def test_numbers_past_what_the_machine_or_model_takes(tmp_path, capsys, argv, needle):
    _refused(capsys, main(argv + ["--out", str(tmp_path / "o"), "-q"]), needle)
    assert not (tmp_path / "o" / "images").exists()


# Cause 6: inputs that are almost right.
def test_a_prompt_csv_as_concepts_file_gives_its_prompts(tiny_pipeline_dir, tmp_path):
    csv = tmp_path / "concepts.csv"
    csv.write_text("case_number,prompt,evaluation_seed\n0,a cat,1\n1,a dog,2\n2,a cat,3\n")
    out = tmp_path / "o"
    argv = erase_args(tiny_pipeline_dir, out, "-q")
    argv = [a for a in argv if a not in ("--concept", "a cat", "a dog")]
    assert main(argv + ["--concepts-file", str(csv)]) == 0
    assert _saved(out)["concepts"] == ["a cat", "a dog"]


def test_nan_in_a_jsonl_prompt_file_is_named_before_any_image(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a handwritten 3"}\n{"prompt": "a 7", "score": NaN}\n')
    argv = ["generate", "--model", "digits", "--prompts", str(prompts), "--steps", "2"]
    _refused(capsys, main(argv + ["--out", str(tmp_path / "g"), "-q"]), "p.jsonl: line 2: NaN")
    assert not (tmp_path / "g" / "images").exists()


def test_resolution_above_the_flow_model_s_largest_names_the_flag(tmp_path, capsys):
    argv = ["erase", "--model", "digits-flow", "--concept", "a handwritten 3"]
    argv += ["--resolution", "32", "--out", str(tmp_path / "o"), "-q"]
    _refused(capsys, main(argv), "--resolution: 32 px is above the largest size")
    gen = ["generate", "--model", "digits-flow", "--out", str(tmp_path / "g"), "-q"]
    _refused(capsys, main(gen + ["--prompts", "digits", "--size", "32"]), "--size: 32 px is above")
    rows = tmp_path / "p.csv"
    rows.write_text("id,prompt,width,height\na,a handwritten 3,16,16\nb,a 7,32,32\n")
    _refused(capsys, main(gen + ["--prompts", str(rows)]), "p.csv: row b: 32 px is above")
    assert not (tmp_path / "g" / "images").exists()


# Cause 4: exports and cards.
@pytest.fixture(scope="module")
def finished(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("done") / "run"
    assert main(erase_args(tiny_pipeline_dir, out, "-q")) == 0
    return out


def test_export_recovery_follows_no_link(finished, tmp_path, capsys):
    shared = tmp_path / "shared"
    assert main(["export", str(finished), "--pipeline", str(shared)]) == 0
    victim = tmp_path / "victim"
    victim.mkdir()
    (shared / "unet").rename(tmp_path / "unet-moved")
    (shared / "unet").symlink_to(victim)  # planted inside the export folder
    left = tmp_path / ".shared.tmp-4242" / "unet"
    left.mkdir(parents=True)
    (left / "planted.txt").write_text("x")
    code = main(["export", str(finished), "--pipeline", str(shared), "--overwrite"])
    _refused(capsys, code, "is a symlink where loreun writes")
    assert list(victim.iterdir()) == []


def test_export_refuses_another_run_s_audit(finished, tiny_pipeline_dir, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(erase_args(tiny_pipeline_dir, other, "--seed", "5", "-q")) == 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    argv = ["evaluate", "--model", str(tiny_pipeline_dir), "--prompts", str(prompts)]
    argv += ["--steps", "2", "--size", "32", "--detector", "nudenet", "-q"]
    assert main(argv + ["--erased", str(other), "--out", str(tmp_path / "eval-other")]) == 0
    export = ["export", str(finished), "--pipeline", str(tmp_path / "p")]
    code = main(export + ["--audit", str(tmp_path / "eval-other")])
    _refused(capsys, code, "audits no images made with this run's erased file")
    assert not (tmp_path / "p").exists()
    assert main(argv + ["--erased", str(finished), "--out", str(tmp_path / "eval-mine")]) == 0
    assert main(export + ["--audit", str(tmp_path / "eval-mine")]) == 0


def _limited_run(argv, max_bytes: int):
    """``loreun argv`` in a process that cannot write a file past ``max_bytes``: what a full disk
    does to a write, without filling one (SIGXFSZ ignored, so the write fails with EFBIG)."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "loreun.cli", *argv],
        capture_output=True, text=True, timeout=300, preexec_fn=limit, env=env,
    )  # fmt: skip


def test_a_full_disk_while_exporting_is_one_line_and_leaves_nothing(finished, tmp_path):
    target = tmp_path / "shared"
    res = _limited_run(["export", str(finished), "--pipeline", str(target)], 20_000)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert err[-1].startswith("loreun export: error: cannot write the pipeline folder"), err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".shared.tmp")] == []


def test_a_full_disk_while_erasing_with_save_pipeline_is_one_line(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "o"
    argv = [str(a) for a in erase_args(tiny_pipeline_dir, out, "--save-pipeline", "-q")]
    res = _limited_run(argv, 20_000)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "cannot write" in res.stderr.strip().splitlines()[-1]
    assert [p.name for p in out.iterdir() if p.name.startswith(".pipeline.tmp")] == []


def test_an_export_killed_by_sigterm_reruns_without_overwrite(finished, tmp_path):
    """SIGTERM ends the process without running ``finally``: its lock file stays, but no
    process holds it, so the rerun goes ahead (and finishes what was left)."""
    import signal
    import time

    target = tmp_path / "shared"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loreun.cli", "export", str(finished), "--pipeline", str(target)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (target / ".loreun.lock").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert main(["export", str(finished), "--pipeline", str(target)]) == 0
    assert (target / "model_index.json").is_file() and not (target / ".loreun.lock").exists()


def test_the_card_escapes_every_header_value(finished, tmp_path):
    from loreun.erase.card import model_card

    meta = {"versions": {"loreun": "<script>alert(1)</script>", "torch": "2|x"}, "concepts": []}
    card = model_card(meta)
    assert "<script>" not in card and "&lt;script&gt;" in card and "2\\|x" in card


# Cause 6: the demo reruns over its own earlier output.
@pytest.mark.slow
def test_demo_overwrite_with_other_settings_replaces_its_own_images(tmp_path):
    out = tmp_path / "demo"
    small = ["--samples-per-prompt", "1", "-q"]
    assert main(["demo", "--out", str(out), "--steps", "2", *small]) == 0
    (out / "original" / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(out), "--steps", "3", "--overwrite", *small]) == 0
    assert (out / "original" / "notes.txt").read_text() == "mine"
    assert json.loads((out / "erase" / "erase_config.json").read_text())["steps"] == 3


# Cause 7: a built-in model's own settings erase.
@pytest.mark.slow
@pytest.mark.parametrize("model", ["digits", "digits-flow"])
def test_a_built_in_model_erases_with_no_other_flag(model, tmp_path, capsys):
    """The issue's command, as a user types it: the model's own lr and steps are used, said in
    the first line and recorded in the header; digit 3 goes, the others stay (one seed)."""
    from loreun.pipelines.loading import read_erased_file

    run = tmp_path / "r"
    argv = ["erase", "--model", model, "--concept", "a handwritten 3"]
    assert main(argv + ["--concept", "the number three", "--out", str(run)]) == 0
    first = capsys.readouterr().err.strip().splitlines()[0]
    assert first.startswith(f"loreun erase: {model}'s own settings: --lr ")
    meta = read_erased_file(run)[1]
    assert meta["model_settings"]["lr"] == meta["hyperparameters"]["lr"] > 1e-5
    ev = ["evaluate", "--model", model, "--erased", str(run), "--prompts", "digits"]
    ev += ["--detector", "digits", "--erased-class", "3", "--out", str(tmp_path / "e"), "-q"]
    assert main(ev) == 0
    digits = json.loads((tmp_path / "e" / "summary.json").read_text())["sources"]["erased"]
    assert digits["digits"]["erased_top1"] <= 0.10 and digits["digits"]["other_top1"] >= 0.90
    assert main(argv + ["--out", str(tmp_path / "lib"), "--no-model-defaults", "--steps", "1"]) == 0
    assert read_erased_file(tmp_path / "lib")[1]["hyperparameters"]["lr"] == 1e-5
