"""Soak and drain-under-load test of petsage_grpc embedded in a grpc.aio server.

Usage (from the repository root)::

    .venv/bin/python scripts/soak.py                          # 10 minutes, 1000 watchers
    .venv/bin/python scripts/soak.py --minutes 3 --json soak.json
    .venv/bin/python scripts/soak.py --seconds 30 --watchers 300

It starts ``scripts/soak_server.py`` (a grpc.aio server with ``SERVER_OPTIONS`` and
``add_to_server`` on 127.0.0.1, whose ``soak.flipper`` name flips between SERVING and
NOT_SERVING every 50 ms) as a child process and, from this one asyncio process over
several channels (one connection each), loopback only:

1. **Soak** for the given time: Check at ``--check-rate`` (500/s) over every kind of name
   (known, flipping, unknown), List and SmokeTest at a low rate; ``--watchers`` Watch
   slots, each connecting, staying a random 1-5 s and leaving, again and again (names:
   ``readiness``, ``""``, ``liveness``, ``startup``, ``soak.flipper``, an unknown name);
   ``--steady-watchers`` Watch streams on ``soak.flipper`` for the whole run; one
   channel closed abruptly (cancelling its calls) and replaced every
   ``--recycle-seconds``. Every second it samples the server's RSS (VmRSS in
   ``/proc/PID/status``) and the task and watcher counts the server prints. Every
   ``--checkpoint-seconds`` the flipper is paused, every flipper watcher must converge
   on the board's status, and the flipper resumes.
2. **Back to baseline**: once the load has stopped and every channel is closed, the
   server's ``asyncio.all_tasks()`` count and ``board.watcher_count`` must return to
   what they were before the load.
3. **Drain under load**: ``--watchers`` new Watch streams (nine in ten on ``readiness``,
   the rest on ``liveness``) and unary load again; one second into it, SIGTERM. Every
   readiness watcher must receive NOT_SERVING within 100 ms of ``os.kill`` (measured
   here), liveness watchers nothing; every stream must end with OK; every unary call
   started before the signal or during the drain must complete (Check answers, the
   smoke test may answer its own UNAVAILABLE once not serving), calls started after
   the server stopped may fail only with UNAVAILABLE; the server must exit 0. (A call
   that reaches the server just after its shutdown began is CANCELLED by grpc core,
   grpc/grpc#41785, with or without petsage_grpc: such calls are counted and reported
   as ``after_shutdown_cancelled``, and fail the run only with
   ``--strict-shutdown-codes``.)

**Lost transitions.** The Watch protocol allows latest-wins coalescing: a watcher that
falls behind may skip a NOT_SERVING/SERVING pair, so fewer transitions than flips is
not a loss (it is counted as ``coalesced``). A transition counts as **lost** when

- a Watch stream repeats a status (two messages in a row with the same status: an odd
  number of flips between them was not delivered), or
- at a checkpoint or at the end (flipper paused), a connected flipper watcher has not
  received the board's status within 5 s, or
- over the exact window between two checkpoints, a steady watcher's transitions and the
  flips made differ in parity.

A watcher that receives more transitions than flips can have happened while it was
connected (flips are at least 50 ms apart) counts as an error (``phantom``).

Exit status: 0 when everything held; 1 on any error, lost transition, task or watcher
count not back to baseline, or failed drain (each listed); 2 on bad arguments. Every
loop is bounded in count and in time. Rates are modest on purpose: the verdict is about
correctness, not speed; throughput is reported, not judged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2
from soak_server import GcPauses  # scripts/ is on sys.path: this script's own folder

from petsage_grpc import LIVENESS, OVERALL, READINESS, SMOKE_TEST_SERVICE, STARTUP, ServingStatus
from petsage_grpc._generated.petsage.v1 import smoke_test_service_pb2
from petsage_grpc.services._smoke_test import NOT_SERVING_DETAILS

ROOT: Final = Path(__file__).resolve().parent.parent
SERVER_SCRIPT: Final = ROOT / "scripts" / "soak_server.py"

CHECK: Final = "/grpc.health.v1.Health/Check"
WATCH: Final = "/grpc.health.v1.Health/Watch"
LIST: Final = "/grpc.health.v1.Health/List"
SMOKE_TEST: Final = "/petsage.v1.SmokeTestService/SmokeTest"

FLIPPER: Final = "soak.flipper"
UNKNOWN: Final = "soak.unknown"
KNOWN_NAMES: Final = frozenset({OVERALL, READINESS, LIVENESS, STARTUP, SMOKE_TEST_SERVICE, FLIPPER})
CHECK_NAMES: Final = (READINESS, LIVENESS, STARTUP, OVERALL, SMOKE_TEST_SERVICE, FLIPPER, UNKNOWN)
STEADY_NAMES: Final = frozenset({OVERALL, READINESS, LIVENESS, STARTUP})

SERVING: Final = ServingStatus.SERVING
NOT_SERVING: Final = ServingStatus.NOT_SERVING
SERVICE_UNKNOWN: Final = ServingStatus.SERVICE_UNKNOWN

CHANNEL_OPTIONS: Final = (("grpc.use_local_subchannel_pool", 1),)  # a connection per channel
CALL_TIMEOUT: Final = 10.0
"""Deadline of every unary call; a health call takes milliseconds."""
STEP_TIMEOUT: Final = 30.0
"""Bound on any single wait for the server (start, a command, first messages)."""
CONVERGE_TIMEOUT: Final = 5.0
"""How long a watcher may take to receive the paused flipper's status."""
BASELINE_TIMEOUT: Final = 30.0
DRAIN_NOTICE_LIMIT: Final = 0.100
"""The product's rule: readiness watchers see NOT_SERVING within 100 ms of SIGTERM."""
DRAIN_QUIET_MARGIN: Final = 0.5
"""No unary call starts in the last 0.5 s of the drain: a call still in transit when the
server stops is refused, which would be a race of this client's, not a finding."""
DRAIN_LEAD: Final = 1.0
"""Seconds of the last burst before the signal."""
AFTER_EXIT: Final = 0.3
"""Seconds of load after the server has exited (calls that must fail UNAVAILABLE)."""
TICK: Final = 0.02
MAX_ERROR_SAMPLES: Final = 40
MAX_SERVER_LINES: Final = 10_000_000

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1


def _request(service: str) -> bytes:
    data: bytes = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    return data


REQUESTS: Final = {name: _request(name) for name in (*CHECK_NAMES,)}
STATUS_OF: Final[dict[bytes, ServingStatus]] = {
    health_pb2.HealthCheckResponse(status=status.name).SerializeToString(): status
    for status in ServingStatus
}
LIST_REQUEST: Final = b""
SMOKE_REQUEST: Final = b""


# -- configuration -----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Config:
    seconds: float
    watchers: int
    check_rate: float
    list_rate: float
    smoke_rate: float
    channels: int
    flipper_share: float
    steady_watchers: int
    checkpoint_seconds: float
    recycle_seconds: float
    flip_seconds: float
    drain_seconds: float
    grace_seconds: float
    max_in_flight: int
    seed: int
    strict_shutdown_codes: bool
    flip_thread: bool
    server_script: Path


def parse_args(argv: Sequence[str] | None) -> tuple[Config, Path | None]:
    parser = argparse.ArgumentParser(
        prog="scripts/soak.py",
        description="Soak and drain-under-load test of petsage_grpc (loopback only).",
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="soak duration (10)")
    parser.add_argument(
        "--seconds", type=float, help="soak duration in seconds; wins over --minutes"
    )
    parser.add_argument("--watchers", type=int, default=1000, help="Watch slots (1000)")
    parser.add_argument("--check-rate", type=float, default=500.0, help="Check calls/s (500)")
    parser.add_argument("--list-rate", type=float, default=5.0, help="List calls/s (5)")
    parser.add_argument("--smoke-rate", type=float, default=5.0, help="SmokeTest calls/s (5)")
    parser.add_argument("--channels", type=int, default=8, help="client channels (8)")
    parser.add_argument(
        "--flipper-share", type=float, default=0.05, help="share of slots on soak.flipper (0.05)"
    )
    parser.add_argument(
        "--steady-watchers", type=int, default=8, help="whole-run soak.flipper watchers (8)"
    )
    parser.add_argument("--checkpoint-seconds", type=float, default=10.0, help="(10)")
    parser.add_argument("--recycle-seconds", type=float, default=10.0, help="(10)")
    parser.add_argument("--flip-ms", type=float, default=50.0, help="flipper period (50)")
    parser.add_argument(
        "--flip-thread",
        action="store_true",
        help="the server flips from another thread (the board's cross-thread wake path)",
    )
    parser.add_argument("--drain-seconds", type=float, default=2.0, help="server drain (2)")
    parser.add_argument("--grace-seconds", type=float, default=2.0, help="server grace (2)")
    parser.add_argument("--max-in-flight", type=int, default=256, help="unary calls (256)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (1)")
    parser.add_argument(
        "--strict-shutdown-codes",
        action="store_true",
        help="a call started after the server stopped must fail with UNAVAILABLE, "
        "not CANCELLED (grpc/grpc#41785 makes that fail today)",
    )
    parser.add_argument(
        "--server-script",
        type=Path,
        default=SERVER_SCRIPT,
        help="the server to soak (default scripts/soak_server.py); another one only to "
        "check that the soak catches a deliberately broken server",
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the report here")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    problems = []
    if not 1 <= seconds <= 24 * 3600:
        problems.append("the duration must be between 1 s and 24 h")
    if not 1 <= args.watchers <= 20_000:
        problems.append("--watchers must be between 1 and 20000")
    if not 1 <= args.channels <= 64 or args.watchers > args.channels * 900:
        problems.append("--channels must be 1-64, with at most 900 watchers per channel")
    if not 0 <= args.flipper_share <= 1:
        problems.append("--flipper-share must be between 0 and 1")
    if min(args.check_rate, args.list_rate, args.smoke_rate) < 0:
        problems.append("rates must not be negative")
    if args.flip_ms < 10 or args.drain_seconds < 1 or args.grace_seconds < 0:
        problems.append("--flip-ms must be >= 10, --drain-seconds >= 1, --grace-seconds >= 0")
    if args.checkpoint_seconds < 1 or args.recycle_seconds < 1 or args.steady_watchers < 0:
        problems.append("--checkpoint-seconds and --recycle-seconds must be >= 1")
    if args.max_in_flight < 1:
        problems.append("--max-in-flight must be >= 1")
    if problems:
        parser.error("; ".join(problems))
    config = Config(
        seconds=seconds,
        watchers=args.watchers,
        check_rate=args.check_rate,
        list_rate=args.list_rate,
        smoke_rate=args.smoke_rate,
        channels=args.channels,
        flipper_share=args.flipper_share,
        steady_watchers=args.steady_watchers,
        checkpoint_seconds=args.checkpoint_seconds,
        recycle_seconds=args.recycle_seconds,
        flip_seconds=args.flip_ms / 1000,
        drain_seconds=args.drain_seconds,
        grace_seconds=args.grace_seconds,
        max_in_flight=args.max_in_flight,
        seed=args.seed,
        strict_shutdown_codes=args.strict_shutdown_codes,
        flip_thread=args.flip_thread,
        server_script=args.server_script,
    )
    return config, args.json


# -- bookkeeping -------------------------------------------------------------------


class StepError(Exception):
    """A step could not complete (the server died, a bounded wait ran out)."""


class Tally:
    """Calls by method and outcome, errors (counted, with samples), lost transitions."""

    def __init__(self) -> None:
        self.calls: dict[str, Counter[str]] = {}
        self.errors = 0
        self.error_kinds: Counter[str] = Counter()
        self.error_samples: list[str] = []
        self.lost: Counter[str] = Counter()
        self.started = time.monotonic()

    def count(self, method: str, outcome: str) -> None:
        self.calls.setdefault(method, Counter())[outcome] += 1

    def error(self, kind: str, text: str) -> None:
        self.errors += 1
        self.error_kinds[kind] += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            at = time.monotonic() - self.started
            self.error_samples.append(f"{at:8.3f}s {kind}: {text}")

    def lose(self, kind: str, text: str) -> None:
        self.lost[kind] += 1
        self.error(f"lost transition ({kind})", text)


CLIENT_GC: Final = GcPauses()


def overlapping(pauses: Sequence[Sequence[float]], start: float, end: float) -> list[float]:
    """The pauses (end time, ms) that overlap the window [start, end]."""
    return [ms for stop, ms in pauses if stop >= start and stop - ms / 1000 <= end]


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {
        "count": len(ordered),
        "min": ordered[0],
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": ordered[-1],
    }


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 3:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return sxy / sxx * 60


# -- the server process --------------------------------------------------------------


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


# -- channels ----------------------------------------------------------------------


class Conn:
    """One channel (its own connection) and the raw-bytes callables on it."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.check: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(CHECK)
        self.list: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(LIST)
        self.smoke: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(
            SMOKE_TEST
        )
        self.watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = self.channel.unary_stream(
            WATCH
        )
        self.closing = False

    def callable_for(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        return {CHECK: self.check, LIST: self.list, SMOKE_TEST: self.smoke}[method]

    async def close(self) -> None:
        self.closing = True
        await self.channel.close()


class Pool:
    """Channels used round robin; one at a time can be replaced (closed abruptly)."""

    def __init__(self, target: str, size: int) -> None:
        self.target = target
        self.conns = [Conn(target) for _ in range(size)]
        self._next = 0
        self._recycle_next = 0
        self.recycled = 0

    def pick(self) -> Conn:
        self._next = (self._next + 1) % len(self.conns)
        return self.conns[self._next]

    async def recycle(self) -> None:
        index = self._recycle_next % len(self.conns)
        self._recycle_next += 1
        old, self.conns[index] = self.conns[index], Conn(self.target)
        await old.close()
        self.recycled += 1

    async def close(self) -> None:
        await asyncio.gather(*(conn.close() for conn in self.conns))


def _cancelled_by_recycle(conn: Conn) -> bool:
    task = asyncio.current_task()
    return conn.closing and task is not None and not task.cancelling()


@dataclass(frozen=True, slots=True)
class Outcome:
    code: str
    """``OK``, a status code name, or ``RECYCLED`` (the client closed the channel)."""
    body: bytes
    details: str


async def call_unary(conn: Conn, method: str, request: bytes) -> Outcome:
    if conn.closing:  # picked just before the channel was recycled
        return Outcome("RECYCLED", b"", "")
    call = conn.callable_for(method)(request, timeout=CALL_TIMEOUT)
    try:
        body = await call
    except grpc.aio.AioRpcError as error:
        return Outcome(error.code().name, b"", error.details() or "")
    except asyncio.CancelledError:
        if _cancelled_by_recycle(conn):
            return Outcome("RECYCLED", b"", "")
        raise
    return Outcome("OK", body, "")


Judge = Callable[[str, str, float, Outcome], None]


class UnaryLoad:
    """Check (over *names*), List and SmokeTest at steady rates, with bounded calls in flight."""

    def __init__(
        self,
        pool: Pool,
        rates: dict[str, float],
        names: Sequence[str],
        judge: Judge,
        max_in_flight: int,
    ) -> None:
        self.pool = pool
        self.rates = {method: rate for method, rate in rates.items() if rate > 0}
        self.names = names
        self.judge = judge
        self.max_in_flight = max_in_flight
        self.launched: Counter[str] = Counter()
        self.skipped = 0
        self.held = 0
        self.seconds = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._name_index = 0

    async def run(
        self,
        until: float,
        *,
        stop: asyncio.Event | None = None,
        may_launch: Callable[[float], bool] | None = None,
    ) -> None:
        """Launch calls until *until* (monotonic) or *stop*; *may_launch* false holds them."""
        start = time.monotonic()
        issued: Counter[str] = Counter()
        for tick in range(math.ceil(max(0.0, until - start) / TICK) + 1):
            delay = start + tick * TICK - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            if now >= until or (stop is not None and stop.is_set()):
                break
            for method, rate in self.rates.items():
                due = int(rate * (now - start)) - issued[method]
                if due <= 0:
                    continue
                issued[method] += due
                if may_launch is not None and not may_launch(now):
                    self.held += due
                    continue
                for _ in range(due):
                    if len(self._tasks) >= self.max_in_flight:
                        self.skipped += 1
                    else:
                        self._launch(method)
        self.seconds += time.monotonic() - start

    def _launch(self, method: str) -> None:
        name = ""
        if method == CHECK:
            name = self.names[self._name_index % len(self.names)]
            self._name_index += 1
        self.launched[method] += 1
        task = asyncio.create_task(self._one(method, name, self.pool.pick()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one(self, method: str, name: str, conn: Conn) -> None:
        request = REQUESTS[name] if method == CHECK else b""
        started = time.monotonic()  # when the call is really made, not when it was due
        self.judge(method, name, started, await call_unary(conn, method, request))

    async def finish(self, tally: Tally) -> None:
        """Wait for the calls in flight (each has a deadline); cancel any that outlive it."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=CALL_TIMEOUT + 5)
        for task in pending:
            task.cancel()
            tally.error("unary call outlived its deadline", repr(task))
        if pending:
            await asyncio.wait(pending, timeout=5)


def check_answer(body: bytes) -> ServingStatus | None:
    return STATUS_OF.get(body)  # UNKNOWN (0) is the empty message


# -- soak: watchers ----------------------------------------------------------------


@dataclass(eq=False, slots=True)
class FlipWatch:
    """What one watcher of ``soak.flipper`` has received."""

    opened_at: float
    last: ServingStatus | None = None
    messages: int = 0
    last_at: float = 0.0
    open: bool = True
    # steady watchers: messages and flips at the last checkpoint
    mark_messages: int = 1
    mark_flips: int = 0


class WatchLoad:
    """Watch slots that connect, stay a random 1-5 s and leave, until the load ends."""

    def __init__(self, pool: Pool, config: Config, tally: Tally) -> None:
        self.pool = pool
        self.config = config
        self.tally = tally
        self.rng = random.Random(config.seed)  # noqa: S311 - load shape, not secrets
        self.flip_watches: set[FlipWatch] = set()
        self.opened: Counter[str] = Counter()
        self.left: Counter[str] = Counter()
        self.messages = 0
        self.flip_transitions = 0
        rest = 1 - config.flipper_share
        self.names = [READINESS, OVERALL, LIVENESS, STARTUP, UNKNOWN, FLIPPER]
        self.weights = [0.5 * rest, 0.15 * rest, 0.15 * rest, 0.1 * rest, 0.1 * rest]
        self.weights.append(config.flipper_share)

    async def slot(self, index: int, load_end: float) -> None:
        await asyncio.sleep(index / max(1, self.config.watchers))  # spread the first wave over 1 s
        for _ in range(math.ceil(self.config.seconds) + 2):  # each round stays >= 1 s
            now = time.monotonic()
            if now >= load_end - 0.05:
                return
            name = self.rng.choices(self.names, self.weights)[0]
            stay = min(self.rng.uniform(1.0, 5.0), load_end - now)
            await self.watch_once(self.pool.pick(), name, stay)

    async def watch_once(
        self, conn: Conn, name: str, stay: float, record: FlipWatch | None = None
    ) -> None:
        opened_at = time.monotonic()
        if name == FLIPPER and record is None:
            record = FlipWatch(opened_at)
            self.flip_watches.add(record)
        self.opened[name] += 1
        call = conn.watch(REQUESTS[name])
        reason = "stayed"
        previous: ServingStatus | None = None
        count = 0
        try:
            async with asyncio.timeout(stay):
                for _ in range(math.ceil(stay / self.config.flip_seconds) + 10):
                    raw = await call.read()
                    if not isinstance(raw, bytes):  # EOF: the server ended the stream
                        reason = f"ended by server: {(await call.code()).name}"
                        self.tally.error("Watch ended during the soak", f"{name!r}: {reason}")
                        break
                    now = time.monotonic()
                    count += 1
                    self.messages += 1
                    status = STATUS_OF.get(raw)
                    self._judge(
                        name, status, previous=previous, count=count, record=record, now=now
                    )
                    previous = status
                else:
                    self.tally.error("Watch sent too many messages", repr(name))
        except TimeoutError:
            pass
        except grpc.aio.AioRpcError as error:
            reason = error.code().name
            self.tally.error("Watch failed", f"{name!r}: {reason}: {error.details()}")
        except asyncio.CancelledError:
            if not _cancelled_by_recycle(conn):
                raise
            reason = "channel closed (recycled)"
        finally:
            call.cancel()
            self.left[reason] += 1
            if record is not None:
                record.open = False
                self.flip_watches.discard(record)
                self._bound_transitions(record)

    def _judge(
        self,
        name: str,
        status: ServingStatus | None,
        *,
        previous: ServingStatus | None,
        count: int,
        record: FlipWatch | None,
        now: float,
    ) -> None:
        if status is None:
            self.tally.error("Watch sent an unparsable message", repr(name))
        elif name == FLIPPER:
            assert record is not None  # noqa: S101 - every flipper watch has one
            if status not in (SERVING, NOT_SERVING):
                self.tally.error("flipper watch got a wrong status", status.name)
            if status is previous:
                self.tally.lose("repeated status", f"{status.name} twice in a row")
            elif previous is not None:
                self.flip_transitions += 1
            record.last, record.messages, record.last_at = status, count, now
        elif count > 1:
            self.tally.error("Watch of a steady name changed", f"{name!r}: {status.name}")
        elif name == UNKNOWN and status is not SERVICE_UNKNOWN:
            self.tally.error("Watch of an unknown name", f"got {status.name}")
        elif name in STEADY_NAMES and status is not SERVING:
            self.tally.error("Watch of a serving name", f"{name!r}: got {status.name}")

    def _bound_transitions(self, record: FlipWatch) -> None:
        if record.messages < 2:
            return
        window = record.last_at - record.opened_at
        possible = math.floor(window / self.config.flip_seconds + 1e-6) + 1
        if record.messages - 1 > possible:
            self.tally.error(
                "phantom transitions",
                f"{record.messages - 1} transitions in {window:.3f}s (at most {possible} flips)",
            )


class Checkpoints:
    """Pause the flipper; every flipper watcher must receive the board's status."""

    def __init__(self, server: SoakServer, watches: WatchLoad, steady: list[FlipWatch]) -> None:
        self.server = server
        self.watches = watches
        self.steady = steady
        self.done = 0
        self.checked = 0
        self.converge_seconds: list[float] = []
        self.coalesced_pairs = 0
        self.steady_flips = 0
        self.steady_transitions = 0

    async def run(self, *, resume: bool) -> None:
        flips, target = await self.server.pause()
        paused_at = time.monotonic()
        self.checked += len(self.watches.flip_watches)
        tally = self.watches.tally
        behind: list[FlipWatch] = []
        for _ in range(math.ceil(CONVERGE_TIMEOUT / 0.01) + 1):
            behind = [
                w
                for w in (*self.watches.flip_watches, *self.steady)
                if w.open and w.opened_at < paused_at and w.last is not target
            ]
            if not behind or time.monotonic() - paused_at > CONVERGE_TIMEOUT:
                break
            await asyncio.sleep(0.01)
        self.converge_seconds.append(time.monotonic() - paused_at)
        for watcher in behind:
            tally.lose(
                "checkpoint",
                f"flipper {target.name} after {flips} flips; a watcher still has "
                f"{watcher.last.name if watcher.last else None} after {CONVERGE_TIMEOUT}s",
            )
        for watcher in self.steady:
            if watcher in behind or not watcher.open:
                continue
            made = flips - watcher.mark_flips
            seen = watcher.messages - watcher.mark_messages
            if seen > made:
                tally.error("phantom transitions", f"steady watcher: {seen} seen, {made} flips")
            elif (made - seen) % 2:
                tally.lose("parity", f"steady watcher: {seen} seen of {made} flips")
            else:
                self.coalesced_pairs += (made - seen) // 2
            self.steady_flips += made
            self.steady_transitions += seen
            watcher.mark_flips, watcher.mark_messages = flips, watcher.messages
        self.done += 1
        if resume:
            await self.server.resume()

    async def every(self, seconds: float, load_end: float) -> None:
        for _ in range(math.ceil((load_end - time.monotonic()) / seconds) + 1):
            await asyncio.sleep(min(seconds, max(0.0, load_end - time.monotonic())))
            if time.monotonic() + 1 >= load_end:
                return
            await self.run(resume=True)


# -- soak: the whole run -----------------------------------------------------------


def judge_soak(tally: Tally) -> Judge:
    def judge(method: str, name: str, started: float, outcome: Outcome) -> None:
        label = {CHECK: "Check", LIST: "List", SMOKE_TEST: "SmokeTest"}[method]
        tally.count(label, outcome.code)
        if outcome.code == "RECYCLED":
            return
        if method == CHECK:
            if name == UNKNOWN:
                if outcome.code != "NOT_FOUND":
                    tally.error("Check of an unknown name", f"{outcome.code} {outcome.details}")
                return
            if outcome.code != "OK":
                tally.error("Check failed", f"{name!r}: {outcome.code} {outcome.details}")
                return
            status = check_answer(outcome.body)
            wanted = (SERVING, NOT_SERVING) if name == FLIPPER else (SERVING,)
            if status not in wanted:
                tally.error("Check answered wrongly", f"{name!r}: {status}")
        elif outcome.code != "OK":
            tally.error(f"{label} failed", f"{outcome.code} {outcome.details}")
        elif method == LIST:
            listed = health_pb2.HealthListResponse.FromString(outcome.body)
            names = set(listed.statuses)
            if names != KNOWN_NAMES:
                tally.error("List answered wrongly", f"names {sorted(names)}")
        else:
            answer = smoke_test_service_pb2.SmokeTestResponse.FromString(outcome.body)
            if answer.status != "ok":
                tally.error("SmokeTest answered wrongly", repr(answer.status))

    return judge


@dataclass
class Sample:
    seconds: float
    rss_kib: int | None
    tasks: int | None
    watchers: int | None


async def sample_every_second(
    server: SoakServer, samples: list[Sample], stop: asyncio.Event, limit: int
) -> None:
    start = time.monotonic()
    for _ in range(limit):
        latest = server.latest
        samples.append(
            Sample(
                seconds=round(time.monotonic() - start, 3),
                rss_kib=server.rss_kib(),
                tasks=latest.get("tasks"),
                watchers=latest.get("watchers"),
            )
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
            return


async def settled_stats(server: SoakServer, *, tasks_at_most: int | None) -> dict[str, Any]:
    """Stats once watchers are 0 and tasks stable (and <= *tasks_at_most*), or the last seen."""
    stats: dict[str, Any] = {}
    previous_tasks = None
    deadline = time.monotonic() + BASELINE_TIMEOUT
    for _ in range(math.ceil(BASELINE_TIMEOUT / 0.2) + 1):
        stats = dict(await server.fresh_stats())
        tasks = int(stats["tasks"])
        quiet = int(stats["watchers"]) == 0 and tasks == previous_tasks
        if quiet and (tasks_at_most is None or tasks <= tasks_at_most):
            stats["settled"] = True
            return stats
        if time.monotonic() > deadline:
            break
        previous_tasks = tasks
        await asyncio.sleep(0.2)
    stats["settled"] = False
    return stats


async def warm_up(server: SoakServer) -> None:
    """One call of each kind, so that lazily started server tasks exist before the baseline."""
    conn = Conn(server.target)
    try:
        for method, request in ((CHECK, REQUESTS[READINESS]), (LIST, b""), (SMOKE_TEST, b"")):
            outcome = await call_unary(conn, method, request)
            if outcome.code != "OK":
                raise StepError(f"warm-up {method} failed: {outcome.code} {outcome.details}")
        call = conn.watch(REQUESTS[READINESS])
        first = await asyncio.wait_for(call.read(), STEP_TIMEOUT)
        call.cancel()
        if not isinstance(first, bytes) or STATUS_OF.get(first) is not SERVING:
            raise StepError(f"warm-up Watch answered {first!r}")
    finally:
        await conn.close()


async def open_steady(
    server: SoakServer, watches: WatchLoad, count: int, seconds: float
) -> tuple[Conn, list[FlipWatch], list[asyncio.Task[None]]]:
    """Steady flipper watchers on their own channel, opened while the flipper is paused."""
    conn = Conn(server.target)
    flips, status = await server.pause()
    steady = [FlipWatch(time.monotonic(), mark_flips=flips) for _ in range(count)]
    tasks = [
        asyncio.create_task(watches.watch_once(conn, FLIPPER, seconds, record)) for record in steady
    ]
    for _ in range(math.ceil(STEP_TIMEOUT / 0.01)):
        if all(record.last is status for record in steady):
            break
        await asyncio.sleep(0.01)
    else:
        raise StepError("steady watchers did not receive the flipper's first status")
    return conn, steady, tasks


async def soak(server: SoakServer, config: Config, tally: Tally) -> dict[str, Any]:
    await warm_up(server)
    baseline = await settled_stats(server, tasks_at_most=None)
    samples: list[Sample] = []
    sampling = asyncio.Event()
    sampler = asyncio.create_task(
        sample_every_second(server, samples, sampling, math.ceil(config.seconds) + 600)
    )
    pool = Pool(server.target, config.channels)
    watches = WatchLoad(pool, config, tally)
    steady_conn, steady, steady_tasks = await open_steady(
        server, watches, config.steady_watchers, config.seconds + 60
    )
    checkpoints = Checkpoints(server, watches, steady)
    unary = UnaryLoad(
        pool,
        {CHECK: config.check_rate, LIST: config.list_rate, SMOKE_TEST: config.smoke_rate},
        CHECK_NAMES,
        judge_soak(tally),
        config.max_in_flight,
    )
    server_cpu_start = server.cpu_seconds()
    client_cpu_start = time.process_time()
    started = time.monotonic()
    load_end = started + config.seconds
    await server.resume()

    async def recycle() -> None:
        for _ in range(math.ceil(config.seconds / config.recycle_seconds) + 1):
            await asyncio.sleep(min(config.recycle_seconds, max(0.0, load_end - time.monotonic())))
            if time.monotonic() + 1 >= load_end:
                return
            await pool.recycle()

    slots = [asyncio.create_task(watches.slot(index, load_end)) for index in range(config.watchers)]
    helpers = [
        asyncio.create_task(recycle()),
        asyncio.create_task(checkpoints.every(config.checkpoint_seconds, load_end)),
    ]
    try:
        await unary.run(load_end)
        _, pending = await asyncio.wait(slots + helpers, timeout=STEP_TIMEOUT)
        if pending:
            raise StepError(f"{len(pending)} watch slots or helpers did not finish")
        for task in helpers:
            task.result()  # a checkpoint that failed (StepError) fails the run
        load_seconds = time.monotonic() - started
        await unary.finish(tally)
        await checkpoints.run(resume=False)  # the flipper stays paused from here on
        for task in steady_tasks:
            task.cancel()
        await asyncio.gather(*steady_tasks, return_exceptions=True)
    finally:
        for task in (*slots, *helpers, *steady_tasks):
            task.cancel()
        await pool.close()
        await steady_conn.close()
    server_cpu = server.cpu_seconds()
    client_cpu = time.process_time() - client_cpu_start
    end = await settled_stats(server, tasks_at_most=int(baseline["tasks"]))
    sampling.set()
    await sampler
    restored = bool(end["settled"]) and int(end["watchers"]) == int(baseline["watchers"])
    restored = restored and int(end["tasks"]) <= int(baseline["tasks"])
    rss = [(s.seconds, float(s.rss_kib)) for s in samples if s.rss_kib is not None]
    half = [point for point in rss if point[0] >= rss[-1][0] / 2] if rss else []
    return {
        "load_seconds": round(load_seconds, 3),
        "calls": {method: dict(counter) for method, counter in sorted(tally.calls.items())},
        "unary_launched": dict(unary.launched),
        "check_rate_achieved": round(unary.launched[CHECK] / max(unary.seconds, 1e-9), 1),
        "unary_skipped_client_busy": unary.skipped,
        "watches": {
            "opened": sum(watches.opened.values()),
            "opened_by_name": dict(watches.opened),
            "left": dict(watches.left),
            "messages": watches.messages,
            "channels_recycled": pool.recycled,
        },
        "flipper": {
            "flips": int(server.latest.get("flips", 0)),
            "checkpoints": checkpoints.done,
            "checkpoint_converge_seconds_max": round(max(checkpoints.converge_seconds), 4),
            "wave_watchers_checked_at_checkpoints": checkpoints.checked,
            "wave_transitions_received": watches.flip_transitions,
            "steady_watchers": len(steady),
            "steady_flips_observed": checkpoints.steady_flips,
            "steady_transitions_received": checkpoints.steady_transitions,
            "steady_coalesced_pairs": checkpoints.coalesced_pairs,
            "lost_transitions": sum(tally.lost.values()),
            "lost_by_kind": dict(tally.lost),
        },
        "rss_kib": {
            "start": rss[0][1] if rss else None,
            "peak": max(y for _, y in rss) if rss else None,
            "end": rss[-1][1] if rss else None,
            "slope_kib_per_min": _round(slope_per_minute(rss), 1),
            "slope_second_half_kib_per_min": _round(slope_per_minute(half), 1),
            "samples": [[s.seconds, s.rss_kib] for s in samples],
        },
        "tasks": {"baseline": baseline["tasks"], "peak": server.peak_tasks, "end": end["tasks"]},
        "server_gc_tracked_objects": {
            "baseline": baseline.get("gc_tracked_objects"),
            "end": end.get("gc_tracked_objects"),
        },
        "watchers": {
            "baseline": baseline["watchers"],
            "peak": server.peak_watchers,
            "end": end["watchers"],
        },
        "task_watcher_samples": [[s.seconds, s.tasks, s.watchers] for s in samples],
        "baseline_restored": restored,
        "gc2": {
            "server_count": server.latest.get("gc2"),
            "server_max_ms": server.latest.get("gc2_max_ms"),
            "client_count": CLIENT_GC.count,
            "client_max_ms": round(CLIENT_GC.max_ms, 3),
            "server_max_cpu_ms": server.latest.get("gc2_max_cpu_ms"),
            "client_max_cpu_ms": round(CLIENT_GC.max_cpu_ms, 3),
        },
        "cpu_seconds": {
            "server": _round(
                None
                if server_cpu is None or server_cpu_start is None
                else server_cpu - server_cpu_start,
                1,
            ),
            "client": round(client_cpu, 1),
        },
    }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _ms_after(at: float | None, start: float) -> float | None:
    return None if at is None else round((at - start) * 1000, 3)


# -- drain under load --------------------------------------------------------------


@dataclass(eq=False, slots=True)
class DrainWatch:
    name: str
    statuses: list[tuple[float, ServingStatus | None]] = field(default_factory=list)
    end_code: str | None = None
    ended_at: float | None = None


class DrainClock:
    """When the signal was sent, and what the client has seen since."""

    def __init__(self, readiness_watchers: int) -> None:
        self.signal_at: float | None = None
        self.quiet_from = math.inf
        self.readiness_left = readiness_watchers
        self.all_not_serving_at = math.inf
        self.first_end_at = math.inf
        self.first_messages = 0
        self.cancelled_after_shutdown = 0

    def may_launch(self, now: float) -> bool:
        return not self.quiet_from <= now < self.first_end_at

    def phase(self, started: float) -> str:
        if self.signal_at is None or started < self.signal_at:
            return "before_signal"
        if started < self.first_end_at:
            return "during_drain"
        return "after_shutdown"


async def follow_drain(
    conn: Conn, watch: DrainWatch, clock: DrainClock, opened: asyncio.Event, total: int
) -> None:
    call = conn.watch(REQUESTS[watch.name])
    try:
        for _ in range(16):
            raw = await call.read()
            now = time.monotonic()
            if not isinstance(raw, bytes):
                watch.end_code = (await call.code()).name
                watch.ended_at = now
                clock.first_end_at = min(clock.first_end_at, now)
                return
            status = STATUS_OF.get(raw)
            watch.statuses.append((now, status))
            if len(watch.statuses) == 1:
                clock.first_messages += 1
                if clock.first_messages == total:
                    opened.set()
            elif watch.name == READINESS and status is NOT_SERVING:
                clock.readiness_left -= 1
                if clock.readiness_left == 0:
                    clock.all_not_serving_at = now
    except grpc.aio.AioRpcError as error:
        watch.end_code = error.code().name
        watch.ended_at = time.monotonic()
    finally:
        call.cancel()


def judge_drain(
    tally: Tally, clock: DrainClock, counts: dict[str, Counter[str]], *, strict: bool
) -> Judge:
    def judge(method: str, name: str, started: float, outcome: Outcome) -> None:
        label = {CHECK: "Check", LIST: "List", SMOKE_TEST: "SmokeTest"}[method]
        phase = clock.phase(started)
        counts.setdefault(phase, Counter())[f"{label} {outcome.code}"] += 1
        where = f"{phase}: {label} {name!r} started {started - (clock.signal_at or started):+.3f}s"
        if phase == "after_shutdown" and outcome.code == "UNAVAILABLE":
            return
        if phase == "after_shutdown" and outcome.code == "CANCELLED" and not strict:
            # grpc core cancels calls that reach a server after its shutdown began but
            # before the client saw GOAWAY (grpc/grpc#41785; a plain grpc.aio server
            # does the same). Counted and reported; --strict-shutdown-codes fails on it.
            clock.cancelled_after_shutdown += 1
            return
        drained = started >= clock.all_not_serving_at
        if method == SMOKE_TEST and outcome.code == "UNAVAILABLE":
            if outcome.details != NOT_SERVING_DETAILS:
                tally.error(
                    "drain: SmokeTest refused by the transport", f"{where}: {outcome.details}"
                )
            return
        if outcome.code != "OK":
            tally.error("drain: unary call failed", f"{where}: {outcome.code} {outcome.details}")
            return
        if method == CHECK:
            status = check_answer(outcome.body)
            if name == LIVENESS and status is not SERVING:
                tally.error("drain: liveness not SERVING", f"{where}: {status}")
            elif name != LIVENESS and drained and status is not NOT_SERVING:
                tally.error("drain: Check still SERVING after drain", f"{where}: {status}")
        elif method == SMOKE_TEST and drained:
            tally.error("drain: SmokeTest answered OK after drain", where)

    return judge


async def drain_under_load(server: SoakServer, config: Config, tally: Tally) -> dict[str, Any]:
    # This process measures the server; a full collection of its own (up to 150 ms seen
    # on a busy 2-core machine) would be counted against the server's 100 ms. The
    # server's collections stay in the figure: they are the product's.
    gc.collect()
    gc.disable()
    try:
        return await _drain_under_load(server, config, tally)
    finally:
        gc.enable()


async def _drain_under_load(server: SoakServer, config: Config, tally: Tally) -> dict[str, Any]:
    liveness_count = config.watchers // 10
    readiness_count = config.watchers - liveness_count
    pool = Pool(server.target, config.channels)
    clock = DrainClock(readiness_count)
    opened = asyncio.Event()
    watches = [DrainWatch(READINESS) for _ in range(readiness_count)]
    watches += [DrainWatch(LIVENESS) for _ in range(liveness_count)]
    tasks = [
        asyncio.create_task(follow_drain(pool.pick(), w, clock, opened, len(watches)))
        for w in watches
    ]
    counts: dict[str, Counter[str]] = {}
    load = UnaryLoad(
        pool,
        {CHECK: config.check_rate, LIST: config.list_rate, SMOKE_TEST: config.smoke_rate},
        (READINESS, LIVENESS, OVERALL),
        judge_drain(tally, clock, counts, strict=config.strict_shutdown_codes),
        config.max_in_flight,
    )
    exited = asyncio.Event()
    exit_code: int | None = None
    exited_at = math.inf
    try:
        try:
            await asyncio.wait_for(opened.wait(), STEP_TIMEOUT)
        except TimeoutError:
            raise StepError(
                f"only {clock.first_messages} of {len(watches)} drain watchers opened"
            ) from None
        bound = DRAIN_LEAD + config.drain_seconds + config.grace_seconds + STEP_TIMEOUT
        loading = asyncio.create_task(
            load.run(time.monotonic() + bound, stop=exited, may_launch=clock.may_launch)
        )
        await asyncio.sleep(DRAIN_LEAD)
        clock.quiet_from = time.monotonic() + config.drain_seconds - DRAIN_QUIET_MARGIN
        clock.signal_at = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        _, pending = await asyncio.wait(tasks, timeout=bound)
        if pending:
            tally.error("drain: Watch streams did not end", f"{len(pending)} still open")
        try:
            exit_code = await asyncio.wait_for(server.process.wait(), bound)
            exited_at = time.monotonic()
        except TimeoutError:
            tally.error("drain: the server did not exit", f"within {bound}s")
        await asyncio.sleep(AFTER_EXIT)  # a few calls against the stopped server
        exited.set()
        await loading
        await load.finish(tally)
    finally:
        for task in tasks:
            task.cancel()
        await pool.close()
    return _drain_report(
        watches,
        clock,
        counts=counts,
        load=load,
        exit_code=exit_code,
        exited_at=exited_at,
        config=config,
        tally=tally,
        server_stopping_at=server.event_time("stopping"),
        server_times={
            kind: server.event_time(kind) for kind in ("board_draining", "readiness_changed")
        },
        server_gc=server.last_event("stopped").get("gc2_recent", []),
    )


def _drain_report(
    watches: list[DrainWatch],
    clock: DrainClock,
    *,
    counts: dict[str, Counter[str]],
    load: UnaryLoad,
    exit_code: int | None,
    exited_at: float,
    config: Config,
    tally: Tally,
    server_stopping_at: float | None,
    server_times: dict[str, float | None],
    server_gc: Sequence[Sequence[float]],
) -> dict[str, Any]:
    signal_at = clock.signal_at or 0.0
    notice: list[float] = []
    problems: Counter[str] = Counter()
    for watch in watches:
        statuses = [status for _, status in watch.statuses]
        if watch.name == READINESS:
            if statuses[:1] != [SERVING] or len(statuses) != 2 or statuses[1] is not NOT_SERVING:
                problems["readiness watcher did not see exactly SERVING, NOT_SERVING"] += 1
            else:
                notice.append(watch.statuses[1][0] - signal_at)
        elif statuses != [SERVING]:
            problems["liveness watcher saw a change"] += 1
        if watch.end_code != "OK":
            problems[f"stream ended with {watch.end_code}"] += 1
    late = sum(1 for seconds in notice if seconds > DRAIN_NOTICE_LIMIT)
    early = sum(1 for seconds in notice if seconds < 0)
    if late:
        problems[f"readiness NOT_SERVING later than {DRAIN_NOTICE_LIMIT * 1000:.0f} ms"] += late
    if early:
        problems["NOT_SERVING before the signal"] += early
    if exit_code != 0:
        problems[f"server exit code {exit_code}"] += 1
    for problem, count in problems.items():
        tally.error("drain", f"{problem} ({count})")
    ends = [w.ended_at - signal_at for w in watches if w.ended_at is not None]
    ms = [round(seconds * 1000, 3) for seconds in notice]
    return {
        "ok": not problems,
        "problems": dict(problems),
        "readiness_watchers": sum(1 for w in watches if w.name == READINESS),
        "liveness_watchers": sum(1 for w in watches if w.name == LIVENESS),
        "signal_to_not_serving_ms": percentiles(ms),
        "late_over_100ms": late,
        "streams_ended_ok": sum(1 for w in watches if w.end_code == "OK"),
        "streams_total": len(watches),
        "stream_end_after_signal_s": percentiles([round(s, 4) for s in ends]),
        "exit_code": exit_code,
        "exit_after_signal_s": None if math.isinf(exited_at) else round(exited_at - signal_at, 3),
        "drain_seconds": config.drain_seconds,
        "grace_seconds": config.grace_seconds,
        "unary_by_phase": {phase: dict(counter) for phase, counter in counts.items()},
        "after_shutdown_cancelled": clock.cancelled_after_shutdown,
        "signal_to_server_handler_ms": _round(
            None if server_stopping_at is None else (server_stopping_at - signal_at) * 1000, 3
        ),
        "unary_held_in_quiet_window": load.held,
        "client_gc_disabled": True,
        "server_board_draining_ms": _ms_after(server_times.get("board_draining"), signal_at),
        "server_readiness_changed_ms": _ms_after(server_times.get("readiness_changed"), signal_at),
        "gc2_pauses_ms_in_window": {
            "server": overlapping(server_gc, signal_at, signal_at + max(notice, default=0.0)),
            "client": overlapping(
                CLIENT_GC.recent, signal_at, signal_at + max(notice, default=0.0)
            ),
        },
        "unary_skipped_client_busy": load.skipped,
    }


# -- main --------------------------------------------------------------------------


async def run(config: Config) -> dict[str, Any]:
    tally = Tally()
    report: dict[str, Any] = {
        "config": {**dataclasses.asdict(config), "server_script": str(config.server_script)},
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
    }
    failures: list[str] = []
    try:
        server = await SoakServer.start(config)
    except StepError as error:
        errors = {"count": 0, "by_kind": {}, "samples": []}
        return {
            **report,
            "errors": errors,
            "lost_transitions": 0,
            "failures": [str(error)],
            "ok": False,
        }
    report["server_pid"] = server.pid
    try:
        report["soak"] = await soak(server, config, tally)
        if not report["soak"]["baseline_restored"]:
            failures.append("tasks or watchers not back to baseline")
        if server.process.returncode is not None:
            raise StepError(f"the server exited during the soak ({server.process.returncode})")
        report["drain"] = await drain_under_load(server, config, tally)
        if not report["drain"]["ok"]:
            failures.append("drain failed")
    except StepError as error:
        failures.append(f"step failed: {error}")
    finally:
        await server.close()
    lost = sum(tally.lost.values())
    if lost:
        failures.append(f"{lost} lost transition(s)")
    if tally.errors:
        failures.append(f"{tally.errors} error(s)")
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["errors"] = {
        "count": tally.errors,
        "by_kind": dict(tally.error_kinds),
        "samples": tally.error_samples,
    }
    report["lost_transitions"] = lost
    report["server_events"] = server.events[-10:]
    if failures:
        report["server_stderr_tail"] = list(server.stderr_tail)
    report["failures"] = failures
    report["ok"] = not failures
    return report


def summary(report: dict[str, Any]) -> str:
    lines = [f"soak: {'PASSED' if report['ok'] else 'FAILED'}"]
    soaked = report.get("soak")
    if soaked:
        rss = soaked["rss_kib"]
        lines += [
            f"  load: {soaked['load_seconds']} s, Check {soaked['check_rate_achieved']}/s, "
            f"calls {json.dumps(soaked['calls'])}",
            f"  watches: {soaked['watches']['opened']} opened, "
            f"{soaked['watches']['messages']} messages, "
            f"left {json.dumps(soaked['watches']['left'])}",
            f"  flipper: {json.dumps(soaked['flipper'])}",
            f"  rss KiB: start {rss['start']} peak {rss['peak']} end {rss['end']}, "
            f"slope {rss['slope_kib_per_min']} KiB/min "
            f"(second half {rss['slope_second_half_kib_per_min']})",
            f"  tasks {json.dumps(soaked['tasks'])}, watchers {json.dumps(soaked['watchers'])}, "
            f"baseline restored: {soaked['baseline_restored']}, cpu s {soaked['cpu_seconds']}",
        ]
    drained = report.get("drain")
    if drained:
        lines += [
            f"  drain: ok={drained['ok']} "
            f"notice ms {json.dumps(drained['signal_to_not_serving_ms'])}",
            f"         streams ended OK {drained['streams_ended_ok']}/{drained['streams_total']}, "
            f"exit {drained['exit_code']} after {drained['exit_after_signal_s']} s",
            f"         unary {json.dumps(drained['unary_by_phase'])}",
            f"         calls started after shutdown and CANCELLED (grpc/grpc#41785): "
            f"{drained['after_shutdown_cancelled']}; signal to server handler "
            f"{drained['signal_to_server_handler_ms']} ms, board draining "
            f"{drained['server_board_draining_ms']} ms; full GC pauses in the window "
            f"{json.dumps(drained['gc2_pauses_ms_in_window'])}",
        ]
    lines.append(
        f"  errors: {report['errors']['count']}, lost transitions: {report['lost_transitions']}"
    )
    lines += [f"    {sample}" for sample in report["errors"]["samples"][:10]]
    lines += [f"  FAILURE: {failure}" for failure in report["failures"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    config, out = parse_args(argv)
    gc.callbacks.append(CLIENT_GC)
    report = asyncio.run(run(config))
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    return EXIT_OK if report["ok"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
