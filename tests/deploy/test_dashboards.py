"""The Grafana dashboards: well-formed, portable across Grafana instances, scoped to Tally's series."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import DASHBOARDS, REPO

DASHBOARD_FILES = sorted(DASHBOARDS.glob("*.json"))
# Series from outside Tally's own processes, which carry no part_of label.
EXTERNAL_METRICS = re.compile(r"\brabbitmq_\w+")


def _targets(dashboard: dict) -> Iterator[tuple[dict, dict]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


@pytest.fixture(params=DASHBOARD_FILES, ids=lambda path: path.name)
def dashboard(request: pytest.FixtureRequest) -> dict:
    path: Path = request.param
    return json.loads(path.read_text())


def test_there_is_a_dashboard_per_concern() -> None:
    assert [path.name for path in DASHBOARD_FILES] == [
        "tally-database.json",
        "tally-events.json",
        "tally-service-overview.json",
    ]


def test_uids_are_unique_and_stable() -> None:
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARD_FILES]
    assert uids == [path.stem for path in DASHBOARD_FILES]


def test_panels_have_unique_ids_and_fit_the_grid(dashboard: dict) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_every_query_goes_through_the_datasource_variable(dashboard: dict) -> None:
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel, target in _targets(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert target["datasource"] == panel["datasource"], panel["title"]


def test_every_tally_query_is_scoped_to_tally_and_the_selected_services(dashboard: dict) -> None:
    queries = list(_targets(dashboard))
    assert queries
    for panel, target in queries:
        expr = target["expr"]
        if EXTERNAL_METRICS.search(expr):
            continue
        selectors = re.findall(r"\b(?:grpc|http|tally|up)\w*\{([^}]*)\}", expr)
        assert selectors, f"{panel['title']}: {expr}"
        for selector in selectors:
            assert 'part_of="tally"' in selector and 'job=~"$job"' in selector, f"{panel['title']}: {expr}"


def test_http_queries_use_the_metrics_the_gateway_exports() -> None:
    source = (REPO / "services" / "gateway" / "tally_gateway" / "app.py").read_text()
    counters = set(re.findall(r'Counter\(\s*"(http_\w+)"', source))
    histograms = set(re.findall(r'Histogram\(\s*"(http_\w+)"', source))
    assert counters and histograms
    exported = counters | {f"{name}_{suffix}" for name in histograms for suffix in ("bucket", "sum", "count")}
    used = {
        metric
        for path in DASHBOARD_FILES
        for _panel, target in _targets(json.loads(path.read_text()))
        for metric in re.findall(r"\b(http_\w+)\{", target["expr"])
    }
    assert used, "the overview shows the HTTP gateway's requests"
    assert used <= exported
