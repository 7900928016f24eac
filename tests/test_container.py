"""One server in its container: the budget from the cgroup, the same path for serve() and
the command line, a start without /proc, grpc core's start-up lines in the server's log."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Final

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from conftest import ROOT, ServerProcess, load_script
from hardening import wait_until
from prometheus_client.parser import text_string_to_metric_families
from tcp_listener import free_port

from petsage_grpc import derive_bounds, server_options
from petsage_grpc.server._budget import MemoryBudget
from petsage_grpc.server._cgroup import container_memory_limit

START_TIMEOUT: Final = 60.0
_BUDGET_LINE: Final = re.compile(r"memory budget (\d+) MiB, (.*?): (\d+) Watch streams \((\d+) per")


memcg = load_script("memcg")
_NO_CGROUP = memcg.unavailable_reason()


class Served:
    """A ``petsage-grpc serve`` child process and what it has written to stderr."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            argv,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        assert self.process.stderr is not None
        self.lines: list[str] = []
        threading.Thread(target=self._pump, args=(self.process.stderr,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str) -> None:
        wait_until(
            lambda: text in self.log() or self.process.poll() is not None,
            f"{text!r} in the log",
            timeout=START_TIMEOUT,
        )
        assert text in self.log(), self.log()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@contextmanager
def served(argv: Sequence[str], *, env: dict[str, str] | None = None) -> Iterator[Served]:
    running = Served(argv, env=env)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait(30)


def _serve_argv(port: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "petsage_grpc",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--drain-seconds",
        "0.1",
        "--grace-seconds",
        "0.1",
        *args,
    ]


def _metric(http_port: int, name: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[json.dumps(sample.labels, sort_keys=True)] = sample.value
    return found


def _server_settings(port: int) -> dict[int, int]:
    """The HTTP/2 SETTINGS the server sends a new connection (what grpc core enforces)."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(connection.data_to_send())
        while True:
            data = sock.recv(65_536)
            assert data, "connection closed before SETTINGS"
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    return {int(k): v.new_value for k, v in event.changed_settings.items()}


def _probe(port: int) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "petsage_grpc", "probe", f"-addr=127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=ROOT,
    )
    return done.stdout + done.stderr


# -- the container's limit, read from the cgroup ------------------------------------------


def _fake_proc(tmp_path: Path, cgroup: str, mountinfo: str) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text(mountinfo)
    return proc


def test_cgroup_v2_memory_max_of_the_own_cgroup_and_its_parents(tmp_path: Path) -> None:
    """v2: the unified mount, the process's path under it, the smallest limit up to it."""
    unified = tmp_path / "unified"
    (unified / "kubepods" / "pod1" / "c1").mkdir(parents=True)
    (unified / "kubepods" / "pod1" / "memory.max").write_text(f"{512 * 2**20}\n")
    (unified / "kubepods" / "pod1" / "c1" / "memory.max").write_text("max\n")
    proc = _fake_proc(
        tmp_path,
        "0::/kubepods/pod1/c1\n",
        f"30 23 0:26 / {unified} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
    )
    limit = container_memory_limit(proc)
    assert limit is not None
    assert limit.limit_bytes == 512 * 2**20
    assert limit.source == "cgroup v2 memory.max"


def test_cgroup_v2_in_a_cgroup_namespace_sees_its_own_cgroup_as_the_root(tmp_path: Path) -> None:
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "memory.max").write_text(f"{64 * 2**20}\n")
    proc = _fake_proc(tmp_path, "0::/\n", f"30 23 0:26 / {unified} rw - cgroup2 cgroup2 rw\n")
    limit = container_memory_limit(proc)
    assert limit is not None
    assert limit.limit_bytes == 64 * 2**20


def test_cgroup_v1_with_the_mount_rooted_at_the_container(tmp_path: Path) -> None:
    """v1 as Docker mounts it: the mount's root is the container's cgroup."""
    memory = tmp_path / "memory"
    memory.mkdir()
    (memory / "memory.limit_in_bytes").write_text(f"{256 * 2**20}\n")
    proc = _fake_proc(
        tmp_path,
        "4:memory:/docker/abc\n0::/\n",
        f"35 31 0:32 /docker/abc {memory} rw - cgroup cgroup rw,memory\n",
    )
    limit = container_memory_limit(proc)
    assert limit is not None
    assert limit.limit_bytes == 256 * 2**20
    assert limit.source == "cgroup v1 memory.limit_in_bytes"


def test_no_limit_unlimited_or_above_the_machine_is_none(tmp_path: Path) -> None:
    memory = tmp_path / "memory"
    (memory / "process_api" / "x").mkdir(parents=True)
    (memory / "process_api" / "x" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (memory / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    proc = _fake_proc(
        tmp_path,
        "4:memory:/process_api/x\n",
        f"35 31 0:32 / {memory} rw - cgroup cgroup rw,memory\n",
    )
    assert container_memory_limit(proc) is None
    assert container_memory_limit(tmp_path / "absent") is None


def test_small_budgets_scale_and_too_small_is_one_line() -> None:
    small = derive_bounds(64)
    assert small.max_watch_streams == 204  # 8 MiB spare: 7/8 of 64 kept for the server
    assert small.max_streams_per_connection == 120
    assert derive_bounds(128).max_watch_streams == 1_638  # unchanged from 74 MiB up
    with pytest.raises(ValueError, match=r"^memory budget must be at least 48 MiB, not 40$"):
        derive_bounds(40)
    budget = MemoryBudget(32, "container", "cgroup v1 memory.limit_in_bytes")
    with pytest.raises(ValueError, match=r"not 32 \(the container's limit"):
        derive_bounds(budget)


@pytest.mark.skipif(_NO_CGROUP is not None, reason=str(_NO_CGROUP))
@pytest.mark.parametrize("limit_mib", [64, 256, 512])
def test_the_budget_and_its_caps_follow_the_cgroup_limit(limit_mib: int) -> None:
    expected = derive_bounds(limit_mib)
    port, http_port = free_port(), free_port()
    with memcg.memory_cgroup(limit_mib * 2**20, prefix="petsage-pod") as cgroup:
        argv = cgroup.wrap(_serve_argv(port, "--http-port", str(http_port)))
        with served(argv) as server:
            server.wait_for("serving on")
            server.wait_for("memory budget")
            match = _BUDGET_LINE.search(server.log())
            assert match is not None, server.log()
            assert int(match[1]) == limit_mib
            assert match[2] == "the container's limit (cgroup v1 memory.limit_in_bytes)" or (
                cgroup.version == 2 and "memory.max" in match[2]
            )
            assert (int(match[3]), int(match[4])) == (
                expected.max_watch_streams,
                expected.max_watch_streams_per_connection,
            )
            # What grpc core itself enforces: streams per connection from the budget.
            settings = _server_settings(port)
            assert (
                settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS]
                == expected.max_streams_per_connection
            )
            budget = _metric(http_port, "petsage_grpc_memory_budget_bytes")
            assert budget == {'{"source": "container"}': limit_mib * 2**20}
            assert "SERVING" in _probe(port)
            assert server.stop() == 0
        assert cgroup.oom_kills() == 0


def test_the_flag_wins_over_the_container_and_the_environment() -> None:
    port = free_port()
    env = {"PETSAGE_GRPC_MEMORY_BUDGET": "512Mi"}
    with served(_serve_argv(port, "--memory-budget", "256"), env=env) as server:
        server.wait_for("memory budget")
        assert "memory budget 256 MiB, as configured" in server.log()
        assert server.stop() == 0


@pytest.mark.slow
@pytest.mark.skipif(_NO_CGROUP is not None, reason=str(_NO_CGROUP))
def test_ten_thousand_watch_streams_inside_512_mib_without_an_oom_kill() -> None:
    port = free_port()
    with memcg.memory_cgroup(512 * 2**20, prefix="petsage-pod") as cgroup:
        with served(cgroup.wrap(_serve_argv(port))) as server:
            server.wait_for("memory budget 512 MiB, the container's limit")
            clients = [
                subprocess.Popen(
                    [
                        *(sys.executable, "-m", "benchmarks.watch_client"),
                        *("--port", str(port), "--streams", "2500", "--channels", "5"),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                )
                for _ in range(4)
            ]
            try:
                opened = []
                for client in clients:
                    assert client.stdout is not None
                    opened.append(json.loads(client.stdout.readline()))
                assert sum(report["opened"] for report in opened) == 10_000, opened
                held = []
                for client in clients:
                    assert client.stdin is not None
                    assert client.stdout is not None
                    client.stdin.write("held\n")
                    client.stdin.flush()
                    held.append(json.loads(client.stdout.readline()))
                assert sum(report["alive"] for report in held) == 10_000, held
                assert "SERVING" in _probe(port)
            finally:
                for client in clients:
                    client.kill()
                    client.wait(30)
            assert server.stop() == 0
        assert cgroup.oom_kills() == 0
        print(f"10,000 Watch streams in 512 MiB: {cgroup.verdict()}")


# -- one path for serve() and the command line ----------------------------------------------

_SERVE_IN_PYTHON: Final = textwrap.dedent(
    """
    import asyncio, sys
    from petsage_grpc import ServeOptions, serve
    from petsage_grpc.server._logging import configure_logging

    configure_logging(level="debug", fmt="text")
    asyncio.run(serve(ServeOptions(host="127.0.0.1", port=int(sys.argv[1]),
                                   drain_seconds=0.1, grace_seconds=0.1)))
    """
)


def _start_up_lines(log: str) -> list[str]:
    keep = ("grpc options:", "memory budget", "process set-up:")
    found = [line.split(": ", 1)[1] for line in log.splitlines() if any(k in line for k in keep)]
    return sorted(found)


def test_serve_with_default_options_and_the_command_line_are_one_server() -> None:
    cli_port, api_port = free_port(), free_port()
    with (
        served(_serve_argv(cli_port, "--log-level", "debug")) as cli,
        served([sys.executable, "-c", _SERVE_IN_PYTHON, str(api_port)]) as api,
    ):
        for running in (cli, api):
            running.wait_for("serving on")
            running.wait_for("process set-up")
        assert len(_start_up_lines(cli.log())) == 3, cli.log()
        assert _start_up_lines(cli.log()) == _start_up_lines(api.log())
        assert _server_settings(cli_port) == _server_settings(api_port)
        for running in (cli, api):
            assert running.stop() == 0
    # ... and what an embedder gets from the public function is what both run with.
    options = dict(server_options(derive_bounds()))
    assert f"grpc.max_concurrent_streams={options['grpc.max_concurrent_streams']}" in cli.log()


def test_the_connection_shedder_can_be_switched_off() -> None:
    port, http_port = free_port(), free_port()
    argv = _serve_argv(port, "--http-port", str(http_port), "--shed-connections", "false")
    with served(argv) as server:
        server.wait_for("connection shedder off, as configured")
        assert _metric(http_port, "petsage_grpc_connections_closed_total") == {}
        assert server.stop() == 0


# -- starts anywhere -------------------------------------------------------------------------


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)
def test_the_server_starts_answers_and_stops_with_proc_hidden() -> None:
    """A private mount namespace with a tmpfs over /proc: as on a machine without /proc."""
    port = free_port()
    command = " ".join(_serve_argv(port))
    argv = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs none /proc && exec {command}"]
    with served(argv) as server:
        server.wait_for("serving on")
        server.wait_for("defences off on this platform")
        assert "memory watermark and connection shedder (no /proc)" in server.log()
        assert server.log().count("defences off") == 1
        assert "SERVING" in _probe(port)
        assert server.stop() == 0
    assert "Traceback" not in server.log()
    assert "stopped" in server.log()


# -- grpc core's own lines ---------------------------------------------------------------------

_GRPC_SAYS: Final = textwrap.dedent(
    """
    import os, grpc
    from petsage_grpc.server._logging import configure_logging
    from petsage_grpc.server._process import NativeStderr

    configure_logging(level="info", fmt="json")
    native = NativeStderr(keep_after_start=False)
    native.capture()
    try:
        grpc.server(None).add_insecure_port("256.0.0.1:1")  # grpc core logs why
    except RuntimeError:
        pass
    native.release()
    os.write(2, b"a line written after start-up\\n")
    native.restore()
    """
)


def test_grpc_core_start_up_lines_are_logged_in_the_format_and_later_ones_are_not() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _GRPC_SAYS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    messages = [e["message"] for e in entries if e.get("event") == "grpc_core"]
    assert any(m.startswith("grpc core: Failed to add port to server") for m in messages), entries
    assert all(".cc:" not in m for m in messages)  # absl's prefix (file:line) is left out
    assert "a line written after start-up" not in done.stderr


def test_a_crash_after_start_up_still_reaches_the_real_stderr(
    spawn_server: Callable[..., ServerProcess],
) -> None:
    server = spawn_server()
    server.signal(signal.SIGSEGV)
    assert server.wait() == -signal.SIGSEGV
    wait_until(
        lambda: "Fatal Python error: Segmentation fault" in server.log(), "the dump", timeout=30
    )
    assert "Current thread" in server.log() or "Thread 0x" in server.log()


# -- memory given back off the loop -----------------------------------------------------------

_PEAK_THEN_TRIM: Final = textwrap.dedent(
    """
    import asyncio, json, threading
    from petsage_grpc.server import _guard
    from petsage_grpc.server._guard import MemoryGuard, rss_bytes

    trims = []
    real = _guard._malloc_trim()

    def recording():
        trims.append((threading.current_thread().name, rss_bytes() >> 20))
        return real()

    _guard._malloc_trim = lambda: recording  # the real trim, and where it ran

    async def main():
        guard = MemoryGuard(budget_mib=4096, watermark_mib=4000, release_mib=3000)
        guard.start()
        await asyncio.sleep(1.5)
        # 200 MiB from malloc (2 KiB objects), one in 64 kept: glibc keeps the rest.
        blocks = [bytes(2048) for _ in range(100_000)]
        kept = blocks[::64]
        del blocks
        peak = rss_bytes() >> 20
        for _ in range(100):
            await asyncio.sleep(0.1)
            if trims and rss_bytes() >> 20 < peak // 2:
                break
        await guard.stop()
        print(json.dumps({"peak": peak, "after": rss_bytes() >> 20, "trims": trims,
                          "loop": threading.current_thread().name, "kept": len(kept)}))

    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_memory_is_given_back_on_a_thread_once_the_peak_has_passed() -> None:
    if not Path("/proc/self/statm").exists():
        pytest.skip("needs /proc")
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_THEN_TRIM],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["trims"], report
    assert {name for name, _ in report["trims"]} == {"petsage-trim"}  # never the loop's
    assert report["after"] < report["peak"] // 2, report
    print(f"RSS {report['peak']} MiB at the peak, {report['after']} MiB after: {report['trims']}")
