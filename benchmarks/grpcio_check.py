"""The grpcio way to probe, for comparison with ``petsage-grpc probe``: one blocking Check.

``python -m benchmarks.grpcio_check HOST:PORT`` waits for the channel (1 s), makes one
Check (1 s) and exits 0 on SERVING, 4 on another status, 2 or 3 on failures, as the
probe before the h2 rewrite did with grpcio.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc
from grpc_health.v1 import health_pb2


def main(address: str) -> int:
    """Check *address* once; return the probe's exit code."""
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=1.0)
        except grpc.FutureTimeoutError:
            return 2
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            answer = check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        except grpc.RpcError:
            return 3
    serving = answer.status == health_pb2.HealthCheckResponse.SERVING
    print(f"status: {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}")
    return 0 if serving else 4


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
