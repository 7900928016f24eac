"""The measurements: one function per section, each returning plain data for the report.

Servers run pinned to the first CPU, every client (h2load, the probe and Watch clients)
to the others. Peers run one at a time while measured, in an order that rotates from
round to round, and every ratio is taken within a round before the median is taken.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any, Final

from benchmarks.probe_client import grpc_request, probe
from benchmarks.procs import Proc, Processes, cpu_sets

ROOT: Final = Path(__file__).resolve().parent.parent
PYTHON: Final = sys.executable
PETSAGE: Final = str(Path(sys.executable).parent / "petsage-grpc")
CHECK_URL: Final = "/grpc.health.v1.Health/Check"
GRPC_HEADERS: Final = ("-H", "content-type: application/grpc", "-H", "te: trailers")

# Peers of the Check sections, in the order of the tables; the first is the baseline.
CHECK_PEERS: Final = ("bare-aio", "petsage", "stock-aio", "stock-sync", "grpc-js")
WATCH_PEERS: Final = ("bare-stream", "petsage-embedded", "stock-aio")
HANG_CONFIGS: Final = ("none", "python-hang", "http-blackhole")
LABELS: Final = {
    "bare-aio": "bare grpcio aio handler (floor)",
    "bare-stream": "bare grpcio streaming handler (floor)",
    "petsage": "petsage-grpc",
    "petsage-embedded": "petsage-grpc (embedded)",
    "stock-aio": "grpcio-health-checking aio",
    "stock-sync": "grpcio-health-checking sync",
    "grpc-js": "grpc-js + grpc-health-check",
    "petsage + 1 check/s": "petsage-grpc + a check every second",
    "none": "no dependency check",
    "python-hang": "python check that never returns",
    "http-blackhole": "http check against a black hole",
    "probe": "petsage-grpc probe",
    "probe TLS": "petsage-grpc probe -tls (CA verified)",
    "grpcio client": "grpcio client, same Check (the former probe)",
}


@dataclass(frozen=True)
class Config:
    """How much of everything to measure."""

    rounds: int = 5
    check_seconds: float = 3.0
    check_warmup_requests: int = 3000
    h2load_connections: int = 4
    h2load_streams: int = 16
    kubelet_seconds: float = 3.0
    kubelet_processes: int = 2
    kubelet_probers: int = 4
    hang_seconds: float = 12.0
    hang_settle_seconds: float = 2.5
    hang_connections: int = 2
    hang_rps: int = 200
    watch_sizes: tuple[int, ...] = (1000, 10_000)
    watch_rounds: int = 3
    watch_streams_per_process: int = 2500
    watch_streams_per_connection: int = 500
    watch_grpcio_rounds: int = 1
    watch_hold_seconds: float = 2.0
    watch_open_timeout: float = 60.0
    watch_change_timeout: float = 20.0
    startup_rounds: int = 5
    idle_seconds: float = 30.0
    exec_probe_rounds: int = 15


FULL: Final = Config()
SMOKE: Final = Config(
    rounds=1,
    check_seconds=0.5,
    check_warmup_requests=200,
    h2load_connections=2,
    h2load_streams=4,
    kubelet_seconds=0.5,
    kubelet_processes=1,
    kubelet_probers=2,
    hang_seconds=0.5,
    hang_settle_seconds=1.2,
    hang_rps=50,
    watch_sizes=(60,),
    watch_rounds=1,
    watch_streams_per_process=40,
    watch_streams_per_connection=20,
    watch_hold_seconds=0.2,
    watch_open_timeout=15.0,
    watch_change_timeout=10.0,
    startup_rounds=1,
    idle_seconds=1.0,
    exec_probe_rounds=2,
)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (NaN for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def med(values: Sequence[float]) -> float:
    """Median of the finite values (NaN for none)."""
    finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return median(finite) if finite else math.nan


def ratio(value: float, baseline: float) -> float:
    """Return value / baseline, NaN when either is missing."""
    if not (math.isfinite(value) and math.isfinite(baseline)) or baseline == 0:
        return math.nan
    return value / baseline


def rotated(items: Sequence[str], round_index: int) -> list[str]:
    """*items* rotated by the round, so that no peer always runs first or last."""
    shift = round_index % len(items)
    return [*items[shift:], *items[:shift]]


def interleaved(
    bench: Bench,
    measure: Callable[[str], dict[str, Any]],
    keys: Sequence[str],
    *,
    rounds: int,
    label: str,
    key_name: str = "peer",
    **where: object,
) -> list[dict[str, Any]]:
    """*rounds* rounds of ``measure(key)`` for every key, the order rotating between rounds.

    A measurement that fails is recorded as an error of section *label* (with *where*),
    and the round goes on without it.
    """
    results: list[dict[str, Any]] = []
    for index in range(rounds):
        this_round: dict[str, Any] = {}
        for key in rotated(keys, index):
            print(f"  {label} round {index + 1}: {key}", file=sys.stderr, flush=True)
            with bench.attempt(label, **{key_name: key}, **where, round=index + 1):
                this_round[key] = measure(key)
        results.append(this_round)
    return results


def free_port() -> int:
    """A loopback port that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _duration(seconds: float) -> str:
    """A duration for h2load's -D, which takes whole units."""
    return f"{round(seconds * 1000)}ms"


def health_request(service: str) -> bytes:
    """A length-prefixed HealthCheckRequest for *service* (h2load's -d body)."""
    name = service.encode()
    message = b"\x0a" + bytes([len(name)]) + name if name else b""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def bare_options() -> list[tuple[str, Any]]:
    """petsage-grpc's server options, which the bare handlers get too."""
    import petsage_grpc  # noqa: PLC0415

    return list(petsage_grpc.SERVER_OPTIONS)


class Bench:
    """Shared state of one run: processes, CPUs, scratch files and the errors met."""

    def __init__(self, config: Config, procs: Processes, scratch: Path) -> None:
        self.config = config
        self.procs = procs
        self.scratch = scratch
        self.server_cpus, self.client_cpus = cpu_sets()
        self.errors: list[dict[str, Any]] = []
        self.bodies = {}
        for service in ("", "liveness"):
            path = scratch / f"request-{service or 'overall'}.bin"
            path.write_bytes(health_request(service))
            self.bodies[service] = path
        self.blackhole = socket.socket()
        self.blackhole.bind(("127.0.0.1", 0))
        self.blackhole.listen(64)  # never accepted: connections complete, nothing answers
        self.configs = self._write_configs()

    def close(self) -> None:
        """Release the black hole."""
        self.blackhole.close()

    def _write_configs(self) -> dict[str, Path]:
        port = self.blackhole.getsockname()[1]
        checks = {
            "python-hang": 'kind = "python"\ntarget = "benchmarks.hang:forever"',
            "http-blackhole": f'kind = "http"\ntarget = "http://127.0.0.1:{port}/health"',
            "python-ok": 'kind = "python"\ntarget = "benchmarks.hang:ok"',
        }
        paths = {}
        for name, check in checks.items():
            interval = "1s" if name == "python-ok" else "100ms"
            path = self.scratch / f"{name}.toml"
            path.write_text(
                f'[[checks]]\nname = "dep"\n{check}\ninterval = "{interval}"\ntimeout = "1s"\n'
            )
            paths[name] = path
        return paths

    @contextmanager
    def attempt(self, section: str, **where: object) -> Iterator[None]:
        """Record an exception as an error of *section* and carry on with the next measurement."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - one failed measurement must not end the run
            entry = {"section": section, **where, "error": f"{type(error).__name__}: {error}"}
            self.errors.append(entry)
            print(f"  ! {entry}", file=sys.stderr, flush=True)

    # -- servers -------------------------------------------------------------------

    def server_argv(self, key: str, port: int = 0, config: str | None = None) -> list[str]:
        """The command line of a server under test."""
        if key == "petsage":
            argv = [PETSAGE, "serve", "--host", "127.0.0.1", "--port", str(port)]
            argv += ["--drain-seconds", "0", "--grace-seconds", "0"]
            if config is not None and config != "none":
                argv += ["--config", str(self.configs[config])]
            return argv
        if key == "grpc-js":
            return ["node", str(ROOT / "benchmarks" / "node" / "server.js"), str(port)]
        argv = [PYTHON, "-m", "benchmarks.peers", key, "--port", str(port)]
        if key.startswith("bare"):
            argv += ["--options", json.dumps(bare_options())]
        return argv

    def start_server(
        self, key: str, *, port: int = 0, config: str | None = None, stdin: bool = False
    ) -> tuple[Proc, int]:
        """Start a server pinned to the server CPUs; wait until it listens."""
        proc = self.procs.start(
            key,
            self.server_argv(key, port, config),
            cpus=self.server_cpus,
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT)},
            stdin=stdin,
        )
        return proc, proc.port()

    def h2load(self, args: Sequence[str], timeout: float) -> str:
        """Run h2load pinned to the client CPUs and return its output."""
        cpus = ",".join(map(str, sorted(self.client_cpus)))
        done = subprocess.run(
            ["taskset", "-c", cpus, "h2load", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"h2load exited {done.returncode}: {done.stderr.strip()[-300:]}")
        return done.stdout

    def check_load(self, port: int, service: str, extra: Sequence[str]) -> list[str]:
        """h2load arguments for Check requests on *service* to *port*."""
        url = f"http://127.0.0.1:{port}{CHECK_URL}"
        return [*extra, *GRPC_HEADERS, "-d", str(self.bodies[service]), url]


_FINISHED: Final = re.compile(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s")
_REQUESTS: Final = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_CODES: Final = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def parse_h2load(output: str) -> dict[str, float]:
    """req/s and request counts from h2load's summary."""
    finished, requests, codes = (p.search(output) for p in (_FINISHED, _REQUESTS, _CODES))
    if not (finished and requests and codes):
        raise RuntimeError(f"unexpected h2load output: {output[-400:]!r}")
    names = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    counts = dict(zip(names, map(int, requests.groups()), strict=True))
    return {
        "rps": float(finished.group(3)),
        **counts,
        "status_2xx": int(codes.group(1)),
        "status_other": sum(map(int, codes.groups()[1:])),
    }


def nghttp_grpc_status(port: int, body: Path) -> dict[str, Any]:
    """One Check with ``nghttp -v``: h2load counts HTTP 200 as success, so read grpc-status."""
    url = f"http://127.0.0.1:{port}{CHECK_URL}"
    done = subprocess.run(
        ["nghttp", "-v", *GRPC_HEADERS, "-d", str(body), url],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    status = re.search(r"grpc-status: (\d+)", done.stdout)
    data = re.search(r"recv DATA frame <length=(\d+)", done.stdout)
    return {
        "grpc_status": int(status.group(1)) if status else None,
        "message_bytes": int(data.group(1)) if data else None,
    }


def probe_once(port: int, service: str = "", timeout: float = 5.0) -> str:
    """One kubelet-style probe (new connection, Check); "OK" means SERVING with grpc-status 0."""
    name = service.encode()
    message = b"\x0a" + bytes([len(name)]) + name if name else b""
    request = grpc_request("127.0.0.1", port, CHECK_URL, message, timeout="1000m")

    async def run() -> str:
        outcome, _ = await probe("127.0.0.1", port, request)
        return outcome

    return asyncio.run(asyncio.wait_for(run(), timeout))


# -- Check: persistent-connection throughput and the kubelet model ---------------------


def throughput_once(bench: Bench, proc: Proc, port: int) -> dict[str, Any]:
    """Check throughput of the server *proc* on *port* with h2load: one warm-up, one run."""
    config = bench.config
    shape = ["-c", str(config.h2load_connections), "-m", str(config.h2load_streams)]
    verified = nghttp_grpc_status(port, bench.bodies[""])
    if verified["grpc_status"] != 0 or verified["message_bytes"] != 7:
        raise RuntimeError(f"Check over nghttp did not answer SERVING with status 0: {verified}")
    warm = ["-n", str(config.check_warmup_requests), *shape]
    bench.h2load(bench.check_load(port, "", warm), timeout=60)
    cpu, started = proc.cpu_seconds(), time.perf_counter()
    output = bench.h2load(
        bench.check_load(port, "", ["-D", _duration(config.check_seconds), *shape]),
        timeout=config.check_seconds + 60,
    )
    wall, cpu = time.perf_counter() - started, proc.cpu_seconds() - cpu
    result = parse_h2load(output)
    if result["failed"] or result["errored"] or result["timeout"]:
        raise RuntimeError(f"h2load saw failures: {result}")
    result["server_cpu_util"] = cpu / wall
    result["requests_per_cpu_second"] = result["succeeded"] / cpu if cpu else math.nan
    result["grpc_status_checked"] = verified["grpc_status"]
    return result


def _kubelet(bench: Bench, proc: Proc, port: int) -> dict[str, Any]:
    config = bench.config
    clients = [
        bench.procs.start(
            f"probe-client-{i}",
            [
                PYTHON,
                "-m",
                "benchmarks.probe_client",
                "--port",
                str(port),
                "--probers",
                str(config.kubelet_probers),
                "--seconds",
                f"{config.kubelet_seconds:g}",
            ],
            cpus=bench.client_cpus,
            cwd=ROOT,
            stdin=True,
        )
        for i in range(config.kubelet_processes)
    ]
    try:
        for client in clients:
            client.line(client.stdout, r"^ready$", 30)
        cpu, started = proc.cpu_seconds(), time.perf_counter()
        for client in clients:
            client.send("go")
        results = [
            json.loads(client.line(client.stdout, r"^\{", config.kubelet_seconds + 30).string)
            for client in clients
        ]
        wall, cpu = time.perf_counter() - started, proc.cpu_seconds() - cpu
    finally:
        for client in clients:
            bench.procs.stop(client)
    ok = sum(r["ok"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for kind, count in r["errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    latencies = [x for r in results for x in r["latencies_ms"]]
    seconds = max(r["seconds"] for r in results)
    client_cpu = sum(r["cpu_seconds"] for r in results)
    return {
        "probes_per_second": ok / seconds,
        "ok": ok,
        "errors": errors,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "server_cpu_util": cpu / wall,
        "client_cpu_util": client_cpu / seconds / max(1, len(bench.client_cpus)),
    }


def measure_check(bench: Bench) -> dict[str, Any]:
    """Persistent-connection throughput (h2load) and the kubelet model, per peer and round."""
    rounds: list[dict[str, Any]] = []
    for index in range(bench.config.rounds):
        this_round: dict[str, Any] = {"throughput": {}, "kubelet": {}}
        for key in rotated(CHECK_PEERS, index):
            print(f"  check round {index + 1}: {key}", file=sys.stderr, flush=True)
            with bench.attempt("check", peer=key, round=index + 1):
                proc, port = bench.start_server(key)
                try:
                    with bench.attempt("throughput", peer=key, round=index + 1):
                        this_round["throughput"][key] = throughput_once(bench, proc, port)
                    with bench.attempt("kubelet", peer=key, round=index + 1):
                        this_round["kubelet"][key] = _kubelet(bench, proc, port)
                finally:
                    bench.procs.stop(proc)
        rounds.append(this_round)
    baseline = CHECK_PEERS[0]
    return {
        "throughput": _summarise(
            [r["throughput"] for r in rounds],
            baseline,
            {
                "rps": "higher",
                "requests_per_cpu_second": "higher",
                "server_cpu_util": "info",
            },
        ),
        "kubelet": _summarise(
            [r["kubelet"] for r in rounds],
            baseline,
            {
                "probes_per_second": "higher",
                "p50_ms": "lower",
                "p99_ms": "lower",
                "server_cpu_util": "info",
                "client_cpu_util": "info",
            },
        ),
    }


def _summarise(
    rounds: Sequence[dict[str, dict[str, Any]]], baseline: str, metrics: dict[str, str]
) -> dict[str, Any]:
    """Median per peer and metric, and the median of per-round ratios to *baseline*."""
    peers = list(dict.fromkeys(key for r in rounds for key in r))
    summary: dict[str, Any] = {}
    for peer in peers:
        row: dict[str, Any] = {"rounds": sum(peer in r for r in rounds)}
        for metric in metrics:
            values = [r[peer][metric] for r in rounds if peer in r]
            row[metric] = med(values)
            row[f"{metric}_ratio"] = med(
                [
                    ratio(r[peer][metric], r[baseline][metric])
                    for r in rounds
                    if peer in r and baseline in r
                ]
            )
        summary[peer] = row
    return {"baseline": baseline, "metrics": metrics, "summary": summary, "rounds": list(rounds)}


# -- Check p99 at a fixed rate, with and without a dependency that hangs ---------------


def paced_liveness_load(bench: Bench, proc: Proc, port: int, log: Path) -> dict[str, Any]:
    """Check ``liveness`` at the hang section's fixed rate: rate, latencies, server CPU.

    A warm-up of 500 calls first; *log* receives h2load's per-request log.

    Raises:
        RuntimeError: h2load saw a failed, errored or timed-out request.
    """
    config = bench.config
    shape = ["-c", str(config.hang_connections)]
    bench.h2load(bench.check_load(port, "liveness", ["-n", "500", *shape]), timeout=60)
    load = ["-D", _duration(config.hang_seconds), "--rps", str(config.hang_rps), *shape]
    cpu, started = proc.cpu_seconds(), time.perf_counter()
    output = bench.h2load(
        bench.check_load(port, "liveness", [*load, "--log-file", str(log)]),
        timeout=config.hang_seconds + 60,
    )
    wall, cpu = time.perf_counter() - started, proc.cpu_seconds() - cpu
    result = parse_h2load(output)
    if result["failed"] or result["errored"] or result["timeout"]:
        raise RuntimeError(f"h2load saw failures: {result}")
    latencies = [
        int(fields[2]) / 1000.0
        for fields in (line.split("\t") for line in log.read_text().splitlines())
        if len(fields) == 3 and fields[1] == "200"
    ]
    return {
        "rps": result["rps"],
        "requests": len(latencies),
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies, default=math.nan),
        "server_cpu_util": cpu / wall,
    }


def _paced(bench: Bench, config_name: str) -> dict[str, Any]:
    config = bench.config
    proc, port = bench.start_server("petsage", config=config_name)
    try:
        time.sleep(config.hang_settle_seconds)  # let the hanging attempts start and time out
        dependency = probe_once(port, "check.dep") if config_name != "none" else "n/a"
        if config_name != "none" and dependency != "not SERVING":
            raise RuntimeError(f"check.dep should be NOT_SERVING, the probe said {dependency}")
        paced = paced_liveness_load(bench, proc, port, bench.scratch / f"paced-{config_name}.log")
    finally:
        bench.procs.stop(proc)
    return {**paced, "dependency": dependency}


def measure_hang(bench: Bench) -> dict[str, Any]:
    """Check latency at a fixed rate for petsage-grpc with no check and with hanging ones."""
    rounds = interleaved(
        bench,
        lambda name: _paced(bench, name),
        HANG_CONFIGS,
        rounds=bench.config.rounds,
        label="hanging_dependency",
        key_name="config",
    )
    return _summarise(
        rounds,
        HANG_CONFIGS[0],
        {"p50_ms": "lower", "p99_ms": "lower", "max_ms": "lower", "rps": "info"},
    )


# -- Watch fan-out -----------------------------------------------------------------

WATCH_METRICS: Final = {
    "opened": "higher",
    "held": "higher",
    "delivered": "higher",
    "p50_ms": "lower",
    "p99_ms": "lower",
    "max_ms": "lower",
    "kib_per_stream": "lower",
    "rss_after_mib": "lower",
    "open_seconds": "lower",
    "fanout_cpu_seconds": "lower",
    "client_cpu_seconds": "info",
}


def _watch_once(bench: Bench, kind: str, size: int, client_kind: str = "raw") -> dict[str, Any]:
    config = bench.config
    proc, port = bench.start_server(kind, stdin=True)
    clients: list[Proc] = []
    try:
        time.sleep(0.3)
        rss_before = proc.rss_bytes()
        processes = max(1, math.ceil(size / config.watch_streams_per_process))
        shares = [size // processes + (i < size % processes) for i in range(processes)]
        for i, share in enumerate(shares):
            channels = max(1, math.ceil(share / config.watch_streams_per_connection))
            clients.append(
                bench.procs.start(
                    f"watch-client-{i}",
                    [
                        PYTHON,
                        "-m",
                        "benchmarks.watch_client",
                        "--port",
                        str(port),
                        "--streams",
                        str(share),
                        "--channels",
                        str(channels),
                        "--open-timeout",
                        f"{config.watch_open_timeout:g}",
                        "--client",
                        client_kind,
                    ],
                    cpus=bench.client_cpus,
                    cwd=ROOT,
                    stdin=True,
                )
            )

        def events(name: str, timeout: float) -> list[dict[str, Any]]:
            pattern = f'"event": "{name}"'
            return [json.loads(c.line(c.stdout, pattern, timeout).string) for c in clients]

        opened = events("opened", config.watch_open_timeout + 30)
        time.sleep(config.watch_hold_seconds)
        for client in clients:
            client.send("held")
        held = events("held", 30)
        rss_after = proc.rss_bytes()
        cpu = proc.cpu_seconds()
        proc.send("flip")
        flipped = float(proc.line(proc.stdout, r"^flipped ([\d.]+)", 10).group(1))
        for client in clients:
            client.send(f"collect {flipped + config.watch_change_timeout:.6f}")
        changed = events("changed", config.watch_change_timeout + 30)
        fanout_cpu = proc.cpu_seconds() - cpu
        for client in clients:
            client.send("close")
    finally:
        for client in clients:
            bench.procs.stop(client)
        bench.procs.stop(proc)
    n_opened = sum(e["opened"] for e in opened)
    latencies = [(t - flipped) * 1000.0 for e in changed for t in e["times"]]
    open_errors: dict[str, int] = {}
    for e in opened:
        for code, count in e["errors"].items():
            open_errors[code] = open_errors.get(code, 0) + count
    for e in opened:
        if e["unsettled"]:
            open_errors["no first message"] = (
                open_errors.get("no first message", 0) + e["unsettled"]
            )
    return {
        "streams": size,
        "opened": n_opened,
        "open_errors": open_errors,
        "open_seconds": max(e["open_seconds"] for e in opened),
        "held": sum(e["alive"] for e in held),
        "delivered": len(latencies),
        "missing": sum(e["missing"] for e in changed),
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies, default=math.nan),
        "fanout_cpu_seconds": fanout_cpu,
        "client_cpu_seconds": sum(e["cpu_seconds"] for e in changed),
        "rss_before_mib": rss_before / 2**20,
        "rss_after_mib": rss_after / 2**20,
        "kib_per_stream": (rss_after - rss_before) / 1024 / n_opened if n_opened else math.nan,
    }


def measure_watch(bench: Bench) -> dict[str, Any]:
    """Watch fan-out at each size: streams opened and held, change latency, memory."""
    by_size: dict[str, Any] = {}
    for size in bench.config.watch_sizes:
        rounds = interleaved(
            bench,
            functools.partial(_watch_once, bench, size=size),
            WATCH_PEERS,
            rounds=bench.config.watch_rounds,
            label="watch",
            streams=size,
        )
        by_size[str(size)] = _summarise(rounds, WATCH_PEERS[0], WATCH_METRICS)
    return by_size


def measure_watch_grpcio(bench: Bench) -> dict[str, Any]:
    """The largest Watch fan-out again, with grpcio aio clients instead of the raw client."""
    size = max(bench.config.watch_sizes)
    rounds = interleaved(
        bench,
        functools.partial(_watch_once, bench, size=size, client_kind="grpcio"),
        WATCH_PEERS,
        rounds=bench.config.watch_grpcio_rounds,
        label="watch_grpcio_client",
        streams=size,
    )
    return {"streams": size, **_summarise(rounds, WATCH_PEERS[0], WATCH_METRICS)}


# -- spawn to SERVING, idle RSS and idle CPU ------------------------------------------


async def _until_serving(port: int, deadline: float) -> str:
    request = grpc_request("127.0.0.1", port, CHECK_URL, b"", timeout="1000m")
    outcome = "never tried"
    for _ in range(100_000):
        if time.perf_counter() >= deadline:
            break
        outcome, _ = await probe("127.0.0.1", port, request)
        if outcome == "OK":
            return outcome
        await asyncio.sleep(0.002)
    return outcome


def _spawn_once(bench: Bench, key: str) -> dict[str, Any]:
    port = free_port()
    started = time.perf_counter()
    proc = bench.procs.start(key, bench.server_argv(key, port), cpus=bench.server_cpus, cwd=ROOT)
    try:
        outcome = asyncio.run(_until_serving(port, started + 30))
        elapsed = time.perf_counter() - started
        if outcome != "OK":
            raise RuntimeError(proc.describe(f"no SERVING answer within 30s (last: {outcome})"))
        time.sleep(1.0)
        rss = proc.rss_bytes()
    finally:
        bench.procs.stop(proc)
    return {"spawn_to_serving_ms": elapsed * 1000.0, "rss_mib": rss / 2**20}


def measure_startup(bench: Bench) -> dict[str, Any]:
    """Process start to first SERVING answer and RSS, then idle CPU and RSS over a window."""
    keys = ("stock-aio", "petsage")
    rounds = interleaved(
        bench,
        lambda key: _spawn_once(bench, key),
        keys,
        rounds=bench.config.startup_rounds,
        label="startup",
    )
    spawn = _summarise(rounds, keys[0], {"spawn_to_serving_ms": "lower", "rss_mib": "lower"})
    idle: dict[str, Any] = {}
    with bench.attempt("idle"):
        idle = _idle(bench)
    return {"spawn": spawn, "idle": idle}


def idle_usage(servers: dict[str, Proc], seconds: float) -> dict[str, dict[str, float]]:
    """Leave *servers* untouched for *seconds* (after 2 s to settle); their CPU, RSS, threads."""
    time.sleep(min(2.0, seconds))
    before = {name: proc.cpu_seconds() for name, proc in servers.items()}
    time.sleep(seconds)
    return {
        name: {
            "cpu_seconds": proc.cpu_seconds() - before[name],
            "cpu_percent": (proc.cpu_seconds() - before[name]) / seconds * 100.0,
            "rss_mib": proc.rss_bytes() / 2**20,
            "threads": len(os.listdir(f"/proc/{proc.pid}/task")),
        }
        for name, proc in servers.items()
    }


def _idle(bench: Bench) -> dict[str, Any]:
    """Run the servers side by side, untouched, and read their CPU time and RSS."""
    seconds = bench.config.idle_seconds
    servers = {
        "stock-aio": bench.start_server("stock-aio"),
        "petsage": bench.start_server("petsage"),
        "petsage + 1 check/s": bench.start_server("petsage", config="python-ok"),
    }
    try:
        for name, (proc, port) in servers.items():
            outcome = probe_once(port)
            if outcome != "OK":
                raise RuntimeError(proc.describe(f"{name} did not answer SERVING: {outcome}"))
        result = idle_usage({name: proc for name, (proc, _) in servers.items()}, seconds)
    finally:
        for proc, _ in servers.values():
            bench.procs.stop(proc)
    return {"seconds": seconds, "servers": result}


def config_dict(config: Config) -> dict[str, Any]:
    """The configuration as JSON-ready data."""
    return asdict(config)
