"""The server's settings: one table that flags, environment variables and the config file share.

A value given as a flag wins over the environment variable ``PETSAGE_GRPC_<NAME>``, which
wins over the ``[server]`` table of the configuration file, which wins over the default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from petsage_grpc._durations import parse_duration

__all__ = ["ENV_PREFIX", "SERVER_SETTINGS", "Setting", "resolve_settings"]

ENV_PREFIX: Final = "PETSAGE_GRPC_"
LOG_FORMATS: Final = ("text", "json")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
_MIN_STALL_SECONDS: Final = 0.5


def _port(value: object) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit():
        raise ValueError(f"not a port number: {value!r}")
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0-65535, not {port}")
    return port


def _seconds(value: object) -> float:
    """A number of seconds ("5", 5, 2.5) or a Go duration ("500ms")."""
    if isinstance(value, str):
        # Flags and environment variables are text; a bare number there means seconds.
        with contextlib.suppress(ValueError):
            value = float(value)
    return parse_duration(value)


def _stall_seconds(value: object) -> float:
    """A stall threshold: more than zero; 0.5 s at least, so that a busy loop is not a stall."""
    seconds = _seconds(value)
    if seconds < _MIN_STALL_SECONDS:
        raise ValueError(f"must be at least {_MIN_STALL_SECONDS:g}s, not {value!r}")
    return seconds


def _lag_seconds(value: object) -> float:
    seconds = _seconds(value)
    if seconds <= 0:
        raise ValueError(f"must be greater than zero, not {value!r}")
    return seconds


def _choice(*choices: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        text = str(value).lower()
        if not isinstance(value, str) or text not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return text

    return convert


def _host(value: object) -> str:
    text = str(value)
    if not isinstance(value, str) or any(c.isspace() for c in text) or "/" in text:
        raise ValueError(f"not a host name or IP address: {value!r}")
    return text[1:-1] if text.startswith("[") and text.endswith("]") else text


def _positive(value: object) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"not a whole number of at least 1: {value!r}")
    return int(text)


def _mebibytes(value: object) -> int:
    """A size in MiB: 128, "128", "128Mi", "128MiB" or "1Gi"."""
    text = str(value).strip()
    scale = 1
    for suffix, factor in (("GiB", 1024), ("Gi", 1024), ("MiB", 1), ("Mi", 1)):
        if text.endswith(suffix):
            text, scale = text.removesuffix(suffix), factor
            break
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"not a size in MiB (e.g. 128, 128Mi, 1Gi): {value!r}")
    return int(text) * scale


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not true or false: {value!r}")


def _path(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"not a file path: {value!r}")
    return value


@dataclass(frozen=True)
class Setting:
    """One server setting: its name, how to read a value, its default, and help text."""

    name: str
    convert: Callable[[object], Any]
    default: Any
    help: str
    in_file: bool = True
    """Whether the configuration file's [server] table may set it."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SERVER_SETTINGS: Final = (
    Setting("config", _path, None, "TOML configuration file (checks, settings)", in_file=False),
    Setting("host", _host, "", "address to listen on (default: every interface)"),
    Setting("port", _port, 50051, "TCP port; 0 picks a free one (default: 50051)"),
    Setting("log_level", _choice(*LOG_LEVELS), "info", "debug, info, warning or error"),
    Setting("log_format", _choice(*LOG_FORMATS), "text", "text or json (one object a line)"),
    Setting(
        "drain_seconds",
        _seconds,
        5.0,
        "after SIGTERM, keep answering with readiness NOT_SERVING this long (default: 5)",
    ),
    Setting("grace_seconds", _seconds, 5.0, "then give calls in flight this long (default: 5)"),
    Setting(
        "http_port",
        _port,
        None,
        "serve HTTP on this port: the status page / and /status.json, "
        "/api/v1/health/smoke-test, /livez, /readyz, /startupz and Prometheus /metrics "
        "(default: off)",
    ),
    Setting("tls_cert", _path, None, "serve TLS with this PEM certificate chain (needs --tls-key)"),
    Setting("tls_key", _path, None, "the PEM private key for --tls-cert"),
    Setting(
        "tls_client_ca",
        _path,
        None,
        "require client certificates signed by these PEM CAs (mTLS; needs --tls-cert)",
    ),
    Setting(
        "probe_port",
        _port,
        None,
        "also serve Health's Check and Watch alone, in plaintext, on this port, from a thread "
        "of their own: kubelet probes are answered however busy the server is, and while the "
        "main port requires TLS (default: off)",
    ),
    Setting(
        "loop_stall_seconds",
        _stall_seconds,
        10.0,
        "report liveness NOT_SERVING on the probe port while the event loop has not run for "
        "this long, SERVING again once it runs (default: 10, one kubelet probe period; "
        "at least 0.5)",
    ),
    Setting(
        "shed_lag_seconds",
        _lag_seconds,
        None,
        "also report readiness NOT_SERVING while the event loop runs this late (3 beats in a "
        "row, about 3 s), until it runs under half of it (5 beats in a row); needs "
        "--probe-port or --http-port (default: off)",
    ),
    Setting(
        "auth_token_file",
        _path,
        None,
        "file holding a bearer token that List, SmokeTest's check list and reflection require",
    ),
    Setting(
        "config_poll_seconds",
        _seconds,
        0.0,
        "also reload the configuration file when it changes, looking this often (default: 0, "
        "only on SIGHUP)",
    ),
    Setting(
        "memory_budget",
        _mebibytes,
        None,
        "memory the server must stay within, in MiB (e.g. 128, 512Mi, 1Gi); every per-client "
        "cap is derived from it (default: the container's memory limit, read from its cgroup; "
        "128 where there is none)",
    ),
    Setting(
        "max_watch_streams",
        _positive,
        None,
        "open Watch streams in all before RESOURCE_EXHAUSTED (default: from --memory-budget, "
        "1638 for 128 MiB)",
    ),
    Setting(
        "max_watch_streams_per_connection",
        _positive,
        None,
        "open Watch streams on one connection before RESOURCE_EXHAUSTED (default: from "
        "--memory-budget, 102 for 128 MiB)",
    ),
    Setting(
        "max_connections_per_address",
        _positive,
        None,
        "gRPC connections from one peer address before its newest are closed (default: from "
        "--memory-budget, 76 for 128 MiB)",
    ),
    Setting(
        "shed_connections",
        _boolean,
        True,
        "close gRPC connections over the per-address cap, and floods, from the side "
        "(Linux; default: true)",
    ),
    Setting(
        "http_access_log",
        _boolean,
        False,
        "log one INFO line per HTTP request (default: false)",
    ),
)


class SettingError(ValueError):
    """A setting's value is invalid; the message names where it came from."""


def resolve_settings(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    file_values: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge already-converted *flags* with the environment, the file and the defaults.

    Raises:
        SettingError: an environment variable's value is invalid.
    """
    values: dict[str, Any] = {}
    for setting in SERVER_SETTINGS:
        value = flags.get(setting.name)
        if value is None and setting.env in environ:
            try:
                value = setting.convert(environ[setting.env])
            except ValueError as error:
                raise SettingError(f"environment variable {setting.env}: {error}") from None
        if value is None and file_values is not None:
            value = file_values.get(setting.name)
        values[setting.name] = setting.default if value is None else value
    return values
