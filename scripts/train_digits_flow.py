"""Train the built-in flow model (SD3's architecture on the digits data and the digits VAE).

python scripts/train_digits_flow.py --out pipelines/builtin/digits-flow
python scripts/train_digits_flow.py --out runs/flow-retrain-3 --exclude-digit 3
"""

from __future__ import annotations

import argparse
import time

from loreun.pipelines.digits_flow import FlowTrainConfig, train_flow_pipeline
from loreun.pipelines.models import BUILTIN_MODELS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the diffusers pipeline")
    p.add_argument("--exclude-digit", type=int, help="leave this digit out (retrain reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=FlowTrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=FlowTrainConfig.batch_size)
    a = p.parse_args(argv)
    start = time.time()
    cfg = FlowTrainConfig(
        seed=a.seed, exclude_digit=a.exclude_digit, steps=a.steps, batch_size=a.batch_size
    )
    train_flow_pipeline(a.out, cfg, vae_from=BUILTIN_MODELS["digits"])
    print(f"trained in {time.time() - start:.0f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
