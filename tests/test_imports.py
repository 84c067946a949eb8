"""The import graph: no module reaches into another package's private names, and no two modules
import each other, directly or round a longer circle (function-level imports included: they
hide a circle, they do not remove it)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "erase", "eval", "pipelines", "prompts")


def _modules() -> dict[str, Path]:
    """loreun.<package>.<module> -> its file."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = (
                f"loreun.{package}" if path.stem == "__init__" else f"loreun.{package}.{path.stem}"
            )
            found[name] = path
    return found


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every ``from X import ...`` in a module."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_module_imports_another_packages_private_names():
    bad = []
    for name, path in _modules().items():
        for module, names in _imports(name, path):
            if not module.startswith("loreun.") or _package(module) == _package(name):
                continue
            private = [module] if module.rsplit(".", 1)[-1].startswith("_") else []
            private += [f"{module}.{n}" for n in names if n.startswith("_")]
            bad += [f"{name} imports {p}" for p in private]
    assert not bad, bad


def test_no_import_circle():
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for module, names in _imports(name, path):
            targets = [module] + [f"{module}.{n}" for n in names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    graph = {k: {t for t in v if not k.startswith(t + ".")} for k, v in graph.items()}

    def circle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    circles = [c for c in (circle_from(m) for m in graph) if c and "__init__" not in str(c)]
    package_inits = {f"loreun.{p}" for p in PACKAGES}
    circles = [c for c in circles if not set(c) & package_inits]
    assert not circles, circles[0]


# What only the two seams may know: a model family (pipelines/family.py) and a noise schedule
# (pipelines/schedule.py). Anything else that reads these assumes a UNet under DDPM.
SEAM_ONLY = {
    "alphas_cumprod": r"\balphas_cumprod\b",
    "num_train_timesteps": r"\bnum_train_timesteps\b",
    "pipe.unet": r"\.unet\b(?!-)|[\"']unet[\"']\)",
    "a DDIM scheduler": r"\bDDIMScheduler\s*[(.]",
    "a native size": r"config\.sample_size\s*\*|vae_scale_factor",
}
SEAMS = {"pipelines/family.py", "pipelines/schedule.py"}


def test_only_the_family_and_schedule_seams_know_unets_and_ddpm():
    import re

    bad = []
    for package in ("erase", "eval", "pipelines"):
        for path in sorted((ROOT / package).glob("*.py")):
            rel = f"{package}/{path.name}"
            if rel in SEAMS:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                for what, pattern in SEAM_ONLY.items():
                    if re.search(pattern, code):
                        bad.append(f"{rel}:{n} {what}: {line.strip()}")
    assert not bad, "\n".join(bad)
