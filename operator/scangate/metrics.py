"""Prometheus metrics, all prefixed scangate_."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from scangate.core.scanstate import ScanIndex

SCANS = Counter("scangate_scans_total", "Scans by result: completed, reused, retried, failed.",
                ["result"])
SCAN_FAILURES = Counter("scangate_scan_failures_total", "Failed scan attempts by reason.",
                        ["reason"])
RULES_TOO_LARGE = Counter(
    "scangate_scanrule_too_large_total",
    "ScanRule runs that scanned only part of what the rule matches (over "
    "MAX_TAGS_PER_REPOSITORY or MAX_TAGS_PER_RULE).", ["namespace", "rule"])
SCAN_DURATION = Histogram("scangate_scan_duration_seconds", "Time from Job start to result.",
                          buckets=(5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800))
QUEUE_DEPTH = Gauge("scangate_scan_queue_depth", "ImageScans waiting in phase Queued.")
VULNERABILITY_DB = Gauge(
    "scangate_vulnerability_db_updated_timestamp_seconds",
    "UpdatedAt of the vulnerability DB scans use, as last seen.")
DB_CHECKS = Counter("scangate_vulnerability_db_checks_total",
                    "Looks at the DB scans use (the Trivy server's, or the DB repository's) "
                    "by result: same, new, failed.", ["result"])
DB_RESCANS = Counter("scangate_vulnerability_db_rescans_total",
                     "Results asked to scan again because a newer vulnerability DB came out.")
NEWLY_VULNERABLE = Counter(
    "scangate_newly_vulnerable_total",
    "Running images an Enforce policy admitted and refuses after a rescan with a newer DB.")
RUNNING_JOBS = Gauge("scangate_scan_jobs_running", "Scan Jobs that have not finished.")
REGISTRY_REQUESTS = Counter("scangate_registry_requests_total",
                            "Registry operations by registry and result.", ["registry", "result"])

LEADER = Gauge("scangate_leader",
               "1 on the replica that holds the Lease scangate-leader (dispatches scans, runs "
               "ScanRules, notifies, counts what runs, writes PolicyReports), else 0.")

RUNNING_IMAGES = Gauge(
    "scangate_running_images",
    "Distinct images running in each namespace by what the ScanPolicies would do with them "
    "now: Refused, Unscanned, Warned, Admitted (the leader's inventory; namespaces the gate "
    "leaves out are not counted).", ["namespace", "verdict"])
INVENTORY_SCANS = Counter(
    "scangate_inventory_scans_total",
    "ImageScans the inventory asked for running images no ImageScan spoke for.", ["result"])

POLICY_REPORT_WRITES = Counter(
    "scangate_policy_report_writes_total",
    "PolicyReport writes by the leader, by result: created, updated, deleted, failed "
    "(tried again at the next pass). An unchanged report is not written.", ["result"])

PUSH_EVENTS = Counter("scangate_push_notifications_total",
                      "Push notifications received, by result: accepted, unauthorized, "
                      "malformed, unavailable, failed.", ["result"])

ADMISSION_DECISIONS = Counter(
    "scangate_admission_decisions_total",
    "Admission verdicts by ScanPolicy, action and result (failed, overridden by break-glass, "
    "or passed: no policy failed).", ["policy", "action", "result"])
ADMISSION_SCANS = Counter(
    "scangate_admission_scans_total",
    "ImageScans the admission gate asked for unscanned images, by result: requested, shed "
    "(over the gate's rate, asked again by the next review), uncovered (a review from a "
    "namespace its webhook configuration leaves out: no side effects).", ["result"])
ADMISSION_LATENCY = Histogram(
    "scangate_admission_duration_seconds", "Time to answer an admission review, by answer.",
    ["result"], buckets=(.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))

NOTIFICATIONS = Counter(
    "scangate_notifications_total",
    "Notification attempts by receiver type (dingtalk, webhook) and result: delivered, "
    "failed (retried), abandoned (after the last attempt; sent again at the next start).",
    ["type", "result"])

OBJECT_FAILURES = Counter(
    "scangate_object_failures_total",
    "Failures confined to one object (its condition and an Event say which), by kind "
    "(ScanRule, ScanPolicy, receiver, or the watch that could not read it) and reason.",
    ["kind", "reason"])

_SEVERITIES = ("critical", "high", "medium", "low", "unknown")


class IndexCollector(Collector):
    """Vulnerability gauges read from the in-memory scan state at scrape time, so they
    are right after a restart and lose the series of deleted ImageScans by themselves."""

    def __init__(self, index: ScanIndex, per_image: bool) -> None:
        self.index, self.per_image = index, per_image

    def collect(self) -> Iterator[GaugeMetricFamily]:
        totals = GaugeMetricFamily(
            "scangate_vulnerabilities",
            "Findings of the latest results of the ImageScans in a namespace, by severity.",
            labels=["namespace", "severity"])
        for namespace, counts in sorted(self.index.totals.items()):
            for severity, count in zip(_SEVERITIES, counts, strict=False):
                totals.add_metric([namespace, severity], count)
        yield totals
        if not self.per_image:
            return
        images = GaugeMetricFamily(
            "scangate_image_vulnerabilities",
            "Findings of the latest result of an ImageScan, by severity (opt-in).",
            labels=["namespace", "imagescan", "image", "digest", "severity"])
        for scan in self.index.scans.values():
            if scan.summary is None:
                continue
            for severity, count in zip(_SEVERITIES, scan.summary, strict=False):
                images.add_metric([scan.namespace, scan.name, scan.image, scan.digest or "",
                                   severity], count)
        yield images


_collector: IndexCollector | None = None


def watch_index(index: ScanIndex, per_image: bool) -> None:
    """Export the vulnerability gauges of `index` (replacing any earlier one)."""
    global _collector
    if _collector is not None:
        REGISTRY.unregister(_collector)
    _collector = IndexCollector(index, per_image)
    REGISTRY.register(_collector)
