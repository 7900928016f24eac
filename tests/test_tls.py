"""TLS, mTLS, the plaintext probe port and certificate rotation of ``petsage-grpc serve``.

Every server here is the real CLI server as a subprocess (``spawn_server``), every probe
the real ``petsage-grpc probe`` as a subprocess, and every certificate a throwaway one
made with the ``openssl`` command for this test session.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
from conftest import ROOT, ServerProcess
from hardening import (
    CHECK,
    LIST,
    REFLECTION_V1,
    REFLECTION_V1ALPHA,
    RPC_TIMEOUT,
    SMOKE_TEST,
    Exited,
    call,
    check_request,
    check_status,
    plaintext,
    refuses_connections,
    run_cli,
    serve_refused,
    wait_until,
)
from tcp_listener import free_port

from petsage_grpc import ServingStatus

SpawnServer = Callable[..., ServerProcess]

OK_TIMEOUTS: Final = ("-connect-timeout=20s", "-rpc-timeout=20s")
"""For probes that should pass: generous, so a loaded machine does not fail them."""
FAIL_TIMEOUTS: Final = ("-connect-timeout=1s", "-rpc-timeout=5s")
"""For probes that should not connect: a TLS mismatch is retried until the connect timeout."""


# -- a throwaway PKI ---------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """A PEM certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """A CA, certificates it signed, and a client certificate from another CA."""

    ca: Path
    server: Pair
    """SAN DNS:localhost, IP:127.0.0.1."""
    client: Pair
    rotation_a: Pair
    """A server certificate with CN and serial 'rotation-a' / 0xA1."""
    rotation_b: Pair
    """The same, 'rotation-b' / 0xB2."""
    stranger: Pair
    """A client certificate signed by a CA the server does not trust."""


ROTATION_A_SERIAL: Final = "A1"
ROTATION_B_SERIAL: Final = "B2"
SERVER_EXTENSIONS: Final = (
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
)
CLIENT_EXTENSIONS: Final = (
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
)


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, capture_output=True, check=True, timeout=60)


def _make_ca(directory: Path, name: str) -> None:
    _openssl(
        directory,
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )


def _issue(directory: Path, ca: str, name: str, serial: str, extensions: str) -> Pair:
    _openssl(
        directory,
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
    )
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        directory,
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-set_serial",
        f"0x{serial}",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.pem",
    )
    return Pair(cert=directory / f"{name}.pem", key=directory / f"{name}.key")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    directory = tmp_path_factory.mktemp("tls-pki")
    _make_ca(directory, "ca")
    _make_ca(directory, "stranger-ca")
    return Pki(
        ca=directory / "ca.pem",
        server=_issue(directory, "ca", "localhost", "1001", SERVER_EXTENSIONS),
        client=_issue(directory, "ca", "petsage-probe", "1002", CLIENT_EXTENSIONS),
        rotation_a=_issue(directory, "ca", "rotation-a", ROTATION_A_SERIAL, SERVER_EXTENSIONS),
        rotation_b=_issue(directory, "ca", "rotation-b", ROTATION_B_SERIAL, SERVER_EXTENSIONS),
        stranger=_issue(directory, "stranger-ca", "stranger", "1003", CLIENT_EXTENSIONS),
    )


# -- clients -----------------------------------------------------------------------------


def probe(*args: str) -> Exited:
    """``petsage-grpc probe`` with *args*, as a subprocess."""
    return run_cli("probe", *args)


@contextmanager
def secure(port: int, pki: Pki, *, client: Pair | None = None) -> Iterator[grpc.Channel]:
    """A grpcio TLS channel to localhost:*port* trusting the test CA (not yet connected)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.secure_channel(f"localhost:{port}", credentials, options=options) as channel:
        yield channel


def connects(channel: grpc.Channel, timeout: float) -> bool:
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        return False
    return True


def peer_certificate(port: int, ca: Path) -> dict[str, str]:
    """Handshake with 127.0.0.1:*port* as a verifying h2 client; the server cert's subject."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=RPC_TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.selected_alpn_protocol() == "h2"
        certificate = tls.getpeercert()
    assert certificate is not None
    rdns: Any = certificate["subject"]  # ((("commonName", "rotation-a"),), ...)
    subject = {str(key): str(value) for rdn in rdns for key, value in rdn}
    return {"CN": subject["commonName"], "serial": str(certificate["serialNumber"])}


# -- servers -----------------------------------------------------------------------------


def tls_args(pki: Pki, *, mutual: bool = False) -> tuple[str, ...]:
    args = ("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key))
    return (*args, "--tls-client-ca", str(pki.ca)) if mutual else args


@pytest.fixture
def tls_server(spawn_server: SpawnServer, pki: Pki) -> ServerProcess:
    server = spawn_server(*tls_args(pki))
    assert "with TLS" in server.log()
    return server


@pytest.fixture
def mtls_server(spawn_server: SpawnServer, pki: Pki) -> ServerProcess:
    return spawn_server(*tls_args(pki, mutual=True))


def assert_connection_failure(run: Exited, port: int) -> None:
    assert run.code == 2, run.stderr
    assert f'failed to connect service "localhost:{port}"' in run.stderr


# -- TLS only ----------------------------------------------------------------------------


def test_grpcio_secure_channel_with_the_ca_checks_serving(
    tls_server: ServerProcess, pki: Pki
) -> None:
    with secure(tls_server.port, pki) as channel:
        assert connects(channel, RPC_TIMEOUT)
        assert check_status(channel) is ServingStatus.SERVING
        assert check_status(channel, "readiness") is ServingStatus.SERVING


@pytest.mark.slow
def test_plaintext_grpcio_client_cannot_call_the_tls_port(tls_server: ServerProcess) -> None:
    with grpc.insecure_channel(tls_server.address) as channel:
        assert not connects(channel, 2.0)
        outcome = call(channel, CHECK, check_request(), timeout=5.0)
    assert outcome.code is grpc.StatusCode.UNAVAILABLE


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(("-tls", "-tls-ca-cert={ca}", *OK_TIMEOUTS), 0, id="tls-with-ca"),
        pytest.param(("-tls", "-tls-no-verify", *OK_TIMEOUTS), 0, id="tls-no-verify"),
        pytest.param(FAIL_TIMEOUTS, 2, id="plaintext"),
        pytest.param(("-tls", *FAIL_TIMEOUTS), 2, id="tls-system-roots"),
        pytest.param(
            ("-tls", "-tls-ca-cert={ca}", "-tls-server-name=other.example", *FAIL_TIMEOUTS),
            2,
            id="tls-wrong-server-name",
        ),
    ],
)
def test_probe_against_tls(
    args: tuple[str, ...], expected: int, tls_server: ServerProcess, pki: Pki
) -> None:
    run = probe(f"-addr=localhost:{tls_server.port}", *(a.format(ca=pki.ca) for a in args))
    if expected == 0:
        assert run.code == 0, run.stderr
        assert "status: SERVING" in run.lines
    else:
        assert_connection_failure(run, tls_server.port)
    assert tls_server.process.poll() is None


# -- mutual TLS --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(
            ("-tls-ca-cert={ca}", "-tls-client-cert={cert}", "-tls-client-key={key}"),
            0,
            id="client-cert",
        ),
        pytest.param(("-tls-ca-cert={ca}",), 2, id="no-client-cert"),
        pytest.param(
            ("-tls-no-verify", "-tls-client-cert={cert}", "-tls-client-key={key}"),
            0,
            id="no-verify-with-client-cert",
        ),
        pytest.param(("-tls-no-verify",), 2, id="no-verify-without-client-cert"),
        pytest.param(
            ("-tls-ca-cert={ca}", "-tls-client-cert={stranger}", "-tls-client-key={stranger_key}"),
            2,
            id="client-cert-from-an-untrusted-ca",
        ),
    ],
)
def test_probe_against_mtls(
    args: tuple[str, ...], expected: int, mtls_server: ServerProcess, pki: Pki
) -> None:
    names = {
        "ca": pki.ca,
        "cert": pki.client.cert,
        "key": pki.client.key,
        "stranger": pki.stranger.cert,
        "stranger_key": pki.stranger.key,
    }
    timeouts = OK_TIMEOUTS if expected == 0 else FAIL_TIMEOUTS
    argv = (f"-addr=localhost:{mtls_server.port}", "-tls", *(a.format(**names) for a in args))
    run = probe(*argv, *timeouts)
    if expected == 0:
        assert run.code == 0, run.stderr
        assert "status: SERVING" in run.lines
    else:
        assert_connection_failure(run, mtls_server.port)
    assert mtls_server.process.poll() is None


@pytest.mark.slow
def test_grpcio_mtls_needs_the_client_certificate(mtls_server: ServerProcess, pki: Pki) -> None:
    with secure(mtls_server.port, pki, client=pki.client) as channel:
        assert connects(channel, RPC_TIMEOUT)
        assert check_status(channel) is ServingStatus.SERVING
    with secure(mtls_server.port, pki) as channel:
        assert not connects(channel, 2.0)
        assert call(channel, CHECK, check_request(), timeout=5.0).code in {
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        }


# -- the plaintext probe port ------------------------------------------------------------


@pytest.fixture
def probe_port_server(spawn_server: SpawnServer, pki: Pki) -> tuple[ServerProcess, int]:
    port = free_port()
    server = spawn_server(*tls_args(pki, mutual=True), "--probe-port", str(port))
    wait_until(
        lambda: f"serving health probes in plaintext on port {port}" in server.log(),
        "the probe port to be logged",
    )
    return server, port


@pytest.mark.slow
def test_probe_port_answers_check_in_plaintext_while_the_main_port_needs_mtls(
    probe_port_server: tuple[ServerProcess, int], pki: Pki
) -> None:
    server, probe_port = probe_port_server
    with plaintext(f"127.0.0.1:{probe_port}") as channel:
        for name in ("", "liveness", "readiness", "startup"):
            assert check_status(channel, name) is ServingStatus.SERVING
        assert call(channel, CHECK, check_request("nope")).code is grpc.StatusCode.NOT_FOUND
    run = probe(f"-addr=127.0.0.1:{probe_port}", "-service=readiness", *OK_TIMEOUTS)
    assert run.code == 0, run.stderr
    # The main port still requires TLS with a client certificate.
    with grpc.insecure_channel(server.address) as channel:
        assert call(channel, CHECK, check_request(), timeout=5.0).code is (
            grpc.StatusCode.UNAVAILABLE
        )
    with secure(server.port, pki) as channel:
        assert not connects(channel, 2.0)
    with secure(server.port, pki, client=pki.client) as channel:
        assert check_status(channel) is ServingStatus.SERVING
        assert call(channel, LIST, b"").code is grpc.StatusCode.OK


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(SMOKE_TEST, id="smoke-test"),
        pytest.param(REFLECTION_V1, id="reflection-v1"),
        pytest.param(REFLECTION_V1ALPHA, id="reflection-v1alpha"),
        pytest.param(LIST, id="list"),
    ],
)
def test_probe_port_serves_nothing_but_check(
    path: str, probe_port_server: tuple[ServerProcess, int]
) -> None:
    _, probe_port = probe_port_server
    with plaintext(f"127.0.0.1:{probe_port}") as channel:
        outcome = call(channel, path, b"")
    assert outcome.code is grpc.StatusCode.UNIMPLEMENTED, outcome


def test_probe_port_does_not_bypass_the_bearer_token(
    spawn_server: SpawnServer, pki: Pki, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("probe-port-token-5b1e\n")
    probe_port = free_port()
    server = spawn_server(
        *tls_args(pki),
        "--probe-port",
        str(probe_port),
        "--auth-token-file",
        str(token_file),
    )
    with secure(server.port, pki) as channel:
        assert call(channel, LIST, b"").code is grpc.StatusCode.UNAUTHENTICATED
    with plaintext(f"127.0.0.1:{probe_port}") as channel:
        outcome = call(channel, LIST, b"")
    assert outcome.code in {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED}


# -- certificate rotation ----------------------------------------------------------------


def install(source: Path, destination: Path) -> None:
    """Replace *destination* atomically with a copy of *source*, as a secret volume does."""
    temporary = destination.with_name(f".{destination.name}.tmp")
    shutil.copyfile(source, temporary)
    os.replace(temporary, destination)


@pytest.fixture
def live(tmp_path: Path, pki: Pki) -> Pair:
    """Certificate files a server reads, holding rotation-a at first."""
    directory = tmp_path / "live"
    directory.mkdir()
    pair = Pair(cert=directory / "tls.crt", key=directory / "tls.key")
    shutil.copyfile(pki.rotation_a.cert, pair.cert)
    shutil.copyfile(pki.rotation_a.key, pair.key)
    return pair


def test_rotated_certificate_is_served_to_new_connections_without_a_restart(
    spawn_server: SpawnServer, pki: Pki, live: Pair
) -> None:
    server = spawn_server("--tls-cert", str(live.cert), "--tls-key", str(live.key))
    pid = server.process.pid
    assert peer_certificate(server.port, pki.ca) == {"CN": "rotation-a", "serial": "A1"}
    with secure(server.port, pki) as before:
        assert check_status(before) is ServingStatus.SERVING

        install(pki.rotation_b.cert, live.cert)
        install(pki.rotation_b.key, live.key)

        wait_until(
            lambda: peer_certificate(server.port, pki.ca)["CN"] == "rotation-b",
            "a new connection to present rotation-b",
        )
        assert peer_certificate(server.port, pki.ca) == {"CN": "rotation-b", "serial": "B2"}
        # The same process, and the connection made before the rotation still works.
        assert server.process.poll() is None
        assert server.process.pid == pid
        assert check_status(before) is ServingStatus.SERVING
    with secure(server.port, pki) as after:
        assert check_status(after) is ServingStatus.SERVING
    wait_until(lambda: "certificate files reloaded" in server.log(), "the reload to be logged")


def unusable_warnings(server: ServerProcess, live: Pair) -> int:
    return sum(
        "WARNING" in line and "cannot be used" in line and str(live.cert) in line
        for line in server.log().splitlines()
    )


def same_size_copies(pairs: list[Pair], directory: Path) -> list[Pair]:
    """Copies of *pairs* whose certificate files (and key files) are all of one size.

    PEM readers skip text after the last block, so trailing newlines pad them.
    """
    directory.mkdir()
    cert_size = max(pair.cert.stat().st_size for pair in pairs)
    key_size = max(pair.key.stat().st_size for pair in pairs)
    copies = []
    for index, pair in enumerate(pairs):
        copy = Pair(cert=directory / f"{index}.crt", key=directory / f"{index}.key")
        for source, destination, size in (
            (pair.cert, copy.cert, cert_size),
            (pair.key, copy.key, key_size),
        ):
            data = source.read_bytes()
            destination.write_bytes(data + b"\n" * (size - len(data)))
        copies.append(copy)
    return copies


def keep_times(path: Path, write: Callable[[], None]) -> None:
    """Run *write*, which replaces *path*, then give *path* its old times back (as ``cp -p``)."""
    before = path.stat()
    write()
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("how", ["renamed-over", "rewritten-in-place"])
def test_replacement_of_the_same_size_and_mtime_is_served(
    spawn_server: SpawnServer, pki: Pki, tmp_path: Path, how: str
) -> None:
    old, new = same_size_copies([pki.rotation_a, pki.rotation_b], tmp_path / "padded")
    live = Pair(cert=tmp_path / "tls.crt", key=tmp_path / "tls.key")
    shutil.copyfile(old.cert, live.cert)
    shutil.copyfile(old.key, live.key)
    server = spawn_server("--tls-cert", str(live.cert), "--tls-key", str(live.key))
    assert peer_certificate(server.port, pki.ca)["CN"] == "rotation-a"

    for source, destination in ((new.cert, live.cert), (new.key, live.key)):
        if how == "renamed-over":  # rsync -a, or touch -r old new && mv new old
            replacement = destination.with_name(destination.name + ".new")
            shutil.copyfile(source, replacement)
            keep_times(destination, lambda: os.replace(replacement, destination))  # noqa: B023
        else:  # cp -p onto the file: same inode
            inode = destination.stat().st_ino
            keep_times(destination, lambda: rewrite(destination, source.read_bytes()))  # noqa: B023
            assert destination.stat().st_ino == inode
        assert destination.stat().st_size == source.stat().st_size

    wait_until(
        lambda: peer_certificate(server.port, pki.ca)["CN"] == "rotation-b",
        "a new connection to present rotation-b",
    )
    wait_until(lambda: "certificate files reloaded" in server.log(), "the reload to be logged")
    assert server.process.poll() is None


def rewrite(path: Path, data: bytes) -> None:
    with path.open("r+b") as file:
        file.write(data)
        file.truncate()


def test_broken_replacement_keeps_serving_the_old_certificate(
    spawn_server: SpawnServer, pki: Pki, live: Pair
) -> None:
    server = spawn_server("--tls-cert", str(live.cert), "--tls-key", str(live.key))
    assert peer_certificate(server.port, pki.ca)["CN"] == "rotation-a"

    # rotation-b's certificate with rotation-a's key: not a usable pair.
    install(pki.rotation_b.cert, live.cert)
    for _ in range(3):
        assert peer_certificate(server.port, pki.ca) == {"CN": "rotation-a", "serial": "A1"}
    with secure(server.port, pki) as channel:
        assert check_status(channel) is ServingStatus.SERVING
    wait_until(lambda: unusable_warnings(server, live) == 1, "a warning naming the unusable files")
    assert "certificate files reloaded" not in server.log()
    # Once per bad pair, not once per handshake.
    for _ in range(6):
        assert peer_certificate(server.port, pki.ca)["CN"] == "rotation-a"
    assert unusable_warnings(server, live) == 1

    # A key file missing for a moment (mid-rotation) changes nothing either.
    live.key.unlink()
    assert peer_certificate(server.port, pki.ca)["CN"] == "rotation-a"
    # Another bad pair is another warning (and only one).
    live.key.write_bytes(b"not a key\n")
    for _ in range(6):
        assert peer_certificate(server.port, pki.ca)["CN"] == "rotation-a"
    wait_until(lambda: unusable_warnings(server, live) == 2, "a warning for the second bad pair")
    assert peer_certificate(server.port, pki.ca)["CN"] == "rotation-a"
    assert unusable_warnings(server, live) == 2

    # Once the key matches, the new certificate is served.
    install(pki.rotation_b.key, live.key)
    wait_until(
        lambda: peer_certificate(server.port, pki.ca)["CN"] == "rotation-b",
        "rotation-b once its key is in place",
    )
    assert server.process.poll() is None


# -- bad TLS input at start --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "named"),
    [
        pytest.param(
            ("--tls-cert", "{missing}", "--tls-key", "{key}"), ("{missing}",), id="missing-cert"
        ),
        pytest.param(
            ("--tls-cert", "{cert}", "--tls-key", "{missing}"), ("{missing}",), id="missing-key"
        ),
        pytest.param(
            ("--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-client-ca", "{missing}"),
            ("{missing}",),
            id="missing-client-ca",
        ),
        pytest.param(
            ("--tls-cert", "{cert}", "--tls-key", "{other_key}"),
            ("{cert}", "{other_key}"),
            id="key-not-matching-cert",
        ),
        pytest.param(
            ("--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-client-ca", "{key}"),
            ("{key}",),
            id="client-ca-without-certificates",
        ),
        pytest.param(("--tls-cert", "{cert}"), ("--tls-cert", "--tls-key"), id="cert-no-key"),
        pytest.param(("--tls-key", "{key}"), ("--tls-cert", "--tls-key"), id="key-no-cert"),
        pytest.param(
            ("--tls-client-ca", "{ca}"), ("--tls-client-ca", "--tls-cert"), id="client-ca-no-cert"
        ),
    ],
)
def test_bad_tls_input_exits_2_with_one_line(
    args: tuple[str, ...], named: tuple[str, ...], pki: Pki, tmp_path: Path
) -> None:
    names = {
        "cert": pki.server.cert,
        "key": pki.server.key,
        "other_key": pki.client.key,
        "ca": pki.ca,
        "missing": tmp_path / "does-not-exist.pem",
    }
    done, port = serve_refused(*(a.format(**names) for a in args))
    assert done.code == 2, done.stderr
    assert len(done.lines) == 1, done.stderr
    line = done.lines[0]
    assert line.startswith("petsage-grpc serve: error: "), line
    for fragment in named:
        assert fragment.format(**names) in line, line
    assert refuses_connections(port)


# -- the relay behind -tls-no-verify -----------------------------------------------------

RELAY_STRESS: Final = """
import socket, ssl, sys, threading
from petsage_grpc.cli._tls_relay import start_unverified_tls_relay

cert, key = sys.argv[1], sys.argv[2]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
context.num_tickets = 50  # TLS 1.3 session tickets: records the relay reads while it writes
listener = socket.create_server(("127.0.0.1", 0))

def echo(raw):
    try:
        with context.wrap_socket(raw, server_side=True) as tls:
            while data := tls.recv(65536):
                tls.sendall(data)
    except OSError:
        pass

def accept():
    while True:
        raw, _ = listener.accept()
        threading.Thread(target=echo, args=(raw,), daemon=True).start()

threading.Thread(target=accept, daemon=True).start()
relay = start_unverified_tls_relay(
    "127.0.0.1", listener.getsockname()[1], cert=None, key=None, timeout=10
)
host, _, port = relay.rpartition(":")
CHUNKS, CHUNK = 2000, b"0123456789"
for attempt in range(100):
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def write():
            try:
                for _ in range(CHUNKS):
                    sock.sendall(CHUNK)
            except OSError:
                pass

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        received = 0
        try:
            while received < CHUNKS * len(CHUNK):
                data = sock.recv(65536)
                if not data:
                    break
                received += len(data)
        except OSError:
            pass
        writer.join(10)
        if received != CHUNKS * len(CHUNK):
            sys.exit(f"connection {attempt}: {received} of {CHUNKS * len(CHUNK)} bytes came back")
print("all echoed")
"""


@pytest.mark.slow
def test_unverified_tls_relay_survives_full_duplex_traffic(pki: Pki) -> None:
    """Bytes written while the server is also sending all come back, in one piece.

    gRPC over the relay is full duplex from its first bytes: the client's preface and
    SETTINGS go up while the server's SETTINGS and session tickets come down. A relay
    that read and wrote one SSL socket from two threads lost about one connection in
    ten here, and could crash the process (SIGSEGV); it runs in a subprocess for that.
    """
    done = subprocess.run(
        [sys.executable, "-c", RELAY_STRESS, str(pki.server.cert), str(pki.server.key)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.strip() == "all echoed"


RELAY_EXIT: Final = """
import socket, ssl, sys, threading
from petsage_grpc.cli._tls_relay import start_unverified_tls_relay

context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
listener = socket.create_server(("127.0.0.1", 0))

def echo(raw):
    try:
        with context.wrap_socket(raw, server_side=True) as tls:
            while data := tls.recv(65536):
                tls.sendall(data)
    except OSError:
        pass

def accept():
    while True:
        raw, _ = listener.accept()
        threading.Thread(target=echo, args=(raw,), daemon=True).start()

threading.Thread(target=accept, daemon=True).start()
relay = start_unverified_tls_relay(
    "127.0.0.1", listener.getsockname()[1], cert=None, key=None, timeout=10
)
host, _, port = relay.rpartition(":")
# What the probe does: one exchange through the relay, close the connection, exit.
with socket.create_connection((host, int(port)), timeout=10) as sock:
    sock.sendall(b"ping")
    assert sock.recv(4) == b"ping"
print("done")
"""
RELAY_EXIT_RUNS: Final = 40


@pytest.mark.slow
def test_a_process_that_used_the_relay_exits_quietly(pki: Pki) -> None:
    """An exec probe's output is shown to operators: it must hold only the probe's lines."""

    def run(_: int) -> tuple[int, str, str]:
        done = subprocess.run(
            [sys.executable, "-c", RELAY_EXIT, str(pki.server.cert), str(pki.server.key)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            check=False,
        )
        return done.returncode, done.stdout.strip(), done.stderr

    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = list(pool.map(run, range(RELAY_EXIT_RUNS)))
    assert all(code == 0 and out == "done" for code, out, _ in runs), runs[:1]
    noisy = [err for _, _, err in runs if err.strip()]
    assert not noisy, f"{len(noisy)} of {RELAY_EXIT_RUNS} wrote to stderr, e.g.:\n{noisy[0]}"


SILENT_RUNS: Final = 12


class SilentListener:
    """Accepts TCP connections on 127.0.0.1 and never answers them (no TLS handshake)."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port: int = self.socket.getsockname()[1]
        self.held: list[socket.socket] = []
        self.socket.settimeout(0.05)
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, name="silent", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                connection, _ = self.socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.held.append(connection)

    def close(self) -> None:
        self.stopping = True
        self.thread.join(10)
        self.socket.close()
        for connection in self.held:
            connection.close()


@pytest.mark.slow
def test_unverified_probe_of_a_silent_listener_prints_its_timeout_line_only() -> None:
    """The relay's connection, cancelled mid-handshake as the probe exits, stays quiet."""
    listener = SilentListener()
    try:

        def run(_: int) -> Exited:
            return probe(
                f"-addr=127.0.0.1:{listener.port}", "-tls", "-tls-no-verify", *FAIL_TIMEOUTS
            )

        with ThreadPoolExecutor(max_workers=3) as pool:
            runs = list(pool.map(run, range(SILENT_RUNS)))
    finally:
        listener.close()
    assert all(done.code == 2 for done in runs), [done.code for done in runs]
    noisy = [done.stderr for done in runs if len(done.lines) != 1]
    assert not noisy, f"{len(noisy)} of {SILENT_RUNS} wrote more than one line, e.g.:\n{noisy[0]}"
    assert all("failed to connect" in done.lines[0] for done in runs), runs[0].lines
