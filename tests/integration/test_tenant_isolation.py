"""Tenant isolation on the sandbox: a tenant (a user with `edit` in one namespace, acting
through `kubectl --as`) tries to forge a scan result and to reach the Trivy server's
token, as issue 23 found possible when scan Jobs ran in the ImageScan's namespace."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from conftest import Kubectl, Tenant, wait_for
from sandbox.advisories import expected_findings
from scangate.core.framing import encode
from scans import (
    OPERATOR_NAMESPACE,
    SCAN_LABEL,
    Policy,
    admit,
    counts,
    create_scan,
    deployment,
    injected,
    jobs,
    push_variant,
    scans,
    wait_done,
)

pytestmark = pytest.mark.sandbox

CLEAN_REPORT = json.dumps({"SchemaVersion": 2, "ArtifactName": "forged", "Results": []})
PRINT_CLEAN_REPORT = ["printf", "%s", encode("report", CLEAN_REPORT.encode())]
"""A container's command printing a well-framed clean report, as a scan pod's log holds."""


def forged_pod(name: str, job: str, job_uid: str, scan: str) -> str:
    """A pod that looks like a scan Job's pod to anything reading labels or owner names,
    and prints a well-framed clean report."""
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {
            "job-name": job, "batch.kubernetes.io/job-name": job,
            "controller-uid": job_uid, "batch.kubernetes.io/controller-uid": job_uid,
            SCAN_LABEL: scan, "app.kubernetes.io/managed-by": "scangate"},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job,
                                 "uid": job_uid, "controller": True}]},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "trivy", "image": "forged/trivy:latest",
            "command": PRINT_CLEAN_REPORT}]}})


def forged_job(name: str, scan: str) -> str:
    """A Job of the scan Job's name, in the tenant's namespace, printing a clean report."""
    return json.dumps({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": {SCAN_LABEL: scan}},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": {"labels": {SCAN_LABEL: scan,
                                    "app.kubernetes.io/managed-by": "scangate"}},
            "spec": {"restartPolicy": "Never", "containers": [{
                "name": "trivy", "image": "forged/trivy:latest",
                "command": PRINT_CLEAN_REPORT}]}}}})


def test_a_tenant_cannot_forge_a_clean_result_for_a_vulnerable_image(
    kubectl: Kubectl, tenant: Tenant, namespace: str, sandbox_env: dict[str, str],
    policy: Policy,
) -> None:
    image, variants = push_variant(sandbox_env, "debian-critical")
    expected = counts(expected_findings(next(iter(variants.values()))))
    assert expected["critical"] > 0
    # (The tenant's own forged pods run an image no policy covers.)
    policy(action="Enforce", thresholds={"critical": 0},
           match={"images": [f"{sandbox_env['REGISTRY']}/*"]})
    victim = "victim"
    # The real scan pod is held 20 s (a slow pull), while the tenant forges its result.
    with injected(sandbox_env, ("delayStart", [victim], {"seconds": 20})):
        create_scan(tenant.kubectl, namespace, victim, image)

        def scanning() -> dict[str, Any] | None:
            status: dict[str, Any] = scans(tenant.kubectl, namespace)[victim].get("status", {})
            return status if status.get("phase") == "Scanning" else None

        status = wait_for(scanning, 60, "the scan to start")
        job = status["jobName"]
        # The attacks: a Job of that name in the tenant's namespace (where scan Jobs used
        # to run, the name was the operator's Job's, and the tenant could read its uid),
        # and a pod claiming to be that Job's pod, printing a clean report.
        tenant.kubectl.run("apply", "-n", namespace, "-f", "-", check=False,
                           input=forged_job(job, victim))
        job_uid = json.loads(tenant.kubectl("get", "job", job, "-n", namespace, "-o",
                                            "json"))["metadata"]["uid"]
        tenant.kubectl.apply(forged_pod("forged-scan-pod", job, job_uid, victim), namespace)
        # The same where scan Jobs run now: RBAC refuses it.
        for kind, manifest in (("Job", forged_job(job + "-x", victim)),
                               ("Pod", forged_pod("forged", job, job_uid, victim))):
            refused = tenant.kubectl.run("apply", "-n", OPERATOR_NAMESPACE, "-f", "-",
                                         input=manifest, check=False)
            assert refused.returncode != 0 and "forbidden" in refused.stderr, kind
        wait_for(lambda: json.loads(tenant.kubectl(
            "get", "pod", "forged-scan-pod", "-n", namespace, "-o", "json")
        ).get("status", {}).get("phase") == "Succeeded", 60, "the forged pod to finish")
        done = wait_done(tenant.kubectl, namespace, [victim], timeout=180)[victim]
    assert done["status"]["phase"] == "Completed", done["status"]
    assert done["status"]["summary"] == expected
    # The result came from the Job the operator made, in its own namespace.
    made = jobs(kubectl, namespace)
    assert [j["metadata"]["name"] for j in made] == [done["status"]["jobName"]]
    assert made[0]["metadata"]["uid"] == done["status"]["jobUID"]
    assert made[0]["metadata"]["namespace"] == OPERATOR_NAMESPACE
    # And the gate still refuses the image, here and in any other namespace.
    admitted, said = admit(tenant.kubectl, deployment("app", image), namespace)
    assert not admitted and "critical" in said, said


def test_a_tenant_finds_no_trivy_token_and_cannot_read_the_operators(
    kubectl: Kubectl, tenant: Tenant, namespace: str, sandbox_env: dict[str, str],
) -> None:
    image, _ = push_variant(sandbox_env, "clean")
    create_scan(tenant.kubectl, namespace, "mine", image)
    assert wait_done(tenant.kubectl, namespace, ["mine"])["mine"]["status"]["phase"] == \
        "Completed"
    found = json.loads(tenant.kubectl("get", "secrets", "-n", namespace, "-o", "json"))
    assert sandbox_env["TRIVY_TOKEN"] not in json.dumps(found)
    assert "scangate-trivy-token" not in {s["metadata"]["name"] for s in found["items"]}
    for verb in (("get", "secret", "scangate-trivy-token"), ("get", "pods"),
                 ("get", "jobs"), ("logs", "-l", SCAN_LABEL)):
        denied = tenant.kubectl.run(*verb, "-n", OPERATOR_NAMESPACE, check=False)
        assert denied.returncode != 0 and "forbidden" in denied.stderr, verb


def test_a_deleted_imagescan_takes_its_job_and_credentials_with_it(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
) -> None:
    # A Job in the operator's namespace cannot be owned by an ImageScan in another: the
    # operator deletes it, and the garbage collector its pods.
    image, _ = push_variant(sandbox_env, "clean")
    with injected(sandbox_env, ("delayStart", ["doomed"], {"seconds": 30})):
        create_scan(kubectl, namespace, "doomed", image)
        wait_for(lambda: jobs(kubectl, namespace), 60, "the scan's Job")
        kubectl("delete", "imagescan", "doomed", "-n", namespace)
        wait_for(lambda: not jobs(kubectl, namespace), 60, "the Job to be deleted")


def index_digest(env: dict[str, str], image: str) -> str:
    """The digest of the multi-platform index a tag names, as the registry says it."""
    repository, tag = image.split("/", 1)[1].rsplit(":", 1)
    answer = httpx.head(f"http://{env['REGISTRY']}/v2/{repository}/manifests/{tag}",
                        headers={"Accept": "application/vnd.oci.image.index.v1+json"})
    answer.raise_for_status()
    return answer.headers["Docker-Content-Digest"]


def pod(name: str, image: str) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                       "spec": {"containers": [{"name": "app", "image": image}]}})


def test_a_multi_arch_image_named_by_its_index_digest_is_judged_as_its_tag(
    kubectl: Kubectl, tenant: Tenant, namespace: str, sandbox_env: dict[str, str],
    policy: Policy,
) -> None:
    image, _ = push_variant(sandbox_env, "multiarch")  # linux/amd64 has critical findings
    index = index_digest(sandbox_env, image)
    by_index = f"{image.rsplit(':', 1)[0]}@{index}"
    policy(action="Warn", thresholds={"critical": 0}, pinDigests=True)
    wait_for(lambda: kubectl.run("get", "mutatingwebhookconfiguration",
                                 "scangate-pin-digests", check=False).returncode == 0,
             30, "the pinDigests webhook")
    ok, said = admit(tenant.kubectl, pod("first", image), namespace)
    assert ok and "not scanned yet" in said, said
    wait_for(lambda: [s for s in scans(kubectl, namespace).values()
                      if s.get("status", {}).get("phase") == "Completed"], 120, "the scan")
    for name, written in (("by-tag", image), ("by-index", by_index)):
        ok, said = admit(tenant.kubectl, pod(name, written), namespace)
        assert ok and "critical" in said and "not scanned yet" not in said, (written, said)
    # What runs is what was judged: the index, whatever the node's platform.
    pinned = tenant.kubectl("get", "pod", "by-tag", "-n", namespace, "-o",
                            "jsonpath={.spec.containers[0].image}")
    assert pinned == f"{image}@{index}"


def test_tenants_write_scan_rules_and_image_scans_but_never_a_result(
    kubectl: Kubectl, namespace: str,
) -> None:
    # The chart aggregates scangate's kinds into `edit`, as Kubernetes' own are; a result
    # (an ImageScan's status) is the operator's alone: admission trusts it everywhere.
    user = f"editor-{namespace}"
    kubectl("create", "rolebinding", "editor", "-n", namespace, "--clusterrole=edit",
            f"--user={user}")

    def can(*check: str) -> bool:
        answer = kubectl.run("auth", "can-i", *check, "-n", namespace, f"--as={user}",
                             check=False)
        return answer.stdout.strip() == "yes"

    for kind in ("imagescans.scangate.dev", "scanrules.scangate.dev"):
        assert can("create", kind) and can("delete", kind) and can("watch", kind)
    for verb in ("patch", "update"):
        assert not can(verb, "imagescans.scangate.dev", "--subresource=status")
        assert not can(verb, "scanrules.scangate.dev", "--subresource=status")
    assert not can("create", "scanpolicies.scangate.dev")
