"""The Helm chart, linted and rendered by Helm's own Go SDK (helm-python-sdk, no helm binary),
its values schema exercised, and every rendered built-in object validated by kubernetes-validate
in strict mode. ServiceMonitor and PrometheusRule are CRDs kubernetes-validate has no schema for;
their structure is asserted here instead."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import ALERT_RULES, CHART, DASHBOARDS, gateway_routing, load_settings, settings_fields

helm = pytest.importorskip("helm_python", reason="needs the deploy toolchain: run scripts/validate_deploy.sh")
yaml = pytest.importorskip("yaml", reason="needs the deploy toolchain: run scripts/validate_deploy.sh")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="needs the deploy toolchain: run scripts/validate_deploy.sh"
)

Manifest = dict[str, Any]
RELEASE = "tally"
STANDARD_LABELS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
}
CRD_GROUP = "monitoring.coreos.com/v1"
# The chart's kubeVersion floor (gRPC probes are GA from 1.27) and the newest schemas the validator has.
KUBERNETES_VERSIONS = ["1.27.0", kubernetes_validate.latest_version() + ".0"]
SECRET_SETTINGS = ("PG_PASSWORD", "AMQP_URL", "JWT_SECRET")
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())

# A service block added to the chart: a copy of the catalog's under another name.
NEW_SERVICE = {
    **copy.deepcopy(DEFAULTS["services"]["catalog"]),
    "module": "tally_loyalty",
    "envPrefix": "LOYALTY_",
    "grpcPort": 50055,
    "metricsPort": 9105,
    "grpcTargets": {"CATALOG_TARGET": "catalog"},
    "secretEnv": {"PSP_API_KEY": {"name": "tally-psp", "key": "api-key"}},
}
INGRESS = {
    "enabled": True,
    "className": "nginx",
    "annotations": {"cert-manager.io/cluster-issuer": "letsencrypt"},
    "hosts": [
        {
            "host": "api.tally.example",
            "paths": [{"path": "/v1", "pathType": "Prefix"}, {"path": "/docs", "pathType": "Exact"}],
        }
    ],
    "tls": [{"secretName": "tally-api-tls", "hosts": ["api.tally.example"]}],
}
# Every optional feature switched on or to its other branch.
FULL = {
    "image": {"repository": "registry.example/tally", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry"}],
    "serviceAccountName": "tally",
    "jwt": {
        "algorithms": ["RS256"],
        "secret": None,
        "jwksSecret": {"name": "tally-jwks", "key": "jwks.json"},
    },
    "serviceMonitor": {"labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"labels": {"release": "kube-prometheus-stack"}},
    "grafanaDashboards": {"annotations": {"grafana_folder": "Tally"}},
    "services": {
        "catalog": {
            "autoscaling": {"enabled": False},
            "logLevel": "DEBUG",
            "env": {"OUTBOX_SWEEP_INTERVAL_SECONDS": "15"},
            "podAnnotations": {"example.com/team": "payments"},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "tally", "effect": "NoSchedule"}
            ],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}
                                ]
                            }
                        ]
                    }
                }
            },
        },
        "paymentGateway": {"autoscaling": {"targetMemoryUtilizationPercentage": 80}},
        "gateway": {
            "autoscaling": {"enabled": False},
            "env": {"RATE_LIMIT_TOKEN_PER_SECOND": "20", "RATE_LIMIT_TOKEN_BURST": "40"},
            "ingress": INGRESS,
        },
    },
}
# The catalog alone: every service that calls another switched off with it.
CATALOG_ONLY = {"services": {key: {"enabled": False} for key in DEFAULTS["services"] if key != "catalog"}}
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "new-service": {"services": {"loyalty": NEW_SERVICE}},
    "full": FULL,
    "catalog-only": CATALOG_ONLY,
}
# What the payment gateway's Secrets hold, in the format its settings read.
PAYMENT_GATEWAY_SECRETS = {
    "AUTHORIZE_NET_ACCOUNTS": json.dumps(
        {"acme": {"api_login_id": "acme-login", "transaction_key": "tk", "signature_key": "sk"}}
    ),
    "TOKEN_ENCRYPTION_KEYS": json.dumps({"2030-01": "g2QuI/JnaC1YGm3EgcpLbXb+7yy2VokUbVKu7UxRuXQ="}),
    "TOKEN_ENCRYPTION_ACTIVE_KEY_ID": "2030-01",
}


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {key: _merge(base.get(key), value) for key, value in override.items()} | {
            key: value for key, value in base.items() if key not in override
        }
    return override


def _manifests(files: dict[str, str]) -> list[Manifest]:
    """The objects Helm would apply: every rendered template but NOTES.txt, which it only prints."""
    return [
        manifest
        for path, text in files.items()
        if not path.endswith("NOTES.txt")
        for manifest in yaml.safe_load_all(text)
        if manifest
    ]


@pytest.fixture(scope="module")
def chart() -> Any:
    return helm.Chart.load(str(CHART))


@pytest.fixture(scope="module")
def render(chart: Any) -> Callable[[str], list[Manifest]]:
    rendered: dict[str, list[Manifest]] = {}

    def _render(scenario: str) -> list[Manifest]:
        if scenario not in rendered:
            values = _merge(DEFAULTS, SCENARIOS[scenario])
            chart.validate_schema(values)
            files = chart.render(values, name=RELEASE, namespace="tally", is_install=True)
            rendered[scenario] = _manifests(files)
        return rendered[scenario]

    return _render


def _of_kind(manifests: list[Manifest], kind: str) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def _component(manifest: Manifest) -> str:
    return manifest["metadata"]["labels"]["app.kubernetes.io/component"]


def _kebab(key: str) -> str:
    return "".join(f"-{char.lower()}" if char.isupper() else char for char in key)


def _enabled_blocks(scenario: str) -> dict[str, dict[str, Any]]:
    """The scenario's enabled service blocks by object name (tally-<service>)."""
    values = _merge(DEFAULTS, SCENARIOS[scenario])
    return {
        f"{RELEASE}-{_kebab(key)}": block for key, block in values["services"].items() if block["enabled"]
    }


def _container(manifest: Manifest) -> dict[str, Any]:
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    return container


def _env(manifest: Manifest) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in _container(manifest)["env"]}


def test_helm_lint_strict_reports_no_warning_or_error() -> None:
    report = helm.lint(str(CHART), strict=True)
    problems = [message for message in report["messages"] if message["severity"] >= 2]
    assert (problems, report["errors"]) == ([], [])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_built_in_objects_pass_strict_kubernetes_validation(
    render: Callable[[str], list[Manifest]], scenario: str
) -> None:
    built_in = [m for m in render(scenario) if m["apiVersion"] != CRD_GROUP]
    assert len(built_in) >= 8
    for manifest in built_in:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_object_carries_the_standard_labels(
    render: Callable[[str], list[Manifest]], scenario: str
) -> None:
    for manifest in render(scenario):
        labels = manifest["metadata"]["labels"]
        assert STANDARD_LABELS <= set(labels), manifest["metadata"]["name"]
        assert labels["app.kubernetes.io/part-of"] == "tally"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_a_new_service_block_brings_its_whole_set_of_objects(render: Callable[[str], list[Manifest]]) -> None:
    manifests = render("new-service")
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"):
        assert "tally-loyalty" in _of_kind(manifests, kind), kind
    assert "tally-loyalty-migrate" in _of_kind(manifests, "Job")
    deployment = _of_kind(manifests, "Deployment")["tally-loyalty"]
    assert _container(deployment)["command"] == ["python", "-m", "tally_loyalty"]
    env = _env(deployment)
    assert env["LOYALTY_GRPC_PORT"]["value"] == "50055"
    assert env["LOYALTY_CATALOG_TARGET"]["value"] == "tally-catalog:50051"
    assert env["LOYALTY_PSP_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "tally-psp", "key": "api-key"}


def test_every_service_in_the_default_values_is_deployed(render: Callable[[str], list[Manifest]]) -> None:
    assert all(block["enabled"] for block in DEFAULTS["services"].values())
    names = {f"tally-{_kebab(key)}" for key in DEFAULTS["services"]}
    assert set(_of_kind(render("defaults"), "Deployment")) == names
    assert names == {
        "tally-catalog",
        "tally-ledger",
        "tally-receipt",
        "tally-payment-gateway",
        "tally-gateway",
    }


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_deployments_probe_health_limit_resources_and_run_as_non_root(
    render: Callable[[str], list[Manifest]], scenario: str
) -> None:
    blocks = _enabled_blocks(scenario)
    deployments = _of_kind(render(scenario), "Deployment")
    assert set(deployments) == set(blocks)
    for name, deployment in deployments.items():
        block = blocks[name]
        pod = deployment["spec"]["template"]["spec"]
        container = _container(deployment)
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        if block["kind"] == "http":
            assert ports == {"http": block["httpPort"]}
            paths = block["httpProbes"]
            for probe, path in (
                ("startupProbe", paths["livenessPath"]),
                ("livenessProbe", paths["livenessPath"]),
                ("readinessProbe", paths["readinessPath"]),
            ):
                assert container[probe]["httpGet"] == {"path": path, "port": "http"}, (name, probe)
        else:
            assert ports == {"grpc": block["grpcPort"], "metrics": block["metricsPort"]}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert container[probe]["grpc"] == {"port": block["grpcPort"]}, (name, probe)
        assert set(container["resources"]) == {"requests", "limits"}
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["terminationGracePeriodSeconds"] > block["shutdownGraceSeconds"]
        assert ("replicas" in deployment["spec"]) is not block["autoscaling"]["enabled"]


def test_the_http_gateway_is_probed_over_http_and_served_on_its_http_port(
    render: Callable[[str], list[Manifest]],
) -> None:
    manifests = render("defaults")
    deployment = _of_kind(manifests, "Deployment")["tally-gateway"]
    container = _container(deployment)
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert "grpc" not in container["livenessProbe"]
    (port,) = _of_kind(manifests, "Service")["tally-gateway"]["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"], port["appProtocol"]) == (
        "http",
        8080,
        "http",
        "http",
    )
    (endpoint,) = _of_kind(manifests, "ServiceMonitor")["tally-gateway"]["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    env = _env(deployment)
    assert env["GATEWAY_HTTP_PORT"]["value"] == "8080"
    # It reaches neither PostgreSQL nor RabbitMQ, so it is given neither credential.
    assert not [name for name in env if "_PG_" in name or "AMQP" in name or name.endswith("GRPC_PORT")]
    assert "tally-gateway-migrate" not in _of_kind(manifests, "Job")
    assert not _of_kind(manifests, "Ingress"), "the Ingress is off by default"


def test_the_gateway_ingress_routes_its_hosts_to_the_gateway_service(
    render: Callable[[str], list[Manifest]],
) -> None:
    manifests = render("full")
    (ingress,) = _of_kind(manifests, "Ingress").values()
    assert ingress["metadata"]["name"] == "tally-gateway"
    assert ingress["metadata"]["annotations"] == INGRESS["annotations"]
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == INGRESS["tls"]
    (rule,) = spec["rules"]
    assert rule["host"] == "api.tally.example"
    assert [(path["path"], path["pathType"]) for path in rule["http"]["paths"]] == [
        ("/v1", "Prefix"),
        ("/docs", "Exact"),
    ]
    service = _of_kind(manifests, "Service")["tally-gateway"]
    for path in rule["http"]["paths"]:
        assert path["backend"]["service"]["name"] == service["metadata"]["name"]
        assert path["backend"]["service"]["port"]["name"] in {
            port["name"] for port in service["spec"]["ports"]
        }


def test_the_default_ingress_paths_keep_metrics_and_health_inside_the_cluster() -> None:
    paths = [
        path["path"] for host in DEFAULTS["services"]["gateway"]["ingress"]["hosts"] for path in host["paths"]
    ]
    assert "/" not in paths
    assert not any(path.startswith(("/metrics", "/healthz", "/readyz")) for path in paths)
    assert "/v1" in paths, "the API and the provider webhooks are under /v1"


def test_services_reach_each_other_through_the_services_dns_names(
    render: Callable[[str], list[Manifest]],
) -> None:
    manifests = render("defaults")
    services = _of_kind(manifests, "Service")
    deployments = _of_kind(manifests, "Deployment")

    def address(key: str) -> str:
        name = f"tally-{_kebab(key)}"
        (grpc,) = [port for port in services[name]["spec"]["ports"] if port["name"] == "grpc"]
        return f"{name}:{grpc['port']}"

    for key, block in DEFAULTS["services"].items():
        env = _env(deployments[f"tally-{_kebab(key)}"])
        for setting, target in block.get("grpcTargets", {}).items():
            assert env[f"{block['envPrefix']}{setting}"]["value"] == address(target)
    upstreams = json.loads(_env(deployments["tally-gateway"])["GATEWAY_UPSTREAMS"]["value"])
    assert upstreams == {
        service: address(target) for service, target in DEFAULTS["services"]["gateway"]["upstreams"].items()
    }
    assert _env(deployments["tally-ledger"])["LEDGER_CATALOG_TARGET"]["value"] == "tally-catalog:50051"
    assert _env(deployments["tally-receipt"])["RECEIPT_CATALOG_TARGET"]["value"] == "tally-catalog:50051"


def test_the_gateway_has_an_upstream_for_every_service_it_routes_to() -> None:
    routing = gateway_routing()
    assert set(DEFAULTS["services"]["gateway"]["upstreams"]) == set(routing["routed_services"])
    # Without GATEWAY_READINESS_SERVICES, /readyz asks every routed service.
    assert set(routing["readiness_services"]) == set(routing["routed_services"])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"services": {"catalog": {"enabled": False}}}, "grpcTargets.CATALOG_TARGET"),
        ({"services": {"receipt": {"enabled": False}}}, "upstreams[tally.receipt.v1.ReceiptService]"),
        (
            {"services": {"gateway": {"upstreams": {"tally.ledger.v1.LedgerService": "gateway"}}}},
            "upstreams[tally.ledger.v1.LedgerService]",
        ),
        (
            {"services": {"ledger": {"grpcTargets": {"CATALOG_TARGET": "catalogue"}}}},
            "grpcTargets.CATALOG_TARGET",
        ),
    ],
)
def test_a_target_that_is_no_enabled_grpc_service_fails_the_render(
    chart: Any, override: dict[str, Any], named: str
) -> None:
    values = _merge(DEFAULTS, override)
    chart.validate_schema(values)
    with pytest.raises(helm.HelmRenderError, match=re.escape(named)):
        chart.render(values, name=RELEASE, namespace="tally", is_install=True)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_credentials_are_only_ever_secret_references(
    render: Callable[[str], list[Manifest]], scenario: str
) -> None:
    manifests = render(scenario)
    blocks = _enabled_blocks(scenario)
    assert not _of_kind(manifests, "Secret"), "the chart never creates Secrets"
    for kind in ("Deployment", "Job"):
        for name, manifest in _of_kind(manifests, kind).items():
            block = blocks[name.removesuffix("-migrate")]
            prefix = block["envPrefix"]
            env = _env(manifest)
            for variable, item in env.items():
                secret = any(variable.endswith(setting) for setting in SECRET_SETTINGS)
                if secret or variable.removeprefix(prefix) in block.get("secretEnv", {}):
                    assert "value" not in item and "secretKeyRef" in item["valueFrom"], variable
            assert (f"{prefix}PG_PASSWORD" in env) is block["usesPostgres"], name
            assert (f"{prefix}AMQP_URL" in env) is block["usesRabbitmq"], name


@pytest.mark.parametrize("scenario", ["defaults", "full"])
def test_every_service_parses_the_environment_the_chart_gives_it(
    render: Callable[[str], list[Manifest]], scenario: str
) -> None:
    values = _merge(DEFAULTS, SCENARIOS[scenario])
    blocks = _enabled_blocks(scenario)
    for name, deployment in _of_kind(render(scenario), "Deployment").items():
        block = blocks[name]
        prefix = block["envPrefix"]
        fields = settings_fields(block["module"])
        environment = {}
        for item in _container(deployment)["env"]:
            setting = item["name"].removeprefix(prefix)
            assert setting.lower() in fields, f"{item['name']} matches no setting of {block['module']}"
            # A value from a Secret in the format the setting reads.
            environment[item["name"]] = item.get(
                "value", PAYMENT_GATEWAY_SECRETS.get(setting, "from-a-secret")
            )
        settings = load_settings(block["module"], environment)
        if block["kind"] == "http":
            assert settings["http_port"] == block["httpPort"], name
        else:
            ports = (settings["grpc_port"], settings["metrics_port"])
            assert ports == (block["grpcPort"], block["metricsPort"]), name
        assert settings["jwt_algorithms"] == values["jwt"]["algorithms"], name
        assert settings["version"] == (
            values["image"]["tag"] or yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
        )
        if block["usesPostgres"]:
            assert settings["pg_host"] == values["postgres"]["host"], name
        for setting, target in block.get("grpcTargets", {}).items():
            assert (
                settings[setting.lower()]
                == f"tally-{_kebab(target)}:{values['services'][target]['grpcPort']}"
            )


def test_the_payment_gateway_parses_the_environment_the_chart_gives_it(
    render: Callable[[str], list[Manifest]],
) -> None:
    block = DEFAULTS["services"]["paymentGateway"]
    deployment = _of_kind(render("defaults"), "Deployment")["tally-payment-gateway"]
    fields = settings_fields("tally_payment_gateway")
    environment = {}
    for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]:
        name = item["name"].removeprefix("PAYMENT_GATEWAY_")
        assert name.lower() in fields, f"{item['name']} matches no setting"
        environment[item["name"]] = item.get(
            "value", PAYMENT_GATEWAY_SECRETS.get(name, "value-from-a-secret")
        )
    assert set(PAYMENT_GATEWAY_SECRETS) <= set(block["secretEnv"])
    settings = load_settings("tally_payment_gateway", environment)
    assert (settings["grpc_port"], settings["metrics_port"]) == (50053, 9103)
    assert settings["authorize_net_url"] == block["env"]["AUTHORIZE_NET_URL"]
    assert set(settings["authorize_net_accounts"]) == {"acme"}, "no development default account"
    assert settings["token_encryption_active_key_id"] == "2030-01"
    jobs = {
        name: settings[name.lower()]
        for name in (
            "RECONCILIATION_INTERVAL_SECONDS",
            "RECONCILIATION_BATCH_SIZE",
            "RESEAL_INTERVAL_SECONDS",
            "RESEAL_BATCH_SIZE",
        )
    }
    assert jobs == {name: float(block["env"][name]) for name in jobs}


def test_jwks_is_mounted_as_a_file_when_configured(render: Callable[[str], list[Manifest]]) -> None:
    pod = _of_kind(render("full"), "Deployment")["tally-catalog"]["spec"]["template"]["spec"]
    env = {item["name"]: item for item in pod["containers"][0]["env"]}
    assert env["CATALOG_JWT_JWKS_FILE"]["value"] == "/etc/tally/jwks/jwks.json"
    assert "CATALOG_JWT_SECRET" not in env
    assert env["CATALOG_JWT_ALGORITHMS"]["value"] == '["RS256"]'
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["jwks"]["secret"]["secretName"] == "tally-jwks"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_migrations_run_as_a_pre_install_and_pre_upgrade_hook(
    render: Callable[[str], list[Manifest]], scenario: str
) -> None:
    manifests = render(scenario)
    jobs = _of_kind(manifests, "Job")
    assert set(jobs) == {
        f"{name}-migrate" for name, block in _enabled_blocks(scenario).items() if block["migrate"]
    }
    for job in jobs.values():
        annotations = job["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        assert pod["containers"][0]["command"][-1] == "migrate"
        # The Job's pods must not count as the service's pods (Service, PDB, HPA select those).
        assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"].endswith(
            "-migrate"
        )


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_autoscaler_and_disruption_budget_target_the_service(
    render: Callable[[str], list[Manifest]], scenario: str
) -> None:
    manifests = render(scenario)
    deployments = _of_kind(manifests, "Deployment")
    for name, hpa in _of_kind(manifests, "HorizontalPodAutoscaler").items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    for name, pdb in _of_kind(manifests, "PodDisruptionBudget").items():
        assert pdb["spec"]["selector"] == deployments[name]["spec"]["selector"]
    services = _of_kind(manifests, "Service")
    for name, service in services.items():
        assert service["spec"]["selector"] == deployments[name]["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_service_monitors_scrape_metrics_as_the_service_job(
    render: Callable[[str], list[Manifest]], scenario: str
) -> None:
    manifests = render(scenario)
    services = _of_kind(manifests, "Service")
    monitors = _of_kind(manifests, "ServiceMonitor")
    assert set(monitors) == set(services)
    for name, monitor in monitors.items():
        assert monitor["apiVersion"] == CRD_GROUP
        spec = monitor["spec"]
        assert spec["selector"]["matchLabels"] == services[name]["spec"]["selector"]
        # job = app.kubernetes.io/component, i.e. the compose job name the rules group by.
        assert spec["jobLabel"] == "app.kubernetes.io/component"
        (endpoint,) = spec["endpoints"]
        assert endpoint["port"] in {port["name"] for port in services[name]["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
        assert {"targetLabel": "part_of", "replacement": "tally"} in endpoint["relabelings"]
    if scenario == "full":
        assert all(m["metadata"]["labels"]["release"] == "kube-prometheus-stack" for m in monitors.values())


def test_prometheus_rule_is_the_shared_alert_file(render: Callable[[str], list[Manifest]]) -> None:
    (rule,) = _of_kind(render("defaults"), "PrometheusRule").values()
    assert rule["apiVersion"] == CRD_GROUP
    assert rule["spec"] == yaml.safe_load(ALERT_RULES.read_text())


def test_dashboards_are_the_shared_files_labelled_for_the_grafana_sidecar(
    render: Callable[[str], list[Manifest]],
) -> None:
    config_maps = _of_kind(render("defaults"), "ConfigMap")
    shipped = {}
    for config_map in config_maps.values():
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        shipped.update(config_map["data"])
    assert {name: json.loads(text) for name, text in shipped.items()} == {
        path.name: json.loads(path.read_text()) for path in DASHBOARDS.glob("*.json")
    }


def test_monitoring_objects_can_be_switched_off(chart: Any) -> None:
    values = _merge(
        DEFAULTS,
        {
            "serviceMonitor": {"enabled": False},
            "prometheusRule": {"enabled": False},
            "grafanaDashboards": {"enabled": False},
        },
    )
    files = chart.render(values, name=RELEASE, namespace="tally", is_install=True)
    kinds = {manifest["kind"] for manifest in _manifests(files)}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Job"}


def _without(block: dict[str, Any], key: str) -> dict[str, Any]:
    # Only a new block can lack a key: Helm fills a default block's keys back in.
    return {name: value for name, value in block.items() if name != key}


@pytest.mark.parametrize(
    ("override", "why"),
    [
        ({"postgres": {"password": "hunter2"}}, "a password inlined next to the Secret reference"),
        (
            {"rabbitmq": {"url": "amqp://tally:hunter2@rabbitmq:5672/"}},
            "an AMQP URL with credentials inlined",
        ),
        (
            {"jwt": {"secret": None, "jwksSecret": None}},
            "no JWT key source: the development secret would be used",
        ),
        ({"jwt": {"algorithms": ["none"]}}, "the `none` algorithm"),
        (
            {"services": {"catalog": {"env": {"PG_PASSWORD": "hunter2"}}}},
            "a credential passed as a plain setting",
        ),
        (
            {"services": {"paymentGateway": {"env": {"TOKEN_ENCRYPTION_KEYS": '{"k1": "..."}'}}}},
            "encryption keys passed as a plain setting",
        ),
        ({"services": {"catalog": {"envPrefix": "catalog"}}}, "a prefix the settings class cannot have"),
        ({"services": {"catalog": {"grpcPort": 70000}}}, "a port out of range"),
        ({"services": {"catalog": {"replicas": 3}}}, "a misspelt key"),
        (
            {"services": {"paymentGateway": {"env": {"AUTHORIZE_NET_ACCOUNTS": '{"acme": {}}'}}}},
            "provider accounts passed as a plain setting",
        ),
        (
            {"services": {"ledger": {"env": {"SERVICE_TOKEN": "eyJ..."}}}},
            "a service token as a plain setting",
        ),
        ({"services": {"loyalty-points": NEW_SERVICE}}, "a service key that is not camelCase"),
        ({"services": {"ledger": {"kind": "tcp"}}}, "a kind of service the templates do not know"),
        ({"services": {"gateway": {"grpcPort": 50057}}}, "an HTTP service with a gRPC port"),
        ({"services": {"catalog": {"httpPort": 8081}}}, "a gRPC service with an HTTP port"),
        ({"services": {"loyalty": _without(NEW_SERVICE, "grpcPort")}}, "a gRPC service without its port"),
        (
            {"services": {"edge": _without(DEFAULTS["services"]["gateway"], "httpProbes")}},
            "an HTTP service without its probe paths",
        ),
        (
            {"services": {"gateway": {"httpProbes": {"readinessPath": "readyz"}}}},
            "a probe path without its /",
        ),
        ({"services": {"ledger": {"ingress": {"enabled": False}}}}, "an Ingress for a gRPC service"),
        ({"services": {"gateway": {"ingress": {"enabled": True, "hosts": []}}}}, "an Ingress without a host"),
        ({"services": {"ledger": {"usesPostgres": False}}}, "migrations for a service without a database"),
        (
            {"services": {"loyalty": _without(NEW_SERVICE, "dbMaxConnections")}},
            "a service using PostgreSQL without its connection ceiling",
        ),
        (
            {"services": {"ledger": {"grpcTargets": {"CATALOG_TARGET": "catalog:50051"}}}},
            "an address for a block",
        ),
        (
            {"services": {"gateway": {"upstreams": {"catalog": "catalog"}}}},
            "an upstream that is no gRPC service",
        ),
    ],
)
def test_schema_refuses(chart: Any, override: dict[str, Any], why: str) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(_merge(DEFAULTS, override))


def test_schema_accepts_settings_whose_names_only_look_secret(chart: Any) -> None:
    # The gateway's rate limits are per token and keep many keys: numbers, not credentials.
    limits = {
        "RATE_LIMIT_TOKEN_PER_SECOND": "20",
        "RATE_LIMIT_TOKEN_BURST": "40",
        "RATE_LIMIT_MAX_KEYS": "1000",
    }
    chart.validate_schema(_merge(DEFAULTS, {"services": {"gateway": {"env": limits}}}))
