"""Train the built-in digits pipeline (and optionally its classifier), then measure it.

    python scripts/train_digits.py --out pipelines/builtin/digits \
        --classifier-out pipelines/builtin/digits-classifier
    python scripts/train_digits.py --out runs/retrain-3 --exclude-digit 3  # retrain reference
"""

from __future__ import annotations

import argparse
import json
import time

from loreun.pipelines.digits import (
    DigitsTrainConfig,
    train_digit_classifier,
    train_digits_pipeline,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the diffusers pipeline")
    p.add_argument("--classifier-out", help="also train the digit classifier into this folder")
    p.add_argument("--exclude-digit", type=int, help="leave this digit out (retrain reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=DigitsTrainConfig.vae_steps)
    p.add_argument("--unet-steps", type=int, default=DigitsTrainConfig.unet_steps)
    p.add_argument("--batch-size", type=int, default=DigitsTrainConfig.batch_size)
    a = p.parse_args(argv)
    start = time.time()
    if a.classifier_out:
        print(json.dumps(train_digit_classifier(a.classifier_out, seed=a.seed)))
    cfg = DigitsTrainConfig(
        seed=a.seed,
        exclude_digit=a.exclude_digit,
        vae_steps=a.vae_steps,
        unet_steps=a.unet_steps,
        batch_size=a.batch_size,
    )
    train_digits_pipeline(a.out, cfg)
    print(f"trained in {time.time() - start:.0f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
