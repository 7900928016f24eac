"""``petsage-grpc`` command line: ``serve``'s flags, environment variables and error paths.

Bad input to ``serve`` (a flag, an environment variable, an address it cannot listen on)
must end the process with exit code 2 and exactly one line on stderr that names the
problem, leaving nothing listening. Flags win over ``PETSAGE_GRPC_<NAME>`` variables.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Final

import grpc
import pytest
from conftest import ROOT, ServerProcess
from grpc_health.v1 import health_pb2
from tcp_listener import free_port

from petsage_grpc import LIVENESS, ServingStatus
from petsage_grpc.cli._main import main

RUN_TIMEOUT: Final = 20.0
"""Bound on a command that must fail at once (a server that wrongly starts is killed)."""
START_TIMEOUT: Final = 20.0
LISTENING: Final = re.compile(r"serving on (\S+):(\d+)")
TEXT_LINE: Final = re.compile(
    r"^\d{4}-\d\d-\d\dT\S+ +(DEBUG|INFO|WARNING|ERROR) +petsage_grpc\.\w+: "
)

SpawnServer = Callable[..., ServerProcess]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without PETSAGE_GRPC_* variables, plus *extra*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PETSAGE_GRPC_")}
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class CliRun:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str, env: dict[str, str] | None = None, command: str | None = None) -> CliRun:
    """Run ``python -m petsage_grpc *args`` (or the console script *command*) to completion."""
    argv = [command] if command else [sys.executable, "-m", "petsage_grpc"]
    done = subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        check=False,
    )
    return CliRun(done.returncode, done.stdout, done.stderr)


def nothing_listens(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def check_status(address: str, service: str) -> ServingStatus:
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        response = check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return ServingStatus(response.status)


def assert_one_line_naming(run: CliRun, *words: str) -> None:
    """Exit code 2, nothing on stdout, and one non-empty stderr line containing *words*."""
    assert run.code == 2, run.stderr
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].strip()
    for word in words:
        assert word in lines[0], (word, lines[0])


# -- serve: bad input, exit 2 -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        pytest.param(
            ["--host", "203.0.113.7", "--port", "{port}"], {}, ["203.0.113.7"], id="foreign-ip"
        ),
        pytest.param(
            ["--host", "nonexistent.invalid", "--port", "{port}"],
            {},
            ["nonexistent.invalid"],
            id="unresolvable-host",
        ),
        pytest.param(["--host", "127.0.0.1", "--port", "99999"], {}, ["99999"], id="port-99999"),
        pytest.param(
            ["--host", "127.0.0.1", "--port", "abc"], {}, ["--port", "abc"], id="port-abc"
        ),
        pytest.param(["--host", "127.0.0.1", "--port", "-1"], {}, ["--port"], id="port-negative"),
        pytest.param(
            ["--host", "127.0.0.1", "--port", "{port}", "--drain-seconds", "-1"],
            {},
            ["--drain-seconds", "-1"],
            id="negative-drain",
        ),
        pytest.param(
            ["--host", "127.0.0.1", "--port", "{port}", "--grace-seconds", "nan"],
            {},
            ["--grace-seconds", "nan"],
            id="nan-grace",
        ),
        pytest.param(
            ["--host", "127.0.0.1", "--port", "{port}", "--loop-stall-seconds", "0"],
            {},
            ["--loop-stall-seconds", "at least 0.5s"],
            id="stall-zero",
        ),
        pytest.param(
            ["--host", "127.0.0.1", "--port", "{port}"],
            {"PETSAGE_GRPC_LOOP_STALL_SECONDS": "soon"},
            ["PETSAGE_GRPC_LOOP_STALL_SECONDS", "soon"],
            id="env-stall",
        ),
        pytest.param(
            ["--host", "127.0.0.1", "--port", "{port}", "--shed-lag-seconds", "0.2"],
            {},
            ["--shed-lag-seconds", "--probe-port"],
            id="shed-without-heartbeat",
        ),
        pytest.param(
            ["--host", "127.0.0.1", "--port", "{port}", "--probe-port", "0"],
            {"PETSAGE_GRPC_SHED_LAG_SECONDS": "-1"},
            ["PETSAGE_GRPC_SHED_LAG_SECONDS", "-1"],
            id="env-shed-negative",
        ),
        pytest.param(
            ["--host", "127.0.0.1", "--port", "{port}", "--log-level", "loud"],
            {},
            ["--log-level", "loud"],
            id="log-level",
        ),
        pytest.param(
            ["--host", "127.0.0.1", "--port", "{port}", "--log-format", "xml"],
            {},
            ["--log-format", "xml"],
            id="log-format",
        ),
        pytest.param(
            ["--host", "127.0.0.1", "--port", "{port}", "--bogus"], {}, ["--bogus"], id="unknown"
        ),
        pytest.param(
            ["--host", "127.0.0.1", "--port", "{port}", "--drain-seconds"],
            {},
            ["--drain-seconds"],
            id="missing-value",
        ),
        pytest.param(
            ["--host", "127.0.0.1"],
            {"PETSAGE_GRPC_PORT": "abc"},
            ["PETSAGE_GRPC_PORT", "abc"],
            id="env-port",
        ),
        pytest.param(
            ["--host", "127.0.0.1", "--port", "{port}"],
            {"PETSAGE_GRPC_DRAIN_SECONDS": "forever"},
            ["PETSAGE_GRPC_DRAIN_SECONDS", "forever"],
            id="env-drain",
        ),
        pytest.param(
            ["--host", "127.0.0.1", "--port", "{port}"],
            {"PETSAGE_GRPC_LOG_FORMAT": "xml"},
            ["PETSAGE_GRPC_LOG_FORMAT", "xml"],
            id="env-log-format",
        ),
        pytest.param(
            ["--host", "127.0.0.1", "--port", "{port}", "--memory-budget", "lots"],
            {},
            ["--memory-budget", "lots"],
            id="memory-budget",
        ),
        pytest.param(
            ["--host", "127.0.0.1", "--port", "{port}", "--memory-budget", "32Mi"],
            {},
            ["memory budget", "48 MiB"],
            id="memory-budget-too-small",
        ),
        pytest.param(
            ["--host", "127.0.0.1", "--port", "{port}"],
            {"PETSAGE_GRPC_HTTP_ACCESS_LOG": "maybe"},
            ["PETSAGE_GRPC_HTTP_ACCESS_LOG", "maybe"],
            id="env-access-log",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(
    args: list[str], env: dict[str, str], words: list[str]
) -> None:
    port = free_port()
    run = run_cli("serve", *(arg.format(port=port) for arg in args), env=env)
    assert_one_line_naming(run, *words)
    assert nothing_listens(port)


def test_port_in_use_by_a_socket() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        port = occupant.getsockname()[1]

        run = run_cli("serve", "--host", "127.0.0.1", "--port", str(port))

        assert_one_line_naming(run, str(port), "in use")
        # The port still belongs to the occupant alone: a connection reaches it.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            occupant.settimeout(5)
            accepted, _ = occupant.accept()
            accepted.close()


def test_port_in_use_on_loopback_blocks_every_interface() -> None:
    # The default host is every interface; 127.0.0.1:PORT being taken must not be ignored.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        port = occupant.getsockname()[1]

        run = run_cli("serve", "--port", str(port))

        assert_one_line_naming(run, str(port))


def test_port_in_use_by_another_server(spawn_server: SpawnServer) -> None:
    first = spawn_server("--drain-seconds", "0", "--grace-seconds", "0")

    run = run_cli("serve", "--host", "127.0.0.1", "--port", str(first.port))

    assert_one_line_naming(run, str(first.port), "in use")
    # The first server still answers, alone on its port.
    assert check_status(first.address, LIVENESS) is ServingStatus.SERVING
    assert first.process.poll() is None


# -- serve: start-up errors in the log format --------------------------------------------

JSON_ENV: Final = {"PETSAGE_GRPC_LOG_FORMAT": "json"}


def json_errors(run: CliRun) -> list[str]:
    """Exit 2, nothing on stdout, every stderr line a JSON start-up error; their messages."""
    assert run.code == 2, run.stderr
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert lines
    messages = []
    for line in lines:
        entry = json.loads(line)
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
        assert (entry["level"], entry["event"]) == ("error", "startup_error"), line
        messages.append(entry["message"])
    return messages


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        pytest.param(["--port", "abc"], JSON_ENV, ["--port", "abc"], id="bad-flag"),
        pytest.param(["--bogus"], JSON_ENV, ["--bogus"], id="unknown-flag"),
        pytest.param(["--log", "json"], JSON_ENV, ["ambiguous"], id="ambiguous-flag"),
        pytest.param(["--log-format=json", "--bogus"], {}, ["--bogus"], id="format-flag"),
        pytest.param(
            ["--log-format", "xml"], JSON_ENV, ["--log-format", "xml"], id="bad-format-flag"
        ),
        pytest.param(
            [],
            {**JSON_ENV, "PETSAGE_GRPC_DRAIN_SECONDS": "forever"},
            ["PETSAGE_GRPC_DRAIN_SECONDS"],
            id="bad-env",
        ),
        pytest.param(
            ["--tls-cert", "/nonexistent/tls.crt", "--tls-key", "/nonexistent/tls.key"],
            JSON_ENV,
            ["/nonexistent/tls.crt"],
            id="tls-file",
        ),
        pytest.param(
            ["--auth-token-file", "/nonexistent/token"],
            JSON_ENV,
            ["/nonexistent/token"],
            id="token-file",
        ),
    ],
)
def test_start_up_errors_follow_the_json_log_format(
    args: list[str], env: dict[str, str], words: list[str]
) -> None:
    port = free_port()
    run = run_cli("serve", "--host", "127.0.0.1", "--port", str(port), *args, env=env)
    (message,) = json_errors(run)
    for word in words:
        assert word in message, (word, message)
    assert nothing_listens(port)


def test_a_port_in_use_is_reported_in_json() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        port = occupant.getsockname()[1]
        run = run_cli("serve", "--host", "127.0.0.1", "--port", str(port), env=JSON_ENV)
    (message,) = json_errors(run)
    assert f"{port} is already in use" in message


def test_every_problem_of_a_bad_file_is_a_json_line(tmp_path: Path) -> None:
    config = tmp_path / "petsage.toml"
    config.write_text('bogus = 1\n[[checks]]\nname = "x"\n', encoding="utf-8")
    run = run_cli("serve", "--config", str(config), env=JSON_ENV)
    messages = json_errors(run)
    assert len(messages) == 3, messages
    assert all(message.startswith(f"{config}: ") for message in messages)

    # The file's own [server] log_format counts when the flag and environment are silent.
    config.write_text('[server]\nlog_format = "json"\nbogus = 1\n', encoding="utf-8")
    (message,) = json_errors(run_cli("serve", "--config", str(config)))
    assert "server.bogus" in message
    # ... and not over them.
    run = run_cli("serve", "--config", str(config), "--log-format", "text")
    assert_one_line_naming(run, "petsage-grpc serve: error: ", "server.bogus")


def test_an_unreadable_format_flag_without_the_environment_falls_back_to_text() -> None:
    run = run_cli("serve", "--log-format", "xml")
    assert_one_line_naming(run, "petsage-grpc serve: error: ", "--log-format", "xml")


def test_an_unknown_command_follows_the_environment_format() -> None:
    (message,) = json_errors(run_cli("serv", env=JSON_ENV))
    assert "'serv'" in message


# -- serve: environment variables and flags ----------------------------------------------


@dataclass
class Serving:
    process: subprocess.Popen[str]
    port: int
    lines: list[str]
    pump: threading.Thread

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, wait for the exit and for stderr to be read to its end."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self.pump.join(timeout)
        assert not self.pump.is_alive()
        return code


@pytest.fixture
def start_serve() -> Iterator[Callable[..., Serving]]:
    """Start ``serve`` with exactly the given flags (no --host/--port added) and env."""
    started: list[Serving] = []

    def start(*args: str, env: dict[str, str] | None = None, port: int | None = None) -> Serving:
        """Wait for the "serving on" line, or with *port*, for the port to answer."""
        process = subprocess.Popen(
            [sys.executable, "-m", "petsage_grpc", "serve", *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            env=clean_env(env),
            cwd=ROOT,
        )
        lines: list[str] = []
        ports: queue.Queue[int | None] = queue.Queue()

        def pump() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                lines.append(line)
                match = LISTENING.search(line)
                if match:
                    ports.put(int(match.group(2)))
            ports.put(None)

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        serving = Serving(process, 0, lines, thread)
        started.append(serving)
        if port is None:
            try:
                port = ports.get(timeout=START_TIMEOUT)
            except queue.Empty:
                pytest.fail(f"serve did not start within {START_TIMEOUT}s: {''.join(lines)}")
            if port is None:
                pytest.fail(f"serve exited without listening: {''.join(lines)}")
        else:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=START_TIMEOUT)
        serving.port = port
        # An answered call means the server's loop is running, signal handlers included.
        assert check_status(f"127.0.0.1:{port}", LIVENESS) is ServingStatus.SERVING
        return serving

    yield start
    for serving in started:
        if serving.process.poll() is None:
            serving.process.kill()
            serving.process.wait(10)


def test_host_and_port_from_the_environment(start_serve: Callable[..., Serving]) -> None:
    port = free_port()
    serving = start_serve(
        env={
            "PETSAGE_GRPC_HOST": "127.0.0.1",
            "PETSAGE_GRPC_PORT": str(port),
            "PETSAGE_GRPC_DRAIN_SECONDS": "0",
        }
    )
    assert serving.port == port
    assert f"serving on 127.0.0.1:{port}" in "".join(serving.lines)
    assert serving.stop() == 0


def test_drain_and_grace_from_the_environment(spawn_server: SpawnServer) -> None:
    server = spawn_server(
        env={"PETSAGE_GRPC_DRAIN_SECONDS": "0.25", "PETSAGE_GRPC_GRACE_SECONDS": "0.5"}
    )
    assert check_status(server.address, LIVENESS) is ServingStatus.SERVING

    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    code = server.wait(20)
    elapsed = time.monotonic() - signalled

    assert code == 0
    # The default drain is 5 s; stopping well before it shows the variable was used.
    assert elapsed < 4.0, elapsed
    assert "draining for 0.25s, then stopping with 0.5s grace" in wait_for_log(server, "stopped")


def test_flags_win_over_the_environment(spawn_server: SpawnServer) -> None:
    # spawn_server passes --port 0 and --drain-seconds 0.25: the variables must lose.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        taken = occupant.getsockname()[1]
        server = spawn_server(
            "--drain-seconds",
            "0.25",
            "--grace-seconds",
            "0",
            env={"PETSAGE_GRPC_PORT": str(taken), "PETSAGE_GRPC_DRAIN_SECONDS": "30"},
        )
        assert server.port != taken
        assert check_status(server.address, LIVENESS) is ServingStatus.SERVING
        server.signal(signal.SIGTERM)
        assert server.wait(20) == 0
    assert "draining for 0.25s" in wait_for_log(server, "stopped")


def wait_for_log(server: ServerProcess, text: str, timeout: float = START_TIMEOUT) -> str:
    """The server's log once it contains *text* (the pump thread may lag the exit)."""
    deadline = time.monotonic() + timeout
    while text not in server.log():
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} not logged within {timeout}s:\n{server.log()}")
        time.sleep(0.01)
    return server.log()


def _stop_and_read_log(server: ServerProcess) -> list[str]:
    assert check_status(server.address, LIVENESS) is ServingStatus.SERVING
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0
    deadline = time.monotonic() + START_TIMEOUT
    while not server.log().endswith("\n") or "stopped" not in server.log():
        if time.monotonic() > deadline:
            pytest.fail(f"no 'stopped' line:\n{server.log()}")
        time.sleep(0.01)
    return server.log().splitlines()


def test_log_format_json_from_the_environment(spawn_server: SpawnServer) -> None:
    server = spawn_server(
        "--drain-seconds", "0", "--grace-seconds", "0", env={"PETSAGE_GRPC_LOG_FORMAT": "json"}
    )
    lines = _stop_and_read_log(server)

    entries = [json.loads(line) for line in lines]
    assert all(isinstance(entry, dict) for entry in entries)
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    assert entries[0]["message"] == f"serving on 127.0.0.1:{server.port}"
    assert entries[-1]["message"] == "stopped"


def test_log_format_flag_wins_over_the_environment(spawn_server: SpawnServer) -> None:
    server = spawn_server(
        "--log-format",
        "text",
        "--drain-seconds",
        "0",
        "--grace-seconds",
        "0",
        env={"PETSAGE_GRPC_LOG_FORMAT": "json"},
    )
    lines = _stop_and_read_log(server)

    assert lines
    for line in lines:
        assert TEXT_LINE.match(line), line
        assert not line.startswith("{")
    assert lines[-1].endswith("petsage_grpc.server: stopped")


def test_log_level_flag_wins_over_the_environment(spawn_server: SpawnServer) -> None:
    server = spawn_server(
        "--log-level",
        "info",
        "--drain-seconds",
        "0",
        "--grace-seconds",
        "0",
        env={"PETSAGE_GRPC_LOG_LEVEL": "error"},
    )
    lines = _stop_and_read_log(server)
    assert sum(" INFO " in line for line in lines) >= 3, lines  # started, signal, stopped


def test_log_level_from_the_environment(start_serve: Callable[..., Serving]) -> None:
    port = free_port()
    serving = start_serve(
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--drain-seconds",
        "0",
        "--grace-seconds",
        "0",
        env={"PETSAGE_GRPC_LOG_LEVEL": "warning"},
        port=port,
    )
    assert serving.stop() == 0
    # Starting, draining and stopping are all INFO: nothing at all is logged.
    assert serving.lines == []


# -- the top-level command ---------------------------------------------------------------

_SCRIPT = shutil.which("petsage-grpc", path=str(Path(sys.executable).parent))
COMMANDS: Final = [
    pytest.param(None, id="python-m"),
    pytest.param(
        _SCRIPT,
        id="console-script",
        marks=pytest.mark.skipif(_SCRIPT is None, reason="no petsage-grpc script installed"),
    ),
]


@pytest.mark.parametrize("command", COMMANDS)
def test_no_command_exits_2(command: str | None) -> None:
    run = run_cli(command=command)
    assert_one_line_naming(run, "command")


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_command_exits_2(command: str | None) -> None:
    run = run_cli("start", command=command)
    assert_one_line_naming(run, "start")


@pytest.mark.parametrize("command", COMMANDS)
def test_version(command: str | None) -> None:
    run = run_cli("--version", command=command)
    assert run.code == 0, run.stderr
    assert run.stdout.strip() == f"petsage-grpc {version('petsage-grpc')}"


def test_serve_help() -> None:
    run = run_cli("serve", "--help")
    assert run.code == 0, run.stderr
    assert "PETSAGE_GRPC_" in run.stdout
    for flag in (
        "--host",
        "--port",
        "--log-level",
        "--log-format",
        "--drain-seconds",
        "--grace-seconds",
    ):
        assert flag in run.stdout, flag


# -- main(argv) as a library call --------------------------------------------------------


def _call_main(argv: list[str], environ: dict[str, str]) -> int:
    try:
        return main(argv, environ=environ)
    except SystemExit as exit_:
        code = exit_.code
    assert isinstance(code, int)
    return code


@pytest.mark.parametrize(
    ("argv", "environ", "words"),
    [
        pytest.param(["serve", "--port", "abc"], {}, ["--port", "abc"], id="port"),
        pytest.param(["serve", "--port", "70000"], {}, ["70000"], id="port-range"),
        pytest.param(["serve", "--log-level", "loud"], {}, ["loud"], id="log-level"),
        pytest.param(["serve", "--log-format", "xml"], {}, ["xml"], id="log-format"),
        pytest.param(["serve", "--drain-seconds", "-1"], {}, ["--drain-seconds"], id="drain"),
        pytest.param(["serve", "--bogus"], {}, ["--bogus"], id="unknown-flag"),
        pytest.param(["serve"], {"PETSAGE_GRPC_PORT": "abc"}, ["PETSAGE_GRPC_PORT"], id="env"),
        pytest.param(
            ["serve"], {"PETSAGE_GRPC_LOG_LEVEL": "loud"}, ["PETSAGE_GRPC_LOG_LEVEL"], id="env2"
        ),
        pytest.param([], {}, ["command"], id="no-command"),
        pytest.param(["start"], {}, ["start"], id="unknown-command"),
    ],
)
def test_main_reports_bad_input(
    argv: list[str],
    environ: dict[str, str],
    words: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = _call_main(argv, environ)
    captured = capsys.readouterr()
    assert_one_line_naming(CliRun(code, captured.out, captured.err), *words)


def test_main_ignores_the_process_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # environ= replaces os.environ: a broken variable in the process must not matter,
    # and one in environ= must.
    monkeypatch.setenv("PETSAGE_GRPC_LOG_FORMAT", "xml")
    code = _call_main(["serve", "--port", "abc"], {})
    captured = capsys.readouterr()
    assert_one_line_naming(CliRun(code, captured.out, captured.err), "--port")
    assert "PETSAGE_GRPC_LOG_FORMAT" not in captured.err


def test_main_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert _call_main(["--version"], {}) == 0
    assert capsys.readouterr().out.strip() == f"petsage-grpc {version('petsage-grpc')}"


def test_main_probe_returns_its_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe"], environ={}) == 1
    assert "error: -addr not specified" in capsys.readouterr().err


# -- what a default server loads ----------------------------------------------------

# Every pod pays start-up time and idle memory for each module; these serve features a
# default server does not use, so they load only when the feature does.
LOADED_ON_USE: Final = (
    "tomllib",  # --config
    "petsage_grpc.server._tls",  # --tls-cert
    "petsage_grpc.server._reload",  # --config
    "hashlib",  # a bearer token (with hmac: OpenSSL's libcrypto)
    "hmac",
    "grpc_reflection.v1alpha._async",  # the first reflection call
    "google.protobuf.descriptor_pb2",
    "unicodedata",  # the idna codec, for a non-ASCII --host
    "random",  # dependency checks' jitter
    "aiohttp",  # --http-port
    "prometheus_client",
)
_REPORT_LOADED = """
import json, os, signal, socket, sys, threading, time
from petsage_grpc.cli._main import main

port, names = int(sys.argv[1]), sys.argv[2:]

def report_once_listening():
    while True:
        try:
            # bytes: a str host would load unicodedata (the idna codec) in this process.
            socket.create_connection((b"127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.01)
    print(json.dumps(sorted(n for n in names if n in sys.modules)), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=report_once_listening, daemon=True).start()
sys.exit(main(["serve", "--host", "127.0.0.1", "--port", str(port),
               "--drain-seconds", "0", "--grace-seconds", "0"]))
"""


def test_a_default_server_loads_no_module_for_features_it_does_not_use() -> None:
    port = free_port()
    done = subprocess.run(
        [sys.executable, "-c", _REPORT_LOADED, str(port), *LOADED_ON_USE],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
