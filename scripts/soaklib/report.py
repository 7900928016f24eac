"""Figures and the report: percentiles, slopes, pauses in a window, the printed summary."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any


def overlapping(pauses: Sequence[Sequence[float]], start: float, end: float) -> list[float]:
    """The pauses (end time, ms) that overlap the window [start, end]."""
    return [ms for stop, ms in pauses if stop >= start and stop - ms / 1000 <= end]


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {
        "count": len(ordered),
        "min": ordered[0],
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": ordered[-1],
    }


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 3:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return sxy / sxx * 60


def rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def ms_after(at: float | None, start: float) -> float | None:
    return None if at is None else round((at - start) * 1000, 3)


def summary(report: dict[str, Any]) -> str:
    lines = [f"soak: {'PASSED' if report['ok'] else 'FAILED'}"]
    soaked = report.get("soak")
    if soaked:
        rss = soaked["rss_kib"]
        lines += [
            f"  load: {soaked['load_seconds']} s, Check {soaked['check_rate_achieved']}/s, "
            f"calls {json.dumps(soaked['calls'])}",
            f"  watches: {soaked['watches']['opened']} opened, "
            f"{soaked['watches']['messages']} messages, "
            f"left {json.dumps(soaked['watches']['left'])}",
            f"  flipper: {json.dumps(soaked['flipper'])}",
            f"  rss KiB: start {rss['start']} peak {rss['peak']} end {rss['end']}, "
            f"slope {rss['slope_kib_per_min']} KiB/min "
            f"(second half {rss['slope_second_half_kib_per_min']})",
            f"  tasks {json.dumps(soaked['tasks'])}, watchers {json.dumps(soaked['watchers'])}, "
            f"baseline restored: {soaked['baseline_restored']}, cpu s {soaked['cpu_seconds']}",
        ]
    drained = report.get("drain")
    if drained:
        lines += [
            f"  drain: ok={drained['ok']} "
            f"notice ms {json.dumps(drained['signal_to_not_serving_ms'])}",
            f"         streams ended OK {drained['streams_ended_ok']}/{drained['streams_total']}, "
            f"exit {drained['exit_code']} after {drained['exit_after_signal_s']} s",
            f"         unary {json.dumps(drained['unary_by_phase'])}",
            f"         calls started after shutdown and CANCELLED (grpc/grpc#41785): "
            f"{drained['after_shutdown_cancelled']}; signal to server handler "
            f"{drained['signal_to_server_handler_ms']} ms, board draining "
            f"{drained['server_board_draining_ms']} ms; full GC pauses in the window "
            f"{json.dumps(drained['gc2_pauses_ms_in_window'])}",
        ]
    lines.append(
        f"  errors: {report['errors']['count']}, lost transitions: {report['lost_transitions']}"
    )
    lines += [f"    {sample}" for sample in report["errors"]["samples"][:10]]
    lines += [f"  FAILURE: {failure}" for failure in report["failures"]]
    return "\n".join(lines)
