"""``petsage-grpc status --discover``: a fleet behind real DNS, followed over Watch.

dnsmasq on a loopback port answers for a test name with the addresses of real replicas
(``petsage-grpc serve`` on 127.0.0.2, 127.0.0.3, ... on one port); the tests rewrite its
hosts file and reload it to add and remove replicas. Each replica has a ``tcp`` check
against a listener of its own; closing it fails that replica's dependency.
"""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Final

import pytest
from fleet_harness import NAME, ROOT, Dnsmasq, Replica, port_free_on, start_replica
from tcp_listener import TcpListener, free_port
from test_tls import SERVER_EXTENSIONS, _issue, _make_ca

from petsage_grpc.fleet._discovery import DiscoveryError, Target, parse_target

WAIT: Final = 30.0
TOKEN: Final = "petsage-fleet-token-51c7"  # noqa: S105 - a test token


def check_config(directory: Path, host: str, target: str) -> Path:
    path = directory / f"replica-{host}.toml"
    path.write_text(
        '[[checks]]\nname = "db"\nkind = "tcp"\n'
        f'target = "{target}"\ninterval = "100ms"\ntimeout = "500ms"\nfailure_threshold = 1\n',
        encoding="utf-8",
    )
    return path


class Fleet:
    """Replicas on 127.0.0.N:port, each with a db listener, and dnsmasq answering for them."""

    def __init__(self, directory: Path, dns: Dnsmasq) -> None:
        self.directory, self.dns = directory, dns
        self.port = port_free_on([f"127.0.0.{n}" for n in range(2, 6)])
        self.replicas: dict[str, Replica] = {}
        self.listeners: dict[str, TcpListener] = {}

    def start(self, host: str, *args: str) -> Replica:
        listener = self.listeners[host] = TcpListener()
        config = check_config(self.directory, host, listener.address)
        replica = start_replica(host, self.port, "--config", str(config), *args)
        self.replicas[host] = replica
        return replica

    def address(self, host: str) -> str:
        return f"{host}:{self.port}"

    @property
    def target(self) -> str:
        return f"dns://127.0.0.1:{self.dns.port}/{NAME}:{self.port}"

    def close(self) -> None:
        for replica in self.replicas.values():
            replica.kill()
        for listener in self.listeners.values():
            listener.close()


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[Dnsmasq]:
    with Dnsmasq(tmp_path) as running:
        yield running


@pytest.fixture
def fleet(tmp_path: Path, dns: Dnsmasq) -> Iterator[Fleet]:
    running = Fleet(tmp_path, dns)
    yield running
    running.close()


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "petsage_grpc", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        check=False,
    )


def table(stdout: str) -> dict[str, dict[str, str]]:
    """The fleet table: replica -> column -> cell."""
    lines = stdout.splitlines()
    header = lines[0].split()
    assert header[:2] == ["REPLICA", "STATE"], stdout
    header = [*header[:-2], "SMOKE"]  # "SMOKE TEST" is one column
    rows = {}
    for line in lines[1:]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return rows


class Follower:
    """``status --discover ... --watch --json``: its first document, then each event."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "petsage_grpc", "status", "--watch", "--json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        assert self.process.stdout is not None
        threading.Thread(target=self._pump, args=(self.process.stdout,), daemon=True).start()
        self.first: dict[str, Any] = json.loads(self.lines.get(timeout=WAIT))

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)

    def expect(self, what: str, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first event (since the last one returned) that *match*es; fail after WAIT."""
        deadline = time.monotonic() + WAIT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no event {what} within {WAIT:g}s; seen: {self.seen}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            event: dict[str, Any] = json.loads(line)
            self.seen.append(event)
            if match(event):
                return event

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(30)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return code


def event(kind: str, replica: str, **fields: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (
        e["event"] == kind
        and e["replica"] == replica
        and all(e.get(k) == v for k, v in fields.items())
    )


@pytest.mark.slow  # dnsmasq and several servers
def test_table_of_every_replica_behind_the_name(fleet: Fleet) -> None:
    for host in ("127.0.0.2", "127.0.0.3"):
        fleet.start(host)
    fleet.dns.set_hosts(["127.0.0.2", "127.0.0.3"])
    ran = status("--discover", fleet.target, "--token-file", "/dev/null")
    assert ran.returncode == 1  # an empty token file is refused in one line
    assert len(ran.stderr.splitlines()) == 1, ran.stderr
    ran = status("--discover", fleet.target)
    assert ran.returncode == 0, ran
    rows = table(ran.stdout)
    assert set(rows) == {fleet.address("127.0.0.2"), fleet.address("127.0.0.3")}
    for row in rows.values():
        assert row["STATE"] == "up"
        assert row["check.db"] == row["readiness"] == row['""'] == "SERVING"
        assert row["SMOKE"] == "ok"
    # The second replica's dependency fails: its rows, and only its, turn NOT_SERVING.
    fleet.listeners["127.0.0.3"].close()
    deadline = time.monotonic() + WAIT
    while True:
        ran = status("--discover", fleet.target)
        rows = table(ran.stdout)
        if rows[fleet.address("127.0.0.3")]["check.db"] == "NOT_SERVING":
            break
        assert time.monotonic() < deadline, ran.stdout
    assert ran.returncode == 4
    failing = rows[fleet.address("127.0.0.3")]
    assert failing["readiness"] == failing['""'] == "NOT_SERVING"
    assert failing["liveness"] == "SERVING"
    assert failing["STATE"] == "up"  # not draining: its dependency failed
    assert failing["SMOKE"] == "UNAVAILABLE"
    assert rows[fleet.address("127.0.0.2")]["readiness"] == "SERVING"


@pytest.mark.slow  # dnsmasq and several servers
def test_transitions_replicas_added_draining_and_gone(fleet: Fleet) -> None:
    fleet.start("127.0.0.2", "--drain-seconds", "2")
    fleet.start("127.0.0.3")
    fleet.dns.set_hosts(["127.0.0.2", "127.0.0.3"])
    follower = Follower("--discover", fleet.target, "--resolve-every", "500ms")
    try:
        replicas = {r["address"]: r for r in follower.first["replicas"]}
        assert set(replicas) == {fleet.address("127.0.0.2"), fleet.address("127.0.0.3")}
        assert all(r["names"]["check.db"] == "SERVING" for r in replicas.values())
        three, two = fleet.address("127.0.0.3"), fleet.address("127.0.0.2")

        # A dependency fails on one replica: its transitions, prefixed by the replica.
        fleet.listeners["127.0.0.3"].close()
        follower.expect("db fails", event("transition", three, service="check.db"))
        follower.expect(
            "readiness on .3", event("transition", three, service="readiness", to="NOT_SERVING")
        )

        # A replica is added to DNS: followed without a restart.
        fleet.start("127.0.0.4")
        fleet.dns.set_hosts(["127.0.0.2", "127.0.0.3", "127.0.0.4"])
        four = fleet.address("127.0.0.4")
        follower.expect("the new replica", event("appeared", four))

        # A replica stops: first draining, then gone, then out of DNS.
        fleet.replicas["127.0.0.2"].stop()
        follower.expect(
            "readiness on .2", event("transition", two, service="readiness", to="NOT_SERVING")
        )
        follower.expect("draining", event("draining", two))
        follower.expect("lost", event("lost", two))
        fleet.dns.set_hosts(["127.0.0.3", "127.0.0.4"])
        follower.expect("removed", event("removed", two))
        assert not any(e["event"] == "draining" and e["replica"] == three for e in follower.seen)
    finally:
        code = follower.stop()
    assert code == 4  # the last states: .3's dependency is down

    # The table now: .2 gone, .3 failing, .4 serving.
    rows = table(status("--discover", fleet.target).stdout)
    assert set(rows) == {three, four}
    assert rows[three]["check.db"] == "NOT_SERVING"
    assert rows[four]["check.db"] == rows[four]["readiness"] == "SERVING"


@pytest.mark.slow  # dnsmasq and several servers
def test_a_plain_list_the_token_and_a_replica_that_does_not_answer(
    fleet: Fleet, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN, encoding="utf-8")
    fleet.start("127.0.0.2", "--auth-token-file", str(token_file))
    silent = f"127.0.0.5:{free_port()}"
    targets = ["--discover", fleet.address("127.0.0.2"), "--discover", silent, "--timeout", "1s"]
    # Without the token List is refused: the five standard names, no check.
    ran = status(*targets, "--json")
    assert ran.returncode == 4, ran
    replicas = {r["address"]: r for r in json.loads(ran.stdout)["replicas"]}
    followed = replicas[fleet.address("127.0.0.2")]
    assert followed["names_hidden"] is True
    assert set(followed["names"]) == {
        "",
        "liveness",
        "readiness",
        "startup",
        "petsage.v1.SmokeTestService",
    }
    assert followed["checks"] is None
    assert replicas[silent]["state"] == "unreachable"
    # With it: every name and the check.
    ran = status(*targets, "--json", "--token-file", str(token_file))
    followed = {r["address"]: r for r in json.loads(ran.stdout)["replicas"]}[
        fleet.address("127.0.0.2")
    ]
    assert followed["names"]["check.db"] == "SERVING"
    assert followed["checks"] == {"db": True}
    assert followed["smoke_test"]["checks"] == {"db": True}


@pytest.mark.slow  # dnsmasq and several servers
def test_caps_and_a_name_with_no_replica(fleet: Fleet) -> None:
    for host in ("127.0.0.2", "127.0.0.3"):
        fleet.start(host)
    fleet.dns.set_hosts(["127.0.0.2", "127.0.0.3"])
    ran = status("--discover", fleet.target, "--max-replicas", "1")
    assert ran.returncode == 0, ran
    assert set(table(ran.stdout)) == {fleet.address("127.0.0.2")}  # the first in order
    assert "1 more replicas not followed (--max-replicas)" in ran.stdout
    empty = f"dns://127.0.0.1:{fleet.dns.port}/nobody.fleet.test:{fleet.port}"
    ran = status("--discover", empty)
    assert ran.returncode == 2
    assert ran.stderr == "error: no replica found\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--discover", "http://x:1"], "only dns: targets and HOST:PORT are supported"),
        (["--discover", "dns://dns.example/x:1"], "the DNS server must be an IP address"),
        (["--discover", "localhost"], "no port"),
        (["--discover", "127.0.0.2:99999"], "bad port"),
        (["--discover", "127.0.0.2:1", "--max-replicas", "0"], "--max-replicas must be"),
        (["--discover", "127.0.0.2:1", "--resolve-every", "0s"], "--resolve-every must be"),
        (["--discover", "127.0.0.2:1", "--watch", "--exit-on-loss"], "for one server"),
    ],
)
def test_bad_arguments_one_line_exit_1(args: list[str], message: str) -> None:
    ran = status(*args)
    assert ran.returncode == 1, ran
    assert ran.stdout == ""
    assert len(ran.stderr.splitlines()) == 1, ran.stderr
    assert message in ran.stderr


def fleet_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "petsage_grpc", "fleet", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--http-port", "1"], "--discover"),
        (["--discover", "127.0.0.2:1"], "--http-port"),
        (["--discover", "127.0.0.2:1", "--http-port", "70000"], "--http-port must be"),
        (["--discover", "dns:///x:1", "--http-port", "1", "--timeout", "0s"], "--timeout"),
    ],
)
def test_fleet_page_bad_arguments_one_line_exit_1(args: list[str], message: str) -> None:
    ran = fleet_command(*args)
    assert ran.returncode == 1, ran
    assert message in ran.stderr.splitlines()[-1]


def test_fleet_page_cannot_listen_says_so_in_one_line() -> None:
    with TcpListener() as taken:
        ran = fleet_command("--discover", "127.0.0.2:1", "--http-port", str(taken.port))
    assert ran.returncode == 1, ran
    assert ran.stderr.startswith("petsage-grpc fleet: error: cannot listen"), ran.stderr
    assert len(ran.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("hidden", "argv"),
    [
        ("dns", ["status", "--discover", "dns://127.0.0.1/x.test:1"]),
        ("aiohttp", ["fleet", "--discover", "127.0.0.2:1", "--http-port", "1"]),
    ],
)
def test_without_the_fleet_extra_one_line_names_it(hidden: str, argv: list[str]) -> None:
    code = (
        f"import sys; sys.modules[{hidden!r}] = None; from petsage_grpc.cli._main import main; "
        f"sys.exit(main({argv!r}))"
    )
    ran = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert ran.returncode == 1, ran
    assert "needs the 'fleet' extra: pip install 'petsage-grpc[fleet]'" in ran.stderr
    assert len(ran.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("dns:///pets.svc:50051", Target(text="", host="pets.svc", port=50051, dns=True)),
        ("dns:pets.svc:50051", Target(text="", host="pets.svc", port=50051, dns=True)),
        ("dns:///pets.svc", Target(text="", host="pets.svc", port=443, dns=True)),
        (
            "dns://10.96.0.10/pets.svc:1",
            Target(text="", host="pets.svc", port=1, dns=True, server=("10.96.0.10", 53)),
        ),
        (
            "dns://[::1]:5353/pets.svc:1",
            Target(text="", host="pets.svc", port=1, dns=True, server=("::1", 5353)),
        ),
        ("10.0.3.7:50051", Target(text="", host="10.0.3.7", port=50051, dns=False)),
        ("[fd00::7]:50051", Target(text="", host="fd00::7", port=50051, dns=False)),
    ],
)
def test_targets_parse(text: str, parsed: Target) -> None:
    got = parse_target(text)
    assert got.text == text
    assert (got.host, got.port, got.dns, got.server) == (
        parsed.host,
        parsed.port,
        parsed.dns,
        parsed.server,
    )


@pytest.mark.parametrize(
    "text", ["", ":1", "fd00::7:1", "[fd00::7", "dns://", "dns://x:1", "a:b", "a:0", "grpc://a:1"]
)
def test_bad_targets_refused(text: str) -> None:
    with pytest.raises(DiscoveryError):
        parse_target(text)


@pytest.mark.slow  # dnsmasq and a TLS server
def test_tls_verifies_each_replica_against_the_dns_name(fleet: Fleet, tmp_path: Path) -> None:
    _make_ca(tmp_path, "fleet-ca")
    served = SERVER_EXTENSIONS.replace("DNS:localhost,IP:127.0.0.1", f"DNS:{NAME}")
    pair = _issue(tmp_path, "fleet-ca", "fleet-replica", "2001", served)
    fleet.start("127.0.0.2", "--tls-cert", str(pair.cert), "--tls-key", str(pair.key))
    fleet.dns.set_hosts(["127.0.0.2"])
    ca = str(tmp_path / "fleet-ca.pem")
    ran = status("--discover", fleet.target, "--tls", "--tls-ca-cert", ca, "--json")
    assert ran.returncode == 0, ran
    assert json.loads(ran.stdout)["replicas"][0]["state"] == "up"
    # A certificate that does not name the server given, or plaintext: no answer.
    for args in (
        ["--tls", "--tls-ca-cert", ca, "--tls-server-name", "other.fleet.test"],
        [],
    ):
        ran = status("--discover", fleet.target, "--timeout", "1s", "--json", *args)
        assert ran.returncode == 2, ran
        assert json.loads(ran.stdout)["replicas"][0]["state"] == "unreachable"
    ran = status("--discover", fleet.target, "--tls", "--tls-ca-cert", str(tmp_path / "none"))
    assert ran.returncode == 1
    assert "cannot use the TLS files" in ran.stderr


@pytest.mark.slow  # a benchmark: dnsmasq, five servers, the follower
def test_the_fleet_benchmark_runs_in_its_smoke_mode(tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    ran = subprocess.run(
        [sys.executable, "-m", "benchmarks.fleet", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["replicas"] == 5
    assert result["transitions"] == 6
    assert set(result["latency"]) == {"direct_watch_s", "cli_s", "page_s"}
    assert result["follower_idle"]["rss_mib"] > 0
    assert result["polling"]["probe_cpu_ms"] > 0


def test_the_page_answers_only_its_files_and_names_no_version() -> None:
    http_port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "petsage_grpc", "fleet"),
            *("--discover", f"127.0.0.2:{free_port()}", "--http-port", str(http_port)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        assert process.stderr is not None
        assert "fleet page on http://127.0.0.1:" in process.stderr.readline()
        origin = f"http://127.0.0.1:{http_port}"
        with urllib.request.urlopen(f"{origin}/fleet.json", timeout=10) as answer:  # noqa: S310
            assert answer.headers["Server"] == "PetSage"
            assert answer.headers["Content-Type"] == "application/json"
            document = json.loads(answer.read())
        assert set(document) == {
            "generated_at",
            "targets",
            "replicas",
            "not_followed",
            "resolve_errors",
            "events",
        }
        for path, method, code in (("/nope", "GET", 404), ("/fleet.json", "POST", 405)):
            request = urllib.request.Request(f"{origin}{path}", method=method)  # noqa: S310
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)  # noqa: S310
            assert refused.value.code == code
            assert refused.value.headers["Server"] == "PetSage"
        # A malformed request: a fixed line, no version, no traceback.
        with socket.create_connection(("127.0.0.1", http_port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 4096 + b"\r\n\r\n")
            answer_bytes = raw.recv(65536)
        assert answer_bytes.split(b"\r\n")[0].endswith(b"400 Bad Request"), answer_bytes
        assert b"aiohttp" not in answer_bytes
        assert b"Python" not in answer_bytes
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        if process.stderr is not None:
            assert "Traceback" not in process.stderr.read()
            process.stderr.close()
