"""Reloading the configuration file of a running ``petsage-grpc serve`` (SIGHUP, or polling).

The server runs as a subprocess; its checks are real ``tcp`` checks against listeners
the test owns. Watch streams are real grpcio streams read on background threads, so a
test sees exactly which messages a client would get across a reload. SIGHUP goes to the
server process itself. Every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Final

import grpc
import pytest
from conftest import ROOT, ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tcp_listener import TcpListener, free_port

SpawnServer = Callable[..., ServerProcess]

WAIT: Final = 20.0
RPC_TIMEOUT: Final = 5.0
Status = health_pb2.HealthCheckResponse.ServingStatus
SERVING: Final = Status.Value("SERVING")
NOT_SERVING: Final = Status.Value("NOT_SERVING")
SERVICE_UNKNOWN: Final = Status.Value("SERVICE_UNKNOWN")


def check_table(
    name: str, target: str, *, critical: bool = True, interval: str = "100ms", **extra: str
) -> str:
    lines = [
        "[[checks]]",
        f'name = "{name}"',
        'kind = "tcp"',
        f'target = "{target}"',
        f'interval = "{interval}"',
        'timeout = "500ms"',
        "failure_threshold = 1",
        f"critical = {'true' if critical else 'false'}",
        *(f'{key} = "{value}"' for key, value in extra.items()),
    ]
    return "\n".join(lines) + "\n"


def replace_file(path: Path, text: str) -> None:
    """Write *path* atomically, so that neither a poll nor SIGHUP reads half a file."""
    temporary = path.with_name(f".{path.name}.{time.monotonic_ns()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def wait_until(predicate: Callable[[], bool], what: str, within: float = WAIT) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:g}s waiting for {what}")
        time.sleep(0.02)


def log_count(server: ServerProcess, text: str) -> int:
    return server.log().count(text)


def wait_for_log(server: ServerProcess, text: str, *, count: int = 1) -> str:
    """Wait until *text* has been logged *count* times; return the last such line."""
    wait_until(
        lambda: log_count(server, text) >= count,
        f"{text!r} in the log (x{count}); log so far:\n{server.log()}",
    )
    return [line for line in server.log().splitlines() if text in line][count - 1]


class Health:
    """A blocking grpcio channel to the server, with the calls these tests make."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(self.channel).result(timeout=WAIT)
        self.stub = health_pb2_grpc.HealthStub(self.channel)

    def status(self, service: str) -> int | None:
        """The service's status, or None if Check answers NOT_FOUND."""
        try:
            answer = self.stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT
            )
        except grpc.RpcError as error:
            if error.code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise
        status: int = answer.status
        return status

    def names(self) -> dict[str, int]:
        answer = self.stub.List(health_pb2.HealthListRequest(), timeout=RPC_TIMEOUT)
        return {name: response.status for name, response in answer.statuses.items()}

    def wait_for(self, service: str, status: int | None) -> None:
        wait_until(
            lambda: self.status(service) == status,
            f"{service!r} to be {status if status is None else Status.Name(status)}",
        )


class WatchRecorder:
    """One Watch stream, read on a background thread; every message is kept in order."""

    def __init__(self, health: Health, service: str) -> None:
        self.service = service
        self.messages: list[int] = []
        self.ended: grpc.StatusCode | None = None
        self._changed = threading.Condition()
        self._call: Any = health.stub.Watch(health_pb2.HealthCheckRequest(service=service))
        self._thread = threading.Thread(target=self._read, name=f"watch {service}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        code = grpc.StatusCode.OK
        try:
            for answer in self._call:
                with self._changed:
                    self.messages.append(answer.status)
                    self._changed.notify_all()
        except grpc.RpcError as error:
            code = error.code()
        with self._changed:
            self.ended = code
            self._changed.notify_all()

    def snapshot(self) -> list[int]:
        with self._changed:
            return list(self.messages)

    def wait_for_count(self, count: int, within: float = WAIT) -> list[int]:
        """Wait until at least *count* messages arrived; return them all."""
        with self._changed:
            ok = self._changed.wait_for(
                lambda: len(self.messages) >= count or self.ended is not None, within
            )
            messages = list(self.messages)
        assert ok, f"Watch {self.service!r}: {count} messages not seen in {within:g}s"
        assert len(messages) >= count, f"Watch {self.service!r} ended ({self.ended}): {messages}"
        return messages

    def wait_for_status(self, status: int, within: float = WAIT) -> list[int]:
        with self._changed:
            ok = self._changed.wait_for(
                lambda: status in self.messages or self.ended is not None, within
            )
            messages = list(self.messages)
        assert ok, f"Watch {self.service!r}: {Status.Name(status)} not seen: {messages}"
        assert status in messages, f"Watch {self.service!r} ended ({self.ended}): {messages}"
        return messages

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(10)


@pytest.fixture
def health_client() -> Iterator[Callable[[str], Health]]:
    opened: list[Health] = []

    def open_health(address: str) -> Health:
        health = Health(address)
        opened.append(health)
        return health

    yield open_health
    for health in opened:
        health.channel.close()


@pytest.fixture
def watches() -> Iterator[Callable[[Health, str], WatchRecorder]]:
    opened: list[WatchRecorder] = []

    def open_watch(health: Health, service: str) -> WatchRecorder:
        recorder = WatchRecorder(health, service)
        opened.append(recorder)
        return recorder

    yield open_watch
    for recorder in opened:
        recorder.close()


@pytest.fixture
def listeners() -> Iterator[Callable[[], TcpListener]]:
    opened: list[TcpListener] = []

    def open_listener() -> TcpListener:
        listener = TcpListener()
        opened.append(listener)
        return listener

    yield open_listener
    for listener in opened:
        listener.close()


def test_sighup_adds_removes_and_changes_checks(
    tmp_path: Path,
    spawn_server: SpawnServer,
    health_client: Callable[[str], Health],
    watches: Callable[[Health, str], WatchRecorder],
    listeners: Callable[[], TcpListener],
) -> None:
    keep_dependency, shared = listeners(), listeners()
    config = tmp_path / "petsage.toml"
    keep = check_table("keep", keep_dependency.address)
    replace_file(
        config,
        keep
        + check_table("changed", shared.address, critical=False)
        + check_table("gone", shared.address),
    )
    server = spawn_server("--config", str(config))
    health = health_client(server.address)
    for name in ("check.keep", "check.changed", "check.gone", "readiness"):
        health.wait_for(name, SERVING)

    readiness = watches(health, "readiness")
    on_keep = watches(health, "check.keep")
    on_gone = watches(health, "check.gone")
    on_added = watches(health, "check.added")
    assert readiness.wait_for_count(1) == [SERVING]
    assert on_keep.wait_for_count(1) == [SERVING]
    assert on_gone.wait_for_count(1) == [SERVING]
    assert on_added.wait_for_count(1) == [SERVICE_UNKNOWN]

    # "changed" now dials a port nothing listens on: the change must take effect.
    dead = free_port()
    replace_file(
        config,
        keep
        + check_table("changed", f"127.0.0.1:{dead}", critical=False, interval="200ms")
        + check_table("added", shared.address, critical=False),
    )
    server.signal(signal.SIGHUP)
    line = wait_for_log(server, "configuration reloaded")
    assert "configuration reloaded: added added; removed gone; changed changed" in line

    names = health.names()
    assert "check.added" in names
    assert "check.gone" not in names
    assert {"check.keep", "check.changed"} <= set(names)
    assert health.status("check.gone") is None  # Check: NOT_FOUND

    assert on_gone.wait_for_count(2) == [SERVING, SERVICE_UNKNOWN]
    assert on_gone.ended is None  # the stream stays open for the name's return
    assert on_added.wait_for_status(SERVING)[0] == SERVICE_UNKNOWN
    health.wait_for("check.added", SERVING)
    health.wait_for("check.changed", NOT_SERVING)

    # Neither the unchanged check's nor readiness's watchers heard anything.
    assert on_keep.snapshot() == [SERVING]
    assert readiness.snapshot() == [SERVING]
    assert on_keep.ended is None
    assert readiness.ended is None
    # A real change on "keep" is the very next message on both (still open) streams.
    keep_dependency.close()
    assert on_keep.wait_for_count(2) == [SERVING, NOT_SERVING]
    assert readiness.wait_for_count(2) == [SERVING, NOT_SERVING]
    assert server.process.poll() is None


def test_invalid_file_keeps_the_running_configuration(
    tmp_path: Path,
    spawn_server: SpawnServer,
    health_client: Callable[[str], Health],
    listeners: Callable[[], TcpListener],
) -> None:
    keep_dependency, shared = listeners(), listeners()
    config = tmp_path / "petsage.toml"
    original = check_table("keep", keep_dependency.address) + check_table("other", shared.address)
    replace_file(config, original)
    server = spawn_server("--config", str(config))
    health = health_client(server.address)
    for name in ("check.keep", "check.other", "readiness"):
        health.wait_for(name, SERVING)
    before = health.names()

    replace_file(
        config,
        original + '[[checks]]\nname = "cache"\nkind = "memcached"\ntarget = "127.0.0.1:1"\n',
    )
    server.signal(signal.SIGHUP)
    line = wait_for_log(server, "configuration not reloaded")
    assert re.search(r"checks\[2\] \('cache'\)\.kind: unknown kind 'memcached'", line), line
    assert str(config) in line
    assert "configuration reloaded" not in server.log()

    assert health.names() == before
    assert "check.cache" not in health.names()
    assert server.process.poll() is None
    # The old checks keep running: a real outage still shows.
    keep_dependency.close()
    health.wait_for("check.keep", NOT_SERVING)
    health.wait_for("readiness", NOT_SERVING)
    assert health.status("check.other") == SERVING

    # Not TOML at all: refused the same way.
    replace_file(config, "[[checks]\nname = \n")
    server.signal(signal.SIGHUP)
    second = wait_for_log(server, "configuration not reloaded", count=2)
    assert "not valid TOML" in second
    assert set(health.names()) == set(before)

    # A good file is applied again afterwards.
    replace_file(config, check_table("other", shared.address))
    server.signal(signal.SIGHUP)
    applied = wait_for_log(server, "configuration reloaded")
    assert "configuration reloaded: removed keep" in applied
    health.wait_for("check.keep", None)
    health.wait_for("readiness", SERVING)
    assert server.process.poll() is None


def test_config_poll_picks_up_an_edit_without_sighup(
    tmp_path: Path,
    spawn_server: SpawnServer,
    health_client: Callable[[str], Health],
    listeners: Callable[[], TcpListener],
) -> None:
    dependency = listeners()
    config = tmp_path / "petsage.toml"
    replace_file(config, check_table("first", dependency.address))
    server = spawn_server("--config", str(config), "--config-poll-seconds", "0.2")
    health = health_client(server.address)
    health.wait_for("check.first", SERVING)

    replace_file(
        config,
        check_table("first", dependency.address)
        + check_table("polled", dependency.address, critical=False),
    )
    health.wait_for("check.polled", SERVING)
    line = wait_for_log(server, "configuration reloaded")
    assert "configuration reloaded: added polled" in line
    assert "SIGHUP" not in server.log()

    # An invalid edit is reported once and changes nothing.
    replace_file(config, check_table("first", dependency.address) + "bogus = 1\n")
    refused = wait_for_log(server, "configuration not reloaded")
    assert "bogus" in refused
    assert {"check.first", "check.polled"} <= set(health.names())
    assert server.process.poll() is None


def test_a_reload_that_adds_a_critical_check_takes_no_serving_pod_out(
    tmp_path: Path,
    spawn_server: SpawnServer,
    health_client: Callable[[str], Health],
    watches: Callable[[Health, str], WatchRecorder],
    listeners: Callable[[], TcpListener],
) -> None:
    dependency = listeners()
    config = tmp_path / "petsage.toml"
    base = check_table("base", dependency.address)
    replace_file(config, base)
    server = spawn_server("--config", str(config))
    health = health_client(server.address)
    aggregates = ("readiness", "", "petsage.v1.SmokeTestService", "startup")
    for name in aggregates:
        health.wait_for(name, SERVING)
    watched = [watches(health, name) for name in aggregates]
    for recorder in watched:
        assert recorder.wait_for_count(1) == [SERVING]

    drops = log_count(server, "'readiness': SERVING -> NOT_SERVING")  # none: start-up's is initial
    # A healthy check whose first attempt is a second away, and one an hour away.
    replace_file(
        config,
        base
        + check_table("soon", dependency.address, initial_delay="1s")
        + check_table("late", dependency.address, initial_delay="1h"),
    )
    server.signal(signal.SIGHUP)
    assert "added soon, late" in wait_for_log(server, "configuration reloaded")
    assert health.status("check.late") == NOT_SERVING  # no answer yet: as at start-up
    health.wait_for("check.soon", SERVING)
    for name in aggregates:
        assert health.status(name) == SERVING, name
    for recorder in watched:
        assert recorder.snapshot() == [SERVING], recorder.service
        assert recorder.ended is None
    assert log_count(server, "'readiness': SERVING -> NOT_SERVING") == drops
    assert server.process.poll() is None


def test_start_up_logs_initial_statuses_as_initial_then_the_first_verdict(
    tmp_path: Path,
    spawn_server: SpawnServer,
    health_client: Callable[[str], Health],
    listeners: Callable[[], TcpListener],
) -> None:
    config = tmp_path / "petsage.toml"
    replace_file(config, check_table("db", listeners().address))
    server = spawn_server("--config", str(config), "--log-format", "json")
    health_client(server.address).wait_for("readiness", SERVING)
    wait_for_log(server, "'readiness': NOT_SERVING -> SERVING")
    entries = [json.loads(line) for line in server.log().splitlines()]
    started = next(i for i, e in enumerate(entries) if e.get("event") == "started")
    initial = [i for i, e in enumerate(entries) if e.get("event") == "initial_status"]
    assert initial, server.log()
    assert max(initial) < started, "initial statuses come before 'serving on'"
    assert [(entries[i]["service"], entries[i]["status"]) for i in initial] == [
        (name, "NOT_SERVING")
        for name in ("check.db", "readiness", "", "petsage.v1.SmokeTestService", "startup")
    ]
    assert all("previous" not in entries[i] for i in initial)
    assert entries[initial[1]]["message"] == "service 'readiness': NOT_SERVING (initial)"
    # The only readiness change is the one the check's verdict makes.
    changes = [e for e in entries if e.get("event") == "status_change"]
    readiness = [(e["previous"], e["status"]) for e in changes if e["service"] == "readiness"]
    assert readiness == [("NOT_SERVING", "SERVING")]


def test_sighup_without_a_configuration_file_is_harmless(
    spawn_server: SpawnServer, health_client: Callable[[str], Health]
) -> None:
    server = spawn_server()
    health = health_client(server.address)
    # An answered Check means the event loop has run past serve()'s start-up code.
    assert health.status("readiness") == SERVING
    server.signal(signal.SIGHUP)
    wait_for_log(server, "no configuration file to reload")
    assert server.process.poll() is None
    assert health.status("readiness") == SERVING


RACE_ATTEMPTS: Final = 30


def _collect(stream: IO[str], lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def _signal_as_soon_as_serving(
    signum: int,
) -> tuple[subprocess.Popen[str], list[str], threading.Thread]:
    """Start ``serve`` and send *signum* the moment "serving on" is read from its stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "petsage_grpc", "serve", "--host", "127.0.0.1", "--port", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    assert process.stderr is not None
    lines: list[str] = []
    for line in process.stderr:
        lines.append(line)
        if "serving on" in line:
            process.send_signal(signum)
            break
    reader = threading.Thread(target=_collect, args=(process.stderr, lines), daemon=True)
    reader.start()
    return process, lines, reader


@pytest.mark.slow
def test_sighup_as_soon_as_serving_on_is_logged() -> None:
    for attempt in range(RACE_ATTEMPTS):
        process, lines, reader = _signal_as_soon_as_serving(signal.SIGHUP)
        try:
            wait_until(
                lambda: (
                    "no configuration file to reload" in "".join(lines)  # noqa: B023
                    or process.poll() is not None  # noqa: B023
                ),
                "the SIGHUP to be handled or to kill the server",
            )
            assert process.poll() is None, (
                f"attempt {attempt + 1}: SIGHUP killed the server (exit {process.returncode})"
            )
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: "SIGTERM received" in "".join(lines), "SIGTERM to be handled")  # noqa: B023
            process.send_signal(signal.SIGTERM)  # again: skip the drain
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(30)
            reader.join(10)
            if process.stderr is not None:
                process.stderr.close()
