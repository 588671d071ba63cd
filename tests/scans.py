"""Helpers of the ImageScan tests: test images with fresh digests, scans and their Jobs."""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from conftest import Kubectl, wait_for
from sandbox.advisories import expected_findings, load_images
from sandbox.controlplane import Sandbox
from sandbox.images import Pusher, build_image, platforms
from sandbox.nodeagent import Api

SCAN_LABEL = "scangate.dev/imagescan"
SCAN_NAMESPACE_LABEL = "scangate.dev/imagescan-namespace"
OPERATOR_NAMESPACE = "scangate-system"
"""The sandbox operator's namespace, where every scan Job runs."""
Policy = Callable[..., str]
"""The `policy` fixture: apply a ScanPolicy confined to the test's namespace."""


def push_variant(env: dict[str, str], name: str, at: str | None = None
                 ) -> tuple[str, dict[str, Any]]:
    """Push a fresh-digest variant of a named image (to the reference `at`, or a new
    tag); its reference and declaration."""
    decl = load_images()[name]
    marker = {"files": {"etc/scangate-test-id": uuid.uuid4().hex}}
    variants = {p: {**d, **marker} for p, d in platforms(decl).items()}
    pusher = Pusher(f"http://{env['REGISTRY']}")
    repository, tag = f"variants/{name}", uuid.uuid4().hex[:12]
    if at:
        repository, tag = at.split("/", 1)[1].rsplit(":", 1)
    images = [build_image(d, p) for p, d in variants.items()]
    if "platforms" in decl:
        pusher.index(repository, tag, images)
    else:
        pusher.image(repository, tag, images[0])
    pusher.close()
    return f"{env['REGISTRY']}/{repository}:{tag}", variants


def counts(findings: list[dict[str, str]], fixable: bool = False) -> dict[str, int]:
    chosen = [f for f in findings if f["fixedVersion"] or not fixable]
    by = Counter(f["severity"].lower() for f in chosen)
    return {s: by.get(s, 0) for s in ("critical", "high", "medium", "low", "unknown")} | {
        "total": len(chosen)}


def create_scan(kubectl: Kubectl, ns: str, name: str, image: str, **spec: Any) -> None:
    kubectl.apply(json.dumps({"apiVersion": "scangate.dev/v1alpha1", "kind": "ImageScan",
                              "metadata": {"name": name}, "spec": {"image": image, **spec}}), ns)


def scans(kubectl: Kubectl, ns: str) -> dict[str, dict[str, Any]]:
    items = json.loads(kubectl("get", "imagescans", "-n", ns, "-o", "json"))["items"]
    return {i["metadata"]["name"]: i for i in items}


def wait_done(kubectl: Kubectl, ns: str, names: list[str], timeout: float = 180
              ) -> dict[str, dict[str, Any]]:
    def done() -> dict[str, dict[str, Any]] | None:
        current = scans(kubectl, ns)
        finished = all(current.get(n, {}).get("status", {}).get("phase") in ("Completed", "Failed")
                       for n in names)
        return current if finished else None
    result: dict[str, dict[str, Any]] = wait_for(done, timeout, f"scans {names} to finish")
    return result


def jobs(kubectl: Kubectl, ns: str) -> list[dict[str, Any]]:
    """The scan Jobs of the ImageScans of namespace `ns` (they run in the operator's)."""
    items: list[dict[str, Any]] = json.loads(kubectl(
        "get", "jobs", "-n", OPERATOR_NAMESPACE, "-l",
        f"{SCAN_LABEL},{SCAN_NAMESPACE_LABEL}={ns}", "-o", "json"))["items"]
    return items


@contextmanager
def injected(env: dict[str, str], *faults: tuple[str, list[str], dict[str, Any]]
             ) -> Iterator[None]:
    """Node-agent faults (see sandbox.nodeagent), each (kind, scans, rule) on the next
    pod of each of the scans; what is left of them is taken out at the end."""
    path = Path(env["SANDBOX_DIR"]) / "faults.json"
    held = json.loads(path.read_text() or "{}") if path.exists() else {}
    for kind, names, rule in faults:
        held.setdefault(kind, []).extend(
            {"labels": {SCAN_LABEL: name}, "times": 1, **rule} for name in names)
    path.write_text(json.dumps(held))
    try:
        yield
    finally:
        held = json.loads(path.read_text() or "{}")
        for kind, names, _ in faults:
            held[kind] = [r for r in held.get(kind, [])
                          if r.get("labels", {}).get(SCAN_LABEL) not in names]
        path.write_text(json.dumps(held))


def events(kubectl: Kubectl, ns: str, reason: str) -> Counter[str]:
    """How many times each object had an Event of `reason`: repeats of one event are
    counted on one Event (`count`), as Kubernetes' recorder does, and counted here."""
    items = json.loads(kubectl("get", "events", "-n", ns, "-o", "json"))["items"]
    seen: Counter[str] = Counter()
    for e in items:
        if e["reason"] == reason:
            seen[e["involvedObject"]["name"]] += e.get("count") or 1
    return seen


def assert_result(scan: dict[str, Any], decl: dict[str, Any]) -> None:
    expected = expected_findings(decl)
    status = scan["status"]
    assert status["phase"] == "Completed", status
    assert status["summary"] == counts(expected), scan["metadata"]["name"]
    assert status["fixable"] == counts(expected, fixable=True), scan["metadata"]["name"]
    got = sorted(({k: f.get(k, "") for k in ("id", "package", "installedVersion",
                                              "fixedVersion", "severity")}
                  for f in status.get("findings", [])), key=lambda f: (f["id"], f["package"]))
    assert got == expected
    assert status["findingsTruncated"] is False
    assert status["scanner"]["name"] == "trivy" and status["scanner"]["version"]


def scan_rule(name: str, url: str, **registry: Any) -> str:
    """A ScanRule over `url` that scans nothing by itself (no push trigger): for
    ImageScans that name it as their ruleRef."""
    return json.dumps({
        "apiVersion": "scangate.dev/v1alpha1", "kind": "ScanRule", "metadata": {"name": name},
        "spec": {"registry": {"url": url, **registry}, "scope": {"namespaces": ["team-a"]},
                 "triggers": {"onPush": False}}})


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A real HTTP server on loopback for the test's lifetime: its host:port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def deployment(name: str, image: str, **extra: Any) -> str:
    return json.dumps({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, **extra},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "app", "image": image}]}}}})


def sleeper(name: str, image: str) -> str:
    """A Deployment whose container runs `sleep` (on the sandbox's node, a host command:
    images are not pulled there; on the real node, the test images have busybox)."""
    return json.dumps({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": {
                     "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "app", "image": image,
                                     "command": ["sleep", "3600"]}]}}}})


def admit(kubectl: Kubectl, manifest: str, namespace: str, *extra: str
          ) -> tuple[bool, str]:
    """kubectl apply: admitted or not, and what kubectl said (stderr holds warnings)."""
    out = kubectl.run("apply", "-n", namespace, *extra, "-f", "-", input=manifest,
                      check=False)
    return out.returncode == 0, out.stdout + out.stderr


def operator_log(env: dict[str, str]) -> Path:
    """The sandbox operator's log (appended to across its restarts)."""
    return Path(env["SANDBOX_DIR"]) / "logs" / "operator.log"


def log_since(env: dict[str, str], offset: int) -> str:
    """What the operator logged after `offset` (its log's size at some earlier moment)."""
    with operator_log(env).open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def metric(env: dict[str, str], name: str, labels: str) -> float:
    """A sample of the operator's metrics endpoint (0 while the series does not exist)."""
    text = httpx.get(f"{env['SCANGATE_METRICS']}/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def https(env: dict[str, str]) -> httpx.Client:
    """A client of the operator's HTTPS servers (the gate, the push receiver)."""
    return httpx.Client(verify=ssl.create_default_context(cafile=env["SANDBOX_CA"]),
                        timeout=30)


def review(namespace: str, images: list[str], dry_run: bool = True, kind: str = "Pod",
           uid: str = "") -> dict[str, Any]:
    """An AdmissionReview v1 as the API server sends it, of a pod with these images."""
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid or str(uuid.uuid4()), "kind": {"group": "", "version": "v1", "kind": kind},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": namespace, "operation": "CREATE", "dryRun": dry_run,
        "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
        "object": {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "p", "namespace": namespace},
                   "spec": {"containers": [{"name": f"c{i}", "image": image}
                                           for i, image in enumerate(images)]}}}}


def helm(env: dict[str, str], *args: str) -> str:
    """Run the sandbox's helm (against its cluster, where it talks to one); its output."""
    done = subprocess.run([env["HELM"], *args], capture_output=True, text=True,
                          env={**os.environ, **env}, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def admin_api(sandbox: Sandbox) -> Api:
    """A raw JSON client of the API server, as the sandbox's admin."""
    pki = sandbox.dir / "pki"
    server = json.loads(sandbox.kubectl("config", "view", "-o", "json", "--minify"))[
        "clusters"][0]["cluster"]["server"]
    return Api(server, str(pki / "ca.crt"), str(pki / "admin.crt"), str(pki / "admin.key"))


class RunningJobs(threading.Thread):
    """Follows every event of the scan Jobs of a namespace's ImageScans (which run in the
    operator's namespace); the most Jobs unfinished at once."""

    def __init__(self, api: Api, namespace: str) -> None:
        super().__init__(daemon=True)
        self.api, self.path = api, (f"/apis/batch/v1/namespaces/{OPERATOR_NAMESPACE}/jobs"
                                    f"?labelSelector={SCAN_NAMESPACE_LABEL}%3D{namespace}")
        self.running: dict[str, bool] = {}
        self.most = self.events = 0
        self.stop = threading.Event()

    def run(self) -> None:
        listing = self.api.get(self.path)
        assert listing is not None
        try:
            for event in self.api.watch(self.path, listing["metadata"]["resourceVersion"]):
                if self.stop.is_set():
                    return
                if event["type"] not in ("ADDED", "MODIFIED", "DELETED"):
                    continue
                job = event["object"]
                self.events += 1
                done = any(c["type"] in ("Complete", "Failed") and c["status"] == "True"
                           for c in job.get("status", {}).get("conditions") or [])
                self.running[job["metadata"]["name"]] = not done and event["type"] != "DELETED"
                self.most = max(self.most, sum(self.running.values()))
        except httpx.HTTPError:
            pass
