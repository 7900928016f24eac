"""What one look of the connection shedder costs, by how many descriptors the process holds.

    .venv/bin/python -m benchmarks.shedder_cost [--idle 15000] [--main 500] [--looks 50]

The shedder (petsage_grpc/server/_shedder.py) runs in this process against real loopback
TCP connections: *--main* accepted on the port it watches (the main port's clients) and
*--idle* accepted on another port (as a probe port's idle clients), their client ends held
by a child process. It times :meth:`ConnectionShedder._tick` on its own thread's code path,
quiet (memory and CPU as at start) and watching (as when memory has grown, e.g. 2,000
Watch streams: every connection's counters read each look), and prints the median and
largest look in ms and the share of one core at a look every 100 ms. A baseline with no
connections is measured in the same run: on a shared machine, read the ratios.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from petsage_grpc.server._shedder import ConnectionShedder, _SockDiag

_CLIENT = """
import socket, sys
port, count, base = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
held = []
for n in range(count):
    s = socket.socket()
    # 50 per source address: under the per-address cap, as legitimate clients.
    s.bind((f"127.0.{1 + (base + n) // 12500}.{1 + (base + n) // 50 % 250}", 0))
    s.connect(("127.0.0.1", port))
    held.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


@contextmanager
def connections(count: int, *, base: int) -> Iterator[tuple[int, list[socket.socket]]]:
    """*count* connections accepted on a fresh port, the client ends in a child process."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]
    child = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, str(port), str(count), str(base)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    accepted = [listener.accept()[0] for _ in range(count)]
    assert child.stdout is not None  # noqa: S101 - a pipe was asked for
    child.stdout.readline()
    try:
        yield port, accepted
    finally:
        assert child.stdin is not None  # noqa: S101
        child.stdin.close()
        child.wait(30)
        for sock in accepted:
            sock.close()
        listener.close()


def looks(port: int, *, watching: bool, count: int, diag: bool = True) -> list[float]:
    """Seconds each of *count* looks took (the first, which meets every socket, left out).

    Without *diag*, as where netlink is unavailable (/proc/self/fd alone).
    """
    shedder = ConnectionShedder(max_per_address=76, memory_high_bytes=1 << 40, max_connections=614)
    if diag:
        shedder._diag = _SockDiag()
    shedder._port = port  # the thread's own code path, without the thread
    shedder._statm = os.open("/proc/self/statm", os.O_RDONLY)
    if watching:
        shedder._memory_rising = 0  # as when memory has grown
    try:
        times = []
        for _ in range(count + 1):
            started = time.perf_counter()
            shedder._tick(time.monotonic(), 0.1)
            times.append(time.perf_counter() - started)
        return times[1:]
    finally:
        os.close(shedder._statm)
        if shedder._diag is not None:
            shedder._diag.close()


def report(name: str, times: list[float], baseline: float) -> None:
    """One line: median and largest look, share of a core, ratio to the baseline."""
    median = statistics.median(times)
    print(
        f"{name:44} median {median * 1e3:7.3f} ms  max {max(times) * 1e3:7.3f} ms  "
        f"{median / 0.1 * 100:5.1f} % of a core at 10 looks/s  x{median / baseline:6.1f}"
    )


def main() -> int:
    """Measure the baseline, the main port's connections, then the idle descriptors."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle", type=int, default=15_000)
    parser.add_argument("--main", type=int, default=500)
    parser.add_argument("--looks", type=int, default=50)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.idle + args.main + 64 > hard:
        parser.error(f"needs {args.idle + args.main + 64} descriptors; the limit is {hard}")
    with connections(0, base=0) as (port, _):
        base_quiet = statistics.median(looks(port, watching=False, count=args.looks))
        base_watch = statistics.median(looks(port, watching=True, count=args.looks))
        report("no connections, quiet", [base_quiet], base_quiet)
        report("no connections, watching", [base_watch], base_watch)
    with connections(args.main, base=0) as (port, _):
        report(
            f"{args.main} main-port connections, quiet",
            looks(port, watching=False, count=args.looks),
            base_quiet,
        )
        report(
            f"{args.main} main-port connections, watching",
            looks(port, watching=True, count=args.looks),
            base_watch,
        )
    with connections(args.idle, base=args.main) as (_, _held):
        report(
            f"{args.idle} idle descriptors of another port, quiet",
            looks(1, watching=False, count=args.looks),
            base_quiet,
        )
        report(
            f"{args.idle} idle descriptors, watching",
            looks(1, watching=True, count=args.looks),
            base_watch,
        )
        report(
            f"{args.idle} idle, quiet, /proc/self/fd only",
            looks(1, watching=False, count=args.looks, diag=False),
            base_quiet,
        )
        report(
            f"{args.idle} idle, watching, /proc/self/fd only",
            looks(1, watching=True, count=args.looks, diag=False),
            base_watch,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
