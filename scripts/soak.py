"""Soak and drain-under-load test of petsage_grpc embedded in a grpc.aio server.

Usage (from the repository root)::

    .venv/bin/python scripts/soak.py                          # 10 minutes, 1000 watchers
    .venv/bin/python scripts/soak.py --minutes 3 --json soak.json
    .venv/bin/python scripts/soak.py --seconds 30 --watchers 300

It starts ``scripts/soak_server.py`` (a grpc.aio server with ``SERVER_OPTIONS`` and
``add_to_server`` on 127.0.0.1, whose ``soak.flipper`` name flips between SERVING and
NOT_SERVING every 50 ms) as a child process and, from this one asyncio process over
several channels (one connection each), loopback only:

1. **Soak** for the given time: Check at ``--check-rate`` (500/s) over every kind of name
   (known, flipping, unknown), List and SmokeTest at a low rate; ``--watchers`` Watch
   slots, each connecting, staying a random 1-5 s and leaving, again and again (names:
   ``readiness``, ``""``, ``liveness``, ``startup``, ``soak.flipper``, an unknown name);
   ``--steady-watchers`` Watch streams on ``soak.flipper`` for the whole run; one
   channel closed abruptly (cancelling its calls) and replaced every
   ``--recycle-seconds``. Every second it samples the server's RSS (VmRSS in
   ``/proc/PID/status``) and the task and watcher counts the server prints. Every
   ``--checkpoint-seconds`` the flipper is paused, every flipper watcher must converge
   on the board's status, and the flipper resumes.
2. **Back to baseline**: once the load has stopped and every channel is closed, the
   server's ``asyncio.all_tasks()`` count and ``board.watcher_count`` must return to
   what they were before the load.
3. **Drain under load**: ``--watchers`` new Watch streams (nine in ten on ``readiness``,
   the rest on ``liveness``) and unary load again; one second into it, SIGTERM. Every
   readiness watcher must receive NOT_SERVING within 100 ms of ``os.kill`` (measured
   here), liveness watchers nothing; every stream must end with OK; every unary call
   started before the signal or during the drain must complete (Check answers, the
   smoke test may answer its own UNAVAILABLE once not serving), calls started after
   the server stopped may fail only with UNAVAILABLE; the server must exit 0. (A call
   that reaches the server just after its shutdown began is CANCELLED by grpc core,
   grpc/grpc#41785, with or without petsage_grpc: such calls are counted and reported
   as ``after_shutdown_cancelled``, and fail the run only with
   ``--strict-shutdown-codes``.)

**Lost transitions.** The Watch protocol allows latest-wins coalescing: a watcher that
falls behind may skip a NOT_SERVING/SERVING pair, so fewer transitions than flips is
not a loss (it is counted as ``coalesced``). A transition counts as **lost** when

- a Watch stream repeats a status (two messages in a row with the same status: an odd
  number of flips between them was not delivered), or
- at a checkpoint or at the end (flipper paused), a connected flipper watcher has not
  received the board's status within 5 s, or
- over the exact window between two checkpoints, a steady watcher's transitions and the
  flips made differ in parity.

A watcher that receives more transitions than flips can have happened while it was
connected (flips are at least 50 ms apart) counts as an error (``phantom``).

Exit status: 0 when everything held; 1 on any error, lost transition, task or watcher
count not back to baseline, or failed drain (each listed); 2 on bad arguments. Every
loop is bounded in count and in time. Rates are modest on purpose: the verdict is about
correctness, not speed; throughput is reported, not judged.

The parts, in ``scripts/soaklib/``: ``common`` (RPCs, names, bounds, the configuration,
the tally), ``server`` (the child process), ``load`` (channels and unary load),
``watchers`` (Watch slots), ``checkpoints``, ``soak_phase`` (steps 1 and 2), ``drain``
(step 3) and ``report`` (figures and the summary). This file holds the flags and the run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soaklib.common import (
    CLIENT_GC,
    DRAIN_NOTICE_LIMIT,
    EXIT_FAILED,
    EXIT_OK,
    SERVER_SCRIPT,
    Config,
    StepError,
    Tally,
)
from soaklib.drain import drain_under_load
from soaklib.report import summary
from soaklib.server import SoakServer
from soaklib.soak_phase import soak


def parse_args(argv: Sequence[str] | None) -> tuple[Config, Path | None]:
    parser = argparse.ArgumentParser(
        prog="scripts/soak.py",
        description="Soak and drain-under-load test of petsage_grpc (loopback only).",
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="soak duration (10)")
    parser.add_argument(
        "--seconds", type=float, help="soak duration in seconds; wins over --minutes"
    )
    parser.add_argument("--watchers", type=int, default=1000, help="Watch slots (1000)")
    parser.add_argument("--check-rate", type=float, default=500.0, help="Check calls/s (500)")
    parser.add_argument("--list-rate", type=float, default=5.0, help="List calls/s (5)")
    parser.add_argument("--smoke-rate", type=float, default=5.0, help="SmokeTest calls/s (5)")
    parser.add_argument("--channels", type=int, default=8, help="client channels (8)")
    parser.add_argument(
        "--flipper-share", type=float, default=0.05, help="share of slots on soak.flipper (0.05)"
    )
    parser.add_argument(
        "--steady-watchers", type=int, default=8, help="whole-run soak.flipper watchers (8)"
    )
    parser.add_argument("--checkpoint-seconds", type=float, default=10.0, help="(10)")
    parser.add_argument("--recycle-seconds", type=float, default=10.0, help="(10)")
    parser.add_argument("--flip-ms", type=float, default=50.0, help="flipper period (50)")
    parser.add_argument(
        "--flip-thread",
        action="store_true",
        help="the server flips from another thread (the board's cross-thread wake path)",
    )
    parser.add_argument("--drain-seconds", type=float, default=2.0, help="server drain (2)")
    parser.add_argument("--grace-seconds", type=float, default=2.0, help="server grace (2)")
    parser.add_argument("--max-in-flight", type=int, default=256, help="unary calls (256)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (1)")
    parser.add_argument(
        "--strict-shutdown-codes",
        action="store_true",
        help="a call started after the server stopped must fail with UNAVAILABLE, "
        "not CANCELLED (grpc/grpc#41785 makes that fail today)",
    )
    parser.add_argument(
        "--notice-limit-ms",
        type=float,
        default=DRAIN_NOTICE_LIMIT * 1000,
        help="readiness watchers must see NOT_SERVING within this long of SIGTERM "
        f"({DRAIN_NOTICE_LIMIT * 1000:.0f}, the product's rule)",
    )
    parser.add_argument(
        "--server-script",
        type=Path,
        default=SERVER_SCRIPT,
        help="the server to soak (default scripts/soak_server.py); another one only to "
        "check that the soak catches a deliberately broken server",
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the report here")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    problems = []
    if not 1 <= seconds <= 24 * 3600:
        problems.append("the duration must be between 1 s and 24 h")
    if not 1 <= args.watchers <= 20_000:
        problems.append("--watchers must be between 1 and 20000")
    if not 1 <= args.channels <= 64 or args.watchers > args.channels * 900:
        problems.append("--channels must be 1-64, with at most 900 watchers per channel")
    if not 0 <= args.flipper_share <= 1:
        problems.append("--flipper-share must be between 0 and 1")
    if min(args.check_rate, args.list_rate, args.smoke_rate) < 0:
        problems.append("rates must not be negative")
    if args.flip_ms < 10 or args.drain_seconds < 1 or args.grace_seconds < 0:
        problems.append("--flip-ms must be >= 10, --drain-seconds >= 1, --grace-seconds >= 0")
    if args.checkpoint_seconds < 1 or args.recycle_seconds < 1 or args.steady_watchers < 0:
        problems.append("--checkpoint-seconds and --recycle-seconds must be >= 1")
    if args.max_in_flight < 1:
        problems.append("--max-in-flight must be >= 1")
    if problems:
        parser.error("; ".join(problems))
    config = Config(
        seconds=seconds,
        watchers=args.watchers,
        check_rate=args.check_rate,
        list_rate=args.list_rate,
        smoke_rate=args.smoke_rate,
        channels=args.channels,
        flipper_share=args.flipper_share,
        steady_watchers=args.steady_watchers,
        checkpoint_seconds=args.checkpoint_seconds,
        recycle_seconds=args.recycle_seconds,
        flip_seconds=args.flip_ms / 1000,
        drain_seconds=args.drain_seconds,
        grace_seconds=args.grace_seconds,
        max_in_flight=args.max_in_flight,
        seed=args.seed,
        strict_shutdown_codes=args.strict_shutdown_codes,
        notice_limit=args.notice_limit_ms / 1000,
        flip_thread=args.flip_thread,
        server_script=args.server_script,
    )
    return config, args.json


# -- main --------------------------------------------------------------------------


async def run(config: Config) -> dict[str, Any]:
    tally = Tally()
    report: dict[str, Any] = {
        "config": {**dataclasses.asdict(config), "server_script": str(config.server_script)},
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
    }
    failures: list[str] = []
    try:
        server = await SoakServer.start(config)
    except StepError as error:
        errors = {"count": 0, "by_kind": {}, "samples": []}
        return {
            **report,
            "errors": errors,
            "lost_transitions": 0,
            "failures": [str(error)],
            "ok": False,
        }
    report["server_pid"] = server.pid
    try:
        report["soak"] = await soak(server, config, tally)
        if not report["soak"]["baseline_restored"]:
            failures.append("tasks or watchers not back to baseline")
        if server.process.returncode is not None:
            raise StepError(f"the server exited during the soak ({server.process.returncode})")
        report["drain"] = await drain_under_load(server, config, tally)
        if not report["drain"]["ok"]:
            failures.append("drain failed")
    except StepError as error:
        failures.append(f"step failed: {error}")
    finally:
        await server.close()
    lost = sum(tally.lost.values())
    if lost:
        failures.append(f"{lost} lost transition(s)")
    if tally.errors:
        failures.append(f"{tally.errors} error(s)")
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["errors"] = {
        "count": tally.errors,
        "by_kind": dict(tally.error_kinds),
        "samples": tally.error_samples,
    }
    report["lost_transitions"] = lost
    report["server_events"] = server.events[-10:]
    if failures:
        report["server_stderr_tail"] = list(server.stderr_tail)
    report["failures"] = failures
    report["ok"] = not failures
    return report


def main(argv: Sequence[str] | None = None) -> int:
    config, out = parse_args(argv)
    gc.callbacks.append(CLIENT_GC)
    report = asyncio.run(run(config))
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    return EXIT_OK if report["ok"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
