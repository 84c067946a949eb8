"""Mutation testing of loreun's core modules with mutmut 3, against the whole test suite.

mutmut names each mutant after its file's path, and loreun's packages live in top-level folders
(``erase/``, ``eval/``, ...) that pyproject.toml maps to ``loreun.*``. So the run happens in a
staging copy, ``.mutation/`` (git-ignored), where the same files sit under ``loreun/``, and
mutmut's own ``mutants/`` copy there is what the tests import. mutmut runs each mutant against
the tests that reach the mutated function (it records them in a first, clean run of the whole
suite), so a mutant is "survived" only when no test in the suite catches it.

    pip install -e ".[dev,mutation]"
    OMP_NUM_THREADS=1 python scripts/mutation.py                       # every core module (hours)
    OMP_NUM_THREADS=1 python scripts/mutation.py erase/weighting.py    # one module, whole suite
    OMP_NUM_THREADS=1 python scripts/mutation.py prompts/reader.py \\
        --tests tests/test_prompts.py tests/test_prompt_fuzz.py       # quick: its own tests
    python scripts/mutation.py --report                                # scores of the last run

The score of a module is killed / (killed + survived + no tests), with timeouts counted as
killed; the report lists each survivor as ``mutmut show`` names it, to read with
``cd .mutation && mutmut show NAME``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from _staging import PACKAGES, stage_repository  # scripts/ is on the path when run

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / ".mutation"
# The core: the erase recipe's pieces, loading and export, the prompt reader, the audit.
CORE = (
    "erase/weighting.py",
    "erase/objectives.py",
    "erase/objective_esd.py",
    "erase/objective_remap.py",
    "erase/objective_ga.py",
    "erase/weighting_loreun.py",
    "erase/presets.py",
    "erase/saliency.py",
    "erase/export.py",
    "erase/optim.py",
    "erase/lora.py",
    "pipelines/loading.py",
    "pipelines/single_file.py",
    "prompts/reader.py",
    "eval/nudity.py",
    "eval/audit.py",
)
EQUIVALENT = Path(__file__).with_name("mutation_equivalent.txt")
KILLED = {"killed", "timeout"}
# mutmut credits the functions a test reaches to that test, at its teardown, and times only the
# test's call. A module-scoped fixture (an erase run shared by a file's tests) runs inside the
# first test that uses it, so without this plugin every later test of the file would look
# unrelated to that code (a mutant there would meet one test only), and look instant.
FIXTURE_PLUGIN = '''"""Credit a shared fixture's reach and cost to every test using it."""
import time

import pytest
from mutmut.state import state

_reached, _cost = {}, {}


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    before, start = set(state()._stats), time.perf_counter()
    yield
    if fixturedef.scope != "function":
        _reached.setdefault(fixturedef.argname, set()).update(set(state()._stats) - before)
        _cost[fixturedef.argname] = time.perf_counter() - start


@pytest.hookimpl(trylast=True)
def pytest_runtest_setup(item):
    for name in item.fixturenames:
        state()._stats.update(_reached.get(name, ()))


def pytest_runtest_makereport(item, call):
    # mutmut runs a mutant's tests fastest first and times only the test call; a test whose
    # shared fixture must be rebuilt in the mutant's process is not fast
    if call.when == "setup":
        cost = sum(_cost.get(name, 0.0) for name in item.fixturenames)
        state().duration_by_test[item.nodeid] += call.duration + cost
'''
NOT_KILLED = {"survived", "no tests"}


def stage(modules: list[str], tests: list[str] | None = None) -> None:
    """Copy the tracked files into .mutation/, the packages under loreun/, and configure mutmut."""
    tracked = stage_repository(STAGE)
    (STAGE / "mutation_fixture_hits.py").write_text(FIXTURE_PLUGIN)
    also = sorted({n.split("/", 1)[0] for n in tracked if n and n.split("/", 1)[0] not in PACKAGES})
    also.append("mutation_fixture_hits.py")
    config = "\n".join(
        [
            "",
            "[tool.mutmut]",
            'source_paths = ["loreun"]',
            f"only_mutate = {json.dumps(['loreun/' + m for m in modules])}",
            f"also_copy = {json.dumps(also)}",
            f"pytest_add_cli_args_test_selection = {json.dumps(tests or ['tests'])}",
            # the packaging tests check the repository's own layout, which staging changes
            "pytest_add_cli_args = "
            '["-p", "no:cacheprovider", "-q", "--ignore=tests/test_packaging.py", '
            '"-p", "mutation_fixture_hits"]',
            "",
        ]
    )
    with open(STAGE / "pyproject.toml", "a") as f:
        f.write(config)


def environment() -> dict:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")
    )
    shared = ROOT.parent / "shared"  # the tests' external prompt files (tests/conftest.py)
    env.setdefault("LOREUN_SHARED_DIR", str(shared))
    return env


def results() -> dict[str, Counter]:
    """module file -> Counter of mutant statuses, from ``mutmut results --all true``."""
    out = subprocess.run(
        ["mutmut", "results", "--all", "true"],
        cwd=STAGE,
        capture_output=True,
        text=True,
        env=environment(),
    ).stdout
    per: dict[str, Counter] = {}
    survivors: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"\s*(loreun\.[\w.]+?)\.x(?:ǁ\w+ǁ)?\w*__mutmut_\d+: (.+)", line)
        if not m:
            continue
        name, status = line.split(":", 1)[0].strip(), m.group(2).strip()
        module = m.group(1).removeprefix("loreun.").replace(".", "/") + ".py"
        per.setdefault(module, Counter())[status] += 1
        if status in NOT_KILLED:
            survivors.setdefault(module, []).append(name)
    return per, survivors


def equivalent() -> dict[str, str]:
    """Survivors shown equivalent (no input can tell them apart), name -> the reason."""
    if not EQUIVALENT.is_file():
        return {}
    lines = [ln.split(None, 1) for ln in EQUIVALENT.read_text().splitlines()]
    return {ln[0]: ln[1] if len(ln) > 1 else "" for ln in lines if ln and not ln[0].startswith("#")}


def report() -> str:
    """Per module: killed, survived, shown equivalent, and the score over the rest."""
    per, survivors = results()
    same = equivalent()
    lines = [
        "| module | mutants | killed | survived | equivalent | not run | score |",
        "|---|---|---|---|---|---|---|",
    ]
    for module, c in sorted(per.items()):
        killed = sum(c[s] for s in KILLED)
        eq = sum(1 for n in survivors.get(module, []) if n in same)
        alive = sum(c[s] for s in NOT_KILLED) - eq
        score = killed / (killed + alive) if killed + alive else float("nan")
        lines.append(
            f"| `{module}` | {sum(c.values())} | {killed} | {alive} | {eq} | "
            f"{c['not checked']} | {score:.1%} |"
        )
    for module, names in sorted(survivors.items()):
        left = [n for n in names if n not in same]
        if left:
            lines.append(f"\n{module}: " + " ".join(left))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("modules", nargs="*", help=f"files to mutate (default: {' '.join(CORE)})")
    p.add_argument("--report", action="store_true", help="only print the last run's scores")
    p.add_argument("--max-children", type=int, default=2, help="mutants run in parallel")
    p.add_argument(
        "--tests",
        nargs="+",
        metavar="FILE",
        help="quick mode: only these test files (default: the whole suite)",
    )
    a = p.parse_args()
    if not a.report:
        if shutil.which("mutmut") is None:
            sys.exit('mutmut is not installed: pip install -e ".[dev,mutation]"')
        stage(a.modules or list(CORE), a.tests)
        subprocess.run(
            ["mutmut", "run", "--max-children", str(a.max_children)],
            cwd=STAGE,
            env=environment(),
            check=False,
        )
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
