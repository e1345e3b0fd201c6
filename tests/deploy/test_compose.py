"""docker-compose.yml agrees with the chart, the settings classes and Prometheus' scrape config,
and its gRPC and HTTP health checks really ask a server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .conftest import CHART, DEPLOY, REPO, gateway_routing, load_settings, settings_fields

yaml = pytest.importorskip("yaml", reason="needs the deploy toolchain: run scripts/validate_deploy.sh")
grpc = pytest.importorskip("grpc", reason="needs the deploy toolchain: run scripts/validate_deploy.sh")

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
CHART_SERVICES = yaml.safe_load((CHART / "values.yaml").read_text())["services"]
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())


def _kebab(key: str) -> str:
    return "".join(f"-{char.lower()}" if char.isupper() else char for char in key)


def _address(key: str) -> str:
    """A gRPC service's address in compose: its compose name and port."""
    return f"{_kebab(key)}:{CHART_SERVICES[key]['grpcPort']}"


def _services() -> Iterator[tuple[str, dict, dict]]:
    """(compose name, chart block, serving service) for every service block of the chart."""
    for key, block in CHART_SERVICES.items():
        name = _kebab(key)
        assert name in COMPOSE, f"the chart's {key} has no compose service {name}"
        yield name, block, COMPOSE[name]


def test_compose_runs_every_service_of_the_chart_and_no_other() -> None:
    modules = {block["module"] for block in CHART_SERVICES.values()}
    run = {
        service["command"][2]
        for service in COMPOSE.values()
        if service.get("image") == "tally:dev" and service["command"][-1] != "migrate"
    }
    # The PSP simulator stands in for Authorize.Net in development only; the chart has no block for it.
    assert run == modules | {"psp_simulator"}
    assert {name for name, _block, _serving in _services()} | {"psp-simulator"} <= set(COMPOSE)


def test_every_chart_service_has_a_compose_service_and_migration_job() -> None:
    for name, block, serving in _services():
        assert serving["command"] == ["python", "-m", block["module"]]
        assert serving["image"] == "tally:dev"
        assert serving["restart"] == "unless-stopped"
        if not block["migrate"]:
            assert f"{name}-migrate" not in COMPOSE
            continue
        migrate = COMPOSE[f"{name}-migrate"]
        assert migrate["command"] == ["python", "-m", block["module"], "migrate"]
        assert migrate["image"] == "tally:dev"
        assert serving["environment"] == migrate["environment"]
        assert serving["depends_on"][f"{name}-migrate"] == {"condition": "service_completed_successfully"}
        assert migrate["depends_on"]["postgres"] == {"condition": "service_healthy"}


def test_consumers_start_after_their_queues_are_declared() -> None:
    for _name, block, serving in _services():
        if block["usesRabbitmq"]:
            assert serving["depends_on"]["rabbitmq-definitions"] == {
                "condition": "service_completed_successfully"
            }


def test_ports_and_health_checks_match_the_chart() -> None:
    for name, block, serving in _services():
        env = serving["environment"]
        prefix = block["envPrefix"]
        if block["kind"] == "http":
            port = block["httpPort"]
            assert env[f"{prefix}HTTP_PORT"] == str(port)
            assert serving["healthcheck"]["test"][-2:] == [str(port), block["httpProbes"]["readinessPath"]]
        else:
            port = block["grpcPort"]
            assert env[f"{prefix}GRPC_PORT"] == str(port)
            assert env[f"{prefix}METRICS_PORT"] == str(block["metricsPort"])
            assert serving["healthcheck"]["test"][-1] == str(port)
        assert f"{port}:{port}" in serving["ports"], name


def test_every_variable_names_a_setting_of_the_service() -> None:
    for _name, block, serving in _services():
        fields = settings_fields(block["module"])
        prefix = block["envPrefix"]
        for variable in serving["environment"]:
            assert variable.startswith(prefix), variable
            assert variable.removeprefix(prefix).lower() in fields, f"{variable} matches no setting"


def test_the_service_parses_its_compose_environment() -> None:
    for name, block, serving in _services():
        settings = load_settings(block["module"], serving["environment"])
        if block["kind"] == "http":
            assert settings["http_port"] == block["httpPort"], name
        else:
            assert (settings["grpc_port"], settings["metrics_port"]) == (
                block["grpcPort"],
                block["metricsPort"],
            )
        if block["usesPostgres"]:
            assert settings["pg_host"] == "postgres", name
        assert settings["jwt_algorithms"] == ["HS256"], name


def test_services_reach_each_other_by_compose_service_name() -> None:
    for name, block, serving in _services():
        env = serving["environment"]
        for setting, target in block.get("grpcTargets", {}).items():
            assert env[f"{block['envPrefix']}{setting}"] == _address(target), (name, setting)
            assert serving["depends_on"][_kebab(target)] == {"condition": "service_healthy"}, name
    gateway = CHART_SERVICES["gateway"]
    upstreams = json.loads(COMPOSE["gateway"]["environment"]["GATEWAY_UPSTREAMS"])
    assert upstreams == {service: _address(target) for service, target in gateway["upstreams"].items()}
    # Its /readyz asks every routed service, so it is healthy only once they all are.
    assert set(upstreams) == set(gateway_routing()["routed_services"])
    for target in gateway["upstreams"].values():
        assert COMPOSE["gateway"]["depends_on"][_kebab(target)] == {"condition": "service_healthy"}


def test_the_payment_gateway_calls_the_simulator_which_calls_back_through_the_gateway() -> None:
    simulator = COMPOSE["psp-simulator"]
    options = dict(argument.removeprefix("--").split("=", 1) for argument in simulator["command"][3:])
    assert simulator["command"][:3] == ["python", "-m", "psp_simulator"]
    assert options["host"] == "0.0.0.0"
    payments = COMPOSE["payment-gateway"]
    assert (
        payments["environment"]["PAYMENT_GATEWAY_AUTHORIZE_NET_URL"]
        == f"http://psp-simulator:{options['port']}"
    )
    assert payments["depends_on"]["psp-simulator"] == {"condition": "service_healthy"}
    assert simulator["healthcheck"]["test"][-2] == options["port"]
    # Webhooks go to the HTTP gateway's Authorize.Net route, the simulator naming the merchant.
    merchant_placeholder = "{merchant}"
    route = gateway_routing()["edge_aliases"]["authorizeNet"].replace("{merchant_id}", merchant_placeholder)
    gateway_port = CHART_SERVICES["gateway"]["httpPort"]
    assert options["webhook-url"] == f"http://gateway:{gateway_port}{route}"
    assert "depends_on" not in simulator, "the simulator waits for nobody: the gateway waits for it"


def test_prometheus_scrapes_every_service_as_a_tally_job() -> None:
    jobs = {job["job_name"]: job for job in PROMETHEUS["scrape_configs"]}
    for name, block, _serving in _services():
        port = block["httpPort"] if block["kind"] == "http" else block["metricsPort"]
        assert jobs[name]["static_configs"] == [
            {"targets": [f"{name}:{port}"], "labels": {"part_of": "tally"}}
        ]
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_and_grafana_load_the_charts_copies() -> None:
    assert (
        "./helm/tally/files/prometheus/alerts.yml:/etc/prometheus/rules/tally-alerts.yml:ro"
        in (COMPOSE["prometheus"]["volumes"])
    )
    assert PROMETHEUS["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "tally.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert f"./helm/tally/files/grafana/dashboards:{dashboards_path}:ro" in COMPOSE["grafana"]["volumes"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def health_server() -> Iterator[tuple[int, object]]:
    from grpc_health.v1 import health, health_pb2_grpc

    port = _free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield port, servicer
    server.stop(grace=None)


def _run_health_check(port: int) -> int:
    test = COMPOSE["catalog"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    return subprocess.run(
        [sys.executable, "-c", test[3], str(port)], capture_output=True, timeout=30
    ).returncode


def test_health_check_passes_only_while_the_server_is_serving(health_server: tuple[int, object]) -> None:
    from grpc_health.v1 import health_pb2

    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert _run_health_check(port) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert _run_health_check(port) == 1


def test_health_check_fails_when_nothing_listens() -> None:
    assert _run_health_check(_free_port()) != 0


def test_every_service_uses_one_of_the_two_tested_health_checks() -> None:
    scripts = {
        name: service["healthcheck"]["test"][3]
        for name, service in COMPOSE.items()
        if service.get("image") == "tally:dev" and "healthcheck" in service
    }
    assert set(scripts) == {name for name, _block, _serving in _services()} | {"psp-simulator"}
    grpc_check, http_check = (
        COMPOSE["catalog"]["healthcheck"]["test"][3],
        COMPOSE["gateway"]["healthcheck"]["test"][3],
    )
    for name, block, _serving in _services():
        assert scripts[name] == (http_check if block["kind"] == "http" else grpc_check), name
    assert scripts["psp-simulator"] == http_check


class _StatusHandler(BaseHTTPRequestHandler):
    """Answers GET with the status the test set for the path (404 for any other)."""

    statuses: dict[str, int] = {}

    def do_GET(self) -> None:
        self.send_response(self.statuses.get(self.path, 404))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test reads exit codes, not access lines."""


@pytest.fixture
def http_server() -> Iterator[tuple[int, dict[str, int]]]:
    statuses: dict[str, int] = {}
    handler = type("Handler", (_StatusHandler,), {"statuses": statuses})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], statuses
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _run_http_health_check(port: int, path: str) -> int:
    test = COMPOSE["gateway"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    return subprocess.run(
        [sys.executable, "-c", test[3], str(port), path], capture_output=True, timeout=30
    ).returncode


def test_http_health_check_passes_only_on_a_2xx_answer(http_server: tuple[int, dict[str, int]]) -> None:
    port, statuses = http_server
    statuses["/readyz"] = 200
    assert _run_http_health_check(port, "/readyz") == 0
    statuses["/readyz"] = 503
    assert _run_http_health_check(port, "/readyz") != 0
    assert _run_http_health_check(port, "/elsewhere") != 0


def test_http_health_check_fails_when_nothing_listens() -> None:
    assert _run_http_health_check(_free_port(), "/readyz") != 0
