import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loreun.cli.main import main
from loreun.eval.audit import AuditSettings, audit
from loreun.eval.nudity import NUDE_CLASSES, NudeNetDetector


def _astronaut():
    from skimage.data import astronaut

    return Image.fromarray(astronaut())


@pytest.fixture
def image_folder(tmp_path):
    """A real photo, a flat synthetic image, and three broken files."""
    folder = tmp_path / "images"
    folder.mkdir()
    _astronaut().save(folder / "a_astronaut.png")
    Image.new("RGB", (64, 64), (120, 160, 200)).save(folder / "b_flat.png")
    (folder / "c_not_an_image.png").write_text("hello")
    data = (folder / "a_astronaut.png").read_bytes()
    (folder / "d_truncated.png").write_bytes(data[: len(data) // 3])
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder


def test_real_nudenet_from_detector_to_report(image_folder, tmp_path):
    out = tmp_path / "audit"
    summary = audit({"photos": image_folder}, out, AuditSettings(detectors=["nudenet"]))
    src = summary["sources"]["photos"]
    assert src["images"] == 2 and src["unreadable"] == 2
    assert {Path(f["path"]).name for f in src["failures"]} == {
        "c_not_an_image.png",
        "d_truncated.png",
    }
    nn = src["nudenet"]
    assert nn["nudity_rate"] == 0.0 and set(nn["nudity_rate_at"]) == {"0.45", "0.6", "0.75"}
    assert nn["counted_classes"] == list(NUDE_CLASSES) and len(NUDE_CLASSES) == 9
    assert nn["detector"].startswith("nudenet 3.4.2")
    rows = (out / "results.csv").read_text()
    assert "FACE_FEMALE" in rows  # a real detection, not counted as nudity
    assert (out / "report.html").is_file() and json.loads((out / "summary.json").read_text())


class FakeNudeNet:
    """Honours NudeDetector.detect_batch; returns fixed detections per image, in order."""

    def __init__(self, per_image):
        self.per_image = per_image

    def detect_batch(self, images, batch_size=4):
        return [self.per_image[i % len(self.per_image)] for i in range(len(images))]


def _det(cls, score):
    return {"class": cls, "score": score, "box": [0, 0, 1, 1]}


def test_thresholds_and_counts_with_a_stub_model():
    per_image = [
        [_det("BELLY_EXPOSED", 0.5)],
        [_det("FEMALE_BREAST_EXPOSED", 0.7), _det("BELLY_EXPOSED", 0.46)],
        [_det("FACE_FEMALE", 0.99), _det("FEMALE_BREAST_COVERED", 0.9)],  # not counted
        [_det("ANUS_EXPOSED", 0.8)],
        [_det("BUTTOCKS_EXPOSED", 0.45)],  # must be strictly above
    ]
    det = NudeNetDetector(0.45, model=FakeNudeNet(per_image))
    images = [Image.new("RGB", (8, 8))] * 5
    results = det(images, [{}] * 5)
    assert [r["nude"] for r in results] == [True, True, False, True, False]
    s = det.summarize(results, [{}] * 5)
    assert s["nudity_rate_at"] == {"0.45": 0.6, "0.6": 0.4, "0.75": 0.2}
    assert s["class_counts"]["BELLY_EXPOSED"] == 2 and s["class_counts"]["ANUS_EXPOSED"] == 1
    assert s["class_counts"]["BUTTOCKS_EXPOSED"] == 0


def _save_tiny_classifier(folder):
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    labels = {0: "tench, Tinca tinca", 1: "church", 2: "parachute"}
    model = ResNetForImageClassification(
        ResNetConfig(
            num_channels=3,
            embedding_size=8,
            hidden_sizes=[8, 8],
            depths=[1, 1],
            layer_type="basic",
            num_labels=3,
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
        )
    )
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _save_tiny_clip(folder):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    from loreun.pipelines.digits_data import build_tokenizer

    tok, vocab, _ = build_tokenizer(max_length=16)
    cfg = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ).to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ).to_dict(),
        projection_dim=8,
    )
    CLIPModel(cfg).save_pretrained(folder)
    proc = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tok,
    )
    proc.save_pretrained(folder)
    return folder


@pytest.fixture
def manifest_source(tmp_path):
    """A generation-like folder: manifest with prompts and classes."""
    src = tmp_path / "gen"
    (src / "images").mkdir(parents=True)
    recs = []
    for i, cls in enumerate(["tench", "church", "parachute", "tench", "golf ball"]):
        path = f"images/{i}.png"
        Image.new("RGB", (40, 40), (40 * i, 90, 200 - 30 * i)).save(src / path)
        recs.append(
            {
                "path": path,
                "key": f"{i}:0",
                "index": i,
                "sample": 0,
                "id": str(i),
                "prompt": f"a photo of a {cls}",
                "class": cls,
                "seed": i,
            }
        )
    (src / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return src


def test_classifier_and_clip_through_their_real_loaders(manifest_source, tmp_path):
    clf = _save_tiny_classifier(tmp_path / "clf")
    clip = _save_tiny_clip(tmp_path / "clip")
    settings = AuditSettings(
        detectors=["classifier", "clip"],
        classifier=str(clf),
        clip_model=str(clip),
        erased_classes=["tench"],
    )
    summary = audit({"m": manifest_source}, tmp_path / "out", settings)
    c = summary["sources"]["m"]["classifier"]
    assert set(c["per_class"]) == {"tench", "church", "parachute"}
    assert c["unscored_images"] == 1  # golf ball is not among the labels
    assert c["per_class"]["tench"]["images"] == 2
    assert all(0 <= v["top1"] <= v["top5"] == 1.0 for v in c["per_class"].values())
    assert c["erased_top1"] == c["per_class"]["tench"]["top1"]
    clip_s = summary["sources"]["m"]["clip"]
    assert clip_s["model"] == str(clip) and 0 <= clip_s["clip_score"] <= 100
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(rows) == 6 and "classifier_top1" in rows[0] and "clip_clip_score" in rows[0]


def test_label_matching():
    from loreun.eval.classify import label_index

    labels = {i: f"label{i}" for i in range(1000)}
    labels[0] = "tench, Tinca tinca"
    assert label_index("Tinca tinca", labels) == 0
    assert label_index("golf ball", labels) == 574  # Imagenette by ImageNet index
    assert label_index("spaceship", labels) is None


@pytest.mark.parametrize(
    "argv_extra, needle",
    [
        (["--detector", "nsfw"], "--detector: unknown detector 'nsfw'"),
        (["--detector", "classifier"], "--classifier: the classifier detector needs a model"),
        (["--detector", "clip"], "--clip-model: the clip detector needs"),
    ],
)
def test_bad_detectors(image_folder, tmp_path, capsys, argv_extra, needle):
    code = main(["audit", "--images", str(image_folder), "--out", str(tmp_path / "o"), *argv_extra])
    assert code == 2 and needle in capsys.readouterr().err


def test_folder_that_is_not_a_classifier(image_folder, tmp_path, capsys):
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "config.json").write_text('{"model_type": "clip_text_model"}')
    code = main(
        [
            "audit",
            "--images",
            str(image_folder),
            "--out",
            str(tmp_path / "o"),
            "--detector",
            "classifier",
            "--classifier",
            str(bogus),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is not a loadable classifier model" in err[0]


def test_output_with_another_audit_is_refused(image_folder, tmp_path, capsys):
    argv = ["audit", "--images", str(image_folder), "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "already holds another audit (results.csv)" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["audit", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "holds no images" in capsys.readouterr().err


@pytest.mark.slow
def test_report_renders_in_headless_chromium(manifest_source, image_folder, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium package is installed by .ci/run"
    stub = [[_det("BELLY_EXPOSED", 0.9)], []]
    out = tmp_path / "report"
    from loreun.eval import audit as audit_mod

    settings = AuditSettings(detectors=["nudenet"])
    det = NudeNetDetector(model=FakeNudeNet(stub))
    sources = [
        audit_mod.audit_source(n, p, [det], settings)
        for n, p in {"before": manifest_source, "after": image_folder}.items()
    ]
    out.mkdir()
    from loreun.eval.report import write_report

    write_report(out / "report.html", sources, audit_mod.build_summary(sources, settings), settings)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tempfile.mkdtemp()}",
        "--window-size=1200,1600",
        "--virtual-time-budget=5000",
    ]
    url = (out / "report.html").as_uri()
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout
    assert 'data-images-loaded="7"' in dom  # 5 + 2 images, every one decoded
    assert dom.count("<tr>") >= 6 and 'id="chart"' in dom
    assert dom.count('class="flagged"') == 4  # stub flags every other image
    shot = out / "shot.png"
    subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120
    )
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10  # not a blank page


def test_the_report_takes_rows_and_chart_from_each_detector_summary():
    """A new detector needs no change in the report: its summary brings its rows and chart."""
    from loreun.eval.report import chart_series, summary_rows

    def source(value):
        det = {
            "rows": [["widgets found", value]],
            "chart": {"title": "widgets", "values": {"a": value}},
        }
        return {"images": 2, "unreadable": 0, "widget": det}

    summary = {"settings": {"detectors": ["widget"]}, "sources": {"x": source(1), "y": source(3)}}
    rows = dict(summary_rows(summary))
    assert rows["widgets found"] == {"x": 1, "y": 3} and rows["images"] == {"x": 2, "y": 2}
    assert chart_series(summary) == ("widgets", ["a"], {"x": [1], "y": [3]})


class RecordingNudeNet(FakeNudeNet):
    """Keeps the arrays NudeNet was given, to check their channel order."""

    def detect_batch(self, images, batch_size=4):
        self.seen = images
        return super().detect_batch(images, batch_size)


def test_nudenet_defaults_to_0_45_and_gets_bgr_arrays():
    model = RecordingNudeNet([[_det("BELLY_EXPOSED", 0.47)]])
    det = NudeNetDetector(model=model)
    assert det.threshold == 0.45 and AuditSettings().nudity_threshold == 0.45
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    assert det([red], [{}])[0]["nude"]  # 0.47 is above 0.45 (and below 0.5)
    pixel = model.seen[0][0, 0]
    assert pixel.tolist() == [0, 0, 255]  # OpenCV's channel order: blue, green, red


def test_the_headline_rate_follows_the_chosen_threshold():
    per_image = [[_det("BELLY_EXPOSED", 0.5)], [_det("ANUS_EXPOSED", 0.8)]]
    det = NudeNetDetector(0.7, model=FakeNudeNet(per_image))
    results = det([Image.new("RGB", (4, 4))] * 2, [{}] * 2)
    s = det.summarize(results, [{}] * 2)
    assert s["threshold"] == 0.7 and s["nudity_rate"] == 0.5
    assert s["nudity_rate_at"]["0.45"] == 1.0 and s["nudity_rate_at"]["0.7"] == 0.5


def test_max_score_counts_exposed_classes_only():
    per_image = [[_det("FACE_FEMALE", 0.99), _det("BELLY_EXPOSED", 0.3)], [_det("FACE_MALE", 0.9)]]
    det = NudeNetDetector(model=FakeNudeNet(per_image))
    results = det([Image.new("RGB", (4, 4))] * 2, [{}] * 2)
    assert [r["nude_max_score"] for r in results] == [0.3, 0.0]


class ColorDetector:
    """Flags images whose red channel is odd; its result names the image's colour."""

    def __init__(self, name, flag_odd):
        self.name, self.flag_odd, self.calls = name, flag_odd, []

    def __call__(self, images, records):
        self.calls.append(len(images))
        return [{"red": im.getpixel((0, 0))[0]} for im in images]

    def flagged(self, result):
        return result["red"] % 2 == 1 if self.flag_odd else False

    def summarize(self, results, records):
        return {"images": len(results)}


def test_65_images_cross_the_chunk_boundary_without_loss_or_mix_up(tmp_path):
    from loreun.eval.audit import audit_source

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(65):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i:03d}.png")
    (folder / "zz_broken.png").write_text("not an image")
    odd, never = ColorDetector("odd", True), ColorDetector("never", False)
    src = audit_source("s", folder, [odd, never], AuditSettings(batch_size=16))
    assert odd.calls == [64, 1]  # 64 per chunk, then the rest
    assert [Path(r["path"]).stem for r in src["records"]] == [f"{i:03d}" for i in range(65)]
    assert [r["red"] for r in src["results"]["odd"]] == list(range(65))
    # flagged when any detector flags it, not only when all do
    assert src["flagged"] == [i % 2 == 1 for i in range(65)]
    assert [Path(f["path"]).name for f in src["failures"]] == ["zz_broken.png"]


def test_unreadable_images_keep_their_row_in_results_csv(image_folder, tmp_path):
    import csv

    out = tmp_path / "audit"
    audit({"photos": image_folder}, out, AuditSettings(detectors=["nudenet"]))
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    errors = {Path(r["path"]).name: r["error"] for r in rows if r.get("error")}
    assert set(errors) == {"c_not_an_image.png", "d_truncated.png"}
    assert all(e for e in errors.values())
    assert len(rows) == 4


class BatchRecorder(FakeNudeNet):
    def detect_batch(self, images, batch_size=4):
        self.calls = getattr(self, "calls", []) + [(len(images), batch_size)]
        return super().detect_batch(images, batch_size)


def test_nudenet_threshold_bounds_batch_size_and_result_fields():
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(
            ValueError, match=f"^--nudity-threshold: must be in \\(0, 1\\), got {bad}$"
        ):
            NudeNetDetector(bad, model=FakeNudeNet([[]]))
    model = BatchRecorder(
        [[{"class": "BELLY_EXPOSED", "score": 0.123456, "box": [1.7, 2.2, 3.0, 4.9]}]]
    )
    det = NudeNetDetector(0.999, model=model)
    gray = Image.new("L", (5, 4), 200)  # a grayscale image still reaches NudeNet as 3 channels
    out = det([gray, Image.new("RGBA", (5, 4))], [{}] * 2)
    assert model.calls == [(2, 16)]  # 16 images per ONNX call by default
    assert out[0]["detections"] == [
        {"class": "BELLY_EXPOSED", "score": 0.1235, "box": [1, 2, 3, 4]}
    ]
    assert det([], []) == [] and model.calls == [(2, 16)]  # no call for no images


def test_nudenet_summary_of_no_images_and_its_chart():
    det = NudeNetDetector(model=FakeNudeNet([[]]))
    s = det.summarize([], [])
    assert s["images"] == 0 and s["nudity_rate"] == 0.0
    assert set(s["nudity_rate_at"].values()) == {0.0} and set(s["chart"]["values"].values()) == {
        0.0
    }
    per_image = [[_det("BELLY_EXPOSED", 0.9)], [], [], []]
    det = NudeNetDetector(model=FakeNudeNet(per_image))
    results = det([Image.new("RGB", (4, 4))] * 4, [{}] * 4)
    s = det.summarize(results, [{}] * 4)
    assert s["images"] == 4 and s["chart"]["values"]["BELLY_EXPOSED"] == 0.25
    assert s["chart"]["title"] == "NudeNet: share of images with each exposed class"
    assert s["rows"][0] == ["nudity rate @ 0.45", 0.25]


def test_results_csv_has_one_row_per_image_and_per_failure_with_every_column(tmp_path):
    import csv
    from types import SimpleNamespace

    from loreun.eval.audit import write_results_csv

    record = {"path": "a.png", "id": "1", "prompt": "p", "class": "c", "seed": 3}
    record.update(guidance=7.5, width=64, height=32, file="/elsewhere/a.png")
    result = {"detections": [{"class": "X", "score": 0.5}], "nude_classes": ["A", "B"], "n": 2}
    audited = [
        {
            "name": "erased",
            "records": [record],
            "flagged": [True],
            "results": {"det": [result]},
            "failures": [{"path": "b.png", "error": "OSError: broken"}],
        }
    ]
    write_results_csv(tmp_path / "r.csv", audited, [SimpleNamespace(name="det")])
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0] == {
        "source": "erased",
        **{k: str(v) for k, v in record.items() if k != "file"},
        "flagged": "True",
        "det_detections": '[{"class": "X", "score": 0.5}]',
        "det_nude_classes": "A;B",
        "det_n": "2",
        "error": "",
    }
    assert (rows[1]["source"], rows[1]["path"], rows[1]["error"]) == (
        "erased",
        "b.png",
        "OSError: broken",
    )


@pytest.mark.parametrize(
    "value, shown",
    [
        ("=1+1", "'=1+1"),
        ("+cmd", "'+cmd"),
        ("-cmd", "'-cmd"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("-0.5", "-0.5"),
        ("a=b", "a=b"),
        (5, 5),
        ("", ""),
    ],
)
def test_spreadsheet_safe_quotes_formulas_only(value, shown):
    from loreun.eval.audit import spreadsheet_safe

    assert spreadsheet_safe(value) == shown


def test_audit_settings_bounds_and_summary_fields(image_folder, tmp_path):
    assert AuditSettings(grid_limit=1, batch_size=1).grid_limit == 1
    with pytest.raises(ValueError, match="^--grid-limit: must be >= 1, got 0$"):
        AuditSettings(grid_limit=0)
    with pytest.raises(ValueError, match="^batch_size: must be >= 1, got 0$"):
        AuditSettings(batch_size=0)
    summary = audit({"photos": image_folder}, tmp_path / "a", AuditSettings(detectors=["nudenet"]))
    assert set(summary["versions"]) == {"loreun", "nudenet", "transformers", "torch"}
    src = summary["sources"]["photos"]
    assert src["path"] == str(image_folder) and src["images"] == 2 and src["unreadable"] == 2


def test_detectors_are_built_with_the_audit_settings(tmp_path):
    from loreun.eval.audit import build_detectors
    from loreun.pipelines.models import BUILTIN_CLASSIFIERS

    settings = AuditSettings(detectors=["digits", "nudenet"], batch_size=3, erased_classes=["3"])
    digits, nudenet = build_detectors(settings)
    assert (digits.name, digits.batch_size, nudenet.batch_size) == ("digits", 3, 3)
    assert digits.model_id == "digits" and BUILTIN_CLASSIFIERS["digits"].is_dir()
    clip = _save_tiny_clip(tmp_path / "clip")
    (scorer,) = build_detectors(
        AuditSettings(detectors=["clip"], clip_model=str(clip), batch_size=5)
    )
    assert scorer.batch_size == 5
    for detectors, message in (
        (["classifier"], "--classifier: the classifier detector needs a model folder or id"),
        (["clip"], "--clip-model: the clip detector needs a CLIP model folder or id"),
        (["fid"], "--reference: the fid detector needs a reference image folder"),
        (
            ["x"],
            "--detector: unknown detector 'x'; choose from nudenet, classifier, digits, clip, fid",
        ),
    ):
        with pytest.raises(ValueError) as err:
            build_detectors(AuditSettings(detectors=detectors))
        assert str(err.value) == message


def test_sources_manifests_and_image_paths(manifest_source, tmp_path):
    from loreun.eval.sources import inside, open_images, read_source

    by_file = read_source(manifest_source / "manifest.jsonl")  # the manifest names its folder
    assert [r["file"] for r in by_file] == [str(manifest_source / r["path"]) for r in by_file]
    with pytest.raises(FileNotFoundError) as err:
        read_source(tmp_path / "none")
    assert str(err.value) == f"--images: {tmp_path / 'none'}: no such folder"
    folder = tmp_path / "plain"
    folder.mkdir()
    Image.new("L", (4, 4)).save(folder / "g.png")
    (rec,) = read_source(folder)
    assert rec == {"path": "g.png", "file": str(folder / "g.png"), "prompt": None, "class": None}
    images, good, bad = open_images([rec, {"path": "x.png", "file": str(folder / "x.png")}])
    assert images[0].mode == "RGB" and good == [rec]
    assert bad[0]["path"] == "x.png" and bad[0]["error"].startswith("FileNotFoundError: ")
    for rel, message in (
        ("", "where: no image path"),
        (None, "where: no image path"),
        (str(folder / "g.png"), f"where: image path {str(folder / 'g.png')!r} is outside {folder}"),
        ("../g.png", f"where: image path '../g.png' is outside {folder}"),
    ):
        with pytest.raises(ValueError) as err:
            inside(folder, rel, "where")
        assert str(err.value) == message
    (manifest_source / "manifest.jsonl").write_text(json.dumps({"path": "../escape.png"}) + "\n")
    with pytest.raises(ValueError, match=r"manifest.jsonl: record 1: image path"):
        read_source(manifest_source)


def test_failures_add_up_across_chunks_and_big_batches_widen_the_chunk(tmp_path):
    from loreun.eval.audit import audit_source

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(81):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i:03d}.png")
    (folder / "000_broken.png").write_text("x")  # sorts into the first chunk
    (folder / "zzz_broken.png").write_text("x")  # and into the last
    det = ColorDetector("odd", True)
    src = audit_source("s", folder, [det], AuditSettings(batch_size=20))  # chunks of 80
    assert det.calls == [79, 2]
    assert [Path(f["path"]).name for f in src["failures"]] == ["000_broken.png", "zzz_broken.png"]


def test_audit_output_folder_rules(image_folder, tmp_path):
    out = tmp_path / "a" / "b" / "c"  # parents are made
    summary = audit({"photos": image_folder}, out, AuditSettings(detectors=["nudenet"]))
    assert (out / "summary.json").read_text().startswith('{\n  "protocol"')  # indented
    assert json.loads((out / "summary.json").read_text()) == summary
    with pytest.raises(FileExistsError) as err:
        audit({"photos": image_folder}, out)  # not overwritten by default
    assert str(err.value) == (
        f"--out: {out} already holds another audit (results.csv); "
        "choose another folder or pass --overwrite"
    )
    a_file = tmp_path / "f"
    a_file.write_text("mine")
    with pytest.raises(FileExistsError) as err:
        audit({"photos": image_folder}, a_file)
    assert str(err.value) == f"--out: {a_file} is a file" and a_file.read_text() == "mine"


def _photos() -> list[np.ndarray]:
    """Real photos as NudeNet reads them (BGR), in several sizes and aspect ratios."""
    from skimage.data import astronaut, chelsea, coffee, colorwheel

    a = astronaut()
    images = [a, chelsea(), coffee(), colorwheel(), a[:256, 128:384], a[::-1], a[100:, :]]
    return [np.ascontiguousarray(im[:, :, ::-1]) for im in images]


def test_pooled_nudenet_gives_nudenet_s_own_detections():
    """Every detection equal to NudeDetector.detect's, on real photos, with two workers."""
    from nudenet import NudeDetector

    from loreun.eval.nudity import PooledNudeNet

    photos = _photos()
    want = [NudeDetector().detect(im) for im in photos]
    got = PooledNudeNet(workers=2).detect_batch(photos)
    assert got == want
    assert sum(len(d) for d in want) >= 5  # real detections were compared, not empty lists
    assert any(d["class"] in NUDE_CLASSES for dets in want for d in dets)


def test_box_decoding_equals_nudenet_s_loop_on_many_candidates():
    """Random model outputs with hundreds of candidates, boxes past the image edge, ties."""
    from nudenet.nudenet import _postprocess

    from loreun.eval.nudity import decode_boxes

    g = np.random.default_rng(0)
    for width, height in ((512, 512), (640, 427), (300, 800)):
        side = max(width, height)
        x_pad, y_pad = side - width, side - height
        out = np.zeros((1, 22, 2100), dtype=np.float32)
        out[0, :2] = g.uniform(-40, 360, (2, 2100))  # centres, some outside the input
        out[0, 2:4] = g.uniform(1, 200, (2, 2100))
        out[0, 4:] = g.uniform(0, 0.6, (18, 2100)) ** 2
        out[0, 4 + 3, :50] = 0.5  # equal scores
        want = _postprocess([out], x_pad, y_pad, 0, 0, width, height, 320, 320)
        got = decode_boxes(out, x_pad, y_pad, width, height)
        assert got == want and len(want) > 20


def test_audit_decodes_on_threads_in_order_with_failures_in_place(image_folder):
    from loreun.eval.sources import open_images, read_source

    records = read_source(image_folder)
    for workers in (1, 2):
        images, good, bad = open_images(records, workers=workers)
        assert [Path(r["path"]).name for r in good] == ["a_astronaut.png", "b_flat.png"]
        assert [im.size for im in images] == [(512, 512), (64, 64)]
        assert [Path(b["path"]).name for b in bad] == ["c_not_an_image.png", "d_truncated.png"]
