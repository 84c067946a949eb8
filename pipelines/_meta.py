"""Installed package versions, recorded in every export, manifest and report."""

from __future__ import annotations


def package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
