"""Prometheus metrics: served statuses, dependency checks, event loop lag and RPCs.

Statuses and check states are read from the board and the monitor when Prometheus
scrapes, so they cost nothing between scrapes. RPCs are counted by a server interceptor
that the standalone server installs only when metrics are on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from petsage_grpc.board._check import CHECK_PREFIX
from petsage_grpc.board._heartbeat import LoopHeartbeat
from petsage_grpc.board._monitor import HealthMonitor
from petsage_grpc.board._status import ServingStatus, StatusBoard

__all__ = ["Metrics"]


class _StateCollector(Collector):
    """Board statuses, loop lag and, with *with_checks*, each dependency check by name."""

    def __init__(
        self,
        board: StatusBoard,
        monitor: HealthMonitor | None,
        heartbeat: LoopHeartbeat | None,
        *,
        with_checks: bool,
        closed_connections: Callable[[], Mapping[str, int]] | None = None,
        memory_budget: tuple[int, str] | None = None,
    ) -> None:
        self._closed_connections = closed_connections
        self._memory_budget = memory_budget
        self._board = board
        self._monitor = monitor
        self._heartbeat = heartbeat
        self._with_checks = with_checks

    def collect(self) -> Iterator[Metric]:
        serving = GaugeMetricFamily(
            "petsage_grpc_service_serving",
            "1 if the health service name reports SERVING, else 0.",
            labels=["service"],
        )
        for name, status in sorted(self._board.snapshot().items()):
            if self._with_checks or not name.startswith(CHECK_PREFIX):
                serving.add_metric([name], 1.0 if status is ServingStatus.SERVING else 0.0)
        yield serving
        if self._heartbeat is not None:
            yield GaugeMetricFamily(
                "petsage_grpc_event_loop_lag_seconds",
                "How late the event loop runs a timer now (its last beat, or how overdue "
                "the next one is).",
                value=self._heartbeat.lag_seconds,
            )
            yield CounterMetricFamily(
                "petsage_grpc_event_loop_stalls",
                "Times the event loop did not run for longer than the stall threshold "
                "(liveness then reports NOT_SERVING).",
                value=self._heartbeat.stalls,
            )
        if self._memory_budget is not None:
            budget = GaugeMetricFamily(
                "petsage_grpc_memory_budget_bytes",
                "The memory budget every cap is derived from, by where it came from "
                "(configured, container, default).",
                labels=["source"],
            )
            budget.add_metric([self._memory_budget[1]], self._memory_budget[0])
            yield budget
        if self._closed_connections is not None:
            closed = CounterMetricFamily(
                "petsage_grpc_connections_closed",
                "gRPC connections the server closed: address_cap (one peer address over its "
                "cap), flood (receiving fast and answered little while memory grew or the process "
                "was busy).",
                labels=["reason"],
            )
            for reason, count in sorted(self._closed_connections().items()):
                closed.add_metric([reason], count)
            yield closed
        if self._monitor is None or not self._with_checks:
            return
        duration = GaugeMetricFamily(
            "petsage_grpc_check_last_duration_seconds",
            "How long the check's last attempt took.",
            labels=["check"],
        )
        failures = GaugeMetricFamily(
            "petsage_grpc_check_consecutive_failures",
            "Failed attempts since the check last passed.",
            labels=["check"],
        )
        last_success = GaugeMetricFamily(
            "petsage_grpc_check_last_success_timestamp_seconds",
            "When the check last passed (seconds since the epoch).",
            labels=["check"],
        )
        # For the alerting rules (deploy/prometheus-rules.yaml): which checks are critical,
        # how close each attempt comes to its timeout, and how often a check flaps.
        serving_check = GaugeMetricFamily(
            "petsage_grpc_check_serving",
            "1 if the check reports SERVING, else 0; critical checks gate readiness.",
            labels=["check", "critical"],
        )
        timeout = GaugeMetricFamily(
            "petsage_grpc_check_timeout_seconds",
            "The check's timeout: the budget of one attempt.",
            labels=["check"],
        )
        changes = CounterMetricFamily(
            "petsage_grpc_check_status_changes",
            "How often the check's status changed between SERVING and NOT_SERVING.",
            labels=["check"],
        )
        for state in self._monitor.states:
            labels = [state.check.name]
            if state.last_duration is not None:
                duration.add_metric(labels, state.last_duration)
            failures.add_metric(labels, state.consecutive_failures)
            if state.last_success_time is not None:
                last_success.add_metric(labels, state.last_success_time)
            critical = "true" if state.check.critical else "false"
            serving_check.add_metric([state.check.name, critical], 1.0 if state.serving else 0.0)
            timeout.add_metric(labels, state.check.timeout)
            changes.add_metric(labels, state.flips)
        yield from (duration, failures, last_success, serving_check, timeout, changes)


class _RpcCounter(grpc.aio.ServerInterceptor):
    """Counts finished RPCs by method and status code (unknown methods as one label)."""

    def __init__(self, *registries: CollectorRegistry) -> None:
        self._total = Counter(
            "petsage_grpc_rpcs",
            "RPCs handled, by method and gRPC status code.",
            ["method", "code"],
            registry=None,
        )
        for registry in registries:
            registry.register(self._total)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            self._total.labels("unknown", grpc.StatusCode.UNIMPLEMENTED.name).inc()
            return handler
        method = handler_call_details.method.lstrip("/")
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(method, handler.unary_unary))  # type: ignore[attr-defined, no-any-return]
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._unary(method, handler.stream_unary))  # type: ignore[attr-defined, no-any-return]
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._stream(method, handler.unary_stream))  # type: ignore[attr-defined, no-any-return]
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=self._stream(method, handler.stream_stream))  # type: ignore[attr-defined, no-any-return]
        return handler

    def _code(
        self, context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None
    ) -> str:
        if isinstance(error, BaseException) and not isinstance(error, Exception):
            return grpc.StatusCode.CANCELLED.name
        code: object = context.code()
        if isinstance(code, grpc.StatusCode):
            return code.name
        return grpc.StatusCode.UNKNOWN.name if error is not None else grpc.StatusCode.OK.name

    def _unary(self, method: str, behaviour: Any) -> Any:
        async def counted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            error: BaseException | None = None
            try:
                return await behaviour(request, context)
            except BaseException as caught:
                error = caught
                raise
            finally:
                self._total.labels(method, self._code(context, error)).inc()

        return counted

    def _stream(self, method: str, behaviour: Any) -> Any:
        async def counted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            error: BaseException | None = None
            try:
                async for response in behaviour(request, context):
                    yield response
            except BaseException as caught:
                error = caught
                raise
            finally:
                self._total.labels(method, self._code(context, error)).inc()

        return counted


class Metrics:
    """Prometheus registries for one server: board and check states, and RPC counts.

    Install :attr:`interceptor` on the gRPC server to count RPCs; serve :meth:`render`.
    Check names (``check.<name>`` statuses and the per-check gauges) are rendered only
    when asked for, so that the caller can apply the rules SmokeTest applies to them.
    """

    def __init__(
        self,
        board: StatusBoard,
        monitor: HealthMonitor | None = None,
        *,
        heartbeat: LoopHeartbeat | None = None,
        closed_connections: Callable[[], Mapping[str, int]] | None = None,
        memory_budget: tuple[int, str] | None = None,
    ) -> None:
        """*memory_budget*: (bytes, source) for ``petsage_grpc_memory_budget_bytes``."""
        self.registry = CollectorRegistry()
        """Everything, check names included."""
        self._public = CollectorRegistry()
        for registry, with_checks in ((self.registry, True), (self._public, False)):
            registry.register(
                _StateCollector(
                    board,
                    monitor,
                    heartbeat,
                    with_checks=with_checks,
                    closed_connections=closed_connections,
                    memory_budget=memory_budget,
                )
            )
        self.interceptor: grpc.aio.ServerInterceptor = _RpcCounter(self.registry, self._public)

    def render(self, *, with_checks: bool = True) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type.

        Without *with_checks*, nothing in it names a dependency check.
        """
        registry = self.registry if with_checks else self._public
        return generate_latest(registry), CONTENT_TYPE_LATEST
