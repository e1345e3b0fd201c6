"""Conventions every alert rule follows.

promtool's own checks (`check rules`, `test rules` on deploy/prometheus/alerts_test.yml) run in
scripts/validate_deploy.sh.
"""

from __future__ import annotations

import re

import pytest

from .conftest import ALERT_RULES, DEPLOY

yaml = pytest.importorskip("yaml", reason="needs the deploy toolchain: run scripts/validate_deploy.sh")

RULES = [rule for group in yaml.safe_load(ALERT_RULES.read_text())["groups"] for rule in group["rules"]]
TESTS = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    for rule in RULES:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]


def test_every_alert_selects_only_tally_series() -> None:
    for rule in RULES:
        selectors = re.findall(r"\b\w+\{([^}]*)\}", rule["expr"])
        assert selectors, rule["alert"]
        assert all('part_of="tally"' in selector for selector in selectors), rule["alert"]


def test_every_alert_is_unit_tested() -> None:
    tested = {case["alertname"] for test in TESTS["tests"] for case in test["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in RULES}
