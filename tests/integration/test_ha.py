"""Two replicas: one leads (scans, rules, notifications) by a Lease; both serve the webhooks.
Killing the leader hands the work to the other without a scan started twice."""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any

import pytest

from conftest import Kubectl, wait_for
from sandbox.controlplane import Sandbox
from scans import create_scan, jobs, push_variant, wait_done

pytestmark = pytest.mark.sandbox


def holder(kubectl: Kubectl) -> str:
    lease = json.loads(kubectl("get", "lease", "scangate-leader", "-n", "scangate-system",
                               "-o", "json"))
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


def test_killing_the_leader_hands_over_within_15_s_and_admission_keeps_answering(
    kubectl: Kubectl, namespace: str, sandbox: Sandbox, sandbox_env: dict[str, str],
) -> None:
    first = wait_for(lambda: holder(kubectl), 30, "a leader")
    sandbox.start_operator(name="operator-b")  # its webhooks replace the first one's
    failures: list[str] = []
    stop = threading.Event()

    def probe() -> None:
        pod = json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe"},
                          "spec": {"containers": [{"name": "a", "image": "busybox:1.36"}]}})
        while not stop.is_set():
            out = kubectl.run("create", "-n", namespace, "--dry-run=server", "-f", "-",
                              input=pod, check=False)
            if out.returncode != 0:
                failures.append(out.stderr)
            time.sleep(0.3)

    prober = threading.Thread(target=probe, daemon=True)
    try:
        assert holder(kubectl) == first  # the second replica follows
        images = [push_variant(sandbox_env, "clean")[0] for _ in range(4)]
        names = [f"ha-{i}" for i in range(len(images))]
        for name, image in zip(names, images, strict=True):
            create_scan(kubectl, namespace, name, image)
        prober.start()
        killed = time.monotonic()
        sandbox.stop_operator(signal.SIGKILL)  # the leader, without handing over
        second = wait_for(lambda: (h := holder(kubectl)) != first and h, 30,
                          "the other replica to lead")
        handover = time.monotonic() - killed
        assert second and handover <= 15, handover
        done = wait_done(kubectl, namespace, names)
        assert all(s["status"]["phase"] == "Completed" for s in done.values())
        # No scan started twice: one Job per attempt of each scan.
        per_scan: dict[str, int] = {}
        for job in jobs(kubectl, namespace):
            scan = job["metadata"]["labels"]["scangate.dev/imagescan"]
            per_scan[scan] = per_scan.get(scan, 0) + 1
        attempts: dict[str, Any] = {n: done[n]["status"].get("attempts") or 0 for n in names
                                    if not done[n]["status"].get("reusedFrom")}
        assert all(per_scan.get(n, 0) == a for n, a in attempts.items()), (per_scan, attempts)
    finally:
        stop.set()
        if prober.is_alive():
            prober.join(10)
        sandbox.stop_operator(name="operator-b")
        sandbox.start_operator()
    assert failures == [], failures[:3]
