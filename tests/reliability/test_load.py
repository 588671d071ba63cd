"""Load: a thousand ImageScans at once, and the admission gate at 500 reviews a second.

The thousand scans name a dozen images, so most share a digest: each digest is
scanned by one Job and the other scans reuse its result, while the running Jobs
(followed by a watch of every Job event) never exceed the operator's limit. The gate
gets AdmissionReviews straight at its HTTPS endpoint from vegeta (built as
bench/admission.py builds it), at a constant rate, as the API server would send them.
Each test prints its figures for the README.

Run: SCANGATE_SANDBOX_DIR=DIR .venv/bin/pytest tests/reliability/test_load.py -s
"""

from __future__ import annotations

import importlib
import json
import re
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from conftest import Kubectl, wait_for
from sandbox.controlplane import Sandbox
from scans import (
    OPERATOR_NAMESPACE,
    SCAN_LABEL,
    SCAN_NAMESPACE_LABEL,
    Policy,
    RunningJobs,
    admin_api,
    assert_result,
    create_scan,
    push_variant,
    wait_done,
)

pytestmark = [pytest.mark.reliability, pytest.mark.sandbox]

BENCH = Path(__file__).resolve().parents[2] / "bench"
NAMED = ("clean", "all-low", "alpine-mixed", "debian-critical", "python-app", "npm-app")
SCANS, DIGESTS, LIMIT = 1000, 12, 3
RATE, SECONDS = 500, 60


def report(test: str, **figures: object) -> None:
    print(f"\nreliability figures [{test}]: {json.dumps(figures)}")


def bench_admission() -> ModuleType:
    """bench/admission.py: the vegeta it builds and the AdmissionReviews it sends."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("admission")


def test_the_gate_answers_500_reviews_a_second_for_a_minute(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], policy: Policy,
    tmp_path: Path,
) -> None:
    bench = bench_admission()
    vegeta = str(bench.vegeta())
    images = {name: push_variant(sandbox_env, name)[0] for name in ("clean", "debian-critical")}
    for name, image in images.items():
        create_scan(kubectl, namespace, name, image)
    wait_done(kubectl, namespace, list(images))
    policy(action="Enforce", thresholds={"critical": 0})
    gate = f"{sandbox_env['SCANGATE_ADMISSION']}/validate"
    ca = sandbox_env["SANDBOX_CA"]
    trust = ssl.create_default_context(cafile=ca)
    reviews = {name: tmp_path / f"{name}.json" for name in images}
    for name, image in images.items():
        reviews[name].write_text(json.dumps(bench.pod_review(namespace, image)))

    def verdicts() -> dict[str, bool]:
        return {name: httpx.post(gate, content=path.read_bytes(), verify=trust, timeout=10,
                                 headers={"Content-Type": "application/json"}
                                 ).json()["response"]["allowed"]
                for name, path in reviews.items()}

    # Real decisions, not just answers: the clean image is admitted, the critical refused.
    expected = {"clean": True, "debian-critical": False}
    wait_for(lambda: verdicts() == expected, 30, "the policy to apply")
    timeout = int(kubectl("get", "validatingwebhookconfiguration", "scangate-workloads",
                          "-o", "jsonpath={.webhooks[0].timeoutSeconds}"))
    targets = tmp_path / "targets.txt"
    targets.write_text("\n".join(f"POST {gate}\nContent-Type: application/json\n@{path}\n"
                                 for path in reviews.values()))
    attack = subprocess.run(
        [vegeta, "attack", f"-targets={targets}", f"-rate={RATE}", f"-duration={SECONDS}s",
         f"-timeout={timeout}s", f"-root-certs={ca}", "-keepalive=true"],
        check=True, capture_output=True, timeout=SECONDS + 60)
    result = json.loads(subprocess.run([vegeta, "report", "-type=json"], input=attack.stdout,
                                       check=True, capture_output=True).stdout)
    latencies = {q: round(result["latencies"][q] / 1e6, 2) for q in ("50th", "99th", "max")}
    errors = result["requests"] - result.get("status_codes", {}).get("200", 0)
    report("admission load", rate=RATE, seconds=SECONDS, requests=result["requests"],
           errors=errors, error_kinds=result.get("errors") or [],
           p50_ms=latencies["50th"], p99_ms=latencies["99th"], max_ms=latencies["max"],
           webhook_timeout_s=timeout, throughput=round(result["throughput"], 1))
    # vegeta's pacer stops at the duration: on a busy 2-core machine its own loop can fall a
    # few hits behind (CI once sent 29,997 of 30,000, every one answered). What is asserted
    # of the gate is that every request sent was answered in time; the count only has to
    # show that the rate was really offered.
    assert result["requests"] >= RATE * SECONDS * 0.995
    assert errors == 0 and result["success"] == 1, result.get("errors")
    assert latencies["99th"] < timeout * 1000
    assert verdicts() == expected  # and it still judges after the load


def digest_of(job: dict[str, Any]) -> str:
    command = " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"])
    found = re.search(r"@(sha256:[0-9a-f]{64})", command)
    assert found, job["metadata"]["name"]
    return found.group(1)


def test_a_thousand_imagescans_drain_within_the_running_job_limit(
    kubectl: Kubectl, namespace: str, sandbox: Sandbox, sandbox_env: dict[str, str],
    operator: Callable[..., None],
) -> None:
    operator("--max-running-scans", str(LIMIT))
    with ThreadPoolExecutor(4) as pool:
        pushed = list(pool.map(lambda i: push_variant(sandbox_env, NAMED[i % len(NAMED)]),
                               range(DIGESTS)))
    api = admin_api(sandbox)
    watcher = RunningJobs(api, namespace)
    watcher.start()
    path = f"/apis/scangate.dev/v1alpha1/namespaces/{namespace}/imagescans"
    names = [f"s{i:04d}" for i in range(SCANS)]

    def create(i: int) -> None:
        r = api.post(path, {"apiVersion": "scangate.dev/v1alpha1", "kind": "ImageScan",
                            "metadata": {"name": names[i]},
                            "spec": {"image": pushed[i % DIGESTS][0]}})
        assert r.status_code == 201, r.text

    began = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, range(SCANS)))
    created = time.monotonic() - began

    def drained() -> dict[str, dict[str, Any]] | None:
        listing = api.get(path)
        assert listing is not None
        items = {i["metadata"]["name"]: i for i in listing["items"]}
        return items if all((items[n].get("status") or {}).get("phase") in (
            "Completed", "Failed") for n in names) else None

    done: dict[str, dict[str, Any]] = wait_for(drained, 300, "the scans to drain", interval=2)
    seconds = time.monotonic() - began
    watcher.stop.set()

    found = (api.get(f"/apis/batch/v1/namespaces/{OPERATOR_NAMESPACE}/jobs"
                     f"?labelSelector={SCAN_NAMESPACE_LABEL}%3D{namespace}")
             or {}).get("items", [])
    scanned_by: dict[str, set[str]] = {}
    for job in found:
        scanned_by.setdefault(digest_of(job), set()).add(job["metadata"]["labels"][SCAN_LABEL])
    per_scan = Counter(j["metadata"]["labels"][SCAN_LABEL] for j in found)
    lost = [n for n in names if done[n]["status"]["phase"] != "Completed"]
    # A digest scanned by Jobs of two scans, or a scan with more Jobs than attempts.
    duplicated = sorted({s for by in scanned_by.values() if len(by) > 1 for s in by}
                        | {n for n, c in per_scan.items() if c > done[n]["status"]["attempts"]})
    reused = sum(1 for n in names if done[n]["status"].get("reusedFrom"))
    report("1,000 ImageScans", scans=SCANS, digests=DIGESTS, jobs=len(found), reused=reused,
           scans_lost=len(lost), scans_duplicated=len(duplicated), running_job_limit=LIMIT,
           most_jobs_running=watcher.most, create_seconds=round(created, 1),
           drain_seconds=round(seconds, 1))
    assert lost == [], {n: done[n]["status"] for n in lost[:5]}
    assert duplicated == [], duplicated
    assert len(scanned_by) == DIGESTS and reused == SCANS - DIGESTS, (scanned_by, reused)
    for i, name in enumerate(names):
        assert_result(done[name], pushed[i % DIGESTS][1]["linux/amd64"])
    # The limit held, and it was reached: the queue waited on it.
    assert watcher.most == LIMIT, watcher.most
    assert watcher.events >= 2 * DIGESTS
