"""Write the built-in digits model's training images as captioned image folders.

    python -m loreun.pipelines.digit_images --digit 8 --out runs/digit-8

makes ``runs/digit-8/forget`` (every training image of the digit) and ``runs/digit-8/retain``
(20 images of each other digit), each with a ``metadata.jsonl`` of captions, ready for
``loreun erase --forget-images ... --retain-images ...``. Needs scikit-learn
(``pip install 'loreun[train-digits]'``).
"""

from __future__ import annotations

import argparse

from loreun.pipelines.digits_data import write_digit_folders


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--digit", type=int, required=True, choices=range(10), metavar="0-9")
    p.add_argument("--out", required=True, help="new folder for forget/ and retain/")
    p.add_argument("--retain-per-digit", type=int, default=20)
    a = p.parse_args(argv)
    forget, retain = write_digit_folders(a.out, a.digit, a.retain_per_digit)
    for folder in (forget, retain):
        print(f"{folder}: {sum(1 for _ in folder.glob('*.png'))} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
