"""``petsage-grpc status`` against a live ``petsage-grpc serve`` subprocess.

The command runs as ``python -m petsage_grpc status`` with its stdout piped, exactly as a
script would run it; the server's checks are real ``tcp`` checks against listeners the
test opens and closes. Every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import os
import pty
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import grpc
import pytest
from conftest import ROOT, ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tcp_listener import TcpListener, free_port

SpawnServer = Callable[..., ServerProcess]

RUN_TIMEOUT: Final = 60.0
WAIT: Final = 20.0
RPC_TIMEOUT: Final = 5.0
TOKEN: Final = "petsage-status-token-3b9d"  # noqa: S105 - a test token
SMOKE_OK_LINE: Final = "smoke test: ok: PetSage system is alive and purring."
ANSI: Final = re.compile(r"\x1b\[")
STANDARD_NAMES: Final = ("", "liveness", "readiness", "startup", "petsage.v1.SmokeTestService")


def status_env() -> dict[str, str]:
    """This environment without PETSAGE_GRPC_* or NO_COLOR (so plain output is the pipe's doing)."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith("PETSAGE_GRPC_") and k != "NO_COLOR"
    }


def status_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "petsage_grpc", "status", *args]


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str


def run_status(*args: str, env: dict[str, str] | None = None) -> Run:
    done = subprocess.run(
        status_command(*args),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env={**status_env(), **(env or {})},
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def listed(address: str, token: str | None = None) -> dict[str, str]:
    """The server's List answer, name -> status name, fetched directly with grpcio."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = stub.List(health_pb2.HealthListRequest(), timeout=RPC_TIMEOUT, metadata=metadata)
    name_of = health_pb2.HealthCheckResponse.ServingStatus.Name
    return {name: name_of(response.status) for name, response in answer.statuses.items()}


def wait_for(address: str, service: str, status: str) -> None:
    """Poll Check on *service* until it answers *status*; fail after WAIT seconds."""
    wanted = health_pb2.HealthCheckResponse.ServingStatus.Value(status)
    deadline = time.monotonic() + WAIT
    last = None
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                last = stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT
                ).status
            except grpc.RpcError as error:
                last = error.code()
            if last == wanted:
                return
            time.sleep(0.05)
    pytest.fail(f"{service!r} did not become {status} within {WAIT:g}s (last: {last})")


def table_rows(stdout: str) -> dict[str, str]:
    """The SERVICE/STATUS table's rows, name -> status (the header and smoke line left out)."""
    lines = stdout.splitlines()
    assert lines[0].split() == ["SERVICE", "STATUS"], stdout
    rows: dict[str, str] = {}
    for line in lines[1:]:
        if not line.strip():
            break
        name, state = line.split()
        rows["" if name == '""' else name] = state
    return rows


def check_table(name: str, target: str, *, critical: bool = True) -> str:
    return (
        f'[[checks]]\nname = "{name}"\nkind = "tcp"\ntarget = "{target}"\n'
        'interval = "100ms"\ntimeout = "500ms"\nfailure_threshold = 1\n'
        f"critical = {'true' if critical else 'false'}\n"
    )


@pytest.fixture
def listener() -> Iterator[TcpListener]:
    with TcpListener() as running:
        yield running


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[[str], str]:
    def write(text: str) -> str:
        path = tmp_path / f"petsage-{time.monotonic_ns()}.toml"
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write


# --- one-shot table and JSON ------------------------------------------------------------


def test_table_lists_every_name_and_the_smoke_test(
    spawn_server: SpawnServer, listener: TcpListener, config_file: Callable[[str], str]
) -> None:
    server = spawn_server("--config", config_file(check_table("up", listener.address)))
    wait_for(server.address, "check.up", "SERVING")
    wait_for(server.address, "readiness", "SERVING")
    run = run_status("--addr", server.address)
    assert run.code == 0, run
    expected = listed(server.address)
    assert set(expected) == {*STANDARD_NAMES, "check.up"}
    assert table_rows(run.stdout) == expected
    assert run.stdout.splitlines()[-1] == SMOKE_OK_LINE
    assert not ANSI.search(run.stdout), run.stdout
    assert run.stderr == ""


def run_on_terminal(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``status`` with its stdout on a pseudo-terminal; return the exit code and output."""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(
            status_command(*args),
            stdout=slave,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env={**status_env(), **(env or {})},
            cwd=ROOT,
        )
        os.close(slave)
        slave = -1
        output = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child has closed the terminal
                break
            if not chunk:
                break
            output += chunk
        return process.wait(RUN_TIMEOUT), output.decode()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_colours_only_on_a_terminal(spawn_server: SpawnServer) -> None:
    server = spawn_server()
    code, output = run_on_terminal("--addr", server.address)
    assert code == 0
    assert "\x1b[32mSERVING\x1b[0m" in output  # the same table, painted
    code, output = run_on_terminal("--addr", server.address, env={"NO_COLOR": "1"})
    assert code == 0
    assert "SERVING" in output
    assert not ANSI.search(output)
    piped = run_status("--addr", server.address)
    assert not ANSI.search(piped.stdout)


def test_json_has_services_and_smoke_test(
    spawn_server: SpawnServer, listener: TcpListener, config_file: Callable[[str], str]
) -> None:
    server = spawn_server("--config", config_file(check_table("up", listener.address)))
    wait_for(server.address, "check.up", "SERVING")
    wait_for(server.address, "readiness", "SERVING")
    run = run_status("--addr", server.address, "--json")
    assert run.code == 0, run
    assert not ANSI.search(run.stdout)
    answer = json.loads(run.stdout)
    assert set(answer) == {"services", "smoke_test"}
    assert answer["services"] == listed(server.address)
    assert answer["services"]["check.up"] == "SERVING"
    assert answer["smoke_test"] == {
        "status": "ok",
        "message": "PetSage system is alive and purring.",
        "checks": {"up": True},
    }


@pytest.mark.slow
def test_exit_0_when_everything_serves(spawn_server: SpawnServer) -> None:
    server = spawn_server()
    run = run_status("--addr", server.address)
    assert run.code == 0, run
    assert table_rows(run.stdout) == dict.fromkeys(STANDARD_NAMES, "SERVING")
    assert SMOKE_OK_LINE in run.stdout.splitlines()


def test_exit_4_when_a_check_fails(
    spawn_server: SpawnServer, config_file: Callable[[str], str]
) -> None:
    server = spawn_server("--config", config_file(check_table("db", f"127.0.0.1:{free_port()}")))
    wait_for(server.address, "startup", "SERVING")  # the check has failed once
    run = run_status("--addr", server.address)
    assert run.code == 4, run
    rows = table_rows(run.stdout)
    assert rows["check.db"] == "NOT_SERVING"
    assert rows["readiness"] == "NOT_SERVING"
    assert rows["liveness"] == "SERVING"
    assert run.stdout.splitlines()[-1] == (
        "smoke test: UNAVAILABLE: PetSage is not serving right now"
    )
    as_json = run_status("--addr", server.address, "--json")
    assert as_json.code == 4
    assert json.loads(as_json.stdout)["smoke_test"] == {
        "error": "UNAVAILABLE",
        "message": "PetSage is not serving right now",
    }


def test_exit_2_when_nothing_listens() -> None:
    address = f"127.0.0.1:{free_port()}"
    run = run_status("--addr", address, "--timeout", "300ms")
    assert run.code == 2, run
    assert run.stdout == ""
    assert address in run.stderr
    assert "failed to connect" in run.stderr


def test_exit_3_when_list_is_refused_and_0_with_the_token(
    tmp_path: Path, spawn_server: SpawnServer
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    server = spawn_server("--auth-token-file", str(token_file))

    refused = run_status("--addr", server.address)
    assert refused.code == 3, refused
    assert "UNAUTHENTICATED" in refused.stderr
    assert TOKEN not in refused.stderr + refused.stdout

    wrong_file = tmp_path / "wrong"
    wrong_file.write_text("not-the-token\n", encoding="utf-8")
    wrong = run_status("--addr", server.address, "--token-file", str(wrong_file))
    assert wrong.code == 3, wrong

    allowed = run_status("--addr", server.address, "--token-file", str(token_file))
    assert allowed.code == 0, allowed
    assert table_rows(allowed.stdout) == listed(server.address, TOKEN)
    assert TOKEN not in allowed.stdout


# --- --watch ------------------------------------------------------------------------------


@dataclass
class Watching:
    process: subprocess.Popen[str]
    lines: queue.Queue[str | None]
    seen: list[str]

    def expect(self, pattern: str, within: float = WAIT) -> str:
        """Read lines until one matches *pattern*; fail after *within* seconds."""
        wanted = re.compile(pattern)
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no line matching {pattern!r} within {within:g}s: {self.seen}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"status --watch ended before {pattern!r}: {self.seen}")
            self.seen.append(line)
            if wanted.search(line):
                return line


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


@pytest.fixture
def watch_status() -> Iterator[Callable[..., Watching]]:
    started: list[Watching] = []

    def start(*args: str) -> Watching:
        process = subprocess.Popen(
            status_command(*args, "--watch"),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            env=status_env(),
            cwd=ROOT,
        )
        assert process.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
        watching = Watching(process, lines, [])
        started.append(watching)
        return watching

    yield start
    for watching in started:
        if watching.process.poll() is None:
            watching.process.kill()
        watching.process.wait(10)
        if watching.process.stdout is not None:
            watching.process.stdout.close()


def test_watch_prints_a_transition_and_stops_on_sigint(
    spawn_server: SpawnServer,
    listener: TcpListener,
    config_file: Callable[[str], str],
    watch_status: Callable[..., Watching],
) -> None:
    server = spawn_server("--config", config_file(check_table("flaky", listener.address)))
    wait_for(server.address, "check.flaky", "SERVING")
    wait_for(server.address, "readiness", "SERVING")
    watching = watch_status("--addr", server.address)
    watching.expect(r"^smoke test: ok: ")  # the table is out: now following changes

    listener.close()
    line = watching.expect(r"check\.flaky")
    assert re.search(r"\bcheck\.flaky SERVING -> NOT_SERVING$", line), line
    assert not ANSI.search(line)
    watching.expect(r"\breadiness SERVING -> NOT_SERVING$")
    assert watching.process.poll() is None

    watching.process.send_signal(signal.SIGINT)
    code = watching.process.wait(RUN_TIMEOUT)
    assert code == 4  # the last states seen are not all SERVING
    # Nothing but transitions was printed after the table.
    table_end = next(i for i, seen in enumerate(watching.seen) if seen.startswith("smoke test:"))
    for each in watching.seen[table_end + 1 :]:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\S+ \S+ \S+ -> \S+", each), each


@pytest.mark.slow
def test_watch_picks_up_names_added_by_a_reload(
    tmp_path: Path,
    spawn_server: SpawnServer,
    listener: TcpListener,
    watch_status: Callable[..., Watching],
) -> None:
    config = tmp_path / "petsage.toml"
    config.write_text(check_table("first", listener.address), encoding="utf-8")
    server = spawn_server("--config", str(config))
    wait_for(server.address, "check.first", "SERVING")
    watching = watch_status("--addr", server.address, "--json")
    watching.expect(r'^\s*"message": ')  # inside the one JSON object
    watching.expect(r"^}$")

    replacement = tmp_path / "next.toml"
    replacement.write_text(
        check_table("first", listener.address)
        + check_table("second", listener.address, critical=False),
        encoding="utf-8",
    )
    replacement.replace(config)
    server.signal(signal.SIGHUP)
    line = watching.expect(r'"service": "check\.second"')
    event = json.loads(line)
    assert event["service"] == "check.second"
    assert event["to"] in {"NOT_SERVING", "SERVING"}
    if event["to"] == "NOT_SERVING":
        event = json.loads(watching.expect(r'"service": "check\.second".*"to": "SERVING"'))
    assert event["to"] == "SERVING"

    watching.process.send_signal(signal.SIGTERM)
    assert watching.process.wait(RUN_TIMEOUT) == 0


@pytest.mark.slow
def test_event_loop_lag_is_shown_when_the_heartbeat_runs(spawn_server: SpawnServer) -> None:
    server = spawn_server("--probe-port", str(free_port()))
    run = run_status("--addr", server.address)
    assert run.code == 0, run
    lines = run.stdout.splitlines()
    assert lines[-2] == SMOKE_OK_LINE
    assert re.fullmatch(r"event loop lag: \d+ ms", lines[-1]), lines[-1]
    answer = json.loads(run_status("--addr", server.address, "--json").stdout)
    assert answer["smoke_test"]["event_loop_lag_seconds"] >= 0
    # A server without the heartbeat (no probe port, no HTTP port) reports none.
    plain = spawn_server()
    assert (
        "event_loop_lag_seconds"
        not in json.loads(run_status("--addr", plain.address, "--json").stdout)["smoke_test"]
    )


# --- --watch when the server goes away -------------------------------------------------------

QUICK_STOP: Final = ("--drain-seconds", "0", "--grace-seconds", "0")
STAMP: Final = r"^\d{4}-\d\d-\d\dT\S+ "


@pytest.mark.slow
def test_watch_says_when_the_server_is_gone_how_long_and_when_it_is_back(
    spawn_server: SpawnServer, watch_status: Callable[..., Watching]
) -> None:
    port = free_port()
    server = spawn_server("--port", str(port), *QUICK_STOP)
    wait_for(server.address, "readiness", "SERVING")
    watching = watch_status("--addr", server.address)
    watching.expect(r"^smoke test: ok: ")

    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    watching.expect(STAMP + r"connection lost \(UNAVAILABLE\)$")
    # Left down: a reminder says for how long, and the command keeps going.
    line = watching.expect(STAMP + r"still unreachable after \d+s$", within=WAIT + 10)
    # The first reminder comes after 10 s, never before (after it, how much later depends
    # on the retry pause and on the machine's load).
    reminded_after = int(line.rsplit(" ", 1)[1].removesuffix("s"))
    assert reminded_after >= 10, line
    assert watching.process.poll() is None

    restarted = spawn_server("--port", str(port), *QUICK_STOP)
    wait_for(restarted.address, "readiness", "SERVING")
    line = watching.expect(STAMP + r"connection back after \d+s$")
    back_after = int(line.rsplit(" ", 1)[1].removesuffix("s"))
    assert back_after >= 10, line
    assert len([seen for seen in watching.seen if "connection lost" in seen]) == 1

    watching.process.send_signal(signal.SIGINT)
    assert watching.process.wait(RUN_TIMEOUT) in {0, 4}


def test_watch_json_reports_the_loss_as_an_event(
    spawn_server: SpawnServer, watch_status: Callable[..., Watching]
) -> None:
    server = spawn_server(*QUICK_STOP)
    watching = watch_status("--addr", server.address, "--json")
    watching.expect(r"^}$")
    server.process.kill()
    event = json.loads(watching.expect(r'"event": "connection_lost"'))
    assert event["reason"] == "UNAVAILABLE"
    assert re.match(STAMP.removesuffix(" ") + "$", event["time"]), event


def test_watch_exit_on_loss_exits_5(
    spawn_server: SpawnServer, watch_status: Callable[..., Watching]
) -> None:
    server = spawn_server(*QUICK_STOP)
    watching = watch_status("--addr", server.address, "--exit-on-loss")
    watching.expect(r"^smoke test: ok: ")
    server.process.kill()
    watching.expect(STAMP + r"connection lost \(UNAVAILABLE\)$")
    assert watching.process.wait(RUN_TIMEOUT) == 5


def test_exit_on_loss_needs_watch() -> None:
    run = run_status("--exit-on-loss")
    assert run.code == 1, run
    assert "--exit-on-loss needs --watch" in run.stderr
