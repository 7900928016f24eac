"""What every part of the soak shares.

The RPCs and names, the bounds, the configuration, the tally of calls and errors.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from grpc_health.v1 import health_pb2
from soak_server import GcPauses  # scripts/ is on sys.path: the soak's own folder

from petsage_grpc import LIVENESS, OVERALL, READINESS, SMOKE_TEST_SERVICE, STARTUP, ServingStatus

ROOT: Final = Path(__file__).resolve().parent.parent.parent
SERVER_SCRIPT: Final = ROOT / "scripts" / "soak_server.py"

CHECK: Final = "/grpc.health.v1.Health/Check"
WATCH: Final = "/grpc.health.v1.Health/Watch"
LIST: Final = "/grpc.health.v1.Health/List"
SMOKE_TEST: Final = "/petsage.v1.SmokeTestService/SmokeTest"

FLIPPER: Final = "soak.flipper"
UNKNOWN: Final = "soak.unknown"
KNOWN_NAMES: Final = frozenset({OVERALL, READINESS, LIVENESS, STARTUP, SMOKE_TEST_SERVICE, FLIPPER})
CHECK_NAMES: Final = (READINESS, LIVENESS, STARTUP, OVERALL, SMOKE_TEST_SERVICE, FLIPPER, UNKNOWN)
STEADY_NAMES: Final = frozenset({OVERALL, READINESS, LIVENESS, STARTUP})

SERVING: Final = ServingStatus.SERVING
NOT_SERVING: Final = ServingStatus.NOT_SERVING
SERVICE_UNKNOWN: Final = ServingStatus.SERVICE_UNKNOWN

CHANNEL_OPTIONS: Final = (("grpc.use_local_subchannel_pool", 1),)  # a connection per channel
CALL_TIMEOUT: Final = 10.0
"""Deadline of every unary call; a health call takes milliseconds."""
STEP_TIMEOUT: Final = 30.0
"""Bound on any single wait for the server (start, a command, first messages)."""
CONVERGE_TIMEOUT: Final = 5.0
"""How long a watcher may take to receive the paused flipper's status."""
BASELINE_TIMEOUT: Final = 30.0
DRAIN_NOTICE_LIMIT: Final = 0.100
"""The product's rule: readiness watchers see NOT_SERVING within 100 ms of SIGTERM
(``--notice-limit-ms``: the test suite, on machines it shares, asks for the order of
events, not this figure)."""
DRAIN_QUIET_MARGIN: Final = 0.5
"""No unary call starts in the last 0.5 s of the drain: a call still in transit when the
server stops is refused, which would be a race of this client's, not a finding."""
DRAIN_LEAD: Final = 1.0
"""Seconds of the last burst before the signal."""
AFTER_EXIT: Final = 0.3
"""Seconds of load after the server has exited (calls that must fail UNAVAILABLE)."""
TICK: Final = 0.02
MAX_ERROR_SAMPLES: Final = 40
MAX_SERVER_LINES: Final = 10_000_000

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1


def _request(service: str) -> bytes:
    data: bytes = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    return data


REQUESTS: Final = {name: _request(name) for name in (*CHECK_NAMES,)}
STATUS_OF: Final[dict[bytes, ServingStatus]] = {
    health_pb2.HealthCheckResponse(status=status.name).SerializeToString(): status
    for status in ServingStatus
}
LIST_REQUEST: Final = b""
SMOKE_REQUEST: Final = b""


@dataclass(frozen=True, kw_only=True)
class Config:
    seconds: float
    watchers: int
    check_rate: float
    list_rate: float
    smoke_rate: float
    channels: int
    flipper_share: float
    steady_watchers: int
    checkpoint_seconds: float
    recycle_seconds: float
    flip_seconds: float
    drain_seconds: float
    grace_seconds: float
    max_in_flight: int
    seed: int
    strict_shutdown_codes: bool
    notice_limit: float
    flip_thread: bool
    server_script: Path


class StepError(Exception):
    """A step could not complete (the server died, a bounded wait ran out)."""


class Tally:
    """Calls by method and outcome, errors (counted, with samples), lost transitions."""

    def __init__(self) -> None:
        self.calls: dict[str, Counter[str]] = {}
        self.errors = 0
        self.error_kinds: Counter[str] = Counter()
        self.error_samples: list[str] = []
        self.lost: Counter[str] = Counter()
        self.started = time.monotonic()

    def count(self, method: str, outcome: str) -> None:
        self.calls.setdefault(method, Counter())[outcome] += 1

    def error(self, kind: str, text: str) -> None:
        self.errors += 1
        self.error_kinds[kind] += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            at = time.monotonic() - self.started
            self.error_samples.append(f"{at:8.3f}s {kind}: {text}")

    def lose(self, kind: str, text: str) -> None:
        self.lost[kind] += 1
        self.error(f"lost transition ({kind})", text)


CLIENT_GC: Final = GcPauses()
