"""The status board: the single source of truth for what this server reports as serving.

Every health RPC, the smoke test and the dependency checks read or write this one
object. Writers may be on the event loop or on any other thread and hold a short lock
(never across I/O: logging and waking watchers happen after it is released). Check and
SmokeTest read one dict entry, which is atomic, so the hot path takes no lock at all.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Final, NamedTuple

__all__ = [
    "LIVENESS",
    "OVERALL",
    "READINESS",
    "SMOKE_TEST_SERVICE",
    "STARTUP",
    "ServingStatus",
    "StatusBoard",
    "Transition",
]

_log = logging.getLogger("petsage_grpc.status")

OVERALL: Final = ""
"""The whole server, as grpc.health.v1 defines the empty service name."""
LIVENESS: Final = "liveness"
"""The process is alive; only a wedged process should fail it. Stays SERVING while draining."""
READINESS: Final = "readiness"
"""The process should receive traffic. Goes NOT_SERVING first when draining."""
STARTUP: Final = "startup"
"""The process has finished starting; gates Kubernetes liveness probes. Kept while draining."""
SMOKE_TEST_SERVICE: Final = "petsage.v1.SmokeTestService"
"""The SmokeTest RPC's own health entry; SmokeTest answers OK only while it is SERVING."""

# Names whose status survives drain(): a pod that is shutting down cleanly must not be
# restarted by its liveness probe.
_KEPT_WHILE_DRAINING: Final = frozenset({LIVENESS, STARTUP})
# Names that shed_load() reports NOT_SERVING: the ones that mean "send me traffic".
_SHED_WHILE_OVERLOADED: Final = frozenset({OVERALL, READINESS})


class ServingStatus(enum.IntEnum):
    """A service's status, numbered as ``grpc.health.v1.HealthCheckResponse.ServingStatus``."""

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2
    SERVICE_UNKNOWN = 3
    """Only sent on Watch, for a name the board does not know (yet)."""


def _settable(status: ServingStatus) -> ServingStatus:
    status = ServingStatus(status)
    if status is ServingStatus.SERVICE_UNKNOWN:
        raise ValueError("SERVICE_UNKNOWN is reported for unknown names; use clear()")
    return status


HISTORY_LENGTH: Final = 100
"""How many reported-status transitions the board remembers per name."""


class Transition(NamedTuple):
    """A name's reported status changed to *status* at *at* (seconds since the epoch)."""

    at: float
    status: ServingStatus


_DEFER_FULL_GC_WATCHERS: Final = 64
"""Waking this many watchers at once defers full garbage collections for the burst (see _wake)."""
_NO_FULL_COLLECTION: Final = 1 << 30
"""A threshold for the oldest generation that one loop iteration never reaches."""


class _Closed:
    """Marks a watch stream that the board has ended."""


_CLOSED: Final = _Closed()


class _Watcher:
    """One Watch stream's mailbox: a single slot that always holds the latest status.

    A slow reader therefore never builds a backlog: it sees the newest status when it
    next looks, and the board never waits for it. It waits on a bare future rather
    than an ``asyncio.Event`` (whose waiter deque alone is 0.6 KiB): with tens of
    thousands of streams open, these few slots are most of what a stream costs here.
    """

    __slots__ = ("latest", "loop", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, latest: ServingStatus) -> None:
        self.loop = loop
        self.latest: ServingStatus | _Closed = latest
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        """Let :meth:`next` look again. On the watcher's own loop only."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self, sent: ServingStatus | None) -> ServingStatus | None:
        """Wait until the latest status differs from *sent* and return it; None once closed."""
        while True:
            latest = self.latest
            if isinstance(latest, _Closed):
                return None
            if latest is not sent:
                return latest
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None


class _ThreadWatcher:
    """A Watch stream's mailbox for a handler that runs on a thread, not on an event loop.

    The same single slot as :class:`_Watcher`; the reader blocks on a thread event,
    which any thread may set.
    """

    __slots__ = ("_event", "_stopped", "latest")

    loop: Final = None

    def __init__(self, latest: ServingStatus) -> None:
        self.latest: ServingStatus | _Closed = latest
        self._event = threading.Event()
        self._stopped = False

    def wake(self) -> None:
        """Let :meth:`next` look again. From any thread."""
        self._event.set()

    def stop(self) -> None:
        """Make :meth:`next` return None (the call ended). From any thread."""
        self._stopped = True
        self._event.set()

    def next(self, sent: ServingStatus | None) -> ServingStatus | None:
        """Block until the latest status differs from *sent* and return it; None once closed."""
        while True:
            self._event.clear()
            latest = self.latest
            if self._stopped or isinstance(latest, _Closed):
                return None
            if latest is not sent:
                return latest
            self._event.wait()


def _wake(watchers: Sequence[_Watcher]) -> None:
    """Wake *watchers*, all of the running loop.

    Every woken stream allocates its send before the first of them completes, and with
    thousands of streams open that burst trips a full collection of the whole heap
    (0.1-0.3 s at 10 000 streams) in the middle of the fan-out. So a large burst runs
    with full collections deferred; young ones go on as usual, since deferring those
    too only moves their cost into the fan-out's tail (docs/benchmarks.md).
    """
    for watcher in watchers:
        watcher.wake()
    if len(watchers) >= _DEFER_FULL_GC_WATCHERS:
        _FullCollections.defer_during_this_iteration(watchers[0].loop)


class _FullCollections:
    """Defers the collector's full (oldest generation) collections for one loop iteration.

    The streams woken by a burst run in the iteration after the wake, queued ahead of the
    call that restores the threshold. Thresholds the application set are restored as
    they were; a collector it disabled stays disabled.
    """

    _lock = threading.Lock()
    _saved: tuple[int, int, int] | None = None

    @classmethod
    def defer_during_this_iteration(cls, loop: asyncio.AbstractEventLoop) -> None:
        with cls._lock:
            if cls._saved is not None:
                return  # deferred already, by an earlier burst of this iteration
            young, middle, _ = cls._saved = gc.get_threshold()
            gc.set_threshold(young, middle, _NO_FULL_COLLECTION)
        loop.call_soon(cls._restore)

    @classmethod
    def _restore(cls) -> None:
        with cls._lock:
            if cls._saved is not None:
                gc.set_threshold(*cls._saved)
                cls._saved = None


def _wake_all(watchers: Iterable[_Watcher | _ThreadWatcher]) -> None:
    """Wake watchers, each on its own event loop or thread, from whichever thread this runs on."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Watcher]] = {}
    for watcher in watchers:
        if isinstance(watcher, _ThreadWatcher):
            watcher.wake()
        else:
            by_loop.setdefault(watcher.loop, []).append(watcher)
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    for loop, group in by_loop.items():
        if loop is running:
            _wake(group)
        elif not loop.is_closed():
            # Futures are not thread-safe; one hop per loop, not per watcher.
            loop.call_soon_threadsafe(_wake, group)


class _Change(NamedTuple):
    service: str
    old: ServingStatus | None
    new: ServingStatus | None
    watchers: tuple[_Watcher | _ThreadWatcher, ...]
    initial: bool = False


def _publish(changes: Iterable[_Change]) -> None:
    """Log each change and wake its watchers. Called after the lock is released."""
    woken: list[_Watcher | _ThreadWatcher] = []
    for change in changes:
        old = change.old.name if change.old is not None else "SERVICE_UNKNOWN"
        new = change.new.name if change.new is not None else "SERVICE_UNKNOWN"
        if change.initial:
            # A state to start from, not a flap: no "previous" to read as one.
            _log.info(
                "service %r: %s (initial)",
                change.service,
                new,
                extra={"event": "initial_status", "service": change.service, "status": new},
            )
        else:
            _log.info(
                "service %r: %s -> %s",
                change.service,
                old,
                new,
                extra={
                    "event": "status_change",
                    "service": change.service,
                    "status": new,
                    "previous": old,
                },
            )
        woken.extend(change.watchers)
    if woken:
        _wake_all(woken)


class StatusBoard:
    """Serving status per service name, with drain, shutdown and change subscriptions.

    A new board knows ``""`` (the whole server), ``liveness``, ``readiness``,
    ``startup`` and ``petsage.v1.SmokeTestService``, all SERVING unless *initial* says
    otherwise.

    Every method is safe to call from the event loop and from any other thread (watch
    and subscribe from the loop whose task then waits; subscribe_thread from the thread
    that then waits). Each watcher is woken on its own loop or thread, whichever thread
    made the change.
    Status changes are logged once each, at INFO, on the ``petsage_grpc.status`` logger;
    a status set with ``initial=True`` is logged as where the name starts, not as a change.

    The board separates what was *set* from what is *reported*:

    - :meth:`drain` reports every name but ``liveness`` and ``startup`` as NOT_SERVING;
    - :meth:`shutdown` reports every name as NOT_SERVING (terminal, as grpc-go's
      ``Shutdown``);
    - :meth:`resume` leaves either state and reports what was set again, including
      any :meth:`set` made in the meantime.
    """

    def __init__(self, initial: Mapping[str, ServingStatus] | None = None) -> None:
        """Create a board with the standard names, overridden or extended by *initial*.

        Raises:
            ValueError: a status in *initial* is SERVICE_UNKNOWN or not a status.
        """
        self._lock = threading.Lock()
        self._set: dict[str, ServingStatus] = dict.fromkeys(
            (OVERALL, LIVENESS, READINESS, STARTUP, SMOKE_TEST_SERVICE), ServingStatus.SERVING
        )
        for service, status in (initial or {}).items():
            self._set[service] = _settable(status)
        self._draining = False
        self._shut_down = False
        self._shedding = False
        self._watches_closed = False
        # The reported statuses, kept materialised so that Check is one dict lookup.
        self._reported: dict[str, ServingStatus] = dict(self._set)
        self._watchers: dict[str, set[_Watcher | _ThreadWatcher]] = {}
        self._loop_lag: Callable[[], float] | None = None
        self._revision = 0
        # Written only when a reported status changes, never by Check or Watch.
        now = time.time()
        self._history: dict[str, deque[Transition]] = {
            name: deque((Transition(now, status),), maxlen=HISTORY_LENGTH)
            for name, status in self._reported.items()
        }

    # -- reading ------------------------------------------------------------------

    def get(self, service: str) -> ServingStatus | None:
        """Return the reported status of *service*, or None if the board does not know it."""
        return self._reported.get(service)

    def snapshot(self) -> dict[str, ServingStatus]:
        """Return a copy of every known name and its reported status."""
        with self._lock:
            return dict(self._reported)

    def history(self, service: str) -> tuple[Transition, ...]:
        """Return *service*'s last reported-status changes, oldest first (empty if unknown).

        At most :data:`HISTORY_LENGTH` are kept per name; the first is when the name was
        registered (or the oldest change still kept). Forgetting a name forgets its history.
        """
        with self._lock:
            return tuple(self._history.get(service, ()))

    @property
    def revision(self) -> int:
        """A number that grows with every change of a reported status (for caching views)."""
        return self._revision

    def __len__(self) -> int:
        """Return how many service names the board knows."""
        return len(self._reported)

    @property
    def loop_lag_seconds(self) -> float | None:
        """How late the event loop runs now, as a running loop heartbeat measures it; or None."""
        source = self._loop_lag
        return None if source is None else source()

    def measure_loop_lag(self, source: Callable[[], float] | None) -> None:
        """Report *source()* as :attr:`loop_lag_seconds` (None: no heartbeat runs)."""
        self._loop_lag = source

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` (or :meth:`shutdown`) is in force."""
        return self._draining or self._shut_down

    # -- writing ------------------------------------------------------------------

    def set(self, service: str, status: ServingStatus, *, initial: bool = False) -> None:
        """Set *service*'s status, registering the name if it is new.

        While draining or shut down, the status is remembered and reported after
        :meth:`resume`. ``SERVICE_UNKNOWN`` is not a status a service can have.

        With *initial*, *status* is the one *service* starts from (a dependency check
        that has not run yet, say): it is logged as ``service 'x': NOT_SERVING
        (initial)`` rather than as a change from the board's default, even if it is the
        same, and the name's :meth:`history` starts again from it. Watchers see it like
        any other set.

        Raises:
            ValueError: *status* is SERVICE_UNKNOWN.
        """
        status = _settable(status)
        with self._lock:
            self._set[service] = status
            changes = self._apply({service: self._reportable(service, status)}, initial=initial)
        _publish(changes)

    def clear(self, service: str) -> None:
        """Forget *service*: Check answers NOT_FOUND and watchers see SERVICE_UNKNOWN."""
        with self._lock:
            if self._set.pop(service, None) is None:
                return
            changes = self._apply({service: None})
        _publish(changes)

    def drain(self) -> None:
        """Report every name but ``liveness`` and ``startup`` as NOT_SERVING until :meth:`resume`.

        For a graceful stop: load balancers and readiness probes move traffic away
        while liveness probes keep passing, so the pod is not restarted meanwhile.
        """
        self._change_mode(draining=True, shut_down=self._shut_down, reason="draining")

    def shutdown(self) -> None:
        """Report every name as NOT_SERVING until :meth:`resume`; later sets are only remembered."""
        self._change_mode(draining=self._draining, shut_down=True, reason="shut down")

    @property
    def shedding(self) -> bool:
        """Whether :meth:`shed_load` is in force."""
        return self._shedding

    def shed_load(self, shedding: bool) -> None:
        """While *shedding*, report ``readiness`` and ``""`` as NOT_SERVING; then what was set.

        For an overloaded process: readiness probes and load balancers move traffic to
        other replicas, while every other name (``liveness`` among them) is unchanged.
        Independent of :meth:`drain` and :meth:`shutdown`.
        """
        with self._lock:
            if shedding == self._shedding:
                return
            self._shedding = shedding
            changes = self._apply(
                {
                    n: self._reportable(n, s)
                    for n, s in self._set.items()
                    if n in _SHED_WHILE_OVERLOADED
                }
            )
        reason = "shedding load" if shedding else "no longer shedding load"
        _log.info("status board %s", reason, extra={"event": reason.replace(" ", "_")})
        _publish(changes)

    def resume(self) -> None:
        """Leave drain and shutdown: report the statuses that were set, and allow Watch again."""
        with self._lock:
            self._watches_closed = False
        self._change_mode(draining=False, shut_down=False, reason="resumed")

    def _change_mode(self, *, draining: bool, shut_down: bool, reason: str) -> None:
        with self._lock:
            if (draining, shut_down) == (self._draining, self._shut_down):
                return
            self._draining, self._shut_down = draining, shut_down
            changes = self._apply({n: self._reportable(n, s) for n, s in self._set.items()})
        _log.info("status board %s", reason, extra={"event": reason.replace(" ", "_")})
        _publish(changes)

    def _reportable(self, service: str, status: ServingStatus) -> ServingStatus:
        if self._shut_down or (self._draining and service not in _KEPT_WHILE_DRAINING):
            return ServingStatus.NOT_SERVING
        if self._shedding and service in _SHED_WHILE_OVERLOADED:
            return ServingStatus.NOT_SERVING
        return status

    def _apply(
        self, updates: Mapping[str, ServingStatus | None], *, initial: bool = False
    ) -> list[_Change]:
        """Store reported statuses and fill changed names' mailboxes. Lock held.

        An *initial* status is a change even when it equals the reported one (it is
        logged, and the name's history starts from it); watchers hear only a real change.
        """
        changes: list[_Change] = []
        now = time.time()
        for service, new in updates.items():
            old = self._reported.get(service)
            if initial and new is not None:
                self._revision += 1
                self._reported[service] = new
                self._history[service] = deque((Transition(now, new),), maxlen=HISTORY_LENGTH)
                watchers = () if old == new else tuple(self._watchers.get(service, ()))
                for watcher in watchers:
                    if not isinstance(watcher.latest, _Closed):
                        watcher.latest = new
                changes.append(_Change(service, old, new, watchers, initial=True))
                continue
            if old == new:
                continue
            self._revision += 1
            if new is None:
                del self._reported[service]
                self._history.pop(service, None)
            else:
                self._reported[service] = new
                history = self._history.get(service)
                if history is None:
                    history = self._history[service] = deque(maxlen=HISTORY_LENGTH)
                history.append(Transition(now, new))
            watchers = tuple(self._watchers.get(service, ()))
            for watcher in watchers:
                if not isinstance(watcher.latest, _Closed):  # close_watches() is final
                    watcher.latest = ServingStatus.SERVICE_UNKNOWN if new is None else new
            changes.append(_Change(service, old, new, watchers))
        return changes

    # -- watching -----------------------------------------------------------------

    async def watch(self, service: str) -> AsyncIterator[ServingStatus]:
        """Yield *service*'s status now, then each time it changes, until the board ends watches.

        An unknown name yields SERVICE_UNKNOWN and keeps waiting: once the name is set,
        its status follows. A reader that falls behind gets the latest status, never a
        backlog, and never the same status twice in a row. Leaving the loop (or being
        cancelled) unsubscribes this watcher only.
        """
        watcher = self.subscribe(service)
        if watcher is None:
            return
        try:
            status: ServingStatus | None = None
            while (status := await watcher.next(status)) is not None:
                yield status
        finally:
            self.unsubscribe(service, watcher)

    def subscribe(self, service: str) -> _Watcher | None:
        """:meth:`watch` without the generator, for a server's own streaming handler.

        Returns a watcher whose ``await next(sent)`` returns the first status that is
        not *sent* (pass None at first), or None once the board has ended watches; or
        None at once if watches are ended already. Call it on the event loop that will
        await ``next``, and pair every call with :meth:`unsubscribe`, in a ``finally``.
        """
        with self._lock:
            if self._watches_closed:
                return None
            watcher = _Watcher(
                asyncio.get_running_loop(),
                self._reported.get(service, ServingStatus.SERVICE_UNKNOWN),
            )
            self._watchers.setdefault(service, set()).add(watcher)
        return watcher

    def subscribe_thread(self, service: str) -> _ThreadWatcher | None:
        """:meth:`subscribe` for a handler that runs on a thread of its own (a sync server's).

        The watcher's ``next(sent)`` blocks the calling thread; its ``stop()`` (from any
        thread, e.g. the call's termination callback) makes ``next`` return None. Pair
        every call with :meth:`unsubscribe`, in a ``finally``.
        """
        with self._lock:
            if self._watches_closed:
                return None
            watcher = _ThreadWatcher(self._reported.get(service, ServingStatus.SERVICE_UNKNOWN))
            self._watchers.setdefault(service, set()).add(watcher)
        return watcher

    def unsubscribe(self, service: str, watcher: _Watcher | _ThreadWatcher) -> None:
        """Forget a watcher that :meth:`subscribe` or :meth:`subscribe_thread` returned."""
        with self._lock:
            group = self._watchers.get(service)
            if group is not None:
                group.discard(watcher)
                if not group:
                    del self._watchers[service]

    def close_watches(self) -> None:
        """End every open :meth:`watch` and refuse new ones until :meth:`resume`.

        A server calls this when it stops, so that open Watch streams do not hold a
        graceful stop for its whole grace period.
        """
        with self._lock:
            self._watches_closed = True
            watchers = [w for group in self._watchers.values() for w in group]
            for watcher in watchers:
                watcher.latest = _CLOSED
        if watchers:
            _log.info("ending %d watch stream(s)", len(watchers), extra={"event": "watches_closed"})
            _wake_all(watchers)

    @property
    def watcher_count(self) -> int:
        """How many :meth:`watch` iterators are open."""
        with self._lock:
            return sum(len(group) for group in self._watchers.values())
