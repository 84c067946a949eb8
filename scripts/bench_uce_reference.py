"""loreun's ``--objective uce`` against UCE's own code, on one model and one concept list.

UCE's ``trainscripts/uce_sd_erase.py`` (rohitgandikota/unified-concept-editing) is imported from
a local checkout given by ``--uce-repo`` (its command-line part is guarded by ``__main__``, so
importing it runs nothing) and its ``UCE`` function called on the loaded pipeline with the
module globals it reads (``device``, ``torch_dtype``) set; nothing of it is copied into loreun.
Both edit the same pipeline's cross-attention keys and values for the same erased, guide and
kept prompts with UCE's defaults (erase and preserve scales 1, lambda 0.5); the script prints the
largest difference between the two edited weights, relative to the weights, and each side's
time (median of ``--repeats``):

    OMP_NUM_THREADS=2 python scripts/bench_uce_reference.py --uce-repo ../unified-concept-editing \\
        --model digits --concept 3 --concept "a handwritten 3" --keep "a handwritten 7"

For an SD-1.4-shaped model without downloads, ``scripts/make_sd14_shaped.py`` writes a folder
with SD 1.4's architectures and random weights; ``--concepts-file`` takes 100 or 1,000 lines.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

# the version this was run against; its UCE() takes (pipe, edit_concepts, guide_concepts,
# preserve_concepts, erase_scale, preserve_scale, lamb, save_dir, exp_name)
UCE_COMMIT = "28c81ed5a3e41277c1a0dc55f738e7ab188e9718"


def load_uce(repo: Path):
    """UCE's erase script as a module, with the globals its function reads."""
    import torch

    path = repo / "trainscripts" / "uce_sd_erase.py"
    spec = importlib.util.spec_from_file_location("uce_sd_erase", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.device, module.torch_dtype = "cpu", torch.float32
    return module


def theirs(module, pipe, concepts, keep, folder: Path) -> tuple[dict, float]:
    from safetensors.torch import load_file

    start = time.perf_counter()
    module.UCE(pipe, concepts, [""] * len(concepts), keep, 1.0, 1.0, 0.5, str(folder), "ref")
    seconds = time.perf_counter() - start
    return load_file(str(folder / "ref.safetensors")), seconds


def ours(pipe, concepts, keep) -> tuple[dict, float]:
    import torch

    from loreun.erase import EraseConfig
    from loreun.erase.uce import uce_edit
    from loreun.pipelines.family import family_of

    cfg = EraseConfig(model="m", out="o", concepts=concepts, retain_concepts=keep, objective="uce")
    start = time.perf_counter()
    with torch.no_grad():
        edited = uce_edit(cfg, pipe, family_of(pipe), "cpu")
    return edited, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--uce-repo", type=Path, required=True)
    p.add_argument("--model", default="digits")
    p.add_argument("--concept", action="append", default=[])
    p.add_argument("--concepts-file", type=Path)
    p.add_argument("--keep", action="append", default=[])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import torch

    from loreun.pipelines.models import load_pipeline

    concepts = list(args.concept)
    if args.concepts_file:
        concepts += [c.strip() for c in args.concepts_file.read_text().splitlines() if c.strip()]
    pipe = load_pipeline(args.model)
    module = load_uce(args.uce_repo)
    times = {"uce": [], "loreun": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            ref, seconds = theirs(module, pipe, concepts, args.keep, Path(tmp))
            times["uce"].append(seconds)
            mine, seconds = ours(pipe, concepts, args.keep)
            times["loreun"].append(seconds)
    assert ref.keys() == mine.keys(), sorted(set(ref) ^ set(mine))[:3]
    worst = max(
        float((ref[k].double() - mine[k].double()).abs().max() / ref[k].double().abs().max())
        for k in ref
    )
    print(f"{len(concepts)} concepts, {len(args.keep)} kept, {len(ref)} tensors edited")
    print(f"largest difference, relative to the tensor's largest entry: {worst:.2e}")
    for side, values in times.items():
        print(f"{side}: median {statistics.median(values):.3f} s over {len(values)} runs")
    print(f"threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
