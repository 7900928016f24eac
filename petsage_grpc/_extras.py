"""Optional dependencies, installed as extras, and the one-line error when one is missing.

The core (the health service, the probe listener, ``probe`` and ``status``) needs only
grpcio, its health and reflection packages, protobuf and the probe's HTTP/2 framing.
The rest is an extra of its own (pyproject.toml): a feature that needs one finds out
before it starts, by looking for the modules without importing them.
"""

from __future__ import annotations

import importlib.util
from typing import Final

__all__ = ["CHECK_KIND_EXTRAS", "MissingExtraError", "missing_extra", "require_extra"]

_MODULES: Final[dict[str, tuple[str, ...]]] = {
    "postgres": ("asyncpg",),
    "redis": ("redis",),
    # The HTTP face (aiohttp, and prometheus-client for /metrics); http checks use aiohttp.
    "http": ("aiohttp", "prometheus_client"),
    # The fleet page (aiohttp) and --discover dns://DNS-SERVER/ (dnspython).
    "fleet": ("aiohttp", "dns"),
}
CHECK_KIND_EXTRAS: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "postgres": ("postgres", ("asyncpg",)),
    "redis": ("redis", ("redis",)),
    "http": ("http", ("aiohttp",)),
}
"""Check kinds that need an extra: the extra, and the modules of it that the kind imports."""


class MissingExtraError(ImportError):
    """A feature needs an optional dependency that is not installed.

    The message names the feature and the extra, and how to install it, in one line:
    ``check 'db' (kind 'postgres') needs the 'postgres' extra: pip install
    'petsage-grpc[postgres]'``.
    """


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package that fails, a module set to None
        return True


def missing_extra(
    extra: str, *, feature: str, modules: tuple[str, ...] | None = None
) -> str | None:
    """Say in one line that *feature* needs *extra*, if any module it uses is missing; else None.

    *modules* are the ones *feature* imports (default: every module of the extra).
    """
    if not any(_absent(module) for module in modules or _MODULES[extra]):
        return None
    return f"{feature} needs the {extra!r} extra: pip install 'petsage-grpc[{extra}]'"


def require_extra(extra: str, *, feature: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise :class:`MissingExtraError` if *feature* cannot run without installing *extra*."""
    problem = missing_extra(extra, feature=feature, modules=modules)
    if problem is not None:
        raise MissingExtraError(problem)
