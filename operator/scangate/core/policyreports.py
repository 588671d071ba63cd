"""PolicyReports: what runs in a namespace, judged against each ScanPolicy, in the shape
Policy Reporter, Kyverno's tools and the Open Reports consumers read.

One report per namespace (named REPORT_NAME), one result per workload image and policy
that applies to it: `fail` where an Enforce policy would refuse it today, `warn` where a
Warn or Audit policy fails it, `skip` while no result speaks for it (unscanned, or a
scan in progress), `error` where its scan failed and the policy lets that through, else
`pass`. The workload is the result's resource; the rule is the image, so that a
workload's images are told apart under one policy. The CVE IDs and the counts are in
`properties` (strings, as the schema has it).

Both API groups share this shape (openreports.io is wgpolicyk8s.io's successor, field
for field; only its kind and its report-wide `source` differ). A report is bounded in
bytes (REPORT_BUDGET_BYTES, well under etcd's 1.5 MiB object limit): results are kept
worst first and the rest are counted in the summary and named in an annotation.

Pure: no I/O and no clock (the result's timestamp is its scan's time, so an unchanged
result is the same report, which is never written again).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from scangate.core.policy import Effect, ImageResult, Kind, Policy, Verdict, applies, judge
from scangate.core.running import RunningPod, Workload
from scangate.core.vex import VexState

Obj = dict[str, Any]
REPORT_NAME = "scangate"
SOURCE = "scangate"
MANAGED_BY = {"app.kubernetes.io/managed-by": "scangate"}
LEFT_OUT_ANNOTATION = "scangate.dev/results-left-out"
REPORT_BUDGET_BYTES = 1024 * 1024
"""Bound of a report's results, as JSON: etcd refuses objects over 1.5 MiB."""
MAX_CVES = 10
"""CVE IDs named in one result (the most severe first): the counts say how many in all."""
MESSAGE_LIMIT = 300
STATUSES = ("fail", "warn", "error", "skip", "pass")
"""A result's status, worst first: the order results are kept in."""
_SEVERITY = {"critical": "critical", "high": "high", "medium": "medium", "low": "low",
             "unknown": "info"}
"""scangate's severities as the reports' enum spells them (it has no `unknown`)."""
_API_VERSIONS = {"Deployment": "apps/v1", "StatefulSet": "apps/v1", "DaemonSet": "apps/v1",
                 "ReplicaSet": "apps/v1", "Job": "batch/v1", "CronJob": "batch/v1",
                 "Pod": "v1", "ReplicationController": "v1"}


@dataclass(frozen=True)
class ReportKind:
    """One of the two report APIs, as chosen by the setting policyReports."""

    group: str
    version: str
    plural: str
    kind: str
    report_source: bool
    """Whether the report itself has a `source` field (openreports.io)."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def crd(self) -> str:
        """The name of its CustomResourceDefinition."""
        return f"{self.plural}.{self.group}"


REPORT_KINDS = {
    "openreports.io/v1alpha1": ReportKind("openreports.io", "v1alpha1", "reports", "Report",
                                          True),
    "wgpolicyk8s.io/v1alpha2": ReportKind("wgpolicyk8s.io", "v1alpha2", "policyreports",
                                          "PolicyReport", False),
}


def workload_images(pods: Iterable[RunningPod]) -> dict[Workload, list[str]]:
    """Each workload of the pods and the image references it runs (pinned to the digest
    the node reports where it does), sorted: one result per workload image, not per pod."""
    held: dict[Workload, set[str]] = {}
    for pod in pods:
        held.setdefault(pod.workload, set()).update(i.reference for i in pod.images)
    return {w: sorted(images) for w, images in sorted(held.items())}


def status_of(verdict: Verdict) -> str:
    """A verdict as a report's result (see the module's docstring)."""
    if verdict.kind is Kind.UNSCANNED:
        return "skip"
    if verdict.effect is Effect.ENFORCE:
        return "fail"
    if verdict.effect > Effect.ALLOW:
        return "warn"
    if verdict.kind is Kind.SCAN_FAILED:
        return "error"
    return "pass"


def _worst_severity(result: ImageResult | None) -> str | None:
    counts = (result.summary if result is not None else None) or {}
    return next((_SEVERITY[s] for s in _SEVERITY if counts.get(s, 0) > 0), None)


def _cves(result: ImageResult) -> list[str]:
    ids = dict.fromkeys(f.id for f in result.findings)  # most severe first, as stored
    return list(ids)[:MAX_CVES]


def _properties(verdict: Verdict, result: ImageResult | None) -> dict[str, str]:
    """The image's digest, what the policy does, the counts (a severity left out is 0)
    and the most severe CVE IDs; the image itself is the result's rule."""
    props = {"action": verdict.effect.label if verdict.failed else "Allow",
             "reason": verdict.kind.value}
    digest = verdict.digest or (result.digest if result is not None else None)
    if digest:
        props["digest"] = digest
    if verdict.counts:
        props["overThresholds"] = "; ".join(verdict.counts)
    if result is not None and result.summary is not None:
        props["total"] = str(sum(result.summary.get(s, 0) for s in _SEVERITY))
        props.update((s, str(result.summary[s])) for s in _SEVERITY if result.summary.get(s))
        if result.fixable is not None:
            props["fixable"] = str(sum(result.fixable.get(s, 0) for s in _SEVERITY))
        cves = _cves(result)
        if cves:
            props["cves"] = ",".join(cves)
        if result.findings_truncated or len(dict.fromkeys(f.id for f in result.findings)) \
                > len(cves):
            props["cvesTruncated"] = "true"
    return props


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _message(verdict: Verdict, status: str) -> str:
    if status == "pass":
        return f"passes ScanPolicy {verdict.policy}"
    return _clip(verdict.summary or verdict.message or verdict.kind.value, MESSAGE_LIMIT)


def resource_of(namespace: str, workload: Workload) -> Obj:
    """The workload as an ObjectReference (no uid: scangate knows workloads by name)."""
    ref: Obj = {"kind": workload.kind, "name": workload.name, "namespace": namespace}
    if workload.kind in _API_VERSIONS:
        ref["apiVersion"] = _API_VERSIONS[workload.kind]
    return ref


def image_results(policies: Sequence[Policy], namespace: str, labels: Mapping[str, str],
                  workload: Workload, image: str, result: ImageResult | None, now: datetime,
                  vex: VexState | None = None) -> list[Obj]:
    """One result for each policy that applies to a workload's image (a normalised
    reference) in `namespace`, judged on the image's stored result (None: none yet)."""
    out = []
    for policy in sorted(policies, key=lambda p: p.name):
        if not applies(policy, namespace, labels, image):
            continue
        verdict = judge(policy, result, image, now, scans_namespace=namespace, vex=vex)
        status = status_of(verdict)
        entry: Obj = {"policy": policy.name, "rule": image, "result": status,
                      "source": SOURCE, "category": "Image vulnerabilities",
                      "scored": True, "message": _message(verdict, status),
                      "resources": [resource_of(namespace, workload)],
                      "properties": _properties(verdict, result)}
        severity = _worst_severity(result) if status != "skip" else None
        if severity is not None:
            entry["severity"] = severity
        scanned = result.scanned_at if result is not None else None
        if scanned is not None:
            entry["timestamp"] = {"seconds": int(scanned.timestamp()), "nanos": 0}
        out.append(entry)
    return out


def _order(entry: Obj) -> tuple[int, str, str, str, str]:
    resource = entry["resources"][0]
    return (STATUSES.index(entry["result"]), resource["kind"], resource["name"],
            entry["rule"], entry["policy"])


def build_report(kind: ReportKind, namespace: str, results: Iterable[Obj],
                 budget: int = REPORT_BUDGET_BYTES) -> Obj:
    """The namespace's report: its results worst first, as many as fit in `budget` bytes
    of JSON; the summary counts them all."""
    ordered = sorted(results, key=_order)
    summary = {s: 0 for s in STATUSES}
    kept, used = [], 0
    for entry in ordered:
        summary[entry["result"]] += 1
        size = len(json.dumps(entry, separators=(",", ":"))) + 1
        if used + size <= budget:
            kept.append(entry)
            used += size
    meta: Obj = {"name": REPORT_NAME, "namespace": namespace, "labels": dict(MANAGED_BY)}
    if len(kept) < len(ordered):
        meta["annotations"] = {LEFT_OUT_ANNOTATION: str(len(ordered) - len(kept))}
    report: Obj = {"apiVersion": kind.api_version, "kind": kind.kind, "metadata": meta,
                   "summary": summary, "results": kept}
    if kind.report_source:
        report["source"] = SOURCE
    return report


def content_of(report: Mapping[str, Any]) -> str:
    """What identifies a report's content (as written or as read back): a digest of its
    results, summary, labels and annotations, so that an unchanged report is not written."""
    meta = report.get("metadata") or {}
    held = {"results": report.get("results") or [], "summary": report.get("summary") or {},
            "labels": meta.get("labels") or {}, "annotations": {
                k: v for k, v in (meta.get("annotations") or {}).items()
                if k == LEFT_OUT_ANNOTATION}}
    return hashlib.sha256(json.dumps(held, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()
