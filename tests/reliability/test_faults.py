"""Faults: no scan is lost or scanned twice, whatever breaks and comes back.

Each test breaks a real part of the sandbox while scans run: the operator SIGKILLed
at random points, the registry and the Trivy server stopped and started again, scan
pods deleted or killed on the node, the API server restarted. At the end every
ImageScan is Completed (or Failed with a reason), each scan has exactly one Job per
attempt (a Job more than the attempts counted is a scan started twice), and each
digest is scanned by one scan only. Each test prints its figures (faults injected,
scans, lost, duplicated) for the README.

Run: SCANGATE_SANDBOX_DIR=DIR .venv/bin/pytest tests/reliability/test_faults.py -s
(SCANGATE_FAULT_SEED=N replays the random kill points of a run.)
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from conftest import Kubectl, wait_for
from sandbox.controlplane import Sandbox
from scans import (
    OPERATOR_NAMESPACE,
    SCAN_LABEL,
    assert_result,
    events,
    injected,
    jobs,
    log_since,
    operator_log,
    push_variant,
    scan_rule,
    scans,
    wait_done,
)

pytestmark = [pytest.mark.reliability, pytest.mark.sandbox]

NAMED = ("clean", "all-low", "alpine-mixed", "debian-critical", "python-app", "npm-app")
RETRIES = ("--max-scan-attempts", "6")
"""Room for the retries of a scan whose registry or Trivy server is away a few seconds
(with the sandbox's 1 s backoff: 1, 2, 4, 8 and 16 s between attempts)."""
Scans = dict[str, dict[str, Any]]


@pytest.fixture(scope="module", autouse=True)
def patient_operator(sandbox: Sandbox) -> Iterator[None]:
    sandbox.stop_operator()
    sandbox.start_operator(extra_args=RETRIES)
    yield
    sandbox.stop_operator()
    sandbox.start_operator()


# -- helpers --------------------------------------------------------------------------

def push_variants(env: dict[str, str], count: int) -> list[tuple[str, dict[str, Any]]]:
    """`count` images of distinct digests (the named images in turn): (reference,
    declaration of linux/amd64)."""
    with ThreadPoolExecutor(4) as pool:
        pushed = list(pool.map(lambda i: push_variant(env, NAMED[i % len(NAMED)]),
                               range(count)))
    return [(image, variants["linux/amd64"]) for image, variants in pushed]


def create_scans(kubectl: Kubectl, ns: str, images: dict[str, str]) -> None:
    """Create the ImageScans {name: image} in one kubectl call."""
    kubectl("create", "-n", ns, "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "scangate.dev/v1alpha1", "kind": "ImageScan",
             "metadata": {"name": name}, "spec": {"image": image}}
            for name, image in images.items()]}))


def phases(kubectl: Kubectl, ns: str) -> Counter[str]:
    return Counter(s.get("status", {}).get("phase") or "New" for s in scans(kubectl, ns).values())


def finished(kubectl: Kubectl, ns: str, count: int) -> Callable[[], bool]:
    """Whether at least `count` scans are Completed or Failed."""
    return lambda: sum(phases(kubectl, ns)[k] for k in ("Completed", "Failed")) >= count


def digest_of(job: dict[str, Any]) -> str:
    command = " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"])
    found = re.search(r"@(sha256:[0-9a-f]{64})", command)
    assert found, job["metadata"]["name"]
    return found.group(1)


def audit(kubectl: Kubectl, ns: str, done: Scans) -> tuple[list[str], list[str], Counter[str]]:
    """The scans lost (not finished, or Failed without a reason), the scans started
    twice (more Jobs than attempts, two Jobs of one attempt, or a digest scanned by
    Jobs of more than one scan: the others must reuse its result), and the Jobs of
    each scan."""
    lost = [n for n, s in done.items()
            if s.get("status", {}).get("phase") not in ("Completed", "Failed")
            or (s["status"]["phase"] == "Failed" and not s["status"].get("reason"))]
    found = jobs(kubectl, ns)
    per_scan = Counter(j["metadata"]["labels"][SCAN_LABEL] for j in found)
    per_attempt = Counter((j["metadata"]["labels"][SCAN_LABEL],
                           j["metadata"]["annotations"]["scangate.dev/attempt"]) for j in found)
    scanners: dict[str, set[str]] = {}
    for job in found:
        scanners.setdefault(digest_of(job), set()).add(job["metadata"]["labels"][SCAN_LABEL])
    duplicated = sorted(
        {n for n, s in done.items() if per_scan[n] > (s.get("status", {}).get("attempts") or 0)}
        | {scan for (scan, _), count in per_attempt.items() if count > 1}
        | {scan for names in scanners.values() if len(names) > 1 for scan in names})
    return lost, duplicated, per_scan


def report(test: str, **figures: object) -> None:
    print(f"\nreliability figures [{test}]: {json.dumps(figures)}")


def metric(env: dict[str, str], line: str) -> bool:
    try:
        return line in httpx.get(f"{env['SCANGATE_METRICS']}/metrics", timeout=5).text
    except httpx.HTTPError:
        return False


def ready(status: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})


def assert_no_loss(kubectl: Kubectl, ns: str, done: Scans, test: str, faults: int,
                   decls: dict[str, dict[str, Any]] | None = None, **figures: object) -> None:
    lost, duplicated, per_scan = audit(kubectl, ns, done)
    warnings = Counter(e["reason"] for e in json.loads(kubectl(
        "get", "events", "-n", ns, "--field-selector", "type=Warning", "-o", "json"))["items"])
    report(test, faults_injected=faults, scans=len(done), jobs=sum(per_scan.values()),
           scans_lost=len(lost), scans_duplicated=len(duplicated),
           warning_events=dict(warnings), **figures)
    assert lost == [], {n: done[n].get("status") for n in lost}
    assert duplicated == [], duplicated
    # And no attempt without its Job: one Job per attempt of each scan that scanned.
    attempts = {n: s["status"]["attempts"] for n, s in done.items()
                if s["status"]["phase"] == "Completed" and not s["status"].get("reusedFrom")}
    assert {n: per_scan[n] for n in attempts} == attempts
    for name, decl in (decls or {}).items():
        assert_result(done[name], decl)


# -- the operator killed --------------------------------------------------------------

def test_operator_sigkilled_at_random_points_loses_and_duplicates_no_scan(
    kubectl: Kubectl, namespace: str, sandbox: Sandbox, sandbox_env: dict[str, str],
) -> None:
    seed = int(os.environ.get("SCANGATE_FAULT_SEED") or time.time_ns() % 10**6)
    rng = random.Random(seed)
    pushed = push_variants(sandbox_env, 50)
    names = [f"k{i:02d}" for i in range(len(pushed))]
    began = time.monotonic()
    create_scans(kubectl, namespace, {n: image for n, (image, _) in zip(names, pushed,
                                                                        strict=True)})
    # The kill points: after a random number of scans finished (each one after the
    # previous restart), plus a random fraction of a second.
    points = sorted(rng.sample(range(2, 26), 3))
    at_kill: list[dict[str, int]] = []
    for point in points:
        # At least one scan more finished since the last kill: the new operator leads.
        before = sum(at_kill[-1].get(k, 0) for k in ("Completed", "Failed")) if at_kill else 0
        target = max(point, before + 1)
        wait_for(finished(kubectl, namespace, target), 150, f"{target} scans to finish")
        time.sleep(rng.uniform(0, 1.0))
        sandbox.stop_operator(signal.SIGKILL)
        at_kill.append(dict(phases(kubectl, namespace)))
        sandbox.start_operator(extra_args=RETRIES)
    done = wait_done(kubectl, namespace, names, timeout=180)
    elapsed = round(time.monotonic() - began, 1)
    # Each kill landed in the middle of the run: scans were still to finish.
    assert all(sum(v for k, v in p.items() if k not in ("Completed", "Failed")) > 0
               for p in at_kill), at_kill
    assert_no_loss(kubectl, namespace, done, "operator SIGKILL", len(points),
                   dict(zip(names, (d for _, d in pushed), strict=True)),
                   seed=seed, phases_at_kills=at_kill, seconds=elapsed)
    # No completion was recorded twice either.
    assert max(events(kubectl, namespace, "ScanCompleted").values()) == 1


# -- the registry and the Trivy server down ----------------------------------------------

def rule_status(kubectl: Kubectl, ns: str, rule: str) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(kubectl("get", "scanrule", rule, "-n", ns, "-o",
                                                "json")).get("status", {})
    return status


def reachable(status: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or []
                 if c["type"] == "RegistryReachable"), {})


def registry_up(env: dict[str, str]) -> bool:
    try:
        return httpx.get(f"http://{env['REGISTRY']}/v2/", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def trivy_up(env: dict[str, str]) -> bool:
    try:
        return httpx.get(f"{env['TRIVY_SERVER']}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


UP: dict[str, Callable[[dict[str, str]], bool]] = {"registry": registry_up,
                                                  "trivy-server": trivy_up}


def test_registry_down_during_enumeration_and_resolution(
    kubectl: Kubectl, namespace: str, sandbox: Sandbox, sandbox_env: dict[str, str],
) -> None:
    env = sandbox_env
    team = f"t{uuid.uuid4().hex[:8]}"
    tagged = {tag: push_variant(env, "alpine-mixed", at=f"{env['REGISTRY']}/{team}/api:{tag}")
              for tag in ("v1.0.0", "v1.1.0")}
    pushed = push_variants(env, 3)
    names = [f"r{i}" for i in range(len(pushed))]
    registry = sandbox.stop_process("registry", grace=5)
    seen: dict[str, Any] = {}
    try:
        rule = json.loads(scan_rule("outage", f"http://{env['REGISTRY']}"))
        rule["spec"]["scope"] = {"namespaces": [team]}
        kubectl.apply(json.dumps(rule), namespace)
        create_scans(kubectl, namespace, {n: image for n, (image, _) in zip(names, pushed,
                                                                            strict=True)})
        # Visible while it lasts: the rule's condition, each scan's reason and Ready
        # condition, the Events and the failure metric; nothing is Failed.
        seen["rule"] = wait_for(lambda: (c := reachable(rule_status(kubectl, namespace,
                                                                    "outage")))
                                and c["status"] == "False" and c, 30, "the rule's condition")

        def waiting() -> Scans | None:
            current = scans(kubectl, namespace)
            return current if all(
                current[n].get("status", {}).get("reason") == "RegistryUnavailable"
                for n in names) else None

        during = wait_for(waiting, 30, "the scans to report the registry unavailable")
        for name in names:
            status = during[name]["status"]
            assert status["phase"] == "Pending", status
            assert (ready(status)["status"], ready(status)["reason"]) == (
                "False", "RegistryUnavailable"), status
        seen["events"] = wait_for(lambda: events(kubectl, namespace, "RegistryUnavailable"),
                                  30, "the Events")
        assert set(seen["events"]) == set(names)
        assert events(kubectl, namespace, "RunFailed")["outage"] >= 1
        assert wait_for(lambda: metric(env, 'scangate_scan_failures_total{reason='
                                            '"RegistryUnavailable"}'), 30, "the metric")
        assert seen["rule"]["reason"] == "RegistryUnavailable"
        down = time.monotonic()
    finally:
        sandbox.start_process("registry", registry)
        wait_for(lambda: registry_up(env), 30, "the registry")
    # Back: the rule lists the registry and creates its scans; every scan completes.
    rule_scans = wait_for(lambda: (found := [
        n for n, s in scans(kubectl, namespace).items()
        if s["metadata"].get("ownerReferences")]) and len(found) == 2 and found, 60,
        "the rule's scans")
    done = wait_done(kubectl, namespace, names + rule_scans, timeout=120)
    recovered = round(time.monotonic() - down, 1)
    decls = {n: d for n, (_, d) in zip(names, pushed, strict=True)}
    decls |= {n: tagged[done[n]["spec"]["image"].rsplit(":", 1)[1]][1]["linux/amd64"]
              for n in rule_scans}
    assert reachable(rule_status(kubectl, namespace, "outage"))["status"] == "True"
    assert_no_loss(kubectl, namespace, done, "registry down (enumeration, resolution)", 1,
                   decls, seconds_to_recover=recovered)


@pytest.mark.parametrize("process", ["registry", "trivy-server"])
def test_registry_or_trivy_server_down_during_a_scan_is_retried_to_completion(
    kubectl: Kubectl, namespace: str, sandbox: Sandbox, sandbox_env: dict[str, str],
    process: str,
) -> None:
    pushed = push_variants(sandbox_env, 3)
    names = [f"down-{i}" for i in range(len(pushed))]
    # The scan pods wait on the node (a slow pull) while the process goes down; then
    # Trivy runs, and finds it away.
    with injected(sandbox_env, ("delayStart", names, {"seconds": 6})):
        create_scans(kubectl, namespace, {n: image for n, (image, _) in zip(names, pushed,
                                                                            strict=True)})
        wait_for(lambda: phases(kubectl, namespace)["Scanning"] == len(names), 30,
                 "every scan's Job to start")
        stopped = sandbox.stop_process(process, grace=5)
        try:
            def retrying() -> Scans | None:
                current = scans(kubectl, namespace)
                return current if any(s.get("status", {}).get("reason") == "TrivyFailed"
                                      for s in current.values()) else None

            # Visible while it lasts: the reason, the retry in the message, the Event
            # and the metric; no scan Failed.
            during = wait_for(retrying, 60, "a failed attempt")
            failed = next(s["status"] for s in during.values()
                          if s.get("status", {}).get("reason") == "TrivyFailed")
            assert failed["phase"] in ("Queued", "Scanning"), failed
            assert "retrying in" in failed["message"], failed
            assert wait_for(lambda: events(kubectl, namespace, "TrivyFailed"), 30, "the Event")
            assert wait_for(lambda: metric(sandbox_env, 'scangate_scan_failures_total{reason='
                                                        '"TrivyFailed"}'), 30, "the metric")
            assert not any(s.get("status", {}).get("phase") == "Failed"
                           for s in during.values())
            down = time.monotonic()
        finally:
            sandbox.start_process(process, stopped)
            wait_for(lambda: UP[process](sandbox_env), 60, f"the {process} to be back")
        done = wait_done(kubectl, namespace, names, timeout=120)
    attempts = {n: done[n]["status"]["attempts"] for n in names}
    assert max(attempts.values()) >= 2, attempts  # the fault hit a scan, and it was retried
    assert_no_loss(kubectl, namespace, done, f"{process} down during a scan", 1,
                   {n: d for n, (_, d) in zip(names, pushed, strict=True)},
                   attempts=attempts, seconds_to_recover=round(time.monotonic() - down, 1))


# -- scan pods lost, the API server restarted --------------------------------------------

def test_scan_pods_deleted_lost_or_killed_are_scanned_again_once(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
) -> None:
    pushed = dict(zip(("pod-deleted", "pod-lost", "oom-killed"), push_variants(sandbox_env, 3),
                      strict=True))

    def running_pod(scan: str) -> str | None:
        status = scans(kubectl, namespace)[scan].get("status", {})
        if status.get("phase") != "Scanning":
            return None
        pods = json.loads(kubectl("get", "pods", "-n", OPERATOR_NAMESPACE, "-l",
                                  f"job-name={status['jobName']}", "-o", "json"))["items"]
        return next((p["metadata"]["name"] for p in pods
                     if p.get("status", {}).get("phase") == "Running"), None)

    # The first attempt of each: a Trivy that hangs (its pod is then deleted, or
    # force-deleted as a node controller does with the pods of a lost node), or one the
    # node kills (as the OOM killer would; $$ is Kubernetes' escape of $).
    with injected(sandbox_env,
                  ("replaceCommand", ["pod-deleted", "pod-lost"], {"command": ["sleep", "60"]}),
                  ("replaceCommand", ["oom-killed"], {"command": ["sh", "-c", "kill -9 $$$$"]})):
        create_scans(kubectl, namespace, {n: image for n, (image, _) in pushed.items()})
        kubectl("delete", "pod", "-n", OPERATOR_NAMESPACE, "--wait=false",
                wait_for(lambda: running_pod("pod-deleted"), 60, "the hanging scan's pod"))
        kubectl("delete", "pod", "-n", OPERATOR_NAMESPACE, "--wait=false", "--force",
                "--grace-period=0",
                wait_for(lambda: running_pod("pod-lost"), 60, "the other hanging scan's pod"))
        done = wait_done(kubectl, namespace, list(pushed), timeout=120)
    attempts = {n: done[n]["status"]["attempts"] for n in pushed}
    assert attempts == dict.fromkeys(pushed, 2), attempts
    warnings = {reason: events(kubectl, namespace, reason)
                for reason in ("PodLost", "TrivyFailed", "JobLost")}
    # One failed attempt each, said once.
    assert all(sum(w[n] for w in warnings.values()) == 1 for n in pushed), warnings
    assert_no_loss(kubectl, namespace, done, "scan pods deleted/lost/killed", 3,
                   {n: d for n, (_, d) in pushed.items()}, attempts=attempts,
                   retry_reasons={r: dict(c) for r, c in warnings.items() if c})


def api_ready(kubectl: Kubectl) -> bool:
    return kubectl.run("get", "--raw", "/readyz", check=False, timeout=10).returncode == 0


def test_api_server_restarted_mid_run_loses_and_duplicates_no_scan(
    kubectl: Kubectl, namespace: str, sandbox: Sandbox, sandbox_env: dict[str, str],
) -> None:
    pushed = push_variants(sandbox_env, 20)
    names = [f"a{i:02d}" for i in range(len(pushed))]
    create_scans(kubectl, namespace, {n: image for n, (image, _) in zip(names, pushed,
                                                                        strict=True)})

    def mid_run() -> Counter[str] | None:
        now = phases(kubectl, namespace)
        return now if now["Scanning"] and now["Completed"] < len(names) - 8 else None

    at_stop = wait_for(mid_run, 60, "scans under way")
    offset = operator_log(sandbox_env).stat().st_size
    # Stopped (SIGTERM; SIGKILL if it still drains its watches after 2 s), away for 3 s
    # more (every client that renews, such as the operator's leader election every 3 s,
    # meets it), then started again.
    began = time.monotonic()
    server: tuple[list[str], dict[str, str]] | None = sandbox.stop_process(
        "kube-apiserver", grace=2)
    try:
        time.sleep(3)
        assert server is not None
        sandbox.start_process("kube-apiserver", server)
        server = None
        wait_for(lambda: api_ready(kubectl), 60, "the API server")
        outage = round(time.monotonic() - began, 1)

        def finished_alive() -> Scans | None:
            # Every process of the sandbox lives through it: the operator too.
            sandbox.check_alive()
            current = scans(kubectl, namespace)
            return current if all(current[n].get("status", {}).get("phase") in (
                "Completed", "Failed") for n in names) else None

        # Up to 5 minutes: after a restart the API server's watches can stay silent for
        # a minute or two (kube-controller-manager's Job controller meanwhile conflicts
        # with its own stale cache), so every controller, scangate's too, waits.
        done = wait_for(finished_alive, 300, "the scans to finish")
    finally:
        if server is not None:
            sandbox.start_process("kube-apiserver", server)
        wait_for(lambda: api_ready(kubectl), 60, "the API server")
        restore(sandbox, kubectl)
    assert_no_loss(kubectl, namespace, done, "API server restart", 1,
                   dict(zip(names, (d for _, d in pushed), strict=True)),
                   phases_at_stop=dict(at_stop), outage_seconds=outage)
    # An API server that does not answer is unavailable: no scan's surprise, no attempt
    # spent, and retried at each pass (every second here), not in a loop as fast as
    # connections are refused.
    logged = log_since(sandbox_env, offset)
    assert "unexpected error on ImageScan" not in logged
    retries = logged.count("API unavailable for ImageScan")
    assert retries <= len(names) * (outage + 10), (retries, outage)


def restore(sandbox: Sandbox, kubectl: Kubectl) -> None:
    """Leave the shared sandbox as it was: the operator, had it not lived through the
    fault, started again (the test has failed by then), and the node Ready."""
    try:
        sandbox.check_alive()
    except RuntimeError as e:
        print(f"restarting the operator after: {e}")
        sandbox.stop_operator()
        sandbox.start_operator(extra_args=RETRIES)
        sandbox.check_alive()
    wait_for(lambda: "True" in kubectl(
        "get", "node", "-o", "jsonpath={.items[0].status.conditions[?(@.type=='Ready')]"
        ".status}"), 60, "the node to be Ready")
