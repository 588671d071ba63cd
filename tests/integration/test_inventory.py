"""The inventory of what runs: Deployments that ran before the operator started (no
admission saw them, no ScanRule covers them) are scanned, and `scangate status
--running` judges them under today's ScanPolicies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Kubectl, wait_for
from sandbox.controlplane import Sandbox
from scangate.core.running import VERDICTS
from scans import Policy, metric, push_variant, scans, sleeper

pytestmark = pytest.mark.sandbox
MANIFEST_TYPES = ", ".join(f"application/vnd.{t}" for t in (
    "oci.image.manifest.v1+json", "docker.distribution.manifest.v2+json",
    "oci.image.index.v1+json", "docker.distribution.manifest.list.v2+json"))


def digest_of(env: dict[str, str], image: str) -> str:
    repository, tag = image.split("/", 1)[1].rsplit(":", 1)
    answer = httpx.head(f"http://{env['REGISTRY']}/v2/{repository}/manifests/{tag}",
                        headers={"Accept": MANIFEST_TYPES}, timeout=10)
    answer.raise_for_status()
    return answer.headers["Docker-Content-Digest"]


def status_running(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "scangate"), "status",
                           "--running", *args], capture_output=True, text=True, timeout=300,
                          env={"KUBECONFIG": env["KUBECONFIG"], "PATH": "/usr/bin:/bin"})


def test_what_ran_before_the_operator_is_scanned_and_judged_without_admission_or_rule(
    sandbox: Sandbox, kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
    policy: Policy,
) -> None:
    clean, _ = push_variant(sandbox_env, "clean")
    critical, _ = push_variant(sandbox_env, "debian-critical")
    mixed, _ = push_variant(sandbox_env, "alpine-mixed")
    # The clean one pinned by digest in its spec (a node that reports no digest, as the
    # sandbox's does, leaves the others to be resolved from their tags).
    pinned = f"{clean}@{digest_of(sandbox_env, clean)}"
    refusing = policy(action="Enforce", thresholds={"critical": 0})
    deployments = {"clean": pinned, "critical": critical, "mixed": mixed}
    sandbox.stop_operator()
    try:
        # As before scangate was installed: no gate to call.
        kubectl("delete", "validatingwebhookconfiguration", "scangate-workloads",
                "--ignore-not-found")
        kubectl("delete", "mutatingwebhookconfiguration", "scangate-pin-digests",
                "--ignore-not-found")
        for name, image in deployments.items():
            kubectl.apply(sleeper(name, image), namespace)

        def all_running() -> bool:
            pods: list[dict[str, Any]] = json.loads(
                kubectl("get", "pods", "-n", namespace, "-o", "json"))["items"]
            return len([p for p in pods if p["status"].get("phase") == "Running"]) == 3

        wait_for(all_running, 120, "the three Deployments' pods running")
        assert scans(kubectl, namespace) == {}
    finally:
        sandbox.start_operator()

    def scanned() -> dict[str, dict[str, Any]] | None:
        found = scans(kubectl, namespace)
        done = [s for s in found.values() if (s.get("status") or {}).get("phase")
                in ("Completed", "Failed")]
        return found if len(done) == 3 else None

    found = wait_for(scanned, 300, "three scans of what runs")
    assert {s["spec"]["trigger"] for s in found.values()} == {"Inventory"}
    assert all(s["status"]["phase"] == "Completed" for s in found.values()), found
    by_image = {s["spec"]["image"]: s for s in found.values()}
    assert set(by_image) == set(deployments.values())
    assert by_image[pinned]["status"]["summary"]["total"] == 0
    assert by_image[critical]["status"]["summary"]["critical"] > 0

    answer = status_running(sandbox_env, "-n", namespace, "-o", "json")
    assert answer.returncode == 1, answer.stderr
    workloads = {w["name"]: w for w in json.loads(answer.stdout)["workloads"]}
    assert set(workloads) == set(deployments)
    assert {w["kind"] for w in workloads.values()} == {"Deployment"}
    assert workloads["clean"]["verdict"] == "Admitted"
    assert workloads["critical"]["verdict"] == "Refused"
    order = [VERDICTS.index(w["verdict"]) for w in workloads.values()]
    assert order == sorted(order) and next(iter(workloads)) == "critical"  # worst first
    image = workloads["critical"]["images"][0]
    assert image["image"] == critical and image["phase"] == "Completed"
    assert image["summary"]["critical"] > 0
    assert [(p["name"], p["admits"]) for p in image["policies"]] == [(refusing, False)]
    assert workloads["clean"]["images"][0]["policies"] == [
        {"name": refusing, "action": "Enforce", "admits": True, "result": "Passed",
         "why": None}]
    text = status_running(sandbox_env, "-n", namespace).stdout
    assert text.startswith("REFUSED") and f"{namespace}/Deployment/critical" in text

    # The namespace's aggregates (the leader recounts at most every 15 s).
    wait_for(lambda: metric(sandbox_env, "scangate_running_images",
                            f'namespace="{namespace}",verdict="Refused"') >= 1
             and metric(sandbox_env, "scangate_running_images",
                        f'namespace="{namespace}",verdict="Admitted"') >= 1, 60,
             "the per-namespace metrics")

    # Once nothing refused runs, nothing would be refused today.
    kubectl("delete", "deployment", "critical", "-n", namespace)
    kubectl("delete", "deployment", "mixed", "-n", namespace)
    wait_for(lambda: status_running(sandbox_env, "-n", namespace).returncode == 0, 120,
             "status --running to exit 0")
