"""The admission gate with kubectl as the client: workloads judged under ScanPolicies
(real API server, the operator with the chart's RBAC, real registry and Trivy).

Each test confines its policies to its own namespace (match.namespaces) and pushes
images of fresh digests, so that no other test's scans or policies count."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conftest import Kubectl, wait_for
from sandbox.controlplane import Sandbox
from scans import Policy, admit, create_scan, deployment, push_variant, scans, wait_done

pytestmark = pytest.mark.sandbox


def scanned(kubectl: Kubectl, namespace: str, env: dict[str, str], name: str
            ) -> tuple[str, dict[str, Any]]:
    """A fresh-digest variant of a named image, scanned: its reference and ImageScan."""
    image, _ = push_variant(env, name)
    scan = f"pre-{uuid.uuid4().hex[:8]}"
    create_scan(kubectl, namespace, scan, image)
    result = wait_done(kubectl, namespace, [scan])[scan]
    assert result["status"]["phase"] == "Completed"
    return image, result


def admission_scans(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]]:
    return [s for s in scans(kubectl, namespace).values()
            if s["spec"].get("trigger") == "Admission"]


def test_unscanned_images_start_a_scan_then_bad_is_refused_and_clean_admitted(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], policy: Policy,
) -> None:
    name = policy(action="Enforce", thresholds={"critical": 0})
    bad, _ = push_variant(sandbox_env, "debian-critical")
    clean, _ = push_variant(sandbox_env, "clean")
    # A server-side dry run is judged but starts no scan.
    ok, said = admit(kubectl, deployment("bad", bad), namespace, "--dry-run=server")
    assert not ok and "has not been scanned yet" in said
    assert admission_scans(kubectl, namespace) == []

    for image in (bad, clean):
        ok, said = admit(kubectl, deployment("app", image), namespace)
        assert not ok and "A scan has started" in said, said
        assert f"kubectl get imagescans -n {namespace} -w" in said
    started = wait_for(lambda: len(admission_scans(kubectl, namespace)) == 2
                       and admission_scans(kubectl, namespace), 30, "the admission scans")
    wait_done(kubectl, namespace, [s["metadata"]["name"] for s in started])
    # Several requests for one digest start one scan.
    assert len(admission_scans(kubectl, namespace)) == 2

    ok, said = admit(kubectl, deployment("app", bad), namespace)
    assert not ok
    digest = next(s["status"]["digest"] for s in admission_scans(kubectl, namespace)
                  if s["spec"]["image"].startswith(bad))
    for expected in (bad, digest, f"ScanPolicy {name}", "critical", "CVE-", "fixed in"):
        assert expected in said, (expected, said)
    ok, said = admit(kubectl, deployment("app", clean), namespace)
    assert ok, said


def test_every_kind_and_container_is_judged(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], policy: Policy,
) -> None:
    bad, _ = scanned(kubectl, namespace, sandbox_env, "debian-critical")
    clean, _ = scanned(kubectl, namespace, sandbox_env, "clean")
    policy(action="Enforce", thresholds={"critical": 0})
    pod_spec = {"containers": [{"name": "app", "image": clean}]}
    cronjob = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly"},
               "spec": {"schedule": "0 0 * * *", "jobTemplate": {"spec": {"template": {
                   "spec": {"restartPolicy": "Never",
                            "containers": [{"name": "app", "image": bad}]}}}}}}
    statefulset = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
                   "spec": {"serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                            "template": {"metadata": {"labels": {"app": "db"}},
                                         "spec": {"containers": [{"name": "db",
                                                                  "image": bad}]}}}}
    init_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "init"},
                "spec": {**pod_spec, "initContainers": [{"name": "setup", "image": bad}]}}
    for manifest in (cronjob, statefulset, init_pod):
        ok, said = admit(kubectl, json.dumps(manifest), namespace)
        assert not ok and bad in said, (manifest["kind"], said)
    ok, said = admit(kubectl, json.dumps({"apiVersion": "v1", "kind": "Pod",
                                          "metadata": {"name": "clean"}, "spec": pod_spec}),
                     namespace)
    assert ok, said
    # An ephemeral container with a bad image (the pods/ephemeralcontainers subresource).
    debug = kubectl.run("debug", "-n", namespace, "clean", f"--image={bad}",
                        "--container=debugger", "--profile=general", check=False)
    assert debug.returncode != 0 and "scangate denied" in debug.stderr, debug.stderr
    debug = kubectl.run("debug", "-n", namespace, "clean", f"--image={clean}",
                        "--container=debugger", "--profile=general", check=False)
    assert debug.returncode == 0, debug.stderr


def test_allowlists_with_expiry_and_updates_judging_only_new_images(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], policy: Policy,
) -> None:
    bad, bad_scan = scanned(kubectl, namespace, sandbox_env, "debian-critical")
    low, _ = scanned(kubectl, namespace, sandbox_env, "all-low")
    critical = sorted({f["id"] for f in bad_scan["status"]["findings"]
                       if f["severity"] == "CRITICAL"})
    assert critical
    today = datetime.now(UTC).date()
    for expires, admitted in ((today + timedelta(days=30), True),
                              (today - timedelta(days=1), False)):
        allow = policy(action="Enforce", thresholds={"critical": 0}, allowlist=[
            {"id": cve, "expires": expires.isoformat(), "reason": "accepted"}
            for cve in critical])
        ok, said = admit(kubectl, deployment(f"allowed-{admitted}".lower(), bad), namespace)
        kubectl("delete", "scanpolicy", allow)
        assert ok == admitted, said
        if not admitted:
            assert allow in said and critical[0] in said, said

    policy(action="Enforce", thresholds={"critical": 0})
    ok, said = admit(kubectl, deployment("app", low), namespace)
    assert ok, said
    # A stricter policy later: scaling or relabelling is not judged again; a new image is.
    policy(action="Enforce", thresholds={"low": 0})
    kubectl("scale", "deployment", "app", "-n", namespace, "--replicas=2")
    relabelled = json.loads(deployment("app", low, labels={"tier": "web"}))
    relabelled["spec"]["replicas"] = 3
    ok, said = admit(kubectl, json.dumps(relabelled), namespace)
    assert ok, said
    ok, said = admit(kubectl, deployment("app", bad, labels={"tier": "web"}), namespace)
    assert not ok and bad in said, said


def test_warn_audit_and_break_glass_admit_with_a_trace(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], policy: Policy,
) -> None:
    bad, _ = scanned(kubectl, namespace, sandbox_env, "debian-critical")
    warn = policy(action="Warn", thresholds={"critical": 0})
    ok, said = admit(kubectl, deployment("warned", bad), namespace)
    assert ok and "Warning:" in said and warn in said, said
    kubectl("delete", "scanpolicy", warn)

    audit = policy(action="Audit", thresholds={"critical": 0})
    ok, said = admit(kubectl, deployment("audited", bad), namespace)
    assert ok, said
    kubectl("delete", "scanpolicy", audit)

    glass = policy(action="Enforce", thresholds={"critical": 0},
                   breakGlass={"enabled": True})
    ok, said = admit(kubectl, deployment("refused", bad), namespace)
    assert not ok and "break-glass" in said
    ok, said = admit(kubectl, deployment(
        "forced", bad, annotations={"scangate.dev/break-glass": "INC-1234 hotfix"}), namespace)
    assert ok, said

    def events() -> dict[str, str] | None:
        items = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json"))["items"]
        found = {e["reason"]: e["message"] for e in items
                 if e["reason"] in ("PolicyAudit", "BreakGlass")}
        return found if len(found) == 2 else None

    found = wait_for(events, 30, "the audit and break-glass Events")
    assert audit in found["PolicyAudit"] and bad in found["PolicyAudit"]
    assert "INC-1234 hotfix" in found["BreakGlass"] and glass in found["BreakGlass"]


def test_with_the_operator_down_policed_namespaces_are_refused_and_kube_system_is_not(
    kubectl: Kubectl, namespace: str, sandbox: Sandbox, sandbox_env: dict[str, str],
    policy: Policy,
) -> None:
    clean, _ = scanned(kubectl, namespace, sandbox_env, "clean")
    policy(action="Enforce", thresholds={"critical": 0})
    app = json.loads(deployment("app", clean))
    app["spec"]["template"]["spec"]["containers"][0]["command"] = ["sleep", "3600"]
    ok, said = admit(kubectl, json.dumps(app), namespace)
    assert ok, said
    pod = {"apiVersion": "v1", "kind": "Pod",
           "spec": {"containers": [{"name": "app", "image": clean}]}}
    sandbox.stop_operator()
    try:
        ok, said = admit(kubectl, json.dumps({**pod, "metadata": {"name": "x"}}), namespace,
                         "--dry-run=server")
        assert not ok and "scangate.dev" in said and "connection refused" in said, said
        name = f"probe-{uuid.uuid4().hex[:6]}"
        ok, said = admit(kubectl, json.dumps({**pod, "metadata": {"name": name}}),
                         "kube-system", "--dry-run=server")
        assert ok, said
        # The admitted Deployment still scales: the controllers' own writes of what they
        # control never wait on the gate (the configuration's matchConditions).
        kubectl("scale", "deployment", "app", "-n", namespace, "--replicas=2")
        wait_for(lambda: kubectl("get", "deployment", "app", "-n", namespace, "-o",
                                 "jsonpath={.status.readyReplicas}") == "2", 60,
                 "a second replica created while the gate is down")
    finally:
        sandbox.start_operator()


def test_pin_digests_rewrites_the_admitted_image_to_the_judged_digest(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], policy: Policy,
) -> None:
    clean, scan = scanned(kubectl, namespace, sandbox_env, "clean")
    policy(action="Enforce", thresholds={"critical": 0})
    ok, said = admit(kubectl, json.dumps({"apiVersion": "v1", "kind": "Pod",
                                          "metadata": {"name": "loose"}, "spec": {
                                              "containers": [{"name": "app", "image": clean}]}}),
                     namespace)
    assert ok, said
    assert kubectl("get", "pod", "loose", "-n", namespace, "-o",
                   "jsonpath={.spec.containers[0].image}") == clean  # off by default
    assert kubectl.run("get", "mutatingwebhookconfiguration", "scangate-pin-digests",
                       check=False).returncode != 0  # no second webhook call until needed
    pin = policy(action="Enforce", thresholds={"critical": 0}, pinDigests=True)
    wait_for(lambda: kubectl.run("get", "mutatingwebhookconfiguration",
                                 "scangate-pin-digests", check=False).returncode == 0,
             30, "the pinDigests webhook")
    ok, said = admit(kubectl, deployment("pinned", clean), namespace)
    assert ok, said
    image = kubectl("get", "deployment", "pinned", "-n", namespace, "-o",
                    "jsonpath={.spec.template.spec.containers[0].image}")
    assert image == f"{clean}@{scan['status']['digest']}"
    kubectl("delete", "scanpolicy", pin)
    wait_for(lambda: kubectl.run("get", "mutatingwebhookconfiguration",
                                 "scangate-pin-digests", check=False).returncode != 0,
             30, "the pinDigests webhook to go")
