"""ScanRules keep the matching images of a registry scope scanned (real registry, real
pushes): runs on create, on scan-now and on schedule (push events: test_push)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Kubectl, wait_for
from sandbox.advisories import load_images
from sandbox.controlplane import Sandbox, free_port
from sandbox.distribution import Registry
from sandbox.images import Pusher, build_image
from scans import create_scan, scan_rule, wait_done

pytestmark = pytest.mark.sandbox
RULE_LABEL = "scangate.dev/scanrule"


def push(url: str, repository: str, tag: str, auth: tuple[str, str] | None = None) -> str:
    """Push an image of its own digest; that digest."""
    decl = {**load_images()["clean"], "files": {"etc/scangate-test-id": uuid.uuid4().hex}}
    pusher = Pusher(url, auth=auth)
    try:
        return pusher.image(repository, tag, build_image(decl))
    finally:
        pusher.close()


def rule_scans(kubectl: Kubectl, namespace: str, rule: str) -> dict[str, dict[str, Any]]:
    items = json.loads(kubectl("get", "imagescans", "-n", namespace, "-l",
                               f"{RULE_LABEL}={rule}", "-o", "json"))["items"]
    return {i["spec"]["image"].split("/", 1)[1]: i for i in items}


def rule_status(kubectl: Kubectl, namespace: str, rule: str) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(kubectl("get", "scanrule", rule, "-n", namespace,
                                                "-o", "json")).get("status", {})
    return status


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


@pytest.fixture
def team() -> str:
    """A registry namespace of this test's own (the sandbox registry is shared)."""
    return f"t{uuid.uuid4().hex[:8]}"


def test_a_rule_scans_exactly_its_matching_tags_and_follows_the_registry(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], team: str,
) -> None:
    url = f"http://{sandbox_env['REGISTRY']}"
    digests = {f"{team}-a/api:{tag}": push(url, f"{team}-a/api", tag)
               for tag in ("v1.0.0", "v1.1.0", "latest", "v1.2.0-rc1")}
    push(url, f"{team}-a/web", "v2.0.0")
    push(url, f"{team}-a/web", "dev")
    push(url, f"{team}-b/api", "v1.0.0")
    push(url, f"{team}-ab/api", "v1.0.0")
    rule = json.loads(scan_rule("release", url))
    rule["spec"].update({"scope": {"namespaces": [f"{team}-a"]},
                         "tagFilter": r"v\d+\.\d+\.\d+"})
    kubectl.apply(json.dumps(rule), namespace)
    expected = {f"{team}-a/api:v1.0.0", f"{team}-a/api:v1.1.0", f"{team}-a/web:v2.0.0"}

    def all_completed() -> dict[str, dict[str, Any]] | None:
        found = rule_scans(kubectl, namespace, "release")
        done = set(found) == expected and all(
            s.get("status", {}).get("phase") == "Completed" for s in found.values())
        return found if done else None

    first = wait_for(all_completed, 180, "the rule's scans")
    assert {s["spec"]["ruleRef"]["name"] for s in first.values()} == {"release"}
    assert all(s["metadata"]["ownerReferences"][0]["kind"] == "ScanRule"
               for s in first.values())
    status = rule_status(kubectl, namespace, "release")
    assert status["lastRun"]["tags"] == 3 and status["lastRun"]["repositories"] == 2
    assert condition(status, "RegistryReachable")["status"] == "True"
    assert status["images"] == 3 and status["totals"]["total"] == 0

    # A manual run again creates nothing.
    kubectl("annotate", "scanrule", "release", "-n", namespace, "scangate.dev/scan-now=1")
    wait_for(lambda: rule_status(kubectl, namespace, "release").get("lastScanNow") == "1",
             60, "the manual run")
    assert rule_status(kubectl, namespace, "release")["lastRun"]["scansCreated"] == 0
    uids = {k: s["metadata"]["uid"] for k, s in rule_scans(kubectl, namespace,
                                                             "release").items()}
    assert uids == {k: s["metadata"]["uid"] for k, s in first.items()}

    # A tag deleted from the registry loses its ImageScan on the next run.
    httpx.delete(f"{url}/v2/{team}-a/api/manifests/{digests[f'{team}-a/api:v1.0.0']}"
                 ).raise_for_status()
    kubectl("annotate", "scanrule", "release", "-n", namespace, "scangate.dev/scan-now=2",
            "--overwrite")
    wait_for(lambda: set(rule_scans(kubectl, namespace, "release")) == expected - {
        f"{team}-a/api:v1.0.0"}, 60, "the deleted tag's ImageScan to go")

    # A tag moved to another image is scanned again at its new digest.
    web = f"{team}-a/web:v2.0.0"
    before = rule_scans(kubectl, namespace, "release")[web]["status"]["digest"]
    moved = push(url, f"{team}-a/web", "v2.0.0")
    kubectl("annotate", "scanrule", "release", "-n", namespace, "scangate.dev/scan-now=3",
            "--overwrite")

    def rescanned() -> bool:
        status = rule_scans(kubectl, namespace, "release")[web].get("status", {})
        return bool(status.get("digest") == moved and status.get("phase") == "Completed")

    wait_for(rescanned, 120, "the moved tag's rescan")
    assert moved != before

    # Deleting the rule deletes its ImageScans (they are owned by it).
    kubectl("delete", "scanrule", "release", "-n", namespace)
    wait_for(lambda: rule_scans(kubectl, namespace, "release") == {}, 60,
             "the rule's ImageScans to be collected")


@pytest.fixture
def basic_registry(tmp_path: Path) -> Iterator[Registry]:
    registry = Registry(tmp_path / "registry", free_port(), users={"ci": "right"})
    registry.start()
    yield registry
    registry.stop()


def test_listed_repositories_with_credentials_and_wrong_credentials(
    kubectl: Kubectl, namespace: str, basic_registry: Registry,
) -> None:
    push(basic_registry.url, "team-a/api", "v1.0.0", auth=("ci", "right"))
    for name, password in (("good", "right"), ("bad", "wrong")):
        kubectl("create", "secret", "generic", f"creds-{name}", "-n", namespace,
                "--type=kubernetes.io/basic-auth", "--from-literal=username=ci",
                f"--from-literal=password={password}")
        rule = json.loads(scan_rule(name, basic_registry.url,
                                    credentialsSecretRef={"name": f"creds-{name}"}))
        rule["spec"]["scope"] = {"namespaces": ["team-a"], "repositories": ["api", "none"]}
        kubectl.apply(json.dumps(rule), namespace)
    # A user's own ImageScan naming the rule is the user's: the rule's runs leave it be.
    create_scan(kubectl, namespace, "mine", f"{basic_registry.host}/team-a/api:v1.0.0",
                ruleRef={"name": "good"})
    good = wait_for(lambda: rule_scans(kubectl, namespace, "good"), 60, "the good rule's scan")
    assert list(good) == ["team-a/api:v1.0.0"]
    bad = wait_for(lambda: condition(rule_status(kubectl, namespace, "bad"),
                                     "RegistryReachable"), 60, "the bad rule's condition")
    assert (bad["status"], bad["reason"]) == ("False", "RegistryAuthFailed")
    assert "'ci'" in bad["message"] and "wrong" not in bad["message"]
    assert rule_scans(kubectl, namespace, "bad") == {}
    kubectl("annotate", "scanrule", "good", "-n", namespace, "scangate.dev/scan-now=1")
    wait_for(lambda: rule_status(kubectl, namespace, "good").get("lastScanNow") == "1", 60,
             "a run after the user's scan exists")
    mine = wait_done(kubectl, namespace, ["mine"])["mine"]
    assert mine["status"]["phase"] == "Completed"


def scheduled_runs(kubectl: Kubectl, namespace: str, rule: str) -> list[str]:
    """The scheduled times of the rule's runs, one per run, from its Events."""
    items = json.loads(kubectl("get", "events", "-n", namespace, "--field-selector",
                               f"involvedObject.name={rule},reason=Ran", "-o", "json"))["items"]
    return sorted(m.group(1) for e in items
                  if (m := re.search(r"^Schedule run for (\S+Z):", e["message"])))


def test_a_scheduled_rule_runs_once_per_due_time_across_a_restart(
    kubectl: Kubectl, namespace: str, sandbox: Sandbox, sandbox_env: dict[str, str],
    team: str,
) -> None:
    url = f"http://{sandbox_env['REGISTRY']}"
    push(url, f"{team}-a/api", "v1.0.0")
    rule = json.loads(scan_rule("nightly", url))
    rule["spec"].update({"scope": {"namespaces": [f"{team}-a"]},
                         "triggers": {"onPush": False, "schedule": "* * * * *"}})
    kubectl.apply(json.dumps(rule), namespace)

    def last_scheduled() -> datetime | None:
        value = rule_status(kubectl, namespace, "nightly").get("lastScheduleTime")
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None

    first = wait_for(last_scheduled, 90, "the first scheduled run")
    sandbox.stop_operator()
    try:
        # The next due time passes while the operator is down.
        time.sleep(max(0.0, (first + timedelta(seconds=65) - datetime.now(UTC))
                       .total_seconds()))
    finally:
        sandbox.start_operator()
    wait_for(lambda: last_scheduled() == first + timedelta(minutes=1), 60,
             "the run missed while the operator was down")
    wait_for(lambda: last_scheduled() == first + timedelta(minutes=2), 90,
             "the next scheduled run")
    runs = wait_for(lambda: (r := scheduled_runs(kubectl, namespace, "nightly"))
                    and len(r) >= 3 and r, 30, "the runs' Events")
    expected = [(first + timedelta(minutes=m)).strftime("%Y-%m-%dT%H:%M:%SZ")
                for m in range(3)]
    assert runs == expected  # none missed, none doubled


def test_a_rule_enumerates_a_token_auth_registry(
    kubectl: Kubectl, namespace: str, tmp_path: Path,
) -> None:
    from sandbox.tokenserver import TokenServer

    tokens = TokenServer(tmp_path, {"ci": "t0ken-pass"}, service="registry.test")
    tokens.start()
    registry = Registry(tmp_path / "registry", free_port(), token_auth=tokens.registry_auth())
    registry.start()
    try:
        token = httpx.get(tokens.realm, params={
            "service": "registry.test", "scope": "repository:team-a/api:pull,push"},
            auth=("ci", "t0ken-pass")).json()["token"]
        pusher = Pusher(registry.url)
        pusher.http.headers["Authorization"] = f"Bearer {token}"
        image = build_image(load_images()["clean"])
        for tag in ("v1.0.0", "v2.0.0", "dev"):
            pusher.image("team-a/api", tag, image)
        pusher.close()
        for name, password in (("good", "t0ken-pass"), ("bad", "wrong")):
            kubectl("create", "secret", "generic", f"creds-{name}", "-n", namespace,
                    "--type=kubernetes.io/basic-auth", "--from-literal=username=ci",
                    f"--from-literal=password={password}")
            rule = json.loads(scan_rule(name, registry.url,
                                        credentialsSecretRef={"name": f"creds-{name}"}))
            rule["spec"]["tagFilter"] = r"v\d+\.\d+\.\d+"
            kubectl.apply(json.dumps(rule), namespace)
        # Through the catalog (registry:catalog:* scope), then the tags of each repository.
        good = wait_for(lambda: rule_scans(kubectl, namespace, "good"), 60,
                        "the good rule's scans")
        assert set(good) == {"team-a/api:v1.0.0", "team-a/api:v2.0.0"}
        scopes = {a["type"] + ":" + a["name"] for issued in tokens.issued
                  for a in issued["access"]}
        assert {"registry:catalog", "repository:team-a/api"} <= scopes
        bad = wait_for(lambda: condition(rule_status(kubectl, namespace, "bad"),
                                         "RegistryReachable"), 60, "the bad rule's condition")
        assert (bad["status"], bad["reason"]) == ("False", "RegistryAuthFailed")
        assert rule_scans(kubectl, namespace, "bad") == {}
    finally:
        registry.stop()
        tokens.stop()


def test_a_failure_retried_counts_on_one_event_as_kubernetes_recorder_does(
    kubectl: Kubectl, namespace: str,
) -> None:
    """A rule whose registry refuses connections fails every retry with the same message:
    one RunFailed Event whose count rises, not one Event per retry."""
    kubectl.apply(scan_rule("down", f"http://127.0.0.1:{free_port()}"), namespace)

    def failures() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = json.loads(kubectl(
            "get", "events", "-n", namespace, "--field-selector",
            "involvedObject.name=down,reason=RunFailed", "-o", "json"))["items"]
        return found

    first = wait_for(lambda: condition(rule_status(kubectl, namespace, "down"),
                                       "RegistryReachable"), 60, "the first failure")
    repeated = wait_for(lambda: [e for e in failures() if e.get("count", 1) >= 3], 60,
                        "three failed retries")
    assert len(failures()) == 1, [(e["message"], e.get("count")) for e in failures()]
    assert repeated[0]["lastTimestamp"] > repeated[0]["firstTimestamp"]
    # The condition says since when the registry has been unreachable, not the last retry.
    now = condition(rule_status(kubectl, namespace, "down"), "RegistryReachable")
    assert now["status"] == first["status"] == "False" and "retrying at" in now["message"]
    assert now["lastTransitionTime"] == first["lastTransitionTime"], (first, now)
