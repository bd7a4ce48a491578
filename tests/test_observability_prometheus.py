"""The Grafana dashboards proven on a real Prometheus (Debian's `prometheus`): it scrapes a real router and
two sim engines (found through the router's /prometheus/targets) under PD and data_parallel traffic with
failures, and a second router that is a tenant gateway (keys, a response cache) under traffic with a good
key, a wrong key, a cache hit and a rate-limited request; every panel query of
deploy/grafana/dashboards/*.json must return data. The queries are read from the JSON files, so a panel
added later is checked too; the alert rules are loaded as well."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from microserve.processes import ManagedProcess, free_port
from tests.observed_fleet import Fleet, failing_phase, observed_fleet, tenant_phase, traffic, wait_until

pytestmark = pytest.mark.slow

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
# What Grafana puts in place of its variables when every value is selected.
GRAFANA_VARIABLES = {"__rate_interval": "2m", "__interval": "15s", "__range": "5m"}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL) for every query of every panel."""
    found = []
    for path in DASHBOARDS:
        for panel in panels(json.loads(path.read_text())):
            for target in panel.get("targets", []):
                found.append((path.name, panel["title"], target["expr"]))
    return found


def expand(expr: str, dashboard: dict[str, Any]) -> str:
    """The query as Grafana sends it with every value of each template variable selected."""
    values = dict(GRAFANA_VARIABLES)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            values[var["name"]] = var.get("allValue") or ".*"

    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown variable ${name} in {expr}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)


def test_the_dashboards_are_well_formed() -> None:
    assert {p.name for p in DASHBOARDS} >= {
        "fleet-overview.json",
        "per-engine.json",
        "router.json",
        "tenants.json",
    }
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] not in uids
        uids.add(board["uid"])
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in panels(board):
            for target in panel.get("targets", []):
                assert target["expr"].strip(), f"{path.name}: {panel['title']} has an empty query"
                assert target["datasource"]["uid"] == "${datasource}"
    assert len(queries()) >= 40


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with observed_fleet(tmp_path_factory.mktemp("fleet"), gateway=True) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def prometheus(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    exe = shutil.which("prometheus")
    assert exe, "prometheus is missing: scripts/setup.sh installs Debian's prometheus package"
    tmp = tmp_path_factory.mktemp("prometheus")
    assert fleet.gateway is not None
    routers = [url.removeprefix("http://") for url in (fleet.url, fleet.gateway.url)]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
        "scrape_configs": [
            {"job_name": "microserve-router", "static_configs": [{"targets": routers}]},
            {
                "job_name": "microserve-engines",
                "http_sd_configs": [{"url": f"{fleet.url}/prometheus/targets", "refresh_interval": "1s"}],
            },
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    cmd = [exe, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]  # fmt: skip
    server = ManagedProcess(cmd, f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: _get(f"{server.url}/-/ready") == 200, "prometheus to be ready")
        yield server.url
    finally:
        server.stop()


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    result = body["data"]["result"]
    if body["data"]["resultType"] == "scalar":
        return [{"metric": {}, "value": result}]
    return result


def finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def test_every_panel_query_returns_data(fleet: Fleet, prometheus: str) -> None:
    # Prometheus finds both engines through the router before any traffic.
    wait_until(
        lambda: len(query(prometheus, 'up{job="microserve-engines", kind="microserve"} == 1')) == 2,
        "both engines to be scraped",
    )
    # And both routers, their counters at 0: a counter first scraped after its increase shows none to rate().
    wait_until(
        lambda: len(query(prometheus, 'up{job="microserve-router"} == 1')) == 2, "both routers to be scraped"
    )
    # The gateway's refusals and cache lookups first, so that they are in several scrapes by the end.
    assert tenant_phase(fleet) == [200, 200, 401, 200, 429]
    statuses = traffic(fleet.url, 16) + failing_phase(fleet)
    # The failing worker's 500s reach clients as the router's 502 (bad gateway).
    assert statuses.count(200) >= 24 and statuses.count(502) >= 5, statuses
    # Every request answered is in a scrape once the router's counter reaches them all.
    wait_until(
        lambda: (
            finite(r := query(prometheus, "sum(microserve_router_requests_total)"))
            and float(r[0]["value"][1]) >= len(statuses) + 5
        ),
        "the last requests to be scraped",
    )
    empty = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in panels(board):
            for target in panel.get("targets", []):
                expr = expand(target["expr"], board)
                if not finite(query(prometheus, expr)):
                    empty.append(f"{path.name} / {panel['title']}: {expr}")
    assert empty == [], "panels without data:\n" + "\n".join(empty)


def test_the_alert_rules_evaluate_on_real_series(fleet: Fleet, prometheus: str) -> None:
    """The recording rules see the router's real buckets; the failing worker's alerts become pending."""
    wait_until(lambda: finite(query(prometheus, "microserve:ttft_over_1s:ratio_rate5m")), "the TTFT SLO rule")
    wait_until(
        lambda: query(prometheus, 'ALERTS{alertname="MicroserveHighErrorRatio"}'), "the error-ratio alert"
    )
    circuit = wait_until(
        lambda: query(prometheus, 'ALERTS{alertname="MicroserveCircuitOpen"}'), "the circuit-open alert"
    )
    assert {a["metric"]["worker"] for a in circuit} == {fleet.failing.url}
