"""Nobody acts through the operator's rights: the tests play a hostile tenant.

- The gate's side effects (ImageScans, Events, notifications) follow only from reviews the
  API server can send: a review POSTed straight to the gate's port naming kube-system,
  the operator's namespace or an ignored one causes nothing; what a covered one causes is
  rate-limited. Optionally the gate answers only the API server's client certificate.
- A ScanRule, ImageScan or receiver that names a Secret is accepted only from a user who
  may read that Secret (a SubjectAccessReview in scangate's validating webhook).
- Break-glass admits a workload only for a user RBAC lets `use` scanpolicies/breakglass.
"""

from __future__ import annotations

import json
import ssl
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Kubectl, Tenant, wait_for
from sandbox.pki import CertificateAuthority, client_context
from scans import Policy, admit, deployment, https, metric, review, scans

pytestmark = pytest.mark.sandbox


def unscanned_image(env: dict[str, str]) -> str:
    """An image by a digest no scan has seen."""
    return f"{env['REGISTRY']}/forged/app@sha256:{uuid.uuid4().hex * 2}"


def admission_scans(kubectl: Kubectl, namespace: str, image: str) -> list[str]:
    return [name for name, s in scans(kubectl, namespace).items()
            if s["spec"].get("trigger") == "Admission" and s["spec"]["image"] == image]


def audit_events(kubectl: Kubectl, namespace: str, pod: str) -> list[dict[str, Any]]:
    items = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json"))["items"]
    return [e for e in items if e["reason"] == "PolicyAudit"
            and e["involvedObject"]["name"] == pod]


def forged(namespace: str, image: str, pod: str) -> dict[str, Any]:
    """A review as the API server would send it, but POSTed by someone else."""
    body = review(namespace, [image], dry_run=False)
    body["request"]["object"]["metadata"]["name"] = pod
    return body


@pytest.fixture
def cluster_policy(kubectl: Kubectl) -> Iterator[Callable[..., str]]:
    """Apply a ScanPolicy over the namespaces given (the `policy` fixture confines one to
    the test's namespace); all are deleted afterwards."""
    made: list[str] = []

    def apply(namespaces: list[str], **spec: Any) -> str:
        name = f"p-{uuid.uuid4().hex[:8]}"
        kubectl.apply(json.dumps({"apiVersion": "scangate.dev/v1alpha1", "kind": "ScanPolicy",
                                  "metadata": {"name": name},
                                  "spec": {**spec, "match": {"namespaces": namespaces}}}))
        made.append(name)
        return name

    yield apply
    if made:
        kubectl.run("delete", "scanpolicy", *made, "--wait=false", check=False)


# -- side effects need a caller the API server sent -----------------------------------------

def test_a_review_posted_to_the_gate_from_outside_its_namespaces_causes_nothing(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
    cluster_policy: Callable[..., str],
) -> None:
    env = sandbox_env
    ignored = f"{namespace}-ignored"
    kubectl("create", "namespace", ignored)
    kubectl("label", "namespace", ignored, "scangate.dev/ignore=true")
    try:
        outside = ["kube-system", "scangate-system", ignored, "no-such-namespace"]
        # Audit: each review is admitted and would leave a PolicyAudit Event and a scan.
        cluster_policy([*outside, namespace], action="Audit", unscanned="Deny")
        uncovered = metric(env, "scangate_admission_scans_total", 'result="uncovered"')
        sent = {ns: (unscanned_image(env), f"forged-{uuid.uuid4().hex[:6]}")
                for ns in [*outside, namespace]}
        with https(env) as client:
            def post(ns: str) -> bool:
                image, pod = sent[ns]
                answer = client.post(f"{env['SCANGATE_ADMISSION']}/validate",
                                     json=forged(ns, image, pod))
                return answer.json()["response"]["allowed"] is True

            # Once the gate holds the policy, the covered review starts its scan (one
            # however often it is sent) ...
            wait_for(lambda: post(namespace) and admission_scans(kubectl, namespace,
                                                                 sent[namespace][0]),
                     30, "the covered namespace's scan")
            for ns in outside:
                assert post(ns), ns
        # ... and its PolicyAudit Event: the side effects work ...
        wait_for(lambda: audit_events(kubectl, namespace, sent[namespace][1]), 30,
                 "its PolicyAudit Event")
        # ... and nothing happened anywhere else.
        for ns in ("kube-system", "scangate-system", ignored):
            image, pod = sent[ns]
            assert admission_scans(kubectl, ns, image) == [], ns
            assert audit_events(kubectl, ns, pod) == [], ns
        assert metric(env, "scangate_admission_scans_total",
                      'result="uncovered"') == uncovered + len(outside)
    finally:
        kubectl.run("delete", "namespace", ignored, "--wait=false", check=False)


def test_the_scans_the_gate_creates_are_rate_limited(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], policy: Policy,
    operator: Callable[..., None],
) -> None:
    operator("--admission-scan-rate", "0.001", "--admission-scan-burst", "2")
    env = sandbox_env
    policy(action="Audit", unscanned="Deny")
    images = [unscanned_image(env) for _ in range(5)]
    with https(env) as client:
        def post(image: str) -> list[str]:
            client.post(f"{env['SCANGATE_ADMISSION']}/validate",
                        json=forged(namespace, image, "p")).raise_for_status()
            return admission_scans(kubectl, namespace, image)

        # Sent until the gate holds the policy (one scan however often it is sent) ...
        wait_for(lambda: post(images[0]), 30, "the first scan")
        for image in images[1:]:  # ... then four more digests at once: one more fits
            post(image)
    wait_for(lambda: sum(bool(admission_scans(kubectl, namespace, i)) for i in images) == 2,
             30, "two scans")
    assert metric(env, "scangate_admission_scans_total", 'result="shed"') == 3
    assert metric(env, "scangate_admission_scans_total", 'result="requested"') == 2
    assert sum(bool(admission_scans(kubectl, namespace, i)) for i in images) == 2


def test_with_client_auth_the_gate_answers_only_the_api_server(
    kubectl: Kubectl, tenant: Tenant, sandbox_env: dict[str, str], policy: Policy,
    operator: Callable[..., None], tmp_path: Path,
) -> None:
    # The sandbox's API server presents a client certificate of the sandbox CA to the
    # gate's port (sandbox/controlplane.py gate_client_auth, the README's
    # AdmissionConfiguration); only now does the gate ask for one.
    env, ns = sandbox_env, tenant.namespace
    operator("--admission-client-ca-file", env["SANDBOX_CA"])
    name = policy(action="Enforce", unscanned="Deny")
    url = f"{env['SCANGATE_ADMISSION']}/validate"
    body = forged(ns, unscanned_image(env), "p")
    with https(env) as client:
        assert client.get(f"{env['SCANGATE_ADMISSION']}/readyz").status_code == 200
        for path in ("/validate", "/mutate"):
            answer = client.post(f"{env['SCANGATE_ADMISSION']}{path}", json=body)
            assert answer.status_code == 401, (path, answer.text)
            assert "client certificate" in answer.json()["error"]
    other = CertificateAuthority(tmp_path / "other-ca", name="not-the-api-server")
    stranger = other.issue("stranger", "kube-apiserver", client=True)
    context = client_context(env["SANDBOX_CA"], stranger.cert, stranger.key)
    with httpx.Client(verify=context, timeout=10) as client, pytest.raises(
            (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, ssl.SSLError)):
        client.post(url, json=body).raise_for_status()
    # The API server's own reviews still get through, and are judged.
    said = wait_for(lambda: (r := admit(tenant.kubectl, deployment("app", unscanned_image(env)),
                                        ns, "--dry-run=server"))[0] is False and r[1],
                    30, "the API server's review to be judged")
    assert f"ScanPolicy {name}" in said and "has not been scanned yet" in said, said


# -- Secrets: named only by who may read them -----------------------------------------------

def author(admin: Kubectl, tenant: Tenant) -> Kubectl:
    """A user who may write scangate's kinds in the tenant's namespace and read what `view`
    reads there, which leaves out Secrets."""
    user = f"author-{tenant.namespace}"
    admin("create", "rolebinding", "author-view", "-n", tenant.namespace, "--clusterrole=view",
          f"--user={user}")
    admin("create", "rolebinding", "author-scangate", "-n", tenant.namespace,
          "--role=tenant-scangate", f"--user={user}")
    return Kubectl({"KUBECTL": admin.binary, "KUBECONFIG": admin.env["KUBECONFIG"]},
                   as_user=user)


def rule(name: str, registry: str, creds: str | None = None,
         receivers: list[dict[str, Any]] | None = None) -> str:
    spec: dict[str, Any] = {"registry": {"url": registry}, "scope": {"namespaces": ["team-a"]},
                            "triggers": {"onPush": False}}
    if creds:
        spec["registry"]["credentialsSecretRef"] = {"name": creds}
    if receivers:
        spec["notifications"] = receivers
    return json.dumps({"apiVersion": "scangate.dev/v1alpha1", "kind": "ScanRule",
                       "metadata": {"name": name}, "spec": spec})


def test_a_secret_can_be_named_only_by_whoever_may_read_it(
    kubectl: Kubectl, tenant: Tenant, sandbox_env: dict[str, str],
) -> None:
    ns, registry = tenant.namespace, f"http://{sandbox_env['REGISTRY']}"
    tenant.kubectl("create", "secret", "generic", "team-creds", "-n", ns,
                   "--type=kubernetes.io/basic-auth", "--from-literal=username=team",
                   "--from-literal=password=team-secret")
    tenant.kubectl("create", "secret", "generic", "team-hook", "-n", ns,
                   "--from-literal=url=https://hooks.example.com/x", "--from-literal=key=k")
    writer = author(kubectl, tenant)

    def apply(who: Kubectl, manifest: str) -> tuple[bool, str]:
        return admit(who, manifest, ns)

    # Credentials to a registry of the author's choice: refused, naming the field.
    ok, said = apply(writer, rule("steal", "https://attacker.example.com", creds="team-creds"))
    assert not ok, said
    assert "spec.registry.credentialsSecretRef" in said
    assert f"author-{ns} may not get Secret {ns}/team-creds" in said
    # A receiver whose signing key is any Secret's value: refused, naming the field.
    hook = {"name": "mine", "type": "webhook", "urlSecretRef": {"name": "team-hook"},
            "signingSecretRef": {"name": "team-creds", "key": "password"}}
    ok, said = apply(writer, rule("oracle", registry, receivers=[hook]))
    assert not ok and "spec.notifications[0].signingSecretRef" in said, said
    assert "spec.notifications[0].urlSecretRef" in said  # team-hook: not readable either
    # An ImageScan through a rule with credentials the author cannot read.
    ok, said = apply(tenant.kubectl, rule("team", registry, creds="team-creds"))
    assert ok, said  # the tenant has `edit`: it may read its namespace's Secrets
    scan = json.dumps({"apiVersion": "scangate.dev/v1alpha1", "kind": "ImageScan",
                       "metadata": {"name": "borrowed"},
                       "spec": {"image": f"{sandbox_env['REGISTRY']}/team-a/app:1",
                                "ruleRef": {"name": "team"}}})
    ok, said = apply(writer, scan)
    assert not ok and "spec.ruleRef" in said and "team-creds" in said, said
    # What was accepted stays accepted for whoever may edit it (a scan-now, a relabel) ...
    writer("annotate", "scanrule", "team", "-n", ns, "scangate.dev/scan-now=1", "--overwrite")
    writer("label", "scanrule", "team", "-n", ns, "team=a")
    # ... but not the credentials sent elsewhere.
    ok, said = apply(writer, rule("team", "https://attacker.example.com", creds="team-creds"))
    assert not ok and "spec.registry.credentialsSecretRef" in said, said
    # Granted `get` on that one Secret, the author may name it.
    kubectl.apply(json.dumps({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "read-team-creds", "namespace": ns},
        "rules": [{"apiGroups": [""], "resources": ["secrets"],
                   "resourceNames": ["team-creds"], "verbs": ["get"]}]}))
    kubectl("create", "rolebinding", "read-team-creds", "-n", ns, "--role=read-team-creds",
            f"--user=author-{ns}")
    ok, said = apply(writer, rule("allowed", registry, creds="team-creds"))
    assert ok, said
    ok, said = apply(writer, scan)
    assert ok, said


# -- break-glass: RBAC decides -------------------------------------------------------------

def test_break_glass_is_honoured_only_for_users_rbac_lets_use_it(
    kubectl: Kubectl, tenant: Tenant, sandbox_env: dict[str, str], policy: Policy,
) -> None:
    ns = tenant.namespace
    name = policy(action="Enforce", unscanned="Deny", breakGlass={"enabled": True})
    glass = deployment("hotfix", unscanned_image(sandbox_env),
                       annotations={"scangate.dev/break-glass": "INC-4711 hotfix"})
    ok, said = admit(tenant.kubectl, glass, ns)
    assert not ok, said
    assert (f"break-glass (INC-4711 hotfix) not honoured for ScanPolicy {name}: RBAC does "
            f"not let tenant-{ns} use scanpolicies/breakglass {name} in namespace {ns}") \
        in said
    # Granted in the namespace, by a RoleBinding naming the policy.
    kubectl.apply(json.dumps({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "break-glass", "namespace": ns},
        "rules": [{"apiGroups": ["scangate.dev"], "resources": ["scanpolicies/breakglass"],
                   "resourceNames": [name], "verbs": ["use"]}]}))
    kubectl("create", "rolebinding", "break-glass", "-n", ns, "--role=break-glass",
            f"--user=tenant-{ns}")
    # The refusal above is remembered for up to 10 s.
    said = wait_for(lambda: (r := admit(tenant.kubectl, glass, ns))[0] and r[1], 30,
                    "break-glass to be honoured")
    assert f"break-glass used (INC-4711 hotfix): ScanPolicy {name}" in said
    event = wait_for(lambda: next((e for e in json.loads(kubectl(
        "get", "events", "-n", ns, "-o", "json"))["items"] if e["reason"] == "BreakGlass"),
        None), 30, "the BreakGlass Event")
    assert event["involvedObject"]["name"] == "hotfix"
    assert f"used by tenant-{ns}" in event["message"] and name in event["message"]
