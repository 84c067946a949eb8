"""Installed package versions, recorded in every export, manifest and report; and how much a
run says while it works."""

from __future__ import annotations


def package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def quiet() -> bool:
    """True when ``LOREUN_QUIET=1`` (``loreun -q``): no progress bars or set-up lines."""
    import os

    return os.environ.get("LOREUN_QUIET", "") not in ("", "0")
