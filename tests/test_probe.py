"""``petsage-grpc probe`` as a drop-in for grpc_health_probe: flags, messages and exit codes.

Every probe runs as a real subprocess (``python -m petsage_grpc probe`` and, where
installed, the ``petsage-grpc`` console script) against real servers on 127.0.0.1.
grpc_health_probe's behaviour is taken from grpc-ecosystem/grpc-health-probe's main.go:
exit 0 SERVING, 1 invalid arguments, 2 connection failed or timed out, 3 RPC failed,
4 answered but not SERVING; every message goes to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Final

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from conftest import ROOT, InProcessServer

from petsage_grpc import LIVENESS, OVERALL, READINESS, ServingStatus, add_to_server
from petsage_grpc._durations import format_go_duration, parse_go_duration

PROBE_TIMEOUT: Final = 30.0
"""Bound on one probe subprocess; every probe here finishes in a few seconds at most."""
FAST_FAIL: Final = "-connect-timeout=300ms"
"""For probes that are expected not to connect: keeps the wait short."""
PATIENT: Final = ("-connect-timeout=10s", "-rpc-timeout=10s")
"""Timeouts for a probe whose answer, not its deadline, is under test (within PROBE_TIMEOUT)."""
SERVER_NAME: Final = "petsage.test"
"""The DNS name in the throwaway server certificate (and nothing else: not 127.0.0.1)."""

PYTHON_M: Final = (sys.executable, "-m", "petsage_grpc", "probe")
_SCRIPT = shutil.which("petsage-grpc", path=str(Path(sys.executable).parent))
CONSOLE_SCRIPT: Final = (_SCRIPT, "probe") if _SCRIPT else None

COMMANDS: Final = [
    pytest.param(PYTHON_M, id="python-m"),
    pytest.param(
        CONSOLE_SCRIPT or (),
        id="console-script",
        marks=pytest.mark.skipif(
            CONSOLE_SCRIPT is None, reason="no petsage-grpc script next to sys.executable"
        ),
    ),
]


@dataclass(frozen=True)
class ProbeRun:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()


def probe(*args: str, command: tuple[str, ...] = PYTHON_M) -> ProbeRun:
    """Run the probe with *args* as a subprocess and return its exit code and output.

    A call that sets neither timeout nor asks for -v (which prints them) gets PATIENT
    ones first: the defaults of 1 s are the kubelet's, and a loaded machine can miss them
    when what is tested is the answer, not the deadline.
    """
    named = {arg.lstrip("-").split("=")[0] for arg in args if arg.startswith("-")}
    if "addr" in named and not named & {"connect-timeout", "rpc-timeout", "v"}:
        args = (*PATIENT, *args)
    done = subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        check=False,
    )
    return ProbeRun(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def dead_port() -> int:
    """A loopback port that nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- servers the in-process fixture cannot build ----------------------------------------


Setup = Callable[[grpc.aio.Server], int]
"""Adds services and a port to a not yet started server; returns the port."""


@dataclass
class AioServers:
    """grpc.aio servers on one event loop thread, stopped when the test ends."""

    loop: asyncio.AbstractEventLoop
    servers: list[grpc.aio.Server] = field(default_factory=list)

    def run(self, coro: Awaitable[Any]) -> Any:
        async def wrapped() -> Any:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(30)

    def start(
        self,
        setup: Setup,
        *,
        options: tuple[tuple[str, Any], ...] = (),
        interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
    ) -> int:
        """Build a server with *setup* on the loop, start it and return its port."""

        async def build() -> tuple[grpc.aio.Server, int]:
            server = grpc.aio.server(
                options=(("grpc.so_reuseport", 0), *options), interceptors=interceptors
            )
            port = setup(server)
            await server.start()
            return server, port

        server, port = self.run(build())
        self.servers.append(server)
        assert isinstance(port, int)
        assert port > 0
        return port


@pytest.fixture
def aio_servers() -> Iterator[AioServers]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="probe-test-servers", daemon=True)
    thread.start()
    servers = AioServers(loop)
    yield servers
    for server in servers.servers:
        servers.run(server.stop(None))
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def petsage_on_loopback(server: grpc.aio.Server) -> int:
    add_to_server(server)
    return server.add_insecure_port("127.0.0.1:0")


class MetadataRecorder(grpc.aio.ServerInterceptor):
    """Records the method and request metadata of every call the server receives."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        metadata = {
            str(key): value if isinstance(value, str) else value.decode()
            for key, value in handler_call_details.invocation_metadata
        }
        self.calls.append((handler_call_details.method, metadata))
        return await continuation(handler_call_details)


# -- exit codes -------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_serving_exits_0(command: tuple[str, ...], server: InProcessServer) -> None:
    run = probe(f"-addr={server.address}", command=command)
    assert run.code == 0, run.stderr
    assert run.lines == ["status: SERVING"]
    assert run.stdout == ""


@pytest.mark.parametrize("command", COMMANDS)
def test_not_serving_exits_4(command: tuple[str, ...], server: InProcessServer) -> None:
    server.board.set(READINESS, ServingStatus.NOT_SERVING)

    run = probe(f"-addr={server.address}", f"-service={READINESS}", command=command)

    assert run.code == 4, run.stderr
    assert 'service unhealthy (responded with "NOT_SERVING")' in run.lines
    assert run.stdout == ""
    # The other names on the same server are unaffected.
    assert probe(f"-addr={server.address}", f"-service={LIVENESS}").code == 0


def test_whole_server_not_serving_exits_4(server: InProcessServer) -> None:
    server.board.set(OVERALL, ServingStatus.NOT_SERVING)
    run = probe(f"-addr={server.address}")
    assert run.code == 4, run.stderr
    assert 'service unhealthy (responded with "NOT_SERVING")' in run.lines


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_service_exits_3(command: tuple[str, ...], server: InProcessServer) -> None:
    run = probe(f"-addr={server.address}", "-service=petsage.v1.NoSuchService", command=command)
    assert run.code == 3, run.stderr
    assert any(
        line.startswith("error: health rpc failed: rpc error: code = NotFound")
        for line in run.lines
    ), run.stderr
    assert run.stdout == ""


@pytest.mark.parametrize("command", COMMANDS)
def test_dead_port_exits_2(command: tuple[str, ...], dead_port: int) -> None:
    address = f"127.0.0.1:{dead_port}"
    run = probe(f"-addr={address}", FAST_FAIL, command=command)
    assert run.code == 2, run.stderr
    assert f'timeout: failed to connect service "{address}" within 300ms' in run.lines
    assert run.stdout == ""


def test_server_without_health_service_exits_3() -> None:
    bare = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)]
    )
    port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    try:
        run = probe(f"-addr=127.0.0.1:{port}")
    finally:
        bare.stop(None)
    assert run.code == 3, run.stderr
    assert any(
        line.startswith(
            "error: this server does not implement the grpc health protocol (grpc.health.v1.Health)"
        )
        for line in run.lines
    ), run.stderr


def test_slow_check_exits_3_after_the_rpc_timeout(aio_servers: AioServers) -> None:
    async def never_answers(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await asyncio.sleep(60)  # cancelled when the probe's deadline passes
        return b""

    def setup(server: grpc.aio.Server) -> int:
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "grpc.health.v1.Health",
                    {"Check": grpc.unary_unary_rpc_method_handler(never_answers)},
                ),
            )
        )
        return server.add_insecure_port("127.0.0.1:0")

    port = aio_servers.start(setup)
    run = probe(f"-addr=127.0.0.1:{port}", "-rpc-timeout=200ms")
    assert run.code == 3, run.stderr
    assert "timeout: health rpc did not complete within 200ms" in run.lines


def test_unix_socket_address(aio_servers: AioServers, tmp_path: Path) -> None:
    path = tmp_path / "health.sock"

    def setup(server: grpc.aio.Server) -> int:
        add_to_server(server)
        return server.add_insecure_port(f"unix:{path}")

    aio_servers.start(setup)
    run = probe(f"-addr=unix://{path}")
    assert run.code == 0, run.stderr
    assert run.lines == ["status: SERVING"]


# -- argument errors: exit 1 before connecting -------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param([], "error: -addr not specified", id="no-addr"),
        pytest.param(["-service=liveness"], "error: -addr not specified", id="only-service"),
        pytest.param(["-addr"], "flag needs an argument: -addr", id="addr-without-value"),
        pytest.param(["-addr=x", "-nope"], "flag provided but not defined: -nope", id="unknown"),
        pytest.param(["--addr=x", "--port=1"], "flag provided but not defined: -port", id="unk2"),
        pytest.param(["---addr=x"], "bad flag syntax: ---addr=x", id="three-dashes"),
        pytest.param(["-=x"], "bad flag syntax: -=x", id="no-name"),
        pytest.param(
            ["-addr=x", "-connect-timeout=5"],
            'invalid value "5" for flag -connect-timeout',
            id="duration-without-unit",
        ),
        pytest.param(
            ["-addr=x", "-rpc-timeout", "1x"],
            'invalid value "1x" for flag -rpc-timeout',
            id="duration-bad-unit",
        ),
        pytest.param(
            ["-addr=x", "-rpc-timeout="],
            'invalid value "" for flag -rpc-timeout',
            id="duration-empty",
        ),
        pytest.param(
            ["-addr=x", "-connect-timeout=0"],
            "error: -connect-timeout must be greater than zero (specified: 0s)",
            id="connect-timeout-0",
        ),
        pytest.param(
            ["-addr=x", "-rpc-timeout=-1s"],
            "error: -rpc-timeout must be greater than zero (specified: -1s)",
            id="rpc-timeout-negative",
        ),
        pytest.param(["-addr=x", "-tls=maybe"], "for -tls: parse error", id="bad-bool"),
        pytest.param(
            ["-addr=x", "-tls-ca-cert=ca.pem"],
            "error: specified -tls-ca-cert without specifying -tls",
            id="ca-without-tls",
        ),
        pytest.param(
            ["-addr=x", "-tls-no-verify"],
            "error: specified -tls-no-verify without specifying -tls",
            id="no-verify-without-tls",
        ),
        pytest.param(
            ["-addr=x", "-tls-server-name=petsage.test"],
            "error: specified -tls-server-name without specifying -tls",
            id="server-name-without-tls",
        ),
        pytest.param(
            ["-addr=x", "-tls-client-cert=c.pem", "-tls-client-key=k.pem"],
            "error: specified -tls-client-cert without specifying -tls",
            id="client-cert-without-tls",
        ),
        pytest.param(
            ["-addr=x", "-tls", "-tls-client-cert=c.pem"],
            "error: specified -tls-client-cert without specifying -tls-client-key",
            id="cert-without-key",
        ),
        pytest.param(
            ["-addr=x", "-tls", "-tls-client-key=k.pem"],
            "error: specified -tls-client-key without specifying -tls-client-cert",
            id="key-without-cert",
        ),
        pytest.param(
            ["-addr=x", "-tls", "-tls-no-verify", "-tls-ca-cert=ca.pem"],
            "error: cannot specify -tls-ca-cert with -tls-no-verify (CA cert would not be used)",
            id="no-verify-and-ca",
        ),
        pytest.param(
            ["-addr=x", "-tls", "-tls-no-verify", "-tls-server-name=petsage.test"],
            "error: cannot specify -tls-server-name with -tls-no-verify "
            "(server name would not be used)",
            id="no-verify-and-server-name",
        ),
        pytest.param(
            ["-addr=x", "-rpc-header", "x-test 1"],
            'invalid value "x-test 1" for flag -rpc-header',
            id="header-without-colon",
        ),
    ],
)
def test_invalid_arguments_exit_1(args: list[str], message: str) -> None:
    run = probe(*args)
    assert run.code == 1, run.stderr
    assert any(message in line for line in run.lines), run.stderr
    assert run.stdout == ""


def test_bad_boolean_message_is_go_s() -> None:
    run = probe("-addr=x", "-tls=maybe")
    assert run.code == 1, run.stderr
    assert any('invalid boolean value "maybe" for -tls: parse error' in ln for ln in run.lines)


def test_help_lists_every_flag() -> None:
    run = probe("-help")
    for flag in (
        "-addr",
        "-service",
        "-connect-timeout",
        "-rpc-timeout",
        "-rpc-header",
        "-user-agent",
        "-tls",
        "-tls-no-verify",
        "-tls-ca-cert",
        "-tls-client-cert",
        "-tls-client-key",
        "-tls-server-name",
        "-gzip",
        "-v",
        "-version",
    ):
        assert f"  {flag} " in run.stderr or f"  {flag}\n" in run.stderr, flag


@pytest.mark.parametrize("flag", ["-help", "-h", "--help"])
def test_help_exits_1_as_go_does(flag: str) -> None:
    assert probe(flag).code == 1


def test_unreadable_ca_file_exits_1(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.pem"
    run = probe("-addr=127.0.0.1:1", "-tls", f"-tls-ca-cert={missing}")
    assert run.code == 1, run.stderr
    assert any(line.startswith("failed to initialize tls credentials") for line in run.lines)


# -- Go flag syntax ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        pytest.param(["-addr={addr}", "-service={service}", "-connect-timeout=5s"], id="-f=v"),
        pytest.param(["--addr={addr}", "--service={service}", "--connect-timeout=5s"], id="--f=v"),
        pytest.param(["-addr", "{addr}", "-service", "{service}", "-rpc-timeout", "5s"], id="-f v"),
        pytest.param(["--addr", "{addr}", "--service", "{service}"], id="--f v"),
        pytest.param(["-service", "{service}", "--addr={addr}", "-v=false"], id="mixed"),
        pytest.param(["-addr=:{port}", "-service={service}"], id="empty-host"),
    ],
)
def test_flag_syntaxes_are_equivalent(template: list[str], server: InProcessServer) -> None:
    # readiness NOT_SERVING while "" is SERVING: exit 4 shows that -service was read too.
    server.board.set(READINESS, ServingStatus.NOT_SERVING)
    values = {"addr": server.address, "port": str(server.port), "service": READINESS}
    run = probe(*(part.format(**values) for part in template))
    assert run.code == 4, run.stderr
    assert 'service unhealthy (responded with "NOT_SERVING")' in run.lines


def test_empty_host_means_this_machine(server: InProcessServer) -> None:
    run = probe(f"-addr=:{server.port}")
    assert run.code == 0, run.stderr
    assert run.lines == ["status: SERVING"]


def test_parsing_stops_at_the_first_non_flag_argument(server: InProcessServer) -> None:
    # As Go's flag package: "-service=..." after a positional argument is not a flag, so
    # the probe checks "" (SERVING) and never sees the unknown service name.
    run = probe(f"-addr={server.address}", "positional", "-service=petsage.v1.NoSuchService")
    assert run.code == 0, run.stderr
    assert run.lines == ["status: SERVING"]


def test_double_dash_ends_the_flags(server: InProcessServer) -> None:
    run = probe(f"-addr={server.address}", "--", "-nope")
    assert run.code == 0, run.stderr


# -- headers, user agent, compression, verbosity, version ---------------------------------


def test_rpc_headers_are_sent(aio_servers: AioServers) -> None:
    recorder = MetadataRecorder()
    port = aio_servers.start(petsage_on_loopback, interceptors=(recorder,))

    run = probe(f"-addr=127.0.0.1:{port}", "-rpc-header", "x-test: 1", "-rpc-header=x-team:pets")

    assert run.code == 0, run.stderr
    assert len(recorder.calls) == 1
    method, metadata = recorder.calls[0]
    assert method == "/grpc.health.v1.Health/Check"
    assert metadata["x-test"] == "1"
    assert metadata["x-team"] == "pets"


def test_user_agent(aio_servers: AioServers) -> None:
    recorder = MetadataRecorder()
    port = aio_servers.start(petsage_on_loopback, interceptors=(recorder,))

    default = probe(f"-addr=127.0.0.1:{port}")
    custom = probe(f"-addr=127.0.0.1:{port}", "-user-agent", "kube-probe/1.30")

    assert (default.code, custom.code) == (0, 0), default.stderr + custom.stderr
    agents = [metadata["user-agent"] for _, metadata in recorder.calls]
    assert len(agents) == 2
    assert agents[0].startswith("grpc_health_probe")
    assert agents[1].startswith("kube-probe/1.30")


def test_gzip_compresses_the_request(aio_servers: AioServers, server: InProcessServer) -> None:
    # A server that accepts only uncompressed messages refuses the gzip-compressed request:
    # proof that -gzip really compresses. The PetSage server accepts it.
    identity_only = aio_servers.start(
        petsage_on_loopback, options=(("grpc.compression_enabled_algorithms_bitset", 1),)
    )

    refused = probe(f"-addr=127.0.0.1:{identity_only}", "-gzip")
    plain = probe(f"-addr=127.0.0.1:{identity_only}")
    accepted = probe(f"-addr={server.address}", "-gzip")

    assert refused.code == 3, refused.stderr
    assert "gzip" in refused.stderr
    assert plain.code == 0, plain.stderr
    assert accepted.code == 0, accepted.stderr
    assert "status: SERVING" in accepted.lines


def test_verbose(server: InProcessServer) -> None:
    run = probe(f"-addr={server.address}", "-v")
    assert run.code == 0, run.stderr
    assert run.lines[0] == "parsed options:"
    assert f"> addr={server.address} conn_timeout=1s rpc_timeout=1s" in run.lines
    assert "> tls=false" in run.lines
    assert any(line.startswith("time elapsed: connect=") for line in run.lines)
    assert run.lines[-1] == "status: SERVING"


@pytest.mark.parametrize("command", COMMANDS)
def test_version(command: tuple[str, ...]) -> None:
    run = probe("-version", command=command)
    assert run.code == 0, run.stderr
    assert version("petsage-grpc") in run.stdout + run.stderr


# -- TLS --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A throwaway CA, a server certificate for SERVER_NAME and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    garbage: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, check=True, timeout=60)


def _issue(directory: Path, name: str, subject: str, extensions: str) -> None:
    _openssl(
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
        subject,
        cwd=directory,
    )
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.pem",
        cwd=directory,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    directory = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=PetSage Test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    _issue(
        directory,
        "server",
        f"/CN={SERVER_NAME}",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName=DNS:{SERVER_NAME}\n",
    )
    _issue(
        directory,
        "client",
        "/CN=petsage-probe",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\n",
    )
    garbage = directory / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        garbage=garbage,
    )


def _tls_server(pki: Pki, *, require_client_auth: bool = False) -> Setup:
    def setup(server: grpc.aio.Server) -> int:
        add_to_server(server)
        credentials = grpc.ssl_server_credentials(
            [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
            root_certificates=pki.ca.read_bytes() if require_client_auth else None,
            require_client_auth=require_client_auth,
        )
        return server.add_secure_port("127.0.0.1:0", credentials)

    return setup


@pytest.fixture
def tls_port(aio_servers: AioServers, pki: Pki) -> int:
    return aio_servers.start(_tls_server(pki))


def test_tls_with_ca_and_server_name(tls_port: int, pki: Pki) -> None:
    run = probe(
        f"-addr=127.0.0.1:{tls_port}",
        "-tls",
        f"-tls-ca-cert={pki.ca}",
        f"-tls-server-name={SERVER_NAME}",
        "-connect-timeout=5s",
    )
    assert run.code == 0, run.stderr
    assert "status: SERVING" in run.lines


def test_tls_verbose_prints_tls_options(tls_port: int, pki: Pki) -> None:
    run = probe(
        f"-addr=127.0.0.1:{tls_port}",
        "-tls",
        f"-tls-ca-cert={pki.ca}",
        f"-tls-server-name={SERVER_NAME}",
        "-v",
    )
    assert run.code == 0, run.stderr
    assert "> tls=true" in run.lines


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["-tls"], id="untrusted-ca"),
        pytest.param(["-tls", "-tls-ca-cert={ca}"], id="name-mismatch"),
        pytest.param(["-tls", "-tls-ca-cert={ca}", "-tls-server-name=other.test"], id="wrong-name"),
        pytest.param([], id="plaintext-to-tls"),
    ],
)
def test_tls_verification_failure_is_a_connection_failure(
    args: list[str], tls_port: int, pki: Pki
) -> None:
    run = probe(f"-addr=127.0.0.1:{tls_port}", FAST_FAIL, *(arg.format(ca=pki.ca) for arg in args))
    assert run.code == 2, run.stderr
    assert f'timeout: failed to connect service "127.0.0.1:{tls_port}"' in run.stderr


def test_tls_probe_against_plaintext_server(server: InProcessServer, pki: Pki) -> None:
    run = probe(
        f"-addr={server.address}",
        FAST_FAIL,
        "-tls",
        f"-tls-ca-cert={pki.ca}",
        f"-tls-server-name={SERVER_NAME}",
    )
    assert run.code == 2, run.stderr


def test_mutual_tls(aio_servers: AioServers, pki: Pki) -> None:
    port = aio_servers.start(_tls_server(pki, require_client_auth=True))
    common = (
        f"-addr=127.0.0.1:{port}",
        "-tls",
        f"-tls-ca-cert={pki.ca}",
        f"-tls-server-name={SERVER_NAME}",
    )

    with_client_cert = probe(
        *common, f"-tls-client-cert={pki.client_cert}", f"-tls-client-key={pki.client_key}"
    )
    without_client_cert = probe(*common, FAST_FAIL)

    assert with_client_cert.code == 0, with_client_cert.stderr
    assert "status: SERVING" in with_client_cert.lines
    assert without_client_cert.code in {2, 3}, without_client_cert.stderr


def test_tls_no_verify(tls_port: int) -> None:
    # The certificate is neither trusted nor issued for 127.0.0.1: only skipping the
    # verification, as grpc_health_probe -tls-no-verify does, gets an answer.
    run = probe(f"-addr=127.0.0.1:{tls_port}", "-tls", "-tls-no-verify", "-connect-timeout=5s")
    assert run.code == 0, run.stderr
    assert "status: SERVING" in run.lines


def test_tls_no_verify_reports_the_server_s_answer(tls_port: int) -> None:
    unknown = probe(
        f"-addr=127.0.0.1:{tls_port}", "-tls", "-tls-no-verify", "-service=petsage.v1.Nope"
    )
    assert unknown.code == 3, unknown.stderr
    assert "code = NotFound" in unknown.stderr


def test_tls_no_verify_with_client_certificate(aio_servers: AioServers, pki: Pki) -> None:
    port = aio_servers.start(_tls_server(pki, require_client_auth=True))
    run = probe(
        f"-addr=127.0.0.1:{port}",
        "-tls",
        "-tls-no-verify",
        f"-tls-client-cert={pki.client_cert}",
        f"-tls-client-key={pki.client_key}",
        "-connect-timeout=5s",
    )
    assert run.code == 0, run.stderr


@pytest.mark.parametrize("target", ["plaintext", "dead"])
def test_tls_no_verify_connection_failures_exit_2(
    target: str, server: InProcessServer, dead_port: int
) -> None:
    port = server.port if target == "plaintext" else dead_port
    run = probe(f"-addr=127.0.0.1:{port}", "-tls", "-tls-no-verify", FAST_FAIL)
    assert run.code == 2, run.stderr


# Many short HTTP/2 connections through the -tls-no-verify relay, each with one Check,
# stopping at the first that gets no answer. Runs in its own interpreter: a failure here
# can be a crash (heap corruption) rather than an exception.
_RELAY_STRESS: Final = r"""
import socket, struct, sys
from grpc_health.v1 import health_pb2
from hpack import Encoder
from hyperframe.frame import DataFrame, Frame, HeadersFrame, SettingsFrame
from petsage_grpc.cli._tls_relay import start_unverified_tls_relay

port, attempts = int(sys.argv[1]), int(sys.argv[2])
relay = start_unverified_tls_relay("127.0.0.1", port, cert=None, key=None, timeout=5)
host, _, relay_port = relay.rpartition(":")
headers = HeadersFrame(1, flags=["END_HEADERS"])
headers.data = Encoder().encode([
    (":method", "POST"), (":scheme", "http"), (":authority", "petsage"),
    (":path", "/grpc.health.v1.Health/Check"), ("content-type", "application/grpc"),
    ("te", "trailers"),
])
body = health_pb2.HealthCheckRequest(service="").SerializeToString()
data = DataFrame(1, data=struct.pack(">BI", 0, len(body)) + body, flags=["END_STREAM"])
request = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize()
           + headers.serialize() + data.serialize())
serving = health_pb2.HealthCheckResponse(status="SERVING").SerializeToString()

def one_check():
    with socket.create_connection((host, int(relay_port)), timeout=2) as sock:
        sock.sendall(request)
        buffer, answer = b"", b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return "connection closed"
            buffer += chunk
            while len(buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
                if len(buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(buffer[9 : 9 + length]))
                buffer = buffer[9 + length :]
                if frame.type == 4 and "ACK" not in frame.flags:
                    sock.sendall(SettingsFrame(0, flags=["ACK"]).serialize())
                if frame.stream_id != 1:
                    continue
                if frame.type == 3:
                    return "stream reset"
                if frame.type == 0:
                    answer += frame.data
                if "END_STREAM" in frame.flags:
                    return "ok" if answer[5:] == serving else f"bad answer {answer!r}"

for attempt in range(attempts):
    try:
        outcome = one_check()
    except OSError as error:
        outcome = repr(error)
    if outcome != "ok":
        print(f"check {attempt}: {outcome}", flush=True)
        sys.exit(1)
print(f"{attempts} checks answered", flush=True)
"""


@pytest.mark.slow
def test_tls_no_verify_relay_survives_many_connections(tls_port: int) -> None:
    attempts = 1500
    done = subprocess.run(
        [sys.executable, "-c", _RELAY_STRESS, str(tls_port), str(attempts)],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
        check=False,
    )
    if "ImportError" in done.stderr or "TypeError" in done.stderr:
        # Not a relay failure: its interface changed. Say so, rather than fail the assertion.
        raise RuntimeError(f"update this test for the new relay:\n{done.stderr[-2000:]}")
    assert done.returncode == 0, f"exit {done.returncode}: {done.stdout}{done.stderr[-2000:]}"
    assert done.stdout.strip() == f"{attempts} checks answered"


def test_ca_file_without_certificates_exits_1(tls_port: int, pki: Pki) -> None:
    run = probe(
        f"-addr=127.0.0.1:{tls_port}",
        FAST_FAIL,
        "-tls",
        f"-tls-ca-cert={pki.garbage}",
        f"-tls-server-name={SERVER_NAME}",
    )
    assert run.code == 1, run.stderr
    assert "failed to initialize tls credentials" in run.stderr


def test_mismatched_client_key_pair_exits_1(aio_servers: AioServers, pki: Pki) -> None:
    port = aio_servers.start(_tls_server(pki, require_client_auth=True))
    run = probe(
        f"-addr=127.0.0.1:{port}",
        FAST_FAIL,
        "-tls",
        f"-tls-ca-cert={pki.ca}",
        f"-tls-server-name={SERVER_NAME}",
        f"-tls-client-cert={pki.client_cert}",
        f"-tls-client-key={pki.server_key}",
    )
    assert run.code == 1, run.stderr
    assert "failed to initialize tls credentials" in run.stderr


# -- grpc-js servers (a second gRPC implementation), plaintext and TLS --------------------

NODE: Final = shutil.which("node")
NODE_SERVER: Final = ROOT / "tests" / "interop" / "health_server.js"
_NODE_MISSING: Final = (
    NODE is None or not (ROOT / "node_modules" / "@grpc" / "grpc-js" / "package.json").is_file()
)


@pytest.fixture
def grpc_js(pki: Pki) -> Iterator[Callable[[bool], int]]:
    """Start grpc-js health servers (TLS: the test PKI's server certificate); return ports."""
    if _NODE_MISSING:
        pytest.skip("node or node_modules/@grpc/grpc-js missing: run npm ci")
    assert NODE is not None
    started: list[subprocess.Popen[str]] = []

    def start(tls: bool) -> int:
        tls_args = [str(pki.server_cert), str(pki.server_key)] if tls else []
        process = subprocess.Popen(
            [NODE, str(NODE_SERVER), *tls_args],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        started.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()  # bounded: the server prints it or exits
        assert line.startswith("serving on 127.0.0.1:"), f"grpc-js server: {line!r}"
        return int(line.rsplit(":", 1)[1])

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


_GRPC_JS_CASES: Final = [
    pytest.param([], 0, "status: SERVING", id="serving"),
    pytest.param([f"-service={LIVENESS}"], 0, "status: SERVING", id="liveness"),
    pytest.param(
        [f"-service={READINESS}"],
        4,
        'service unhealthy (responded with "NOT_SERVING")',
        id="not-serving",
    ),
    pytest.param(
        ["-service=petsage.v1.Nope"],
        3,
        "error: health rpc failed: rpc error: code = NotFound",
        id="unknown-service",
    ),
    pytest.param(["-gzip"], 0, "status: SERVING", id="gzip"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "code", "line"), _GRPC_JS_CASES)
@pytest.mark.parametrize("security", ["plaintext", "tls", "tls-no-verify"])
def test_against_grpc_js(
    args: list[str],
    code: int,
    line: str,
    *,
    security: str,
    grpc_js: Callable[[bool], int],
    pki: Pki,
) -> None:
    port = grpc_js(security != "plaintext")
    tls_args = {
        "plaintext": [],
        "tls": ["-tls", f"-tls-ca-cert={pki.ca}", f"-tls-server-name={SERVER_NAME}"],
        "tls-no-verify": ["-tls", "-tls-no-verify"],
    }[security]
    run = probe(f"-addr=127.0.0.1:{port}", "-connect-timeout=5s", *tls_args, *args)
    assert run.code == code, run.stderr
    assert any(printed.startswith(line) for printed in run.lines), run.stderr


@pytest.mark.slow
def test_grpc_js_tls_mismatch_exits_2(grpc_js: Callable[[bool], int], pki: Pki) -> None:
    tls_port, plain_port = grpc_js(True), grpc_js(False)
    untrusted = probe(f"-addr=127.0.0.1:{tls_port}", FAST_FAIL, "-tls")
    plaintext_to_tls = probe(f"-addr=127.0.0.1:{tls_port}", FAST_FAIL)
    tls_to_plaintext = probe(
        f"-addr=127.0.0.1:{plain_port}", FAST_FAIL, "-tls", f"-tls-ca-cert={pki.ca}"
    )
    for run in (untrusted, plaintext_to_tls, tls_to_plaintext):
        assert run.code == 2, run.stderr
        assert "timeout: failed to connect service" in run.stderr


# -- servers that answer oddly: HTTP/1, HTTP/2 that is not gRPC, resets, GOAWAY --------------

Answer = Callable[[Any, int], None]
"""Answers a request on a server-side h2 connection: (connection, stream id)."""


class OddServer:
    """A loopback server speaking raw HTTP/2 (h2, server side) or raw bytes, one thread."""

    def __init__(self, answer: Answer | None = None, *, raw: bytes | None = None) -> None:
        self._answer, self._raw = answer, raw
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self.requests: list[dict[bytes, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="odd-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            with sock:
                sock.settimeout(5)
                with contextlib.suppress(OSError):  # the probe hung up: the next one may come
                    self._one(sock)

    def _one(self, sock: socket.socket) -> None:
        if self._raw is not None:
            sock.recv(65536)
            sock.sendall(self._raw)
            return
        assert self._answer is not None
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        headers: dict[bytes, bytes] = {}
        while data := sock.recv(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    headers = dict(event.headers or ())
                elif isinstance(event, h2.events.StreamEnded):
                    self.requests.append(headers)
                    self._answer(conn, event.stream_id)
            sock.sendall(conn.data_to_send())


@pytest.fixture
def odd_server() -> Iterator[Callable[..., OddServer]]:
    servers: list[OddServer] = []

    def start(answer: Answer | None = None, *, raw: bytes | None = None) -> OddServer:
        servers.append(OddServer(answer, raw=raw))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


_GRPC_HEADERS: Final = [(b":status", b"200"), (b"content-type", b"application/grpc")]


def _grpc_message(payload: bytes, *, compressed: bool = False) -> bytes:
    return struct.pack(">BI", int(compressed), len(payload)) + payload


def _answer_ok(*messages: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> Answer:
    def answer(conn: Any, stream: int) -> None:
        conn.send_headers(stream, headers or _GRPC_HEADERS)
        for message in messages:
            conn.send_data(stream, message)
        conn.send_headers(stream, [(b"grpc-status", b"0")], end_stream=True)

    return answer


def _trailers_only(status: int, message: str) -> Answer:
    def answer(conn: Any, stream: int) -> None:
        conn.send_headers(
            stream,
            [*_GRPC_HEADERS, (b"grpc-status", str(status).encode()), (b"grpc-message", message)],
            end_stream=True,
        )

    return answer


def _ping_first(conn: Any, stream: int) -> None:
    conn.ping(b"petsage!")  # the probe must acknowledge it and still read the answer
    _answer_ok(_grpc_message(SERVING_MESSAGE))(conn, stream)


def _not_grpc(conn: Any, stream: int) -> None:
    conn.send_headers(stream, [(b":status", b"404"), (b"content-type", b"text/html")])
    conn.send_data(stream, b"<html>not found</html>", end_stream=True)


def _reset(conn: Any, stream: int) -> None:
    conn.reset_stream(stream, 7)  # REFUSED_STREAM


def _goaway(conn: Any, stream: int) -> None:
    conn.close_connection(error_code=0, last_stream_id=0)  # NO_ERROR, but not this stream


SERVING_MESSAGE: Final = b"\x08\x01"
"""HealthCheckResponse{status: SERVING} on the wire."""


@pytest.mark.parametrize(
    ("answer", "code", "line"),
    [
        pytest.param(_answer_ok(_grpc_message(SERVING_MESSAGE)), 0, "status: SERVING", id="ok"),
        pytest.param(
            _answer_ok(_grpc_message(b"\x08\x01\x12\x03new\x18\x05")),
            0,
            "status: SERVING",
            id="unknown-fields-skipped",
        ),
        pytest.param(
            _answer_ok(_grpc_message(b"\x08\x07")),
            4,
            'service unhealthy (responded with "7")',
            id="unknown-enum-value",
        ),
        pytest.param(
            _answer_ok(_grpc_message(b"")),
            4,
            'service unhealthy (responded with "UNKNOWN")',
            id="empty-message-is-unknown",
        ),
        pytest.param(
            _trailers_only(5, "unknown%20service"),
            3,
            "error: health rpc failed: rpc error: code = NotFound desc = unknown service",
            id="trailers-only",
        ),
        pytest.param(
            _trailers_only(5, "x" * 40_000),  # h2 splits it: HEADERS + CONTINUATION frames
            3,
            "error: health rpc failed: rpc error: code = NotFound desc = xxxxxxxx",
            id="header-block-in-continuation-frames",
        ),
        pytest.param(_ping_first, 0, "status: SERVING", id="ping-before-the-answer"),
        pytest.param(
            _trailers_only(16, "no token"),
            3,
            "error: health rpc failed: rpc error: code = Unauthenticated desc = no token",
            id="unauthenticated",
        ),
        pytest.param(
            _not_grpc,
            3,
            "error: this server does not implement the grpc health protocol",
            id="http2-not-grpc",
        ),
        pytest.param(
            _reset, 3, "error: health rpc failed: rpc error: code = Unavailable", id="rst"
        ),
        pytest.param(
            _goaway, 3, "error: health rpc failed: rpc error: code = Unavailable", id="goaway"
        ),
        pytest.param(
            _answer_ok(_grpc_message(SERVING_MESSAGE), _grpc_message(SERVING_MESSAGE)),
            3,
            "error: health rpc failed: rpc error: code = Internal",
            id="two-messages",
        ),
        pytest.param(
            _answer_ok(),
            3,
            "error: health rpc failed: rpc error: code = Internal",
            id="no-message",
        ),
        pytest.param(
            _answer_ok(_grpc_message(b"\x08")),
            3,
            "error: health rpc failed: rpc error: code = Internal",
            id="truncated-message",
        ),
        pytest.param(
            _answer_ok(_grpc_message(gzip.compress(SERVING_MESSAGE), compressed=True)),
            3,
            "error: health rpc failed: rpc error: code = Internal",
            id="compressed-without-grpc-encoding",
        ),
        pytest.param(
            _answer_ok(
                _grpc_message(gzip.compress(SERVING_MESSAGE), compressed=True),
                headers=[*_GRPC_HEADERS, (b"grpc-encoding", b"gzip")],
            ),
            0,
            "status: SERVING",
            id="gzip-answer",
        ),
    ],
)
def test_odd_http2_answers(
    answer: Answer, code: int, line: str, odd_server: Callable[..., OddServer]
) -> None:
    server = odd_server(answer)
    run = probe(f"-addr=127.0.0.1:{server.port}", "-gzip")
    assert run.code == code, run.stderr
    assert any(printed.startswith(line) for printed in run.lines), run.stderr


def test_the_request_is_grpc_over_http2(odd_server: Callable[..., OddServer]) -> None:
    server = odd_server(_answer_ok(_grpc_message(SERVING_MESSAGE)))
    run = probe(f"-addr=127.0.0.1:{server.port}", "-service=readiness", "-rpc-timeout=2s", "-gzip")
    assert run.code == 0, run.stderr
    (request,) = server.requests
    assert request[b":method"] == b"POST"
    assert request[b":path"] == b"/grpc.health.v1.Health/Check"
    assert request[b":authority"] == f"127.0.0.1:{server.port}".encode()
    assert request[b"content-type"] == b"application/grpc"
    assert request[b"te"] == b"trailers"
    assert request[b"grpc-timeout"] == b"2000m"
    assert request[b"grpc-encoding"] == b"gzip"
    assert request[b"user-agent"] == b"grpc_health_probe"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n", id="http1"),
        pytest.param(b"", id="closes-at-once"),
    ],
)
def test_servers_that_do_not_speak_http2_exit_2(
    raw: bytes, odd_server: Callable[..., OddServer]
) -> None:
    server = odd_server(raw=raw)
    run = probe(f"-addr=127.0.0.1:{server.port}", FAST_FAIL)
    assert run.code == 2, run.stderr
    assert f'timeout: failed to connect service "127.0.0.1:{server.port}" within 300ms' in (
        run.lines
    )


def test_silent_server_exits_2(dead_port: int) -> None:
    # Accepts the TCP connection (the backlog does) but never says a word of HTTP/2.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        run = probe(f"-addr=127.0.0.1:{port}", FAST_FAIL)
    assert run.code == 2, run.stderr


class RefusingInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call whose authorization header is not the expected one."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        metadata = dict(handler_call_details.invocation_metadata or ())
        if metadata.get("authorization") == "Bearer right":
            return await continuation(handler_call_details)

        async def refuse(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")

        return grpc.unary_unary_rpc_method_handler(refuse)


def test_refused_auth_header_exits_3(aio_servers: AioServers) -> None:
    port = aio_servers.start(petsage_on_loopback, interceptors=(RefusingInterceptor(),))
    refused = probe(f"-addr=127.0.0.1:{port}", "-rpc-header=authorization: Bearer wrong")
    accepted = probe(f"-addr=127.0.0.1:{port}", "-rpc-header=authorization: Bearer right")
    assert refused.code == 3, refused.stderr
    assert (
        "error: health rpc failed: rpc error: code = Unauthenticated desc = bad token"
        in refused.lines
    )
    assert accepted.code == 0, accepted.stderr


# -- Go durations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("1s", 1.0),
        ("1.5s", 1.5),
        ("300ms", 0.3),
        ("1m30s", 90.0),
        ("2h45m", 9900.0),
        ("1h2m3.5s", 3723.5),
        ("+5s", 5.0),
        ("-1.5s", -1.5),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("1us", 1e-6),
        ("1µs", 1e-6),
        ("250ns", 2.5e-7),
        ("1s500ms", 1.5),
    ],
)
def test_parse_go_duration(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("text", ["5", "1x", "", "s", "-", ".s", "1.5", "1 s", "1S", "1sec"])
def test_parse_go_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_go_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (1.0, "1s"),
        (1.5, "1.5s"),
        (0.5, "500ms"),
        (0.3, "300ms"),
        (0.0015, "1.5ms"),
        (1e-6, "1µs"),
        (2.5e-7, "250ns"),
        (60.0, "1m0s"),
        (90.0, "1m30s"),
        (3600.0, "1h0m0s"),
        (9900.0, "2h45m0s"),
        (-1.5, "-1.5s"),
    ],
)
def test_format_go_duration(seconds: float, text: str) -> None:
    assert format_go_duration(seconds) == text


@pytest.mark.parametrize("text", ["1s", "1.5s", "300ms", "1m30s", "2h45m0s", "1µs", "250ns"])
def test_format_inverts_parse(text: str) -> None:
    assert format_go_duration(parse_go_duration(text)) == text


# -- the probe starts lean --------------------------------------------------------------

_SERVER_MODULES: Final = (
    "petsage_grpc.board",
    "petsage_grpc.services",
    "petsage_grpc.server",
    "petsage_grpc._generated",
)
"""Server-side modules; the probe (a Kubernetes exec probe) must load none of them."""


def _modules_after(code: str) -> dict[str, Any]:
    """Run *code* in a fresh interpreter; it prints a JSON object as its last line."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


_PROBE_IN_PROCESS: Final = """
import json, sys
import petsage_grpc.cli._main
before = sorted(sys.modules)
code = petsage_grpc.cli._main.main({argv!r})
print(json.dumps({{"code": code, "before": before, "after": sorted(sys.modules)}}))
"""


def test_probe_with_bad_arguments_loads_no_grpc() -> None:
    result = _modules_after(_PROBE_IN_PROCESS.format(argv=["probe", "-service=x"]))
    assert result["code"] == 1
    assert "grpc" not in result["before"]
    assert "grpc" not in result["after"]
    assert not set(_SERVER_MODULES) & set(result["after"])


_NOT_FOR_THE_PROBE: Final = (
    "grpc",
    "grpc_health",
    "grpc_reflection",
    "google.protobuf",
    "aiohttp",
    "asyncio",
    "argparse",
    "h2",
    "dataclasses",
    "inspect",
)
"""Heavy packages a Check over one HTTP/2 connection does not need (h2's state machine
and the dataclasses it is built on cost more than the whole probe)."""


def _heavy(loaded: set[str]) -> set[str]:
    return {
        name
        for name in loaded
        if name.startswith(_SERVER_MODULES)
        or any(name == top or name.startswith(f"{top}.") for top in _NOT_FOR_THE_PROBE)
    }


@pytest.mark.parametrize(
    "target",
    [pytest.param("serving", id="serving"), pytest.param("dead", id="no-server")],
)
def test_probe_loads_no_grpc_and_no_server_code(
    target: str, server: InProcessServer, dead_port: int
) -> None:
    port = server.port if target == "serving" else dead_port
    argv = ["probe", f"-addr=127.0.0.1:{port}", "-connect-timeout=50ms", "-gzip"]
    # The console script's path: petsage_grpc.__main__, then cli._main.
    code = _PROBE_IN_PROCESS.replace("petsage_grpc.cli._main", "petsage_grpc.__main__")
    result = _modules_after(code.format(argv=argv))

    assert result["code"] == (0 if target == "serving" else 2)
    loaded = set(result["after"])
    assert "petsage_grpc.cli._probe" in loaded
    assert {"hpack", "hyperframe.frame"} <= loaded
    assert not _heavy(loaded), sorted(_heavy(loaded))


def test_tls_probe_loads_no_grpc(tls_port: int) -> None:
    argv = ["probe", f"-addr=127.0.0.1:{tls_port}", "-tls", "-tls-no-verify"]
    result = _modules_after(_PROBE_IN_PROCESS.format(argv=argv))
    assert result["code"] == 0
    loaded = set(result["after"])
    assert "ssl" in loaded
    assert not _heavy(loaded), sorted(_heavy(loaded))
