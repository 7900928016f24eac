"""One attempt at each kind of dependency check, with a well-kept client library per kind.

A prober is called once per attempt and raises on failure; the monitor bounds every call
with the check's timeout (cancelling it) and judges the results. Probers keep their
connection between attempts where the client allows, so a check costs one round trip,
and drop it after any failure, so the next attempt starts clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from petsage_grpc._extras import CHECK_KIND_EXTRAS, require_extra
from petsage_grpc.board._check import Check

if TYPE_CHECKING:
    import aiohttp
    import grpc

__all__ = ["CheckFailedError", "Prober", "make_prober", "resolve_callable"]


class CheckFailedError(Exception):
    """The dependency answered, but not as a healthy one does."""


class Prober(Protocol):
    """One kind of check, bound to one target."""

    async def __call__(self) -> None:
        """Make one attempt; raise if the dependency is not healthy."""

    async def aclose(self) -> None:
        """Release connections; the prober is not called again."""


def _password(check: Check) -> str | None:
    return os.environ.get(check.password_env) if check.password_env else None


class _Postgres:
    def __init__(self, check: Check) -> None:
        self._dsn = str(check.target)
        self._password = _password(check)
        self._timeout = check.timeout
        self._connection: Any = None

    async def __call__(self) -> None:
        import asyncpg  # type: ignore[import-untyped]  # noqa: PLC0415

        try:
            if self._connection is None or self._connection.is_closed():
                self._connection = await asyncpg.connect(
                    dsn=self._dsn, password=self._password, timeout=self._timeout
                )
            if await self._connection.fetchval("SELECT 1") != 1:
                raise CheckFailedError("SELECT 1 did not return 1")
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.terminate()


class _Redis:
    def __init__(self, check: Check) -> None:
        import redis.asyncio  # noqa: PLC0415
        from redis.asyncio.retry import Retry  # noqa: PLC0415
        from redis.backoff import NoBackoff  # noqa: PLC0415

        # One retry, on a fresh connection: a kept connection that Redis (or a proxy)
        # closed while idle must not count as an outage. The thresholds judge the rest.
        self._client = redis.asyncio.Redis.from_url(
            str(check.target),
            password=_password(check),
            socket_connect_timeout=check.timeout,
            socket_timeout=check.timeout,
            retry=Retry(NoBackoff(), 1),
            single_connection_client=True,
        )

    async def __call__(self) -> None:
        try:
            if not await self._client.ping():
                raise CheckFailedError("PING was not answered with PONG")
        except BaseException:
            await self._client.connection_pool.disconnect()
            raise

    async def aclose(self) -> None:
        await self._client.aclose()


def _host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


class _Tcp:
    def __init__(self, check: Check) -> None:
        self._host, self._port = _host_port(str(check.target))

    async def __call__(self) -> None:
        _, writer = await asyncio.open_connection(self._host, self._port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def aclose(self) -> None:
        return None


class _Http:
    def __init__(self, check: Check) -> None:
        self._url = str(check.target)
        self._expected = frozenset(check.expect_status)
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self) -> None:
        import aiohttp  # noqa: PLC0415

        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": "petsage-grpc-check"},
                connector=aiohttp.TCPConnector(limit=1),
            )
        try:
            async with self._session.get(self._url, allow_redirects=False) as response:
                status = response.status
        except BaseException:
            await self.aclose()
            raise
        ok = status in self._expected if self._expected else 200 <= status < 300
        if not ok:
            raise CheckFailedError(f"HTTP status {status}")

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class _Grpc:
    def __init__(self, check: Check) -> None:
        self._target = str(check.target)
        self._service = check.service
        self._channel: grpc.aio.Channel | None = None

    async def __call__(self) -> None:
        import grpc  # noqa: PLC0415
        from grpc_health.v1 import health_pb2  # noqa: PLC0415

        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self._target)
        check = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            response = await check(health_pb2.HealthCheckRequest(service=self._service))
        except grpc.aio.AioRpcError as error:
            # Its str() is grpc's multi-line debug text; and a fresh channel next time
            # skips grpc's reconnect backoff, so recovery is seen on the next attempt.
            await self.aclose()
            raise CheckFailedError(f"{error.code().name}: {error.details()}") from None
        except BaseException:
            await self.aclose()
            raise
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            raise CheckFailedError(f"upstream answered {name}")

    async def aclose(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()


def resolve_callable(target: str) -> Callable[[], object]:
    """Import ``module:function`` (``function`` may be dotted) and return it.

    Raises:
        ValueError: the module cannot be imported, or the name is missing or not callable.
    """
    module_name, _, attribute = target.partition(":")
    try:
        value: object = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - importing user code can raise anything
        raise ValueError(f"cannot import module {module_name!r}: {error}") from None
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(value):
        raise ValueError(f"{target!r} is not callable")
    return value


def _in_daemon_thread(function: Callable[[], object]) -> asyncio.Future[object]:
    """Run *function* on a daemon thread of its own.

    Not the loop's default executor: ``asyncio.run`` joins that executor's threads when
    it ends, so one hung check would keep the process from exiting after SIGTERM.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[object] = loop.create_future()

    def settle(result: object, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        result: object = None
        try:
            result = function()
        except (SystemExit, KeyboardInterrupt) as caught:
            # Only a failed check here: raised on the event loop, they would stop the server.
            error = CheckFailedError(f"raised {type(caught).__name__}")
        except BaseException as caught:  # noqa: BLE001 - handed to the awaiting check
            error = caught
        with contextlib.suppress(RuntimeError):  # the loop closed while the call ran
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="petsage-check", daemon=True).start()
    return future


class _Python:
    def __init__(self, check: Check) -> None:
        target = check.target
        self._function = resolve_callable(target) if isinstance(target, str) else target
        self._thread: asyncio.Future[object] | None = None

    async def __call__(self) -> None:
        if inspect.iscoroutinefunction(self._function):
            result = await self._function()
        else:
            if self._thread is not None and not self._thread.done():
                # A synchronous call cannot be cancelled: never pile up threads behind it.
                raise CheckFailedError("the previous call has not returned yet")
            self._thread = _in_daemon_thread(self._function)
            result = await asyncio.shield(self._thread)
        if inspect.isawaitable(result):
            result = await result
        if not result:
            raise CheckFailedError(f"returned {type(result).__name__} {result!r:.40}")

    async def aclose(self) -> None:
        return None


_PROBERS: dict[str, Callable[[Check], Prober]] = {
    "postgres": _Postgres,
    "redis": _Redis,
    "tcp": _Tcp,
    "http": _Http,
    "grpc": _Grpc,
    "python": _Python,
}


def make_prober(check: Check) -> Prober:
    """Return the prober for *check*'s kind and target.

    Raises:
        ValueError: a ``python`` target cannot be imported.
        MissingExtraError: the kind's client library (an extra) is not installed.
    """
    needs = CHECK_KIND_EXTRAS.get(check.kind)
    if needs is not None:
        extra, modules = needs
        require_extra(extra, feature=f"check {check.name!r} (kind {check.kind!r})", modules=modules)
    return _PROBERS[check.kind](check)
