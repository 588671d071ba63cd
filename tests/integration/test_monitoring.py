"""The chart's alert rules and Grafana dashboard, rendered by the real helm: every query
names only metrics the operator exports (or Prometheus's own `up`), every alert has a
runbook section in the README, and promtool (built from Prometheus's module by
hack/promtool) accepts the rules and fires them on series that represent each condition."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from test_chart import render

from scangate import metrics
from scangate.core.scanstate import ScanIndex

pytestmark = pytest.mark.sandbox
REPO = Path(__file__).resolve().parents[2]
ON = ["--set", "prometheusRule.enabled=true", "--set", "grafanaDashboard.enabled=true"]
SELECTOR = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
"""A metric name."""
KEYWORDS = {"and", "or", "unless", "bool"}


def exported() -> set[str]:
    """Every series name the operator's metrics module exports, with Prometheus's `up`."""
    from datetime import timedelta

    metrics.watch_index(ScanIndex(timedelta(hours=24)), per_image=True)
    names = set(REGISTRY._names_to_collectors)
    return {n for n in names if n.startswith("scangate_")} | {"up"}


def named(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left of it without strings,
    label matchers, ranges, offsets, grouping clauses, functions and operators."""
    left = re.sub(r'"[^"]*"', '""', expr)
    left = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\boffset\s+\w+", " ", left)
    left = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ",
                  left)
    words = re.finditer(rf"(?<![\w.])({SELECTOR})(\s*\()?", left)
    return {w[1] for w in words if not w[2] and w[1] not in KEYWORDS}


def rendered(env: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    objects = render(env, "scangate-system", *ON)
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    board = next(o for o in objects if o["kind"] == "ConfigMap"
                 and o["metadata"]["name"] == "scangate-dashboard")
    return rule, board


def test_every_alert_names_exported_metrics_and_has_a_runbook(
    sandbox_env: dict[str, str],
) -> None:
    rule, _ = rendered(sandbox_env)
    known = exported()
    readme = (REPO / "README.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", readme, re.M)}
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "ScangateDown", "ScangateAdmissionErrors", "ScangateScansFailing",
        "ScangateScansStuck", "ScangateQueueNotDraining", "ScangateLeaderMissing",
        "ScangateRunningImageRefused", "ScangateVulnerabilityDBStale",
        "ScangateVulnerabilityDBChecksFailing", "ScangateNewlyVulnerable"}
    for alert in alerts:
        names = named(alert["expr"])
        assert names and names <= known, (alert["alert"], names - known)
        assert 'job="scangate-metrics"' in alert["expr"]
        url = alert["annotations"]["runbook_url"]
        assert url.split("#")[1] in anchors, (alert["alert"], url)
    # A name the operator does not export is caught (the check can fail).
    assert named("sum(rate(scangate_no_such_total{a=\"b\"}[5m]))") - known


def test_every_dashboard_panel_queries_exported_metrics(sandbox_env: dict[str, str]) -> None:
    _, board = rendered(sandbox_env)
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(board["data"]["scangate.json"])
    known = exported()
    queries = [(p["title"], t["expr"]) for p in dashboard["panels"]
               for t in p.get("targets", [])]
    assert len(queries) >= 20
    for title, expr in queries:
        names = named(expr.replace("$__rate_interval", "5m"))
        assert names and names <= known, (title, names - known)
    variable = dashboard["templating"]["list"][1]["query"]["query"]
    chosen = re.fullmatch(rf"label_values\(({SELECTOR}), job\)", variable)
    assert chosen is not None and chosen[1] in known


def promtool() -> str:
    return subprocess.run([str(REPO / "hack" / "promtool")], check=True, capture_output=True,
                          text=True, timeout=1800).stdout.strip()


def test_promtool_accepts_the_rules_and_they_fire_on_their_conditions(
    sandbox_env: dict[str, str], tmp_path: Path,
) -> None:
    rule, _ = rendered(sandbox_env)
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    checked = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True,
                             text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    sel = 'job="scangate-metrics",namespace="scangate-system"'
    annotations = {r["alert"]: r["annotations"] for g in rule["spec"]["groups"]
                   for r in g["rules"]}
    cases = {
        "rule_files": [str(rules)], "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                # No replica leads for 10 minutes.
                {"series": f"scangate_leader{{{sel},pod=\"a\"}}", "values": "0x10"},
                # Two images running in team-a refused after 40 minutes, none before.
                {"series": "scangate_running_images{job=\"scangate-metrics\","
                           "namespace=\"team-a\",verdict=\"Refused\"}",
                 "values": "0x40 2x20"},
                # The queue holds 5 for an hour and no scan finishes.
                {"series": f"scangate_scan_queue_depth{{{sel}}}", "values": "5x60"},
                {"series": f"scangate_scans_total{{{sel},result=\"completed\"}}",
                 "values": "3x60"},
                # The DB was updated two days and a second before the test's time 0.
                {"series": f"scangate_vulnerability_db_updated_timestamp_seconds{{{sel}}}",
                 "values": "-172801x120"},
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "ScangateLeaderMissing", "exp_alerts": [
                    {"exp_labels": {"severity": "critical"},
                     "exp_annotations": annotations["ScangateLeaderMissing"]}]},
                {"eval_time": "30m", "alertname": "ScangateRunningImageRefused",
                 "exp_alerts": []},
                {"eval_time": "45m", "alertname": "ScangateRunningImageRefused",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": "team-a"},
                                 "exp_annotations": {
                     **annotations["ScangateRunningImageRefused"],
                     "summary": "A running image in team-a would now be refused.",
                     "description": "2 images running in team-a fail an Enforce ScanPolicy; "
                                    "`scangate status --running -n team-a` names them."}}]},
                {"eval_time": "30m", "alertname": "ScangateVulnerabilityDBStale",
                 "exp_alerts": []},
                {"eval_time": "90m", "alertname": "ScangateVulnerabilityDBStale",
                 "exp_alerts": [{"exp_labels": {"severity": "warning"},
                                 "exp_annotations": annotations["ScangateVulnerabilityDBStale"]}]},
                {"eval_time": "50m", "alertname": "ScangateQueueNotDraining",
                 "exp_alerts": [{"exp_labels": {"severity": "warning"}, "exp_annotations": {
                     **annotations["ScangateQueueNotDraining"],
                     "description": "5 ImageScans or more have waited in phase Queued the "
                                    "whole time and no scan finished."}}]},
            ]}],
    }
    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump(cases))
    ran = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True,
                         text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
