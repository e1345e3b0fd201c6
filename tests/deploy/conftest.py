"""Shared paths for the deployment-artefact tests.

Modules that need the deploy toolchain (PyYAML, helm-python-sdk, kubernetes-validate, promtool,
docker-compose) skip themselves when it is missing; `scripts/validate_deploy.sh` installs it under
`.tools/deploy-venv` and runs these tests there. The others need only the standard library.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "tally"
ALERT_RULES = CHART / "files" / "prometheus" / "alerts.yml"
DASHBOARDS = CHART / "files" / "grafana" / "dashboards"
DEPLOY = REPO / "deploy"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
