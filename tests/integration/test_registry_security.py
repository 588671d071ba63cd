"""Registry access that cannot be turned against its owners: the tests play the attacker."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from conftest import Kubectl
from sandbox.advisories import load_images
from sandbox.controlplane import REPO, free_port
from sandbox.distribution import Registry
from sandbox.images import Pusher, build_image
from sandbox.pki import CertificateAuthority
from scans import SCAN_LABEL, assert_result, create_scan, http_server, jobs, scan_rule, wait_done

pytestmark = pytest.mark.sandbox


class BasicChallenger(BaseHTTPRequestHandler):
    """A host that asks every visitor for Basic credentials, and notes what it gets."""

    seen: ClassVar[list[dict[str, str]]] = []

    def do_GET(self) -> None:
        type(self).seen.append(dict(self.headers))
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="give me your password"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def challenger() -> Iterator[tuple[str, list[dict[str, str]]]]:
    BasicChallenger.seen = []
    with http_server(BasicChallenger) as host:
        yield host, BasicChallenger.seen


def test_a_rules_credentials_never_go_to_another_host(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
    challenger: tuple[str, list[dict[str, str]]],
) -> None:
    attacker, seen = challenger
    kubectl("create", "secret", "generic", "team-creds", "-n", namespace,
            "--type=kubernetes.io/basic-auth", "--from-literal=username=team",
            "--from-literal=password=team-secret")
    kubectl.apply(scan_rule("team", f"http://{sandbox_env['REGISTRY']}",
                       credentialsSecretRef={"name": "team-creds"}), namespace)
    refused = kubectl.run("apply", "-n", namespace, "-f", "-", check=False, input=json.dumps({
        "apiVersion": "scangate.dev/v1alpha1", "kind": "ImageScan",
        "metadata": {"name": "steal"},
        "spec": {"image": f"{attacker}/team-a/app:1", "ruleRef": {"name": "team"}}}))
    assert refused.returncode != 0
    assert "spec.image" in refused.stderr and "not the registry of ScanRule team" in \
        refused.stderr
    # A rule that does not exist is no way around it.
    missing = kubectl.run("apply", "-n", namespace, "-f", "-", check=False, input=json.dumps({
        "apiVersion": "scangate.dev/v1alpha1", "kind": "ImageScan",
        "metadata": {"name": "steal2"},
        "spec": {"image": f"{attacker}/team-a/app:1", "ruleRef": {"name": "nope"}}}))
    assert missing.returncode != 0 and "spec.ruleRef" in missing.stderr
    assert seen == []  # not even asked


def test_a_private_ca_given_in_the_rule_reaches_trivy(
    kubectl: Kubectl, namespace: str, tmp_path: Path,
) -> None:
    ca = CertificateAuthority(tmp_path / "pki", name="team-private-ca")
    registry = Registry(tmp_path / "registry", free_port(), tls=ca)
    registry.start()
    try:
        decl = load_images()["alpine-mixed"]
        pusher = Pusher(registry.url, verify=ssl.create_default_context(
            cafile=str(ca.cert_path)))
        pusher.image("team-a/app", "1.0", build_image(decl))
        pusher.close()
        kubectl.apply(scan_rule("private-ca", registry.url, caBundle=ca.cert_path.read_text()),
                      namespace)
        create_scan(kubectl, namespace, "tls", f"{registry.host}/team-a/app:1.0",
                    ruleRef={"name": "private-ca"})
        done = wait_done(kubectl, namespace, ["tls"])["tls"]
        assert_result(done, decl)
        container = jobs(kubectl, namespace)[0]["spec"]["template"]["spec"]["containers"][0]
        assert {"name": "SCANGATE_REGISTRY_CA", "value": ca.cert_path.read_text()} in \
            container["env"]
    finally:
        registry.stop()


CAN = [
    ("get", "imagescans.scangate.dev"), ("list", "imagescans.scangate.dev"),
    ("watch", "imagescans.scangate.dev"), ("patch", "imagescans.scangate.dev", "status"),
    ("get", "scanrules.scangate.dev"), ("watch", "scanrules.scangate.dev"),
    ("patch", "scanrules.scangate.dev", "status"), ("create", "imagescans.scangate.dev"),
    ("delete", "imagescans.scangate.dev"),
    ("get", "secrets"), ("create", "events"), ("patch", "events"),
    # Secure metrics: who a scraper's token belongs to.
    ("create", "tokenreviews.authentication.k8s.io"),
    ("create", "validatingwebhookconfigurations.admissionregistration.k8s.io"),
    ("patch", "validatingwebhookconfigurations.admissionregistration.k8s.io/scangate.dev"),
    ("patch",
     "validatingwebhookconfigurations.admissionregistration.k8s.io/scangate-workloads"),
    ("patch",
     "mutatingwebhookconfigurations.admissionregistration.k8s.io/scangate-pin-digests"),
    ("delete",
     "mutatingwebhookconfigurations.admissionregistration.k8s.io/scangate-pin-digests"),
    ("list", "scanpolicies.scangate.dev"), ("watch", "scanpolicies.scangate.dev"),
    ("patch", "scanpolicies.scangate.dev", "status"),
    # Whether a requester may read the Secrets it names, or break the glass.
    ("create", "subjectaccessreviews.authorization.k8s.io"),
    ("list", "namespaces"), ("watch", "namespaces"),
    # The inventory of what runs: every Pod, watched (never read one by one).
    ("list", "pods"), ("watch", "pods"),
    # Its own ClusterRole owns the webhook configurations it writes (test_helm_install).
    ("get", "clusterroles.rbac.authorization.k8s.io/scangate"),
    ("get", "validatingwebhookconfigurations.admissionregistration.k8s.io/scangate.dev"),
    ("patch", "mutatingwebhookconfigurations.admissionregistration.k8s.io/scangate.dev"),
]
# In the operator's namespace only: leader election, and the scan Jobs, their pods' logs
# and their copies of registry credentials (never in a tenant's namespace).
CAN_THERE = [("create", "leases.coordination.k8s.io"),
             ("update", "leases.coordination.k8s.io/scangate-leader"),
             ("get", "leases.coordination.k8s.io/scangate-leader"),
             ("create", "jobs.batch"), ("get", "jobs.batch"), ("list", "jobs.batch"),
             ("watch", "jobs.batch"), ("patch", "jobs.batch"), ("delete", "jobs.batch"),
             ("get", "pods", "log"), ("create", "secrets")]
CANNOT = [
    ("list", "secrets"), ("watch", "secrets"), ("patch", "secrets/team-creds"),
    ("delete", "secrets/scangate-trivy-token"), ("create", "secrets"),
    ("patch", "secrets/scangate-trivy-token"), ("create", "jobs.batch"),
    ("list", "jobs.batch"), ("get", "pods"), ("get", "pods", "log"),
    ("update", "imagescans.scangate.dev"), ("patch", "imagescans.scangate.dev"),
    ("update", "scanrules.scangate.dev"), ("delete", "scanrules.scangate.dev"),
    ("delete", "jobs.batch"),
    ("create", "pods"), ("create", "pods", "exec"), ("get", "configmaps"),
    ("patch", "validatingwebhookconfigurations.admissionregistration.k8s.io/other"),
    ("delete", "validatingwebhookconfigurations.admissionregistration.k8s.io/scangate.dev"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"), ("patch", "namespaces"),
    ("get", "clusterroles.rbac.authorization.k8s.io/admin"),
    ("update", "scanpolicies.scangate.dev"), ("patch", "scanpolicies.scangate.dev"),
    ("delete", "namespaces"),
    ("create", "localsubjectaccessreviews.authorization.k8s.io"),
    ("create", "leases.coordination.k8s.io"), ("update", "leases.coordination.k8s.io/other"),
]


def _can(kubectl: Kubectl, verb: str, resource: str, subresource: str = "",
         namespace: str | None = None) -> bool:
    extra = [f"--subresource={subresource}"] if subresource else []
    where = ["-n", namespace] if namespace else ["--all-namespaces"]
    answer = kubectl.run("auth", "can-i", verb, resource, *extra, *where,
                         "--as=system:serviceaccount:scangate-system:scangate", check=False)
    return answer.stdout.strip() == "yes"


@pytest.mark.parametrize("check", CAN_THERE, ids=[" ".join(c) for c in CAN_THERE])
def test_the_operator_runs_scans_and_elects_a_leader_in_its_own_namespace_only(
        kubectl: Kubectl, check: tuple[str, str]) -> None:
    assert _can(kubectl, *check, namespace="scangate-system")
    assert not _can(kubectl, *check, namespace="default")


@pytest.mark.parametrize("check", CAN, ids=[" ".join(c) for c in CAN])
def test_the_operator_can_do_what_its_work_needs(kubectl: Kubectl, check: tuple[str, ...]
                                                 ) -> None:
    assert _can(kubectl, *check)


@pytest.mark.parametrize("check", CANNOT, ids=[" ".join(c) for c in CANNOT])
def test_the_operator_cannot_do_more(kubectl: Kubectl, check: tuple[str, ...]) -> None:
    assert not _can(kubectl, *check)


def test_the_trivy_server_answers_only_with_its_token(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], tmp_path: Path,
) -> None:
    image = next(i["image"] for i in json.loads(
        (Path(sandbox_env["SANDBOX_DIR"]) / "images.json").read_text()) if i["name"] == "clean")
    without = subprocess.run(
        [sandbox_env["TRIVY"], "image", "--server", sandbox_env["TRIVY_SERVER"], "--insecure",
         "--quiet", "--cache-dir", str(tmp_path), image],
        capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "TRIVY_TOKEN"})
    assert without.returncode != 0 and "invalid token" in without.stderr
    # Scan Jobs run in the operator's namespace and read the token there, never from
    # their spec; no copy of it reaches the scan's namespace.
    create_scan(kubectl, namespace, "tokened", image)
    assert wait_done(kubectl, namespace, ["tokened"])["tokened"]["status"]["phase"] == \
        "Completed"
    job = jobs(kubectl, namespace)[0]
    assert job["metadata"]["namespace"] == "scangate-system"
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "TRIVY_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "scangate-trivy-token", "key": "token"}}} in env
    assert sandbox_env["TRIVY_TOKEN"] not in json.dumps(env)
    secrets = json.loads(kubectl("get", "secrets", "-n", namespace, "-o", "json"))["items"]
    assert sandbox_env["TRIVY_TOKEN"] not in json.dumps(secrets)


def test_no_probing_of_metadata_link_local_or_the_api_server(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
) -> None:
    server = kubectl("config", "view", "--minify", "-o",
                     "jsonpath={.clusters[0].cluster.server}").split("://", 1)[1]
    probes = {"metadata": "169.254.169.254/latest/meta-data:1",
              "link-local": "169.254.7.7/x/y:1", "api-server": f"{server}/api/v1:1"}
    for name, image in probes.items():
        create_scan(kubectl, namespace, name, image)
    done = wait_done(kubectl, namespace, list(probes), timeout=60)
    for name in probes:
        status = done[name]["status"]
        assert (status["phase"], status["reason"]) == ("Failed", "RegistryRefused"), name
    assert "cloud metadata" in done["metadata"]["status"]["message"]
    assert "link-local" in done["link-local"]["status"]["message"]
    assert "API server" in done["api-server"]["status"]["message"]
    assert jobs(kubectl, namespace) == []


def test_the_chart_lets_only_scan_pods_reach_the_trivy_server(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
) -> None:
    rendered = subprocess.run(
        [sandbox_env["HELM"], "template", "scangate", str(REPO / "charts" / "scangate"),
         "--namespace", namespace, "--show-only", "templates/trivy-server.yaml"],
        check=True, capture_output=True, text=True).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(rendered) if d}
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == docs["StatefulSet"]["spec"]["selector"][
        "matchLabels"]
    peer = policy["ingress"][0]["from"][0]
    # The labels every scan pod carries (scanning.job), in the release's namespace only:
    # the same labels on a pod in a tenant's namespace let nothing in.
    assert "namespaceSelector" not in peer
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "scangate"}
    assert peer["podSelector"]["matchExpressions"] == [
        {"key": SCAN_LABEL, "operator": "Exists"}]
    assert policy["ingress"][0]["ports"] == [{"port": 4954}]
    env = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "TRIVY_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "scangate-trivy-token", "key": "token"}}} in env
    # What the chart renders, the API server accepts.
    kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=rendered)
