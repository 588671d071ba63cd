"""Notifications to real receivers started by the tests: a DingTalk-compatible robot
over HTTPS (behind the sandbox CA, checking the signature with its own implementation
of DingTalk's algorithm) and plain HTTP webhooks (checking the HMAC)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import Kubectl, wait_for
from sandbox.advisories import load_images
from sandbox.controlplane import Sandbox
from sandbox.images import OCI_MANIFEST, Pusher, build_image
from sandbox.pki import CertificateAuthority
from scans import push_variant

pytestmark = pytest.mark.sandbox
TOKEN = "robot-access-token-" + uuid.uuid4().hex
SIGNING = "SEC" + uuid.uuid4().hex
HMAC_KEY = "hmac-" + uuid.uuid4().hex


@dataclass
class Received:
    """What a receiver got, and how it answers."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    rejected: int = 0
    fail_next: int = 0
    times: list[float] = field(default_factory=list)


def dingtalk_sign(timestamp: str, secret: str) -> str:
    """DingTalk's documented algorithm, written from its docs (not scangate's code)."""
    digest = hmac.new(secret.encode(), f"{timestamp}\n{secret}".encode(),
                      hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def receiver(received: Received, dingtalk: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if received.fail_next > 0:
                received.fail_next -= 1
                self._answer(503, {"error": "down"})
                return
            if dingtalk and not self._signed():
                received.rejected += 1
                self._answer(200, {"errcode": 310000, "errmsg": "sign not match"})
                return
            received.bodies.append(json.loads(body))
            received.headers.append(dict(self.headers) | {"_raw": body.decode()})
            received.times.append(time.monotonic())
            self._answer(200, {"errcode": 0, "errmsg": "ok"} if dingtalk else {})

        def _signed(self) -> bool:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            if query.get("access_token") != [TOKEN]:
                return False
            timestamp, sign = query.get("timestamp", [""])[0], query.get("sign", [""])[0]
            if not timestamp.isdigit() or abs(int(timestamp) / 1000 - time.time()) > 3600:
                return False
            return hmac.compare_digest(sign, dingtalk_sign(timestamp, SIGNING))

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: Any) -> None:
            pass

    return Handler


@contextlib.contextmanager
def serve(received: Received, dingtalk: bool, tls: ssl.SSLContext | None = None
          ) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), receiver(received, dingtalk))
    if tls:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture
def robot_tls(sandbox: Sandbox) -> tuple[ssl.SSLContext, str]:
    """A server certificate for 127.0.0.1 from the sandbox CA, and that CA's PEM."""
    ca = CertificateAuthority(sandbox.dir / "pki")
    pair = ca.issue(f"robot-{uuid.uuid4().hex[:6]}", "robot", server=True,
                    hosts=("127.0.0.1",))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pair.cert, pair.key)
    return context, Path(ca.cert_path).read_text()


def secret(kubectl: Kubectl, namespace: str, name: str, **data: str) -> None:
    kubectl("create", "secret", "generic", name, "-n", namespace,
            *(f"--from-literal={k}={v}" for k, v in data.items()))


def notify_rule(kubectl: Kubectl, namespace: str, name: str, registry: str, team: str,
                notifications: list[dict[str, Any]], on_push: bool = False) -> None:
    kubectl.apply(json.dumps({
        "apiVersion": "scangate.dev/v1alpha1", "kind": "ScanRule", "metadata": {"name": name},
        "spec": {"registry": {"url": f"http://{registry}"},
                 "scope": {"namespaces": [f"{team}-a"]}, "tagFilter": ".*",
                 "triggers": {"onPush": on_push}, "notifications": notifications}}), namespace)


def rule_status(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(kubectl("get", "scanrule", name, "-n", namespace,
                                                "-o", "json")).get("status") or {}
    return status


def receivers(kubectl: Kubectl, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in rule_status(kubectl, namespace, name).get("notifications")
            or []}


@pytest.fixture
def team() -> str:
    return f"n{uuid.uuid4().hex[:8]}"


def test_dingtalk_and_webhook_receivers_get_signed_messages(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], team: str,
    robot_tls: tuple[ssl.SSLContext, str],
) -> None:
    registry = sandbox_env["REGISTRY"]
    push_variant(sandbox_env, "debian-critical", at=f"{registry}/{team}-a/api:v1")
    robot, hook = Received(), Received()
    tls, ca_pem = robot_tls
    with serve(robot, True, tls) as robot_url, serve(hook, False) as hook_url:
        secret(kubectl, namespace, "robot", url=f"{robot_url}/robot/send?access_token={TOKEN}",
               sign=SIGNING)
        secret(kubectl, namespace, "wrong", url=f"{robot_url}/robot/send?access_token={TOKEN}",
               sign="SECnot-the-secret")
        secret(kubectl, namespace, "hook", url=f"{hook_url}/scangate", key=HMAC_KEY)
        notify_rule(kubectl, namespace, "notified", registry, team, [
            {"name": "robot", "type": "dingtalk", "urlSecretRef": {"name": "robot"},
             "signingSecretRef": {"name": "robot", "key": "sign"}, "caBundle": ca_pem},
            {"name": "forged", "type": "dingtalk", "urlSecretRef": {"name": "wrong"},
             "signingSecretRef": {"name": "wrong", "key": "sign"}, "caBundle": ca_pem},
            {"name": "hook", "type": "webhook", "urlSecretRef": {"name": "hook"},
             "signingSecretRef": {"name": "hook", "key": "key"}}])
        wait_for(lambda: robot.bodies and hook.bodies, 180, "both receivers")
        markdown = robot.bodies[0]["markdown"]["text"]
        assert f"{team}-a/api:v1" in markdown and "CRITICAL" in markdown, markdown
        assert re.search(r"CVE-\d+-\d+", markdown) and "sha256:" in markdown
        # The receiver checks signatures for real: a forged one is refused, and the rule
        # says so for that receiver, without the secret or the URL.
        forged = wait_for(lambda: receivers(kubectl, namespace, "notified").get(
            "forged", {}).get("failures"), 60, "the forged receiver's failure")
        assert forged and robot.rejected >= 1
        state = receivers(kubectl, namespace, "notified")
        assert "errcode 310000" in state["forged"]["lastError"]
        assert state["robot"]["deliveries"] >= 1 and state["robot"]["failures"] == 0

        payload, headers = hook.bodies[0], hook.headers[0]
        assert payload["event"] == "ScanCompleted" and payload["image"].endswith(
            f"{team}-a/api:v1")
        assert headers["X-Scangate-Event"] == "ScanCompleted"
        expected = hmac.new(HMAC_KEY.encode(), headers["_raw"].encode(),
                            hashlib.sha256).hexdigest()
        assert headers["X-Scangate-Signature"] == f"sha256={expected}"

    # No secret value anywhere a user or an operator looks.
    seen = "\n".join([
        (Path(sandbox_env["SANDBOX_DIR"]) / "logs" / "operator.log").read_text(),
        kubectl("get", "events", "-A", "-o", "json"),
        kubectl("get", "scanrules,imagescans", "-n", namespace, "-o", "json")])
    for value in (TOKEN, SIGNING, HMAC_KEY, "SECnot-the-secret"):
        assert value not in seen


def test_a_receiver_that_fails_then_recovers_gets_the_event_across_a_restart(
    kubectl: Kubectl, namespace: str, sandbox: Sandbox, sandbox_env: dict[str, str],
    team: str,
) -> None:
    registry = sandbox_env["REGISTRY"]
    push_variant(sandbox_env, "clean", at=f"{registry}/{team}-a/api:v1")
    hook = Received(fail_next=3)
    with serve(hook, False) as hook_url:
        secret(kubectl, namespace, "hook", url=f"{hook_url}/scangate")
        notify_rule(kubectl, namespace, "flaky", registry, team, [
            {"name": "hook", "type": "webhook", "urlSecretRef": {"name": "hook"}}])
        wait_for(lambda: receivers(kubectl, namespace, "flaky").get("hook", {}).get(
            "failures"), 120, "a first failure")
        sandbox.stop_operator()
        sandbox.start_operator()
        wait_for(lambda: hook.bodies, 180, "the event after the receiver recovered")
        assert hook.fail_next == 0
        assert {b["event"] for b in hook.bodies} == {"ScanCompleted"}
        keys = [b["idempotencyKey"] for b in hook.bodies]
        assert len(set(keys)) == 1  # one event, however often it was sent


def push_tags(registry: str, repository: str, tags: list[str]) -> None:
    """Many tags of one image: one scan, the rest reuse its result."""
    image = build_image({**load_images()["clean"],
                         "files": {"etc/scangate-test-id": uuid.uuid4().hex}})
    pusher = Pusher(f"http://{registry}")
    for blob in image.blobs.values():
        pusher.blob(repository, blob)
    for tag in tags:
        pusher.manifest(repository, tag, image.manifest, OCI_MANIFEST)
    pusher.close()


def test_fifty_scans_in_a_minute_send_at_most_twenty_messages_and_lose_none(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], team: str,
    robot_tls: tuple[ssl.SSLContext, str],
) -> None:
    registry = sandbox_env["REGISTRY"]
    tags = [f"t{i:02d}" for i in range(50)]
    push_tags(registry, f"{team}-a/app", tags)
    robot = Received()
    tls, ca_pem = robot_tls
    with serve(robot, True, tls) as robot_url:
        secret(kubectl, namespace, "robot", url=f"{robot_url}/robot/send?access_token={TOKEN}",
               sign=SIGNING)
        notify_rule(kubectl, namespace, "busy", registry, team, [
            {"name": "robot", "type": "dingtalk", "urlSecretRef": {"name": "robot"},
             "signingSecretRef": {"name": "robot", "key": "sign"}, "caBundle": ca_pem}])

        def accounted() -> int:
            return sum(_images_in(b["markdown"]["text"]) for b in robot.bodies)

        wait_for(lambda: accounted() >= 50, 240, "all 50 scans accounted for")
        assert accounted() == 50
        first = robot.times[0]
        assert sum(1 for t in robot.times if t - first < 60) <= 20
        assert any("more" in b["markdown"]["title"].lower() or "summary" in
                   b["markdown"]["title"].lower() for b in robot.bodies)


def _images_in(markdown: str) -> int:
    """How many scan events a message accounts for: one, or a summary's stated number."""
    found = re.search(r"\*\*(\d+) (?:more )?scan events?\*\*", markdown)
    return int(found.group(1)) if found else 1


def test_only_new_findings_is_quiet_on_the_same_findings_and_speaks_on_a_new_id(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], team: str,
) -> None:
    registry = sandbox_env["REGISTRY"]
    tag = f"{registry}/{team}-a/api:v1"
    push_variant(sandbox_env, "all-low", at=tag)
    hook = Received()
    with serve(hook, False) as hook_url:
        secret(kubectl, namespace, "hook", url=f"{hook_url}/scangate")
        notify_rule(kubectl, namespace, "news", registry, team, [
            {"name": "hook", "type": "webhook", "urlSecretRef": {"name": "hook"},
             "onlyNewFindings": True}], on_push=True)
        wait_for(lambda: len(hook.bodies) == 1, 180, "the first result's notification")

        # The same findings at a new digest: scanned again, and quiet.
        digest_before = _scan(kubectl, namespace)["status"]["digest"]
        push_variant(sandbox_env, "all-low", at=tag)
        wait_for(lambda: _recorded(_scan(kubectl, namespace), "hook")
                 and _scan(kubectl, namespace)["status"]["digest"] != digest_before, 180,
                 "the rescan, its outcome recorded for the receiver")
        assert len(hook.bodies) == 1
        # A new vulnerability ID appears: it speaks.
        push_variant(sandbox_env, "debian-critical", at=tag)
        wait_for(lambda: len(hook.bodies) == 2, 180, "the new finding's notification")
        assert hook.bodies[1]["summary"]["critical"] > 0


def _scan(kubectl: Kubectl, namespace: str) -> dict[str, Any]:
    items = json.loads(kubectl("get", "imagescans", "-n", namespace, "-o", "json"))["items"]
    assert len(items) == 1, [i["metadata"]["name"] for i in items]
    scan: dict[str, Any] = items[0]
    return scan


def _recorded(scan: dict[str, Any], receiver: str) -> bool:
    """The receiver's record names the scan's latest completion (sent, or passed over)."""
    status = scan.get("status") or {}
    when = status.get("completionTime") or status.get("scannedAt")
    key = ((status.get("notified") or {}).get(receiver) or {}).get("key", "")
    if status.get("phase") != "Completed" or not when:
        return False
    return bool(key.endswith(datetime.fromisoformat(when.replace("Z", "+00:00")).isoformat()))


def test_a_policy_receiver_hears_of_a_refused_workload(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
) -> None:
    image, _ = push_variant(sandbox_env, "debian-critical")
    hook = Received()
    name = f"blocked-{uuid.uuid4().hex[:6]}"
    with serve(hook, False) as hook_url:
        # A ScanPolicy has no namespace: its receivers' Secrets are the operator's.
        secret(kubectl, "scangate-system", name, url=f"{hook_url}/blocked", key=HMAC_KEY)
        kubectl.apply(json.dumps({
            "apiVersion": "scangate.dev/v1alpha1", "kind": "ScanPolicy",
            "metadata": {"name": name},
            "spec": {"action": "Enforce", "thresholds": {"critical": 0},
                     "match": {"namespaces": [namespace]},
                     "notifications": [{"name": "sec", "type": "webhook", "events": ["Blocked"],
                                        "urlSecretRef": {"name": name},
                                        "signingSecretRef": {"name": name, "key": "key"}}]}}))
        try:
            refused = kubectl.run("create", "deployment", "app", f"--image={image}", "-n",
                                  namespace, check=False)
            assert refused.returncode != 0
            wait_for(lambda: hook.bodies, 60, "the Blocked event")
            event = hook.bodies[0]
            assert (event["event"], event["source"]) == ("Blocked", {"kind": "ScanPolicy",
                                                                     "name": name})
            assert event["namespace"] == namespace and image in event["image"]
            assert "scan has started" in event["message"].lower() or "scanned" in event[
                "message"]
            expected = hmac.new(HMAC_KEY.encode(), hook.headers[0]["_raw"].encode(),
                                hashlib.sha256).hexdigest()
            assert hook.headers[0]["X-Scangate-Signature"] == f"sha256={expected}"
        finally:
            kubectl.run("delete", "scanpolicy", name, check=False)
            kubectl.run("delete", "secret", name, "-n", "scangate-system", check=False)
