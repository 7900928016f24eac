"""Benchmark petsage-grpc against its peers in one run and report ratios to baselines.

    python -m benchmarks.run            # full run (about 10 minutes): docs/benchmarks.*
    python -m benchmarks.run --smoke    # a few seconds per section, into .tmp/benchmark-smoke

``scripts/benchmark`` installs what this needs (h2load and nghttp from Debian's
nghttp2-client, the Node packages, matplotlib) and runs the full benchmark. Sections:
Check throughput on persistent connections (h2load), the kubelet model (a new connection
per probe), Check latency at a fixed rate with dependency checks that hang, Watch
fan-out, spawn to SERVING with idle RSS and CPU, the exec probe (one ``petsage-grpc
probe`` process against ``python -c pass``), and the status page (Check latency with 50
pages open, idle cost of --http-port). The exit code is 1 if any
measurement failed (the errors are listed in the JSON and the report), else 0; missed
targets do not change it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

from benchmarks import busy
from benchmarks.exec_probe import measure_exec_probe
from benchmarks.measure import (
    FULL,
    ROOT,
    SMOKE,
    Bench,
    config_dict,
    measure_check,
    measure_hang,
    measure_startup,
    measure_watch,
    measure_watch_grpcio,
)
from benchmarks.procs import Processes, cpu_sets
from benchmarks.report import evaluate_targets, markdown_table, tables, write_markdown, write_plot
from benchmarks.status_page import measure_status_page

SECTION_NAMES: Final = (
    "throughput",
    "kubelet",
    "hanging_dependency",
    "watch",
    "startup",
    "busy_backend",
    "wedge",
    "exec_probe",
    "status_page",
)
NOTES: Final = ROOT / "benchmarks" / "notes.md"
FULL_COMMAND: Final = "scripts/benchmark   # = .venv/bin/python -m benchmarks.run, after setting up"
SMOKE_COMMAND: Final = ".venv/bin/python -m benchmarks.run --smoke"


def _output(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if done.returncode != 0:
        return "unknown"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else ""


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _node_package(name: str) -> str:
    try:
        data = json.loads((ROOT / "node_modules" / name / "package.json").read_text())
    except (OSError, ValueError):
        return "not installed"
    return str(data.get("version", "unknown"))


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return "unknown"


def _revision() -> str:
    """The commit, whether petsage_grpc/ differs from it, and a digest of its sources."""
    head = _output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "petsage_grpc"])
    digest = hashlib.sha256()
    for path in sorted((ROOT / "petsage_grpc").rglob("*.py")):
        digest.update(path.read_bytes())
    changed = " + uncommitted changes" if dirty not in ("", "unknown") else ""
    return f"{head}{changed} (sources {digest.hexdigest()[:10]})"


def machine_info() -> dict[str, str]:
    """What the numbers were measured on."""
    servers, clients = cpu_sets()
    return {
        "CPU": _cpu_model(),
        "cores": f"{os.cpu_count()} (servers pinned to CPU {sorted(servers)}, clients to "
        f"CPU {sorted(clients)})",
        "memory": _memory(),
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "grpcio": _version("grpcio"),
        "grpcio-health-checking": _version("grpcio-health-checking"),
        "protobuf": _version("protobuf"),
        "Node.js": _output(["node", "--version"]),
        "@grpc/grpc-js": _node_package("@grpc/grpc-js"),
        "grpc-health-check (npm)": _node_package("grpc-health-check"),
        "h2load": _output(["h2load", "--version"]),
    }


def _missing_tools() -> list[str]:
    tools = ("h2load", "nghttp", "node", "taskset", "openssl")
    missing = [tool for tool in tools if not shutil.which(tool)]
    for package in ("@grpc/grpc-js", "grpc-health-check"):
        if not (ROOT / "node_modules" / package / "package.json").is_file():
            missing.append(f"node_modules/{package} (run npm ci)")
    try:
        import hpack  # noqa: F401, PLC0415
    except ImportError:
        missing.append("hpack (scripts/bootstrap --dev)")
    return missing


def _finite(data: Any) -> Any:
    """NaN and infinities as None, so the JSON is standard."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops every process


def _load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _measure(
    bench: Bench, wanted: Sequence[str], log: dict[str, str], *, smoke: bool
) -> dict[str, Any]:
    """Run the wanted sections; note the load average and duration of each in *log*."""
    sections: dict[str, Any] = {}
    busy_config = busy.SMOKE if smoke else busy.FULL
    steps: list[tuple[str, Callable[[], None]]] = []
    if {"throughput", "kubelet"} & set(wanted):
        steps.append(
            ("throughput and kubelet model", lambda: sections.update(measure_check(bench)))
        )
    if "hanging_dependency" in wanted:
        steps.append(
            ("hanging dependency", lambda: sections.update(hanging_dependency=measure_hang(bench)))
        )
    if "watch" in wanted:
        steps.append(("watch fan-out", lambda: sections.update(watch=measure_watch(bench))))
        steps.append(
            (
                "watch fan-out, grpcio clients",
                lambda: sections.update(watch_grpcio_client=measure_watch_grpcio(bench)),
            )
        )
    if "startup" in wanted:
        steps.append(("spawn and idle", lambda: sections.update(startup=measure_startup(bench))))
    if "busy_backend" in wanted:
        steps.append(
            (
                "busy backend",
                lambda: sections.update(busy_backend=busy.measure_busy(bench, busy_config)),
            )
        )
    if "wedge" in wanted:
        steps.append(
            ("wedge", lambda: sections.update(wedge=busy.measure_wedge(bench, busy_config)))
        )
    if "exec_probe" in wanted:

        def exec_probe() -> None:
            with bench.attempt("exec_probe"):
                sections.update(exec_probe=measure_exec_probe(bench))

        steps.append(("exec probe", exec_probe))
    if "status_page" in wanted:
        steps.append(
            (
                "status page",
                lambda: sections.update(status_page=measure_status_page(bench)),
            )
        )
    for name, step in steps:
        print(f"{name} (load average {_load_average()})", file=sys.stderr, flush=True)
        started = time.perf_counter()
        load = _load_average()
        step()
        log[name] = (
            f"{time.perf_counter() - started:.0f} s, load average {load} -> {_load_average()}"
        )
    return sections


def _write(results: dict[str, Any], out: Path, *, smoke: bool) -> bool:
    """Write the JSON, the plot and the markdown; return whether the plot was drawn."""
    (out / "benchmarks.json").write_text(json.dumps(results, indent=1) + "\n")
    plotted = write_plot(results, out / "benchmarks.png")
    notes = NOTES.read_text() if NOTES.is_file() and not smoke else ""
    write_markdown(results, out / "benchmarks.md", notes, "benchmarks.png" if plotted else None)
    return plotted


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="a few seconds per section")
    parser.add_argument("--out", type=Path, help="directory for benchmarks.{json,md,png}")
    parser.add_argument("--rounds", type=int, help="rounds of the Check, hang and Watch sections")
    parser.add_argument("--sections", nargs="+", choices=SECTION_NAMES, default=list(SECTION_NAMES))
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: rewrite the markdown and plot from this results file "
        "(after editing benchmarks/notes.md)",
    )
    return parser.parse_args(argv)


def _render(source: Path, out: Path) -> int:
    results = json.loads(source.read_text())
    smoke = results["meta"]["mode"] == "smoke"
    results["targets"] = evaluate_targets(results)
    _write(results, out, smoke=smoke)
    for table in tables(results):
        print(markdown_table(table) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write JSON, markdown and plot; print the tables."""
    args = _parse(argv)
    config = SMOKE if args.smoke else FULL
    if args.rounds:
        config = dataclasses.replace(config, rounds=args.rounds, watch_rounds=args.rounds)
    out: Path = args.out or (ROOT / (".tmp/benchmark-smoke" if args.smoke else "docs"))
    if args.render:
        out.mkdir(parents=True, exist_ok=True)
        return _render(args.render, out)
    missing = _missing_tools()
    if missing:
        print(f"benchmark: error: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    _, client_cpus = cpu_sets()
    os.sched_setaffinity(0, client_cpus)  # the orchestrator stays off the servers' CPU
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _on_signal)

    results: dict[str, Any] = {
        "meta": {
            "command": SMOKE_COMMAND if args.smoke else FULL_COMMAND,
            "mode": "smoke" if args.smoke else "full",
            "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "revision": _revision(),
            "machine": machine_info(),
            "config": config_dict(config),
            "sections": {},
        },
    }
    started = time.perf_counter()
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="petsage-bench-") as scratch:
        bench = Bench(config, procs, Path(scratch))
        try:
            results["sections"] = _measure(
                bench, args.sections, results["meta"]["sections"], smoke=args.smoke
            )
        finally:
            procs.stop_all()
            bench.close()
    results["errors"] = bench.errors
    results["meta"]["seconds"] = time.perf_counter() - started
    end_revision = _revision()
    if end_revision != results["meta"]["revision"]:
        # Someone changed petsage_grpc/ while it was measured: say so, loudly.
        results["meta"]["revision"] += f", changed during the run to {end_revision}"
        print(f"warning: petsage_grpc/ changed during the run ({end_revision})", file=sys.stderr)
    results["targets"] = evaluate_targets(results)
    results = _finite(results)
    plotted = _write(results, out, smoke=args.smoke)
    print()
    for table in tables(results):
        print(markdown_table(table) + "\n")
    if not plotted:
        print("plot skipped: matplotlib is not installed")
    for error in results["errors"]:
        print(f"error: {error}", file=sys.stderr)
    written = "benchmarks.json, benchmarks.md" + (", benchmarks.png" if plotted else "")
    print(f"wrote {written} to {out} in {results['meta']['seconds']:.0f} s")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
