"""The admission decision engine: matching, thresholds, allowlists, unscanned and failed
images, the strictest of several policies, break-glass, and `scangate policy check`."""

from __future__ import annotations

import base64
import json
import zlib
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from scangate.cli import main
from scangate.core.policy import (
    BREAK_GLASS_ANNOTATION,
    MAX_WARNINGS,
    MESSAGE_LIMIT,
    WARNING_LIMIT,
    BreakGlassGrant,
    Effect,
    ImageResult,
    Kind,
    Policy,
    PolicyError,
    applies,
    decide,
    judge,
    parse_policy,
)
from scangate.core.trivy import (
    DEFAULT_FINDINGS_BUDGET,
    INDEX_MAX_BYTES,
    IdCounts,
    decode_index,
    encode_index,
    parse_report,
    summarize,
)

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
DIGEST = "sha256:" + "ab" * 32
IMAGE = "registry.example.com/prod/api:1.0"


def policy(name: str = "gate", **spec: Any) -> Policy:
    return parse_policy({"apiVersion": "scangate.dev/v1alpha1", "kind": "ScanPolicy",
                         "metadata": {"name": name}, "spec": spec})


def vuln(vid: str, severity: str, fixed: str | None = "3.0.1",
         pkg: str = "openssl") -> dict[str, Any]:
    v = {"VulnerabilityID": vid, "PkgName": pkg, "InstalledVersion": "3.0.0",
         "Severity": severity}
    if fixed:
        v["FixedVersion"] = fixed
    return v


def trivy_report(*vulns: dict[str, Any], artifact: str = IMAGE) -> dict[str, Any]:
    return {"SchemaVersion": 2, "ArtifactName": artifact,
            "Results": [{"Target": "img (debian 12.5)", "Class": "os-pkgs",
                         "Vulnerabilities": list(vulns)}]}


def status(*vulns: dict[str, Any], budget: int = DEFAULT_FINDINGS_BUDGET,
           index_budget: int = INDEX_MAX_BYTES, **fields: Any) -> dict[str, Any]:
    """An ImageScan status as the reconciler writes it for a report with these findings."""
    summary = summarize(parse_report(json.dumps(trivy_report(*vulns))), budget, index_budget)
    return {**summary, "phase": "Completed", "digest": DIGEST,
            "scannedAt": (NOW - timedelta(hours=1)).isoformat(), **fields}


def result(*vulns: dict[str, Any], **kw: Any) -> ImageResult:
    return ImageResult.from_status(status(*vulns, **kw))


CRITICALS = [vuln(f"CVE-2024-000{i}", "CRITICAL", fixed=f"3.0.{i}") for i in range(1, 5)]


# -- Thresholds and fixableOnly ----------------------------------------------------------

def test_counts_over_thresholds_fail_and_left_out_severities_are_unlimited() -> None:
    r = result(*CRITICALS[:3], *[vuln(f"CVE-2024-10{i:02d}", "MEDIUM") for i in range(50)],
               vuln("CVE-2024-2001", "HIGH"), vuln("CVE-2024-2002", "HIGH"))
    verdict = judge(policy(thresholds={"critical": 0, "high": 2}), r, IMAGE, NOW)
    assert verdict.kind is Kind.VULNERABLE and verdict.effect is Effect.ENFORCE
    assert verdict.counts == ("critical 3 > 0",)  # high 2 is at, not over, its limit
    assert judge(policy(thresholds={"critical": 3, "high": 2}), r, IMAGE, NOW).failed is False
    assert judge(policy(), r, IMAGE, NOW).kind is Kind.PASSED  # no thresholds: unlimited


def test_fixable_only_counts_findings_with_a_fix() -> None:
    r = result(vuln("CVE-2024-0001", "CRITICAL", fixed=None),
               vuln("CVE-2024-0002", "CRITICAL", fixed=None), vuln("CVE-2024-0003", "HIGH"))
    strict = policy(thresholds={"critical": 0, "high": 0})
    assert judge(strict, r, IMAGE, NOW).counts == ("critical 2 > 0", "high 1 > 0")
    fixable = judge(policy(thresholds={"critical": 0, "high": 0}, fixableOnly=True), r, IMAGE,
                    NOW)
    assert fixable.counts == ("high 1 > 0",)
    assert "with a fix only" in fixable.message
    assert "CVE-2024-0001" not in fixable.message  # an unfixable finding is not "worst"


def test_denial_message_says_what_failed_and_what_to_do() -> None:
    r = result(*CRITICALS, vuln("CVE-2024-9999", "LOW"))
    verdict = judge(policy("prod", thresholds={"critical": 0}, breakGlass={"enabled": True}),
                    r, IMAGE, NOW)
    message = verdict.message
    assert f"{IMAGE}@{DIGEST}" in message and "ScanPolicy prod (Enforce)" in message
    assert "critical 4 > 0" in message
    # The three worst findings with their fixed versions, not a fourth.
    assert "CVE-2024-0001 (CRITICAL) in openssl 3.0.0, fixed in 3.0.1" in message
    assert "CVE-2024-0003" in message and "CVE-2024-0004" not in message
    assert "CVE-2024-9999" not in message  # LOW broke no threshold
    for advice in ("upgrade the packages to the fixed versions", "allowlist the IDs",
                   f"{BREAK_GLASS_ANNOTATION}=<reason>"):
        assert advice in message
    assert BREAK_GLASS_ANNOTATION not in judge(policy(thresholds={"critical": 0}), r, IMAGE,
                                               NOW).message
    assert verdict.summary == f"ScanPolicy prod: {IMAGE}: critical 4 > 0"


# -- Allowlist ---------------------------------------------------------------------------

@pytest.mark.parametrize(("now", "applies_"), [
    (datetime(2026, 3, 10, 23, 59, 59, tzinfo=UTC), True),   # the last day it applies
    (datetime(2026, 3, 11, 0, 0, tzinfo=UTC), False),        # the day after
    # 01:00 at UTC+2 is still the 10th in UTC: the expiry is a UTC date.
    (datetime(2026, 3, 11, 1, 0, tzinfo=timezone(timedelta(hours=2))), True),
    (datetime(2026, 3, 11, 0, 30), False),                   # naive: taken as UTC
])
def test_allowlist_expires_after_its_last_day_in_utc(now: datetime, applies_: bool) -> None:
    p = policy(thresholds={"critical": 0},
               allowlist=[{"id": "CVE-2024-0001", "expires": "2026-03-10"}])
    r = result(CRITICALS[0], scannedAt=now.isoformat())
    assert judge(p, r, IMAGE, now).failed is not applies_


def test_allowlist_entry_applies_only_to_its_images() -> None:
    p = policy(thresholds={"critical": 0},
               allowlist=[{"id": "CVE-2024-0001", "images": ["registry.example.com/team-a/*"]}])
    r = result(CRITICALS[0])
    assert judge(p, r, "registry.example.com/team-a/web/api:2", NOW).failed is False
    assert judge(p, r, IMAGE, NOW).counts == ("critical 1 > 0",)


def test_allowlist_subtracts_exactly_its_id_even_when_findings_are_truncated() -> None:
    # 300 findings of one CVE in many packages, one ID at two severities, and noise: the
    # status keeps a few findings only, yet the subtraction is exact.
    many = [vuln("CVE-2024-0001", "CRITICAL", pkg=f"pkg{i}") for i in range(300)]
    two = [vuln("CVE-2024-0002", "HIGH"), vuln("CVE-2024-0002", "MEDIUM", pkg="zlib")]
    noise = [vuln(f"CVE-2023-{i:04d}", "LOW") for i in range(500)]
    r = result(*many, *two, *noise, budget=2048)
    assert r.index_truncated is False
    assert status(*many, *two, *noise, budget=2048)["findingsTruncated"] is True
    p = policy(thresholds={"critical": 0, "high": 0, "medium": 0, "low": 500},
               allowlist=[{"id": "CVE-2024-0001"}, {"id": "cve-2024-0002"}])  # any case
    assert judge(p, r, IMAGE, NOW).failed is False
    # One more finding of another ID is counted: nothing beyond the ID is hidden.
    r2 = result(*many, *two, *noise, vuln("CVE-2024-0777", "CRITICAL"), budget=2048)
    assert judge(p, r2, IMAGE, NOW).counts == ("critical 1 > 0",)
    # Only the allowlisted severity's share of an ID with two severities is in a count.
    only_high = policy(thresholds={"high": 0, "medium": 0}, allowlist=[{"id": "CVE-2024-0002"}])
    assert judge(only_high, result(*two, vuln("CVE-2024-0003", "MEDIUM")), IMAGE, NOW).counts \
        == ("medium 1 > 0",)


def test_allowlist_with_fixable_only_subtracts_the_fixable_findings() -> None:
    r = result(vuln("CVE-2024-0001", "HIGH"), vuln("CVE-2024-0001", "HIGH", fixed=None,
                                                     pkg="b"), vuln("CVE-2024-0005", "HIGH"))
    p = policy(thresholds={"high": 0}, fixableOnly=True, allowlist=[{"id": "CVE-2024-0001"}])
    verdict = judge(p, r, IMAGE, NOW)
    assert verdict.counts == ("high 1 > 0",)
    assert "CVE-2024-0005" in verdict.message and "CVE-2024-0001" not in verdict.message


def test_allowlist_fails_closed_when_the_index_is_truncated() -> None:
    # A budget that holds only the most severe IDs: the CRITICAL one is exact, the LOW
    # ones may be missing and then are not subtracted.
    lows = [vuln(f"CVE-2023-{i:05d}", "LOW") for i in range(3000)]
    r = result(CRITICALS[0], *lows, index_budget=600)
    assert r.index_truncated is True and r.index is not None
    assert "CVE-2024-0001" in r.index and "CVE-2023-02999" not in r.index
    p = policy(thresholds={"critical": 0, "low": 2999},
               allowlist=[{"id": "CVE-2024-0001"}, {"id": "CVE-2023-02999"}])
    verdict = judge(p, r, IMAGE, NOW)
    assert verdict.counts == ("low 3000 > 2999",)  # CRITICAL subtracted, the LOW one not
    assert "not applied" in verdict.message and "CVE-2023-02999" in verdict.message
    assert "truncated" in verdict.message


@pytest.mark.parametrize("index", [None, "garbage!", base64.b64encode(b"x").decode()])
def test_allowlist_fails_closed_without_a_readable_index(index: str | None) -> None:
    raw = status(CRITICALS[0])
    raw.pop("vulnerabilityIndex")
    if index is not None:
        raw["vulnerabilityIndex"] = index
    r = ImageResult.from_status(raw)
    p = policy(thresholds={"critical": 0}, allowlist=[{"id": "CVE-2024-0001"}])
    verdict = judge(p, r, IMAGE, NOW)
    assert verdict.counts == ("critical 1 > 0",)
    assert "Allowlist entries not applied to this image: CVE-2024-0001" in verdict.message
    assert "no exact per-ID counts" in verdict.message


def test_allowlisted_id_absent_from_a_complete_index_is_no_concern() -> None:
    p = policy(thresholds={"critical": 0}, allowlist=[{"id": "CVE-1999-0001"}])
    verdict = judge(p, result(CRITICALS[0]), IMAGE, NOW)
    assert verdict.counts == ("critical 1 > 0",) and "not applied" not in verdict.message


# -- The per-ID index ----------------------------------------------------------------------

def test_index_round_trips_with_counts_per_id_and_severity() -> None:
    summary = summarize(parse_report(json.dumps(trivy_report(
        vuln("CVE-2024-0002", "HIGH"), vuln("cve-2024-0002", "MEDIUM", fixed=None),
        vuln("CVE-2024-0002", "HIGH", pkg="b"), vuln("bad id\twith tab", "LOW")))))
    assert summary["vulnerabilityIndexTruncated"] is False
    assert decode_index(summary["vulnerabilityIndex"]) == {
        "CVE-2024-0002": {"HIGH": IdCounts(2, 2), "MEDIUM": IdCounts(1, 0)}}
    # No findings still gives an index, unlike an old result without one.
    assert decode_index(encode_index({})[0]) == {}


def test_index_beyond_its_budget_keeps_the_most_severe_ids_whole() -> None:
    index = {f"CVE-2024-{i:05d}": {"LOW": IdCounts(1, 1), "HIGH": IdCounts(2, 0)}
             for i in range(2000)}
    index["CVE-2000-00001"] = {"CRITICAL": IdCounts(7, 7)}
    text, truncated = encode_index(index, 2000)
    assert truncated and len(text) <= 2000
    kept = decode_index(text)
    assert kept is not None and 0 < len(kept) < len(index)
    assert kept["CVE-2000-00001"] == {"CRITICAL": IdCounts(7, 7)}
    assert all(v == index[k] for k, v in kept.items())  # never half an ID


def _packed(text: str) -> str:
    return base64.b64encode(zlib.compress(text.encode())).decode()


@pytest.mark.parametrize("garbage", [
    None, 42, "", "not base64!", base64.b64encode(b"not zlib").decode(),
    _packed("wrong-header\nCVE-1\tC\t1\t1"),
    _packed("scangate-index/1\nCVE-1\tX\t1\t1"),        # unknown severity letter
    _packed("scangate-index/1\nCVE-1\tC\t1"),            # a field short
    _packed("scangate-index/1\nCVE-1\tC\t1\t2"),         # more fixable than found
    _packed("scangate-index/1\nCVE-1\tC\t-1\t0"),
    _packed("scangate-index/1\nCVE-1\tC\t1\t1\nCVE-1\tC\t1\t1"),  # twice
    _packed("scangate-index/1\n\tC\t1\t1"),
    _packed("scangate-index/1\n" + "x" * (40 * 1024 * 1024)),  # inflates past the limit
    _packed("scangate-index/1") + "AAAA",
])
def test_decode_index_refuses_garbage(garbage: object) -> None:
    assert decode_index(garbage) is None


# -- Matching ------------------------------------------------------------------------------

@pytest.mark.parametrize(("match", "namespace", "labels", "image", "expected"), [
    ({}, "any", {}, IMAGE, True),
    ({"namespaces": ["prod", "team-*"]}, "team-a", {}, IMAGE, True),
    ({"namespaces": ["prod"]}, "dev", {}, IMAGE, False),
    ({"excludeNamespaces": ["prod"]}, "prod", {}, IMAGE, False),
    ({"namespaces": ["prod"], "excludeNamespaces": ["prod"]}, "prod", {}, IMAGE, False),
    ({"namespaceSelector": {"matchLabels": {"env": "prod"}}}, "a", {"env": "prod"}, IMAGE,
     True),
    ({"namespaceSelector": {"matchLabels": {"env": "prod"}}}, "a", {"env": "dev"}, IMAGE,
     False),
    ({"namespaceSelector": {"matchExpressions": [
        {"key": "env", "operator": "In", "values": ["prod", "stage"]}]}}, "a",
     {"env": "stage"}, IMAGE, True),
    ({"namespaceSelector": {"matchExpressions": [
        {"key": "env", "operator": "In", "values": ["prod"]}]}}, "a", {}, IMAGE, False),
    ({"namespaceSelector": {"matchExpressions": [
        {"key": "env", "operator": "NotIn", "values": ["dev"]}]}}, "a", {}, IMAGE, True),
    ({"namespaceSelector": {"matchExpressions": [
        {"key": "env", "operator": "NotIn", "values": ["dev"]}]}}, "a", {"env": "dev"}, IMAGE,
     False),
    ({"namespaceSelector": {"matchExpressions": [{"key": "pci", "operator": "Exists"}]}},
     "a", {"pci": ""}, IMAGE, True),
    ({"namespaceSelector": {"matchExpressions": [{"key": "pci", "operator": "Exists"}]}},
     "a", {}, IMAGE, False),
    ({"namespaceSelector": {"matchExpressions": [
        {"key": "pci", "operator": "DoesNotExist"}]}}, "a", {"pci": "1"}, IMAGE, False),
    ({"namespaceSelector": {"matchLabels": {"env": "prod"}, "matchExpressions": [
        {"key": "tier", "operator": "Exists"}]}}, "a", {"env": "prod"}, IMAGE, False),
    # `*` crosses `/`, as Kyverno users expect.
    ({"images": ["registry.example.com/*"]}, "a", {}, "registry.example.com/prod/x/y:1",
     True),
    ({"images": ["registry.example.com/prod/*"]}, "a", {}, "docker.io/library/nginx:1",
     False),
    ({"excludeImages": ["registry.example.com/prod/*"]}, "a", {}, IMAGE, False),
    ({"images": ["*"], "excludeImages": ["*:debug-?"]}, "a", {}, "r.io/x:debug-1", False),
    # A reference pinned to its digest still matches a pattern written for the tag.
    ({"images": [IMAGE]}, "a", {}, f"{IMAGE}@{DIGEST}", True),
    ({"images": ["Registry.example.com/*"]}, "a", {}, IMAGE, False),  # case-sensitive
])
def test_match(match: dict[str, Any], namespace: str, labels: dict[str, str], image: str,
               expected: bool) -> None:
    assert applies(policy(match=match), namespace, labels, image) is expected


# -- Unscanned and failed scans ----------------------------------------------------------

@pytest.mark.parametrize(("action", "unscanned", "effect"), [
    ("Enforce", "Deny", Effect.ENFORCE), ("Enforce", "Warn", Effect.WARN),
    ("Enforce", "Allow", Effect.ALLOW), ("Warn", "Deny", Effect.WARN),
    ("Audit", "Deny", Effect.AUDIT), ("Audit", "Warn", Effect.AUDIT),
])
def test_unscanned_images(action: str, unscanned: str, effect: Effect) -> None:
    p = policy(action=action, unscanned=unscanned)
    verdict = judge(p, None, IMAGE, NOW, scans_namespace="team-a")
    assert (verdict.kind, verdict.effect, verdict.needs_scan) == (Kind.UNSCANNED, effect, True)
    assert "A scan has started" in verdict.message
    assert "`kubectl get imagescans -n team-a -w`" in verdict.message
    assert f"`scangate status {IMAGE}`" in verdict.message


@pytest.mark.parametrize("phase", ["Pending", "Queued", "Scanning"])
def test_a_scan_in_progress_counts_as_unscanned_even_with_an_old_result(phase: str) -> None:
    # A rescan may have moved the tag to another digest: the old counts are not judged.
    r = result(phase=phase)
    verdict = judge(policy(thresholds={"critical": 0}), r, IMAGE, NOW)
    assert verdict.kind is Kind.UNSCANNED and verdict.effect is Effect.ENFORCE
    assert phase in verdict.message


def test_results_older_than_max_scan_age_count_as_unscanned() -> None:
    p = policy(maxScanAge="7d", thresholds={"critical": 0})
    fresh = result(scannedAt=(NOW - timedelta(days=6)).isoformat())
    stale = result(scannedAt=(NOW - timedelta(days=8)).isoformat())
    assert judge(p, fresh, IMAGE, NOW).kind is Kind.PASSED
    verdict = judge(p, stale, IMAGE, NOW)
    assert verdict.kind is Kind.UNSCANNED and verdict.needs_scan
    assert "maxScanAge 7d" in verdict.message
    undated = ImageResult.from_status({k: v for k, v in status().items() if k != "scannedAt"})
    assert judge(p, undated, IMAGE, NOW).kind is Kind.UNSCANNED
    assert judge(policy(), undated, IMAGE, NOW).kind is Kind.PASSED  # no maxScanAge


def test_a_result_of_another_digest_is_not_judged() -> None:
    other = "sha256:" + "cd" * 32
    verdict = judge(policy(), result(), f"{IMAGE}@{other}", NOW)
    assert verdict.kind is Kind.UNSCANNED and verdict.digest == other


def test_failed_scans() -> None:
    failed = ImageResult.from_status({"phase": "Failed", "digest": DIGEST,
                                      "reason": "TrivyFailed", "message": "FATAL no space"})
    verdict = judge(policy(), failed, IMAGE, NOW)
    assert (verdict.kind, verdict.effect, verdict.needs_scan) == (
        Kind.SCAN_FAILED, Effect.ENFORCE, False)
    assert "TrivyFailed: FATAL no space" in verdict.message and DIGEST in verdict.message
    allowed = judge(policy(failedScan="Allow"), failed, IMAGE, NOW)
    assert (allowed.kind, allowed.effect) == (Kind.SCAN_FAILED, Effect.ALLOW)


# -- Several policies, break-glass ---------------------------------------------------------

POLICIES = [
    policy("enforce-critical", thresholds={"critical": 0}),
    policy("warn-high", action="Warn", thresholds={"high": 0}),
    policy("audit-medium", action="Audit", thresholds={"medium": 0}),
    policy("lenient", thresholds={"critical": 10}),
    policy("elsewhere", match={"namespaces": ["other"]}, thresholds={"low": 0}),
]
BAD = result(CRITICALS[0], vuln("CVE-2024-0100", "HIGH"), vuln("CVE-2024-0200", "MEDIUM"),
             vuln("CVE-2024-0300", "LOW"))


def test_strictest_result_wins_and_every_failing_policy_is_named() -> None:
    decision = decide(POLICIES, {IMAGE: BAD}, "team-a", {}, {}, NOW)
    assert (decision.allowed, decision.action) == (False, "Enforce")
    assert [v.policy for v in decision.violations] == [
        "enforce-critical", "warn-high", "audit-medium"]
    assert decision.message.startswith(
        "scangate denied this workload: ScanPolicy enforce-critical; also failing: "
        "warn-high (Warn), audit-medium (Audit).")
    assert "critical 1 > 0" in decision.message
    assert decision.warnings == (f"ScanPolicy warn-high: {IMAGE}: high 1 > 0",)
    assert [v.policy for v in decision.audit] == ["audit-medium"]
    assert decision.to_json() == {
        "allowed": False, "action": "Enforce",
        "violations": [v.to_json() for v in decision.violations],
        "warnings": list(decision.warnings)}
    assert decision.to_json()["violations"][0] | {"message": ""} == {
        "policy": "enforce-critical", "action": "Enforce", "image": IMAGE, "digest": DIGEST,
        "reason": "Vulnerable", "counts": ["critical 1 > 0"], "message": ""}


@pytest.mark.parametrize(("names", "action", "warned"), [
    ({"warn-high", "audit-medium"}, "Warn", True),
    ({"audit-medium"}, "Audit", False),
    ({"lenient"}, "Allow", False),
])
def test_warn_and_audit_admit(names: set[str], action: str, warned: bool) -> None:
    decision = decide([p for p in POLICIES if p.name in names], {IMAGE: BAD}, "team-a", {}, {},
                      NOW)
    assert (decision.allowed, decision.action, decision.message) == (True, action, "")
    assert bool(decision.warnings) is warned
    assert [v.policy for v in decision.audit] == (["audit-medium"] if "audit-medium" in names
                                                  else [])


def test_break_glass_admits_and_is_reported() -> None:
    glass = policy("glass", thresholds={"critical": 0}, breakGlass={"enabled": True})
    annotations = {BREAK_GLASS_ANNOTATION: "  INC-4711 hotfix  "}
    granted = {"glass": BreakGlassGrant(allowed=True)}
    decision = decide([glass], {IMAGE: BAD}, "team-a", {}, annotations, NOW,
                      break_glass=granted)
    assert (decision.allowed, decision.action) == (True, "BreakGlass")
    assert decision.break_glass is not None and decision.break_glass.reason == "INC-4711 hotfix"
    assert [v.policy for v in decision.break_glass.verdicts] == ["glass"]
    assert decision.warnings[0].startswith("break-glass used (INC-4711 hotfix): ScanPolicy glass")
    assert decision.to_json()["violations"][0]["breakGlass"] is True
    # Not without a reason, not when the policy does not enable it, and not for another
    # Enforce policy that does not enable it.
    assert not decide([glass], {IMAGE: BAD}, "team-a", {}, {BREAK_GLASS_ANNOTATION: " "},
                      NOW, break_glass=granted).allowed
    assert not decide([policy(thresholds={"critical": 0})], {IMAGE: BAD}, "team-a", {},
                      annotations, NOW, break_glass=granted).allowed
    both = decide([glass, POLICIES[0]], {IMAGE: BAD}, "team-a", {}, annotations, NOW,
                  break_glass=granted)
    assert not both.allowed and both.break_glass is not None
    assert both.message.startswith("scangate denied this workload: ScanPolicy "
                                   "enforce-critical; also failing: glass (break-glass).")


def test_break_glass_is_honoured_only_as_the_api_server_grants_it() -> None:
    # Anyone who could write a workload could set the annotation and override Enforce:
    # now the gate asks the API server (a SubjectAccessReview) and hands core the answer.
    glass = policy("glass", thresholds={"critical": 0}, breakGlass={"enabled": True})
    annotations = {BREAK_GLASS_ANNOTATION: "INC-4711"}
    unasked = decide([glass], {IMAGE: BAD}, "team-a", {}, annotations, NOW)
    assert (unasked.allowed, unasked.break_glass) == (False, None)
    assert unasked.break_glass_wanted == ("glass",)  # what the gate must ask about
    why = "user alice may not use scanpolicies/breakglass glass in team-a"
    refused = decide([glass], {IMAGE: BAD}, "team-a", {}, annotations, NOW,
                     break_glass={"glass": BreakGlassGrant(allowed=False, why=why)})
    assert (refused.allowed, refused.action, refused.break_glass_wanted) == (
        False, "Enforce", ())
    assert f"break-glass (INC-4711) not honoured for ScanPolicy glass: {why}." in \
        refused.message
    # Nothing to ask when the annotation is absent, the image passes, or break-glass would
    # not change the outcome (another Enforce policy without it refuses anyway).
    assert decide([glass], {IMAGE: BAD}, "team-a", {}, {}, NOW).break_glass_wanted == ()
    assert decide([glass], {IMAGE: result()}, "team-a", {}, annotations,
                  NOW).break_glass_wanted == ()
    both = decide([glass, POLICIES[0]], {IMAGE: BAD}, "team-a", {}, annotations, NOW)
    assert (both.allowed, both.break_glass_wanted, both.break_glass) == (False, (), None)


def test_an_unscanned_image_is_explained_once_for_all_its_policies() -> None:
    decision = decide([policy("a"), policy("b"), policy("c", failedScan="Allow")],
                      {IMAGE: None}, "team-a", {}, {}, NOW)
    assert [v.policy for v in decision.violations] == ["a", "b", "c"]
    assert decision.message.startswith("scangate denied this workload: ScanPolicy a, b, c.")
    assert decision.message.count("has not been scanned yet") == 1
    assert decision.message.endswith("The same holds for ScanPolicy b, c.")


def test_unscanned_images_are_reported_for_scanning() -> None:
    other = "docker.io/library/nginx:1.25"
    decision = decide([policy(unscanned="Allow", match={"images": ["registry.example.com/*"]})],
                      {IMAGE: None, other: None, "registry.example.com/x:1": BAD}, "team-a", {},
                      {}, NOW)
    assert decision.allowed and decision.needs_scan == (IMAGE,)  # nginx: no policy applies
    warned = decide([policy(unscanned="Warn")], {IMAGE: result(phase="Queued")}, "team-a", {},
                    {}, NOW, scans_namespace="scangate")
    assert warned.allowed and warned.needs_scan == (IMAGE,)
    assert warned.warnings == (f"ScanPolicy gate: {IMAGE}: not scanned yet, scan Queued "
                               f"(scangate status {IMAGE})",)
    assert "kubectl get imagescans -n scangate -w" in warned.violations[0].message


def test_messages_and_warnings_stay_bounded() -> None:
    long_id = "CVE-2024-" + "9" * 100
    r = result(*[vuln(f"{long_id}{i}", "CRITICAL", fixed="9" * 200, pkg="p" * 200)
                 for i in range(5)])
    images = {f"registry.example.com/team/{'x' * 200}{i}:1": r for i in range(40)}
    policies = [policy(f"p{i}", action=a, thresholds={"critical": 0})
                for i, a in enumerate(["Enforce", "Warn"] * 3)]
    decision = decide(policies, images, "team-a", {}, {}, NOW)
    assert not decision.allowed and len(decision.message) <= MESSAGE_LIMIT
    assert "more failures" in decision.message
    assert len(decision.warnings) == MAX_WARNINGS
    assert all(len(w) <= WARNING_LIMIT for w in decision.warnings)
    assert len(decision.violations) == 240


def test_parse_policy_refuses_what_kubectl_would() -> None:
    with pytest.raises(PolicyError, match=r"metadata\.name"):
        parse_policy({"spec": {}})
    with pytest.raises(PolicyError, match=r"ScanPolicy x: invalid spec: thresholds\.critical"):
        parse_policy({"metadata": {"name": "x"}, "spec": {"thresholds": {"critical": -1}}})
    assert policy(maxScanAge="1h30m").max_scan_age == timedelta(minutes=90)
    # Stored behind the webhook's back (it matches the CRD's pattern): a PolicyError the
    # gate reports on that policy, not an OverflowError that stopped its every relist.
    with pytest.raises(PolicyError, match=r"ScanPolicy x: spec\.maxScanAge: .*longer than"):
        parse_policy({"metadata": {"name": "x"}, "spec": {"maxScanAge": "1000000000d"}})


# -- scangate policy check ---------------------------------------------------------------

def _write(tmp_path: Path, docs: list[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump_all(docs))
    (tmp_path / "report.json").write_text(json.dumps(report))
    return ["policy", "check", "--policy", str(tmp_path / "policy.yaml"),
            "--report", str(tmp_path / "report.json")]


def _manifest(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "scangate.dev/v1alpha1", "kind": "ScanPolicy",
            "metadata": {"name": name}, "spec": spec}


def test_policy_check_blocks_with_exit_status_1(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    args = _write(tmp_path, [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ignored"}},
        _manifest("prod", thresholds={"critical": 0},
                  match={"images": ["registry.example.com/prod/*"]}),
        _manifest("warn", action="Warn", thresholds={"high": 0}),
    ], trivy_report(CRITICALS[0], vuln("CVE-2024-0100", "HIGH")))
    assert main(args) == 1
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"allowed", "action", "violations", "warnings"}
    assert (out["allowed"], out["action"]) == (False, "Enforce")
    assert [v["policy"] for v in out["violations"]] == ["prod", "warn"]
    assert out["violations"][0]["image"] == IMAGE  # from the report's ArtifactName
    assert out["violations"][0]["counts"] == ["critical 1 > 0"]
    # Another image (--image) is outside prod's match: only the warning remains.
    assert main([*args, "--image", "ghcr.io/org/app:2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["allowed"], out["action"]) == (True, "Warn") and len(out["warnings"]) == 1


def test_policy_check_admits_with_exit_status_0(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    args = _write(tmp_path, [_manifest(
        "prod", thresholds={"critical": 0}, allowlist=[{"id": "CVE-2024-0001"}],
        match={"namespaceSelector": {"matchLabels": {"env": "prod"}}})],
        trivy_report(CRITICALS[0]))
    assert main([*args, "--namespace-label", "env=prod"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "allowed": True, "action": "Allow", "violations": [], "warnings": []}


@pytest.mark.parametrize(("policy_text", "report_text", "error"), [
    (None, "{}", "cannot read policy file"),
    ("a: [unclosed", "{}", "cannot read policy file"),
    ("kind: ScanPolicy\nspec: {allowlist: [{id: X, expires: 2026-02-30}]}", "{}",
     "cannot read policy file"),
    (yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap"}), "{}", "holds no ScanPolicy"),
    (yaml.safe_dump(_manifest("bad", thresholds={"critical": -1})), "{}",
     "invalid spec: thresholds.critical"),
    (yaml.safe_dump({**_manifest("x"), "apiVersion": "v1"}), "{}", "apiVersion"),
    (yaml.safe_dump(_manifest("ok")), "not json", "cannot use report"),
    (yaml.safe_dump(_manifest("ok")), json.dumps({"SchemaVersion": 2}), "ArtifactName"),
])
def test_policy_check_usage_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], policy_text: str | None,
    report_text: str, error: str,
) -> None:
    if policy_text is not None:
        (tmp_path / "policy.yaml").write_text(policy_text)
    (tmp_path / "report.json").write_text(report_text)
    code = main(["policy", "check", "--policy", str(tmp_path / "policy.yaml"),
                 "--report", str(tmp_path / "report.json")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("scangate: ") and error in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err


def test_policy_check_refuses_a_bad_image_reference(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _write(tmp_path, [_manifest("ok")], trivy_report())
    assert main([*args, "--image", "UPPER/Case"]) == 2
    assert "invalid" in capsys.readouterr().err


def test_an_unparseable_reference_is_refused_by_every_enforce_policy_of_the_namespace() -> None:
    # A registry-scoped policy that lets failed scans through still refuses a reference it
    # cannot read (it would otherwise be matched on the error's text, and never apply).
    scoped = policy("scoped", match={"images": ["registry.example.com/*"]},
                    failedScan="Allow", thresholds={"critical": 0})
    other_ns = policy("elsewhere", match={"namespaces": ["other"]})
    warn = policy("warned", action="Warn")
    error = 'container "app": image "Registry.Example.com/A B" is not a valid reference: …'
    images = {error: ImageResult(phase="Failed", reason=Kind.INVALID_REFERENCE,
                                 message=error)}
    decision = decide([scoped, other_ns, warn], images, "prod", {}, {}, NOW)
    assert not decision.allowed and decision.action == "Enforce"
    assert [(v.policy, v.kind) for v in decision.violations] == [
        ("scoped", Kind.INVALID_REFERENCE), ("warned", Kind.INVALID_REFERENCE)]
    assert "is not a valid reference" in decision.message
    assert "cannot judge an image it cannot identify" in decision.message
    assert any("not a valid image reference" in w for w in decision.warnings)
    # Not for Audit or Warn alone: those admit, as they do any failing image.
    assert decide([warn], images, "prod", {}, {}, NOW).allowed


@pytest.mark.parametrize("written", [
    "REGISTRY.example.com/prod/api:1.0", "registry.example.com:443/prod/api:1.0",
    "Registry.Example.Com:443/prod/api:1.0"])
def test_a_registry_scoped_policy_matches_every_spelling_of_its_registry(written: str) -> None:
    from scangate.core.images import parse_image

    scoped = policy("scoped", match={"images": ["registry.example.com/*"]})
    assert applies(scoped, "prod", {}, str(parse_image(written)))
    assert not applies(scoped, "prod", {}, str(parse_image("registry.example.org/prod/api")))


def test_an_image_named_by_its_index_digest_is_judged_by_the_result_of_its_platform() -> None:
    result = ImageResult.from_status({**status(vuln("CVE-1", "CRITICAL")),
                                      "digest": DIGEST, "indexDigest": "sha256:" + "cd" * 32})
    strict = policy(thresholds={"critical": 0})
    by_index = judge(strict, result, f"{IMAGE}@sha256:{'cd' * 32}", NOW)
    assert by_index.kind is Kind.VULNERABLE
    other = judge(strict, result, f"{IMAGE}@sha256:{'ef' * 32}", NOW)
    assert other.kind is Kind.UNSCANNED  # never one digest judged by another's result


# -- staleResults ------------------------------------------------------------------------

OLD_DB, NEW_DB = "2026-03-01T00:00:00Z", datetime(2026, 3, 10, 6, tzinfo=UTC)


def made_with(db: str | None, *vulns: dict[str, Any]) -> ImageResult:
    used = {"scanners": ["vuln"], **({"dbUpdatedAt": db} if db else {})}
    return result(*vulns, scannedWith=used)


@pytest.mark.parametrize(("setting", "action", "kind", "effect"), [
    ("Allow", "Enforce", Kind.PASSED, Effect.ALLOW),
    ("Warn", "Enforce", Kind.STALE_RESULT, Effect.WARN),
    ("Warn", "Audit", Kind.STALE_RESULT, Effect.AUDIT),
    ("Deny", "Enforce", Kind.STALE_RESULT, Effect.ENFORCE),
    ("Deny", "Warn", Kind.STALE_RESULT, Effect.WARN),
])
def test_a_result_of_an_older_db_is_worth_what_stale_results_says(
        setting: str, action: str, kind: Kind, effect: Effect) -> None:
    p = policy(action=action, thresholds={"critical": 0}, staleResults=setting)
    verdict = judge(p, made_with(OLD_DB), IMAGE, NOW, known_db=NEW_DB)
    assert (verdict.kind, verdict.effect) == (kind, effect)
    if kind is Kind.STALE_RESULT:
        assert "2026-03-01 00:00" in verdict.message and "2026-03-10 06:00" in verdict.message
        assert f"staleResults: {setting}" in verdict.message


def test_a_current_result_or_one_that_does_not_name_its_db_is_judged_as_it_is() -> None:
    p = policy(thresholds={"critical": 0}, staleResults="Deny")
    current = made_with("2026-03-10T06:00:00Z")
    assert judge(p, current, IMAGE, NOW, known_db=NEW_DB).kind is Kind.PASSED
    assert judge(p, made_with(None), IMAGE, NOW, known_db=NEW_DB).kind is Kind.PASSED
    assert judge(p, made_with(OLD_DB), IMAGE, NOW, known_db=None).kind is Kind.PASSED
    assert judge(p, made_with("not a time"), IMAGE, NOW, known_db=NEW_DB).kind is Kind.PASSED


def test_findings_that_refuse_are_not_hidden_by_a_stale_warning() -> None:
    p = policy(thresholds={"critical": 0}, staleResults="Warn")
    verdict = judge(p, made_with(OLD_DB, *CRITICALS), IMAGE, NOW, known_db=NEW_DB)
    assert (verdict.kind, verdict.effect) == (Kind.VULNERABLE, Effect.ENFORCE)


def test_decide_refuses_a_stale_result_under_deny() -> None:
    decision = decide([policy(staleResults="Deny")], {IMAGE: made_with(OLD_DB)}, "prod", {},
                      {}, NOW, known_db=NEW_DB)
    assert not decision.allowed and decision.violations[0].kind is Kind.STALE_RESULT
    assert decide([policy(staleResults="Deny")], {IMAGE: made_with(OLD_DB)}, "prod", {}, {},
                  NOW).allowed  # the operator knows no DB: nothing is stale
