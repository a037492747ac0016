"""The monitoring deployment, checked against the code: Prometheus scrapes every process
where it serves its metrics, every alert has passing ``promtool test rules`` cases and
names only metrics that exist, every dashboard panel too (checked against the running
system's scrapes), and Alertmanager routes every severity the alerts use."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from notify_kit import metrics
from scripts.system import SERVICES
from tests.e2e_support import E2E

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
COMPOSE = ROOT / "compose.yaml"

# PromQL words that are not metric names.
_PROMQL = {
    "sum", "min", "max", "avg", "count", "rate", "increase", "delta", "irate",
    "histogram_quantile", "min_over_time", "max_over_time", "by", "without", "on",
    "ignoring", "and", "or", "unless", "bool", "offset", "group_left", "group_right",
}  # fmt: skip
_HISTOGRAM_PARTS = ("_bucket", "_count", "_sum")


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, strings, grouping
    labels, durations and numbers left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"(?<![A-Za-z0-9_:])\d+(\.\d+)?([eE][+-]?\d+)?", "", expr)  # numbers
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {w for w in words if w not in _PROMQL and not re.fullmatch(r"\d+[smhd]?", w)}


def declared() -> set[str]:
    """Every series name notify_kit.metrics exports (histograms with their parts)."""
    names = set()
    for m in metrics.catalogue():
        names.add(m.name)
        if m.kind == "histogram":
            names |= {m.name + part for part in _HISTOGRAM_PARTS}
    return names


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool from PATH, else Debian's ``prometheus`` package installed here (as root)."""
    found = shutil.which("promtool")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
        if subprocess.run(install, env=env, capture_output=True, check=False).returncode:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
            subprocess.run(install, env=env, capture_output=True, check=False)
        found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is needed to test the alert rules: `apt-get install prometheus` "
            "(Debian/Ubuntu) or a release from https://prometheus.io/download/ on PATH"
        )
    return found


def test_promtool_unit_tests_of_every_alert_pass(promtool: str) -> None:
    checked = subprocess.run(
        [promtool, "check", "rules", str(PROMETHEUS / "alerts.yml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        cwd=PROMETHEUS, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = {r["alert"] for g in _load(PROMETHEUS / "alerts.yml")["groups"] for r in g["rules"]}
    cases = _load(PROMETHEUS / "alerts_test.yml")["tests"]
    fired = {
        case["alertname"]
        for test in cases
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert fired == alerts, f"alerts without a firing case: {alerts - fired}"


def test_the_prometheus_config_is_valid(promtool: str, tmp_path: Path) -> None:
    config = _load(PROMETHEUS / "prometheus.yml")
    config["rule_files"] = [str(PROMETHEUS / "alerts.yml")]  # its path in the container
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    checked = subprocess.run(
        [promtool, "check", "config", str(local)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_prometheus_scrapes_every_process_where_it_serves() -> None:
    services = _load(COMPOSE)["services"]
    jobs = {j["job_name"]: j for j in _load(PROMETHEUS / "prometheus.yml")["scrape_configs"]}
    assert set(jobs) == {*SERVICES, "envoy"}
    for service in SERVICES:
        (target,) = jobs[service]["static_configs"][0]["targets"]
        host, _, port = target.rpartition(":")
        listen = services[host]["environment"][f"NOTIFY_{service.upper()}_METRICS_LISTEN"]
        assert listen == f"0.0.0.0:{port}", service
    (envoy,) = jobs["envoy"]["static_configs"][0]["targets"]
    assert envoy == "envoy:9901" and jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    monitoring = services["prometheus"]["volumes"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in monitoring
    assert "./deploy/alertmanager:/etc/alertmanager:ro" in services["alertmanager"]["volumes"]


def test_alerts_name_only_metrics_that_exist() -> None:
    known = declared() | {"up"}
    for group in _load(PROMETHEUS / "alerts.yml")["groups"]:
        for rule in group["rules"]:
            unknown = metric_names(rule["expr"]) - known
            assert not unknown, f"{rule['alert']}: {unknown}"
            assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
            anchor = rule["annotations"]["runbook"].partition("#")[2]
            assert anchor == rule["alert"].lower(), rule["alert"]
    runbook = (ROOT / "docs" / "OPERATIONS.md").read_text()
    for group in _load(PROMETHEUS / "alerts.yml")["groups"]:
        for rule in group["rules"]:
            assert f"### {rule['alert']}" in runbook, f"no runbook entry for {rule['alert']}"


def test_alertmanager_routes_every_severity_to_a_receiver() -> None:
    config = _load(ALERTMANAGER)
    receivers = {r["name"] for r in config["receivers"]}
    routes = config["route"]["routes"]
    assert config["route"]["receiver"] in receivers
    assert {r["receiver"] for r in routes} <= receivers
    routed = {m for r in routes for m in r["matchers"]}
    severities = {
        r["labels"]["severity"]
        for g in _load(PROMETHEUS / "alerts.yml")["groups"]
        for r in g["rules"]
    }
    assert {f'severity="{s}"' for s in severities} <= routed


async def test_every_dashboard_panel_reads_metrics_that_exist(e2e: E2E) -> None:
    """Each query's metrics: declared by notify_kit.metrics, or on a live scrape of the
    system (process metrics, Envoy's own stats), or Prometheus's ``up``."""
    live: set[str] = {"up"}
    for service in SERVICES:
        live |= (await e2e.metrics(service)).names()
    envoy = await e2e.envoy_metrics()
    live |= envoy.names()
    known = declared() | live
    source = _load(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (datasource,) = source["datasources"]
    dashboard = json.loads((GRAFANA / "dashboards" / "notify.json").read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    for want in ("Traffic", "success rate", "latency", "Queue depth", "breakers", "Dead letters",
                 "by provider"):  # fmt: skip
        assert any(want.lower() in t.lower() for t in titles), want
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        for target in panel["targets"]:
            unknown = metric_names(target["expr"]) - known
            assert not unknown, f"{panel['title']}: {unknown}"
