"""What a dependency check is: its target, its schedule and how its results are judged."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, get_args
from urllib.parse import urlsplit

__all__ = ["CHECK_KINDS", "CHECK_PREFIX", "Check", "CheckError", "CheckKind"]

CheckKind = Literal["postgres", "redis", "tcp", "http", "grpc", "python"]
CHECK_KINDS: Final[tuple[str, ...]] = get_args(CheckKind)
CHECK_PREFIX: Final = "check."
"""A check named ``db`` is the health service name ``check.db`` (Check, Watch, List)."""

_NAME: Final = re.compile(r"[a-z0-9](?:[a-z0-9_.-]{0,61}[a-z0-9])?")
_URL_SCHEMES: Final[dict[str, tuple[str, ...]]] = {
    "postgres": ("postgres", "postgresql"),
    "redis": ("redis", "rediss", "unix"),
    "http": ("http", "https"),
}


class CheckError(ValueError):
    """A check is invalid; ``problems`` lists each problem as ``field: what is wrong``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, kw_only=True)
class Check:
    """One dependency check, scheduled like a Kubernetes probe.

    The check runs every *interval* seconds (with a little jitter), each attempt bounded by
    *timeout*. Its status turns NOT_SERVING after *failure_threshold* consecutive failures
    and SERVING after *success_threshold* consecutive successes; it starts NOT_SERVING.
    A *critical* check's failure makes ``readiness``, ``""`` and the smoke test NOT_SERVING.

    Kinds and targets:

    - ``postgres``: a ``postgresql://user@host:port/db`` URL; connect, then ``SELECT 1``.
    - ``redis``: a ``redis://host:port/0`` URL; ``PING``.
    - ``tcp``: ``host:port``; open a connection.
    - ``http``: an ``http(s)://`` URL; ``GET`` answered with 2xx, or one of *expect_status*.
    - ``grpc``: ``host:port``; ``grpc.health.v1.Health/Check`` on *service* is SERVING.
    - ``python``: ``"module:function"`` or a callable (sync or async); passes when it
      returns a truthy value, fails when it returns a falsy one or raises.

    Passwords never go in a target: name the environment variable that holds one in
    *password_env*.

    Raises:
        CheckError: a field is invalid; each problem names its field.
    """

    name: str
    kind: CheckKind
    target: str | Callable[[], object]
    interval: float = 5.0
    timeout: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1
    initial_delay: float = 0.0
    critical: bool = True
    password_env: str | None = None
    expect_status: tuple[int, ...] = ()
    service: str = ""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise CheckError(problems)

    @property
    def service_name(self) -> str:
        """The health service name this check reports under."""
        return CHECK_PREFIX + self.name

    def problems(self) -> list[str]:  # noqa: PLR0912 - one rule per branch
        """Every problem with this check, each as ``field: what is wrong``."""
        problems: list[str] = []
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            problems.append(
                f"name: {self.name!r} must be 1-63 lowercase letters, digits, '.', '_' or '-', "
                "starting and ending with a letter or digit"
            )
        if self.kind not in CHECK_KINDS:
            problems.append(
                f"kind: unknown kind {self.kind!r}; expected one of {', '.join(CHECK_KINDS)}"
            )
        for field in ("interval", "timeout"):
            value = getattr(self, field)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < 1e9:
                problems.append(f"{field}: must be a positive number of seconds, not {value!r}")
        if not isinstance(self.initial_delay, int | float) or not 0 <= self.initial_delay < 1e9:
            problems.append(f"initial_delay: must be 0 or more seconds, not {self.initial_delay!r}")
        for field in ("failure_threshold", "success_threshold"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{field}: must be a whole number of at least 1, not {value!r}")
        critical: object = self.critical
        if not isinstance(critical, bool):
            problems.append(f"critical: must be true or false, not {critical!r}")
        if any(not isinstance(s, int) or not 100 <= s <= 599 for s in self.expect_status):
            problems.append(f"expect_status: HTTP statuses are 100-599, not {self.expect_status!r}")
        if self.expect_status and self.kind != "http":
            problems.append("expect_status: only for kind 'http'")
        if self.service and self.kind != "grpc":
            problems.append("service: only for kind 'grpc'")
        if self.password_env is not None and self.kind not in {"postgres", "redis"}:
            problems.append("password_env: only for kinds 'postgres' and 'redis'")
        if self.kind in CHECK_KINDS:
            problems.extend(self._target_problems())
        return problems

    def _target_problems(self) -> list[str]:  # noqa: PLR0911 - one rule per return
        target = self.target
        if self.kind == "python":
            if callable(target):
                return []
            if isinstance(target, str) and re.fullmatch(r"[\w.]+:[\w.]+", target):
                return []
            return [f"target: expected 'module:function' for kind 'python', not {target!r}"]
        if not isinstance(target, str) or not target.strip():
            return ["target: missing"]
        if self.kind in {"tcp", "grpc"}:
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                return [f"target: expected host:port, not {target!r}"]
            return []
        parts = urlsplit(target)
        schemes = _URL_SCHEMES[self.kind]
        if parts.scheme not in schemes:
            return [f"target: expected a {'/'.join(schemes)}:// URL, not {_redact(target)!r}"]
        if parts.password is not None:
            return [
                "target: must not contain a password; name its environment variable in password_env"
            ]
        return []


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()
