"""Push events reach ScanRules: real pushes with skopeo into the sandbox registry, whose
own notifications go to the operator's HTTPS push receiver; and the receiver itself,
fed the recorded payload of every format it accepts."""

from __future__ import annotations

import json
import ssl
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Kubectl, wait_for
from scangate.registry.events import parse_push_events
from scans import SCAN_LABEL, jobs, push_variant

pytestmark = pytest.mark.sandbox
SAMPLES = Path(__file__).parent.parent / "data" / "push"
RULE_LABEL = "scangate.dev/scanrule"


def push_rule(kubectl: Kubectl, namespace: str, name: str, registry: str, team: str,
              tag_filter: str = r"v\d+\.\d+\.\d+") -> None:
    kubectl.apply(json.dumps({
        "apiVersion": "scangate.dev/v1alpha1", "kind": "ScanRule", "metadata": {"name": name},
        "spec": {"registry": {"url": f"http://{registry}"},
                 "scope": {"namespaces": [f"{team}-a"]}, "tagFilter": tag_filter}}), namespace)
    # Its first run (nothing to find yet) is over: what follows comes from pushes.
    wait_for(lambda: json.loads(kubectl("get", "scanrule", name, "-n", namespace, "-o",
                                        "json")).get("status", {}).get("lastRun"),
             60, f"the first run of {name}")


def rule_scans(kubectl: Kubectl, namespace: str, rule: str) -> dict[str, dict[str, Any]]:
    items = json.loads(kubectl("get", "imagescans", "-n", namespace, "-l",
                               f"{RULE_LABEL}={rule}", "-o", "json"))["items"]
    return {i["spec"]["image"].split("/", 1)[1]: i for i in items}


def skopeo_copy(source: str, destination: str) -> None:
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                    "--dest-tls-verify=false", f"docker://{source}", f"docker://{destination}"],
                   check=True, capture_output=True, timeout=120)


@pytest.fixture
def team() -> str:
    return f"p{uuid.uuid4().hex[:8]}"


def test_a_pushed_matching_tag_is_scanned_with_no_manual_step(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], team: str,
) -> None:
    registry = sandbox_env["REGISTRY"]
    push_rule(kubectl, namespace, "on-push", registry, team)
    source, _ = push_variant(sandbox_env, "debian-critical")
    skopeo_copy(source, f"{registry}/{team}-a/api:latest")  # not matching: no scan
    skopeo_copy(source, f"{registry}/{team}-b/api:v1.0.0")  # out of scope: no scan
    skopeo_copy(source, f"{registry}/{team}-a/api:v1.0.0")

    def completed() -> dict[str, Any] | None:
        scan = rule_scans(kubectl, namespace, "on-push").get(f"{team}-a/api:v1.0.0")
        return scan if scan and scan.get("status", {}).get("phase") == "Completed" else None

    scan = wait_for(completed, 180, "the pushed tag's scan")
    assert scan["spec"]["trigger"] == "Push"
    assert scan["status"]["summary"]["total"] > 0
    # The registry notifies in order: the earlier pushes were seen and left alone.
    assert set(rule_scans(kubectl, namespace, "on-push")) == {f"{team}-a/api:v1.0.0"}


def test_each_pushed_manifest_starts_one_scan_however_many_rules_name_it(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], team: str,
) -> None:
    registry = sandbox_env["REGISTRY"]
    for name in ("first", "second"):
        push_rule(kubectl, namespace, name, registry, team, tag_filter=".*")
    # A multi-platform index: its platform manifests are pushed by digest before it.
    push_variant(sandbox_env, "multiarch", at=f"{registry}/{team}-a/app:v2.0.0")

    def both_completed() -> list[dict[str, Any]] | None:
        found = [rule_scans(kubectl, namespace, r).get(f"{team}-a/app:v2.0.0", {})
                 for r in ("first", "second")]
        done = all(s.get("status", {}).get("phase") == "Completed" for s in found)
        return found if done else None

    scans = wait_for(both_completed, 180, "the two rules' scans")
    assert {s["status"]["digest"] for s in scans} == {scans[0]["status"]["digest"]}
    names = {s["metadata"]["name"] for s in scans}
    scan_jobs = [j for j in jobs(kubectl, namespace)
                 if j["metadata"]["labels"].get(SCAN_LABEL) in names]
    assert len(scan_jobs) == 1, [j["metadata"]["name"] for j in scan_jobs]
    assert sum(1 for s in scans if s["status"].get("reusedFrom")) == 1
    # Nothing else was created for the platform manifests pushed by digest.
    assert all(len(rule_scans(kubectl, namespace, r)) == 1 for r in ("first", "second"))


def post(env: dict[str, str], body: bytes, token: str | None = None,
         content_type: str = "application/json") -> httpx.Response:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"https://127.0.0.1:{env['PUSH_PORT']}/push", content=body,
                      headers=headers, timeout=30,
                      verify=ssl.create_default_context(cafile=env["SANDBOX_CA"]))


def sample(name: str, registry: str, team: str) -> bytes:
    """A recorded payload, naming the sandbox registry and this test's namespace."""
    text = (SAMPLES / name).read_text()
    for host in ("127.0.0.1:5000", "myregistry.azurecr.io", "demo.azurecr.io",
                 "registry.example.com"):
        text = text.replace(host, registry)
    return text.replace("team-a/", f"{team}-a/").encode()


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.glob("*.json")))
def test_each_recorded_payload_format_is_accepted(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], team: str, name: str,
) -> None:
    registry = sandbox_env["REGISTRY"]
    push_rule(kubectl, namespace, "formats", registry, team, tag_filter=".*")
    body = sample(name, registry, team)
    answer = post(sandbox_env, body, sandbox_env["PUSH_TOKEN"])
    assert answer.status_code == 200, answer.text
    scans = answer.json()["scans"]
    # One per tag pushed; a push by digest alone (Harbor's CloudEvents sample) names none.
    tags = {i.tag for i in parse_push_events(body) if i.tag}
    assert len(scans) == len(tags)
    assert all(s.startswith(f"{namespace}/formats-{team}-a-api-") for s in scans)
    created = rule_scans(kubectl, namespace, "formats")
    assert {s["metadata"]["name"] for s in created.values()} == {s.split("/")[1] for s in scans}
    assert all(s["spec"]["trigger"] == "Push" for s in created.values())
    # The same event again (a registry retries) creates nothing new.
    assert post(sandbox_env, body, sandbox_env["PUSH_TOKEN"]).status_code == 200
    assert {k: s["metadata"]["uid"] for k, s in rule_scans(kubectl, namespace,
                                                            "formats").items()} == {
        k: s["metadata"]["uid"] for k, s in created.items()}


def test_the_receiver_wants_its_token_and_a_body_it_understands(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], team: str,
) -> None:
    registry = sandbox_env["REGISTRY"]
    push_rule(kubectl, namespace, "guarded", registry, team, tag_filter=".*")
    body = json.dumps({"image": f"{registry}/{team}-a/api:v1.0.0"}).encode()
    assert post(sandbox_env, body).status_code == 401
    assert post(sandbox_env, body, "not-the-token").status_code == 401
    # A token that is not even text (bytes that are no UTF-8): refused, not a 500.
    for odd in (b"Bearer \xff\xfe", b"\xff\xfe", b"Bearer \xc3"):
        answer = httpx.post(f"https://127.0.0.1:{sandbox_env['PUSH_PORT']}/push",
                            content=body, headers={b"Authorization": odd}, timeout=30,
                            verify=ssl.create_default_context(cafile=sandbox_env["SANDBOX_CA"]))
        assert answer.status_code == 401, (odd, answer.text)
        assert answer.json() == {"error": "a valid push token is required"}
    for malformed in (b'{"image": ', b'"just a string"', b'{"events": [{"action": 1}]}',
                      json.dumps({"image": "UPPER/Case:!"}).encode(), b"\xff" * 64):
        answer = post(sandbox_env, malformed, sandbox_env["PUSH_TOKEN"])
        assert answer.status_code == 400, (malformed, answer.text)
        assert "error" in answer.json()
    assert post(sandbox_env, b"x" * (2 << 20), sandbox_env["PUSH_TOKEN"]).status_code == 413
    assert rule_scans(kubectl, namespace, "guarded") == {}
    # Plain HTTP is not served: the token would travel in the clear.
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"http://127.0.0.1:{sandbox_env['PUSH_PORT']}/push", content=body,
                   headers={"Authorization": f"Bearer {sandbox_env['PUSH_TOKEN']}"}, timeout=10)
    assert post(sandbox_env, body, sandbox_env["PUSH_TOKEN"]).json()["scans"]
