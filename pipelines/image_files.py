"""Reading a user's image file as 8-bit RGB, the one way erase and audit both read them.

PIL's own ``convert("RGB")`` clips a 16-bit grayscale PNG (values up to 65535) to white, and a
file that declares 30000x30000 pixels is decoded before anything can refuse it. Both are real
files users have: scans, microscopy, renders.
"""

from __future__ import annotations

from pathlib import Path

# Far above any model's input (SDXL: 1024x1024), far below what exhausts memory when decoded.
MAX_PIXELS = 8192 * 8192


def open_rgb(path: str | Path):
    """The image at ``path`` as a decoded 8-bit RGB ``PIL.Image``.

    16- and 32-bit integer images are scaled down to 8 bits by their own bit depth (not
    clipped); float images are taken as [0, 1].

    Raises:
        ValueError: more than ``MAX_PIXELS`` pixels declared, naming the file and its size, or
            not a regular file.
        OSError: a file PIL cannot decode (truncated, not an image).
    """
    import os
    import stat
    import warnings

    from PIL import Image

    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO named x.png would block the read
        raise ValueError(f"{path}: not a regular file (a FIFO, a device or a socket)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(
                f"{path}: declares over {Image.MAX_IMAGE_PIXELS} pixels; images are read up to "
                "8192x8192"
            ) from None
    with im:
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise ValueError(f"{path}: {w}x{h} pixels; images are read up to 8192x8192")
        im.load()  # a truncated file fails here, not halfway through a run
        return _to_rgb8(im)


def _to_rgb8(im):
    """8-bit RGB from any PIL mode, keeping the full range of deep images."""
    import numpy as np
    from PIL import Image

    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        arr = np.asarray(im, dtype=np.uint16).astype(np.float64) / 65535.0
    elif im.mode == "I":  # 32-bit integers: PIL's mode for 16-bit PNGs in some versions
        arr = np.asarray(im, dtype=np.int64).astype(np.float64)
        arr = arr / (65535.0 if arr.max(initial=0) <= 65535 else float(2**31 - 1))
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
    else:
        return im.convert("RGB")
    gray = np.clip(np.round(np.nan_to_num(arr) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")
