"""Run the tests whose outcome depends on float rounding under other CPU kernels, and plant small
real changes to check that the golden tests still see them.

Another CPU rounds differently (AVX2 and AVX-512 BLAS and oneDNN kernels, another thread count),
so a test that compares computed floats holds on every machine only if its tolerance sits above
that rounding. One machine can force several kernels, which is how this script measures it:

    python scripts/numerics_check.py matrix   # the `numerics` tests under every kernel setting
    python scripts/numerics_check.py plant    # the golden tests against planted changes

``matrix`` runs ``pytest -m numerics`` once per setting: 1 and 2 threads; this CPU's own
instructions, or held to AVX2, or to the baseline (``ATEN_CPU_CAPABILITY`` for ATen's kernels,
``MKL_ENABLE_INSTRUCTIONS`` for MKL's BLAS, ``ONEDNN_MAX_CPU_ISA`` for oneDNN); oneDNN on and
off. It prints each golden test's largest error beside its tolerance, and fails if any run
fails. ``plant`` applies one small change at a time (a 1% larger ESD eta, the noise schedule one
timestep off, ...) and runs the golden tests: each change must turn them red, and the table
shows by how far. Both run on a copy of the repository's files in a staging folder
(git-ignored ``.numerics/``), so edits made meanwhile do not reach them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _staging import stage_repository  # scripts/ is on the path when a script runs

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / ".numerics"
GOLDEN = "tests/test_golden.py"

# (what it stands for, file, the line as it is, the line planted): each a one-line change that a
# refactoring could make by mistake, small enough that only a numerical test would notice.
PLANTS = (
    (
        "objective: ESD's eta 1% larger",
        "erase/objective_esd.py",
        "return eps_anchor - eta * (eps_concept - eps_uncond)",
        "return eps_anchor - 1.01 * eta * (eps_concept - eps_uncond)",
    ),
    (
        "schedule: alphas_cumprod read one timestep early",
        "pipelines/schedule.py",
        "a = self.alphas_cumprod.to(like.device)[t.to(like.device)].float().view(-1, 1, 1, 1)",
        "a = self.alphas_cumprod.to(like.device)[(t.to(like.device) - 1).clamp(min=0)]"
        ".float().view(-1, 1, 1, 1)",
    ),
    (
        "sampler: DDIM guidance 1% larger",
        "pipelines/schedule.py",
        "return self.scheduler.step(e_u + guidance * (e_c - e_u), t, x).prev_sample",
        "return self.scheduler.step(e_u + 1.01 * guidance * (e_c - e_u), t, x).prev_sample",
    ),
    (
        "trainer: the retain term 1% heavier",
        "erase/trainer.py",
        "loss = loss + cfg.retain_weight * retain_term",
        "loss = loss + 1.01 * cfg.retain_weight * retain_term",
    ),
    (
        "weighting: LoReUn's temperature 10% higher",
        "erase/weighting.py",
        "return scores.numel() * torch.softmax(-scores / temperature, dim=0)",
        "return scores.numel() * torch.softmax(-scores / (1.1 * temperature), dim=0)",
    ),
)


# What a CPU with fewer instructions would run: ATen's own kernels, MKL's BLAS and oneDNN each
# dispatch on the CPU's instruction set, and each can be held to a lower one.
ISAS = {
    "native": {},
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
    "default": {
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
    },
}


def kernel_settings() -> list[tuple[str, dict[str, str]]]:
    """(a label, the environment) for 1 and 2 threads x each instruction set x oneDNN on/off."""
    out = []
    for n, isa, dnn in itertools.product((1, 2), ISAS, ("on", "off")):
        env = {
            "OMP_NUM_THREADS": str(n),
            **ISAS[isa],
            "LOREUN_TEST_ONEDNN": "1" if dnn == "on" else "0",
        }
        out.append((f"| {n} | {isa} | {dnn} |", env))
    return out


def run_tests(cwd: Path, env_extra: dict, selection: list[str]) -> tuple[int, list[dict]]:
    """Run pytest in ``cwd`` with ``env_extra``; returns its exit code and the logged errors."""
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as log:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra, "LOREUN_NUMERICS_LOG": log.name}
        env.setdefault("LOREUN_SHARED_DIR", str(ROOT.parent / "shared"))
        if cwd != ROOT:
            env["PYTHONPATH"] = str(cwd)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection]
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        rows = [json.loads(line) for line in Path(log.name).read_text().splitlines()]
    if proc.returncode not in (0, 1):
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
    return proc.returncode, rows


RECIPE_NAMES = ("sd1", "sd2", "sdxl")


def tolerances() -> tuple[float, float]:
    sys.path.insert(0, str(ROOT))
    from tests.test_golden import LOG_TOLERANCE, UPDATE_TOLERANCE

    return UPDATE_TOLERANCE, LOG_TOLERANCE


def format_errors(rows: list[dict]) -> str:
    return "; ".join(f"{r['test']} {r['update']:.1e} / {r['log']:.1e}" for r in rows)


def matrix() -> int:
    upd, logt = tolerances()
    print(f"tolerances: update {upd:.1e} of its norm, logged terms {logt:.1e} relative\n")
    print("| threads | instruction set | oneDNN | tests | golden errors (update / log) |")
    print("|---|---|---|---|---|")
    failed, worst = 0, [0.0, 0.0]
    stage()  # a snapshot: edits made while it runs do not reach the tests
    for label, setting in kernel_settings():
        code, rows = run_tests(STAGE, setting, ["-m", "numerics", "tests"])
        failed += code != 0
        for r in rows:
            worst = [max(worst[0], r["update"]), max(worst[1], r["log"])]
        print(f"{label} {'pass' if code == 0 else 'FAIL'} | {format_errors(rows)} |", flush=True)
    print(
        f"\nlargest error: update {worst[0]:.1e} ({worst[0] / upd:.2g} of its tolerance), "
        f"log {worst[1]:.1e} ({worst[1] / logt:.2g} of its tolerance)"
    )
    return 1 if failed else 0


def stage() -> None:
    """Copy the repository's files (tracked, or new and not ignored) into .numerics/, the
    packages under loreun/ as installed."""
    stage_repository(STAGE, untracked=True)


def apply_plant(path: str, old: str, new: str) -> str:
    """Replace ``old`` by ``new`` in the staged copy of ``path``; returns the original text."""
    staged = STAGE / "loreun" / path
    text = staged.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"{path}: the line to plant is not there once: {old!r}")
    staged.write_text(text.replace(old, new))
    return text


def plant() -> int:
    upd, logt = tolerances()
    stage()
    print(f"tolerances: update {upd:.1e} of its norm, logged terms {logt:.1e} relative\n")
    print("| planted change | golden tests | errors (update / log) | times the tolerance |")
    print("|---|---|---|---|")
    code, rows = run_tests(STAGE, {}, [GOLDEN, "-k", "golden_reference"])
    print(f"| (nothing planted) | {'green' if code == 0 else 'RED'} | {format_errors(rows)} | |")
    missed = int(code != 0 or len(rows) != len(RECIPE_NAMES))
    for what, path, old, new in PLANTS:
        original = apply_plant(path, old, new)
        try:
            code, rows = run_tests(STAGE, {}, [GOLDEN, "-k", "golden_reference"])
        finally:
            (STAGE / "loreun" / path).write_text(original)
        missed += code == 0 or len(rows) != len(RECIPE_NAMES)  # red for its numbers, not a crash
        ratio = max((max(r["update"] / upd, r["log"] / logt) for r in rows), default=0.0)
        print(
            f"| {what} | {'red' if code else 'GREEN (missed)'} | {format_errors(rows)} | "
            f"{ratio:.0f}x |",
            flush=True,
        )
    return 1 if missed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=("matrix", "plant"))
    return matrix() if p.parse_args().what == "matrix" else plant()


if __name__ == "__main__":
    raise SystemExit(main())
