"""The Helm chart, linted and rendered by Helm's own Go SDK (helm-python-sdk, no helm binary),
its values schema exercised, and every rendered built-in object validated by kubernetes-validate
in strict mode. ServiceMonitor and PrometheusRule are CRDs kubernetes-validate has no schema for;
their structure is asserted here instead."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import ALERT_RULES, CHART, DASHBOARDS, load_settings, settings_fields

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

PAYMENT_GATEWAY = {
    **copy.deepcopy(DEFAULTS["services"]["catalog"]),
    "module": "tally_payment_gateway",
    "envPrefix": "PAYMENT_GATEWAY_",
    "grpcPort": 50053,
    "metricsPort": 9103,
    "secretEnv": {"PSP_API_KEY": {"name": "tally-psp", "key": "api-key"}},
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
        "paymentGateway": {
            **PAYMENT_GATEWAY,
            "autoscaling": {**PAYMENT_GATEWAY["autoscaling"], "targetMemoryUtilizationPercentage": 80},
        },
    },
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "two-services": {"services": {"paymentGateway": PAYMENT_GATEWAY}},
    "full": FULL,
    # The chart's own payment gateway block, switched on.
    "payment-gateway": {"services": {"paymentGateway": {"enabled": True}}},
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
    manifests = render("two-services")
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"):
        assert set(_of_kind(manifests, kind)) == {"tally-catalog", "tally-payment-gateway"}, kind
    assert set(_of_kind(manifests, "Job")) == {"tally-catalog-migrate", "tally-payment-gateway-migrate"}
    deployment = _of_kind(manifests, "Deployment")["tally-payment-gateway"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "tally_payment_gateway"]
    env = {item["name"]: item for item in container["env"]}
    assert env["PAYMENT_GATEWAY_GRPC_PORT"]["value"] == "50053"
    assert env["PAYMENT_GATEWAY_PSP_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "tally-psp",
        "key": "api-key",
    }


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_deployments_probe_grpc_health_limit_resources_and_run_as_non_root(
    render: Callable[[str], list[Manifest]], scenario: str
) -> None:
    values = _merge(DEFAULTS, SCENARIOS[scenario])
    deployments = _of_kind(render(scenario), "Deployment")
    assert deployments
    for deployment in deployments.values():
        block = next(
            block
            for key, block in values["services"].items()
            if deployment["metadata"]["name"] == f"tally-{_kebab(key)}"
        )
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert container[probe]["grpc"] == {"port": block["grpcPort"]}, probe
        assert {port["name"]: port["containerPort"] for port in container["ports"]} == {
            "grpc": block["grpcPort"],
            "metrics": block["metricsPort"],
        }
        assert set(container["resources"]) == {"requests", "limits"}
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["terminationGracePeriodSeconds"] > block["shutdownGraceSeconds"]
        assert ("replicas" in deployment["spec"]) is not block["autoscaling"]["enabled"]


def _kebab(key: str) -> str:
    return "".join(f"-{char.lower()}" if char.isupper() else char for char in key)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_credentials_are_only_ever_secret_references(
    render: Callable[[str], list[Manifest]], scenario: str
) -> None:
    manifests = render(scenario)
    assert not _of_kind(manifests, "Secret"), "the chart never creates Secrets"
    for kind in ("Deployment", "Job"):
        for manifest in _of_kind(manifests, kind).values():
            env = {
                item["name"]: item for item in manifest["spec"]["template"]["spec"]["containers"][0]["env"]
            }
            for name, item in env.items():
                if any(name.endswith(setting) for setting in SECRET_SETTINGS):
                    assert "value" not in item and "secretKeyRef" in item["valueFrom"], name
            prefix = next(name for name in env if name.endswith("GRPC_PORT")).removesuffix("GRPC_PORT")
            assert {f"{prefix}PG_PASSWORD", f"{prefix}AMQP_URL"} <= set(env)


@pytest.mark.parametrize("scenario", ["defaults", "full"])
def test_the_catalog_parses_the_environment_the_chart_gives_it(
    render: Callable[[str], list[Manifest]], scenario: str
) -> None:
    values = _merge(DEFAULTS, SCENARIOS[scenario])
    deployment = _of_kind(render(scenario), "Deployment")["tally-catalog"]
    fields = settings_fields("tally_catalog")
    environment = {}
    for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]:
        assert item["name"].removeprefix("CATALOG_").lower() in fields, f"{item['name']} matches no setting"
        environment[item["name"]] = item.get("value", "value-from-a-secret")
    settings = load_settings("tally_catalog", environment)
    assert (settings["grpc_port"], settings["metrics_port"]) == (50051, 9101)
    assert settings["jwt_algorithms"] == values["jwt"]["algorithms"]
    assert settings["version"] == (
        values["image"]["tag"] or yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    )
    assert settings["pg_host"] == values["postgres"]["host"]


def test_the_payment_gateway_parses_the_environment_the_chart_gives_it(
    render: Callable[[str], list[Manifest]],
) -> None:
    block = DEFAULTS["services"]["paymentGateway"]
    deployment = _of_kind(render("payment-gateway"), "Deployment")["tally-payment-gateway"]
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
    assert set(jobs) == {f"{name}-migrate" for name in _of_kind(manifests, "Deployment")}
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
        ({"services": {"payment-gateway": PAYMENT_GATEWAY}}, "a service key that is not camelCase"),
    ],
)
def test_schema_refuses(chart: Any, override: dict[str, Any], why: str) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(_merge(DEFAULTS, override))
