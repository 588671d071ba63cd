"""PolicyReports' pure part: one result per workload image and policy, the verdict as a
report's status, the CVE IDs and counts in properties, worst first, bounded in bytes, and
the same content for the same facts (so an unchanged report is never written)."""

from __future__ import annotations

import json
from datetime import timedelta

from test_policy import CRITICALS, IMAGE, NOW, policy, result, vuln

from scangate.core.policy import ImageResult
from scangate.core.policyreports import (
    LEFT_OUT_ANNOTATION,
    MAX_CVES,
    REPORT_BUDGET_BYTES,
    REPORT_KINDS,
    build_report,
    content_of,
    image_results,
    workload_images,
)
from scangate.core.running import RunningImage, RunningPod, Workload

OPEN = REPORT_KINDS["openreports.io/v1alpha1"]
WG = REPORT_KINDS["wgpolicyk8s.io/v1alpha2"]
WEB = Workload("Deployment", "web")
D1 = "sha256:" + "1" * 64


def test_one_entry_per_workload_image_not_per_pod() -> None:
    pods = [RunningPod("team-a", f"web-{i}", "Running", WEB,
                       (RunningImage("docker.io/library/nginx:1", D1),
                        RunningImage("docker.io/library/busybox:1", None)))
            for i in range(3)]
    pods.append(RunningPod("team-a", "db-0", "Running", Workload("StatefulSet", "db"),
                           (RunningImage("docker.io/library/postgres:16", None),)))
    assert workload_images(pods) == {
        WEB: ["docker.io/library/busybox:1", f"docker.io/library/nginx:1@{D1}"],
        Workload("StatefulSet", "db"): ["docker.io/library/postgres:16"]}


def test_each_applicable_policy_judges_each_image_with_its_cves_and_counts() -> None:
    enforce = policy("no-critical", action="Enforce", thresholds={"critical": 0})
    warn = policy("few-high", action="Warn", thresholds={"high": 0})
    elsewhere = policy("prod-only", match={"namespaces": ["prod"]},
                       thresholds={"critical": 0})
    bad = result(*CRITICALS, vuln("CVE-2024-2001", "HIGH"))
    entries = image_results([warn, enforce, elsewhere], "team-a", {}, WEB, IMAGE, bad, NOW)
    assert [(e["policy"], e["result"]) for e in entries] == [("few-high", "warn"),
                                                              ("no-critical", "fail")]
    failed = entries[1]
    assert failed["rule"] == IMAGE and failed["source"] == "scangate"
    assert failed["severity"] == "critical"
    assert failed["resources"] == [{"apiVersion": "apps/v1", "kind": "Deployment",
                                    "name": "web", "namespace": "team-a"}]
    props = failed["properties"]
    assert props["cves"].split(",") == [v["VulnerabilityID"] for v in CRITICALS] + [
        "CVE-2024-2001"]
    assert (props["critical"], props["high"], props["total"]) == ("4", "1", "5")
    assert "medium" not in props  # a severity left out is 0
    assert props["overThresholds"] == "critical 4 > 0" and props["action"] == "Enforce"
    assert all(isinstance(v, str) for v in props.values())  # the schema's map of strings
    assert failed["timestamp"] == {"seconds": int((NOW - timedelta(hours=1)).timestamp()),
                                   "nanos": 0}
    assert "no-critical" in failed["message"] or "critical" in failed["message"]

    clean = image_results([enforce], "team-a", {}, WEB, IMAGE, result(), NOW)
    assert [(e["result"], e.get("severity")) for e in clean] == [("pass", None)]
    assert "cves" not in clean[0]["properties"]


def test_unscanned_is_skipped_and_a_failed_scan_let_through_is_an_error() -> None:
    enforce = policy("no-critical", action="Enforce", thresholds={"critical": 0})
    lenient = policy("lenient", thresholds={"critical": 0}, failedScan="Allow")
    assert [e["result"] for e in image_results([enforce], "a", {}, WEB, IMAGE, None, NOW)] \
        == ["skip"]
    scanning = ImageResult(phase="Scanning")
    assert image_results([enforce], "a", {}, WEB, IMAGE, scanning, NOW)[0]["result"] == "skip"
    failed = ImageResult(phase="Failed", reason="ScanTimeout", message="took too long",
                         scanned_at=NOW)
    assert [e["result"] for e in image_results([enforce, lenient], "a", {}, WEB, IMAGE,
                                               failed, NOW)] == ["error", "fail"]


def test_cve_ids_are_bounded_and_say_so() -> None:
    many = result(*[vuln(f"CVE-2024-{i:04d}", "HIGH") for i in range(40)])
    props = image_results([policy()], "a", {}, WEB, IMAGE, many, NOW)[0]["properties"]
    assert len(props["cves"].split(",")) == MAX_CVES and props["cvesTruncated"] == "true"
    assert props["high"] == "40"


def test_a_report_is_worst_first_counted_and_the_same_for_the_same_facts() -> None:
    enforce = policy("no-critical", action="Enforce", thresholds={"critical": 0})
    entries = image_results([enforce], "a", {}, Workload("Deployment", "ok"), IMAGE,
                            result(), NOW)
    entries += image_results([enforce], "a", {}, Workload("Deployment", "zz-bad"), IMAGE,
                             result(*CRITICALS), NOW)
    report = build_report(OPEN, "a", entries)
    assert report["apiVersion"] == "openreports.io/v1alpha1" and report["kind"] == "Report"
    assert report["metadata"] == {"name": "scangate", "namespace": "a", "labels": {
        "app.kubernetes.io/managed-by": "scangate"}}
    assert report["source"] == "scangate"
    assert [e["result"] for e in report["results"]] == ["fail", "pass"]
    assert report["summary"] == {"fail": 1, "warn": 0, "error": 0, "skip": 0, "pass": 1}
    wg = build_report(WG, "a", list(reversed(entries)))
    assert (wg["apiVersion"], wg["kind"]) == ("wgpolicyk8s.io/v1alpha2", "PolicyReport")
    assert "source" not in wg  # v1alpha2 has none at the report's level
    assert content_of(wg) == content_of(report)  # order in, same content out
    later = image_results([enforce], "a", {}, Workload("Deployment", "ok"), IMAGE, result(),
                          NOW + timedelta(hours=5))
    assert content_of(build_report(OPEN, "a", later + entries[1:])) == content_of(report)
    fixed = image_results([enforce], "a", {}, Workload("Deployment", "zz-bad"), IMAGE,
                          result(), NOW)
    assert content_of(build_report(OPEN, "a", entries[:1] + fixed)) != content_of(report)
    # The server's own fields never make a report look changed.
    served = json.loads(json.dumps(report))
    served["metadata"].update(resourceVersion="42", uid="u", creationTimestamp="x")
    assert content_of(served) == content_of(report)


def test_a_thousand_workloads_make_one_report_well_within_the_object_limit() -> None:
    enforce = policy("no-critical", action="Enforce", thresholds={"critical": 0})
    bad = result(*CRITICALS, *[vuln(f"CVE-2025-{i:04d}", "HIGH") for i in range(30)])
    entries = [e for i in range(1000) for e in image_results(
        [enforce], "big", {}, Workload("Deployment", f"app-{i:04d}"),
        f"registry.example.com/team/app-{i}:1.0", bad if i % 2 else result(), NOW)]
    report = build_report(OPEN, "big", entries)
    size = len(json.dumps(report))
    assert len(report["results"]) == 1000 and size < 1024 * 1024, size
    assert LEFT_OUT_ANNOTATION not in report["metadata"]
    # More than fits (two policies failing each): the worst are kept within the budget
    # and the report says how many it left out; the summary counts them all.
    warn = policy("warn-high", action="Warn", thresholds={"high": 0})
    entries = [e for i in range(1000) for e in image_results(
        [enforce, warn], "big", {}, Workload("Deployment", f"app-{i:04d}"),
        f"registry.example.com/team/app-{i}:1.0", bad, NOW)]
    full = build_report(OPEN, "big", entries)
    assert len(json.dumps(full["results"], separators=(",", ":"))) <= REPORT_BUDGET_BYTES
    assert 1000 < len(full["results"]) < 2000
    small = build_report(OPEN, "big", entries, budget=64 * 1024)
    kept = small["results"]
    assert 0 < len(kept) < 1000 and {e["result"] for e in kept} == {"fail"}
    assert int(small["metadata"]["annotations"][LEFT_OUT_ANNOTATION]) == 2000 - len(kept)
    assert small["summary"] == {"fail": 1000, "warn": 1000, "error": 0, "skip": 0, "pass": 0}
