"""Forget and retain items from image folders: captions, checks, sizes, and errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from loreun.cli.main import main
from loreun.erase.images import load_image_tensor, read_image_folder

from .conftest import erase_cli

FLAG = "--forget-images"


def _png(path, size=(20, 12), value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _folder(tmp_path, n=3, name="imgs"):
    root = tmp_path / name
    for i in range(n):
        _png(root / f"im{i}.png", value=i)
    return root


def test_metadata_jsonl_captions(tmp_path):
    root = _folder(tmp_path)
    _png(root / "sub" / "deep.jpg", value=9)
    rows = [{"file_name": f"im{i}.png", "text": f"cap {i}"} for i in range(3)]
    rows.append({"file_name": "sub/deep.jpg", "caption": "deep one"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items = read_image_folder(str(root), None, FLAG)
    assert {it.name: it.caption for it in items} == {
        "im0.png": "cap 0",
        "im1.png": "cap 1",
        "im2.png": "cap 2",
        "sub/deep.jpg": "deep one",
    }


def test_metadata_csv_sidecars_and_one_caption(tmp_path):
    a = _folder(tmp_path, name="a")
    (a / "metadata.csv").write_text("file_name,prompt\nim0.png,x\nim1.png,y\nim2.png,z\n")
    assert [it.caption for it in read_image_folder(str(a), None, FLAG)] == ["x", "y", "z"]
    b = _folder(tmp_path, name="b")
    for i in range(3):
        (b / f"im{i}.txt").write_text(f" side {i}\n")
    assert [it.caption for it in read_image_folder(str(b), None, FLAG)] == [
        "side 0",
        "side 1",
        "side 2",
    ]
    # one caption for all wins over whatever the folder holds
    assert {it.caption for it in read_image_folder(str(b), "all of them", FLAG)} == {"all of them"}


def _error(tmp_path, root, caption=None):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        read_image_folder(str(root), caption, FLAG)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(FLAG)
    return msg


def test_folder_errors_name_the_problem(tmp_path):
    assert "no such folder" in _error(tmp_path, tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    assert "holds no images" in _error(tmp_path, empty)
    bare = _folder(tmp_path, name="bare")
    assert "no captions" in _error(tmp_path, bare)


def test_truncated_and_unreadable_images_are_named(tmp_path):
    root = _folder(tmp_path, n=2)
    data = _png(root / "cut.png", size=(64, 64), value=5).read_bytes()
    (root / "cut.png").write_bytes(data[: len(data) // 2])
    (root / "junk.jpg").write_bytes(b"not an image at all")
    msg = _error(tmp_path, root, caption="x")
    assert "unreadable or truncated" in msg and "cut.png" in msg and "junk.jpg" in msg
    assert "im0.png" not in msg


def test_captions_that_match_no_image(tmp_path):
    root = _folder(tmp_path)
    rows = [{"file_name": f"im{i}.png", "text": "c"} for i in range(3)]
    rows.append({"file_name": "ghost.png", "text": "c"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    msg = _error(tmp_path, root)
    assert "metadata.jsonl line 4" in msg and "'ghost.png' matches no image" in msg

    side = _folder(tmp_path, name="side")
    for i in range(3):
        (side / f"im{i}.txt").write_text("c")
    (side / "orphan.txt").write_text("c")
    assert "orphan.txt matches no image" in _error(tmp_path, side)


def test_image_without_caption_is_named(tmp_path):
    root = _folder(tmp_path)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "im0.png", "text": "c"}))
    msg = _error(tmp_path, root)
    assert "no caption for im1.png, im2.png" in msg


def test_mixed_sizes_are_resized_and_center_cropped(tmp_path):
    wide = _png(tmp_path / "wide.png", size=(40, 20))
    tall = _png(tmp_path / "tall.png", size=(9, 31))
    for p in (wide, tall):
        x = load_image_tensor(p, 16)
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0
    # a square image already at the size is unchanged, up to the [-1, 1] mapping
    sq = _png(tmp_path / "sq.png", size=(16, 16), value=3)
    arr = np.asarray(Image.open(sq).convert("RGB"), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(load_image_tensor(sq, 16), torch.from_numpy(arr).permute(2, 0, 1))


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--concept", "a cat", "--retain-weight", "0.5"], "--retain-weight: 0.5 needs a retain"),
        (["--concept", "a cat", "--saliency", "0"], "--saliency: must be in (0, 1]"),
        (["--concept", "a cat", "--saliency", "1.5"], "--saliency: must be in (0, 1]"),
        (["--concept", "a cat", "--saliency", "-0.2"], "--saliency: must be in (0, 1]"),
        (["--concept", "a cat", "--objective", "remap"], "--anchor: the remap objective needs"),
        (
            ["--concept", "a cat", "--objective", "remap", "--anchor", "A Cat"],
            "--anchor: 'A Cat' is also a forget prompt",
        ),
        (
            ["--concept", "a cat", "--objective", "ga", "--xt-source", "partial-train"],
            "--xt-source: ga trains on forward-noised",
        ),
        (["--forget-images", "x", "--concept", "a cat"], "--forget-images: give either"),
        (["--concept", "a cat", "--forget-caption", "x"], "--forget-caption: only used with"),
    ],
)
def test_bad_erase_settings_fail_in_one_line(tmp_path, capsys, flags, needle):
    code = main(erase_cli(tmp_path / "no-model", tmp_path / "out", *flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_folder_errors_come_before_the_model_loads(tmp_path, capsys):
    forget = _folder(tmp_path)
    (forget / "metadata.csv").write_text("file_name,text\nim0.png,a cat\nim1.png,a cat\n")
    empty = tmp_path / "empty-retain"
    empty.mkdir()
    cases = [
        (["--forget-images", forget], "no caption for im2.png"),
        (
            ["--forget-images", forget, "--forget-caption", "a cat", "--retain-images", empty],
            "--retain-images: ",
        ),
        (
            ["--forget-images", forget, "--forget-caption", "a cat", "--objective", "remap"]
            + ["--anchor", "a cat"],
            "--anchor: 'a cat' is also a forget prompt",
        ),
    ]
    for flags, needle in cases:
        code = main(erase_cli(tmp_path / "no-model", tmp_path / "out", *flags))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], err
        assert not (tmp_path / "out").exists()
    # the anchor is also checked against every caption read from the folder
    (forget / "metadata.csv").write_text(
        "file_name,text\nim0.png,a cat\nim1.png,a dog\nim2.png,a cat\n"
    )
    code = main(
        erase_cli(tmp_path / "no-model", tmp_path / "out", "--forget-images", forget)
        + ["--objective", "remap", "--anchor", "a dog"]
    )
    assert code == 2 and "'a dog' is also a forget prompt" in capsys.readouterr().err


def test_digit_folders_hold_only_the_digit_and_read_back(tmp_path):
    from loreun.pipelines.digits_data import digit_captions, write_digit_folders

    forget, retain = write_digit_folders(tmp_path / "d", 8, retain_per_digit=3)
    items = read_image_folder(str(forget), None, FLAG)
    assert len(items) > 100 and {it.caption for it in items} == set(digit_captions(8))
    kept = read_image_folder(str(retain), None, "--retain-images")
    assert len(kept) == 27
    assert not any(it.caption in digit_captions(8) for it in kept)
    assert Image.open(items[0].path).size == (16, 16)
    with pytest.raises(FileExistsError):  # never writes into an existing folder
        write_digit_folders(tmp_path / "d", 8)
