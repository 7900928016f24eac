"""The HTTP face of ``petsage-grpc serve --http-port``, spoken to by a real HTTP client.

Every test runs the CLI server as a subprocess with a configuration file of real ``tcp``
checks (against listeners the test owns, or a port nothing listens on) and talks to it
with ``urllib`` or, for malformed traffic, a raw socket. Nothing is mocked; every wait
is a poll with a deadline.
"""

from __future__ import annotations

import json
import platform
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from importlib.metadata import version
from pathlib import Path
from types import TracebackType
from typing import Final

import pytest
from conftest import ServerProcess
from tcp_listener import free_port

SpawnServer = Callable[..., ServerProcess]

SMOKE_TEST_PATH: Final = "/api/v1/health/smoke-test"
SMOKE_OK: Final = b'{"status": "ok", "message": "PetSage system is alive and purring."}'
PROBES: Final = ("/livez", "/readyz", "/startupz")
HTTP_TIMEOUT: Final = 10.0
WAIT: Final = 20.0
"""Deadline for a state the server must reach (generous: other tests share the machine)."""
SLACK: Final = 10.0
"""Added to a check's own worst-case reaction time before a transition counts as missed."""
TOKEN: Final = "petsage-http-token-7c1e"  # noqa: S105 - a test token
VERSION_MARKERS: Final = (
    "aiohttp",
    "Python/",
    version("aiohttp"),
    platform.python_version(),
)


class Listener:
    """A TCP listener on 127.0.0.1 that can be closed and reopened on the same port.

    It accepts connections on a background thread and closes each at once: enough for a
    ``tcp`` check to pass while it is open, and to fail (connection refused) while closed.
    """

    def __init__(self) -> None:
        self.port = 0
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Connections closed by this side linger in TIME_WAIT; reopening must not wait.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        sock.settimeout(0.05)
        self.port = sock.getsockname()[1]
        self._socket = sock
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._accept, args=(sock, self._stopping), name="listener", daemon=True
        )
        self._thread.start()

    @staticmethod
    def _accept(sock: socket.socket, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                connection, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection.close()

    def close(self) -> None:
        if self._socket is None:
            return
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)
        self._socket.close()
        self._socket = None
        self._thread = None

    def __enter__(self) -> Listener:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Message
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
) -> Reply:
    """Send one request with urllib and return the answer, whatever its status."""
    sent = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers=headers or {}, method=method
    )
    try:
        with urllib.request.urlopen(sent, timeout=HTTP_TIMEOUT) as response:  # noqa: S310
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, error.headers, error.read())


def wait_for_status(port: int, path: str, status: int, *, within: float = WAIT) -> Reply:
    """Poll *path* until it answers *status*; fail after *within* seconds."""
    deadline = time.monotonic() + within
    while True:
        reply = request(port, path)
        if reply.status == status:
            return reply
        if time.monotonic() > deadline:
            pytest.fail(
                f"{path} did not answer {status} within {within:g}s; last: "
                f"{reply.status} {reply.body!r}"
            )
        time.sleep(0.05)


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send *data* on a fresh connection and read until the server closes it (or 10 s)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + HTTP_TIMEOUT
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
    return received


def check_table(name: str, target: str, **settings: str | int | bool) -> str:
    lines = ["[[checks]]", f'name = "{name}"', 'kind = "tcp"', f'target = "{target}"']
    for key, value in settings.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f'{key} = "{value}"')
    return "\n".join(lines) + "\n"


FAST: Final[dict[str, str | int | bool]] = {
    "interval": "100ms",
    "timeout": "500ms",
    "failure_threshold": 1,
}


@dataclass
class HttpServer:
    server: ServerProcess
    http_port: int
    free_port: int
    """The port the failing check dials (nothing listens there)."""


@pytest.fixture
def listener() -> Iterator[Listener]:
    with Listener() as running:
        yield running


@pytest.fixture
def serving(start_http: Callable[..., tuple[ServerProcess, int]], listener: Listener) -> HttpServer:
    """A server whose only (critical) check passes: everything 200 once it has passed."""
    server, http_port = start_http(check_table("db", listener.address, **FAST))
    wait_for_status(http_port, "/readyz", 200)
    return HttpServer(server, http_port, 0)


@pytest.fixture
def failing(start_http: Callable[..., tuple[ServerProcess, int]], listener: Listener) -> HttpServer:
    """A server whose critical check "db" dials a closed port; "cache" (non-critical) passes."""
    dead = free_port()
    config = check_table("db", f"127.0.0.1:{dead}", **FAST) + check_table(
        "cache", listener.address, critical=False, **FAST
    )
    server, http_port = start_http(config)
    # startup turns SERVING once "db" has finished its first (failed) attempt.
    wait_for_status(http_port, "/startupz", 200)
    return HttpServer(server, http_port, dead)


def assert_no_secrets(body: bytes, server: HttpServer) -> None:
    text = body.decode()
    for marker in (
        "127.0.0.1",
        str(server.free_port),
        str(server.server.port),
        *VERSION_MARKERS,
        version("petsage-grpc"),
        "Error",
        "Refused",
        "Traceback",
        "errno",
    ):
        assert marker not in text, f"{marker!r} in {text!r}"


# --- the smoke test -----------------------------------------------------------------


def test_smoke_test_serving_answers_the_exact_body(serving: HttpServer) -> None:
    reply = wait_for_status(serving.http_port, SMOKE_TEST_PATH, 200)
    assert reply.body == SMOKE_OK
    assert json.loads(reply.body) == {
        "status": "ok",
        "message": "PetSage system is alive and purring.",
    }
    assert reply.headers.get_content_type() == "application/json"
    assert reply.headers["Server"] == "PetSage"


def test_smoke_test_not_serving_is_503_naming_nothing(failing: HttpServer) -> None:
    reply = wait_for_status(failing.http_port, SMOKE_TEST_PATH, 503)
    assert reply.headers.get_content_type() == "application/json"
    answer = json.loads(reply.body)
    assert set(answer) == {"status", "message"}
    assert answer["status"] == "unavailable"
    assert isinstance(answer["message"], str)
    assert answer["message"]
    assert_no_secrets(reply.body, failing)
    assert "db" not in answer["message"]


# --- probes -------------------------------------------------------------------------


def test_livez_passes_while_readyz_fails(failing: HttpServer) -> None:
    port = failing.http_port
    readyz = wait_for_status(port, "/readyz", 503)
    assert readyz.text == "readyz failed\n"
    livez = request(port, "/livez")
    assert (livez.status, livez.text) == (200, "livez ok\n")
    startupz = request(port, "/startupz")
    assert (startupz.status, startupz.text) == (200, "startupz ok\n")
    for reply in (readyz, livez, startupz):
        assert reply.headers.get_content_type() == "text/plain"
        assert_no_secrets(reply.body, failing)


def test_every_probe_passes_when_serving(serving: HttpServer) -> None:
    for path in PROBES:
        reply = request(serving.http_port, path)
        assert (reply.status, reply.text) == (200, f"{path.strip('/')} ok\n"), path


def test_startupz_fails_until_the_first_attempt(
    start_http: Callable[..., tuple[ServerProcess, int]], listener: Listener
) -> None:
    # The critical check's first attempt is far away: the server has not finished starting.
    server, http_port = start_http(
        check_table("slow", listener.address, initial_delay="10m", **FAST)
    )
    startupz = request(http_port, "/startupz")
    assert (startupz.status, startupz.text) == (503, "startupz failed\n")
    assert request(http_port, "/readyz").status == 503
    assert request(http_port, "/livez").status == 200
    assert server.process.poll() is None


def test_head_answers_the_status_without_a_body(failing: HttpServer) -> None:
    port = failing.http_port
    wait_for_status(port, "/readyz", 503)
    expected = {"/livez": 200, "/readyz": 503, "/startupz": 200}
    for path, status in expected.items():
        reply = request(port, path, method="HEAD")
        assert reply.status == status, path
        assert reply.body == b"", path
        # On the wire, too: the headers end the response.
        raw = raw_exchange(
            port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        head, separator, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), raw
        assert separator
        assert rest == b"", raw


def test_verbose_lists_check_names_and_states_only(failing: HttpServer) -> None:
    port = failing.http_port
    deadline = time.monotonic() + WAIT
    while True:
        reply = request(port, "/readyz?verbose")
        if "[+]cache ok" in reply.text or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert reply.status == 503
    assert reply.text.splitlines() == ["[+]cache ok", "[-]db failed", "readyz failed"]
    assert_no_secrets(reply.body, failing)
    livez = request(port, "/livez?verbose")
    assert livez.status == 200
    lines = livez.text.splitlines()
    checks, loop, parts, verdict = lines[:2], lines[2], lines[3:-1], lines[-1]
    assert (checks, verdict) == (["[+]cache ok", "[-]db failed"], "livez ok")
    # Background parts, by name: the connection shedder where there is one.
    assert all(re.fullmatch(r"\[\+\][a-z-]+ ok", part) for part in parts), parts
    # The event loop's line: its lag now and the stalls seen, never a check's detail.
    assert re.fullmatch(r"\[\+\]event-loop ok: lag \d+ms, 0 stall\(s\)", loop), loop
    # Without ?verbose, no check is named.
    assert request(port, "/readyz").text == "readyz failed\n"


def test_verbose_needs_the_bearer_token_when_one_is_configured(
    tmp_path: Path,
    start_http: Callable[..., tuple[ServerProcess, int]],
    listener: Listener,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    _, port = start_http(
        check_table("db", listener.address, **FAST), "--auth-token-file", str(token_file)
    )
    wait_for_status(port, "/readyz", 200)
    anonymous = request(port, "/readyz?verbose")
    assert (anonymous.status, anonymous.text) == (200, "readyz ok\n")
    wrong = request(port, "/readyz?verbose", headers={"Authorization": "Bearer not-the-token"})
    assert (wrong.status, wrong.text) == (200, "readyz ok\n")
    bare = request(port, "/readyz?verbose", headers={"Authorization": TOKEN})
    assert bare.text == "readyz ok\n"
    allowed = request(port, "/readyz?verbose", headers={"Authorization": f"Bearer {TOKEN}"})
    assert allowed.status == 200
    assert allowed.text.splitlines() == ["[+]db ok", "readyz ok"]
    assert TOKEN not in allowed.text


# --- errors ---------------------------------------------------------------------------


def test_unknown_path_is_404(serving: HttpServer) -> None:
    for path in ("/nope", "/readyz/extra", "/api/v1/health", "/metrics/x"):
        reply = request(serving.http_port, path)
        assert reply.status == 404, path
        assert reply.headers["Server"] == "PetSage"


def test_wrong_method_is_405(serving: HttpServer) -> None:
    for path in (SMOKE_TEST_PATH, *PROBES):
        for method in ("POST", "PUT", "DELETE"):
            reply = request(serving.http_port, path, method=method, data=b"")
            assert reply.status == 405, (method, path)
            assert {m.strip() for m in reply.headers["Allow"].split(",")} >= {"GET", "HEAD"}
            assert reply.headers["Server"] == "PetSage"


def test_request_body_over_1_kib_is_refused(serving: HttpServer) -> None:
    port = serving.http_port
    reply = request(port, "/readyz", data=b"x" * 2048)
    assert reply.status == 413
    chunked = raw_exchange(
        port,
        b"GET /api/v1/health/smoke-test HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n800\r\n" + b"x" * 2048 + b"\r\n0\r\n\r\n",
    )
    assert chunked.startswith(b"HTTP/1.1 413 "), chunked[:200]


def test_garbage_request_line_is_refused_and_the_server_keeps_answering(
    serving: HttpServer,
) -> None:
    port = serving.http_port
    for garbage in (
        b"GARBAGE\x00\x01 junk\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(64),  # a TLS ClientHello
        b"GET\r\n\r\n",
    ):
        answer = raw_exchange(port, garbage)
        assert answer == b"" or re.match(rb"HTTP/1\.[01] 400 ", answer), answer[:200]
        livez = request(port, "/livez")
        assert (livez.status, livez.text) == (200, "livez ok\n")
    assert serving.server.process.poll() is None


def test_garbage_request_answer_names_no_version(serving: HttpServer) -> None:
    answer = raw_exchange(serving.http_port, b"GARBAGE\x00\x01 junk\r\n\r\n")
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1")
    for marker in VERSION_MARKERS:
        assert marker not in answer.decode("latin-1"), head
    if answer:
        servers = [
            line.partition(":")[2].strip()
            for line in head.split("\r\n")
            if line.lower().startswith("server:")
        ]
        assert servers in ([], ["PetSage"]), head


def test_server_header_is_exactly_petsage(failing: HttpServer) -> None:
    port = failing.http_port
    replies = [
        request(port, SMOKE_TEST_PATH),
        *(request(port, path) for path in PROBES),
        request(port, "/readyz?verbose"),
        request(port, "/livez", method="HEAD"),
        request(port, "/metrics"),
        request(port, "/nope"),
        request(port, "/readyz", method="POST", data=b""),
    ]
    assert {reply.status for reply in replies} >= {200, 404, 405, 503}
    for reply in replies:
        assert reply.headers.get_all("Server") == ["PetSage"], reply
        for marker in VERSION_MARKERS:
            assert marker not in str(reply.headers), reply.headers


# --- metrics --------------------------------------------------------------------------


def test_metrics_has_service_serving(failing: HttpServer) -> None:
    wait_for_status(failing.http_port, "/readyz", 503)
    reply = request(failing.http_port, "/metrics")
    assert reply.status == 200
    assert reply.headers.get_content_type() == "text/plain"
    lines = reply.text.splitlines()
    assert "# TYPE petsage_grpc_service_serving gauge" in lines
    assert 'petsage_grpc_service_serving{service="liveness"} 1.0' in lines
    assert 'petsage_grpc_service_serving{service="readiness"} 0.0' in lines
    assert 'petsage_grpc_service_serving{service="check.db"} 0.0' in lines


# --- a real dependency going away and coming back ----------------------------------------


def test_readyz_follows_a_real_dependency(
    start_http: Callable[..., tuple[ServerProcess, int]], listener: Listener
) -> None:
    interval, timeout, threshold = 0.1, 0.5, 1
    _, port = start_http(
        check_table(
            "db",
            listener.address,
            interval="100ms",
            timeout="500ms",
            failure_threshold=threshold,
        )
    )
    assert wait_for_status(port, "/readyz", 200).text == "readyz ok\n"
    reaction = interval * 1.1 * threshold + timeout + SLACK

    listener.close()
    down = wait_for_status(port, "/readyz", 503, within=reaction)
    assert down.text == "readyz failed\n"
    assert request(port, SMOKE_TEST_PATH).status == 503
    assert request(port, "/livez").status == 200

    listener.open()  # the same port again
    up = wait_for_status(port, "/readyz", 200, within=reaction)
    assert up.text == "readyz ok\n"
    assert request(port, SMOKE_TEST_PATH).body == SMOKE_OK


def test_probes_while_draining_after_sigterm(
    start_http: Callable[..., tuple[ServerProcess, int]], listener: Listener
) -> None:
    server, port = start_http(check_table("db", listener.address, **FAST), "--drain-seconds", "120")
    wait_for_status(port, "/readyz", 200)
    server.signal(signal.SIGTERM)
    assert wait_for_status(port, "/readyz", 503).text == "readyz failed\n"
    assert request(port, SMOKE_TEST_PATH).status == 503
    # A clean shutdown is not a reason to restart the pod.
    assert request(port, "/livez").status == 200
    assert request(port, "/startupz").status == 200
    server.signal(signal.SIGTERM)  # again: stop now
    assert server.wait(60) == 0
