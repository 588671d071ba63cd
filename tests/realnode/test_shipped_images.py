"""The images scangate ships, built by `make image` and run as containers on a real node
(containerd and kubelet), installed by the chart as a user installs it.

One real-node sandbox for the module: `make image SANDBOX_DIR=DIR` builds the operator
image from the Dockerfile, the malware image from Dockerfile.clamav and the scan image,
pushes them to the sandbox's registry and names them in its env file; `helm install` runs
the chart with them. Scan Jobs run in the operator's namespace (the release's), their pods
labelled scangate.dev/imagescan."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

import scans
from conftest import Kubectl, wait_for
from sandbox.advisories import load_images
from sandbox.clamav import DB_NAME, EICAR, EICAR_SIGNATURE, build_database, mirror
from sandbox.controlplane import REPO, Sandbox, load_env
from sandbox.images import Pusher, build_image, layer
from scans import admit, create_scan, jobs, push_variant, sleeper, wait_done

pytestmark = [pytest.mark.sandbox, pytest.mark.realnode]
CHART = REPO / "charts" / "scangate"
RELEASE, NAMESPACE = "scangate", "scangate-system"
SELECTOR = "app.kubernetes.io/name=scangate,app.kubernetes.io/instance=scangate"


def helm(env: dict[str, str], *args: str) -> str:
    return scans.helm(env, *args, "--namespace", NAMESPACE)


def get(kubectl: Kubectl, *args: str) -> Any:
    return json.loads(kubectl("get", *args, "-o", "json"))


def ready_pods(kubectl: Kubectl) -> list[dict[str, Any]]:
    return [p for p in get(kubectl, "pods", "-n", NAMESPACE, "-l", SELECTOR)["items"]
            if not p["metadata"].get("deletionTimestamp") and any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in p.get("status", {}).get("conditions", []))]


def holder(kubectl: Kubectl) -> str:
    lease = get(kubectl, "lease", "scangate-leader", "-n", NAMESPACE)
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


def leader_pod(kubectl: Kubectl) -> str | None:
    """The replica holding the Lease (its identity is its hostname, the pod's name, and a
    suffix)."""
    lead = holder(kubectl)
    return next((p["metadata"]["name"] for p in ready_pods(kubectl)
                 if lead.startswith(p["metadata"]["name"] + "-")), None)


def digest_of(image_id: str) -> str:
    return image_id.rsplit("@", 1)[-1]


def run_pod(kubectl: Kubectl, namespace: str, name: str, image: str, *command: str) -> str:
    """Run `command` once in a pod of `image` on the real node; its log."""
    kubectl.apply(json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [
            {"name": "main", "image": image, "command": list(command)}]}}), namespace)
    phase = wait_for(lambda: get(kubectl, "pod", name, "-n", namespace)["status"].get("phase")
                     in ("Succeeded", "Failed") and
                     get(kubectl, "pod", name, "-n", namespace)["status"]["phase"], 120,
                     f"pod {name} to finish")
    log = kubectl("logs", name, "-n", namespace)
    assert phase == "Succeeded", log
    return log


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    sandbox = Sandbox(tmp_path_factory.mktemp("realnode"), node="real")
    sandbox.up()
    try:
        yield sandbox
    finally:
        sandbox.down()


@pytest.fixture(scope="module")
def env(node: Sandbox) -> dict[str, str]:
    """`make image SANDBOX_DIR=DIR`: both images built and pushed, named in the env file."""
    started = time.monotonic()
    out = subprocess.run(["make", "image", f"SANDBOX_DIR={node.dir}"], cwd=REPO,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    print(f"\nmake image (build and push): {time.monotonic() - started:.0f}s")
    return load_env(node.dir)


@pytest.fixture(scope="module")
def k(env: dict[str, str]) -> Kubectl:
    return Kubectl(env)


@pytest.fixture(scope="module")
def release(env: dict[str, str], k: Kubectl, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Any]:
    """`helm install` with the built images; the Trivy server's token in the release's
    namespace, as an existing Trivy server's would be."""
    k("create", "namespace", NAMESPACE)
    k("create", "secret", "generic", "scangate-trivy-token", "-n", NAMESPACE,
      f"--from-literal=token={env['TRIVY_TOKEN']}")
    # The sandbox's Trivy server (on the node's bridge) behind a Service of the cluster, as
    # an existing Trivy server would be: scan pods reach it through kube-proxy's rules.
    trivy_port = int(env["TRIVY_SERVER"].rsplit(":", 1)[1])
    k.apply(json.dumps({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "sandbox-trivy"},
        "spec": {"ports": [{"name": "http", "port": 4954, "targetPort": trivy_port}]}}),
        NAMESPACE)
    k.apply(json.dumps({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "sandbox-trivy",
                     "labels": {"kubernetes.io/service-name": "sandbox-trivy"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": trivy_port}],
        "endpoints": [{"addresses": [env["NODE_IP"]]}]}), NAMESPACE)
    trivy_ip = get(k, "service", "sandbox-trivy", "-n", NAMESPACE)["spec"]["clusterIP"]
    repository, _, tag = env["SCANGATE_IMAGE"].rpartition(":")
    values = {
        "image": {"repository": repository, "tag": tag},
        # No cluster DNS runs in the sandbox: the Service by its ClusterIP.
        "trivyServer": {"enabled": False, "url": f"http://{trivy_ip}:4954",
                        "tokenSecret": "scangate-trivy-token"},
        "config": {"logFormat": "text", "trivyImage": env["SCANGATE_TRIVY_IMAGE"],
                   "insecureRegistries": [env["REGISTRY"]],
                   # The sandbox's registry is on the node's private bridge.
                   "allowedNetworks": [env["NODE_SUBNET"]], "retryBackoff": "1s",
                   "trivyDbRepository": env["TRIVY_DB_REPOSITORY"],
                   "trivyInsecureDbRepository": True},
    }
    path = tmp_path_factory.mktemp("values") / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    started = time.monotonic()
    helm(env, "install", RELEASE, str(CHART), "-f", str(path), "--wait", "--timeout", "4m")
    print(f"\nhelm install --wait: {time.monotonic() - started:.0f}s")
    return values


def test_make_image_pushes_the_images_and_names_them_in_the_env_file(
    env: dict[str, str], k: Kubectl,
) -> None:
    registry = env["REGISTRY"]
    assert env["SCANGATE_IMAGE"].startswith(f"{registry}/scangate/scangate:")
    assert env["SCANGATE_MALWARE_IMAGE"].startswith(f"{registry}/scangate/scangate-clamav:")
    assert env["SCANGATE_TRIVY_IMAGE"] == f"{registry}/aquasec/trivy:0.76.0"

    def config(image: str) -> dict[str, Any]:
        out = subprocess.run(["skopeo", "inspect", "--config", "--tls-verify=false",
                              f"docker://{image}"], capture_output=True, text=True, check=True)
        cfg: dict[str, Any] = json.loads(out.stdout)["config"]
        return cfg

    operator = config(env["SCANGATE_IMAGE"])
    assert operator["User"] == "65532:65532" and operator["Entrypoint"] == ["scangate"]
    assert config(env["SCANGATE_MALWARE_IMAGE"])["User"] == "65532:65532"
    scan = config(env["SCANGATE_TRIVY_IMAGE"])
    assert scan["Entrypoint"] == ["trivy"] and not scan.get("User")  # root, as upstream's
    ns = f"img-{uuid.uuid4().hex[:6]}"
    k("create", "namespace", ns)
    # As real containers: the operator's entrypoint, and what a scan Job's script needs.
    assert "usage: scangate" in run_pod(k, ns, "help", env["SCANGATE_IMAGE"], "scangate",
                                        "--help")
    assert run_pod(k, ns, "uid", env["SCANGATE_IMAGE"], "id", "-u").strip() == "65532"
    said = run_pod(k, ns, "trivy", env["SCANGATE_TRIVY_IMAGE"], "sh", "-c",
                   "command -v trivy gzip base64 sha256sum wc && trivy --version")
    assert "/usr/local/bin/trivy" in said and "Version: 0.76.0" in said, said


def test_the_chart_runs_two_real_replicas_leader_elected_webhooks_through_the_service(
    env: dict[str, str], k: Kubectl, release: dict[str, Any],
) -> None:
    pods = ready_pods(k)
    assert len(pods) == 2
    for pod in pods:
        status = pod["status"]["containerStatuses"][0]
        assert status["containerID"].startswith("containerd://"), status
        assert digest_of(status["imageID"]) == env["SCANGATE_IMAGE_DIGEST"], status
        container = pod["spec"]["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        name = pod["metadata"]["name"]
        # The process's real uid, and the root filesystem really read-only.
        assert k("exec", "-n", NAMESPACE, name, "--", "id", "-u").strip() == "65532"
        wrote = k.run("exec", "-n", NAMESPACE, name, "--", "touch", "/probe", check=False)
        assert wrote.returncode != 0 and "Read-only file system" in wrote.stderr, wrote.stderr
    assert wait_for(lambda: leader_pod(k), 60, "a leader among the replicas")
    gate = get(k, "validatingwebhookconfiguration", "scangate-workloads")
    assert gate["webhooks"][0]["clientConfig"]["service"] == {
        "namespace": NAMESPACE, "name": "scangate-webhook", "path": "/validate", "port": 8443}
    # kopf's webhook, through its Service: a bad ScanRule is refused naming the field.
    bad = json.dumps({
        "apiVersion": "scangate.dev/v1alpha1", "kind": "ScanRule",
        "metadata": {"name": "bad", "namespace": "default"},
        "spec": {"registry": {"url": f"http://{env['REGISTRY']}"},
                 "scope": {"namespaces": ["x"]}, "tagFilter": "("}})
    refused = k.run("create", "-f", "-", input=bad, check=False)
    assert refused.returncode != 0 and "spec.tagFilter" in refused.stderr, refused.stderr


def test_a_rules_scans_run_in_real_scan_pods_and_the_gate_refuses_admits_and_pins(
    env: dict[str, str], k: Kubectl, release: dict[str, Any],
) -> None:
    ns = f"t-{uuid.uuid4().hex[:6]}"
    k("create", "namespace", ns)
    k.apply(json.dumps({
        "apiVersion": "scangate.dev/v1alpha1", "kind": "ScanRule",
        "metadata": {"name": "test-images"},
        "spec": {"registry": {"url": f"http://{env['REGISTRY']}"},
                 "scope": {"namespaces": ["scangate-test"]}, "tagFilter": r"1\.0",
                 "triggers": {"onPush": False}}}), ns)
    expected = {"clean", "debian-critical"}

    def scanned() -> dict[str, dict[str, Any]] | None:
        current = scans.scans(k, ns)
        by_image = {s["spec"]["image"].split("/")[-1].split(":")[0]: s
                    for s in current.values()}
        done = all(s.get("status", {}).get("phase") in ("Completed", "Failed")
                   for s in current.values())
        return by_image if expected <= by_image.keys() and done else None

    by_image = wait_for(scanned, 300, "the rule's scans to finish")
    assert all(s["status"]["phase"] == "Completed" for s in by_image.values()), {
        n: s["status"] for n, s in by_image.items() if s["status"]["phase"] != "Completed"}
    assert by_image["debian-critical"]["status"]["summary"]["critical"] > 0
    assert by_image["clean"]["status"]["summary"]["total"] == 0
    # Each scan that ran (not reused) ran in a real scan pod of the built scan image,
    # in the operator's namespace.
    ran = {s["metadata"]["name"] for s in by_image.values() if not s["status"].get("reusedFrom")}
    pods = get(k, "pods", "-n", NAMESPACE, "-l", f"scangate.dev/imagescan-namespace={ns}")
    by_scan = {p["metadata"]["labels"]["scangate.dev/imagescan"]: p for p in pods["items"]}
    assert ran and ran <= by_scan.keys(), (ran, sorted(by_scan))
    for name in ran:
        status = by_scan[name]["status"]["containerStatuses"][0]
        assert status["containerID"].startswith("containerd://"), status
        assert digest_of(status["imageID"]) == env["SCANGATE_TRIVY_IMAGE_DIGEST"], status
        assert status["state"]["terminated"]["reason"] == "Completed", status

    # The gate: Enforce no criticals, pinning digests.
    k.apply(json.dumps({
        "apiVersion": "scangate.dev/v1alpha1", "kind": "ScanPolicy",
        "metadata": {"name": f"no-criticals-{ns}"},
        "spec": {"action": "Enforce", "match": {"namespaces": [ns]},
                 "thresholds": {"critical": 0}, "pinDigests": True}}))
    wait_for(lambda: k.run("get", "mutatingwebhookconfiguration", "scangate-pin-digests",
                           check=False).returncode == 0, 60, "the pinDigests webhook")
    bad = by_image["debian-critical"]["spec"]["image"]
    ok, said = admit(k, sleeper("vulnerable", bad), ns)
    assert not ok and "CVE-" in said and "critical" in said, said
    clean = by_image["clean"]["spec"]["image"]
    ok, said = admit(k, sleeper("clean", clean), ns)
    assert ok, said
    k("rollout", "status", "deployment/clean", "-n", ns, "--timeout=120s")
    pod = next(p for p in get(k, "pods", "-n", ns, "-l", "app=clean")["items"]
               if p["status"].get("phase") == "Running")
    pinned = by_image["clean"]["status"]["digest"]
    assert pod["spec"]["containers"][0]["image"] == f"{clean}@{pinned}"
    assert digest_of(pod["status"]["containerStatuses"][0]["imageID"]) == pinned


def test_the_leader_deleted_the_other_leads_within_15_s_and_every_scan_completes_once(
    env: dict[str, str], k: Kubectl, release: dict[str, Any],
) -> None:
    ns = f"ha-{uuid.uuid4().hex[:6]}"
    k("create", "namespace", ns)
    first = wait_for(lambda: leader_pod(k), 60, "a leader")
    lead = holder(k)
    names = [f"ha-{i}" for i in range(4)]
    for name in names:
        create_scan(k, ns, name, push_variant(env, "clean")[0])
    deleted = time.monotonic()
    k("delete", "pod", first, "-n", NAMESPACE, "--wait=false")
    # The other replica, or the Deployment's replacement if it wins the race.
    wait_for(lambda: holder(k) not in ("", lead), 30, "another replica to lead")
    handover = time.monotonic() - deleted
    assert handover <= 15, handover
    done = wait_done(k, ns, names, 300)
    assert all(s["status"]["phase"] == "Completed" for s in done.values()), done
    per_scan: dict[str, int] = {}
    for job in jobs(k, ns):
        scan = job["metadata"]["labels"]["scangate.dev/imagescan"]
        per_scan[scan] = per_scan.get(scan, 0) + 1
    assert per_scan == {n: 1 for n in names}, per_scan
    assert all(done[n]["status"]["attempts"] == 1 for n in names)
    print(f"\nleader handover after deleting its pod: {handover:.1f}s")


def test_a_malware_scan_runs_the_shipped_clamav_image_in_the_real_scan_pod(
    env: dict[str, str], k: Kubectl, release: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Scanner malware on the real node: the scan pod's malware step is the image `make
    image` built from Dockerfile.clamav, fetching the test signatures from a private mirror
    on the node's bridge, and it finds the EICAR string in a layer."""
    directory = tmp_path_factory.mktemp("clamav-mirror")
    build_database(directory)
    with mirror(directory, env["NODE_IP"]) as url:
        helm(env, "upgrade", RELEASE, str(CHART), "--reuse-values",
             "--set", f"config.malwareImage={env['SCANGATE_MALWARE_IMAGE']}",
             "--set", f"config.malwareDbUrl={url}",
             "--set-json", f"config.malwareDbFiles={json.dumps([DB_NAME])}",
             "--wait", "--timeout", "4m")
        wait_for(lambda: len(ready_pods(k)) == 2 and leader_pod(k), 120,
                 "the upgraded replicas")
        ns = f"mal-{uuid.uuid4().hex[:6]}"
        k("create", "namespace", ns)
        decl = {**load_images()["clean"], "files": {"etc/scangate-test-id": uuid.uuid4().hex}}
        pusher = Pusher(f"http://{env['REGISTRY']}")
        pusher.image("malware/eicar", "1", build_image(
            decl, extra_layers=[layer({"opt/app/eicar.com": EICAR})]))
        pusher.close()
        create_scan(k, ns, "eicar", f"{env['REGISTRY']}/malware/eicar:1",
                    scanners=["vuln", "malware"])
        status = wait_done(k, ns, ["eicar"], 300)["eicar"]["status"]
    assert status["phase"] == "Completed", status
    assert [(d["path"], d["signature"]) for d in status["malware"]["detections"]] == [
        ("opt/app/eicar.com", f"{EICAR_SIGNATURE}.String")], status["malware"]
    pod = get(k, "pods", "-n", NAMESPACE, "-l", f"scangate.dev/imagescan-namespace={ns}")
    step = pod["items"][0]["status"]["initContainerStatuses"][0]
    assert step["name"] == "malware" and step["containerID"].startswith("containerd://"), step
    assert digest_of(step["imageID"]) == env["SCANGATE_MALWARE_IMAGE_DIGEST"], step
    assert step["state"]["terminated"]["reason"] == "Completed", step


def test_a_scan_pod_killed_at_its_memory_limit_ends_its_scan_oomkilled(
    env: dict[str, str], k: Kubectl, release: dict[str, Any],
) -> None:
    # Trivy's client needs more than 12Mi on its own; busybox's sh runs in far less.
    helm(env, "upgrade", RELEASE, str(CHART), "--reuse-values",
         "--set", "config.scanMemoryLimit=10Mi", "--wait", "--timeout", "4m")
    wait_for(lambda: len(ready_pods(k)) == 2 and leader_pod(k), 120, "the upgraded replicas")
    ns = f"oom-{uuid.uuid4().hex[:6]}"
    k("create", "namespace", ns)
    started = time.monotonic()
    create_scan(k, ns, "big", push_variant(env, "debian-critical")[0])
    status = wait_done(k, ns, ["big"], 180)["big"]["status"]
    assert status["phase"] == "Failed" and status["reason"] == "OOMKilled", status
    assert "10Mi" in status["message"] and "scanMemoryLimit" in status["message"], status
    assert status["attempts"] == 1, status  # no retry: the same limit would kill it again
    pod = get(k, "pods", "-n", NAMESPACE, "-l", f"scangate.dev/imagescan-namespace={ns}")
    terminated = pod["items"][0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["reason"] == "OOMKilled", terminated
    print(f"\nOOMKilled scan failed after {time.monotonic() - started:.1f}s")


def test_helm_uninstall_leaves_the_crds(env: dict[str, str], k: Kubectl,
                                        release: dict[str, Any]) -> None:
    helm(env, "uninstall", RELEASE, "--wait", "--timeout", "2m")
    wait_for(lambda: not get(k, "pods", "-n", NAMESPACE, "-l", SELECTOR)["items"], 120,
             "the operator's pods to be gone")
    assert "imagescans.scangate.dev" in k("get", "crd", "-o", "name")

