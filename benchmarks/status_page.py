"""The status page's cost: Check latency with 50 pages open, and an idle server with --http-port.

Pages are simulated as the page's script behaves: one keep-alive connection each,
``GET /status.json`` every 0.5 s (benchmarks/page_pollers.py, on the client CPUs). Check
is paced by h2load at the hanging-dependency section's rate, with and without the pages,
in interleaved rounds; the ratio of p99s is taken within each round.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Final

from benchmarks.measure import (
    PYTHON,
    ROOT,
    Bench,
    _summarise,
    free_port,
    idle_usage,
    interleaved,
    paced_liveness_load,
    probe_once,
)
from benchmarks.procs import Proc

__all__ = ["NO_PAGE", "WITH_PAGES", "measure_status_page"]

PAGES: Final = 50
POLL_SECONDS: Final = 0.5
"""The page's own pace (status-page.js)."""
NO_PAGE: Final = "no status page open"
WITH_PAGES: Final = f"{PAGES} status pages open"
HTTP: Final = "petsage-grpc --http-port"
HTTP_CHECK: Final = "petsage-grpc --http-port + a check every second"
_ENV: Final = {"PYTHONPATH": str(ROOT)}


def _start(bench: Bench, *, http_port: int | None, config: str | None) -> tuple[Proc, int]:
    argv = bench.server_argv("petsage", 0, config)
    if http_port is not None:
        argv += ["--http-port", str(http_port)]
    proc = bench.procs.start("petsage", argv, cpus=bench.server_cpus, cwd=ROOT, env=_ENV)
    port = proc.port()
    deadline = time.monotonic() + 30
    while (outcome := probe_once(port)) != "OK":
        if time.monotonic() > deadline:
            raise RuntimeError(proc.describe(f"did not answer SERVING: {outcome}"))
        time.sleep(0.05)
    return proc, port


def _paced_with_pages(bench: Bench, key: str) -> dict[str, Any]:
    http_port = free_port()
    proc, port = _start(bench, http_port=http_port, config="python-ok")
    pollers: Proc | None = None
    polled = {"polls": 0, "failures": 0, "seconds": math.nan}
    try:
        if key == WITH_PAGES:
            argv = [PYTHON, "-m", "benchmarks.page_pollers", "--port", str(http_port)]
            argv += ["--pages", str(PAGES), "--interval", str(POLL_SECONDS)]
            pollers = bench.procs.start(
                "page pollers", argv, cpus=bench.client_cpus, cwd=ROOT, env=_ENV, stdin=True
            )
            pollers.line(pollers.stdout, r"^polling", 30)
            time.sleep(2 * POLL_SECONDS)  # every page has polled
        log = bench.scratch / f"pages-{time.monotonic_ns()}.log"
        paced = paced_liveness_load(bench, proc, port, log)
        if pollers is not None:
            pollers.send("stop")
            polled = json.loads(pollers.line(pollers.stdout, r"^\{.*\}$", 30).group(0))
    finally:
        if pollers is not None:
            bench.procs.stop(pollers)
        bench.procs.stop(proc)
    if polled["failures"]:
        raise RuntimeError(f"status.json polls failed: {polled}")
    del paced["requests"]
    return {
        **paced,
        "polls_per_second": polled["polls"] / polled["seconds"] if polled["polls"] else 0.0,
    }


def _idle(bench: Bench) -> dict[str, Any]:
    """petsage-grpc without and with --http-port, side by side and untouched."""
    seconds = bench.config.idle_seconds
    servers = {
        "petsage": _start(bench, http_port=None, config=None)[0],
        HTTP: _start(bench, http_port=free_port(), config=None)[0],
        HTTP_CHECK: _start(bench, http_port=free_port(), config="python-ok")[0],
    }
    try:
        result = idle_usage(servers, seconds)
    finally:
        for proc in servers.values():
            bench.procs.stop(proc)
    return {"seconds": seconds, "servers": result}


def measure_status_page(bench: Bench) -> dict[str, Any]:
    """Check latency with and without open status pages; idle cost of --http-port."""
    rounds = interleaved(
        bench,
        lambda key: _paced_with_pages(bench, key),
        (NO_PAGE, WITH_PAGES),
        rounds=bench.config.rounds,
        label="status_page",
        key_name="pages",
    )
    pages = _summarise(
        rounds,
        NO_PAGE,
        {
            "p50_ms": "lower",
            "p99_ms": "lower",
            "max_ms": "lower",
            "rps": "info",
            "server_cpu_util": "lower",
            "polls_per_second": "info",
        },
    )
    idle: dict[str, Any] = {}
    with bench.attempt("status_page idle"):
        idle = _idle(bench)
    return {"pages": pages, "idle": idle}
