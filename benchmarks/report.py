"""Turning the measurements into targets, tables, ``docs/benchmarks.md`` and a plot."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from benchmarks.busy import tables as busy_tables
from benchmarks.busy import targets as busy_targets
from benchmarks.measure import LABELS, med, ratio
from benchmarks.status_page import HTTP, WITH_PAGES

Table = tuple[str, list[str], list[list[str]]]
WATCH_TARGET_STREAMS: Final = 10_000
WATCH_TARGET_P99_MS: Final = 250.0
IDLE_RSS_TARGET_MIB: Final = 40.0
DASH: Final = "\u2013"  # shown for a missing value
TIMES: Final = "\u00d7"  # after a ratio
IDLE_CPU_SLACK_SECONDS: Final = 0.03  # three clock ticks over the window
WATCHED: Final = "petsage-embedded"


def fmt(value: Any, digits: int = 2) -> str:
    """A number for a table: fixed digits, thousands separators, a dash when missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def fmt_ratio(value: float) -> str:
    """A ratio as 1.23 and a multiplication sign."""
    return DASH if not math.isfinite(value) else f"{value:.2f}{TIMES}"


def pair_ratio(section: dict[str, Any], peer: str, other: str, metric: str) -> float:
    """Median over rounds of peer's metric / other's metric, within each round."""
    return med(
        [
            ratio(r[peer][metric], r[other][metric])
            for r in section.get("rounds", [])
            if peer in r and other in r
        ]
    )


def _get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue, its measured value and whether it was met."""
    sections = results["sections"]
    targets: list[dict[str, Any]] = []

    def add(name: str, shown: str, met: bool | None) -> None:
        targets.append({"target": name, "measured": shown, "met": met})

    def check(value: float, good: bool) -> bool | None:
        return None if not math.isfinite(value) else good

    throughput = _get(sections, "throughput") or {}
    floor = _num(_get(throughput, "summary", "petsage", "rps_ratio"))
    add(
        f"Check throughput ≥ 1.00{TIMES} the bare grpcio floor",
        fmt_ratio(floor),
        check(floor, floor >= 1.0),
    )
    for other in ("stock-aio", "stock-sync"):
        value = pair_ratio(throughput, "petsage", other, "rps")
        add(
            f"Check throughput ahead of {LABELS[other]}",
            fmt_ratio(value),
            check(value, value > 1.0),
        )
    kubelet = _get(sections, "kubelet") or {}
    value = pair_ratio(kubelet, "petsage", "grpc-js", "probes_per_second")
    add("kubelet model probes/s ≥ grpc-js", fmt_ratio(value), check(value, value >= 1.0))
    hang = _get(sections, "hanging_dependency") or {}
    for config in ("python-hang", "http-blackhole"):
        value = _num(_get(hang, "summary", config, "p99_ms_ratio"))
        add(
            f"Check p99 with a hanging dependency ({config}) ≤ 1.1{TIMES} without",
            fmt_ratio(value),
            check(value, value <= 1.1),
        )
    watch = _get(sections, "watch") or {}
    if watch:
        size = max(watch, key=int)
        section = watch[size]
        rounds = [r[WATCHED] for r in section["rounds"] if WATCHED in r]
        worst = min((min(r["opened"], r["held"], r["delivered"]) for r in rounds), default=0)
        add(
            f"{int(size):,}/{int(size):,} Watch streams opened, held and reached (worst round)",
            f"{worst:,}/{int(size):,}",
            bool(rounds) and worst == int(size),
        )
        value = _num(_get(section, "summary", WATCHED, "p99_ms_ratio"))
        add(
            f"Change reaches all {int(size):,} streams with p99 ≤ the bare handler's",
            fmt_ratio(value),
            check(value, value <= 1.0),
        )
        absolute = _num(_get(section, "summary", WATCHED, "p99_ms"))
        add(
            f"… and p99 ≤ {WATCH_TARGET_P99_MS:g} ms",
            f"{fmt(absolute)} ms",
            check(absolute, absolute <= WATCH_TARGET_P99_MS),
        )
        value = _num(_get(section, "summary", WATCHED, "kib_per_stream_ratio"))
        add(
            "Memory per Watch stream ≤ the bare handler's",
            fmt_ratio(value),
            check(value, value <= 1.0),
        )
    spawn = _num(
        _get(sections, "startup", "spawn", "summary", "petsage", "spawn_to_serving_ms_ratio")
    )
    add(
        f"spawn → SERVING ≤ 1.2{TIMES} the stock aio server's",
        fmt_ratio(spawn),
        check(spawn, spawn <= 1.2),
    )
    idle = _get(sections, "startup", "idle", "servers") or {}
    rss = _num(_get(idle, "petsage", "rss_mib"))
    add(
        f"idle RSS ≤ {IDLE_RSS_TARGET_MIB:g} MiB",
        f"{fmt(rss, 1)} MiB",
        check(rss, rss <= IDLE_RSS_TARGET_MIB),
    )
    ours, stock = (
        _num(_get(idle, "petsage", "cpu_seconds")),
        _num(_get(idle, "stock-aio", "cpu_seconds")),
    )
    seconds = _num(_get(sections, "startup", "idle", "seconds"))
    add(
        "no idle CPU beyond configured checks (≤ the stock aio server's + 3 ticks)",
        f"{fmt(ours, 2)} s vs {fmt(stock, 2)} s CPU in {fmt(seconds, 0)} s",
        check(ours + stock, ours <= stock + IDLE_CPU_SLACK_SECONDS),
    )
    for name, shown, met in busy_targets(sections):
        add(name, shown, met)
    _exec_probe_targets(_get(sections, "exec_probe") or {}, add, check)
    _status_page_targets(sections, add, check)
    return targets


EXEC_PROBE_CPU_RATIO: Final = 4.0
EXEC_PROBE_WALL_RATIO: Final = 4.5
EXEC_PROBE_RSS_MIB: Final = 20.0
EXEC_PROBE_TLS_RATIO: Final = 1.3


def _exec_probe_targets(
    section: dict[str, Any],
    add: Callable[[str, str, bool | None], None],
    check: Callable[[float, bool], bool | None],
) -> None:
    summary = section.get("summary", {})
    for metric, limit, what in (
        ("cpu_ms", EXEC_PROBE_CPU_RATIO, "CPU"),
        ("wall_ms", EXEC_PROBE_WALL_RATIO, "wall time"),
    ):
        value = _num(_get(summary, "probe", f"{metric}_ratio"))
        add(
            f"exec probe {what} ≤ {limit:g}{TIMES} `python -c pass` (plaintext)",
            fmt_ratio(value),
            check(value, value <= limit),
        )
    for name, what in (("probe", "plaintext"), ("probe TLS", "TLS")):
        rss = _num(_get(summary, name, "peak_rss_mib"))
        add(
            f"exec probe peak RSS ≤ {EXEC_PROBE_RSS_MIB:g} MiB ({what})",
            f"{fmt(rss, 1)} MiB",
            check(rss, rss <= EXEC_PROBE_RSS_MIB),
        )
    tls = section.get("tls_vs_plaintext", {})
    worst = max(_num(tls.get("wall_ms_ratio")), _num(tls.get("cpu_ms_ratio")))
    add(
        f"exec probe over TLS ≤ {EXEC_PROBE_TLS_RATIO:g}{TIMES} plaintext (wall and CPU)",
        fmt_ratio(worst),
        check(worst, worst <= EXEC_PROBE_TLS_RATIO),
    )


def _status_page_targets(
    sections: dict[str, Any],
    add: Callable[[str, str, bool | None], None],
    check: Callable[[float, bool], bool | None],
) -> None:
    page = _get(sections, "status_page") or {}
    if not page:
        return
    value = _num(_get(page, "pages", "summary", WITH_PAGES, "p99_ms_ratio"))
    add(
        f"Check p99 with {WITH_PAGES} ≤ 1.1{TIMES} without",
        fmt_ratio(value),
        check(value, value <= 1.1),
    )
    idle = _get(page, "idle", "servers") or {}
    rss = _num(_get(idle, HTTP, "rss_mib"))
    add(
        f"idle RSS with --http-port ≤ {IDLE_RSS_TARGET_MIB:g} MiB",
        f"{fmt(rss, 1)} MiB",
        check(rss, rss <= IDLE_RSS_TARGET_MIB),
    )
    ours, plain = _num(_get(idle, HTTP, "cpu_seconds")), _num(_get(idle, "petsage", "cpu_seconds"))
    seconds = _num(_get(page, "idle", "seconds"))
    add(
        "no idle CPU with --http-port beyond petsage-grpc's without (+ 3 ticks)",
        f"{fmt(ours, 2)} s vs {fmt(plain, 2)} s CPU in {fmt(seconds, 0)} s",
        check(ours + plain, ours <= plain + IDLE_CPU_SLACK_SECONDS),
    )


def _peer_table(
    title: str, section: dict[str, Any], columns: Sequence[tuple[str, str, int]], ratio_of: str
) -> Table:
    header = ["peer", *(name for name, _, _ in columns), f"{ratio_of} vs baseline"]
    rows = []
    for peer, row in section.get("summary", {}).items():
        cells = [LABELS.get(peer, peer)]
        cells += [fmt(row.get(metric), digits) for _, metric, digits in columns]
        cells.append(fmt_ratio(_num(row.get(f"{ratio_of}_ratio"))))
        rows.append(cells)
    baseline = LABELS.get(section.get("baseline", ""), section.get("baseline", ""))
    return f"{title} (baseline: {baseline})", header, rows


def tables(results: dict[str, Any]) -> list[Table]:
    """Every results table, in report order."""
    sections = results["sections"]
    out: list[Table] = []
    targets = results.get("targets", [])
    out.append(
        (
            "Targets",
            ["target", "measured", "met"],
            [
                [
                    t["target"],
                    t["measured"],
                    DASH if t["met"] is None else ("met" if t["met"] else "MISSED"),
                ]
                for t in targets
            ],
        )
    )
    check = sections
    if "throughput" in check:
        out.append(
            _peer_table(
                "Check throughput, persistent connections (h2load)",
                check["throughput"],
                [
                    ("req/s", "rps", 0),
                    ("req per server CPU-s", "requests_per_cpu_second", 0),
                    ("server CPU", "server_cpu_util", 2),
                ],
                "rps",
            )
        )
    if "kubelet" in check:
        out.append(
            _peer_table(
                "Kubelet model, a new connection per probe",
                check["kubelet"],
                [
                    ("probes/s", "probes_per_second", 0),
                    ("p50 ms", "p50_ms", 2),
                    ("p99 ms", "p99_ms", 2),
                    ("server CPU", "server_cpu_util", 2),
                    ("client CPU", "client_cpu_util", 2),
                ],
                "probes_per_second",
            )
        )
    if "hanging_dependency" in sections:
        out.append(
            _peer_table(
                "petsage-grpc Check latency at a fixed rate, dependency checks that hang",
                sections["hanging_dependency"],
                [
                    ("req/s", "rps", 0),
                    ("p50 ms", "p50_ms", 2),
                    ("p99 ms", "p99_ms", 2),
                    ("max ms", "max_ms", 2),
                ],
                "p99_ms",
            )
        )
    for size, section in sections.get("watch", {}).items():
        out.append(
            _peer_table(
                f"Watch fan-out, {int(size):,} streams",
                section,
                [
                    ("opened", "opened", 0),
                    ("held", "held", 0),
                    ("reached", "delivered", 0),
                    ("open s", "open_seconds", 2),
                    ("p50 ms", "p50_ms", 1),
                    ("p99 ms", "p99_ms", 1),
                    ("max ms", "max_ms", 1),
                    ("RSS MiB", "rss_after_mib", 1),
                    ("KiB/stream", "kib_per_stream", 2),
                    ("server CPU s", "fanout_cpu_seconds", 2),
                ],
                "p99_ms",
            )
        )
        errors = {
            peer: r[peer]["open_errors"]
            for r in section.get("rounds", [])
            for peer in r
            if r[peer].get("open_errors")
        }
        if errors:
            rows = [
                [LABELS.get(p, p), ", ".join(f"{k}: {v}" for k, v in e.items())]
                for p, e in errors.items()
            ]
            out.append(
                (
                    f"Watch streams that failed to open, {int(size):,} (last round)",
                    ["peer", "errors"],
                    rows,
                )
            )
    crosscheck = sections.get("watch_grpcio_client")
    if crosscheck and crosscheck.get("summary"):
        out.append(
            _peer_table(
                f"Watch fan-out, {int(crosscheck['streams']):,} streams, grpcio aio clients "
                "instead of the raw client (cross-check)",
                crosscheck,
                [
                    ("opened", "opened", 0),
                    ("reached", "delivered", 0),
                    ("p50 ms", "p50_ms", 1),
                    ("p99 ms", "p99_ms", 1),
                    ("server CPU s", "fanout_cpu_seconds", 2),
                    ("client CPU s", "client_cpu_seconds", 2),
                ],
                "p99_ms",
            )
        )
    spawn = _get(sections, "startup", "spawn")
    if spawn:
        out.append(
            _peer_table(
                "Spawn → first SERVING answer",
                spawn,
                [("ms", "spawn_to_serving_ms", 0), ("RSS 1 s later, MiB", "rss_mib", 1)],
                "spawn_to_serving_ms",
            )
        )
    idle = _get(sections, "startup", "idle")
    if idle:
        rows = [
            [
                LABELS.get(name, name),
                fmt(v["cpu_seconds"], 2),
                fmt(v["cpu_percent"], 3),
                fmt(v["rss_mib"], 1),
                fmt(v["threads"]),
            ]
            for name, v in idle["servers"].items()
        ]
        out.append(
            (
                f"Idle for {fmt(idle['seconds'], 0)} s",
                ["server", "CPU s", "CPU %", "RSS MiB", "threads"],
                rows,
            )
        )
    out.extend(busy_tables(sections))
    exec_probe = _get(sections, "exec_probe")
    if exec_probe:
        table = _peer_table(
            "Exec probe, one process per Check (median of "
            f"{len(exec_probe.get('rounds', []))} alternating runs)",
            exec_probe,
            [
                ("wall ms", "wall_ms", 1),
                ("CPU ms", "cpu_ms", 1),
                ("peak RSS MiB", "peak_rss_mib", 1),
            ],
            "cpu_ms",
        )
        title, header, rows = table
        header.insert(-1, "wall_ms vs baseline")
        for row, name in zip(rows, exec_probe["summary"], strict=True):
            row.insert(-1, fmt_ratio(_num(exec_probe["summary"][name].get("wall_ms_ratio"))))
        out.append((title, header, rows))
    page = _get(sections, "status_page")
    if page:
        out.append(
            _peer_table(
                "Check latency at a fixed rate, with status pages polling status.json",
                page["pages"],
                [
                    ("req/s", "rps", 0),
                    ("p50 ms", "p50_ms", 2),
                    ("p99 ms", "p99_ms", 2),
                    ("max ms", "max_ms", 2),
                    ("server CPU", "server_cpu_util", 2),
                    ("polls/s", "polls_per_second", 0),
                ],
                "p99_ms",
            )
        )
        idle = page.get("idle")
        if idle:
            rows = [
                [name, fmt(v["cpu_seconds"], 2), fmt(v["rss_mib"], 1), fmt(v["threads"])]
                for name, v in idle["servers"].items()
            ]
            out.append(
                (
                    f"Idle with --http-port for {fmt(idle['seconds'], 0)} s",
                    ["server", "CPU s", "RSS MiB", "threads"],
                    rows,
                )
            )
    return out


def markdown_table(table: Table) -> str:
    """One table as GitHub markdown, with its title in bold above it."""
    title, header, rows = table
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine_table(meta: dict[str, Any]) -> str:
    """The machine and versions as a markdown table."""
    rows = [[name, str(value)] for name, value in meta["machine"].items()]
    return markdown_table(("Machine", ["", ""], rows)).split("\n", 2)[2]


def write_markdown(results: dict[str, Any], path: Path, notes: str, plot: str | None) -> None:
    """Write docs/benchmarks.md: how it was run, on what, the results and the notes."""
    meta = results["meta"]
    parts = [
        "# Benchmarks",
        "",
        "How petsage-grpc compares with the other health servers a Python or Node backend",
        "would run, measured on one machine in one run. Every figure that matters is a **ratio**",
        "against a baseline measured in the same run (peers interleaved, the order rotating",
        "between rounds, the ratio taken within each round, then the median over rounds),",
        "because the machine is shared and absolute numbers move from run to run.",
        "",
        "Reproduce with:",
        "",
        "```sh",
        meta["command"],
        "```",
        "",
        f"This run: {meta['started']}, {meta['mode']} mode, {fmt(meta['seconds'], 0)} s, "
        f"petsage-grpc at `{meta['revision']}`.",
        "",
        machine_table(meta),
        "",
        "Time and load average (1, 5, 15 min; other work shares this machine) per section:",
        "",
        *(f"- {name}: {note}" for name, note in meta.get("sections", {}).items()),
        "",
        "## Results",
        "",
    ]
    parts += [markdown_table(t) + "\n" for t in tables(results)]
    if plot:
        parts += [f"![ratios against each section's baseline]({plot})", ""]
    if results.get("errors"):
        parts += ["**Errors in this run**", ""]
        parts += [f"- `{e}`" for e in results["errors"]]
        parts.append("")
    parts.append(notes.strip())
    path.write_text("\n".join(parts) + "\n")


Panel = tuple[str, dict[str, float], float | None]


def _ratios(
    section: dict[str, Any] | None, metric: str, notes: dict[str, str] | None = None
) -> dict[str, float]:
    summary = (section or {}).get("summary", {})
    return {
        LABELS.get(p, p) + (notes or {}).get(p, ""): _num(row.get(f"{metric}_ratio"))
        for p, row in summary.items()
    }


def _panels(sections: dict[str, Any]) -> list[Panel]:
    """(title, ratio per peer, target line) for each chart."""
    panels: list[Panel] = [
        (
            "Check req/s, persistent connections\nvs bare grpcio (higher is better)",
            _ratios(sections.get("throughput"), "rps"),
            1.0,
        ),
        (
            "kubelet model probes/s\nvs bare grpcio (higher is better)",
            _ratios(sections.get("kubelet"), "probes_per_second"),
            None,
        ),
        (
            "kubelet model p99 latency\nvs bare grpcio (lower is better)",
            _ratios(sections.get("kubelet"), "p99_ms"),
            None,
        ),
        (
            "petsage-grpc Check p99 at a fixed rate\nvs no dependency check (lower is better)",
            _ratios(sections.get("hanging_dependency"), "p99_ms"),
            1.1,
        ),
    ]
    watch = sections.get("watch", {})
    if watch:
        size = max(watch, key=int)
        section = watch[size]
        notes = {
            peer: f"\n(only {fmt(row['opened'], 0)} opened)"
            for peer, row in section.get("summary", {}).items()
            if isinstance(row.get("opened"), int | float) and row["opened"] < int(size)
        }
        panels.append(
            (
                f"Watch, {int(size):,} streams: one change, p99\nvs bare handler (lower is better)",
                _ratios(section, "p99_ms", notes),
                1.0,
            )
        )
        panels.append(
            (
                f"Watch, {int(size):,} streams: memory per stream\nvs bare handler "
                "(lower is better)",
                _ratios(section, "kib_per_stream", notes),
                1.0,
            )
        )
    spawn = _get(sections, "startup", "spawn")
    panels.append(
        (
            "spawn \u2192 first SERVING answer\nvs stock aio (lower is better)",
            _ratios(spawn, "spawn_to_serving_ms"),
            1.2,
        )
    )
    idle = _get(sections, "startup", "idle", "servers") or {}
    stock = _num(_get(idle, "stock-aio", "rss_mib"))
    if idle and math.isfinite(stock):
        panels.append(
            (
                "idle RSS\nvs stock aio (lower is better; red: 40 MiB)",
                {
                    LABELS.get(name, name): ratio(_num(v.get("rss_mib")), stock)
                    for name, v in idle.items()
                },
                IDLE_RSS_TARGET_MIB / stock,
            )
        )
    return panels


def write_plot(results: dict[str, Any], path: Path) -> bool:
    """Bar charts of the ratios (needs matplotlib); False when matplotlib is missing."""
    try:
        import matplotlib as mpl  # noqa: PLC0415

        mpl.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    panels = _panels(results["sections"])
    columns = 3
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.6 * columns, 3.2 * rows))
    flat = list(axes.flat)
    for axis, (title, values, line) in zip(flat, panels, strict=False):
        names = list(values)
        heights = [v if math.isfinite(v) else 0.0 for v in values.values()]
        colours = ["tab:orange" if "petsage" in n else "tab:blue" for n in names]
        axis.barh(names, heights, color=colours)
        for y, h in enumerate(heights):
            axis.text(h, y, f" {h:.2f}{TIMES}", va="center", fontsize=8)
        axis.axvline(1.0, color="grey", linewidth=0.8)
        if line is not None and line != 1.0:
            axis.axvline(line, color="red", linestyle="--", linewidth=0.8)
        axis.set_title(title, fontsize=9)
        axis.tick_params(labelsize=8)
        axis.invert_yaxis()
        axis.set_xlim(0, max([*heights, 1.2]) * 1.25)
    for axis in flat[len(panels) :]:
        axis.axis("off")
    figure.suptitle("petsage-grpc vs peers: ratios within one run (median of rounds)", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
