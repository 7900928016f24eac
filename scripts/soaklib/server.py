"""The server under test, ``scripts/soak_server.py``, as a child process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections import deque
from pathlib import Path
from typing import Any

from petsage_grpc import ServingStatus
from soaklib.common import (
    MAX_SERVER_LINES,
    ROOT,
    STEP_TIMEOUT,
    Config,
    StepError,
)


class SoakServer:
    """``scripts/soak_server.py`` as a child process, talked to in JSON lines."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, pid: int) -> None:
        self.process = process
        self.port = port
        self.pid = pid
        self.latest: dict[str, Any] = {}
        self.stats_seen = 0
        self.peak_tasks = 0
        self.peak_watchers = 0
        self.events: list[dict[str, Any]] = []
        self.stderr_tail: deque[str] = deque(maxlen=40)
        self._stats_changed = asyncio.Condition()
        self._acks: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._readers: list[asyncio.Task[None]] = []

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    async def start(cls, config: Config) -> SoakServer:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(config.server_script),
            "--flip-ms",
            str(config.flip_seconds * 1000),
            "--drain-seconds",
            str(config.drain_seconds),
            "--grace-seconds",
            str(config.grace_seconds),
            "--max-seconds",
            str(config.seconds + 600),
            *(["--flip-thread"] if config.flip_thread else []),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        assert process.stdout is not None  # noqa: S101 - PIPE was asked for
        assert process.stderr is not None  # noqa: S101
        first = b""
        try:
            first = await asyncio.wait_for(process.stdout.readline(), STEP_TIMEOUT)
            event = json.loads(first)
            if event.get("event") != "listening":
                raise ValueError("not the listening event")
        except (TimeoutError, ValueError) as error:
            if process.returncode is None:
                process.kill()
            errors = b""
            with contextlib.suppress(TimeoutError):
                errors = await asyncio.wait_for(process.stderr.read(), STEP_TIMEOUT)
            await process.wait()
            tail = errors.decode(errors="replace").strip().splitlines()[-5:]
            raise StepError(
                f"the server did not start ({type(error).__name__}; first line {first!r}; "
                f"exit {process.returncode}): {' | '.join(tail)}"
            ) from None
        server = cls(process, int(event["port"]), int(event["pid"]))
        server._readers = [
            asyncio.create_task(server._read_stdout()),
            asyncio.create_task(server._read_stderr()),
        ]
        return server

    async def _read_stdout(self) -> None:
        assert self.process.stdout is not None  # noqa: S101
        for _ in range(MAX_SERVER_LINES):
            line = await self.process.stdout.readline()
            if not line:
                return
            try:
                event = json.loads(line)
            except ValueError:
                self.stderr_tail.append(f"(stdout) {line.decode(errors='replace')}")
                continue
            kind = event.get("event")
            if kind == "stats":
                self.latest = event
                self.peak_tasks = max(self.peak_tasks, int(event["tasks"]))
                self.peak_watchers = max(self.peak_watchers, int(event["watchers"]))
                async with self._stats_changed:
                    self.stats_seen += 1
                    self._stats_changed.notify_all()
            elif kind in ("paused", "resumed"):
                self._acks.put_nowait(event)
            else:
                self.events.append(event)

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None  # noqa: S101
        for _ in range(MAX_SERVER_LINES):
            line = await self.process.stderr.readline()
            if not line:
                return
            self.stderr_tail.append(line.decode(errors="replace").rstrip())

    async def command(self, text: str) -> None:
        if self.process.returncode is not None or self.process.stdin is None:
            raise StepError(f"the server has exited ({self.process.returncode})")
        self.process.stdin.write(f"{text}\n".encode())
        await self.process.stdin.drain()

    async def fresh_stats(self) -> dict[str, Any]:
        """Ask for the server's task and watcher counts and wait for the answer."""
        async with self._stats_changed:
            seen = self.stats_seen
        await self.command("stats")
        try:
            async with asyncio.timeout(STEP_TIMEOUT), self._stats_changed:
                await self._stats_changed.wait_for(lambda: self.stats_seen > seen)
        except TimeoutError:
            raise StepError("the server did not answer 'stats'") from None
        return self.latest

    async def _ack(self, command: str) -> dict[str, Any]:
        await self.command(command)
        try:
            return await asyncio.wait_for(self._acks.get(), STEP_TIMEOUT)
        except TimeoutError:
            raise StepError(f"the server did not answer {command!r}") from None

    async def pause(self) -> tuple[int, ServingStatus]:
        ack = await self._ack("pause")
        if ack.get("event") != "paused":
            raise StepError(f"unexpected answer to 'pause': {ack}")
        return int(ack["flips"]), ServingStatus[str(ack["status"])]

    async def resume(self) -> None:
        ack = await self._ack("resume")
        if ack.get("event") != "resumed":
            raise StepError(f"unexpected answer to 'resume': {ack}")

    def event_time(self, kind: str) -> float | None:
        """The server's monotonic time (the same clock as ours) of its first *kind* event."""
        for event in self.events:
            if event.get("event") == kind and "t" in event:
                return float(event["t"])
        return None

    def last_event(self, kind: str) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for event in reversed(self.events):
            if event.get("event") == kind:
                found = event
                break
        return found

    def rss_kib(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return None

    def cpu_seconds(self) -> float | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return None

    async def close(self) -> int | None:
        """Make sure the process is gone; return its exit code."""
        if self.process.returncode is None:
            if self.process.stdin is not None:
                self.process.stdin.close()
            self.process.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), STEP_TIMEOUT)
        for reader in self._readers:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(reader, 5)
        return self.process.returncode
