"""Processes the benchmark starts: pinned, watched, and always stopped.

Every process is started through :class:`Processes`, which stops each one it started (by
its own process id: SIGTERM, then SIGKILL) when the benchmark ends, whatever happens.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Final

CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
# The CPUs this process may use when the benchmark starts, before it moves itself to the
# clients' CPUs (taskset can then still pin a server to any of these).
_CPUS: Final = tuple(sorted(os.sched_getaffinity(0)))
_SERVING_ON: Final = re.compile(r"serving on \S*?:(\d+)\b")


def cpu_sets() -> tuple[set[int], set[int]]:
    """Split this machine's CPUs: the first for servers, the rest for clients (or all shared)."""
    cpus = list(_CPUS)
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    return {cpus[0]}, set(cpus[1:])


def _pump(stream: IO[str], lines: queue.Queue[str], tail: collections.deque[str]) -> None:
    for line in stream:
        tail.append(line.rstrip("\n"))
        lines.put(line.rstrip("\n"))


class Proc:
    """A started process: its output lines as queues, its CPU time and memory from /proc."""

    def __init__(self, name: str, popen: subprocess.Popen[str]) -> None:
        self.name = name
        self.popen = popen
        self.pid = popen.pid
        self.started = time.perf_counter()
        self.stdout: queue.Queue[str] = queue.Queue()
        self.stderr: queue.Queue[str] = queue.Queue()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        stdout_tail: collections.deque[str] = collections.deque(maxlen=40)
        # Each queue's reader, so that an exit is judged only once its last lines are in.
        self._pumps: dict[int, threading.Thread] = {}
        for stream, lines, tail in (
            (popen.stdout, self.stdout, stdout_tail),
            (popen.stderr, self.stderr, self.stderr_tail),
        ):
            if stream is not None:
                pump = threading.Thread(target=_pump, args=(stream, lines, tail), daemon=True)
                pump.start()
                self._pumps[id(lines)] = pump

    def line(self, source: queue.Queue[str], pattern: str, timeout: float) -> re.Match[str]:
        """Wait for a line of *source* matching *pattern*.

        Raises:
            RuntimeError: the process exited, or *timeout* passed first.
        """
        deadline = time.monotonic() + timeout
        compiled = re.compile(pattern)
        for _ in range(100_000):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                text = source.get(timeout=min(left, 0.1))
            except queue.Empty:
                if self.popen.poll() is not None:
                    # Its last lines may still be on their way from the pipe to the queue.
                    pump = self._pumps.get(id(source))
                    if pump is not None:
                        pump.join(timeout=5.0)
                    if source.empty():
                        raise RuntimeError(
                            self.describe(f"exited ({self.popen.returncode})")
                        ) from None
                continue
            found = compiled.search(text)
            if found:
                return found
        raise RuntimeError(self.describe(f"no line matching {pattern!r} within {timeout:g}s"))

    def port(self, timeout: float = 30.0) -> int:
        """Wait for ``serving on HOST:PORT`` on stderr and return the port."""
        return int(self.line(self.stderr, _SERVING_ON.pattern, timeout).group(1))

    def send(self, text: str) -> None:
        """Write one line to the process's stdin."""
        if self.popen.stdin is None:
            raise RuntimeError(self.describe("was started without stdin"))
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    def describe(self, problem: str) -> str:
        """*problem*, with the last lines the process wrote on stderr."""
        tail = " | ".join(list(self.stderr_tail)[-5:])
        return f"{self.name} (pid {self.pid}): {problem}" + (f"; stderr: {tail}" if tail else "")

    def cpu_seconds(self) -> float:
        """User plus system CPU time of every thread so far (from /proc/PID/stat)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_bytes(self) -> int:
        """Resident set size (VmRSS) now."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within *timeout*; reap it."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class Processes:
    """Starts processes pinned to CPUs and stops every one of them on :meth:`stop_all`."""

    def __init__(self) -> None:
        self._started: list[Proc] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: set[int],
        cwd: Path,
        env: Mapping[str, str] | None = None,
        stdin: bool = False,
    ) -> Proc:
        """Start *argv* pinned to *cpus* (``taskset``), with stdout and stderr as line queues."""
        pinned = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv]
        popen = subprocess.Popen(
            pinned,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,  # a Ctrl-C reaches the benchmark, which stops them
        )
        proc = Proc(name, popen)
        self._started.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        """Stop one process and forget it."""
        proc.stop()
        if proc in self._started:
            self._started.remove(proc)

    def stop_all(self) -> None:
        """Stop every process still running, newest first."""
        for proc in reversed(self._started):
            proc.stop()
        self._started.clear()
