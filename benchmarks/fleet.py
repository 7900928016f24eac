"""The fleet view's cost and speed: one follower, many replicas, against polling each one.

    python -m benchmarks.fleet                  # 100 replicas (docs/fleet.md)
    python -m benchmarks.fleet --replicas 20    # fewer, on a small machine
    python -m benchmarks.fleet --smoke          # 5 replicas, a few transitions

Replicas are ``petsage-grpc serve`` on 127.0.0.2, 127.0.0.3, ... all on one port, each
with a ``tcp`` check (interval 100 ms) against a listener of its own in this process;
dnsmasq answers for their name. One ``petsage-grpc fleet --json`` process follows them:
its stdout is the CLI's view (one JSON line per event), its ``/fleet.json`` the page's.

Measured, in one run:

- transitions: a listener is closed (then reopened) on one replica at a time; for each,
  when a Watch stream this process holds on that replica's ``readiness`` sees the
  change (the reference: the server's own push), when the follower prints it, and when
  ``fleet.json``, polled every 500 ms as the page does (from a random phase), shows it.
  Latencies are from the listener's change; the follower's own share is the view's time
  minus the reference's.
- the follower's RSS and CPU: idle (all followed, nothing changing), and during a
  rolling restart of every replica (SIGTERM, drain 0, start again, one at a time).
- polling instead: ``petsage-grpc probe`` (the grpc_health_probe drop-in) once against
  every replica, CPU per probe from rusage; at the kubelet's default period (10 s) that
  is the CPU a poller spends, and its detection time is the wait for the next poll
  (uniform over the period, so p50 = period/2 and p99 = 0.99 x period, plus one probe).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.exec_probe import _Spawner
from benchmarks.measure import PETSAGE, PYTHON, ROOT, med, percentile
from benchmarks.procs import Proc, Processes

sys.path.insert(0, str(ROOT / "tests"))
from fleet_harness import NAME, Dnsmasq  # the tests' harness

KUBELET_PERIOD: Final = 10.0
PAGE_POLL: Final = 0.5
_CPUS: Final = {0, 1}
_START_BATCH: Final = 10
_WAIT: Final = 60.0


class _Listener:
    """A TCP listener on 127.0.0.1 at a fixed port that can be closed and opened again.

    A thread of its own accepts and closes each connection (a full backlog would fail
    the check).
    """

    def __init__(self) -> None:
        self._socket: socket.socket | None = None
        self.port = 0
        self.open()

    def open(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        sock.settimeout(0.2)
        self.port = sock.getsockname()[1]
        self._socket = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, sock: socket.socket) -> None:
        while self._socket is sock:
            try:
                connection, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection.close()

    def close(self) -> None:
        if self._socket is not None:
            sock, self._socket = self._socket, None
            sock.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _replica_argv(host: str, port: int, config: Path) -> list[str]:
    return [
        PETSAGE,
        "serve",
        "--host",
        host,
        "--port",
        str(port),
        "--config",
        str(config),
        "--drain-seconds",
        "0",
        "--grace-seconds",
        "1",
    ]


def _config(scratch: Path, host: str, listener: _Listener) -> Path:
    path = scratch / f"{host}.toml"
    path.write_text(
        '[[checks]]\nname = "db"\nkind = "tcp"\n'
        f'target = "127.0.0.1:{listener.port}"\ninterval = "100ms"\ntimeout = "500ms"\n'
        "failure_threshold = 1\n",
        encoding="utf-8",
    )
    return path


class _Events:
    """The follower's stdout: every transition line, with the time it was read."""

    def __init__(self, proc: Proc) -> None:
        self.seen: list[tuple[float, dict[str, Any]]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: Proc) -> None:
        while True:
            line = proc.stdout.get()
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                with self._lock:
                    self.seen.append((time.time(), event))

    def find(self, since: float, replica: str, to: str) -> float | None:
        with self._lock:
            for at, event in self.seen:
                if (
                    at >= since
                    and event.get("replica") == replica
                    and event.get("service") == "readiness"
                    and event.get("to") == to
                ):
                    return at
        return None


def _page_shows(url: str, replica: str, to: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - loopback
        document = json.loads(answer.read())
    for entry in document["replicas"]:
        if entry["address"] == replica:
            return bool(entry["names"].get("readiness") == to)
    return False


def _direct_watch(address: str, to: str, ready: threading.Event, out: list[float]) -> None:
    wanted = health_pb2.HealthCheckResponse.ServingStatus.Value(to)
    with grpc.insecure_channel(address) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="readiness"), timeout=_WAIT
        )
        for answer in stream:
            if not ready.is_set():
                ready.set()  # the first answer: the current status
                continue
            if answer.status == wanted:
                out.append(time.time())
                return


def _transition(
    replica: str, listener: _Listener, events: _Events, page_url: str, *, fail: bool
) -> dict[str, float]:
    """Close (or reopen) one replica's listener; the three latencies of its readiness change."""
    to = "NOT_SERVING" if fail else "SERVING"
    ready, direct = threading.Event(), list[float]()
    watcher = threading.Thread(target=_direct_watch, args=(replica, to, ready, direct))
    watcher.start()
    if not ready.wait(_WAIT):
        raise RuntimeError(f"no Watch answer from {replica}")
    # The page polls on its own clock: start this "page" at a random phase.
    next_poll = time.time() + random.uniform(0, PAGE_POLL)  # noqa: S311 - a phase
    changed = time.time()
    listener.close() if fail else listener.open()
    page_at = None
    deadline = changed + _WAIT
    while page_at is None and time.time() < deadline:
        time.sleep(max(0.0, next_poll - time.time()))
        if _page_shows(page_url, replica, to):
            page_at = time.time()
        next_poll += PAGE_POLL
    watcher.join(_WAIT)
    cli_at = None
    while cli_at is None and time.time() < deadline:
        cli_at = events.find(changed, replica, to)
        time.sleep(0.01)
    if page_at is None or cli_at is None or not direct:
        raise RuntimeError(f"{replica}: the change to {to} was not seen everywhere")
    return {
        "direct_watch_s": direct[0] - changed,
        "cli_s": cli_at - changed,
        "page_s": page_at - changed,
    }


def _sample(proc: Proc, seconds: float) -> dict[str, float]:
    cpu, started = proc.cpu_seconds(), time.monotonic()
    peak = proc.rss_bytes()
    while time.monotonic() - started < seconds:
        time.sleep(0.5)
        peak = max(peak, proc.rss_bytes())
    wall = time.monotonic() - started
    return {
        "cpu_percent": 100.0 * (proc.cpu_seconds() - cpu) / wall,
        "rss_mib": proc.rss_bytes() / 2**20,
        "peak_rss_mib": peak / 2**20,
        "seconds": wall,
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": 1000 * med(values),
        "p99_ms": 1000 * percentile(values, 0.99),
        "max_ms": 1000 * max(values),
    }


def _fleet_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - loopback
        document: dict[str, Any] = json.loads(answer.read())
    return document


def _wait_serving(url: str, addresses: set[str]) -> None:
    """Wait until the follower has every address of *addresses* up with readiness SERVING."""
    deadline = time.monotonic() + _WAIT * 2
    while time.monotonic() < deadline:
        ready = {
            r["address"]
            for r in _fleet_json(url)["replicas"]
            if r["state"] == "up" and r["names"].get("readiness") == "SERVING"
        }
        if addresses <= ready:
            return
        time.sleep(0.1)
    shown = [r for r in _fleet_json(url)["replicas"] if r["address"] in addresses]
    raise RuntimeError(f"the follower does not show {sorted(addresses)} serving: {shown}")


class _Fleet:
    """The replicas, their listeners and configuration, started and restarted."""

    def __init__(self, procs: Processes, scratch: Path, replicas: int) -> None:
        self.procs, self.scratch = procs, scratch
        self.port = _free_port()
        self.hosts = [f"127.0.0.{2 + i}" for i in range(replicas)]
        self.listeners = {host: _Listener() for host in self.hosts}
        self.servers: dict[str, Proc] = {}

    def address(self, host: str) -> str:
        return f"{host}:{self.port}"

    def start(self, hosts: list[str]) -> None:
        for host in hosts:
            config = _config(self.scratch, host, self.listeners[host])
            argv = _replica_argv(host, self.port, config)
            self.servers[host] = self.procs.start(host, argv, cpus=_CPUS, cwd=ROOT)
        for host in hosts:
            self.servers[host].port(_WAIT * 2)

    def restart(self, host: str) -> None:
        self.servers[host].popen.send_signal(signal.SIGTERM)
        self.servers[host].popen.wait(_WAIT)
        self.procs.stop(self.servers[host])
        self.start([host])

    def close(self) -> None:
        for listener in self.listeners.values():
            listener.close()


def _rolling_restart(fleet: _Fleet, follower: Proc, url: str) -> dict[str, float]:
    """Restart every replica in turn, each once the follower sees the last one serve."""
    cpu_before, rolled = follower.cpu_seconds(), time.monotonic()
    peak = follower.rss_bytes()
    for host in fleet.hosts:
        fleet.restart(host)
        _wait_serving(url, {fleet.address(host)})
        peak = max(peak, follower.rss_bytes())
    wall = time.monotonic() - rolled
    return {
        "cpu_percent": 100.0 * (follower.cpu_seconds() - cpu_before) / wall,
        "rss_mib": follower.rss_bytes() / 2**20,
        "peak_rss_mib": peak / 2**20,
        "seconds": wall,
    }


def _polling(fleet: _Fleet) -> dict[str, float]:
    """One ``petsage-grpc probe`` per replica, as a poller runs each period."""
    spawner = _Spawner()
    try:
        probes = [
            spawner.run([PETSAGE, "probe", f"-addr={fleet.address(host)}", "-service=readiness"])
            for host in fleet.hosts
        ]
        baseline = [spawner.run([PYTHON, "-c", "pass"]) for _ in range(5)]
    finally:
        spawner.close()
    probe_cpu = med([p["cpu_ms"] for p in probes])
    probe_wall = med([p["wall_ms"] for p in probes])
    return {
        "period_s": KUBELET_PERIOD,
        "probe_cpu_ms": probe_cpu,
        "probe_wall_ms": probe_wall,
        "python_pass_cpu_ms": med([b["cpu_ms"] for b in baseline]),
        "cpu_percent_for_all": 100.0 * (probe_cpu / 1000.0) * len(probes) / KUBELET_PERIOD,
        "detection_p50_ms": 1000 * KUBELET_PERIOD / 2 + probe_wall,
        "detection_p99_ms": 1000 * KUBELET_PERIOD * 0.99 + probe_wall,
    }


def run(replicas: int, transitions: int, idle_seconds: float, scratch: Path) -> dict[str, Any]:
    """Measure; return the results (see the module's docstring)."""
    procs = Processes()
    fleet = _Fleet(procs, scratch, replicas)
    try:
        with Dnsmasq(scratch) as dns:
            started = time.monotonic()
            for batch in range(0, replicas, _START_BATCH):
                fleet.start(fleet.hosts[batch : batch + _START_BATCH])
            print(f"  {replicas} replicas up in {time.monotonic() - started:.0f}s", file=sys.stderr)
            dns.set_hosts(fleet.hosts)
            page_port = _free_port()
            argv = [PETSAGE, "fleet", "--json", "--http-port", str(page_port)]
            target = f"dns://127.0.0.1:{dns.port}/{NAME}:{fleet.port}"
            follower = procs.start("fleet", [*argv, "--discover", target], cpus=_CPUS, cwd=ROOT)
            follower.line(follower.stderr, r"fleet page on", _WAIT)
            url = f"http://127.0.0.1:{page_port}/fleet.json"
            events = _Events(follower)
            _wait_serving(url, {fleet.address(host) for host in fleet.hosts})
            idle = _sample(follower, idle_seconds)
            print(f"  idle: {idle}", file=sys.stderr)
            latencies = []
            for index in range(transitions):
                host = fleet.hosts[index % replicas]
                for fail in (True, False):
                    latencies.append(
                        _transition(
                            fleet.address(host), fleet.listeners[host], events, url, fail=fail
                        )
                    )
            print(f"  {len(latencies)} transitions measured", file=sys.stderr)
            rolling = _rolling_restart(fleet, follower, url)
            print(f"  rolling restart: {rolling}", file=sys.stderr)
            polling = _polling(fleet)
    finally:
        procs.stop_all()
        fleet.close()
    return {
        "replicas": replicas,
        "transitions": len(latencies),
        "latency": {
            key: _summary([entry[key] for entry in latencies])
            for key in ("direct_watch_s", "cli_s", "page_s")
        },
        "follower_share": _summary([max(0.0, e["cli_s"] - e["direct_watch_s"]) for e in latencies]),
        "follower_idle": idle,
        "follower_rolling_restart": rolling,
        "polling": polling,
    }


def main() -> int:
    """Run the benchmark and print its results as JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet")
    parser.add_argument("--replicas", type=int, default=100)
    parser.add_argument("--transitions", type=int, default=50, help="replicas failed in turn")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--smoke", action="store_true", help="5 replicas, 3 transitions, 3 s idle")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = parser.parse_args()
    if args.smoke:
        args.replicas, args.transitions, args.idle_seconds = 5, 3, 3.0
    import tempfile  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="petsage-fleet-bench-") as scratch:
        result = run(args.replicas, args.transitions, args.idle_seconds, Path(scratch))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
