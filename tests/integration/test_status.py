"""`scangate status IMAGE` against the cluster: phase, digest, counts, the policies'
verdicts; --wait follows a scan in progress."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import Kubectl
from scans import create_scan, push_variant

pytestmark = pytest.mark.sandbox


def status(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "scangate"), "status", *args],
                          capture_output=True, text=True, timeout=300,
                          env={"KUBECONFIG": env["KUBECONFIG"], "PATH": "/usr/bin:/bin"})


def test_status_follows_a_scan_and_says_which_policies_admit_the_image(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
) -> None:
    image, _ = push_variant(sandbox_env, "debian-critical")
    missing = status(sandbox_env, image, "-n", namespace, "-o", "json")
    assert missing.returncode == 1 and json.loads(missing.stdout)["phase"] == "NotScanned"
    create_scan(kubectl, namespace, "subject", image)
    name = f"st-{uuid.uuid4().hex[:6]}"
    kubectl.apply(json.dumps({"apiVersion": "scangate.dev/v1alpha1", "kind": "ScanPolicy",
                              "metadata": {"name": name},
                              "spec": {"thresholds": {"critical": 0},
                                       "match": {"namespaces": [namespace]}}}))
    try:
        done = status(sandbox_env, image, "-n", namespace, "--wait", "-o", "json")
        assert done.returncode == 0, done.stderr
        found: dict[str, Any] = json.loads(done.stdout)
        scan = json.loads(kubectl("get", "imagescan", "subject", "-n", namespace, "-o",
                                  "json"))["status"]
        assert (found["phase"], found["digest"]) == ("Completed", scan["digest"])
        assert found["summary"] == scan["summary"] and found["summary"]["critical"] > 0
        verdict = next(p for p in found["policies"] if p["name"] == name)
        assert verdict["admits"] is False and "critical" in verdict["why"]
        text = status(sandbox_env, image, "-n", namespace).stdout
        assert f"{name} (Enforce) REFUSES" in text and "CRITICAL" in text
    finally:
        kubectl.run("delete", "scanpolicy", name, check=False)
    bad = status(sandbox_env, "Not An Image!")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
