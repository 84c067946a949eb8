"""The fid detector: torchmetrics' FID and KID on from-disk features, and its offline errors."""

import json

import numpy as np
import pytest
from PIL import Image

from loreun.cli.main import main
from loreun.eval.fid import FidDetector, inception_weights_path, to_tensor


def _digit_folder(folder, digits, n=30):
    """Real images: scikit-learn's 8x8 handwritten digits, upscaled to 32x32 RGB PNGs."""
    from sklearn.datasets import load_digits

    data = load_digits()
    folder.mkdir(parents=True)
    picked = [i for i, t in enumerate(data.target) if t in digits][:n]
    images = []
    for i in picked:
        im = Image.fromarray((data.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32))
        im = im.convert("RGB")
        im.save(folder / f"{i:05d}.png")
        images.append(im)
    return images


def _fid_formula(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_fid_matches_the_formula_and_is_zero_against_itself(tmp_path):
    low = _digit_folder(tmp_path / "low", {0, 1, 2, 3, 4}, n=60)
    high = _digit_folder(tmp_path / "high", {5, 6, 7, 8, 9}, n=60)
    det = FidDetector(tmp_path / "low", "digits", batch_size=16)
    assert det.reference_images == 60 and det.features.name.startswith("digits")
    assert det(high, [{}] * 60) == [{}] * 60
    other = det.summarize([], [])
    det(low, [{}] * 60)
    same = det.summarize([], [])

    def feats(images):
        return det.features.net(to_tensor(images, det.features.size)).detach().double().numpy()

    want = _fid_formula(feats(low), feats(high))
    assert other["fid"] == pytest.approx(want, rel=2e-3)
    assert abs(same["fid"]) < 1e-3 * want
    assert other["kid"] > same["kid"] and other["images"] == same["images"] == 60
    assert other["rows"] == [["FID", other["fid"]], ["KID", other["kid"]]]


def test_audit_with_fid_writes_fid_and_kid_per_source(tmp_path, capsys):
    _digit_folder(tmp_path / "a", {0, 1, 2}, n=20)
    _digit_folder(tmp_path / "b", {7, 8, 9}, n=20)
    argv = [
        "audit", "--images", f"a={tmp_path / 'a'}", "--images", f"b={tmp_path / 'b'}",
        "--detector", "fid", "--fid-features", "digits", "--reference", str(tmp_path / "a"),
        "--out", str(tmp_path / "audit"), "-q",
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "audit" / "summary.json").read_text())
    a, b = summary["sources"]["a"]["fid"], summary["sources"]["b"]["fid"]
    assert b["fid"] > 10 * max(abs(a["fid"]), 1e-3)
    assert a["reference"] == str(tmp_path / "a") and a["reference_images"] == 20
    assert b["features"] == "digits (penultimate layer)" and b["kid_std"] is not None
    assert "FID" in capsys.readouterr().out


def test_fid_errors_name_the_flag_and_what_to_fetch(tmp_path, monkeypatch, capsys):
    import urllib.error

    import torchmetrics.utilities.imports as tm_imports

    from loreun.eval import fid

    _digit_folder(tmp_path / "a", {1}, n=4)
    base = ["audit", "--images", str(tmp_path / "a"), "--detector", "fid", "-q"]
    cases = [
        ([], "--reference: the fid detector needs a reference image folder"),
        (["--reference", str(tmp_path / "none")], f"--reference: {tmp_path / 'none'}: no such"),
        (["--reference", str(tmp_path / "a"), "--fid-features", str(tmp_path / "x")],
         f"--fid-features: {tmp_path / 'x'} is not a loadable fid-features model"),
    ]  # fmt: skip
    monkeypatch.setattr(tm_imports, "_TORCH_FIDELITY_AVAILABLE", False)
    cases.append(
        (["--reference", str(tmp_path / "a")], "needs torch-fidelity (pip install 'loreun[fid]')")
    )
    for extra, message in cases:
        assert main(base + extra + ["--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    monkeypatch.setattr(tm_imports, "_TORCH_FIDELITY_AVAILABLE", True)

    def offline():
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(fid, "_inception_net", offline)
    with pytest.raises(ValueError) as err:
        fid.inception_features()
    assert fid.INCEPTION_URL in str(err.value) and inception_weights_path() in str(err.value)
    assert inception_weights_path().endswith("checkpoints/" + fid.INCEPTION_FILE)
