"""Image sources of an audit: a generation folder (its manifest) or a plain folder of images,
read into records and decoded. Shared by the audit and the FID detector, which imports them from
here rather than from the audit that runs it."""

from __future__ import annotations

from pathlib import Path

from loreun.pipelines.files import IMAGE_SUFFIXES


def read_source(path: str | Path) -> list[dict]:
    """Records of a generation folder (manifest) or a plain image folder, with absolute paths."""
    from loreun.pipelines.files import MANIFEST
    from loreun.pipelines.generate import read_manifest

    path = Path(path)
    if path.is_file() and path.name.endswith(".jsonl"):
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"--images: {path}: no such folder")
    if (path / MANIFEST).is_file():
        records = read_manifest(path)
        for n, rec in enumerate(records, start=1):
            rec["file"] = str(inside(path, rec.get("path"), f"{path / MANIFEST}: record {n}"))
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for p in files:  # a FIFO or a device would block the read for ever
            regular_file(p, f"--images: {p}")
        records = [
            {"path": str(p.relative_to(path)), "file": str(p), "prompt": None, "class": None}
            for p in files
        ]
    if not records:
        raise ValueError(f"--images: {path}: holds no images and no manifest.jsonl")
    return records


def regular_file(path: Path, where: str) -> Path:
    """``path``, unless it exists and is no regular file (a FIFO named b.png hung the audit)."""
    if path.exists() and not path.is_file():
        raise ValueError(f"{where}: not a regular file")
    return path


def inside(folder: Path, rel, where: str) -> Path:
    """``folder / rel``, refusing a manifest path that leaves the folder (absolute or ``..``):
    an audit reads the images of the run it was pointed at, nothing else on the disk."""
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{where}: no image path")
    target = (folder / rel).resolve()
    if Path(rel).is_absolute() or not target.is_relative_to(folder.resolve()):
        raise ValueError(f"{where}: image path {rel!r} is outside {folder}")
    return regular_file(folder / rel, f"{where}: {rel}")


def open_images(records: list[dict], workers: int | None = None) -> tuple[list, list, list]:
    """Decode every image fully; unreadable, truncated or non-image files are set aside.

    Images decode on ``workers`` threads (torch's CPU thread count by default): Pillow releases
    the GIL while it inflates a PNG, so two cores decode two images at once.

    Returns:
        (images, their records, failures as {"path", "error"}), in the records' order
    """
    import torch

    workers = workers or torch.get_num_threads()
    if workers > 1 and len(records) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            decoded = list(pool.map(_decode, records))
    else:
        decoded = [_decode(rec) for rec in records]
    images, good, bad = [], [], []
    for rec, (image, error) in zip(records, decoded, strict=True):
        if error is None:
            images.append(image)
            good.append(rec)
        else:
            bad.append({"path": rec["path"], "error": error})
    return images, good, bad


def _decode(rec: dict) -> tuple[object, str | None]:
    """(the RGB image, None), or (None, the error) for a file that does not decode."""
    from loreun.pipelines.image_files import open_rgb

    try:
        return open_rgb(rec["file"]), None  # decoded in full: a truncated file fails here
    except (OSError, ValueError, SyntaxError) as e:
        return None, f"{type(e).__name__}: {e}"
