"""The bearer token: what it protects (List, SmokeTest's check list, reflection) and what not.

Check and Watch never ask for it: kubelet probes and load balancers cannot send one.
Every behaviour is shown on the CLI server (``--auth-token-file``, ``[auth]`` in the
configuration file) and, where the library offers it, on an in-process server built
with ``add_to_server(auth_token=...)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
import pytest
from conftest import InProcessServer, ServerProcess
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hardening import (
    CHECK,
    LIST,
    REFLECTION_V1,
    REFLECTION_V1ALPHA,
    SMOKE_TEST,
    WATCH,
    Metadata,
    Outcome,
    call,
    check_request,
    plaintext,
    refuses_connections,
    serve_refused,
    wait_until,
)
from tcp_listener import free_port

from petsage_grpc import ServingStatus
from petsage_grpc._generated.petsage.v1 import smoke_test_service_pb2

SpawnServer = Callable[..., ServerProcess]
StartServer = Callable[..., InProcessServer]

TOKEN: Final = "psg-test-token-4c1f9a7e2b"  # noqa: S105 - a throwaway test token
"""Distinctive, so that a search of the server's log cannot miss it."""
ENV_TOKEN: Final = "psg-env-token-83d0c5aa19"  # noqa: S105
TOKEN_ENV_NAME: Final = "PETSAGE_TEST_AUTH_TOKEN_6E2"  # noqa: S105
CHECK_NAME: Final = "db"

RIGHT: Final[Metadata] = (("authorization", f"Bearer {TOKEN}"),)
WRONG_TOKENS: Final = (
    "Bearer not-the-token",
    f"Bearer {TOKEN}x",
    f"Bearer {TOKEN[:-1]}",
    f"Bearer {TOKEN.upper()}",
    f"Bearer{TOKEN}",
    f"Bearer {TOKEN} {TOKEN}",
    TOKEN,
    f"Basic {TOKEN}",
    f"Token {TOKEN}",
    "Bearer ",
    "",
)
"""Values of the authorization header that must not pass."""


def auth(value: str) -> Metadata:
    return (("authorization", value),)


# -- servers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Secured:
    """A server with a bearer token and one dependency check, however it was started."""

    address: str
    kind: str


def tcp_check_config(path: Path, extra: str = "") -> Path:
    """A configuration file with one non-critical ``tcp`` check (to a port nobody serves)."""
    path.write_text(
        f"""{extra}
[[checks]]
name = "{CHECK_NAME}"
kind = "tcp"
target = "127.0.0.1:{free_port()}"
interval = "1s"
timeout = "500ms"
critical = false
"""
    )
    return path


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n\n")  # surrounding whitespace and newlines are ignored
    return path


def _wait_for_check(address: str) -> None:
    with plaintext(address) as channel:
        wait_until(
            lambda: (
                call(channel, CHECK, check_request(f"check.{CHECK_NAME}")).code
                is grpc.StatusCode.OK
            ),
            "the dependency check to be registered",
        )


@pytest.fixture(params=["cli", "embedded"])
def secured(
    request: pytest.FixtureRequest,
    spawn_server: SpawnServer,
    start_server: StartServer,
    token_file: Path,
    tmp_path: Path,
) -> Secured:
    if request.param == "cli":
        config = tcp_check_config(tmp_path / "petsage.toml")
        server = spawn_server("--auth-token-file", str(token_file), "--config", str(config))
        _wait_for_check(server.address)
        return Secured(server.address, "cli")
    embedded = start_server(auth_token=TOKEN)
    embedded.board.set(f"check.{CHECK_NAME}", ServingStatus.NOT_SERVING)
    return Secured(embedded.address, "embedded")


@pytest.fixture
def channel(secured: Secured) -> Iterator[grpc.Channel]:
    with plaintext(secured.address) as channel:
        yield channel


# -- List --------------------------------------------------------------------------------


def test_list_without_a_token_is_unauthenticated(channel: grpc.Channel) -> None:
    outcome = call(channel, LIST, b"")
    assert outcome.code is grpc.StatusCode.UNAUTHENTICATED
    assert outcome.details == "missing or invalid bearer token"


@pytest.mark.slow
@pytest.mark.parametrize("value", WRONG_TOKENS)
def test_list_with_a_wrong_token_is_unauthenticated(channel: grpc.Channel, value: str) -> None:
    outcome = call(channel, LIST, b"", metadata=auth(value))
    assert outcome.code is grpc.StatusCode.UNAUTHENTICATED
    assert TOKEN not in outcome.details
    if value.strip():
        assert value.strip() not in outcome.details


def test_list_with_the_token_answers(channel: grpc.Channel) -> None:
    outcome = call(channel, LIST, b"", metadata=RIGHT)
    assert outcome.code is grpc.StatusCode.OK, outcome
    statuses = health_pb2.HealthListResponse.FromString(outcome.messages[0]).statuses
    assert ServingStatus(statuses["readiness"].status) is ServingStatus.SERVING
    assert ServingStatus(statuses[f"check.{CHECK_NAME}"].status) is ServingStatus.NOT_SERVING


@pytest.mark.parametrize(
    "value",
    [f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer  {TOKEN}", f" Bearer {TOKEN} "],
    ids=["lower-case-scheme", "upper-case-scheme", "two-spaces", "padded"],
)
def test_list_accepts_the_token_as_http_auth_allows_it(channel: grpc.Channel, value: str) -> None:
    """The scheme is case-insensitive (RFC 9110) and 1*SP may separate it (RFC 6750)."""
    assert call(channel, LIST, b"", metadata=auth(value)).code is grpc.StatusCode.OK


# -- Check and Watch ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [None, auth("Bearer not-the-token"), RIGHT],
    ids=["no-token", "wrong-token", "right-token"],
)
def test_check_and_watch_never_need_the_token(
    channel: grpc.Channel, metadata: Metadata | None
) -> None:
    for name in ("", "liveness", "readiness"):
        checked = call(channel, CHECK, check_request(name), metadata=metadata)
        assert checked.code is grpc.StatusCode.OK, checked
        response = health_pb2.HealthCheckResponse.FromString(checked.messages[0])
        assert ServingStatus(response.status) is ServingStatus.SERVING
        watched = call(channel, WATCH, check_request(name), metadata=metadata)
        assert watched.code is grpc.StatusCode.OK, watched
        response = health_pb2.HealthCheckResponse.FromString(watched.messages[0])
        assert ServingStatus(response.status) is ServingStatus.SERVING
    unknown = call(channel, CHECK, check_request("no.such.Service"), metadata=metadata)
    assert unknown.code is grpc.StatusCode.NOT_FOUND


# -- SmokeTest ---------------------------------------------------------------------------


def smoke_test(channel: grpc.Channel, metadata: Metadata | None) -> list[tuple[str, bool]]:
    """Call SmokeTest; return the checks it lists (it must answer OK)."""
    outcome = call(channel, SMOKE_TEST, b"", metadata=metadata)
    assert outcome.code is grpc.StatusCode.OK, outcome
    response = smoke_test_service_pb2.SmokeTestResponse.FromString(outcome.messages[0])
    assert response.status == "ok"
    assert response.message == "PetSage system is alive and purring."
    return [(check.name, check.serving) for check in response.checks]


@pytest.mark.parametrize(
    "metadata", [None, auth("Bearer not-the-token")], ids=["no-token", "wrong-token"]
)
def test_smoke_test_without_the_token_lists_no_checks(
    channel: grpc.Channel, metadata: Metadata | None
) -> None:
    assert smoke_test(channel, metadata) == []


def test_smoke_test_with_the_token_lists_the_checks(channel: grpc.Channel) -> None:
    assert smoke_test(channel, RIGHT) == [(CHECK_NAME, False)]


# -- reflection --------------------------------------------------------------------------

REFLECTIONS: Final = pytest.mark.parametrize(
    "path", [REFLECTION_V1, REFLECTION_V1ALPHA], ids=["v1", "v1alpha"]
)
LIST_SERVICES: Final = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()


def reflect(channel: grpc.Channel, path: str, metadata: Metadata | None) -> Outcome:
    return call(channel, path, LIST_SERVICES, metadata=metadata)


def listed_services(outcome: Outcome) -> set[str]:
    assert outcome.code is grpc.StatusCode.OK, outcome
    (message,) = outcome.messages
    response = reflection_pb2.ServerReflectionResponse.FromString(message)
    return {service.name for service in response.list_services_response.service}


@REFLECTIONS
def test_reflection_requires_the_token(channel: grpc.Channel, path: str) -> None:
    assert reflect(channel, path, None).code is grpc.StatusCode.UNAUTHENTICATED
    wrong = reflect(channel, path, auth("Bearer not-the-token"))
    assert wrong.code is grpc.StatusCode.UNAUTHENTICATED
    assert {"grpc.health.v1.Health", "petsage.v1.SmokeTestService"} <= listed_services(
        reflect(channel, path, RIGHT)
    )


@pytest.fixture(params=["cli", "embedded"])
def open_reflection(
    request: pytest.FixtureRequest,
    spawn_server: SpawnServer,
    start_server: StartServer,
    token_file: Path,
    tmp_path: Path,
) -> str:
    """A server with a token but ``protect_reflection`` off; returns its address."""
    if request.param == "cli":
        config = tmp_path / "petsage.toml"
        config.write_text("[auth]\nprotect_reflection = false\n")
        server = spawn_server("--auth-token-file", str(token_file), "--config", str(config))
        return server.address
    return start_server(auth_token=TOKEN, protect_reflection=False).address


@REFLECTIONS
def test_reflection_without_the_token_when_protect_reflection_is_off(
    open_reflection: str, path: str
) -> None:
    with plaintext(open_reflection) as channel:
        assert "grpc.health.v1.Health" in listed_services(reflect(channel, path, None))
        # Only reflection is opened: List still requires the token.
        assert call(channel, LIST, b"").code is grpc.StatusCode.UNAUTHENTICATED
        assert call(channel, LIST, b"", metadata=RIGHT).code is grpc.StatusCode.OK


# -- the token from the configuration file's [auth] token_env ----------------------------


def test_token_env_in_the_config_file(spawn_server: SpawnServer, tmp_path: Path) -> None:
    config = tcp_check_config(tmp_path / "petsage.toml", f'[auth]\ntoken_env = "{TOKEN_ENV_NAME}"')
    server = spawn_server("--config", str(config), env={TOKEN_ENV_NAME: f"{ENV_TOKEN}\n"})
    _wait_for_check(server.address)
    with plaintext(server.address) as channel:
        assert call(channel, LIST, b"").code is grpc.StatusCode.UNAUTHENTICATED
        assert call(channel, LIST, b"", metadata=RIGHT).code is grpc.StatusCode.UNAUTHENTICATED
        right = auth(f"Bearer {ENV_TOKEN}")
        assert call(channel, LIST, b"", metadata=right).code is grpc.StatusCode.OK
        assert smoke_test(channel, None) == []
        assert smoke_test(channel, right) == [(CHECK_NAME, False)]
        assert reflect(channel, REFLECTION_V1, None).code is grpc.StatusCode.UNAUTHENTICATED
        assert call(channel, CHECK, check_request()).code is grpc.StatusCode.OK
    assert ENV_TOKEN not in server.log()


def test_token_env_naming_an_unset_variable_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "petsage.toml"
    config.write_text(f'[auth]\ntoken_env = "{TOKEN_ENV_NAME}_UNSET"\n')
    done, port = serve_refused("--config", str(config))
    assert done.code == 2, done.stderr
    assert len(done.lines) == 1, done.stderr
    assert f"{TOKEN_ENV_NAME}_UNSET" in done.lines[0]
    assert refuses_connections(port)


# -- the token never shows ---------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_token_never_appears_in_the_log(
    spawn_server: SpawnServer, token_file: Path, tmp_path: Path, log_format: str
) -> None:
    config = tcp_check_config(tmp_path / "petsage.toml")
    server = spawn_server(
        "--auth-token-file",
        str(token_file),
        "--config",
        str(config),
        "--log-level",
        "debug",
        "--log-format",
        log_format,
        "--drain-seconds",
        "0",
        "--grace-seconds",
        "1",
    )
    with plaintext(server.address) as channel:
        for metadata in (None, RIGHT, *(auth(value) for value in WRONG_TOKENS)):
            for path in (LIST, SMOKE_TEST, REFLECTION_V1, REFLECTION_V1ALPHA):
                body = LIST_SERVICES if "Reflection" in path else b""
                assert call(channel, path, body, metadata=metadata).code in {
                    grpc.StatusCode.OK,
                    grpc.StatusCode.UNAUTHENTICATED,
                }
            checked = call(channel, CHECK, check_request("no.such.Service"), metadata=metadata)
            assert checked.code is grpc.StatusCode.NOT_FOUND
    server.signal()
    assert server.wait() == 0
    wait_until(lambda: "stopped" in server.log(), "the last log line")
    log = server.log()
    assert log.strip()
    if log_format == "json":
        for line in log.splitlines():
            if line.startswith("{"):
                json.loads(line)
    # The token itself, and the wrong ones that were tried, never appear.
    assert TOKEN not in log
    for value in WRONG_TOKENS:
        if len(value.strip()) > len("Bearer"):
            assert value.strip() not in log


# -- unusable token files ----------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    ["", "\n", "   \n\t\n", "two words\n", b"\xff\xfe token".decode("latin-1")],
    ids=["empty", "newline", "whitespace", "whitespace-inside", "not-utf8"],
)
def test_unusable_token_file_exits_2(tmp_path: Path, content: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_bytes(content.encode("latin-1"))
    done, port = serve_refused("--auth-token-file", str(token_file))
    assert done.code == 2, done.stderr
    assert len(done.lines) == 1, done.stderr
    assert done.lines[0].startswith("petsage-grpc serve: error: "), done.lines[0]
    assert str(token_file) in done.lines[0]
    assert refuses_connections(port)


def test_missing_token_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-token"
    done, port = serve_refused("--auth-token-file", str(missing))
    assert done.code == 2, done.stderr
    assert len(done.lines) == 1, done.stderr
    assert str(missing) in done.lines[0]
    assert refuses_connections(port)
