import json
import os
import shutil
import subprocess
import sys

import pytest

from loreun.cli.main import main
from loreun.pipelines.generate import GenerateSettings, generate, read_manifest

from .conftest import assert_same_images

PROMPTS = (
    "case_number,prompt,evaluation_seed,evaluation_guidance,sd_image_width,sd_image_height,mood\n"
    "a,a cat,4294967295,5,,,calm\n"
    "b,a dog,7,,48,48,\n"
    "c,a bird,123,9.5,,,happy\n"
    'd,"a fish\nin water",99,5,,,\n'
    "e,a cow,,5,,,\n"
)


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text(PROMPTS)
    return path


def _images(out):
    return {rec["key"]: (out / rec["path"]).read_bytes() for rec in read_manifest(out)}


def test_rows_seed_guidance_size_and_extra_reach_the_manifest(
    tiny_pipeline_dir, prompt_file, tmp_path
):
    out = tmp_path / "gen"
    generate(
        str(tiny_pipeline_dir),
        prompt_file,
        out,
        settings=GenerateSettings(steps=2, guidance=3.0, seed=1000, samples_per_prompt=2),
    )
    recs = {r["key"]: r for r in read_manifest(out)}
    assert len(recs) == 10
    assert recs["0:0"]["seed"] == 4294967295 and recs["0:1"]["seed"] == 4294967296
    assert recs["0:0"]["guidance"] == 5.0 and recs["1:0"]["guidance"] == 3.0
    assert (recs["1:0"]["width"], recs["1:0"]["height"]) == (48, 48)
    assert recs["2:0"]["width"] == 32  # native size of the tiny model
    assert recs["4:0"]["seed"] == 1004  # no seed: --seed + row position
    assert recs["0:0"]["extra"] == {"mood": "calm"} and recs["3:0"]["prompt"] == "a fish\nin water"
    assert recs["0:0"]["id"] == "a" and recs["0:0"]["model"] == str(tiny_pipeline_dir)
    from PIL import Image

    assert Image.open(out / recs["1:0"]["path"]).size == (48, 48)


@pytest.mark.numerics  # batches of 1 and 4 round alike only to within one 8-bit level
def test_same_images_alone_or_batched(tiny_pipeline_dir, prompt_file, tmp_path):
    one, four = tmp_path / "b1", tmp_path / "b4"
    generate(
        str(tiny_pipeline_dir), prompt_file, one, settings=GenerateSettings(steps=2, batch_size=1)
    )
    generate(
        str(tiny_pipeline_dir), prompt_file, four, settings=GenerateSettings(steps=2, batch_size=4)
    )
    assert_same_images(one, four)
    a = _images(one)
    assert len(set(a.values())) == len(a)  # different rows, different images


def test_resume_after_interruption_matches_an_uninterrupted_run(
    tiny_pipeline_dir, prompt_file, tmp_path
):
    full, cut = tmp_path / "full", tmp_path / "cut"
    settings = GenerateSettings(steps=2, batch_size=2)
    generate(str(tiny_pipeline_dir), prompt_file, full, settings=settings)
    generate(str(tiny_pipeline_dir), prompt_file, cut, settings=settings)
    lines = (cut / "manifest.jsonl").read_text().splitlines()
    # An interrupted run: two images recorded, a torn third line, one image file without a line.
    (cut / "manifest.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    for rec in [json.loads(x) for x in lines[3:]]:
        if rec["key"] != "3:0":
            os.remove(cut / rec["path"])
    kept = (cut / json.loads(lines[0])["path"]).stat().st_mtime_ns
    generate(str(tiny_pipeline_dir), prompt_file, cut, settings=settings)
    assert (cut / json.loads(lines[0])["path"]).stat().st_mtime_ns == kept  # skipped
    assert_same_images(cut, full)
    assert len(read_manifest(cut)) == 5


def test_output_with_another_run_is_refused(tiny_pipeline_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "gen"
    argv = [
        "generate",
        "--model",
        str(tiny_pipeline_dir),
        "--prompts",
        str(prompt_file),
        "--out",
        str(out),
        "--steps",
        "2",
    ]
    assert main(argv) == 0
    assert main([*argv[:-1], "3"]) == 2
    assert "holds another generation run (settings differ)" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("mine")
    assert main([*argv[:5], "--out", str(other)]) == 2
    assert "holds no loreun generation" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, needle",
    [
        ("--steps", "0", "--steps: must be in 1..1000, got 0"),
        ("--size", "30", "--size: must be a positive multiple of 8"),
        ("--scheduler", "magic", "--scheduler: unknown value 'magic'"),
    ],
)
def test_bad_generate_flags(tiny_pipeline_dir, prompt_file, tmp_path, capsys, flag, value, needle):
    argv = [
        "generate",
        "--model",
        str(tiny_pipeline_dir),
        "--prompts",
        str(prompt_file),
        "--out",
        str(tmp_path / "g"),
        flag,
        value,
    ]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_give_the_same_images_in_one_manifest(
    tiny_pipeline_dir, prompt_file, tmp_path
):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    generate(str(tiny_pipeline_dir), prompt_file, single, settings=GenerateSettings(steps=2))
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    res = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "-m",
            "loreun.cli",
            "generate",
            "--model",
            str(tiny_pipeline_dir),
            "--prompts",
            str(prompt_file),
            "--out",
            str(ddp),
            "--steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert not list(ddp.glob(".manifest-rank*"))
    assert [r["key"] for r in read_manifest(ddp)] == [r["key"] for r in read_manifest(single)]
    assert_same_images(ddp, single)


def test_rows_with_their_own_guidance_share_one_batch(tiny_pipeline_dir, tmp_path):
    """I2P rows each have a guidance; batched together, every image still matches its row
    generated alone by the plain diffusers pipeline, within one gray level (guidance 1 included,
    where the pipeline skips guidance)."""
    import numpy as np
    import torch
    from PIL import Image

    from loreun.pipelines.generate import Job, batches
    from loreun.pipelines.models import load_pipeline
    from loreun.prompts import PromptRow

    guidances, seeds = [1.0, 2.0, 5.5, 9.0], [3, 2**32 - 1, 40, 41]
    rows = [
        PromptRow(id=str(i), prompt=p, seed=s, guidance=g)
        for i, (p, s, g) in enumerate(zip(["a cat", "a dog", "a bird", "a cow"], seeds, guidances))
    ]
    jobs = [Job(i, 0, r, r.seed, r.guidance, 32, 32) for i, r in enumerate(rows)]
    assert len(batches(jobs, 4, mixed_guidance=True)) == 1
    assert len(batches(jobs, 4, mixed_guidance=False)) == 4
    out = tmp_path / "g"
    generate(str(tiny_pipeline_dir), rows, out, settings=GenerateSettings(steps=4, batch_size=4))
    pipe = load_pipeline(str(tiny_pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    for rec, row in zip(read_manifest(out), rows):
        alone = pipe(
            row.prompt,
            generator=torch.Generator().manual_seed(row.seed),
            guidance_scale=row.guidance,
            num_inference_steps=4,
        ).images[0]
        ours = Image.open(out / rec["path"])
        diff = np.abs(np.asarray(alone, dtype=int) - np.asarray(ours, dtype=int)).max()
        assert rec["guidance"] == row.guidance and diff <= 1


def test_sdxl_batches_keep_one_guidance(tmp_path):
    from loreun.pipelines.generate import mixes_guidance
    from loreun.pipelines.tiny import make_tiny_pipeline, make_tiny_sdxl_pipeline

    assert mixes_guidance(make_tiny_pipeline()) and not mixes_guidance(make_tiny_sdxl_pipeline())
