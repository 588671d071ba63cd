"""One bad ImageScan never stops the others, and no scan gets stuck.

Each poison pill below used to stop every scan in the cluster (an exception out of
the reconciliation pass); each now ends its own scan with a reason while scans
created at the same time complete. Hostile Trivy output comes from the node agent's
`replaceCommand` fault: the scan Job's container prints what a broken or hostile
Trivy would, through the real pod log, API server and operator.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from conftest import Kubectl, wait_for
from sandbox.advisories import expected_findings
from sandbox.controlplane import Sandbox
from scangate.core.framing import encode
from scans import (
    OPERATOR_NAMESPACE,
    SCAN_LABEL,
    assert_result,
    counts,
    create_scan,
    events,
    http_server,
    jobs,
    push_variant,
    scan_rule,
    scans,
    wait_done,
)

pytestmark = pytest.mark.sandbox


def inject(env: dict[str, str], kind: str, scan: str, command: list[str], times: int = 1) -> None:
    """Run `command` instead of Trivy in the next `times` scan pods of `scan`."""
    path = Path(env["SANDBOX_DIR"]) / "faults.json"
    faults = json.loads(path.read_text() or "{}") if path.exists() else {}
    faults.setdefault(kind, []).append(
        {"labels": {SCAN_LABEL: scan}, "command": command, "times": times})
    path.write_text(json.dumps(faults))


def printing(text: str, exit_code: int = 0) -> list[str]:
    """A container command that prints `text` and exits."""
    b64 = base64.b64encode(text.encode()).decode()
    return ["sh", "-c", f"echo {b64} | base64 -d; exit {exit_code}"]


def report(vulnerabilities: Any) -> str:
    body = {"SchemaVersion": 2, "ArtifactName": "x", "Results": [
        {"Target": "x", "Class": "os-pkgs", "Vulnerabilities": vulnerabilities}]}
    return encode("report", json.dumps(body).encode())


class HostileRegistry(BaseHTTPRequestHandler):
    """A registry that answers 200 with what no registry should send."""

    def do_GET(self) -> None:
        if self.path == "/v2/":
            body, kind = b"{}", "application/json"
        elif "/not-json/" in self.path:
            body, kind = b"<html>welcome</html>", "application/vnd.oci.image.manifest.v1+json"
        else:  # an index entry without a digest
            body = json.dumps({"schemaVersion": 2, "mediaType":
                               "application/vnd.oci.image.index.v1+json", "manifests": [
                                   {"platform": {"os": "linux", "architecture": "amd64"}}]}
                              ).encode()
            kind = "application/vnd.oci.image.index.v1+json"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def hostile_registry() -> Iterator[str]:
    with http_server(HostileRegistry) as host:
        yield host


def test_poison_pills_fail_alone_while_the_rest_complete(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], hostile_registry: str,
) -> None:
    env, registry = sandbox_env, sandbox_env["REGISTRY"]
    long_name = "a-scan-whose-name-is-much-longer-than-a-label-value-may-be-" + "x" * 40
    inject(env, "replaceCommand", "wrong-types",
           printing(report([{"VulnerabilityID": 5, "Severity": ["HIGH"]}])))
    inject(env, "replaceCommand", "long-fields", printing(report([
        {"VulnerabilityID": "CVE-2024-0001", "PkgName": "p" * 5000, "Severity": "HIGH",
         "InstalledVersion": "1" * 500, "FixedVersion": "2" * 500}])))
    inject(env, "replaceCommand", "long-log", printing("trivy says: " + "e" * 20000, 1), times=3)
    docker_config = json.dumps({"auths": ["not", "an", "object"]})
    kubectl("create", "secret", "generic", "odd-config", "-n", namespace,
            "--type=kubernetes.io/dockerconfigjson",
            f"--from-literal=.dockerconfigjson={docker_config}")
    kubectl.apply(scan_rule("odd-config", f"http://{registry}",
                       credentialsSecretRef={"name": "odd-config"}), namespace)
    kubectl.apply(scan_rule("hostile", f"http://{hostile_registry}"), namespace)

    # One digest each: scans of one digest would share one Job and its result.
    variants = {name: push_variant(env, "alpine-mixed")
                for name in ("good", "wrong-types", "long-fields", "long-log", long_name)}
    for name, (image, _) in variants.items():
        create_scan(kubectl, namespace, name, image)
    create_scan(kubectl, namespace, "odd-config", f"{registry}/variants/x:1",
                ruleRef={"name": "odd-config"})
    create_scan(kubectl, namespace, "not-json", f"{hostile_registry}/x/not-json:1",
                ruleRef={"name": "hostile"})
    create_scan(kubectl, namespace, "no-digest", f"{hostile_registry}/x/index:1",
                ruleRef={"name": "hostile"})
    names = ["good", "wrong-types", "long-fields", "long-log", long_name, "odd-config",
             "not-json", "no-digest"]
    done = {n: s["status"] for n, s in wait_done(kubectl, namespace, names).items()}

    assert_result({"metadata": {"name": "good"}, "status": done["good"]},
                  variants["good"][1]["linux/amd64"])
    assert done[long_name]["phase"] == "Completed"
    assert (done["wrong-types"]["phase"], done["wrong-types"]["reason"]) == (
        "Failed", "InvalidReport")
    assert "VulnerabilityID" in done["wrong-types"]["message"]
    finding = done["long-fields"]["findings"][0]
    assert done["long-fields"]["phase"] == "Completed"
    assert (len(finding["package"]), len(finding["installedVersion"]),
            len(finding["fixedVersion"])) == (256, 128, 256)
    assert (done["long-log"]["phase"], done["long-log"]["reason"]) == ("Failed", "TrivyFailed")
    assert len(done["long-log"]["message"]) <= 4096
    assert (done["odd-config"]["phase"], done["odd-config"]["reason"]) == ("Failed",
                                                                          "InvalidSpec")
    assert "not-an-object" not in done["odd-config"]["message"]
    for name in ("not-json", "no-digest"):
        assert done[name]["phase"] == "Failed", name
        assert "<html>" not in done[name]["message"]  # a hostile body is never echoed


def test_pending_retries_are_bounded(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
) -> None:
    # Nothing listens on port 9: every lookup is a transient failure, retried with a
    # doubling backoff; the count of attempts is bounded (and 2**43 never computed).
    create_scan(kubectl, namespace, "unreachable", "127.0.0.1:9/team/app:1")
    good, variants = push_variant(sandbox_env, "clean")
    create_scan(kubectl, namespace, "good", good)

    def waiting() -> dict[str, Any] | None:
        status = scans(kubectl, namespace)["unreachable"].get("status", {})
        return status if status.get("attempts", 0) >= 3 else None

    wait_for(waiting, 30, "a few transient failures")
    kubectl("patch", "imagescan", "unreachable", "-n", namespace, "--subresource=status",
            "--type=merge", "-p", json.dumps({"status": {"attempts": 42, "retryAfter": (
                datetime.now(UTC) + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")}}))
    done = wait_done(kubectl, namespace, ["unreachable", "good"], timeout=60)
    status = done["unreachable"]["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "RegistryUnavailable")
    assert_result(done["good"], variants["linux/amd64"])


def test_a_deleted_job_is_requeued_and_a_deadline_is_a_timeout(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
) -> None:
    images = {name: push_variant(sandbox_env, "all-low") for name in ("lost", "slow")}
    inject(sandbox_env, "replaceCommand", "lost", ["sleep", "60"])
    inject(sandbox_env, "replaceCommand", "slow", ["sleep", "60"])
    create_scan(kubectl, namespace, "lost", images["lost"][0])
    create_scan(kubectl, namespace, "slow", images["slow"][0], timeout="10s")

    def scanning() -> str | None:
        status = scans(kubectl, namespace)["lost"].get("status", {})
        return status.get("jobName") if status.get("phase") == "Scanning" else None

    kubectl("delete", "job", wait_for(scanning, 60, "the scan to run"),
            "-n", OPERATOR_NAMESPACE, "--wait=false")
    done = wait_done(kubectl, namespace, ["lost", "slow"], timeout=120)
    for name in ("lost", "slow"):
        assert_result(done[name], images[name][1]["linux/amd64"])
        assert done[name]["status"]["attempts"] == 2, name
    assert events(kubectl, namespace, "JobLost") == {"lost": 1}
    assert events(kubectl, namespace, "ScanTimeout") == {"slow": 1}


def test_a_rescan_follows_a_moved_tag_and_edited_options_are_never_reused(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
    operator: Callable[..., None],
) -> None:
    operator("--rescan-interval", "10s")
    first, _ = push_variant(sandbox_env, "debian-critical")
    create_scan(kubectl, namespace, "edited", first)
    before = wait_done(kubectl, namespace, ["edited"])["edited"]["status"]
    # Editing the options rescans with them; the result made with the old ones is not
    # reused, neither by this scan nor by another asking for the new options.
    kubectl("patch", "imagescan", "edited", "-n", namespace, "--type=merge",
            "-p", '{"spec": {"ignoreUnfixed": true}}')

    def rescanned(name: str, since: dict[str, Any]) -> Callable[[], dict[str, Any] | None]:
        """A Completed result of another Job than `since`'s (scannedAt has whole seconds:
        a rescan can finish within the same one)."""
        def check() -> dict[str, Any] | None:
            status = scans(kubectl, namespace)[name].get("status", {})
            return status if status.get("phase") == "Completed" and \
                status.get("jobName") != since["jobName"] else None
        return check

    after = wait_for(rescanned("edited", before), 60, "a rescan with new options")
    # (scannedWith also names the DB the result was made with: the options are these two.)
    assert {k: v for k, v in after["scannedWith"].items() if not k.startswith("db")} == {
        "scanners": ["vuln"], "ignoreUnfixed": True}
    assert after["summary"] == after["fixable"] != before["summary"]

    # A tag moved to another image: the periodic rescan resolves it again.
    _, moved_variants = push_variant(sandbox_env, "alpine-mixed", at=first)
    again = wait_for(rescanned("edited", after), 90, "the periodic rescan")
    assert again["digest"] != before["digest"]
    assert again["summary"] == counts(expected_findings(moved_variants["linux/amd64"]),
                                      fixable=True)
    assert len(jobs(kubectl, namespace)) == 3


def test_a_job_gone_while_the_operator_was_down_is_requeued(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], sandbox: Sandbox,
) -> None:
    image, variants = push_variant(sandbox_env, "all-low")
    inject(sandbox_env, "replaceCommand", "orphan", ["sleep", "120"])
    create_scan(kubectl, namespace, "orphan", image)

    def scanning() -> str | None:
        status = scans(kubectl, namespace)["orphan"].get("status", {})
        return status.get("jobName") if status.get("phase") == "Scanning" else None

    job = wait_for(scanning, 60, "the scan to run")
    sandbox.stop_operator()
    try:
        # As if its TTL ran out while nobody watched: no DELETED event will ever come.
        kubectl("delete", "job", job, "-n", OPERATOR_NAMESPACE, "--wait=true")
    finally:
        sandbox.start_operator()
    done = wait_done(kubectl, namespace, ["orphan"], timeout=180)["orphan"]
    assert_result(done, variants["linux/amd64"])
    assert done["status"]["attempts"] == 2
    assert events(kubectl, namespace, "JobLost") == {"orphan": 1}
