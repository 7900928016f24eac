"""What a dependency check is: its target, its schedule and how its results are judged."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, Final, Literal, get_args
from urllib.parse import parse_qs, urlsplit

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
        problems = self.problems_with({f.name: getattr(self, f.name) for f in fields(self)})
        if problems:
            raise CheckError(problems)

    @property
    def service_name(self) -> str:
        """The health service name this check reports under."""
        return CHECK_PREFIX + self.name

    @classmethod
    def problems_with(cls, values: Mapping[str, object]) -> list[str]:
        """Every problem a Check made from *values* would have, each as ``field: problem``.

        Unknown and missing fields are reported too, so that a configuration file's
        every mistake in one check is listed at once.
        """
        known = {f.name: f for f in fields(cls)}
        problems = [f"{key}: unknown key" for key in sorted(values.keys() - known.keys())]
        problems += [
            f"{name}: missing"
            for name, f in known.items()
            if f.default is MISSING and name not in values
        ]
        merged = {n: f.default for n, f in known.items() if f.default is not MISSING}
        merged.update({k: v for k, v in values.items() if k in known})
        return problems + _rules(merged)


def _rules(v: Mapping[str, Any]) -> list[str]:  # noqa: PLR0912 - one rule per branch
    problems: list[str] = []
    if "name" in v and (not isinstance(v["name"], str) or not _NAME.fullmatch(v["name"])):
        problems.append(
            f"name: {v['name']!r} must be 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    kind = v.get("kind")
    if "kind" in v and kind not in CHECK_KINDS:
        problems.append(f"kind: unknown kind {kind!r}; expected one of {', '.join(CHECK_KINDS)}")
    for field in ("interval", "timeout"):
        value = v[field]
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < 1e9:
            problems.append(f"{field}: must be a positive number of seconds, not {value!r}")
    delay = v["initial_delay"]
    if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay < 1e9:
        problems.append(f"initial_delay: must be 0 or more seconds, not {delay!r}")
    for field in ("failure_threshold", "success_threshold"):
        value = v[field]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{field}: must be a whole number of at least 1, not {value!r}")
    if not isinstance(v["critical"], bool):
        problems.append(f"critical: must be true or false, not {v['critical']!r}")
    statuses = v["expect_status"]
    if not isinstance(statuses, tuple) or any(
        not isinstance(s, int) or isinstance(s, bool) or not 100 <= s <= 599 for s in statuses
    ):
        problems.append(f"expect_status: HTTP statuses are 100-599, not {statuses!r}")
    elif statuses and kind != "http":
        problems.append("expect_status: only for kind 'http'")
    if not isinstance(v["service"], str):
        problems.append(f"service: must be a string, not {v['service']!r}")
    elif v["service"] and kind != "grpc":
        problems.append("service: only for kind 'grpc'")
    env = v["password_env"]
    if env is not None and not isinstance(env, str):
        problems.append(f"password_env: must be the name of an environment variable, not {env!r}")
    elif env is not None and kind not in {"postgres", "redis"}:
        problems.append("password_env: only for kinds 'postgres' and 'redis'")
    if kind in CHECK_KINDS and "target" in v:
        problems.extend(_target_problems(str(kind), v["target"]))
    return problems


def _target_problems(kind: str, target: object) -> list[str]:  # noqa: PLR0911 - one rule per return
    if kind == "python":
        if callable(target):
            return []
        if isinstance(target, str) and re.fullmatch(r"[\w.]+:[\w.]+", target):
            return []
        return [f"target: expected 'module:function' for kind 'python', not {_redact(target)!r}"]
    if not isinstance(target, str) or not target.strip():
        return ["target: missing"]
    if kind in {"tcp", "grpc"}:
        host, _, port = target.rpartition(":")
        if not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
            return [f"target: expected host:port, not {_redact(target)!r}"]
        return []
    parts = urlsplit(target)
    schemes = _URL_SCHEMES[kind]
    if parts.scheme not in schemes:
        return [f"target: expected a {'/'.join(schemes)}:// URL, not {_redact(target)!r}"]
    if parts.password is not None or "password" in parse_qs(parts.query):
        return [
            "target: must not contain a password; name its environment variable in password_env"
        ]
    return []


def _redact(target: object) -> str:
    """*target* as text with any password hidden, for error messages."""
    text = str(target)
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        return "<unparseable>"
    if password is not None:
        text = text.replace(f":{password}@", ":***@")
    query = parse_qs(parts.query)
    for value in query.get("password", []):
        text = text.replace(value, "***")
    return text
