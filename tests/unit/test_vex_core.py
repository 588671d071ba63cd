"""VEX (issue 27): OpenVEX parsing and matching, suppressed findings in status, the policy's
judgement with the documents as they are now, the scan Job's mounts, and the ConfigMap
projection."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from scangate.core.policy import ImageResult, Kind, Policy, decide, judge, parse_policy
from scangate.core.trivy import parse_report, summarize
from scangate.core.vex import (
    VexError,
    VexState,
    image_matches,
    parse_openvex,
    project_configmap,
    source_of,
)
from scangate.scanning.job import ScanJobSpec, TrivySettings, build_job, trivy_command

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
DIGEST = "sha256:" + "ef" * 32
IMAGE = "registry.example.com/team-a/api:1.0"
DOC = "platform-vex/openvex.json"


def openvex(*ids: str, product: str = "pkg:oci/api", status: str = "not_affected",
            subcomponents: list[str] | None = None) -> str:
    return json.dumps({"@context": "https://openvex.dev/ns/v0.2.0", "@id": "x",
                       "statements": [{"vulnerability": {"name": vid},
                                       "products": [{"@id": product, **(
                                           {"subcomponents": [{"@id": s} for s in
                                                              subcomponents]}
                                           if subcomponents else {})}],
                                       "status": status,
                                       "justification": "vulnerable_code_not_present"}
                                      for vid in ids]})


def vuln(vid: str, severity: str, pkg: str) -> dict[str, Any]:
    return {"VulnerabilityID": vid, "PkgName": pkg, "InstalledVersion": "1.0",
            "FixedVersion": "1.1", "Severity": severity}


def report(suppressed: list[str], source: str = f"/etc/scangate/vex/{DOC}") -> dict[str, Any]:
    """Shaped as Trivy 0.76 writes `--vex … --show-suppressed` (seen on the sandbox)."""
    found = [vuln("CVE-2024-0001", "CRITICAL", "curl"), vuln("CVE-2024-0002", "CRITICAL",
                                                             "zlib1g"),
             vuln("CVE-2024-0003", "HIGH", "libc6")]
    return {"SchemaVersion": 2, "ArtifactName": IMAGE, "Results": [{
        "Target": "img (debian 12)", "Class": "os-pkgs", "Type": "debian",
        "Vulnerabilities": [v for v in found if v["VulnerabilityID"] not in suppressed],
        "ExperimentalModifiedFindings": [
            {"Type": "vulnerability", "Status": "not_affected",
             "Statement": "vulnerable_code_not_in_execute_path", "Source": source,
             "Finding": v} for v in found if v["VulnerabilityID"] in suppressed]}]}


def result(suppressed: list[str], budget: int = 64 * 1024, **status: Any) -> ImageResult:
    summary = summarize(parse_report(json.dumps(report(suppressed))), budget_bytes=budget)
    return ImageResult.from_status({**summary, "phase": "Completed", "digest": DIGEST,
                                    "scannedAt": NOW.isoformat(), **status})


def policy(name: str = "gate", **spec: Any) -> Policy:
    return parse_policy({"metadata": {"name": name},
                         "spec": {"thresholds": {"critical": 0}, **spec}})


def state(*documents: tuple[str, str], cluster_wide: tuple[str, ...] = ()) -> VexState:
    return VexState({name: parse_openvex(name, text) for name, text in documents}, {},
                    cluster_wide)


def test_suppressed_findings_are_kept_apart_with_why_and_which_document() -> None:
    out = summarize(parse_report(json.dumps(report(["CVE-2024-0001"]))))
    assert out["summary"]["critical"] == 1 and out["suppressed"]["critical"] == 1
    assert out["suppressedFindings"] == [{
        "id": "CVE-2024-0001", "severity": "CRITICAL", "package": "curl",
        "installedVersion": "1.0", "fixedVersion": "1.1", "status": "not_affected",
        "justification": "vulnerable_code_not_in_execute_path", "source": DOC}]
    none = summarize(parse_report(json.dumps(report([]))))
    assert none["suppressed"] is None and none["suppressedFindings"] is None
    assert source_of("/tmp/app.openvex.json") == "app.openvex.json"


def test_openvex_documents_are_parsed_and_bad_ones_refused_with_a_reason() -> None:
    doc = parse_openvex(DOC, openvex("cve-2024-0001", status="not_affected"))
    assert set(doc.statements) == {"CVE-2024-0001"}
    assert parse_openvex(DOC, openvex("CVE-2024-0001", status="affected")).statements == {}
    for bad, why in (("{", "not JSON"), ('{"bomFormat": "CycloneDX"}', "not OpenVEX"),
                     ('{"@context": "https://openvex.dev/ns", "statements": [{}]}',
                      "no status")):
        with pytest.raises(VexError, match=why):
            parse_openvex(DOC, bad)


def test_products_match_images_as_trivy_matches_them() -> None:
    digests = (DIGEST,)
    assert image_matches("pkg:oci/api", IMAGE, digests)
    assert image_matches(f"pkg:oci/api@{DIGEST.replace(':', '%3A')}", IMAGE, digests)
    assert image_matches("pkg:oci/api?repository_url=registry.example.com/team-a/api", IMAGE,
                         digests)
    assert not image_matches("pkg:oci/api?repository_url=other.example/api", IMAGE, digests)
    assert not image_matches("pkg:oci/api@sha256:00", IMAGE, digests)
    assert not image_matches("pkg:oci/web", IMAGE, digests)
    assert not image_matches("pkg:deb/debian/api", IMAGE, digests)


def test_a_suppression_counts_only_while_the_policys_document_still_says_so() -> None:
    suppressed = result(["CVE-2024-0001", "CVE-2024-0002"])
    referencing = policy(vex=[{"name": "platform-vex"}])
    held = state((DOC, openvex("CVE-2024-0001", "CVE-2024-0002")))
    verdict = judge(referencing, suppressed, IMAGE, NOW, vex=held)
    assert not verdict.failed and "VEX suppressed CVE-2024-0001 in curl" in verdict.vex_note
    assert DOC in verdict.vex_note
    # The statement of one CVE removed: it counts again, without a rescan.
    removed = judge(referencing, suppressed, IMAGE, NOW,
                    vex=state((DOC, openvex("CVE-2024-0002"))))
    assert removed.kind is Kind.VULNERABLE and removed.counts == ("critical 1 > 0",)
    assert f"CVE-2024-0001 in curl counts again: {DOC} no longer suppresses it" in \
        removed.message
    assert "Suppressed by VEX: CVE-2024-0002 in zlib1g" in removed.message
    # A policy that does not reference the document counts them all.
    other = judge(policy("other"), suppressed, IMAGE, NOW, vex=held)
    assert other.counts == ("critical 2 > 0",)
    assert f"ScanPolicy other does not apply {DOC}" in other.message
    # Without the documents (not known yet), nothing suppressed at scan time is trusted.
    assert judge(referencing, suppressed, IMAGE, NOW).counts == ("critical 2 > 0",)
    # The vexConfigMap setting's documents apply under every policy.
    assert not judge(policy("other"), suppressed, IMAGE, NOW, vex=state(
        (DOC, openvex("CVE-2024-0001", "CVE-2024-0002")), cluster_wide=(DOC,))).failed


def test_a_statement_made_since_the_scan_applies_at_once_by_the_per_id_index() -> None:
    scanned = result([])
    referencing = policy(vex=[{"name": "platform-vex"}])
    assert judge(referencing, scanned, IMAGE, NOW).counts == ("critical 2 > 0",)
    added = judge(referencing, scanned, IMAGE, NOW,
                  vex=state((DOC, openvex("CVE-2024-0001", "CVE-2024-0002"))))
    assert not added.failed and "since the scan" in added.vex_note
    # Another image's product: not applied.
    assert judge(referencing, scanned, IMAGE, NOW, vex=state(
        (DOC, openvex("CVE-2024-0001", product="pkg:oci/web")))).counts == ("critical 2 > 0",)
    # Subcomponents: by the stored findings, when complete; else from the next scan.
    curl = openvex("CVE-2024-0001", "CVE-2024-0002", subcomponents=["pkg:deb/debian/curl"])
    partial = judge(referencing, scanned, IMAGE, NOW, vex=state((DOC, curl)))
    assert partial.counts == ("critical 1 > 0",) and "CVE-2024-0002 (CRITICAL) in zlib1g" \
        in partial.message
    truncated = result([], findingsTruncated=True)
    waiting = judge(referencing, truncated, IMAGE, NOW, vex=state((DOC, curl)))
    assert waiting.counts == ("critical 2 > 0",) and "applies from the next scan" in \
        waiting.message


def test_a_missing_or_unusable_document_is_named_and_never_applied() -> None:
    referencing = policy(vex=[{"name": "platform-vex"}, {"name": "gone", "key": "x.json"}])
    verdict = judge(referencing, result(["CVE-2024-0001"]), IMAGE, NOW, vex=VexState(
        {}, {DOC: "VEX document platform-vex/openvex.json is not JSON"}))
    assert verdict.counts == ("critical 2 > 0",)
    assert f"document {DOC} not applied: VEX document {DOC} is not JSON" in verdict.message
    assert "document gone/x.json not applied" in verdict.message
    decision = decide([referencing], {IMAGE: result(["CVE-2024-0001", "CVE-2024-0002"])},
                      "prod", {}, {}, NOW, vex=state((DOC, openvex("CVE-2024-0001",
                                                                   "CVE-2024-0002"))))
    assert decision.allowed and any("VEX suppressed" in w for w in decision.warnings)


def test_the_job_mounts_the_documents_of_its_own_namespace_and_passes_each_to_trivy() -> None:
    spec = ScanJobSpec(scan_name="api", scan_namespace="team-a", scan_uid="u1",
                       image="r.example/team/api@sha256:aa", queued_at="2026-12-03T12:00:00Z",
                       attempt=1, timeout_seconds=300,
                       vex=(DOC, "platform-vex/extra.json", "team-b-vex/openvex.json"))
    job = build_job(spec, TrivySettings(), "scangate-system")
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"] if v["name"].startswith("vex-")}
    assert [v["configMap"] for v in volumes.values()] == [
        {"name": "platform-vex", "optional": True}, {"name": "team-b-vex", "optional": True}]
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/etc/scangate/vex/platform-vex", "/etc/scangate/vex/team-b-vex"} <= mounts
    script = trivy_command(spec, TrivySettings())
    assert "/etc/scangate/vex/platform-vex/extra.json" in script
    assert "--show-suppressed" in script and " $vex " in script
    assert "--vex" not in trivy_command(ScanJobSpec(**{**spec.__dict__, "vex": ()}),
                                        TrivySettings())


def test_a_configmap_is_read_key_by_key_and_a_bad_key_is_its_own_problem() -> None:
    held = project_configmap({"metadata": {"name": "platform-vex", "resourceVersion": "7"},
                              "data": {"openvex.json": openvex("CVE-2024-0001"),
                                       "notes.txt": "hello"}})
    assert set(held.documents) == {DOC} and held.version == 7
    assert "not JSON" in held.errors["platform-vex/notes.txt"]
