"""Shared fixtures: a real PetSage server on an ephemeral loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO, Any, TypeVar

import grpc
import pytest
from tcp_listener import free_port

from petsage_grpc import SERVER_OPTIONS, StatusBoard, add_to_server

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as the module *name* (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class InProcessServer:
    """A grpc.aio server with the PetSage services, on its own event loop thread.

    Tests drive the board from the test thread, which also exercises the board's
    thread safety.
    """

    port: int
    board: StatusBoard
    server: grpc.aio.Server
    loop: asyncio.AbstractEventLoop

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run *coro* on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Start *coro* on the server's loop without waiting."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


@pytest.fixture
def start_server() -> Iterator[Callable[..., InProcessServer]]:
    """Start in-process servers (``compression`` sets the server's default; the other
    keyword arguments pass through to ``add_to_server``)."""
    started: list[tuple[InProcessServer, threading.Thread]] = []

    def start(*, compression: grpc.Compression | None = None, **kwargs: Any) -> InProcessServer:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="grpc-server", daemon=True)
        thread.start()

        async def build() -> InProcessServer:
            server = grpc.aio.server(options=SERVER_OPTIONS, compression=compression)
            board = add_to_server(server, **kwargs)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return InProcessServer(port=port, board=board, server=server, loop=loop)

        running = asyncio.run_coroutine_threadsafe(build(), loop).result(30)
        started.append((running, thread))
        return running

    yield start
    for running, thread in started:
        running.run(running.server.stop(None))
        running.loop.call_soon_threadsafe(running.loop.stop)
        thread.join(10)
        running.loop.close()


@pytest.fixture
def server(start_server: Callable[..., InProcessServer]) -> InProcessServer:
    """One in-process server with the default board."""
    return start_server()


@pytest.fixture
def channel(server: InProcessServer) -> Iterator[grpc.Channel]:
    """A blocking grpcio channel to the in-process server."""
    with grpc.insecure_channel(server.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel


_LISTENING = re.compile(r"serving on (\S+):(\d+)")


@dataclass
class ServerProcess:
    """``python -m petsage_grpc serve`` running as a child process."""

    process: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def log(self) -> str:
        """Everything the server has written to stderr so far."""
        return "".join(self.lines)


def _pump(stream: IO[str], lines: list[str]) -> None:
    with contextlib.suppress(ValueError, OSError):  # closed at teardown
        for line in stream:
            lines.append(line)


@pytest.fixture
def spawn_server() -> Iterator[Callable[..., ServerProcess]]:
    """Start ``petsage-grpc serve`` processes on ephemeral loopback ports."""
    processes: list[ServerProcess] = []

    def spawn(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        command = [
            sys.executable,
            "-m",
            "petsage_grpc",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *args,
        ]
        process = subprocess.Popen(
            command,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
        )
        assert process.stderr is not None
        lines: list[str] = []
        for line in process.stderr:
            lines.append(line)
            match = _LISTENING.search(line)
            if match:
                break
        else:
            process.wait(10)
            pytest.fail(f"server did not start: {''.join(lines)}")
        threading.Thread(target=_pump, args=(process.stderr, lines), daemon=True).start()
        running = ServerProcess(process=process, port=int(match.group(2)), lines=lines)
        processes.append(running)
        return running

    yield spawn
    for running in processes:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait(10)
        if running.process.stderr is not None:
            running.process.stderr.close()


@pytest.fixture
def start_http(
    tmp_path: Path, spawn_server: Callable[..., ServerProcess]
) -> Callable[..., tuple[ServerProcess, int]]:
    """Start ``serve --http-port <free port> --config <file with *config*>`` (+ *args*)."""

    def start(config: str, *args: str) -> tuple[ServerProcess, int]:
        path = tmp_path / f"petsage-{time.monotonic_ns()}.toml"
        path.write_text(config, encoding="utf-8")
        http_port = free_port()
        server = spawn_server("--http-port", str(http_port), "--config", str(path), *args)
        return server, http_port

    return start
