"""The TOML configuration file: server settings, smoke test options and dependency checks.

Validated completely before anything listens: every problem is reported at once, each
with the file, the key and what is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from petsage_grpc._durations import parse_duration
from petsage_grpc._extras import CHECK_KIND_EXTRAS, missing_extra
from petsage_grpc.board._check import Check
from petsage_grpc.board._dependencies import resolve_callable
from petsage_grpc.server._settings import SERVER_SETTINGS

__all__ = ["Config", "ConfigError", "load_config"]

_SERVER_KEYS: Final = {s.name: s for s in SERVER_SETTINGS if s.in_file}
_CHECK_DURATIONS: Final = ("interval", "timeout", "initial_delay")


class ConfigError(Exception):
    """The configuration file is unusable; ``problems`` has one line per problem.

    ``settings`` holds the ``[server]`` values that were valid nonetheless (the log
    format, say, so that the problems can be reported in it).
    """

    def __init__(self, problems: list[str], *, settings: Mapping[str, Any] | None = None) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.settings: Mapping[str, Any] = settings or {}


@dataclass(frozen=True)
class Config:
    """A validated configuration file."""

    server: Mapping[str, Any] = field(default_factory=dict)
    """Server settings from ``[server]``, converted; flags and environment override them."""
    checks: tuple[Check, ...] = ()
    report_checks: bool = True
    """``[smoke_test] report_checks``: SmokeTest lists each check's name and state."""
    auth_token: str | None = field(default=None, repr=False)
    """The bearer token, from the environment variable that ``[auth] token_env`` names."""
    protect_reflection: bool = True
    """``[auth] protect_reflection``: with a token, reflection requires it too."""


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the configuration file at *path*.

    Raises:
        ConfigError: the file cannot be read or parsed, or holds invalid values.
    """
    # Here, not at the top: a server started without a file never loads the parser.
    import tomllib  # noqa: PLC0415

    where = str(path)
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise ConfigError([f"{where}: cannot read: {error.strerror or error}"]) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{where}: not valid TOML: {error}"]) from None
    problems: list[str] = []

    def problem(key: str, message: str) -> None:
        problems.append(f"{where}: {key}: {message}")

    for key in document.keys() - {"server", "smoke_test", "auth", "checks"}:
        problem(key, "unknown key (expected server, smoke_test, auth, checks)")
    server = _section(document, "server", problem)
    server_values: dict[str, Any] = {}
    for key, value in server.items():
        setting = _SERVER_KEYS.get(key)
        if setting is None:
            problem(f"server.{key}", f"unknown key (expected {', '.join(_SERVER_KEYS)})")
            continue
        try:
            server_values[key] = setting.convert(value)
        except ValueError as error:
            problem(f"server.{key}", str(error))
    smoke_test = _section(document, "smoke_test", problem)
    report_checks = smoke_test.get("report_checks", True)
    for key in smoke_test.keys() - {"report_checks"}:
        problem(f"smoke_test.{key}", "unknown key (expected report_checks)")
    if not isinstance(report_checks, bool):
        problem("smoke_test.report_checks", f"must be true or false, not {report_checks!r}")
    token, protect_reflection = _auth(_section(document, "auth", problem), problem)
    checks = _checks(document.get("checks", []), problem)
    if problems:
        raise ConfigError(problems, settings=server_values)
    return Config(
        server=server_values,
        checks=tuple(checks),
        report_checks=bool(report_checks),
        auth_token=token,
        protect_reflection=bool(protect_reflection),
    )


def _auth(auth: Mapping[str, Any], problem: Callable[[str, str], None]) -> tuple[str | None, bool]:
    for key in auth.keys() - {"token_env", "protect_reflection"}:
        problem(f"auth.{key}", "unknown key (expected token_env, protect_reflection)")
    token_env = auth.get("token_env")
    token = None
    if token_env is not None and not isinstance(token_env, str):
        problem(
            "auth.token_env",
            f"must be a string, the name of an environment variable, not {token_env!r}",
        )
    elif token_env is not None:
        token = os.environ.get(token_env)
        if token is None:
            problem("auth.token_env", f"environment variable {token_env!r} is not set")
        elif not token.strip() or any(c.isspace() for c in token.strip()):
            problem("auth.token_env", f"environment variable {token_env!r} holds no usable token")
    protect_reflection = auth.get("protect_reflection", True)
    if not isinstance(protect_reflection, bool):
        problem("auth.protect_reflection", f"must be true or false, not {protect_reflection!r}")
    return (token.strip() if token else None), bool(protect_reflection)


def _section(
    document: Mapping[str, Any], name: str, problem: Callable[[str, str], None]
) -> Mapping[str, Any]:
    value = document.get(name, {})
    if not isinstance(value, dict):
        problem(name, "must be a table, e.g. [" + name + "]")
        return {}
    return value


def _prefixed(problem: Callable[[str, str], None], label: str) -> Callable[[str, str], None]:
    def report(key: str, message: str) -> None:
        problem(f"{label}.{key}", message)

    return report


def _checks(entries: object, problem: Callable[[str, str], None]) -> list[Check]:
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        problem("checks", "must be an array of tables, written [[checks]]")
        return []
    checks: list[Check] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        name = entry.get("name")
        label = f"checks[{index}]" + (f" ({name!r})" if isinstance(name, str) else "")
        report = _prefixed(problem, label)
        # Judged on the name alone, so that an entry with other problems shows this one too.
        duplicate = isinstance(name, str) and name in seen
        if duplicate:
            report("name", f"duplicate check name {name!r}")
        elif isinstance(name, str):
            seen.add(name)
        check = _check(entry, report)
        if check is not None and not duplicate:
            checks.append(check)
    return checks


def _check(entry: Mapping[str, Any], problem: Callable[[str, str], None]) -> Check | None:
    values = dict(entry)
    bad_durations = set()
    for key in _CHECK_DURATIONS:
        if key in values:
            try:
                values[key] = parse_duration(values[key])
            except ValueError as error:
                problem(key, str(error))
                bad_durations.add(key)
    if isinstance(values.get("expect_status"), list):
        values["expect_status"] = tuple(values["expect_status"])
    env = values.get("password_env")
    missing_env = isinstance(env, str) and env not in os.environ
    if missing_env:
        problem("password_env", f"environment variable {env!r} is not set")
    # Judge the rest with the bad durations left out, so every other problem shows too.
    problems = Check.problems_with({k: v for k, v in values.items() if k not in bad_durations})
    for line in problems:
        key, _, message = line.partition(": ")
        problem(key, message)
    if problems or bad_durations or missing_env:
        return None
    check = Check(**values)
    if check.kind in CHECK_KIND_EXTRAS:
        extra, modules = CHECK_KIND_EXTRAS[check.kind]
        missing = missing_extra(extra, feature=repr(check.kind), modules=modules)
        if missing is not None:
            problem("kind", missing)
            return None
    if check.kind == "python" and isinstance(check.target, str):
        try:
            resolve_callable(check.target)
        except ValueError as error:
            problem("target", str(error))
            return None
    return check
