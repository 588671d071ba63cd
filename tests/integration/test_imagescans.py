"""The ImageScan lifecycle on the sandbox: real registry, real Trivy, the node agent.

Each test pushes its own variants of the named images (an extra file gives a new
digest with the same packages), so that digest-keyed reuse across tests never
hides a scan; expectations come from the advisory list.
"""

from __future__ import annotations

import json
import re
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Kubectl, wait_for
from sandbox.advisories import expected_findings, load_images
from sandbox.controlplane import Sandbox, free_port
from sandbox.distribution import Registry
from sandbox.images import Pusher, build_image
from sandbox.tokenserver import TokenServer
from scans import (
    OPERATOR_NAMESPACE,
    SCAN_LABEL,
    RunningJobs,
    admin_api,
    assert_result,
    counts,
    create_scan,
    events,
    jobs,
    push_variant,
    scan_rule,
    scans,
    wait_done,
)

pytestmark = pytest.mark.sandbox


@pytest.mark.parametrize("mode", ["ClientServer", "Standalone"])
def test_every_named_image_scans_to_its_expected_summary(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
    operator: Callable[..., None], mode: str,
) -> None:
    if mode == "Standalone":
        operator("--trivy-mode", "Standalone")
    wanted: dict[str, dict[str, Any]] = {}
    for name in load_images():
        image, variants = push_variant(sandbox_env, name)
        for platform, decl in variants.items():
            scan = f"{name}-{platform.split('/')[1]}"
            create_scan(kubectl, namespace, scan, image, platform=platform)
            wanted[scan] = decl
    done = wait_done(kubectl, namespace, list(wanted))
    for scan, decl in wanted.items():
        assert_result(done[scan], decl)
        assert done[scan]["status"]["attempts"] == 1
    assert done["multiarch-arm64"]["status"]["digest"] != done["multiarch-amd64"]["status"][
        "digest"]
    # Standalone: the Job's own DB, downloaded from the registry; ClientServer: the
    # server's, as its report says.
    scanner = done["clean-amd64"]["status"]["scanner"]
    assert scanner["dbUpdatedAt"] == "2026-11-01T00:00:00Z"
    # ...and the result says which DB it was made with, as the DB's metadata says.
    assert {k: v for k, v in done["clean-amd64"]["status"]["scannedWith"].items()
            if k.startswith("db")} == {"dbUpdatedAt": "2026-11-01T00:00:00Z",
                                       "dbNextUpdate": "2099-01-01T00:00:00Z"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", scanner["version"])
    # The scan pods ran hardened.
    pod_spec = jobs(kubectl, namespace)[0]["spec"]["template"]["spec"]
    assert pod_spec["automountServiceAccountToken"] is False
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    container = pod_spec["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert all(sandbox_env["REGISTRY"] not in arg or "@sha256:" in arg
               for arg in container["command"])


def test_ten_scans_over_three_digests_run_three_jobs(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str]
) -> None:
    refs = [push_variant(sandbox_env, name) for name in ("clean", "all-low", "alpine-mixed")]
    names = [f"s{i}" for i in range(10)]
    for i, name in enumerate(names):
        create_scan(kubectl, namespace, name, refs[i % 3][0])
    done = wait_done(kubectl, namespace, names)
    assert len(jobs(kubectl, namespace)) == 3
    for i, name in enumerate(names):
        assert_result(done[name], refs[i % 3][1]["linux/amd64"])
    reused = [n for n in names if done[n]["status"].get("reusedFrom")]
    assert len(reused) == 7


def test_running_jobs_never_exceed_the_limit(
    kubectl: Kubectl, namespace: str, sandbox: Sandbox, sandbox_env: dict[str, str],
    operator: Callable[..., None],
) -> None:
    operator("--max-running-scans", "2")
    watcher = RunningJobs(admin_api(sandbox), namespace)
    watcher.start()
    names = ["clean", "debian-critical", "alpine-mixed", "python-app", "npm-app", "all-low"]
    variants = {n: push_variant(sandbox_env, n) for n in names}
    for name in names:
        create_scan(kubectl, namespace, name, variants[name][0])
    done = wait_done(kubectl, namespace, names, timeout=240)
    watcher.stop.set()
    for name in names:
        assert_result(done[name], variants[name][1]["linux/amd64"])
    # One Job per attempt of each scan: a retried attempt (a log read too early on a
    # loaded machine) is a new Job; a scan started twice for one attempt is not allowed.
    per_scan = Counter(job.rsplit("-", 1)[0].removeprefix(f"scan-{namespace}-")
                       for job in watcher.running)
    assert per_scan == {n: done[n]["status"]["attempts"] for n in names}, per_scan
    assert watcher.most == 2, watcher.most
    assert watcher.events >= 12


def test_operator_killed_mid_queue_completes_each_scan_exactly_once(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
    operator: Callable[..., None],
) -> None:
    operator("--max-running-scans", "2")
    names = ["clean", "debian-critical", "alpine-mixed", "python-app", "npm-app", "all-low"]
    variants = {n: push_variant(sandbox_env, n) for n in names}
    for name in names:
        create_scan(kubectl, namespace, name, variants[name][0])

    def some_running_and_queued() -> bool:
        phases = Counter(s.get("status", {}).get("phase") for s in scans(kubectl, namespace)
                         .values())
        return phases["Scanning"] >= 1 and phases["Queued"] >= 1

    wait_for(some_running_and_queued, what="a scan running while others queue")
    operator("--max-running-scans", "2", sig=signal.SIGKILL)
    done = wait_done(kubectl, namespace, names, timeout=240)
    for name in names:
        assert_result(done[name], variants[name][1]["linux/amd64"])
        assert done[name]["status"]["attempts"] == 1, name
    per_scan = Counter(j["metadata"]["labels"][SCAN_LABEL] for j in jobs(kubectl, namespace))
    assert per_scan == dict.fromkeys(names, 1)
    completed = events(kubectl, namespace, "ScanCompleted")
    assert set(completed) <= set(names) and set(completed.values()) <= {1}, completed
    # Events are best effort, written after the status: the one of a scan completed just
    # as the process was killed can be lost (seen under load), never written twice.
    assert len(set(names) - set(completed)) <= 1, completed


def test_corrupted_log_is_retried_never_misread(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str]
) -> None:
    image, variants = push_variant(sandbox_env, "debian-critical")
    faults = Path(sandbox_env["SANDBOX_DIR"]) / "faults.json"
    faults.write_text(json.dumps({"truncateLogs": [
        {"labels": {SCAN_LABEL: "corrupted"}, "bytes": 3000, "times": 1}]}))
    try:
        create_scan(kubectl, namespace, "corrupted", image)
        scan = wait_done(kubectl, namespace, ["corrupted"])["corrupted"]
    finally:
        faults.unlink(missing_ok=True)
    assert_result(scan, variants["linux/amd64"])
    assert scan["status"]["attempts"] == 2
    assert len(jobs(kubectl, namespace)) == 2
    assert events(kubectl, namespace, "ResultCorrupted") == {"corrupted": 1}


def test_missing_image_fails_naming_it(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str]
) -> None:
    image = f"{sandbox_env['REGISTRY']}/scangate-test/does-not-exist:1.0"
    create_scan(kubectl, namespace, "missing", image)
    status = wait_done(kubectl, namespace, ["missing"])["missing"]["status"]
    assert status["phase"] == "Failed"
    assert status["reason"] == "ImageNotFound"
    assert image in status["message"]
    assert status["conditions"][0]["status"] == "False"
    assert events(kubectl, namespace, "ScanFailed") == {"missing": 1}
    assert jobs(kubectl, namespace) == []


def test_metrics_are_exported(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
    operator: Callable[..., None],
) -> None:
    image, variants = push_variant(sandbox_env, "all-low")
    create_scan(kubectl, namespace, "metrics", image)
    wait_done(kubectl, namespace, ["metrics"])
    low = counts(expected_findings(variants["linux/amd64"]))["low"]
    text = httpx.get(f"{sandbox_env['SCANGATE_METRICS']}/metrics").text
    for metric in ("scangate_scans_total{result=\"completed\"}", "scangate_scan_queue_depth",
                   "scangate_scan_jobs_running", "scangate_scan_duration_seconds_bucket",
                   f'scangate_vulnerabilities{{namespace="{namespace}",severity="low"}} {low}.0'):
        assert metric in text, metric
    # Per-image series are opt-in (they grow with the images), and rebuilt from the
    # cluster's state at start, with no new scan.
    assert "scangate_image_vulnerabilities{" not in text
    operator("--per-image-metrics")
    text = wait_for(lambda: (t := httpx.get(f"{sandbox_env['SCANGATE_METRICS']}/metrics").text)
                    and f'image="{image}"' in t and t, 30, "per-image series")
    series = [line for line in text.splitlines()
              if line.startswith("scangate_image_vulnerabilities{") and all(
                  f'{k}="{v}"' in line for k, v in (("namespace", namespace),
                                                    ("imagescan", "metrics"), ("image", image),
                                                    ("severity", "low")))]
    assert len(series) == 1 and series[0].endswith(f" {low}.0"), series
    kubectl("delete", "imagescan", "metrics", "-n", namespace)
    wait_for(lambda: f'image="{image}"' not in httpx.get(
        f"{sandbox_env['SCANGATE_METRICS']}/metrics").text, 30, "the deleted scan's series to go")


@pytest.fixture
def token_registry(tmp_path: Path) -> Iterator[tuple[Registry, TokenServer]]:
    tokens = TokenServer(tmp_path, {"ci": "t0ken-pass"}, service="registry.test")
    tokens.start()
    registry = Registry(tmp_path / "registry", free_port(), token_auth=tokens.registry_auth())
    registry.start()
    yield registry, tokens
    registry.stop()
    tokens.stop()


def test_private_registry_credentials_reach_trivy_from_the_secret(
    kubectl: Kubectl, namespace: str, token_registry: tuple[Registry, TokenServer]
) -> None:
    registry, tokens = token_registry
    token = httpx.get(tokens.realm, params={"service": "registry.test",
                                            "scope": "repository:team-a/app:pull,push"},
                      auth=("ci", "t0ken-pass")).json()["token"]
    pusher = Pusher(registry.url)
    pusher.http.headers["Authorization"] = f"Bearer {token}"
    decl = load_images()["debian-critical"]
    pusher.image("team-a/app", "1.0", build_image(decl))
    pusher.close()
    for name, password in (("good", "t0ken-pass"), ("bad", "wrong")):
        kubectl("create", "secret", "generic", f"creds-{name}", "-n", namespace,
                "--type=kubernetes.io/basic-auth", "--from-literal=username=ci",
                f"--from-literal=password={password}")
        kubectl.apply(scan_rule(f"rule-{name}", registry.url,
                                credentialsSecretRef={"name": f"creds-{name}"}), namespace)
        create_scan(kubectl, namespace, f"scan-{name}", f"{registry.host}/team-a/app:1.0",
                    ruleRef={"name": f"rule-{name}"})
    done = wait_done(kubectl, namespace, ["scan-good", "scan-bad"])
    assert_result(done["scan-good"], decl)
    bad = done["scan-bad"]["status"]
    assert (bad["phase"], bad["reason"]) == ("Failed", "RegistryAuthFailed")
    assert "'ci'" in bad["message"] and "wrong" not in bad["message"]
    # The password reached Trivy through Secret-backed env, never through arguments: a
    # copy beside the Job in the operator's namespace, owned by it (deleted with it),
    # holding the two keys Trivy reads.
    # The Job is scan-good's, or that of the scan rule-good made of the same tag on its
    # create run, whose result scan-good then reused: either way rule-good's credentials.
    by_rule = kubectl("get", "imagescans", "-n", namespace, "-l",
                      "scangate.dev/scanrule=rule-good", "-o", "name").split()
    scanned = [j for j in jobs(kubectl, namespace)
               if j["metadata"]["annotations"]["scangate.dev/imagescan"].split("/")[1]
               in ("scan-good", *(n.split("/")[-1] for n in by_rule))]
    assert len(scanned) == 1, [j["metadata"]["name"] for j in jobs(kubectl, namespace)]
    job = scanned[0]
    container = job["spec"]["template"]["spec"]["containers"][0]
    copy = f"{job['metadata']['name']}-registry"
    assert {"name": "TRIVY_PASSWORD", "valueFrom": {"secretKeyRef": {
        "name": copy, "key": "password"}}} in container["env"]
    assert not any("t0ken-pass" in part for part in container["command"])
    held = json.loads(kubectl("get", "secret", copy, "-n", OPERATOR_NAMESPACE, "-o", "json"))
    assert held["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert sorted(held["data"]) == ["password", "username"]
    kubectl("delete", "job", job["metadata"]["name"], "-n", OPERATOR_NAMESPACE)
    wait_for(lambda: kubectl.run("get", "secret", copy, "-n", OPERATOR_NAMESPACE,
                                 check=False).returncode != 0, 60, "the copy to go with its Job")
    assert any(c["sub"] == "ci" for c in tokens.issued)


def test_trivy_failures_are_retried_then_fail_with_event_and_metric(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
    operator: Callable[..., None],
) -> None:
    # A Trivy server that is down: every attempt's Job fails.
    operator("--trivy-server-url", "http://127.0.0.1:9", "--max-scan-attempts", "2")
    image, _ = push_variant(sandbox_env, "clean")
    create_scan(kubectl, namespace, "doomed", image)
    status = wait_done(kubectl, namespace, ["doomed"])["doomed"]["status"]
    assert (status["phase"], status["reason"], status["attempts"]) == ("Failed", "TrivyFailed", 2)
    assert "Trivy failed" in status["message"] and "after 2 attempts" in status["message"]
    assert len(jobs(kubectl, namespace)) == 2
    assert events(kubectl, namespace, "TrivyFailed") == {"doomed": 1}  # the retry
    assert events(kubectl, namespace, "ScanFailed") == {"doomed": 1}
    text = httpx.get(f"{sandbox_env['SCANGATE_METRICS']}/metrics").text
    assert 'scangate_scan_failures_total{reason="TrivyFailed"}' in text


def test_stale_results_are_scanned_again(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
    operator: Callable[..., None],
) -> None:
    operator("--rescan-interval", "8s")
    image, variants = push_variant(sandbox_env, "all-low")
    create_scan(kubectl, namespace, "fresh", image)
    first = wait_done(kubectl, namespace, ["fresh"])["fresh"]["status"]["scannedAt"]

    def rescanned() -> bool:
        status = scans(kubectl, namespace)["fresh"]["status"]
        return bool(status.get("phase") == "Completed" and status["scannedAt"] != first)

    wait_for(rescanned, timeout=60, what="a rescan")
    assert len(jobs(kubectl, namespace)) >= 2
    assert_result(scans(kubectl, namespace)["fresh"], variants["linux/amd64"])
