"""Step 1 and 2: the soak itself, then the server's tasks and watchers back to baseline."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

from grpc_health.v1 import health_pb2

from petsage_grpc import READINESS
from petsage_grpc._generated.petsage.v1 import smoke_test_service_pb2
from soaklib.checkpoints import Checkpoints
from soaklib.common import (
    BASELINE_TIMEOUT,
    CHECK,
    CHECK_NAMES,
    CLIENT_GC,
    FLIPPER,
    KNOWN_NAMES,
    LIST,
    NOT_SERVING,
    REQUESTS,
    SERVING,
    SMOKE_TEST,
    STATUS_OF,
    STEP_TIMEOUT,
    UNKNOWN,
    Config,
    StepError,
    Tally,
)
from soaklib.load import (
    Conn,
    Judge,
    Outcome,
    Pool,
    UnaryLoad,
    call_unary,
    check_answer,
)
from soaklib.report import rounded, slope_per_minute
from soaklib.server import SoakServer
from soaklib.watchers import FlipWatch, WatchLoad


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
            "slope_kib_per_min": rounded(slope_per_minute(rss), 1),
            "slope_second_half_kib_per_min": rounded(slope_per_minute(half), 1),
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
            "server": rounded(
                None
                if server_cpu is None or server_cpu_start is None
                else server_cpu - server_cpu_start,
                1,
            ),
            "client": round(client_cpu, 1),
        },
    }
