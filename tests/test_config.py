"""The configuration file: every validation rule through the real CLI, settings precedence,
and ``load_config`` / ``Check`` directly.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import grpc
import pytest
from conftest import ROOT
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tcp_listener import free_port, refuses_connections

from petsage_grpc import Check, CheckError
from petsage_grpc.server._config import ConfigError, load_config

CLI_TIMEOUT: Final = 20.0
START_TIMEOUT: Final = 20.0
ERROR_PREFIX: Final = "petsage-grpc serve: error: "
PASSWORD: Final = "hunter2-s3cret"  # noqa: S105 - a made-up password that must never be echoed
TCP_CHECK: Final = 'name = "db"\nkind = "tcp"\ntarget = "127.0.0.1:5432"\n'


def clean_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any PETSAGE_GRPC_ setting, plus *extra*."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PETSAGE_GRPC_")}
    return {**environ, **(extra or {})}


def run_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m petsage_grpc serve ARGS`` to completion (bounded)."""
    return subprocess.run(
        [sys.executable, "-m", "petsage_grpc", "serve", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        cwd=ROOT,
        env=clean_environ(env),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def write(tmp_path: Path, text: str, name: str = "petsage.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refused(
    config: Path, *args: str, env: Mapping[str, str] | None = None, use_flag: bool = True
) -> list[str]:
    """Run the server on a bad *config*; assert it refuses to start; return its stderr lines.

    The server is given a specific free port so that "nothing is listening afterwards"
    can be checked on that very port.
    """
    port = free_port()
    config_args = ("--config", str(config)) if use_flag else ()
    result = run_cli(*config_args, "--host", "127.0.0.1", "--port", str(port), *args, env=env)
    assert result.returncode == 2, result.stderr
    assert "serving on" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines, "a refusal must say why"
    for line in lines:
        assert line.startswith(f"{ERROR_PREFIX}{config}: "), line
    assert refuses_connections(port), "nothing may be left listening"
    return lines


# -- One rule per file, through the CLI ---------------------------------------------


@dataclass(frozen=True)
class Case:
    """A configuration file with exactly one problem, and how it must be reported."""

    id: str
    toml: str
    key: str
    fragments: tuple[str, ...] = ()


def check_with(extra: str, base: str = TCP_CHECK) -> str:
    return f"[[checks]]\n{base}{extra}"


CASES: Final = [
    Case("unknown-top-level-key", 'colour = "tabby"\n', "colour", ("unknown key",)),
    Case("unknown-server-key", "[server]\nprot = 50051\n", "server.prot", ("unknown key", "port")),
    Case("server-not-a-table", 'server = "yes"\n', "server", ("table",)),
    Case("server-port-not-a-number", '[server]\nport = "x"\n', "server.port", ("'x'",)),
    Case("server-port-out-of-range", "[server]\nport = 70000\n", "server.port", ("70000",)),
    Case("server-bad-log-level", '[server]\nlog_level = "loud"\n', "server.log_level", ("loud",)),
    Case("server-negative-drain", "[server]\ndrain_seconds = -1\n", "server.drain_seconds"),
    Case(
        "server-shed-zero",
        "[server]\nshed_lag_seconds = 0\n",
        "server.shed_lag_seconds",
        ("greater than zero",),
    ),
    Case(
        "server-stall-too-short",
        '[server]\nloop_stall_seconds = "100ms"\n',
        "server.loop_stall_seconds",
        ("at least 0.5s",),
    ),
    Case(
        "unknown-check-kind",
        '[[checks]]\nname = "db"\nkind = "mysql"\ntarget = "db:3306"\n',
        "checks[0] ('db').kind",
        ("unknown kind", "'mysql'"),
    ),
    Case(
        "duration-without-unit",
        check_with('interval = "5"\n'),
        "checks[0] ('db').interval",
        ("'5'",),
    ),
    Case(
        "duration-not-a-duration",
        check_with('timeout = "fast"\n'),
        "checks[0] ('db').timeout",
        ("'fast'",),
    ),
    Case(
        "duration-negative",
        check_with("initial_delay = -1\n"),
        "checks[0] ('db').initial_delay",
        ("-1",),
    ),
    Case(
        "duration-negative-go",
        check_with('interval = "-1s"\n'),
        "checks[0] ('db').interval",
        ("'-1s'",),
    ),
    Case("interval-zero", check_with("interval = 0\n"), "checks[0] ('db').interval", ("positive",)),
    Case(
        "duplicate-check-name",
        check_with("", TCP_CHECK) + check_with("", TCP_CHECK.replace("5432", "5433")),
        "checks[1] ('db').name",
        ("duplicate", "'db'"),
    ),
    Case(
        "missing-target",
        '[[checks]]\nname = "db"\nkind = "tcp"\n',
        "checks[0] ('db').target",
        ("missing",),
    ),
    Case(
        "missing-name",
        '[[checks]]\nkind = "tcp"\ntarget = "127.0.0.1:5432"\n',
        "checks[0].name",
        ("missing",),
    ),
    Case(
        "missing-kind",
        '[[checks]]\nname = "db"\ntarget = "127.0.0.1:5432"\n',
        "checks[0] ('db').kind",
        ("missing",),
    ),
    Case(
        "name-uppercase",
        '[[checks]]\nname = "DB"\nkind = "tcp"\ntarget = "127.0.0.1:5432"\n',
        "checks[0] ('DB').name",
        ("'DB'", "lowercase"),
    ),
    Case(
        "name-with-space",
        '[[checks]]\nname = "pet db"\nkind = "tcp"\ntarget = "127.0.0.1:5432"\n',
        "checks[0] ('pet db').name",
        ("'pet db'",),
    ),
    Case(
        "failure-threshold-zero",
        check_with("failure_threshold = 0\n"),
        "checks[0] ('db').failure_threshold",
        ("at least 1",),
    ),
    Case(
        "success-threshold-string",
        check_with('success_threshold = "3"\n'),
        "checks[0] ('db').success_threshold",
        ("'3'",),
    ),
    Case("unknown-check-key", check_with("retries = 3\n"), "checks[0] ('db').retries"),
    Case(
        "critical-not-a-boolean",
        check_with('critical = "yes"\n'),
        "checks[0] ('db').critical",
        ("'yes'",),
    ),
    Case(
        "password-env-unset",
        '[[checks]]\nname = "db"\nkind = "postgres"\ntarget = "postgresql://app@db/pets"\n'
        'password_env = "PETSAGE_TEST_SURELY_UNSET_PASSWORD"\n',
        "checks[0] ('db').password_env",
        ("PETSAGE_TEST_SURELY_UNSET_PASSWORD", "not set"),
    ),
    Case(
        "password-env-on-tcp",
        check_with('password_env = "PATH"\n'),
        "checks[0] ('db').password_env",
        ("only for kinds",),
    ),
    Case(
        "python-module-not-importable",
        '[[checks]]\nname = "py"\nkind = "python"\ntarget = "no_such_module_petsage:check"\n',
        "checks[0] ('py').target",
        ("no_such_module_petsage",),
    ),
    Case(
        "python-function-missing",
        '[[checks]]\nname = "py"\nkind = "python"\ntarget = "tests.check_targets:no_such"\n',
        "checks[0] ('py').target",
        ("no_such",),
    ),
    Case(
        "python-target-not-callable",
        '[[checks]]\nname = "py"\nkind = "python"\ntarget = "tests.check_targets:NOT_CALLABLE"\n',
        "checks[0] ('py').target",
        ("not callable",),
    ),
    Case(
        "python-target-not-module-function",
        '[[checks]]\nname = "py"\nkind = "python"\ntarget = "check the cat"\n',
        "checks[0] ('py').target",
        ("module:function",),
    ),
    Case(
        "expect-status-on-tcp",
        check_with("expect_status = [200]\n"),
        "checks[0] ('db').expect_status",
        ("only for kind 'http'",),
    ),
    Case(
        "expect-status-out-of-range",
        '[[checks]]\nname = "web"\nkind = "http"\ntarget = "http://vet.example/"\n'
        "expect_status = [99]\n",
        "checks[0] ('web').expect_status",
        ("99",),
    ),
    Case(
        "service-on-tcp",
        check_with('service = "orders"\n'),
        "checks[0] ('db').service",
        ("only for kind 'grpc'",),
    ),
    Case(
        "service-not-a-string",
        '[[checks]]\nname = "up"\nkind = "grpc"\ntarget = "127.0.0.1:50051"\nservice = 5\n',
        "checks[0] ('up').service",
        ("5",),
    ),
    Case(
        "http-target-wrong-scheme",
        '[[checks]]\nname = "web"\nkind = "http"\ntarget = "ftp://vet.example/"\n',
        "checks[0] ('web').target",
        ("http/https",),
    ),
    Case(
        "tcp-target-without-port",
        '[[checks]]\nname = "db"\nkind = "tcp"\ntarget = "db"\n',
        "checks[0] ('db').target",
        ("host:port",),
    ),
    Case(
        "checks-not-an-array-of-tables",
        "checks = 5\n",
        "checks",
        ("[[checks]]",),
    ),
    Case(
        "smoke-test-report-checks-not-boolean",
        '[smoke_test]\nreport_checks = "no"\n',
        "smoke_test.report_checks",
        ("'no'",),
    ),
    Case(
        "auth-token-env-not-a-string",
        "[auth]\ntoken_env = 5\n",
        "auth.token_env",
        ("must be a string", "5"),
    ),
    Case(
        "smoke-test-unknown-key",
        "[smoke_test]\nverbose = true\n",
        "smoke_test.verbose",
        ("unknown key",),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_config_is_refused_naming_the_file_and_key(tmp_path: Path, case: Case) -> None:
    config = write(tmp_path, case.toml)
    lines = refused(config)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{ERROR_PREFIX}{config}: {case.key}: "), lines[0]
    for fragment in case.fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_missing_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "absent.toml"
    (line,) = refused(config)
    assert "cannot read" in line
    assert "No such file" in line


def test_directory_instead_of_a_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "a-directory.toml"
    config.mkdir()
    (line,) = refused(config)
    assert "cannot read" in line


def test_invalid_toml_is_refused(tmp_path: Path) -> None:
    config = write(tmp_path, "[server\nport = 50051\n")
    (line,) = refused(config)
    assert "not valid TOML" in line
    assert "line 1" in line


def test_bad_file_named_by_the_environment_is_refused(tmp_path: Path) -> None:
    config = write(tmp_path, "[server]\nport = 70000\n")
    (line,) = refused(config, env={"PETSAGE_GRPC_CONFIG": str(config)}, use_flag=False)
    assert line.startswith(f"{ERROR_PREFIX}{config}: server.port: ")


@pytest.mark.parametrize(
    ("kind", "target"),
    [
        pytest.param("http", f"http://app:{PASSWORD}@vet.example/healthz", id="http"),
        pytest.param("http", f"https://app:{PASSWORD}@vet.example/healthz", id="https"),
        pytest.param("postgres", f"postgresql://app:{PASSWORD}@db:5432/pets", id="postgres"),
        pytest.param("redis", f"redis://:{PASSWORD}@cache:6379/0", id="redis-no-user"),
        pytest.param(
            "postgres", f"mysql://app:{PASSWORD}@db:3306/pets", id="postgres-wrong-scheme"
        ),
        pytest.param("tcp", f"postgresql://app:{PASSWORD}@db:5432/pets", id="url-given-to-tcp"),
        pytest.param("grpc", f"http://app:{PASSWORD}@orders:50051", id="url-given-to-grpc"),
        pytest.param(
            "postgres", f"postgresql://app@db:5432/pets?password={PASSWORD}", id="postgres-query"
        ),
        pytest.param("redis", f"redis://cache:6379/0?password={PASSWORD}", id="redis-query"),
    ],
)
def test_password_in_a_target_is_refused_and_not_echoed(
    tmp_path: Path, kind: str, target: str
) -> None:
    config = write(tmp_path, f'[[checks]]\nname = "dep"\nkind = "{kind}"\ntarget = "{target}"\n')
    port = free_port()
    result = run_cli("--config", str(config), "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 2
    assert PASSWORD not in result.stderr
    assert PASSWORD not in result.stdout
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{ERROR_PREFIX}{config}: checks[0] ('dep').target: ")
    assert refuses_connections(port)


@pytest.mark.parametrize(
    ("kind", "target"),
    [
        ("postgres", f"postgresql://app@db:5432/pets?password={PASSWORD}"),
        ("redis", f"redis://cache:6379/0?password={PASSWORD}"),
    ],
    ids=["postgres", "redis"],
)
def test_password_in_the_query_string_is_refused(tmp_path: Path, kind: str, target: str) -> None:
    config = write(tmp_path, f'[[checks]]\nname = "dep"\nkind = "{kind}"\ntarget = "{target}"\n')
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert PASSWORD not in str(raised.value)


def test_several_problems_are_all_reported_at_once(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        'colour = "tabby"\n'
        '[server]\nport = "x"\nprot = 1\n'
        '[smoke_test]\nreport_checks = "no"\n'
        '[[checks]]\nname = "db"\nkind = "mysql"\ntarget = "db:3306"\n'
        '[[checks]]\nname = "cache"\nkind = "tcp"\ntarget = "cache:6379"\ninterval = "fast"\n'
        '[[checks]]\nname = "web"\nkind = "tcp"\ntarget = "web:80"\n'
        '[[checks]]\nname = "web"\nkind = "tcp"\ntarget = "web:81"\n'
        '[[checks]]\nkind = "tcp"\ntarget = "x:1"\n',
    )
    lines = refused(config)
    keys = {line.removeprefix(f"{ERROR_PREFIX}{config}: ").split(": ", 1)[0] for line in lines}
    assert keys == {
        "colour",
        "server.port",
        "server.prot",
        "smoke_test.report_checks",
        "checks[0] ('db').kind",
        "checks[1] ('cache').interval",
        "checks[3] ('web').name",
        "checks[4].name",
    }
    assert len(lines) == len(keys)


def test_every_problem_of_one_check_is_reported_at_once(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        '[[checks]]\nname = "DB"\nkind = "mysql"\ntarget = "db:3306"\ninterval = "5"\n'
        "failure_threshold = 0\n",
    )
    lines = refused(config)
    keys = {line.removeprefix(f"{ERROR_PREFIX}{config}: ").split(": ", 1)[0] for line in lines}
    assert keys == {
        "checks[0] ('DB').name",
        "checks[0] ('DB').kind",
        "checks[0] ('DB').interval",
        "checks[0] ('DB').failure_threshold",
    }


def test_a_duplicate_name_is_reported_with_the_entry_s_other_problems(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        check_with("", TCP_CHECK) + check_with('interval = "fast"\nretries = 3\n', TCP_CHECK),
    )
    lines = refused(config)
    keys = {line.removeprefix(f"{ERROR_PREFIX}{config}: ").split(": ", 1)[0] for line in lines}
    assert keys == {
        "checks[1] ('db').name",
        "checks[1] ('db').interval",
        "checks[1] ('db').retries",
    }
    assert any("duplicate check name 'db'" in line for line in lines), lines


def test_the_documented_example_prints_what_the_documentation_shows(tmp_path: Path) -> None:
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    example = page.split("This `petsage.toml`:", 1)[1]
    (_, toml), (_, output) = re.findall(r"```(\w*)\n(.*?)```", example, re.DOTALL)[:2]
    shown = output.splitlines()
    (tmp_path / "petsage.toml").write_text(toml, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "petsage_grpc", "serve", "--config", "petsage.toml"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        cwd=tmp_path,
        env={**clean_environ(), "PYTHONPATH": str(ROOT)},
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == shown


def test_bad_environment_value_is_one_line_naming_the_variable() -> None:
    port = free_port()
    result = run_cli(
        "--host", "127.0.0.1", "--port", str(port), env={"PETSAGE_GRPC_LOG_LEVEL": "x"}
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "PETSAGE_GRPC_LOG_LEVEL" in line
    assert refuses_connections(port)


# -- Valid files: settings precedence -----------------------------------------------

_SERVING = re.compile(r"serving on (\S+):(\d+)")


@dataclass
class Launched:
    process: subprocess.Popen[str]
    host: str
    port: int
    lines: list[str]


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


@pytest.fixture
def launch() -> Iterator[Callable[..., Launched]]:
    """Start ``petsage-grpc serve`` with exactly the given flags; wait for "serving on"."""
    processes: list[subprocess.Popen[str]] = []

    def start(*args: str, env: Mapping[str, str] | None = None) -> Launched:
        process = subprocess.Popen(
            [sys.executable, "-m", "petsage_grpc", "serve", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=clean_environ(env),
        )
        processes.append(process)
        assert process.stderr is not None
        received: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(process.stderr, received), daemon=True).start()
        lines: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = received.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"server did not start within {START_TIMEOUT}s: {''.join(lines)}")
            if line is None:
                pytest.fail(f"server exited ({process.wait(5)}): {''.join(lines)}")
            lines.append(line)
            match = _SERVING.search(line)
            if match:
                return Launched(process, match.group(1), int(match.group(2)), lines)

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def assert_health_serving(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def server_file(tmp_path: Path, port: int) -> Path:
    return write(
        tmp_path,
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nlog_format = "json"\n'
        "drain_seconds = 0\ngrace_seconds = 0\n",
    )


def test_server_values_from_the_file_apply(tmp_path: Path, launch: Callable[..., Launched]) -> None:
    file_port = free_port()
    config = server_file(tmp_path, file_port)
    server = launch("--config", str(config))
    assert (server.host, server.port) == ("127.0.0.1", file_port)
    # log_format = "json" from the file: every line so far is one JSON object.
    for line in server.lines:
        assert isinstance(json.loads(line), dict), line
    assert_health_serving(file_port)


def test_environment_overrides_the_file(tmp_path: Path, launch: Callable[..., Launched]) -> None:
    file_port, env_port = free_port(), free_port()
    config = server_file(tmp_path, file_port)
    server = launch("--config", str(config), env={"PETSAGE_GRPC_PORT": str(env_port)})
    assert server.port == env_port
    assert_health_serving(env_port)
    assert refuses_connections(file_port)


def test_flag_overrides_environment_and_file(
    tmp_path: Path, launch: Callable[..., Launched]
) -> None:
    file_port, env_port, flag_port = free_port(), free_port(), free_port()
    config = server_file(tmp_path, file_port)
    server = launch(
        "--config",
        str(config),
        "--port",
        str(flag_port),
        "--log-format",
        "text",
        env={"PETSAGE_GRPC_PORT": str(env_port)},
    )
    assert server.port == flag_port
    assert not server.lines[-1].startswith("{"), "the flag's text format wins over the file"
    assert_health_serving(flag_port)
    assert refuses_connections(file_port)
    assert refuses_connections(env_port)


def test_config_environment_variable_selects_the_file(
    tmp_path: Path, launch: Callable[..., Launched]
) -> None:
    file_port = free_port()
    config = server_file(tmp_path, file_port)
    server = launch(env={"PETSAGE_GRPC_CONFIG": str(config)})
    assert server.port == file_port
    assert_health_serving(file_port)


# -- load_config and Check directly -------------------------------------------------


@pytest.mark.parametrize(
    ("written", "seconds"),
    [('"500ms"', 0.5), ('"1s"', 1.0), ('"1m30s"', 90.0), ("0.5", 0.5), ("2", 2.0)],
    ids=["500ms", "1s", "1m30s", "float", "int"],
)
@pytest.mark.parametrize("key", ["interval", "timeout", "initial_delay"])
def test_durations_accepted(tmp_path: Path, key: str, written: str, seconds: float) -> None:
    config = load_config(write(tmp_path, check_with(f"{key} = {written}\n")))
    (check,) = config.checks
    value = getattr(check, key)
    assert isinstance(value, float)
    assert value == pytest.approx(seconds)


def test_load_config_returns_every_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETSAGE_TEST_DB_PASSWORD", "not-read-at-load-time")
    config = load_config(
        write(
            tmp_path,
            '[server]\nport = 6000\nlog_level = "debug"\ngrace_seconds = "1m"\n'
            "[smoke_test]\nreport_checks = false\n"
            '[[checks]]\nname = "db"\nkind = "postgres"\ntarget = "postgresql://app@db/pets"\n'
            'password_env = "PETSAGE_TEST_DB_PASSWORD"\nfailure_threshold = 5\n'
            '[[checks]]\nname = "web"\nkind = "http"\ntarget = "http://vet.example/"\n'
            "expect_status = [200, 204]\ncritical = false\n"
            '[[checks]]\nname = "py"\nkind = "python"\ntarget = "check_targets:Nested.ok"\n',
        )
    )
    assert dict(config.server) == {"port": 6000, "log_level": "debug", "grace_seconds": 60.0}
    assert config.report_checks is False
    db, web, py = config.checks
    assert (db.name, db.kind, db.password_env, db.failure_threshold) == (
        "db",
        "postgres",
        "PETSAGE_TEST_DB_PASSWORD",
        5,
    )
    assert (web.expect_status, web.critical) == ((200, 204), False)
    assert py.target == "check_targets:Nested.ok"
    assert [c.service_name for c in config.checks] == ["check.db", "check.web", "check.py"]


def test_empty_file_is_a_valid_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert (dict(config.server), config.checks, config.report_checks) == ({}, (), True)


def test_load_config_problems_are_file_key_message_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[server]\nport = "x"\n'
        '[[checks]]\nname = "db"\nkind = "tcp"\ntarget = "db:5432"\ntimeout = "5"\n'
        '[[checks]]\nname = "py"\nkind = "python"\ntarget = "no_such_module_petsage:f"\n',
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    problems = raised.value.problems
    assert [p.split(": ", 2)[:2] for p in problems] == [
        [str(path), "server.port"],
        [str(path), "checks[0] ('db').timeout"],
        [str(path), "checks[1] ('py').target"],
    ]
    assert all(len(p.split(": ", 2)) == 3 and p.split(": ", 2)[2] for p in problems)
    assert str(raised.value) == "\n".join(problems)


def test_load_config_password_env_must_be_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        '[[checks]]\nname = "cache"\nkind = "redis"\ntarget = "redis://cache:6379/0"\n'
        'password_env = "PETSAGE_TEST_CACHE_PASSWORD"\n',
    )
    monkeypatch.delenv("PETSAGE_TEST_CACHE_PASSWORD", raising=False)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    (problem,) = raised.value.problems
    assert problem.startswith(f"{path}: checks[0] ('cache').password_env: ")
    monkeypatch.setenv("PETSAGE_TEST_CACHE_PASSWORD", "s3cret")
    (check,) = load_config(path).checks
    assert check.password_env == "PETSAGE_TEST_CACHE_PASSWORD"  # noqa: S105 - a variable name


BASE: Final[dict[str, Any]] = {"name": "db", "kind": "tcp", "target": "127.0.0.1:5432"}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": "DB"}, "name"),
        ({"name": "pet db"}, "name"),
        ({"name": "-db"}, "name"),
        ({"name": "d" * 64}, "name"),
        ({"kind": "mysql"}, "kind"),
        ({"interval": 0}, "interval"),
        ({"timeout": -1.0}, "timeout"),
        ({"interval": True}, "interval"),
        ({"initial_delay": -0.5}, "initial_delay"),
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"success_threshold": "3"}, "success_threshold"),
        ({"success_threshold": True}, "success_threshold"),
        ({"critical": "yes"}, "critical"),
        ({"expect_status": (200,)}, "expect_status"),
        ({"service": "orders"}, "service"),
        ({"password_env": "DB_PASSWORD"}, "password_env"),
        ({"target": "db"}, "target"),
        ({"target": "db:0"}, "target"),
        ({"target": "db:65536"}, "target"),
        ({"kind": "python", "target": "not a target"}, "target"),
        ({"kind": "http", "target": "ftp://vet.example/"}, "target"),
        (
            {"kind": "http", "target": "http://vet.example/", "expect_status": (600,)},
            "expect_status",
        ),
    ],
)
def test_check_rejects_invalid_fields(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(CheckError) as raised:
        Check(**{**BASE, **changes})
    assert [p.split(": ", 1)[0] for p in raised.value.problems] == [field]
    assert isinstance(raised.value, ValueError)


def test_check_reports_every_problem_at_once() -> None:
    with pytest.raises(CheckError) as raised:
        Check(name="DB", kind="tcp", target="db", interval=0, failure_threshold=0)
    fields = [p.split(": ", 1)[0] for p in raised.value.problems]
    assert fields == ["name", "interval", "failure_threshold", "target"]


@pytest.mark.parametrize(
    ("kind", "target"),
    [
        ("http", f"http://app:{PASSWORD}@vet.example/"),
        ("postgres", f"postgres://app:{PASSWORD}@db/pets"),
        ("redis", f"rediss://default:{PASSWORD}@cache:6380/0"),
        ("redis", f"ftp://default:{PASSWORD}@cache:6380/0"),
    ],
)
def test_check_refuses_a_password_without_echoing_it(kind: str, target: str) -> None:
    with pytest.raises(CheckError) as raised:
        Check(name="dep", kind=kind, target=target)  # type: ignore[arg-type]
    assert [p.split(": ", 1)[0] for p in raised.value.problems] == ["target"]
    assert PASSWORD not in str(raised.value)


def test_check_accepts_valid_targets() -> None:
    checks = [
        Check(name="db", kind="postgres", target="postgresql://app@db:5432/pets"),
        Check(name="cache", kind="redis", target="redis://cache:6379/0", password_env="CACHE_PW"),  # noqa: S106
        Check(name="web", kind="http", target="https://vet.example/healthz", expect_status=(503,)),
        Check(name="up.stream", kind="grpc", target="[::1]:50051", service="orders"),
        Check(name="port_1", kind="tcp", target="localhost:1"),
        Check(name="py", kind="python", target="check_targets:sync_ok"),
        Check(name="callable", kind="python", target=lambda: True),
    ]
    assert [c.service_name for c in checks] == [
        "check.db",
        "check.cache",
        "check.web",
        "check.up.stream",
        "check.port_1",
        "check.py",
        "check.callable",
    ]
