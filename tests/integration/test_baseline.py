"""Baseline checks and secrets end to end (issue 27): images built here, scanned by the real
Trivy in the operator's scan Jobs, judged by the admission gate under ScanPolicies with
`secrets: Deny` and `misconfig.denyChecks`, with kubectl as the client. The AWS key set in
the image's ENV is random per run, and must appear nowhere scangate writes."""

from __future__ import annotations

import json
import secrets
import string
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_local_scan import scan as local_scan

import sarif_schema
from conftest import Kubectl, wait_for
from sandbox.advisories import expected_findings, load_images
from sandbox.images import Pusher, build_image
from scangate.core.framing import decode
from scans import (
    OPERATOR_NAMESPACE,
    Policy,
    admit,
    deployment,
    jobs,
    operator_log,
    push_variant,
    scans,
)

pytestmark = pytest.mark.sandbox
BASE = "/bin/sh -c #(nop) ADD file:5d673d25da3a14ce1f6cf66e4c7fd4f4b85a3759a9d9 in / "


def random_key() -> str:
    """An AWS-secret-shaped value no rule allows as an example."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))


def push_built(env: dict[str, str], name: str, config: dict[str, Any],
               history: list[str]) -> str:
    """A Debian image (the `clean` declaration: no CVE) with this run config and build
    history, of a fresh digest; its reference."""
    decl = {**load_images()["clean"], "files": {"etc/scangate-test-id": uuid.uuid4().hex}}
    image = build_image(decl, config=config, history=[
        {"created_by": line, "created": "2026-12-01T00:00:00Z",
         **({"empty_layer": True} if "#(nop)" in line and "ADD" not in line else {})}
        for line in history])
    pusher = Pusher(f"http://{env['REGISTRY']}")
    repository, tag = f"baseline/{name}", uuid.uuid4().hex[:12]
    pusher.image(repository, tag, image)
    pusher.close()
    return f"{env['REGISTRY']}/{repository}:{tag}"


def risky_and_clean(env: dict[str, str], key: str) -> tuple[str, str]:
    risky = push_built(env, "root-with-key", {
        "User": "", "Env": ["PATH=/usr/bin:/bin", f"AWS_SECRET_ACCESS_KEY={key}"]},
        [BASE, f"/bin/sh -c #(nop)  ENV AWS_SECRET_ACCESS_KEY={key}",
         '/bin/sh -c #(nop)  CMD ["/bin/sh"]'])
    clean = push_built(env, "clean", {"User": "65532"},
                       [BASE, "/bin/sh -c #(nop)  USER 65532",
                        "/bin/sh -c #(nop)  HEALTHCHECK CMD [\"/bin/true\"]",
                        '/bin/sh -c #(nop)  CMD ["/bin/sh"]'])
    return risky, clean


def gate_scans(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]]:
    return [s for s in scans(kubectl, namespace).values()
            if s["spec"].get("trigger") == "Admission"]


def scanned_by_the_gate(kubectl: Kubectl, namespace: str, images: list[str],
                        scanners: set[str], app: str) -> dict[str, dict[str, Any]]:
    """Ask the gate to admit each image as `app` (refused: unscanned, it starts a scan), and
    wait for the scans; they must run `scanners`, what the policies need."""
    for image in images:
        ok, said = admit(kubectl, deployment(app, image), namespace)
        assert not ok and "A scan has started" in said, said

    def done() -> dict[str, dict[str, Any]] | None:
        by_image = {image: [s for s in gate_scans(kubectl, namespace)
                            if s["spec"]["image"].startswith(image + "@")
                            and set(s["spec"].get("scanners") or ["vuln"]) == scanners]
                    for image in images}
        if not all(len(found) == 1 and found[0].get("status", {}).get("phase") in (
                "Completed", "Failed") for found in by_image.values()):
            return None
        return {image: found[0] for image, found in by_image.items()}

    result: dict[str, dict[str, Any]] = wait_for(done, 240, f"the gate's scans with {scanners}")
    for scan in result.values():
        assert scan["status"]["phase"] == "Completed", scan["status"]
    return result


@contextmanager
def receiver() -> Iterator[tuple[str, list[str]]]:
    """A webhook receiver on loopback: its URL, and the bodies it got."""
    bodies: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/blocked", bodies
    finally:
        server.shutdown()


def test_a_root_image_with_a_key_in_env_is_refused_by_secrets_deny_and_by_ds_0002(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], policy: Policy,
) -> None:
    key = random_key()
    risky, clean = risky_and_clean(sandbox_env, key)
    name = f"secrets-{uuid.uuid4().hex[:6]}"
    with receiver() as (url, bodies):
        # A ScanPolicy's receivers' Secrets are in the operator's namespace.
        kubectl("create", "secret", "generic", name, "-n", OPERATOR_NAMESPACE,
                f"--from-literal=url={url}")
        kubectl.apply(json.dumps({
            "apiVersion": "scangate.dev/v1alpha1", "kind": "ScanPolicy",
            "metadata": {"name": name},
            "spec": {"action": "Enforce", "secrets": "Deny",
                     "match": {"namespaces": [namespace]},
                     "notifications": [{"name": "sec", "type": "webhook", "events": ["Blocked"],
                                        "urlSecretRef": {"name": name}}]}}))
        try:
            # The gate's scans run the scanners the policy needs: secret (and vuln).
            results = scanned_by_the_gate(kubectl, namespace, [risky, clean],
                                          {"vuln", "secret"}, "app")
            status = results[risky]["status"]
            found = {(s["ruleID"], s["target"], s.get("field")) for s in status["secrets"]}
            assert ("aws-secret-access-key", "image config",
                    "Env AWS_SECRET_ACCESS_KEY") in found, status["secrets"]
            assert status["secretSummary"]["total"] == len(status["secrets"]) >= 1
            assert "failedChecks" not in status  # misconfig did not run
            assert results[clean]["status"]["secretSummary"]["total"] == 0
            # At a glance.
            table = kubectl("get", "imagescans", "-n", namespace)
            assert "BASELINE" in table.splitlines()[0], table
            assert f" {len(status['secrets'])} secret" in table, table

            ok, said = admit(kubectl, deployment("app", risky), namespace)
            assert not ok, said
            for expected in (f"ScanPolicy {name}", "secrets found", "aws-secret-access-key",
                             "image config (Env AWS_SECRET_ACCESS_KEY)", "remove the secrets"):
                assert expected in said, (expected, said)
            ok, said = admit(kubectl, deployment("app", clean), namespace)
            assert ok, said
            wait_for(lambda: bodies, 60, "the Blocked notification")
            assert "aws-secret-access-key" in bodies[-1] or "secrets found" in bodies[-1], bodies
        finally:
            kubectl.run("delete", "scanpolicy", name, check=False)
            kubectl.run("delete", "secret", name, "-n", OPERATOR_NAMESPACE, check=False)

        # The same images under a policy that names the root-user check: their results
        # were made without the misconfig scanner, so they count as unscanned until the
        # gate's new scans have run it.
        checks = policy(action="Enforce", misconfig={"denyChecks": ["DS-0002"]})
        said = wait_for(lambda: (lambda r: None if r[0] else r[1])(admit(
            kubectl, deployment("app2", risky), namespace, "--dry-run=server")), 30,
            "the gate to have the policy")
        assert "was scanned without the misconfig" in said, said
        results = scanned_by_the_gate(kubectl, namespace, [risky, clean],
                                      {"vuln", "misconfig"}, "app2")
        assert "DS-0002" in {c["id"] for c in results[risky]["status"]["failedChecks"]}
        assert "DS-0002" not in {c["id"] for c in results[clean]["status"]["failedChecks"]}
        ok, said = admit(kubectl, deployment("app2", risky), namespace)
        assert not ok, said
        for expected in (f"ScanPolicy {checks}", "check DS-0002 failed",
                         "Image user should not be 'root'", "image config"):
            assert expected in said, (expected, said)
        ok, said = admit(kubectl, deployment("app2", clean), namespace)
        assert ok, said
        table = kubectl("get", "imagescans", "-n", namespace)
        assert " checks" in table, table

        # The key's value: nowhere in status, Events, notifications, logs or metrics.
        places = {
            "status": kubectl("get", "imagescans", "-n", namespace, "-o", "json"),
            "events": kubectl("get", "events", "-A", "-o", "json"),
            "notifications": "\n".join(bodies),
            "operator log": operator_log(sandbox_env).read_text(errors="replace"),
            "metrics": httpx.get(f"{sandbox_env['SCANGATE_METRICS']}/metrics",
                                 timeout=10).text,
        }
        for job in jobs(kubectl, namespace):
            log = kubectl("logs", "-n", OPERATOR_NAMESPACE, f"job/{job['metadata']['name']}")
            places[f"log of {job['metadata']['name']}"] = log
            frames = decode(log)
            assert "report" in frames
            places[f"report of {job['metadata']['name']}"] = frames["report"].decode()
        assert len(places) >= 7
        for where, text in places.items():
            assert key not in text, f"the key's value is in the {where}"


def test_a_local_scan_reports_checks_secrets_and_vex_in_json_table_and_sarif(
    sandbox_env: dict[str, str], tmp_path: Path,
) -> None:
    key = random_key()
    risky, clean = risky_and_clean(sandbox_env, key)
    policy = tmp_path / "policy.yaml"
    policy.write_text("apiVersion: scangate.dev/v1alpha1\nkind: ScanPolicy\n"
                      "metadata: {name: baseline}\nspec: {secrets: Deny, misconfig: "
                      "{denyChecks: [DS-0002]}}\n")
    # The policy asks for the scanners it needs: no --scanners.
    blocked = local_scan(sandbox_env, risky, "--policy", str(policy), "--format", "json")
    assert blocked.returncode == 1, blocked.stderr
    found = json.loads(blocked.stdout)
    assert "DS-0002" in {c["id"] for c in found["failedChecks"]}
    assert "aws-secret-access-key" in {s["ruleID"] for s in found["secrets"]}
    assert {"check DS-0002 failed", f"{len(found['secrets'])} secrets found"} <= set(
        found["decision"]["violations"][0]["counts"]), found["decision"]
    table = local_scan(sandbox_env, risky, "--policy", str(policy))
    assert table.returncode == 1 and "DS-0002" in table.stdout and "BLOCKED" in table.stdout
    sarif = local_scan(sandbox_env, risky, "--policy", str(policy), "--format", "sarif")
    log = json.loads(sarif.stdout)
    assert [e.message for e in sarif_schema.validator().iter_errors(log)] == []
    rules = {r["ruleId"] for r in log["runs"][0]["results"]}
    assert {"DS-0002", "secret/aws-secret-access-key"} <= rules, rules
    for out in (blocked, table, sarif):
        assert key not in out.stdout + out.stderr
    passed = local_scan(sandbox_env, clean, "--policy", str(policy))
    assert passed.returncode == 0 and "PASS" in passed.stdout, passed.stdout + passed.stderr

    # --vex: a not_affected statement suppresses a CVE, counted apart and named.
    bad, variants = push_variant(sandbox_env, "debian-critical")
    critical = sorted({f["id"] for f in expected_findings(variants["linux/amd64"])
                       if f["severity"] == "CRITICAL"})
    document = tmp_path / "app.openvex.json"
    document.write_text(json.dumps({
        "@context": "https://openvex.dev/ns/v0.2.0", "@id": "https://scangate.dev/vex/t",
        "author": "tests", "timestamp": "2026-12-01T00:00:00Z", "version": 1,
        "statements": [{"vulnerability": {"name": vid},
                        "products": [{"@id": "pkg:oci/debian-critical"}],
                        "status": "not_affected", "justification": "component_not_present"}
                       for vid in critical]}))
    strict = tmp_path / "strict.yaml"
    strict.write_text("apiVersion: scangate.dev/v1alpha1\nkind: ScanPolicy\n"
                      "metadata: {name: strict}\nspec: {thresholds: {critical: 0}}\n")
    assert local_scan(sandbox_env, bad, "--policy", str(strict)).returncode == 1
    vexed = local_scan(sandbox_env, bad, "--policy", str(strict), "--vex", str(document),
                       "--format", "json")
    assert vexed.returncode == 0, vexed.stdout + vexed.stderr
    found = json.loads(vexed.stdout)
    assert sorted(f["id"] for f in found["suppressedFindings"]) == critical
    assert {f["source"] for f in found["suppressedFindings"]} == {"app.openvex.json"}
    assert found["summary"]["critical"] == 0
