"""Follow every replica of a fleet: one connection each, a Watch stream per name.

The follower resolves its targets now, every ``resolve_every`` seconds and on demand
(:meth:`Fleet.resolve_now`; also when a replica stops answering, since a pod that went
away is usually out of DNS too). Each replica found gets one grpc channel, a List (the
five standard names where List is refused), a Watch stream on each name and a SmokeTest
after each change (its checks where the token allows, and whether the replica drains).
Everything it learns is reported as a :class:`FleetEvent` to one callback, and can be
read whole with :meth:`Fleet.snapshot`.

Bounded: at most ``max_replicas`` replicas (the first in address order; the rest are
counted and said), :data:`MAX_NAMES` names per replica, connection attempts shared out
by a token bucket (:data:`RECONNECTS_PER_SECOND`, bursts of ``max_replicas``), and each
replica retrying with its own backoff (:data:`RETRY_FIRST_SECONDS` doubling to
:data:`RETRY_MAX_SECONDS`, with jitter so a fleet that went away together does not
return in step).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from petsage_grpc.fleet._discovery import DiscoveryError, Target, resolve

if TYPE_CHECKING:
    import grpc

__all__ = [
    "MAX_NAMES",
    "RECONNECTS_PER_SECOND",
    "RETRY_FIRST_SECONDS",
    "RETRY_MAX_SECONDS",
    "STANDARD_NAMES",
    "Fleet",
    "FleetEvent",
]

STANDARD_NAMES: Final = ("", "liveness", "readiness", "startup", "petsage.v1.SmokeTestService")
MAX_NAMES: Final = 100
"""Names followed per replica: List's own cap, so a replica's whole answer fits."""
RECONNECTS_PER_SECOND: Final = 20.0
RETRY_FIRST_SECONDS: Final = 0.5
RETRY_MAX_SECONDS: Final = 5.0
RELIST_SECONDS: Final = 10.0
"""How often a replica is asked List again (new names, and an answer at all)."""
_RELIST_AFTER_END: Final = 0.5  # a stream ended: ask again this soon, not sooner
_RESOLVE_NOW_MIN_GAP: Final = 1.0
_TRANSITIONS_KEPT: Final = 20
_STILL_GONE_AFTER: Final = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_STILL_GONE_EVERY: Final = 600.0
_DRAINING_DETAILS: Final = "PetSage is draining"
_REFUSED_LIST: Final = ("UNAUTHENTICATED", "PERMISSION_DENIED", "UNIMPLEMENTED")
_NO_ANSWER: Final = ("DEADLINE_EXCEEDED", "CANCELLED")
_CHECK_PREFIX: Final = "check."


@dataclass(frozen=True)
class FleetEvent:
    """Something that happened to the fleet, for people (``text``) and scripts (``fields``).

    *kind* is one of ``appeared``, ``removed``, ``lost``, ``still_unreachable``, ``back``,
    ``transition``, ``draining``, ``resolve_failed``, ``not_followed``; *replica* is
    ``host:port`` (the target's text for ``resolve_failed``, empty for ``not_followed``).
    """

    kind: str
    replica: str
    at: float
    text: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Replica:
    address: str
    state: str = "connecting"  # connecting, up, draining, unreachable
    names: dict[str, str] = field(default_factory=dict)
    names_hidden: bool = False
    smoke: dict[str, Any] | None = None
    last_checks: dict[str, bool] | None = None  # from the last SmokeTest that listed them
    draining: bool = False
    since: float = field(default_factory=time.time)
    lost_since: float | None = None
    reminders: int = 0
    tried: bool = False
    transitions: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=_TRANSITIONS_KEPT)
    )
    task: asyncio.Task[None] | None = None
    smoke_due: asyncio.Event = field(default_factory=asyncio.Event)

    def document(self) -> dict[str, Any]:
        checks: dict[str, bool] | None = None
        listed = {
            name.removeprefix(_CHECK_PREFIX): state == "SERVING"
            for name, state in self.names.items()
            if name.startswith(_CHECK_PREFIX)
        }
        if self.state == "draining":
            # A drain reports every check NOT_SERVING: show what they were before it.
            checks = self.last_checks
        elif listed:
            checks = listed
        elif self.smoke is not None and "checks" in self.smoke:
            checks = dict(self.smoke["checks"])
        return {
            "address": self.address,
            "state": self.state,
            "since": round(self.since, 3),
            "names": dict(sorted(self.names.items())),
            "names_hidden": self.names_hidden,
            "checks": checks,
            "smoke_test": self.smoke,
            "transitions": list(self.transitions),
        }


class _Bucket:
    """A token bucket: *rate* connection attempts a second, bursts of *burst*."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate, self._burst = rate, float(burst)
        self._tokens, self._at = float(burst), time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self) -> None:
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens < 1:
                await asyncio.sleep((1 - self._tokens) / self._rate)
                self._tokens, self._at = 1.0, time.monotonic()
            self._tokens -= 1


class _LostError(Exception):
    """The replica did not answer; the argument says how (a gRPC code name)."""


class Fleet:
    """Every replica behind *targets*, followed live.

    *channel_for* makes a new grpc.aio channel to one ``host:port`` (TLS and options
    included); *metadata* goes with List and SmokeTest (the bearer token); *timeout*
    bounds each connection attempt, RPC and resolution. *on_event* is called on the
    event loop for every :class:`FleetEvent` once :meth:`start` has returned.
    """

    def __init__(
        self,
        targets: Sequence[Target],
        *,
        channel_for: Callable[[str], grpc.aio.Channel],
        metadata: tuple[tuple[str, str], ...] | None,
        timeout: float,
        on_event: Callable[[FleetEvent], None],
        max_replicas: int = 100,
        resolve_every: float = 5.0,
        reconnects_per_second: float = RECONNECTS_PER_SECOND,
    ) -> None:
        self._targets = list(targets)
        self._channel_for = channel_for
        self._metadata = metadata
        self._timeout = timeout
        self._on_event = on_event
        self._max_replicas = max_replicas
        self._resolve_every = resolve_every
        self._bucket = _Bucket(reconnects_per_second, max_replicas)
        self._replicas: dict[str, _Replica] = {}
        self._found: dict[str, list[str]] = {}  # target text -> its last good answer
        self._failing: dict[str, str] = {}  # target text -> the failure already said
        self._not_followed = 0
        self._started = False
        self._resolve_due = asyncio.Event()
        self._last_resolve = 0.0
        self._settled = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    # --- life cycle ------------------------------------------------------------------------

    async def start(self, *, settle: bool = True) -> None:
        """Resolve every target and connect to every replica.

        With *settle*, return once each replica has answered or failed its first attempt
        (bounded by the timeout), so a first table shows every replica. Then keep
        resolving in the background until :meth:`close`.
        """
        await self._resolve()
        if settle and self._replicas:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), self._timeout * 3 + 1)
        self._started = True
        self._runner = asyncio.create_task(self._resolve_loop())

    async def close(self) -> None:
        """Stop resolving and following; close every connection."""
        tasks = [r.task for r in self._replicas.values() if r.task is not None]
        if self._runner is not None:
            tasks.append(self._runner)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def resolve_now(self) -> None:
        """Resolve again soon (at most once a second), not at the next period."""
        self._resolve_due.set()

    # --- reading ---------------------------------------------------------------------------

    @property
    def resolve_errors(self) -> list[str]:
        """Why targets failed to resolve at the last attempt (one line each)."""
        return list(self._failing.values())

    @property
    def not_followed(self) -> int:
        """Replicas found beyond ``max_replicas``, not followed."""
        return self._not_followed

    def snapshot(self) -> list[dict[str, Any]]:
        """Every followed replica, in address order, as plain data (JSON-ready)."""
        return [self._replicas[a].document() for a in sorted(self._replicas, key=_order)]

    # --- discovery -------------------------------------------------------------------------

    async def _resolve_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resolve_due.wait(), self._resolve_every)
            gap = _RESOLVE_NOW_MIN_GAP - (time.monotonic() - self._last_resolve)
            if gap > 0:
                await asyncio.sleep(gap)
            self._resolve_due.clear()
            await self._resolve()

    async def _resolve(self) -> None:
        self._last_resolve = time.monotonic()
        for target in self._targets:
            try:
                self._found[target.text] = await resolve(target, limit=self._timeout)
            except DiscoveryError as error:
                if self._failing.get(target.text) != str(error):
                    self._failing[target.text] = str(error)
                    self._emit("resolve_failed", target.text, str(error), error=str(error))
                continue
            self._failing.pop(target.text, None)
        wanted: list[str] = []
        for addresses in self._found.values():
            wanted.extend(a for a in addresses if a not in wanted)
        wanted.sort(key=_order)
        followed, extra = wanted[: self._max_replicas], len(wanted) - self._max_replicas
        if max(extra, 0) != self._not_followed:
            self._not_followed = max(extra, 0)
            self._emit(
                "not_followed",
                "",
                f"{self._not_followed} more replicas found than --max-replicas "
                f"{self._max_replicas}: not followed",
                count=self._not_followed,
            )
        for address in [a for a in self._replicas if a not in followed]:
            replica = self._replicas.pop(address)
            if replica.task is not None:
                replica.task.cancel()
            why = "beyond --max-replicas" if address in wanted else "removed from DNS"
            self._emit("removed", address, f"{why}: no longer followed")
        for address in followed:
            if address not in self._replicas:
                replica = self._replicas[address] = _Replica(address)
                replica.task = asyncio.create_task(self._follow(replica))
                self._emit("appeared", address, "appeared in DNS: following")
        self._settled.clear()
        if all(r.tried for r in self._replicas.values()):
            self._settled.set()

    # --- one replica -----------------------------------------------------------------------

    async def _follow(self, replica: _Replica) -> None:
        import grpc  # noqa: PLC0415

        backoff = RETRY_FIRST_SECONDS
        while True:
            await self._bucket.take()
            channel = self._channel_for(replica.address)
            try:
                await self._session(replica, channel)
            except _LostError as lost:
                reason = str(lost)
            except grpc.aio.AioRpcError as error:
                reason = error.code().name
            except Exception:  # noqa: BLE001 - a surprise on one replica must not end its follower
                reason = "error"
            finally:
                await channel.close(None)
            if replica.lost_since is None:
                backoff = RETRY_FIRST_SECONDS
            self._lost(replica, reason)
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
            backoff = min(backoff * 2, RETRY_MAX_SECONDS)

    async def _session(self, replica: _Replica, channel: grpc.aio.Channel) -> None:
        """Follow *replica* over *channel* until it stops answering (raises)."""
        import grpc  # noqa: PLC0415
        from grpc_health.v1 import health_pb2  # noqa: PLC0415

        try:
            await asyncio.wait_for(channel.channel_ready(), self._timeout)
        except TimeoutError:
            raise _LostError("no connection") from None
        list_call = channel.unary_unary(
            "/grpc.health.v1.Health/List",
            request_serializer=health_pb2.HealthListRequest.SerializeToString,
            response_deserializer=health_pb2.HealthListResponse.FromString,
        )
        watch_call = channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        name_of = health_pb2.HealthCheckResponse.ServingStatus.Name
        ended = asyncio.Event()
        watchers: dict[str, asyncio.Task[None]] = {}

        async def names_now() -> list[str]:
            try:
                answer = await list_call(
                    health_pb2.HealthListRequest(), timeout=self._timeout, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as error:
                if error.code().name in _REFUSED_LIST:
                    replica.names_hidden = True
                    return list(STANDARD_NAMES)
                raise _LostError(error.code().name) from None
            replica.names_hidden = False
            listed = sorted(answer.statuses)[:MAX_NAMES]
            for name in listed:
                replica.names.setdefault(name, name_of(answer.statuses[name].status))
            return listed

        async def watch(name: str) -> None:
            try:
                async for answer in watch_call(
                    health_pb2.HealthCheckRequest(service=name), metadata=self._metadata
                ):
                    self._observed(replica, name, name_of(answer.status))
            except grpc.aio.AioRpcError:
                pass  # the stream ended: the session asks List to find out why
            finally:
                ended.set()

        ask = self._smoke_asker(replica, channel)
        smoke = asyncio.create_task(self._smoke_loop(replica, ask))
        try:
            names = await names_now()
            await ask()  # the first table shows the smoke test, and a replica that drains
            self._answered(replica)
            while True:
                _reconcile(replica, names, watchers, watch)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), RELIST_SECONDS)
                if ended.is_set():
                    await asyncio.sleep(_RELIST_AFTER_END)
                    ended.clear()
                names = await names_now()
                self._answered(replica)
        finally:
            for task in [*watchers.values(), smoke]:
                task.cancel()
            await asyncio.gather(*watchers.values(), smoke, return_exceptions=True)

    def _smoke_asker(
        self, replica: _Replica, channel: grpc.aio.Channel
    ) -> Callable[[], Awaitable[None]]:
        from petsage_grpc._generated.petsage.v1 import (  # noqa: PLC0415
            smoke_test_service_pb2 as messages,
        )

        call = channel.unary_unary(
            "/petsage.v1.SmokeTestService/SmokeTest",
            request_serializer=messages.SmokeTestRequest.SerializeToString,
            response_deserializer=messages.SmokeTestResponse.FromString,
        )

        async def ask() -> None:
            await self._smoke(replica, call, messages)

        return ask

    async def _smoke_loop(self, replica: _Replica, ask: Callable[[], Awaitable[None]]) -> None:
        """Ask SmokeTest again after each change (changes coalesced)."""
        while True:
            await replica.smoke_due.wait()
            replica.smoke_due.clear()
            await ask()

    async def _smoke(self, replica: _Replica, call: Any, messages: Any) -> None:
        """One SmokeTest: its answer, its checks, and whether the replica drains."""
        import grpc  # noqa: PLC0415

        try:
            answer = await call(
                messages.SmokeTestRequest(), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            if error.code().name in _NO_ANSWER:
                return  # no answer at all: the session finds out whether it is gone
            result: dict[str, Any] = {"error": error.code().name, "message": error.details() or ""}
        else:
            result = {"status": answer.status, "message": answer.message}
            if answer.checks:
                result["checks"] = {c.name: c.serving for c in answer.checks}
                replica.last_checks = dict(result["checks"])
        replica.smoke = result
        replica.draining = result.get("message") == _DRAINING_DETAILS
        self._update_state(replica)

    def _update_state(self, replica: _Replica) -> None:
        """Up or draining, once connected, as the last SmokeTest said."""
        if replica.state not in ("up", "draining"):
            return
        state = "draining" if replica.draining else "up"
        if state != replica.state:
            replica.state, replica.since = state, time.time()
            if state == "draining":
                self._emit("draining", replica.address, "draining")

    def _observed(self, replica: _Replica, name: str, new: str) -> None:
        old = replica.names.get(name, "SERVICE_UNKNOWN")
        replica.names[name] = new
        if new == old:
            return
        at = time.time()
        replica.transitions.append({"at": round(at, 3), "name": name, "from": old, "to": new})
        replica.smoke_due.set()
        shown = name or '""'
        self._emit(
            "transition",
            replica.address,
            f"{shown} {old} -> {new}",
            service=name,
            **{"from": old, "to": new},
        )

    def _answered(self, replica: _Replica) -> None:
        replica.tried = True
        if replica.state in ("connecting", "unreachable"):
            if replica.lost_since is not None:
                gone = time.time() - replica.lost_since
                self._emit(
                    "back",
                    replica.address,
                    f"connection back after {_seconds(gone)}",
                    seconds=round(gone),
                )
            replica.state, replica.since = "up", time.time()
            replica.lost_since, replica.reminders = None, 0
            self._update_state(replica)
        self._check_settled()

    def _lost(self, replica: _Replica, reason: str) -> None:
        replica.tried = True
        self._check_settled()
        now = time.time()
        if replica.lost_since is None:
            replica.lost_since, replica.reminders = now, 0
            never = replica.state == "connecting"
            replica.state, replica.since = "unreachable", now
            text = f"not answering ({reason})" if never else f"connection lost ({reason})"
            self._emit("lost", replica.address, text, reason=reason)
            self.resolve_now()
            return
        gone = now - replica.lost_since
        index, fixed = replica.reminders, len(_STILL_GONE_AFTER)
        due = (
            _STILL_GONE_AFTER[index]
            if index < fixed
            else _STILL_GONE_AFTER[-1] + _STILL_GONE_EVERY * (index - fixed + 1)
        )
        if gone >= due:
            replica.reminders += 1
            self._emit(
                "still_unreachable",
                replica.address,
                f"still unreachable after {_seconds(gone)}",
                seconds=round(gone),
            )

    def _check_settled(self) -> None:
        if all(r.tried for r in self._replicas.values()):
            self._settled.set()

    def _emit(self, kind: str, replica: str, text: str, **fields: Any) -> None:
        if self._started:
            self._on_event(FleetEvent(kind, replica, time.time(), text, fields))


def _reconcile(
    replica: _Replica,
    names: list[str],
    watchers: dict[str, asyncio.Task[None]],
    watch: Callable[[str], Coroutine[Any, Any, None]],
) -> None:
    """Follow each listed name (again, if its stream ended); forget names gone from List."""
    for name in [n for n in replica.names if n not in names]:
        del replica.names[name]  # a removed check
    for name in names:
        if name not in watchers or watchers[name].done():
            watchers[name] = asyncio.create_task(watch(name))
    for name in [n for n in watchers if n not in names]:
        watchers.pop(name).cancel()


def _order(address: str) -> tuple[int, bytes, int, str]:
    """Addresses in numeric order (IPv4 first), names after them."""
    import ipaddress  # noqa: PLC0415

    host, _, port = address.rpartition(":")
    try:
        parsed = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return 9, b"", int(port), host
    return parsed.version, parsed.packed, int(port), ""


def _seconds(value: float) -> str:
    from petsage_grpc._durations import format_go_duration  # noqa: PLC0415

    return format_go_duration(float(round(value)))
