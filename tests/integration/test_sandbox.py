"""The sandbox behaves like a cluster: real Job controller, GC, RBAC, webhooks, logs.

The same self-test holds on the real node (containerd, kubelet): run it with
SCANGATE_SANDBOX_DIR naming a sandbox started with `hack/sandbox up --node real`
(tests/realnode/test_cycles.py does)."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from conftest import Kubectl, wait_for
from sandbox.pki import CertificateAuthority

pytestmark = pytest.mark.sandbox


def get(kubectl: Kubectl, *args: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(kubectl("get", *args, "-o", "json"))
    return obj


def job_condition(kubectl: Kubectl, ns: str, name: str) -> str | None:
    conditions = get(kubectl, "-n", ns, "job", name).get("status", {}).get("conditions", [])
    for c in conditions:
        if c["type"] in ("Complete", "Failed") and c["status"] == "True":
            return str(c["type"])
    return None


def job(name: str, script: str, **pod_spec: Any) -> str:
    return json.dumps({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "busybox",
                            "command": ["sh", "-c", script],
                            "volumeMounts": pod_spec.pop("volumeMounts", [])}],
            **pod_spec}}}})


def test_job_reads_secret_and_its_logs_come_through_the_apiserver(
    kubectl: Kubectl, namespace: str
) -> None:
    kubectl("create", "secret", "generic", "creds", "-n", namespace,
            "--from-literal=token=s3cr3t-value")
    kubectl.apply(job(
        "hello", "echo hello from the node; cat /var/run/scangate-sandbox-test/token",
        volumes=[{"name": "creds", "secret": {"secretName": "creds"}}],
        volumeMounts=[{"name": "creds", "mountPath": "/var/run/scangate-sandbox-test",
                       "readOnly": True}],
    ), namespace)
    assert wait_for(lambda: job_condition(kubectl, namespace, "hello"),
                    what="job to finish") == "Complete"
    logs = kubectl("logs", "-n", namespace, "job/hello")
    assert logs.splitlines() == ["hello from the node", "s3cr3t-value"]
    # The secret was mounted in a private mount namespace, not on the host.
    assert not Path("/var/run/scangate-sandbox-test/token").exists()


def test_failing_command_fails_the_job_with_its_exit_code(
    kubectl: Kubectl, namespace: str
) -> None:
    kubectl.apply(job("boom", "echo about to fail; exit 3"), namespace)
    assert wait_for(lambda: job_condition(kubectl, namespace, "boom"),
                    what="job to finish") == "Failed"
    pods = get(kubectl, "-n", namespace, "pods", "-l", "job-name=boom")["items"]
    assert len(pods) == 1
    assert pods[0]["status"]["phase"] == "Failed"
    terminated = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["reason"] == "Error"


def test_active_deadline_kills_the_pod(kubectl: Kubectl, namespace: str) -> None:
    kubectl.apply(job("slow", "sleep 300", activeDeadlineSeconds=2), namespace)
    pod_status = wait_for(
        lambda: next((p["status"] for p in get(kubectl, "-n", namespace, "pods")["items"]
                      if p["status"].get("phase") == "Failed"), None),
        what="pod to fail")
    assert pod_status["reason"] == "DeadlineExceeded"


def test_read_only_root_and_non_root_user(kubectl: Kubectl, namespace: str) -> None:
    kubectl.apply(job(
        "hardened", "id -u; touch /should-not-exist 2>/dev/null && echo root-writable;"
        " touch /scratch/ok && echo scratch-writable",
        securityContext={"runAsUser": 65532, "runAsNonRoot": True},
        volumes=[{"name": "scratch", "emptyDir": {}}],
        volumeMounts=[{"name": "scratch", "mountPath": "/tmp/scangate-sandbox-scratch"}],
    ).replace('"volumeMounts"', '"securityContext": {"readOnlyRootFilesystem": true, '
              '"capabilities": {"drop": ["ALL"]}}, "volumeMounts"')
     .replace("/scratch/ok", "/tmp/scangate-sandbox-scratch/ok"), namespace)
    assert wait_for(lambda: job_condition(kubectl, namespace, "hardened")) == "Complete"
    assert kubectl("logs", "-n", namespace, "job/hardened").split() == [
        "65532", "scratch-writable"]


def test_deleting_an_owner_deletes_its_dependents(kubectl: Kubectl, namespace: str) -> None:
    kubectl("create", "configmap", "owner", "-n", namespace)
    uid = get(kubectl, "-n", namespace, "configmap", "owner")["metadata"]["uid"]
    kubectl.apply(json.dumps({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "dependent", "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]}}), namespace)
    kubectl("delete", "configmap", "owner", "-n", namespace)
    wait_for(lambda: kubectl.run("get", "configmap", "dependent", "-n", namespace,
                                 check=False).returncode != 0,
             what="garbage collector to delete the dependent")


def test_rbac_is_enforced_for_a_service_account(
    kubectl: Kubectl, namespace: str, tmp_path: Path
) -> None:
    kubectl("create", "serviceaccount", "reader", "-n", namespace)
    kubectl("create", "role", "cm-reader", "-n", namespace, "--verb=get,list",
            "--resource=configmaps")
    kubectl("create", "rolebinding", "reader", "-n", namespace, "--role=cm-reader",
            f"--serviceaccount={namespace}:reader")
    token = kubectl("create", "token", "reader", "-n", namespace).strip()
    # A kubeconfig with only the token: a client certificate would take precedence.
    server = kubectl("config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}")
    ca = kubectl("config", "view", "--minify", "-o",
                 "jsonpath={.clusters[0].cluster.certificate-authority}")
    reader = tmp_path / "reader.kubeconfig"
    reader.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "reader",
        "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "reader", "user": {"token": token}}],
        "contexts": [{"name": "reader", "context": {"cluster": "c", "user": "reader"}}]}))

    def as_reader(*args: str) -> int:
        return int(reader_run(*args).returncode)

    def reader_run(*args: str) -> Any:
        return kubectl.run("--kubeconfig", str(reader), "-n", namespace, *args, check=False)

    wait_for(lambda: as_reader("get", "configmaps") == 0, what="role binding to take effect")
    assert as_reader("get", "secrets") != 0
    assert as_reader("create", "configmap", "x") != 0
    assert as_reader("get", "configmaps", "-n", "default") != 0
    assert "forbidden" in reader_run("get", "secrets").stderr
    assert "system:serviceaccount:" + namespace + ":reader" in reader_run("get", "secrets").stderr


class _Recorder(BaseHTTPRequestHandler):
    reviews: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.reviews.append(review)
        obj = review["request"]["object"]
        allowed = obj.get("metadata", {}).get("labels", {}).get("verdict") != "deny"
        response: dict[str, Any] = {"uid": review["request"]["uid"], "allowed": allowed}
        if not allowed:
            response["status"] = {"code": 403, "message": "denied by the test webhook"}
        body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                           "response": response}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def webhook_server(tmp_path: Path) -> Iterator[tuple[int, str]]:
    ca = CertificateAuthority(tmp_path / "pki", name="webhook-test-ca")
    pair = ca.issue("webhook", "webhook", server=True, hosts=("127.0.0.1",))
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pair.cert, pair.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], ca.cert_path.read_text()
    server.shutdown()


def test_apiserver_calls_a_validating_webhook_and_honours_denial(
    kubectl: Kubectl, namespace: str, webhook_server: tuple[int, str]
) -> None:
    import base64

    port, ca_pem = webhook_server
    name = f"test-{namespace}"
    kubectl.apply(json.dumps({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "configmaps.test.scangate.dev", "admissionReviewVersions": ["v1"],
            "sideEffects": "None", "failurePolicy": "Fail", "timeoutSeconds": 5,
            "clientConfig": {"url": f"https://127.0.0.1:{port}/validate",
                             "caBundle": base64.b64encode(ca_pem.encode()).decode()},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["configmaps"]}],
        }]}))
    try:
        def create(name: str, verdict: str) -> Any:
            return kubectl.run("create", "-n", namespace, "-f", "-", check=False, input=json.dumps(
                {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": name, "labels": {"verdict": verdict}}}))

        # The configuration takes a moment to reach the API server's webhook cache.
        denied = wait_for(lambda: (r := create("denied", "deny")).returncode != 0 and r,
                          what="webhook to deny")
        assert "denied by the test webhook" in denied.stderr
        assert create("allowed", "allow").returncode == 0
        names = [r["request"]["name"] for r in _Recorder.reviews
                 if r["request"]["namespace"] == namespace]
        assert "allowed" in names and "denied" in names
    finally:
        kubectl("delete", "validatingwebhookconfiguration", name)


def test_faults_file_truncates_the_next_matching_pod_log(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str]
) -> None:
    if sandbox_env.get("SANDBOX_NODE") == "real":
        pytest.skip("fault injection is the emulated node agent's (DIR/faults.json)")
    faults = Path(sandbox_env["SANDBOX_DIR"]) / "faults.json"
    faults.write_text(json.dumps({"truncateLogs": [
        {"labels": {"fault-test": namespace}, "bytes": 5, "times": 1}]}))
    try:
        for name in ("first", "second"):
            manifest = json.loads(job(name, "echo 0123456789"))
            manifest["spec"]["template"]["metadata"] = {"labels": {"fault-test": namespace}}
            kubectl.apply(json.dumps(manifest), namespace)
            assert wait_for(partial(job_condition, kubectl, namespace, name)) == "Complete"
        assert kubectl("logs", "-n", namespace, "job/first") == "01234"
        assert kubectl("logs", "-n", namespace, "job/first") == "01234"  # stays truncated
        assert kubectl("logs", "-n", namespace, "job/second") == "0123456789\n"
    finally:
        faults.unlink(missing_ok=True)


def test_init_containers_env_from_configmap_projected_token_and_deletion(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str]
) -> None:
    # The emulated node's containers share the host's /tmp (a marker tells they ran and
    # were killed); a real node's have their own (their log and state tell).
    real = sandbox_env.get("SANDBOX_NODE") == "real"
    kubectl("create", "configmap", "settings", "-n", namespace, "--from-literal=GREETING=hi")
    marker = f"/tmp/scangate-sandbox-{namespace}"
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "lifecycle"},
        "spec": {
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
            "initContainers": [
                {"name": f"init{i}", "image": "busybox",
                 "command": ["sh", "-c", f"echo init{i} >> /work/order"],
                 "volumeMounts": [{"name": "work", "mountPath": "/work"}]} for i in (1, 2)],
            "containers": [{
                "name": "main", "image": "busybox",
                "command": ["sh", "-c", "cat /work/order; echo $GREETING $(POD); "
                            "test -s /var/run/secrets/kubernetes.io/serviceaccount/token "
                            f"&& echo token; touch {marker}; sleep 300; rm {marker}"],
                "env": [{"name": "POD", "valueFrom": {"fieldRef": {
                    "fieldPath": "metadata.name"}}}],
                "envFrom": [{"configMapRef": {"name": "settings"}}],
                "volumeMounts": [{"name": "work", "mountPath": "/work"}]}],
            "volumes": [{"name": "work", "emptyDir": {}}]}}
    kubectl.apply(json.dumps(pod), namespace)
    # The ServiceAccount admission plugin adds the projected kube-api-access volume.
    if real:
        wait_for(lambda: "token" in kubectl.run("logs", "-n", namespace, "lifecycle", "-c",
                                                 "main", check=False).stdout,
                 what="the main container to start")
    else:
        wait_for(lambda: Path(marker).exists(), what="the main container to start")
    logs = kubectl("logs", "-n", namespace, "lifecycle", "-c", "main")
    assert logs.split() == ["init1", "init2", "hi", "lifecycle", "token"]
    status = get(kubectl, "-n", namespace, "pod", "lifecycle")["status"]
    assert [c["state"]["terminated"]["exitCode"] for c in status["initContainerStatuses"]] == [0, 0]
    assert "running" in status["containerStatuses"][0]["state"]

    kubectl("delete", "pod", "lifecycle", "-n", namespace, "--wait=true", "--timeout=30s")
    if real:
        return
    # The process was killed (sleep never finished to remove the marker, and no sleep is left).
    assert Path(marker).exists()
    Path(marker).unlink()
    import subprocess

    left = subprocess.run(["pgrep", "-f", f"touch {marker}"], capture_output=True)
    assert left.returncode == 1
