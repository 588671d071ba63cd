"""VEX end to end (issue 27): an OpenVEX document in a ConfigMap of the operator's namespace,
referenced by a ScanPolicy, applied by the real Trivy in the scan Job and judged by the
gate as it is now: a not_affected statement lifts a refusal, removing it refuses again at
once (no rescan), and a policy that does not reference it, or references a tenant's
ConfigMap, is not helped by it."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from conftest import Kubectl, wait_for
from sandbox.advisories import expected_findings
from scans import OPERATOR_NAMESPACE, Policy, admit, deployment, push_variant, scans

pytestmark = pytest.mark.sandbox


def openvex(ids: list[str], product: str) -> str:
    return json.dumps({
        "@context": "https://openvex.dev/ns/v0.2.0",
        "@id": f"https://scangate.dev/vex/{uuid.uuid4().hex}",
        "author": "platform security", "timestamp": "2026-12-01T00:00:00Z", "version": 1,
        "statements": [{"vulnerability": {"name": vid}, "products": [{"@id": product}],
                        "status": "not_affected",
                        "justification": "vulnerable_code_not_in_execute_path",
                        "impact_statement": "never called"} for vid in ids]})


def put_configmap(kubectl: Kubectl, namespace: str, name: str, document: str) -> None:
    kubectl.apply(json.dumps({"apiVersion": "v1", "kind": "ConfigMap",
                              "metadata": {"name": name, "namespace": namespace},
                              "data": {"openvex.json": document}}), namespace)


def refused_now(kubectl: Kubectl, namespace: str, image: str) -> str | None:
    """What the gate says of a dry run of the image when it refuses it; None if admitted."""
    ok, said = admit(kubectl, deployment("probe", image), namespace, "--dry-run=server")
    return None if ok else said


def test_a_not_affected_statement_admits_and_removing_it_refuses_again_without_a_rescan(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], policy: Policy,
) -> None:
    image, variants = push_variant(sandbox_env, "debian-critical")
    critical = sorted({f["id"] for f in expected_findings(variants["linux/amd64"])
                       if f["severity"] == "CRITICAL"})
    assert len(critical) >= 2
    configmap = f"vex-{uuid.uuid4().hex[:8]}"
    document = f"{configmap}/openvex.json"
    product = "pkg:oci/debian-critical"
    put_configmap(kubectl, OPERATOR_NAMESPACE, configmap, openvex(critical, product))
    try:
        name = policy(action="Enforce", thresholds={"critical": 0}, vex=[{"name": configmap}])
        said = wait_for(lambda: refused_now(kubectl, namespace, image), 30, "the policy")
        assert "has not been scanned yet" in said, said
        ok, said = admit(kubectl, deployment("app", image), namespace)
        assert not ok and "A scan has started" in said, said

        def completed() -> dict[str, Any] | None:
            done = [s for s in scans(kubectl, namespace).values()
                    if s.get("status", {}).get("phase") == "Completed"]
            return done[0] if done else None

        scan = wait_for(completed, 180, "the gate's scan")
        status = scan["status"]
        # Trivy applied the document: the findings are apart, with why and by what.
        assert sorted(f["id"] for f in status["suppressedFindings"]) == critical, status
        assert status["suppressed"]["critical"] == len(critical)
        assert status["summary"]["critical"] == 0
        for f in status["suppressedFindings"]:
            assert (f["status"], f["justification"], f["source"]) == (
                "not_affected", "vulnerable_code_not_in_execute_path", document), f
        ok, said = admit(kubectl, deployment("app", image), namespace)
        assert ok, said
        assert "Warning:" in said and "VEX suppressed" in said and document in said, said

        # The statement of one CVE removed: refused again at once, naming it.
        gone = critical[0]
        put_configmap(kubectl, OPERATOR_NAMESPACE, configmap, openvex(critical[1:], product))
        said = wait_for(lambda: refused_now(kubectl, namespace, image), 30, "the refusal")
        ok, said = admit(kubectl, deployment("app2", image), namespace)
        assert not ok, said
        for expected in (f"ScanPolicy {name}", "critical 1 > 0", gone, "counts again",
                         f"{document} no longer suppresses it", "Suppressed by VEX",
                         critical[1]):
            assert expected in said, (expected, said)
        # Judged again from the stored result: nothing was scanned again.
        again = scans(kubectl, namespace)
        assert len(again) == 1
        assert next(iter(again.values()))["status"]["scannedAt"] == status["scannedAt"]

        # The statement back: admitted again, still without a rescan.
        put_configmap(kubectl, OPERATOR_NAMESPACE, configmap, openvex(critical, product))
        wait_for(lambda: refused_now(kubectl, namespace, image) is None, 30, "the admission")

        # A policy that does not reference the document is not helped by it; one that
        # names a ConfigMap of the tenant's namespace neither (only the operator's is read).
        put_configmap(kubectl, namespace, f"{configmap}-tenant", openvex(critical, product))
        other = policy(action="Enforce", thresholds={"critical": 0},
                       vex=[{"name": f"{configmap}-tenant"}])
        said = wait_for(lambda: refused_now(kubectl, namespace, image), 30, "the other policy")
        assert f"scangate denied this workload: ScanPolicy {other}." in said, said
        assert f"ScanPolicy {other} does not apply {document}" in said, said
        assert (f"{configmap}-tenant/openvex.json not applied: ConfigMap {configmap}-tenant "
                f"not found in namespace {OPERATOR_NAMESPACE}") in said, said
    finally:
        kubectl.run("delete", "configmap", configmap, "-n", OPERATOR_NAMESPACE, check=False)
