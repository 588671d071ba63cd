"""Secrets stay secret, the servers speak only TLS, scan pods hold no power, and a
notification receiver that hangs holds up nobody else.

Covered elsewhere and not repeated here: the push receiver refusing plain HTTP
(tests/integration/test_push.py); the scan Job's template (automountServiceAccountToken,
runAsNonRoot, read-only root, dropped capabilities: tests/integration/test_imagescans.py);
the Trivy token and registry passwords kept out of the scan Job's spec
(tests/integration/test_registry_security.py, test_imagescans.py); DingTalk and webhook
secrets kept out of the operator log, Events and status (tests/integration/test_notify.py).
New here: the gate and the CRD webhook refusing plain HTTP; the scan Pod as the API server
stored it; a hanging receiver; and the Trivy token, the push token (and a wrong one), a
registry password and a DingTalk robot's secrets kept out of the log, Events, status and
the metrics endpoint too.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

import httpx
import pytest

from conftest import Kubectl, wait_for
from scans import (
    OPERATOR_NAMESPACE,
    SCAN_LABEL,
    SCAN_NAMESPACE_LABEL,
    create_scan,
    http_server,
    operator_log,
    push_variant,
    scan_rule,
    wait_done,
)

pytestmark = [pytest.mark.reliability, pytest.mark.sandbox]
CHECKED: Counter[str] = Counter()
"""What was checked, by category: the table printed at the end of the module."""


@pytest.fixture(scope="module", autouse=True)
def counts_table(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if not CHECKED or reporter is None or capture is None:
        return
    lines = ["", "checked (tests/reliability/test_secrets_and_receivers.py):",
             *(f"  {category:<44} {count:>6}" for category, count in sorted(CHECKED.items()))]
    with capture.global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


def everywhere(kubectl: Kubectl, env: dict[str, str]) -> dict[str, str]:
    """Each place a user or an operator reads, whole: the operator's log, every Event,
    the status of every scangate object, and the metrics endpoint."""
    return {
        "operator log": operator_log(env).read_text(errors="replace"),
        "Events": kubectl("get", "events", "-A", "-o", "json"),
        "status": kubectl("get", "imagescans,scanrules,scanpolicies", "-A", "-o", "json"),
        "metrics": httpx.get(f"{env['SCANGATE_METRICS']}/metrics", timeout=10).text,
    }


def assert_kept(kubectl: Kubectl, env: dict[str, str], secrets: dict[str, str]) -> None:
    """No secret, nor its base64, appears anywhere a user or an operator reads."""
    places = everywhere(kubectl, env)
    for name, value in secrets.items():
        forms = {value, base64.b64encode(value.encode()).decode()}
        for place, text in places.items():
            CHECKED[f"secret values x places ({place})"] += 1
            for form in forms:
                assert form not in text, f"{name} appears in the {place}"


def secret(kubectl: Kubectl, namespace: str, name: str, *extra: str, **data: str) -> None:
    kubectl("create", "secret", "generic", name, "-n", namespace, *extra,
            *(f"--from-literal={k}={v}" for k, v in data.items()))


# -- TLS only ------------------------------------------------------------------------------

def test_the_gate_and_the_crd_webhook_refuse_plain_http(
    kubectl: Kubectl, sandbox_env: dict[str, str],
) -> None:
    webhook = kubectl("get", "validatingwebhookconfiguration", "scangate.dev", "-o",
                      "jsonpath={.webhooks[0].clientConfig.url}")
    gate = sandbox_env["SCANGATE_ADMISSION"]
    assert webhook.startswith("https://") and gate.startswith("https://")
    verify = ssl.create_default_context(cafile=sandbox_env["SANDBOX_CA"])
    for url in (webhook, f"{gate}/validate", f"{gate}/mutate"):
        CHECKED["servers refusing plain HTTP"] += 1
        # Something listens there, and speaks TLS with a certificate of the sandbox CA...
        answer = httpx.post(url, content=b"not json", verify=verify, timeout=10)
        assert answer.status_code == 400, (url, answer.status_code)
        # ...and never plain HTTP: an admission review would travel in the clear.
        with pytest.raises(httpx.HTTPError):
            httpx.post(url.replace("https://", "http://", 1), content=b"{}", timeout=10)


# -- Scan pods -----------------------------------------------------------------------------

def test_a_real_scan_pod_runs_non_root_with_no_service_account_token(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
) -> None:
    image, _ = push_variant(sandbox_env, "clean")
    create_scan(kubectl, namespace, "hardened", image)
    assert wait_done(kubectl, namespace, ["hardened"])["hardened"]["status"]["phase"] == \
        "Completed"
    pods = json.loads(kubectl("get", "pods", "-n", OPERATOR_NAMESPACE, "-l",
                              f"{SCAN_LABEL}=hardened,{SCAN_NAMESPACE_LABEL}={namespace}",
                              "-o", "json"))["items"]
    assert pods, "the scan's pod"
    for pod in pods:  # as the API server stored it, after its admission plugins
        CHECKED["scan pods inspected"] += 1
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False
        sources = [s for v in spec.get("volumes") or []
                   for s in (v.get("projected") or {}).get("sources") or []]
        assert not any("serviceAccountToken" in s for s in sources), spec["volumes"]
        assert {v["name"] for v in spec.get("volumes") or []} == {"work"}
        pod_context = spec["securityContext"]
        assert pod_context["runAsNonRoot"] is True and pod_context["runAsUser"] > 0
        assert pod_context["runAsGroup"] > 0
        assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context.get("runAsUser", pod_context["runAsUser"]) > 0
            assert context.get("privileged") in (None, False)
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert "add" not in context["capabilities"]
            mounts = [m["mountPath"] for m in container.get("volumeMounts") or []]
            assert not any(m.startswith("/var/run/secrets") for m in mounts), mounts
        assert not spec.get("hostNetwork") and not spec.get("hostPID")
        assert not any("hostPath" in v for v in spec.get("volumes") or [])


# -- Secrets -------------------------------------------------------------------------------

class BasicChallenger(BaseHTTPRequestHandler):
    """A registry that asks for Basic credentials and refuses whatever it gets."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).seen.append(self.headers.get("Authorization") or "")
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="registry"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *_: Any) -> None:
        pass


def test_no_secret_reaches_a_log_an_event_a_status_or_the_metrics(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
) -> None:
    env = sandbox_env
    password = f"registry-pass-{uuid.uuid4().hex}"
    wrong_token = f"someone-elses-token-{uuid.uuid4().hex}"
    BasicChallenger.seen = []
    with http_server(BasicChallenger) as challenger:
        # A registry password, used by the operator itself (and refused).
        secret(kubectl, namespace, "creds", "--type=kubernetes.io/basic-auth",
               username="ci-robot", password=password)
        kubectl.apply(scan_rule("private", f"http://{challenger}",
                                credentialsSecretRef={"name": "creds"}), namespace)
        create_scan(kubectl, namespace, "refused", f"{challenger}/team-a/app:1",
                    ruleRef={"name": "private"})
        # The Trivy token, which each scan's namespace gets a copy of.
        image, _ = push_variant(env, "clean")
        create_scan(kubectl, namespace, "scanned", image)
        done = wait_done(kubectl, namespace, ["refused", "scanned"])
    refused = done["refused"]["status"]
    assert (refused["phase"], refused["reason"]) == ("Failed", "RegistryAuthFailed"), refused
    basic = "Basic " + base64.b64encode(f"ci-robot:{password}".encode()).decode()
    assert basic in BasicChallenger.seen  # the operator did hold and use the password
    assert done["scanned"]["status"]["phase"] == "Completed"
    # The push token, and a wrong one (someone's other secret, sent by mistake).
    push = f"https://127.0.0.1:{env['PUSH_PORT']}/push"
    verify = ssl.create_default_context(cafile=env["SANDBOX_CA"])
    body = json.dumps({"image": f"{env['REGISTRY']}/nobody/app:1"}).encode()
    for token, status in ((env["PUSH_TOKEN"], 200), (wrong_token, 401)):
        answer = httpx.post(push, content=body, verify=verify, timeout=30,
                            headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == status, answer.text
    assert_kept(kubectl, env, {
        "the Trivy token": env["TRIVY_TOKEN"], "the push token": env["PUSH_TOKEN"],
        "a wrong push token": wrong_token, "a registry password": password,
        "registry Basic credentials": basic.split(" ", 1)[1]})


# -- A receiver that hangs -----------------------------------------------------------------

@contextlib.contextmanager
def hanging_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """A loopback server that accepts connections and never answers (nor reads): its
    host:port, and the connections it holds."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}", held
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


class Recorder(BaseHTTPRequestHandler):
    """A healthy webhook receiver: it keeps what it gets and answers 200."""

    bodies: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        type(self).bodies.append(json.loads(self.rfile.read(
            int(self.headers.get("Content-Length", 0)))))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


def test_a_hanging_receiver_times_out_is_recorded_and_holds_up_no_other(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
) -> None:
    env, team = sandbox_env, f"h{uuid.uuid4().hex[:8]}"
    registry = env["REGISTRY"]
    access_token = f"robot-token-{uuid.uuid4().hex}"
    signing = f"SEC{uuid.uuid4().hex}"
    hmac_key = f"hmac-{uuid.uuid4().hex}"
    push_variant(env, "all-low", at=f"{registry}/{team}-a/api:v1")
    Recorder.bodies = []
    CHECKED["hanging receivers"] += 1
    with hanging_server() as (hung, held), http_server(Recorder) as healthy:
        secret(kubectl, namespace, "hung", sign=signing,
               url=f"http://{hung}/robot/send?access_token={access_token}")
        secret(kubectl, namespace, "healthy", url=f"http://{healthy}/hook", key=hmac_key)
        kubectl.apply(json.dumps({
            "apiVersion": "scangate.dev/v1alpha1", "kind": "ScanRule",
            "metadata": {"name": "notified"},
            "spec": {"registry": {"url": f"http://{registry}"},
                     "scope": {"namespaces": [f"{team}-a"]}, "tagFilter": ".*",
                     "notifications": [
                         {"name": "hung", "type": "dingtalk", "urlSecretRef": {"name": "hung"},
                          "signingSecretRef": {"name": "hung", "key": "sign"}},
                         {"name": "healthy", "type": "webhook",
                          "urlSecretRef": {"name": "healthy"},
                          "signingSecretRef": {"name": "healthy", "key": "key"}}]}}),
            namespace)

        def receivers() -> dict[str, dict[str, Any]]:
            status = json.loads(kubectl("get", "scanrule", "notified", "-n", namespace, "-o",
                                        "json")).get("status") or {}
            return {r["name"]: r for r in status.get("notifications") or []}

        wait_for(lambda: Recorder.bodies, 120, "the healthy receiver's first message")
        # The hung robot's sends time out (the notifier's 10 s), and its status says so.
        hung_state = wait_for(lambda: (r := receivers().get("hung", {})).get("failures")
                              and r, 60, "the hung receiver's recorded failure")
        assert held, "the notifier connected to the hung receiver"
        assert hung_state["lastError"] == "the receiver did not answer in time", hung_state
        assert hung_state.get("deliveries", 0) == 0
        # Meanwhile the healthy receiver hears of the next scan as soon as it completes.
        push_variant(env, "clean", at=f"{registry}/{team}-a/api:v2")
        wait_for(lambda: len(Recorder.bodies) >= 2, 120, "the healthy receiver's next message")
        assert {b["image"].rsplit(":", 1)[1] for b in Recorder.bodies} == {"v1", "v2"}
        healthy_state = wait_for(lambda: (r := receivers().get("healthy", {})).get(
            "deliveries", 0) >= 2 and r, 30, "the healthy receiver's recorded deliveries")
        assert healthy_state["failures"] == 0 and not healthy_state.get("lastError")
        assert receivers()["hung"]["failures"] >= 1
    assert_kept(kubectl, env, {"the robot's access token": access_token,
                               "the robot's signing secret": signing,
                               "the webhook's HMAC key": hmac_key})
