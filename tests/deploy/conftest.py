"""Shared paths and helpers for the deployment-artefact tests.

Modules that need the deploy toolchain (PyYAML, helm-python-sdk, kubernetes-validate, grpcio)
skip themselves when it is missing; `scripts/validate_deploy.sh` installs it under
`.tools/deploy-venv` and runs these tests there, where a skip counts as a failure. The others
need only the standard library.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "tally"
ALERT_RULES = CHART / "files" / "prometheus" / "alerts.yml"
DASHBOARDS = CHART / "files" / "grafana" / "dashboards"
DEPLOY = REPO / "deploy"
PROJECT_PYTHON = REPO / ".venv" / "bin" / "python"

# Runs in the project's virtual environment: prints the settings the service would start with.
_LOAD_SETTINGS = """
import importlib, inspect, json, sys
from tally_kit.settings import ServiceSettings
module = importlib.import_module(sys.argv[1] + ".settings")
(settings_class,) = [
    member for _, member in inspect.getmembers(module, inspect.isclass)
    if issubclass(member, ServiceSettings) and member is not ServiceSettings
]
print(json.dumps(settings_class().model_dump(mode="json")))
"""


def settings_fields(module: str) -> set[str]:
    """Field names of ServiceSettings and of the service's own subclass, read without importing them."""
    sources = [REPO / "libs" / "tally_kit" / "settings.py", *REPO.glob(f"services/*/{module}/settings.py")]
    fields: set[str] = set()
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ClassDef):
                fields.update(
                    item.target.id
                    for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                )
    fields.discard("model_config")
    return fields


def load_settings(module: str, environment: dict[str, str]) -> dict[str, Any]:
    """The service's settings as its own settings class parses `environment` (secrets masked)."""
    result = subprocess.run(
        [str(PROJECT_PYTHON), "-c", _LOAD_SETTINGS, module],
        env={"PATH": os.environ.get("PATH", ""), **environment},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# Runs in the project's virtual environment: what the HTTP gateway routes with its default settings.
_GATEWAY_ROUTING = """
import json
from tally_gateway.app import build_app
from tally_gateway.routes import EDGE_ALIASES
gateway = build_app().state.gateway
print(json.dumps({
    "routed_services": sorted({route.rpc.service for route in gateway.routing.routes}),
    "readiness_services": list(gateway.readiness_services),
    "edge_aliases": {alias.name: alias.path for alias in EDGE_ALIASES},
}))
"""


def gateway_routing() -> dict[str, Any]:
    """The gRPC services the HTTP gateway routes to, those its /readyz asks by default, and
    the paths of its edge aliases by name (e.g. authorizeNet)."""
    result = subprocess.run(
        [str(PROJECT_PYTHON), "-c", _GATEWAY_ROUTING],
        env={"PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
