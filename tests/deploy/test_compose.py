"""docker-compose.yml agrees with the chart, the settings classes and Prometheus' scrape config,
and its gRPC health check really asks a health server."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import pytest

from .conftest import CHART, DEPLOY, REPO, load_settings, settings_fields

yaml = pytest.importorskip("yaml", reason="needs the deploy toolchain: run scripts/validate_deploy.sh")
grpc = pytest.importorskip("grpc", reason="needs the deploy toolchain: run scripts/validate_deploy.sh")

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
CHART_SERVICES = yaml.safe_load((CHART / "values.yaml").read_text())["services"]
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())


def _kebab(key: str) -> str:
    return "".join(f"-{char.lower()}" if char.isupper() else char for char in key)


def _services() -> Iterator[tuple[str, dict, dict, dict]]:
    """(compose name, chart block, serving service, migrate job) for every service the chart
    deploys by default; a block switched off (`enabled: false`) joins compose when it is
    switched on."""
    for key, block in CHART_SERVICES.items():
        if not block["enabled"]:
            continue
        name = _kebab(key)
        yield name, block, COMPOSE[name], COMPOSE[f"{name}-migrate"]


def test_every_chart_service_has_a_compose_service_and_migration_job() -> None:
    for _name, block, serving, migrate in _services():
        assert serving["command"] == ["python", "-m", block["module"]]
        assert migrate["command"] == ["python", "-m", block["module"], "migrate"]
        assert serving["image"] == migrate["image"] == "tally:dev"
        assert serving["environment"] == migrate["environment"]
        assert serving["depends_on"][f"{_name}-migrate"] == {"condition": "service_completed_successfully"}
        assert migrate["depends_on"]["postgres"] == {"condition": "service_healthy"}


def test_ports_match_the_chart() -> None:
    for _name, block, serving, _migrate in _services():
        env = serving["environment"]
        prefix = block["envPrefix"]
        assert env[f"{prefix}GRPC_PORT"] == str(block["grpcPort"])
        assert env[f"{prefix}METRICS_PORT"] == str(block["metricsPort"])
        assert f"{block['grpcPort']}:{block['grpcPort']}" in serving["ports"]
        assert serving["healthcheck"]["test"][-1] == str(block["grpcPort"])


def test_every_variable_names_a_setting_of_the_service() -> None:
    for _name, block, serving, _migrate in _services():
        fields = settings_fields(block["module"])
        prefix = block["envPrefix"]
        for variable in serving["environment"]:
            assert variable.startswith(prefix), variable
            assert variable.removeprefix(prefix).lower() in fields, f"{variable} matches no setting"


def test_the_service_parses_its_compose_environment() -> None:
    for name, block, serving, _migrate in _services():
        settings = load_settings(block["module"], serving["environment"])
        assert (settings["grpc_port"], settings["metrics_port"]) == (block["grpcPort"], block["metricsPort"])
        assert settings["pg_host"] == "postgres" and settings["jwt_algorithms"] == ["HS256"], name


def test_prometheus_scrapes_every_service_as_a_tally_job() -> None:
    jobs = {job["job_name"]: job for job in PROMETHEUS["scrape_configs"]}
    for name, block, _serving, _migrate in _services():
        assert jobs[name]["static_configs"] == [
            {"targets": [f"{name}:{block['metricsPort']}"], "labels": {"part_of": "tally"}}
        ]


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
