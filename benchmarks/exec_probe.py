"""Section "exec probe": what one ``petsage-grpc probe`` process costs, as kubelet runs it.

Every round runs, one after the other in an order that rotates from round to round:
``python -c pass`` (the baseline: an interpreter that does nothing), the probe in
plaintext, the probe over TLS (verifying the server against a throwaway CA), and a
grpcio client making the same Check (the way the probe worked before). Each is one
child process of benchmarks/spawner.py, which measures its wall time from spawn to exit
and reads its CPU time (user + system) and peak RSS from the child's rusage (``wait4``).
Every command must answer SERVING (exit 0), or the round records an error.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Final

from benchmarks.measure import PETSAGE, PYTHON, ROOT, Bench, _summarise, interleaved

__all__ = ["COMMANDS", "measure_exec_probe"]

BASELINE: Final = "python -c pass"
COMMANDS: Final = (BASELINE, "probe", "probe TLS", "grpcio client")
METRICS: Final = {"wall_ms": "lower", "cpu_ms": "lower", "peak_rss_mib": "lower"}
_SERVER_NAME: Final = "petsage.bench"
_RUN_TIMEOUT: Final = 30.0


def _throwaway_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for _SERVER_NAME (its own CA) and its key."""
    cert, key = directory / "bench-tls.pem", directory / "bench-tls.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={_SERVER_NAME}",
            "-addext",
            f"subjectAltName=DNS:{_SERVER_NAME}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return cert, key


class _Spawner:
    """benchmarks/spawner.py: runs each command from a small process (see why there)."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [PYTHON, "-I", "-S", str(ROOT / "benchmarks" / "spawner.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )

    def run(self, argv: list[str]) -> dict[str, float]:
        """Run *argv* to completion; its wall time, CPU time and peak RSS."""
        assert self._process.stdin is not None  # noqa: S101 - Popen with PIPE
        assert self._process.stdout is not None  # noqa: S101
        self._process.stdin.write(json.dumps(argv) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()  # every command here has its own timeouts
        if not line:
            raise RuntimeError(f"the spawner exited {self._process.wait(_RUN_TIMEOUT)}")
        result = json.loads(line)
        if result["code"] != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result['code']}")
        return {
            "wall_ms": result["wall_s"] * 1000.0,
            "cpu_ms": result["cpu_s"] * 1000.0,
            "peak_rss_mib": result["maxrss_kib"] / 1024.0,  # KiB on Linux
        }

    def close(self) -> None:
        """End the spawner (it stops when its stdin ends)."""
        assert self._process.stdin is not None  # noqa: S101 - Popen with PIPE
        self._process.stdin.close()
        self._process.wait(_RUN_TIMEOUT)


def measure_exec_probe(bench: Bench) -> dict[str, Any]:
    """Per-run wall, CPU and peak RSS of each command, and ratios to ``python -c pass``."""
    cert, key = _throwaway_certificate(bench.scratch)
    plain, plain_port = bench.start_server("petsage")
    tls = bench.procs.start(
        "petsage-tls",
        [*bench.server_argv("petsage"), "--tls-cert", str(cert), "--tls-key", str(key)],
        cpus=bench.server_cpus,
        cwd=ROOT,
    )
    tls_port = tls.port()
    argv = {
        BASELINE: [PYTHON, "-c", "pass"],
        "probe": [PETSAGE, "probe", f"-addr=127.0.0.1:{plain_port}"],
        "probe TLS": [
            PETSAGE,
            "probe",
            f"-addr=127.0.0.1:{tls_port}",
            "-tls",
            f"-tls-ca-cert={cert}",
            f"-tls-server-name={_SERVER_NAME}",
        ],
        "grpcio client": [PYTHON, "-m", "benchmarks.grpcio_check", f"127.0.0.1:{plain_port}"],
    }
    spawner = _Spawner()
    try:
        for command in argv.values():  # warm the page cache and the servers once
            spawner.run(command)
        rounds = interleaved(
            bench,
            lambda name: spawner.run(argv[name]),
            COMMANDS,
            rounds=bench.config.exec_probe_rounds,
            label="exec_probe",
            key_name="command",
        )
    finally:
        spawner.close()
        bench.procs.stop(plain)
        bench.procs.stop(tls)
    section = _summarise(rounds, BASELINE, METRICS)
    section["tls_vs_plaintext"] = _summarise(rounds, "probe", METRICS)["summary"]["probe TLS"]
    return section
