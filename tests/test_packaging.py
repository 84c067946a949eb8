import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(cfg["packages"]), cfg["package-dir"]
    found = set()
    for name, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join((name, *init.parent.relative_to(ROOT / folder).parts)))
    assert found == listed
    assert not (ROOT / "loreun").exists(), "loreun is a namespace: no loreun/ folder"


@pytest.mark.parametrize("folder", ["cli", "erase", "eval", "pipelines", "prompts"])
def test_folder_import_fails_clearly(folder):
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import {folder}"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0 and f"loreun.{folder}" in res.stderr


def _without_torch(argv: list[str]) -> str:
    """stdout of ``loreun ARGV`` run in a fresh process, asserting torch was never imported."""
    code = (
        "import sys\nfrom loreun.cli.main import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_help_does_not_import_torch():
    assert "--weighting" in _without_torch(["erase", "--help"])


def test_version_answers_without_torch():
    from loreun.pipelines.meta import package_version

    assert _without_torch(["--version"]).strip() == f"loreun {package_version('loreun')}"


def test_console_script_and_module_entry():
    res = subprocess.run(
        [sys.executable, "-m", "loreun.cli", "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0 and "erase" in res.stdout
