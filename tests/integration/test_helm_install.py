"""`helm install` of the chart on the sandbox: the operator the chart describes runs on the
sandbox node (its image mapped to this checkout's `scangate`), serves the webhooks through
its Service (the API server routes to the Service's endpoints), scans and refuses; an
upgrade adds a replica; `helm uninstall` leaves nothing but the CRDs.

The sandbox's own operator (run from the checkout with the chart's RBAC applied by
kubectl) makes way for the release, and is back afterwards."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import scans
from conftest import Kubectl, wait_for
from sandbox.controlplane import Sandbox
from scans import Policy, admit, create_scan, deployment, push_variant, wait_done

pytestmark = pytest.mark.sandbox
CHART = Path(__file__).resolve().parents[2] / "charts" / "scangate"
RELEASE, NAMESPACE = "scangate", "scangate-system"
SELECTOR = "app.kubernetes.io/name=scangate,app.kubernetes.io/instance=scangate"
CONFIGURATIONS = [("validatingwebhookconfiguration", "scangate-workloads"),
                  ("validatingwebhookconfiguration", "scangate.dev"),
                  ("mutatingwebhookconfiguration", "scangate.dev")]
STAND_IN = [("clusterrole", "scangate", None), ("clusterrolebinding", "scangate", None),
            ("clusterrole", "scangate-edit", None), ("clusterrole", "scangate-view", None),
            ("clusterrole", "scangate-metrics-reader", None),
            ("role", "scangate", NAMESPACE), ("rolebinding", "scangate", NAMESPACE),
            ("serviceaccount", "scangate", NAMESPACE), ("secret", "scangate-push-token", NAMESPACE),
            ("lease", "scangate-leader", NAMESPACE)]
"""What the sandbox's operator set up in the release's place (hack-applied RBAC)."""


def helm(env: dict[str, str], *args: str) -> str:
    return scans.helm(env, *args, "--namespace", NAMESPACE)


def values(env: dict[str, str]) -> dict[str, Any]:
    """The sandbox's facts: its registry and Trivy server live on loopback, plain HTTP."""
    return {
        "listenOnPodIP": True,  # the node runs every pod in the host's network
        "trivyServer": {"enabled": False, "url": env["TRIVY_SERVER"],
                        "tokenSecret": "scangate-trivy-token"},
        "config": {"logFormat": "text", "insecureRegistries": [env["REGISTRY"]],
                   "allowedNetworks": ["127.0.0.0/8"], "retryBackoff": "1s",
                   "trivyDbRepository": env["TRIVY_DB_REPOSITORY"],
                   "trivyInsecureDbRepository": True},
    }


def ready_pods(kubectl: Kubectl) -> list[dict[str, Any]]:
    pods = json.loads(kubectl("get", "pods", "-n", NAMESPACE, "-l", SELECTOR, "-o", "json"))
    return [p for p in pods["items"] if not p["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in p.get("status", {}).get("conditions", []))]


def exists(kubectl: Kubectl, kind: str, name: str, namespace: str | None = None) -> bool:
    where = ["-n", namespace] if namespace else []
    return kubectl.run("get", kind, name, *where, "-o", "name", check=False).returncode == 0


@pytest.fixture
def release(kubectl: Kubectl, sandbox: Sandbox, sandbox_env: dict[str, str],
            tmp_path: Path) -> Iterator[Path]:
    """The sandbox operator stopped and its stand-ins removed; a values file for the
    release. Afterwards: the release gone (with what it owned) and the operator back."""
    sandbox.stop_operator()
    for kind, name, namespace in STAND_IN:
        kubectl("delete", kind, name, *(["-n", namespace] if namespace else []),
                "--ignore-not-found")
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values(sandbox_env)))
    try:
        yield path
    finally:
        subprocess.run([sandbox_env["HELM"], "uninstall", RELEASE, "-n", NAMESPACE, "--wait"],
                       capture_output=True, env={**os.environ, **sandbox_env}, check=False)
        # Its configurations must be collected before the operator writes its own: the
        # collector would otherwise take those too (they carry the release's owner).
        wait_for(lambda: not any(exists(kubectl, k, n) for k, n in CONFIGURATIONS), 60,
                 "the release's webhook configurations to be collected")
        sandbox.start_operator()


def test_helm_install_serves_scans_and_admission_then_upgrades_and_uninstalls_clean(
    kubectl: Kubectl, sandbox_env: dict[str, str], namespace: str, policy: Policy,
    release: Path,
) -> None:
    helm(sandbox_env, "install", RELEASE, str(CHART), "-f", str(release), "--wait",
         "--timeout", "3m")
    # Every object of the release is there, and the replicas are Ready (the readiness
    # probe asks the gate over HTTPS).
    manifest = [d for d in yaml.safe_load_all(helm(sandbox_env, "get", "manifest", RELEASE))
                if d]
    missing = [(d["kind"], d["metadata"]["name"]) for d in manifest
               if not exists(kubectl, d["kind"], d["metadata"]["name"],
                             d["metadata"].get("namespace"))]
    assert missing == []
    pods = ready_pods(kubectl)
    assert len(pods) == 2 and len({p["status"]["podIP"] for p in pods}) == 2
    # The gate is reached through the release's Service, and goes with the release.
    gate = json.loads(kubectl("get", "validatingwebhookconfiguration", "scangate-workloads",
                              "-o", "json"))
    assert gate["webhooks"][0]["clientConfig"]["service"] == {
        "namespace": NAMESPACE, "name": "scangate-webhook", "path": "/validate", "port": 8443}
    assert [(o["kind"], o["name"]) for o in gate["metadata"]["ownerReferences"]] == [
        ("ClusterRole", "scangate")]

    # kopf's webhook, through the Service: a bad ScanRule is refused, naming the field.
    bad_rule = json.dumps({
        "apiVersion": "scangate.dev/v1alpha1", "kind": "ScanRule",
        "metadata": {"name": "bad", "namespace": namespace},
        "spec": {"registry": {"url": f"http://{sandbox_env['REGISTRY']}"},
                 "scope": {"namespaces": ["x"]}, "tagFilter": "("}})
    refused = kubectl.run("create", "-f", "-", input=bad_rule, check=False)
    assert refused.returncode != 0 and "spec.tagFilter" in refused.stderr, refused.stderr

    # A scan end to end, dispatched by the elected replica.
    bad, _ = push_variant(sandbox_env, "debian-critical")
    create_scan(kubectl, namespace, "bad", bad)
    scanned = wait_done(kubectl, namespace, ["bad"])["bad"]
    assert scanned["status"]["phase"] == "Completed", scanned["status"]
    assert scanned["status"]["summary"]["critical"] > 0
    # And the gate refuses it, through the Service.
    name = policy(action="Enforce", thresholds={"critical": 0})
    ok, said = admit(kubectl, deployment("app", bad), namespace)
    assert not ok and f"ScanPolicy {name}" in said and "critical" in said, said

    helm(sandbox_env, "upgrade", RELEASE, str(CHART), "--reuse-values", "--set", "replicas=3",
         "--wait", "--timeout", "3m")
    assert len(ready_pods(kubectl)) == 3
    ok, said = admit(kubectl, deployment("app", bad), namespace)
    assert not ok and f"ScanPolicy {name}" in said, said

    helm(sandbox_env, "uninstall", RELEASE, "--wait", "--timeout", "2m")
    left = [(d["kind"], d["metadata"]["name"]) for d in manifest
            if exists(kubectl, d["kind"], d["metadata"]["name"],
                      d["metadata"].get("namespace"))]
    assert left == []
    wait_for(lambda: not any(exists(kubectl, k, n) for k, n in CONFIGURATIONS), 60,
             "the webhook configurations written at run time to be collected")
    assert wait_for(lambda: ready_pods(kubectl) == [] and not json.loads(kubectl(
        "get", "pods", "-n", NAMESPACE, "-l", SELECTOR, "-o", "json"))["items"], 60,
        "the operator's pods to be gone")
    crds = kubectl("get", "crd", "-o", "name")
    assert all(f"{plural}.scangate.dev" in crds
               for plural in ("imagescans", "scanrules", "scanpolicies"))
