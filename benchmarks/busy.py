"""The busy-backend and wedge sections: probes of an embedded backend whose loop is busy or blocked.

    python -m benchmarks.busy [--smoke]          # these two sections alone, printed as tables
    python -m benchmarks.busy load --port N ...  # the load client (run by the sections)

**Busy backend.** ``benchmarks/busy_app.py`` burns 20 ms of CPU per application call
while 64 callers keep calling (the loop saturated). Kubelet-model probes of
``liveness`` (a new connection each, 1 s deadline) start every 100 ms, whether or not
the previous one has answered, for 20 s. Side by side, rotating per round: the main port
of an ``add_to_server`` backend (``petsage-main``), the probe listener of the same
backend with a :class:`petsage_grpc.ProbeListener` (``petsage-probe``), and
grpcio-health-checking's aio servicer embedded the same way (``stock-aio``); each with
the application's methods as a generic handler (``generic``, as ``examples/embed.py``)
and as registered methods (``stub``, as generated code). The application's throughput
of ``petsage-probe`` (probe listener and heartbeat on) against ``petsage-main`` (off) in
the same rounds is the A/B.

**Wedge.** The backend's handler blocks its loop in ``time.sleep`` for twice the stall
threshold, while ``liveness`` is probed on the probe listener every 100 ms: how long
until it reports NOT_SERVING, and how long after the loop runs again until SERVING.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from benchmarks.measure import (
    ROOT,
    Bench,
    free_port,
    idle_usage,
    med,
    percentile,
    ratio,
    rotated,
)
from benchmarks.probe_client import grpc_request, probe

KINDS: Final = ("petsage-main", "petsage-probe", "stock-aio")
APPS: Final = ("generic", "stub")
PYTHON: Final = sys.executable
PROBE_EVERY: Final = 0.1
P99_TARGET_MS: Final = 50.0
AB_TARGET: Final = 0.97
TIMES: Final = "\u00d7"
IDLE_SLACK_SECONDS: Final = 0.03  # three clock ticks, as the idle target of docs/benchmarks.md


@dataclass(frozen=True)
class BusyConfig:
    """How much of the two sections to run."""

    rounds: int = 2
    seconds: float = 20.0
    callers: int = 64
    work_ms: float = 20.0
    stall_seconds: float = 3.0
    """The stall threshold of the busy and wedge runs (above the busy loop's lag)."""
    wedge_rounds: int = 2


FULL: Final = BusyConfig()
SMOKE: Final = BusyConfig(rounds=1, seconds=1.0, callers=16, stall_seconds=1.0, wedge_rounds=1)


def _app_argv(kind: str, app: str, config: BusyConfig) -> list[str]:
    argv = [PYTHON, "-m", "benchmarks.busy_app", "--app", app, "--work-ms", str(config.work_ms)]
    argv += ["--stall-seconds", str(config.stall_seconds)]
    if kind == "stock-aio":
        return [*argv, "--health", "stock"]
    return [*argv, "--health", "petsage", *(["--probe-listener"] if kind.endswith("probe") else [])]


def _liveness_request(port: int) -> bytes:
    return grpc_request(
        "127.0.0.1", port, "/grpc.health.v1.Health/Check", b"\x0a\x08liveness", timeout="1000m"
    )


async def paced_probes(port: int, seconds: float) -> list[tuple[float, str, float]]:
    """Start a probe every 100 ms for *seconds*; return (start, outcome, ms) for each."""
    request = _liveness_request(port)
    results: list[tuple[float, str, float]] = []

    async def one(started: float) -> None:
        outcome, latency = await probe("127.0.0.1", port, request)
        results.append((started, outcome, latency))

    tasks = []
    begin = time.monotonic()
    for index in range(int(seconds / PROBE_EVERY)):
        await asyncio.sleep(max(0.0, begin + index * PROBE_EVERY - time.monotonic()))
        tasks.append(asyncio.create_task(one(time.monotonic())))
    await asyncio.gather(*tasks)
    return sorted(results)


def _start_app(bench: Bench, kind: str, app: str, config: BusyConfig) -> tuple[Any, int, int]:
    proc = bench.procs.start(
        f"busy-{kind}-{app}",
        _app_argv(kind, app, config),
        cpus=bench.server_cpus,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT)},
    )
    port = proc.port()
    probe_port = int(proc.line(proc.stderr, r"probe port (\d+)", 30).group(1))
    return proc, port, probe_port


def _stop_app(bench: Bench, proc: Any) -> dict[str, Any]:
    proc.popen.terminate()
    try:
        line = proc.line(proc.stdout, r"^\{.*\}$", 20).group(0)
    finally:
        bench.procs.stop(proc)
    figures: dict[str, Any] = json.loads(line)
    return figures


def busy_once(bench: Bench, kind: str, app: str, config: BusyConfig) -> dict[str, Any]:
    """One run: load the backend, probe it; the probes' outcomes and the app's throughput."""
    proc, port, probe_port = _start_app(bench, kind, app, config)
    load = bench.procs.start(
        "busy-load",
        [
            *(PYTHON, "-m", "benchmarks.busy", "load", "--port", str(port)),
            *("--callers", str(config.callers), "--seconds", str(config.seconds + 1.0)),
        ],
        cpus=bench.client_cpus,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT)},
    )
    try:
        load.line(load.stdout, r"^started$", 30)
        time.sleep(0.5)  # every caller has a call in flight
        probes = asyncio.run(paced_probes(probe_port, config.seconds))
        loaded = json.loads(load.line(load.stdout, r"^\{.*\}$", config.seconds + 30).group(0))
    finally:
        bench.procs.stop(load)
        figures = _stop_app(bench, proc)
    outcomes = Counter(outcome for _, outcome, _ in probes)
    latencies = [ms for _, outcome, ms in probes if outcome == "OK"]
    return {
        "probes": len(probes),
        "failed": len(probes) - outcomes["OK"],
        "outcomes": dict(outcomes),
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies, default=float("nan")),
        "app_calls_per_second": loaded["calls"] / loaded["seconds"],
        "app_errors": loaded["errors"],
        **{f"heartbeat_{key}": value for key, value in figures.items()},
    }


def measure_busy(bench: Bench, config: BusyConfig) -> dict[str, Any]:
    """Every kind with both kinds of application, rounds rotating the kinds."""
    rounds: list[dict[str, Any]] = []
    for index in range(config.rounds):
        this_round: dict[str, Any] = {}
        for app in APPS:
            for kind in rotated(KINDS, index):
                label = f"{kind}/{app}"
                print(f"  busy backend round {index + 1}: {label}", file=sys.stderr, flush=True)
                with bench.attempt("busy_backend", kind=label, round=index + 1):
                    this_round[label] = busy_once(bench, kind, app, config)
        rounds.append(this_round)
    summary: dict[str, Any] = {}
    for app in APPS:
        for kind in KINDS:
            runs = [r[f"{kind}/{app}"] for r in rounds if f"{kind}/{app}" in r]
            summary[f"{kind}/{app}"] = {
                "probes": sum(r["probes"] for r in runs),
                "failed": sum(r["failed"] for r in runs),
                "not_serving": sum(r["outcomes"].get("not SERVING", 0) for r in runs),
                "p50_ms": med([r["p50_ms"] for r in runs]),
                "p99_ms": max((r["p99_ms"] for r in runs), default=float("nan")),
                "app_calls_per_second": med([r["app_calls_per_second"] for r in runs]),
            }
        # The A/B: the application's throughput with the probe listener and heartbeat on
        # (petsage-probe) against off (petsage-main), per round, then the median.
        pairs = [
            ratio(
                r[f"petsage-probe/{app}"]["app_calls_per_second"],
                r[f"petsage-main/{app}"]["app_calls_per_second"],
            )
            for r in rounds
            if f"petsage-probe/{app}" in r and f"petsage-main/{app}" in r
        ]
        summary[f"petsage-probe/{app}"]["throughput_ratio_to_main"] = med(pairs)
    return {"config": vars(config) | {}, "rounds": rounds, "summary": summary}


def wedge_once(bench: Bench, config: BusyConfig) -> dict[str, Any]:
    """Block the loop for twice the stall threshold while probing liveness on the probe port."""
    proc, port, probe_port = _start_app(bench, "petsage-probe", "generic", config)
    block_seconds = 2 * config.stall_seconds
    try:
        probes, sent, replied = asyncio.run(_wedge(port, probe_port, block_seconds))
    finally:
        figures = _stop_app(bench, proc)
    # A probe's answer is as of when it was answered: started + latency.
    answers = [(start + ms / 1000, outcome) for start, outcome, ms in probes]
    not_serving = [t for t, outcome in answers if outcome == "not SERVING"]
    first_down = min(not_serving, default=float("nan"))
    back = [t for t, outcome in answers if outcome == "OK" and t > replied]
    return {
        "stall_seconds": config.stall_seconds,
        "blocked_seconds": block_seconds,
        "not_serving_after_s": first_down - sent,
        "serving_again_after_s": min(back, default=float("nan")) - replied,
        "failed_probes": sum(1 for _, outcome in answers if outcome not in {"OK", "not SERVING"}),
        "probes": len(answers),
        **{f"heartbeat_{key}": value for key, value in figures.items()},
    }


async def _wedge(
    port: int, probe_port: int, block_seconds: float
) -> tuple[list[tuple[float, str, float]], float, float]:
    import grpc  # noqa: PLC0415

    probing = asyncio.create_task(paced_probes(probe_port, block_seconds + 4.0))
    await asyncio.sleep(1.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        block: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/petsage.bench.v1.Busy/Block"
        )
        sent = time.monotonic()
        await block(str(block_seconds).encode(), timeout=block_seconds + 30)
        replied = time.monotonic()  # the loop has run again: it sent the reply
    return await probing, sent, replied


def measure_wedge(bench: Bench, config: BusyConfig) -> dict[str, Any]:
    """The wedge runs, and their worst figures; then the heartbeat's idle CPU."""
    runs = []
    for index in range(config.wedge_rounds):
        print(f"  wedge round {index + 1}", file=sys.stderr, flush=True)
        with bench.attempt("wedge", round=index + 1):
            runs.append(wedge_once(bench, config))
    worst = {
        key: max((r[key] for r in runs), default=float("nan"))
        for key in ("not_serving_after_s", "serving_again_after_s", "failed_probes")
    }
    idle: dict[str, Any] = {}
    with bench.attempt("wedge", step="idle"):
        idle = heartbeat_idle(bench)
    return {
        "runs": runs,
        "summary": worst | {"stall_seconds": config.stall_seconds},
        "idle": idle,
    }


def heartbeat_idle(bench: Bench) -> dict[str, Any]:
    """Idle CPU of ``serve --probe-port`` (probe listener and heartbeat) beside the stock server."""
    seconds = bench.config.idle_seconds
    stock, _ = bench.start_server("stock-aio")
    argv = [*bench.server_argv("petsage", free_port()), "--probe-port", str(free_port())]
    ours = bench.procs.start("petsage-probe", argv, cpus=bench.server_cpus, cwd=ROOT)
    try:
        ours.port()
        usage = idle_usage({"stock-aio": stock, "petsage --probe-port": ours}, seconds)
        used = {name: row["cpu_seconds"] for name, row in usage.items()}
    finally:
        bench.procs.stop(ours)
        bench.procs.stop(stock)
    return {"seconds": seconds, "cpu_seconds": used}


def targets(sections: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The issue's targets for these sections: (target, measured, met)."""
    out: list[tuple[str, str, bool | None]] = []
    summary = sections.get("busy_backend", {}).get("summary", {})
    for app in APPS:
        probe_row = summary.get(f"petsage-probe/{app}")
        main, stock = summary.get(f"petsage-main/{app}"), summary.get(f"stock-aio/{app}")
        if probe_row:
            out.append(
                (
                    f"busy backend ({app} app): probe listener 0 failed, p99 ≤ 50 ms",
                    f"{probe_row['failed']} failed, p99 {probe_row['p99_ms']:.1f} ms",
                    probe_row["failed"] == 0 and probe_row["p99_ms"] <= P99_TARGET_MS,
                )
            )
            out.append(
                (
                    f"busy backend ({app} app): no false NOT_SERVING on the probe listener",
                    f"{probe_row['not_serving']} NOT_SERVING",
                    probe_row["not_serving"] == 0,
                )
            )
            share = probe_row.get("throughput_ratio_to_main", float("nan"))
            out.append(
                (
                    f"busy backend ({app} app): app throughput with probe listener "
                    f"≥ {AB_TARGET}{TIMES} without",
                    f"{share:.3f}{TIMES}",
                    None if math.isnan(share) else share >= AB_TARGET,
                )
            )
        if main and stock:
            out.append(
                (
                    f"busy backend ({app} app): main port no worse than the stock servicer",
                    f"failed {main['failed']} vs {stock['failed']}; "
                    f"p99 {main['p99_ms']:.0f} vs {stock['p99_ms']:.0f} ms",
                    main["failed"] <= stock["failed"]
                    and not main["p99_ms"] > stock["p99_ms"] * 1.1,
                )
            )
    idle = sections.get("wedge", {}).get("idle")
    if idle:
        used = idle["cpu_seconds"]
        ours, stock = used["petsage --probe-port"], used["stock-aio"]
        out.append(
            (
                "idle CPU with --probe-port (heartbeat) ≤ the stock aio server's + 3 ticks",
                f"{ours:.2f} s vs {stock:.2f} s CPU in {idle['seconds']:g} s",
                ours <= stock + IDLE_SLACK_SECONDS,
            )
        )
    wedge = sections.get("wedge", {}).get("summary")
    if wedge:
        limit = wedge["stall_seconds"] + 1.0
        out.append(
            (
                f"wedge: liveness NOT_SERVING within threshold + 1 s ({limit:g} s)",
                f"{wedge['not_serving_after_s']:.2f} s",
                wedge["not_serving_after_s"] <= limit,
            )
        )
        out.append(
            (
                "wedge: SERVING again within 1 s of the loop running",
                f"{wedge['serving_again_after_s']:.2f} s",
                wedge["serving_again_after_s"] <= 1.0,
            )
        )
    return out


def tables(sections: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The two sections' tables, for the report."""
    out: list[tuple[str, list[str], list[list[str]]]] = []
    busy = sections.get("busy_backend")
    if busy:
        rows = [
            [
                label,
                f"{row['failed']} / {row['probes']}",
                str(row["not_serving"]),
                f"{row['p50_ms']:.1f}",
                f"{row['p99_ms']:.1f}",
                f"{row['app_calls_per_second']:.1f}",
                f"{row.get('throughput_ratio_to_main', float('nan')):.3f}",
            ]
            for label, row in busy["summary"].items()
        ]
        config = busy["config"]
        out.append(
            (
                f"Busy backend: {config['callers']} callers {TIMES} {config['work_ms']:g} ms CPU, "
                f"liveness probed every 100 ms (1 s deadline) for {config['seconds']:g} s",
                ["kind/app", "failed", "NOT_SERVING", "p50 ms", "p99 ms", "app calls/s", "A/B"],
                rows,
            )
        )
    wedge = sections.get("wedge")
    if wedge:
        out.append(
            (
                "Wedge: the loop blocked for twice the stall threshold",
                ["threshold s", "blocked s", "NOT_SERVING after s", "SERVING again after s"],
                [
                    [
                        f"{r['stall_seconds']:g}",
                        f"{r['blocked_seconds']:g}",
                        f"{r['not_serving_after_s']:.2f}",
                        f"{r['serving_again_after_s']:.2f}",
                    ]
                    for r in wedge["runs"]
                ],
            )
        )
    return out


async def _load(port: int, callers: int, seconds: float) -> dict[str, Any]:
    import grpc  # noqa: PLC0415

    calls = errors = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await channel.channel_ready()
        work: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/petsage.bench.v1.Busy/Work"
        )
        print("started", flush=True)
        started = time.monotonic()
        stop_at = started + seconds

        async def caller() -> None:
            nonlocal calls, errors
            for _ in range(1_000_000):  # bounded by time; the count is a backstop
                if time.monotonic() >= stop_at:
                    return
                try:
                    await work(b"x", timeout=30)
                    calls += 1
                except grpc.aio.AioRpcError:
                    errors += 1

        await asyncio.gather(*(caller() for _ in range(callers)))
    return {"calls": calls, "errors": errors, "seconds": time.monotonic() - started}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load client, or both sections alone."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.busy")
    parser.add_argument("mode", nargs="?", choices=("sections", "load"), default="sections")
    parser.add_argument("--port", type=int)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.mode == "load":
        print(json.dumps(asyncio.run(_load(args.port, args.callers, args.seconds))), flush=True)
        return 0
    from benchmarks.run import main as run  # noqa: PLC0415

    out = ROOT / ".tmp" / ("benchmark-busy-smoke" if args.smoke else "benchmark-busy")
    return run(
        ["--sections", "busy_backend", "wedge", "--out", str(out)]
        + (["--smoke"] if args.smoke else [])
    )


if __name__ == "__main__":
    sys.exit(main())
