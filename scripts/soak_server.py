"""The server side of the soak test: a grpc.aio server that embeds petsage_grpc.

Run by ``scripts/soak.py``; not meant to be run by hand (it talks JSON lines):

- It serves the PetSage services the way an embedding application would
  (``petsage_grpc.SERVER_OPTIONS`` and ``add_to_server``) on ``127.0.0.1:0`` and prints
  ``{"event": "listening", "port": N, "pid": P}`` on stdout.
- A flipper sets the health name ``soak.flipper`` alternately SERVING and NOT_SERVING,
  one flip every ``--flip-ms`` (50 ms), counting its flips; on the event loop, or with
  ``--flip-thread`` from a thread of its own. It starts paused.
- Every second (and on the ``stats`` command) it prints ``{"event": "stats", "tasks":
  len(asyncio.all_tasks()), "watchers": board.watcher_count, "flips": n, ...}``.
- Commands on stdin, one per line: ``stats``; ``pause`` (stop flipping; the answer
  ``{"event": "paused", "flips": n, "status": "SERVING"}`` is printed in the same loop
  step that stops the flipper, so no flip happens after it until ``resume``);
  ``resume``. End of input (the soak client died) stops the server like SIGTERM.
- SIGTERM or SIGINT: ``petsage_grpc.graceful_stop`` with ``--drain-seconds`` and
  ``--grace-seconds``, then ``{"event": "stopped"}`` and exit 0.
- ``--max-seconds`` bounds its whole life: past it, it stops itself and exits 3.

Every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from typing import Final

import grpc

import petsage_grpc
from petsage_grpc import ServingStatus, StatusBoard

FLIPPER: Final = "soak.flipper"
EXIT_TIMED_OUT: Final = 3
MAX_COMMANDS: Final = 1_000_000
"""More commands than any soak sends (a few per second); bounds the stdin loop."""


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}, separators=(",", ":")), flush=True)


class GcPauses:
    """Full (generation 2) garbage collections: how many, how long, and the latest ones."""

    def __init__(self) -> None:
        self.count = 0
        self.max_ms = 0.0
        self.max_cpu_ms = 0.0
        self.recent: deque[tuple[float, float]] = deque(maxlen=64)  # (end monotonic, ms)
        self._started = 0.0
        self._started_cpu = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
            self._started_cpu = time.thread_time()
            return
        pause_ms = (time.perf_counter() - self._started) * 1000
        self.count += 1
        self.max_ms = max(self.max_ms, pause_ms)
        # Wall time includes being preempted on a busy machine; thread time does not.
        self.max_cpu_ms = max(self.max_cpu_ms, (time.thread_time() - self._started_cpu) * 1000)
        self.recent.append((time.monotonic(), round(pause_ms, 3)))


GC = GcPauses()


class DrainTimes(logging.Handler):
    """Prints when the board starts draining and when readiness turns NOT_SERVING.

    Both come from the board's own log records (``petsage_grpc.status``), so the soak
    can split its signal-to-watcher figure into server and delivery parts.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "draining":
            emit("board_draining", t=time.monotonic())
        elif getattr(record, "service", None) == "readiness":
            emit("readiness_changed", t=time.monotonic(), status=getattr(record, "status", ""))


class Flipper:
    """Flips ``soak.flipper`` on the board every *period* seconds while not paused.

    On the event loop by default; with *threaded*, from a thread of its own (the board's
    cross-thread path: watchers are woken with ``call_soon_threadsafe``). Flips are at
    least *period* apart either way: each waits a full period after the previous one.
    """

    def __init__(self, board: StatusBoard, period: float, *, threaded: bool) -> None:
        self.board = board
        self.period = period
        self.threaded = threaded
        self.flips = 0
        self.status = ServingStatus.SERVING
        self.running = asyncio.Event()  # clear: paused (event loop flipper)
        self._lock = threading.Lock()  # held while flipping (thread flipper)
        self._paused = True
        self._stop = threading.Event()
        board.set(FLIPPER, self.status)

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        # Under the lock: once it is released, the thread flipper cannot flip again.
        with self._lock:
            self._paused = True
            self.running.clear()
            emit("paused", flips=self.flips, status=self.status.name, t=time.monotonic())

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self.running.set()
            emit("resumed", flips=self.flips, status=self.status.name)

    def _flip(self) -> None:
        self.status = (
            ServingStatus.NOT_SERVING
            if self.status is ServingStatus.SERVING
            else ServingStatus.SERVING
        )
        self.flips += 1
        self.board.set(FLIPPER, self.status)

    async def run(self, max_flips: int) -> None:
        if self.threaded:
            thread = threading.Thread(target=self._run_thread, args=(max_flips,), daemon=True)
            thread.start()
            try:
                await asyncio.Event().wait()  # until cancelled
            finally:
                self._stop.set()
                thread.join(5)
            return
        for _ in range(max_flips):
            await self.running.wait()
            await asyncio.sleep(self.period)
            if not self.running.is_set():  # paused while sleeping: that flip is not made
                continue
            self._flip()

    def _run_thread(self, max_flips: int) -> None:
        for _ in range(max_flips):
            if self._stop.wait(self.period):
                return
            with self._lock:
                if not self._paused:
                    self._flip()


def stats(board: StatusBoard, flipper: Flipper, *, objects: bool = False) -> None:
    extra = {"gc_tracked_objects": len(gc.get_objects())} if objects else {}
    emit(
        "stats",
        tasks=len(asyncio.all_tasks()),
        watchers=board.watcher_count,
        flips=flipper.flips,
        paused=flipper.paused,
        draining=board.draining,
        gc2=GC.count,
        gc2_max_ms=round(GC.max_ms, 3),
        gc2_max_cpu_ms=round(GC.max_cpu_ms, 3),
        **extra,
        t=time.monotonic(),
    )


async def report_every_second(board: StatusBoard, flipper: Flipper, max_seconds: float) -> None:
    for _ in range(math.ceil(max_seconds) + 1):
        stats(board, flipper)
        await asyncio.sleep(1.0)


async def follow_commands(board: StatusBoard, flipper: Flipper, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    for _ in range(MAX_COMMANDS):
        line = await reader.readline()
        if not line:
            emit("stdin_closed")
            stop.set()
            return
        command = line.decode(errors="replace").strip()
        if command == "stats":
            stats(board, flipper, objects=True)  # asked for: also count tracked objects
        elif command == "pause":
            flipper.pause()
        elif command == "resume":
            flipper.resume()
        else:
            emit("unknown_command", command=command)


async def run(args: argparse.Namespace) -> int:
    server = grpc.aio.server(options=petsage_grpc.SERVER_OPTIONS)
    board = petsage_grpc.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    flipper = Flipper(board, args.flip_ms / 1000, threaded=args.flip_thread)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    max_flips = math.ceil(args.max_seconds / flipper.period) + 1
    background = [
        asyncio.create_task(flipper.run(max_flips), name="flipper"),
        asyncio.create_task(report_every_second(board, flipper, args.max_seconds), name="stats"),
        asyncio.create_task(follow_commands(board, flipper, stop), name="commands"),
    ]
    emit("listening", port=port, pid=os.getpid())
    timed_out = False
    try:
        await asyncio.wait_for(stop.wait(), timeout=args.max_seconds)
    except TimeoutError:
        timed_out = True
        emit("max_seconds_reached")
    emit("stopping", t=time.monotonic())
    await petsage_grpc.graceful_stop(
        server, board, drain_seconds=args.drain_seconds, grace_seconds=args.grace_seconds
    )
    for task in background:
        task.cancel()
    for task in background:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    emit("stopped", t=time.monotonic(), flips=flipper.flips, gc2_recent=list(GC.recent))
    return EXIT_TIMED_OUT if timed_out else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--flip-ms", type=float, default=50.0, help="flipper period (50)")
    parser.add_argument(
        "--flip-thread", action="store_true", help="flip from a thread, not the event loop"
    )
    parser.add_argument("--drain-seconds", type=float, default=2.0, help="on SIGTERM (2)")
    parser.add_argument("--grace-seconds", type=float, default=2.0, help="after draining (2)")
    parser.add_argument(
        "--max-seconds", type=float, default=3600.0, help="stop by itself after this (3600)"
    )
    args = parser.parse_args()
    # Status changes are logged at INFO; 20 flips a second would only add noise on
    # stderr. The board's records go to DrainTimes alone.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    status_log = logging.getLogger("petsage_grpc.status")
    status_log.setLevel(logging.INFO)
    status_log.propagate = False
    status_log.addHandler(DrainTimes())
    gc.callbacks.append(GC)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
