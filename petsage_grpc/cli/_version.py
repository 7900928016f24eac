"""The installed version, for ``--version`` and ``probe -version``."""

from __future__ import annotations

__all__ = ["installed_version"]


def installed_version() -> str:
    """The package's version, or ``"unknown"`` when it is not installed."""
    # Looked up only when asked for: importlib.metadata costs every start otherwise.
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("petsage-grpc")
    except PackageNotFoundError:
        return "unknown"
