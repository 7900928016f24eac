"""The shipped front-end configurations: deploy/envoy.yaml and deploy/traefik.yaml.

Envoy's own ``--mode validate`` reads the file as shipped (its placeholders filled in, as
envsubst would) and as the outage harness varies it, and the settings the file's comments
argue for are read back: the health check on ``readiness``, the edge limits of Envoy's
edge-proxy guidance, which routes retry what. Traefik's dynamic file, with the replica
addresses its template reads from the environment, is a gRPC-mode health-checked load
balancer. tests/test_outage.py runs both under traffic.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from conftest import load_script
from tcp_listener import free_port

fronts = load_script("fronts")
REPLICAS: Final = [("127.0.0.1", 50061), ("127.0.0.1", 50062), ("127.0.0.1", 50063)]
READS: Final = ("/grpc.health.v1.Health/", "/petsage.v1.SmokeTestService/", "/grpc.reflection.")


def render(**variant: bool) -> str:
    return str(
        fronts.envoy_config(
            REPLICAS, listen=("127.0.0.1", free_port()), admin_port=free_port(), **variant
        )
    )


def envoy() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(render())
    return config


def routes() -> dict[str, dict[str, Any]]:
    (listener,) = envoy()["static_resources"]["listeners"]
    (manager,) = listener["filter_chains"][0]["filters"]
    (host,) = manager["typed_config"]["route_config"]["virtual_hosts"]
    return {
        route["match"].get("path") or route["match"]["prefix"]: route["route"]
        for route in host["routes"]
    }


@pytest.mark.parametrize(
    "variant",
    [{}, {"checks": False}, {"retries": False}],
    ids=["as shipped", "checks off", "no UNAVAILABLE retry"],
)
def test_envoy_validates_the_shipped_file_and_its_variants(
    variant: dict[str, bool], tmp_path: Path
) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(render(**variant))
    command = fronts.envoy_command(config)
    validated = subprocess.run(
        [*command, "--mode", "validate"], capture_output=True, text=True, timeout=60, check=False
    )
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert "OK" in validated.stdout + validated.stderr


def test_every_placeholder_is_filled_and_a_missing_one_is_named() -> None:
    text = render()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "${" not in body
    with pytest.raises(fronts.FrontConfigError, match="no value for PETSAGE_REPLICA_3_HOST"):
        fronts.envoy_config(REPLICAS[:2], listen=("127.0.0.1", 1), admin_port=2)


def test_envoy_checks_readiness_over_grpc_on_every_replica() -> None:
    (cluster,) = envoy()["static_resources"]["clusters"]
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"] == {"service_name": "readiness"}
    assert (check["unhealthy_threshold"], check["healthy_threshold"]) == (2, 2)
    # Detection (2 checks at interval + jitter) plus one slow check fits the example's
    # 2 s drain (and the standalone server's 5 s).
    seconds = {key: float(str(check[key]).rstrip("s")) for key in ("interval", "timeout")}
    window = 2 * (seconds["interval"] + float(check["interval_jitter"].rstrip("s")))
    assert window + seconds["timeout"] < 2.0
    assert check["no_traffic_interval"] == check["interval"]
    # Health changes applied at once, not merged over Envoy's default 1 s.
    assert cluster["common_lb_config"]["update_merge_window"] == "0s"
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [
        50061,
        50062,
        50063,
    ]
    assert render(checks=False).count("grpc_health_check") == 0


def test_envoy_follows_the_edge_proxy_guidance() -> None:
    config = envoy()
    monitors = {
        m["name"]: m["typed_config"] for m in config["overload_manager"]["resource_monitors"]
    }
    assert monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"] == 256 * 2**20
    actions = {a["name"] for a in config["overload_manager"]["actions"]}
    assert {
        "envoy.overload_actions.shrink_heap",
        "envoy.overload_actions.stop_accepting_requests",
        "envoy.overload_actions.reset_high_memory_stream",
    } <= actions
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    (listener,) = config["static_resources"]["listeners"]
    (cluster,) = config["static_resources"]["clusters"]
    assert listener["per_connection_buffer_limit_bytes"] == 32 * 1024
    assert cluster["per_connection_buffer_limit_bytes"] == 32 * 1024
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    h2 = manager["http2_protocol_options"]
    assert h2["max_concurrent_streams"] == 100
    assert h2["initial_stream_window_size"] == 64 * 1024
    assert h2["initial_connection_window_size"] == 1024 * 1024
    assert manager["use_remote_address"] is True
    assert manager["common_http_protocol_options"]["headers_with_underscores_action"] == (
        "REJECT_REQUEST"
    )
    assert manager["max_request_headers_kb"] <= 16
    for timeout in ("request_headers_timeout", "request_timeout", "stream_idle_timeout"):
        assert re.fullmatch(r"[1-9]\d*s", manager[timeout]), timeout


def test_envoy_retries_reads_and_never_replays_a_watch_or_an_unknown_call() -> None:
    table = routes()
    watch = table["/grpc.health.v1.Health/Watch"]
    assert "retry_policy" not in watch
    assert watch["timeout"] == "0s"  # a Watch may stay open for hours
    for prefix in READS:
        retry_on = set(table[prefix]["retry_policy"]["retry_on"].split(","))
        assert {"unavailable", "reset", "connect-failure", "refused-stream"} <= retry_on
    # Only what never reached a replica, for a call whose contract is unknown.
    assert table["/"]["retry_policy"]["retry_on"] == "connect-failure,refused-stream"
    visits = table["/petsage.example.v1.VisitService/"]["retry_policy"]["retry_on"]
    assert visits == "connect-failure,refused-stream,unavailable"
    without: dict[str, Any] = yaml.safe_load(render(retries=False))
    (listener,) = without["static_resources"]["listeners"]
    (host,) = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"
    ]
    (visit_route,) = (
        r for r in host["routes"] if r["match"].get("prefix") == "/petsage.example.v1.VisitService/"
    )
    assert visit_route["route"]["retry_policy"]["retry_on"] == "connect-failure,refused-stream"


def test_traefik_balances_h2c_replicas_by_their_grpc_health() -> None:
    text = fronts.TRAEFIK_CONFIG.read_text()
    # Traefik's file provider fills {{ env "NAME" }} in; the same, done here.
    text = re.sub(r'\{\{ env "(PETSAGE_REPLICA_\d)" \}\}', r"127.0.0.1:\1", text)
    assert "{{" not in text
    config = yaml.safe_load(text)
    balancer = config["http"]["services"]["replicas"]["loadBalancer"]
    assert [s["url"] for s in balancer["servers"]] == [
        f"h2c://127.0.0.1:PETSAGE_REPLICA_{index}" for index in (1, 2, 3)
    ]
    check = balancer["healthCheck"]
    assert check["mode"] == "grpc"
    assert (check["interval"], check["timeout"]) == ("250ms", "1s")
    router = config["http"]["routers"]["petsage"]
    assert config["http"]["middlewares"][router["middlewares"][0]]["retry"]["attempts"] == 3
