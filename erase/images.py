"""Forget and retain items from a folder of images, with their captions.

Captions come, in this order, from one caption for all (``--forget-caption``), a
``metadata.jsonl`` or ``metadata.csv`` beside the images (the layout of Hugging Face
``imagefolder`` datasets: a ``file_name`` column and a ``text``/``caption``/``prompt`` column), or
a ``.txt`` file with the same stem as each image. Every problem is found before any model loads.

Mixed sizes: every image is converted to RGB, resized so that its shorter side equals the
training resolution, and center-cropped to a square, as diffusers' text-to-image training script
does with ``--center_crop``. Nothing is refused for its size; a non-square image loses its edges.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from loreun.pipelines.files import IMAGE_SUFFIXES
from loreun.pipelines.image_files import open_rgb
from loreun.prompts.reader import jsonl_objects

CAPTION_COLUMNS = ("text", "caption", "prompt")
MAX_NAMED = 5


@dataclass(frozen=True)
class ImageItem:
    """One image and its caption. ``name`` is its path relative to the folder, with '/'."""

    path: Path
    name: str
    caption: str


def read_image_folder(folder: str, caption: str | None, flag: str) -> list[ImageItem]:
    """List a folder's images with their captions and check that every image opens in full.

    Args:
        folder: the folder, searched recursively (hidden files are skipped).
        caption: one caption for every image, or None to read the folder's captions.
        flag: the CLI flag that named the folder, for error messages.

    Raises:
        FileNotFoundError / ValueError with one line naming the folder, file or row.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{flag}: {folder}: no such folder")
    images = {
        p.relative_to(root).as_posix(): p
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }
    if not images:
        raise ValueError(f"{flag}: {folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    captions = {n: caption for n in images} if caption else folder_captions(root, images, flag)
    check_readable(root, images, flag)
    return [ImageItem(images[n], n, captions[n]) for n in images]


def folder_captions(root: Path, images: dict[str, Path], flag: str) -> dict[str, str]:
    """Captions from metadata.jsonl, metadata.csv or sidecar .txt files: name -> caption."""
    if (root / "metadata.jsonl").is_file():
        rows = _jsonl_rows(root / "metadata.jsonl", flag)
    elif (root / "metadata.csv").is_file():
        rows = _csv_rows(root / "metadata.csv", flag)
    else:
        return _sidecar_captions(root, images, flag)
    out: dict[str, str] = {}
    for where, name, text in rows:
        if name not in images:
            raise ValueError(f"{flag}: {where}: {name!r} matches no image in {root}")
        if not text.strip():
            raise ValueError(f"{flag}: {where}: the caption of {name!r} is empty")
        out[name] = text.strip()
    _check_all_captioned(images, out, flag, root)
    return out


def _jsonl_rows(path: Path, flag: str) -> list[tuple[str, str, str]]:
    try:
        objects = jsonl_objects(path)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from e
    return [
        (f"{path} line {n}", *_name_and_caption(row, f"{path} line {n}", flag))
        for n, row in objects
    ]


def _csv_rows(path: Path, flag: str) -> list[tuple[str, str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        return [
            (f"{path} row {n}", *_name_and_caption(row, f"{path} row {n}", flag))
            for n, row in enumerate(reader, start=2)
        ]


def _name_and_caption(row: dict, where: str, flag: str) -> tuple[str, str]:
    name = row.get("file_name")
    text = next((row[c] for c in CAPTION_COLUMNS if row.get(c) is not None), None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{flag}: {where}: no file_name")
    if not isinstance(text, str):
        raise ValueError(f"{flag}: {where}: no caption (a {'/'.join(CAPTION_COLUMNS)} column)")
    return name.replace("\\", "/").removeprefix("./"), text


def _sidecar_captions(root: Path, images: dict[str, Path], flag: str) -> dict[str, str]:
    sidecars = {
        p.relative_to(root).with_suffix("").as_posix(): p
        for p in root.rglob("*.txt")
        if not any(part.startswith(".") for part in p.relative_to(root).parts)
    }
    if not sidecars:
        raise ValueError(
            f"{flag}: {root}: no captions; add metadata.jsonl, metadata.csv or a .txt per image, "
            "or give one caption for all"
        )
    stems = {Path(n).with_suffix("").as_posix(): n for n in images}
    orphans = sorted(s for s in sidecars if s not in stems)
    if orphans:
        raise ValueError(f"{flag}: {sidecars[orphans[0]]} matches no image")
    out = {}
    for stem, p in sidecars.items():
        text = p.read_text(encoding="utf-8-sig").strip()
        if not text:
            raise ValueError(f"{flag}: {p}: the caption is empty")
        out[stems[stem]] = text
    _check_all_captioned(images, out, flag, root)
    return out


def _check_all_captioned(images: dict, captions: dict, flag: str, root: Path) -> None:
    missing = [n for n in images if n not in captions]
    if missing:
        raise ValueError(f"{flag}: {root}: no caption for {_names(missing)}")


def check_readable(root: Path, images: dict[str, Path], flag: str) -> None:
    """Decode every image in full: a truncated file fails here, not halfway through training;
    one too large to decode safely is named with its size."""
    bad = []
    for name, path in images.items():
        try:
            open_rgb(path)
        except (OSError, SyntaxError):
            bad.append(name)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
    if bad:
        raise ValueError(f"{flag}: {root}: unreadable or truncated images: {_names(bad)}")


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMED])
    return shown + (f" (and {len(names) - MAX_NAMED} more)" if len(names) > MAX_NAMED else "")


def load_image_tensor(path: Path, size: int):
    """RGB, shorter side resized to ``size``, center-cropped: -> [3, size, size] in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    with open_rgb(path) as im:
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        im = im.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def folder_key(items: list[ImageItem], resolution: int) -> list:
    """What the cached latents depend on: names, captions, sizes, modification times."""
    return [
        [it.name, it.caption, it.path.stat().st_size, it.path.stat().st_mtime_ns] for it in items
    ] + [resolution]
