"""Prometheus metrics, all prefixed scangate_."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SCANS = Counter("scangate_scans_total", "Scans by result: completed, reused, retried, failed.",
                ["result"])
SCAN_FAILURES = Counter("scangate_scan_failures_total", "Failed scan attempts by reason.",
                        ["reason"])
SCAN_DURATION = Histogram("scangate_scan_duration_seconds", "Time from Job start to result.",
                          buckets=(5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800))
QUEUE_DEPTH = Gauge("scangate_scan_queue_depth", "ImageScans waiting in phase Queued.")
RUNNING_JOBS = Gauge("scangate_scan_jobs_running", "Scan Jobs that have not finished.")
VULNERABILITIES = Gauge("scangate_image_vulnerabilities",
                        "Findings of the latest scan of an image, by severity.",
                        ["image", "digest", "severity"])
REGISTRY_REQUESTS = Counter("scangate_registry_requests_total",
                            "Registry operations by registry and result.", ["registry", "result"])
