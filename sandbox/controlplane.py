"""Start and stop the sandbox: etcd, kube-apiserver, kube-controller-manager, and a node:
the emulated node agent (the default) or a real one (containerd, kubelet, kube-scheduler,
kube-proxy: sandbox.realnode).

Every process runs in its own session with its output in DIR/logs/<name>.log, and
its pid is recorded in DIR/pids.json so that `down` stops exactly what `up` started.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sandbox.advisories import (
    BUILT_AT,
    UPDATE_BUILT_AT,
    build_db,
    expected_findings,
    load_advisories,
    load_images,
    load_update,
)
from sandbox.distribution import Registry
from sandbox.images import Pusher, build_image, platforms
from sandbox.pki import CertificateAuthority, KeyPair, client_context, service_account_keys
from sandbox.realnode import (
    PAUSE_IMAGE,
    RealNode,
    busybox_image,
    busybox_layer,
    mounts_under,
    pause_image,
)

REPO = Path(__file__).resolve().parents[1]
NODE_NAME = "sandbox-node"


_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port for a server that binds it later, from *below* the kernel's
    ephemeral range: a port from bind(0) is an ephemeral one, and in the time between
    its release and the server's bind any outgoing connection (the API server talks to
    etcd, kubectl to the API server...) may take it as its local port."""
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range")
              .read_text().split())
    while True:
        port = random.randrange(10000, low) if low > 11000 else 0
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = s.getsockname()[1]
        _handed_out.add(chosen)
        return chosen


def testbin_dir() -> Path:
    """Build (or find cached) the upstream binaries through hack/testbin."""
    out = subprocess.run(
        [str(REPO / "hack" / "testbin")], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class GateClientAuth:
    port: int
    """The first operator's gate port, the host:port the client certificate is for."""
    client: KeyPair
    apiserver_args: list[str]


def gate_client_auth(ca: CertificateAuthority, port: int) -> GateClientAuth:
    """The API server presents a client certificate of the sandbox CA when it calls the
    gate at 127.0.0.1:`port`, as README's "Admission: who may call the gate" tells a
    cluster's administrator to configure it (an AdmissionConfiguration whose webhook
    kubeconfig names the certificate for the gate's host): so that the operator started
    with --admission-client-ca-file answers the API server and nobody else. A gate that
    does not ask for a certificate is not sent one."""
    client = ca.issue("apiserver-gate-client", "kube-apiserver-gate-client", client=True)
    kubeconfig = ca.directory / "webhook-clients.kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "clusters": [], "contexts": [],
        "users": [{"name": f"127.0.0.1:{port}", "user": {
            "client-certificate": str(client.cert), "client-key": str(client.key)}}]}))
    config = ca.directory / "admission-control.json"
    config.write_text(json.dumps({
        "apiVersion": "apiserver.config.k8s.io/v1", "kind": "AdmissionConfiguration",
        "plugins": [{"name": plugin, "configuration": {
            "apiVersion": "apiserver.config.k8s.io/v1", "kind": "WebhookAdmissionConfiguration",
            "kubeConfigFile": str(kubeconfig)}}
            for plugin in ("ValidatingAdmissionWebhook", "MutatingAdmissionWebhook")]}))
    return GateClientAuth(port, client, ["--admission-control-config-file", str(config)])


def kubeconfig_yaml(server: str, ca: Path, user: KeyPair) -> str:
    return f"""apiVersion: v1
kind: Config
clusters:
- name: sandbox
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: admin
  user:
    client-certificate: {user.cert}
    client-key: {user.key}
contexts:
- name: sandbox
  context: {{cluster: sandbox, user: admin, namespace: default}}
current-context: sandbox
"""


@dataclass
class Sandbox:
    """A running (or stopped) sandbox rooted at `dir`."""

    dir: Path
    bin: Path = field(default_factory=Path)
    env: dict[str, str] = field(default_factory=dict)
    node: str = "emulated"
    """"emulated" (the node agent) or "real" (sandbox.realnode)."""
    _children: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    """The processes this object started, so that a death reports its exit status."""

    @classmethod
    def attach(cls, directory: Path) -> Sandbox:
        """A sandbox that `hack/sandbox up` already started."""
        env = load_env(directory)
        return cls(directory, Path(env["KUBECTL"]).parent, env,
                   env.get("SANDBOX_NODE", "emulated"))

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def pids_file(self) -> Path:
        return self.dir / "pids.json"

    # -- processes -----------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
               cgroups: list[Path] | None = None) -> None:
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, **(env or {})}, cwd=self.dir,
            )
        self._children[proc.pid] = proc
        pids = self._pids()
        pids.append({"name": name, "pid": proc.pid, "argv0": argv[0],
                     "started": _start_time(proc.pid)})
        self.pids_file.write_text(json.dumps(pids, indent=1))
        for procs in cgroups or []:  # before it starts children of its own
            procs.write_text(str(proc.pid))

    def _pids(self) -> list[dict[str, object]]:
        if not self.pids_file.exists():
            return []
        pids: list[dict[str, object]] = json.loads(self.pids_file.read_text())
        return pids

    def _ours(self, pid: int) -> bool:
        """Whether `pid` is still the process this sandbox started.

        A pid and its start time (set at fork, kept across exec) name one process for
        good, even after the pid is reused. The command line cannot: right after
        Popen returns, the kernel may not have mapped the new program's arguments yet,
        and /proc/PID/cmdline reads empty for a few milliseconds (longer while a large
        binary such as trivy loads from a cold page cache). Checking it once made a
        freshly started process look dead, and the start-up's failure path then killed
        the registry under the Trivy server."""
        entry = next((p for p in self._pids() if p["pid"] == pid), None)
        started = _start_time(pid)
        return entry is not None and started is not None and entry.get("started") == started

    # -- lifecycle -----------------------------------------------------------------

    def up(self, timeout: float = 120.0, operator: bool = False) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if any(self._ours(int(str(p["pid"]))) for p in self._pids()):
            raise RuntimeError(f"a sandbox is already running in {self.dir}")
        self.pids_file.unlink(missing_ok=True)
        if RealNode(self.dir).cleanup():  # what a failed `down` left
            raise RuntimeError(f"a real node's leftovers in {self.dir}: see realnode.json")
        if mounts_under(self.dir):
            raise RuntimeError(f"mounts left under {self.dir}: {mounts_under(self.dir)}")
        for state in ("etcd", "node", "registry", "trivy-server", "trivydb", "logs"):
            shutil.rmtree(self.dir / state, ignore_errors=True)  # every `up` is a new cluster
        self.bin = testbin_dir()
        try:
            self._start(timeout)
            if operator:
                self.start_operator(timeout)
        except BaseException:
            self.down()
            raise

    def _start(self, timeout: float) -> None:
        real = RealNode(self.dir) if self.node == "real" else None
        # The real node's pods reach the sandbox's servers on the node's bridge address.
        host = real.prepare() if real else "127.0.0.1"
        pki = self.dir / "pki"
        ca = CertificateAuthority(pki)
        sa = service_account_keys(pki)
        serving = ca.issue(
            "apiserver", "kube-apiserver", server=True,
            hosts=(*dict.fromkeys((host, "127.0.0.1")), "localhost", "kubernetes",
                   "kubernetes.default.svc", "10.0.0.1"),
        )
        admin = ca.issue("admin", "sandbox-admin", organizations=("system:masters",), client=True)
        kubelet_client = ca.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client",
            organizations=("system:masters",), client=True,
        )
        node = ca.issue("node", f"system:node:{NODE_NAME}", server=True, hosts=(host,))

        etcd_port, etcd_peer, api_port, node_port = (free_port() for _ in range(4))
        gate_client = gate_client_auth(ca, free_port())
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._spawn("etcd", [
            str(self.bin / "etcd"), "--name", "sandbox", "--data-dir", str(self.dir / "etcd"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"sandbox=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync", "--log-level", "warn",
        ])
        server = f"https://{host}:{api_port}"
        self._spawn("kube-apiserver", [
            str(self.bin / "kube-apiserver"),
            "--etcd-servers", etcd_url, "--etcd-prefix", f"/sandbox{self.dir}",
            "--bind-address", host, "--advertise-address", host,
            "--secure-port", str(api_port),
            "--tls-cert-file", str(serving.cert), "--tls-private-key-file", str(serving.key),
            "--client-ca-file", str(ca.cert_path),
            "--authorization-mode", "RBAC",
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(sa.cert),
            "--service-account-signing-key-file", str(sa.key),
            # Cluster IPs are routed by the real node's kube-proxy only.
            "--service-cluster-ip-range", "10.0.0.0/24",
            # Loopback is not a valid Endpoints address, so skip the kubernetes Endpoints
            # (the real node's pods reach the API server through them, on the bridge).
            "--endpoint-reconciler-type", "lease" if real else "none",
            # With no proxy, webhooks behind a Service are called at its endpoints (the node
            # agent gives serving pods addresses of their own), as aggregated APIs can be.
            "--enable-aggregator-routing=true",
            "--allow-privileged=true",
            "--kubelet-certificate-authority", str(ca.cert_path),
            "--kubelet-client-certificate", str(kubelet_client.cert),
            "--kubelet-client-key", str(kubelet_client.key),
            "--kubelet-preferred-address-types", "InternalIP",
            *gate_client.apiserver_args,
            "--profiling=false", "--v", "1",
        ])
        self.kubeconfig.write_text(kubeconfig_yaml(server, ca.cert_path, admin))
        self._wait_ready(server, ca.cert_path, admin, timeout)

        # The controllers as a cluster's run: as the user system:kube-controller-manager
        # (admission webhooks tell a controller's writes from a person's by it).
        controllers = ca.issue("controller-manager", "system:kube-controller-manager",
                               organizations=("system:masters",), client=True)
        controllers_kubeconfig = self.dir / "controller-manager.kubeconfig"
        controllers_kubeconfig.write_text(kubeconfig_yaml(server, ca.cert_path, controllers))
        self._spawn("kube-controller-manager", [
            str(self.bin / "kube-controller-manager"),
            "--kubeconfig", str(controllers_kubeconfig),
            "--leader-elect=false", "--secure-port", "0",
            "--controllers", "*",
            "--use-service-account-credentials=false",
            "--service-account-private-key-file", str(sa.key),
            "--root-ca-file", str(ca.cert_path),
            "--concurrent-gc-syncs", "5", "--v", "1",
        ])
        registry_port = free_port()
        if real:
            self._start_real_node(real, server, ca, node, host, registry_port)
        else:
            self._spawn("node-agent", [
                sys.executable, "-m", "sandbox.nodeagent",
                "--server", server, "--ca", str(ca.cert_path),
                "--client-cert", str(admin.cert), "--client-key", str(admin.key),
                "--serving-cert", str(node.cert), "--serving-key", str(node.key),
                "--port", str(node_port), "--node-name", NODE_NAME,
                "--work-dir", str(self.dir / "node"), "--faults", str(self.dir / "faults.json"),
                "--image-map", str(self._image_map()),
            ], env={"PYTHONPATH": str(REPO), "PATH": self._node_path()})

        self.env = {
            "SANDBOX_DIR": str(self.dir),
            "KUBECONFIG": str(self.kubeconfig),
            "KUBECTL": str(self.bin / "kubectl"),
            "HELM": str(self.bin / "helm"),
            "SANDBOX_CA": str(ca.cert_path),
            "GATE_PORT": str(gate_client.port),
            "SANDBOX_NODE": self.node,
            # The real node's bridge: its pods' addresses, where the sandbox's servers are.
            **({"NODE_IP": host, "NODE_SUBNET": real.state["subnet"]} if real else {}),
        }
        self._wait_controllers_and_node(server, ca.cert_path, admin, timeout)
        self._start_registry_and_trivy(timeout, host, registry_port)
        self._write_env()

    def _start_real_node(self, real: RealNode, server: str, ca: CertificateAuthority,
                         serving: KeyPair, host: str, registry_port: int) -> None:
        """containerd, kubelet, kube-scheduler and kube-proxy (sandbox.realnode); the node's
        user is bound to the system:node role (no Node authorizer runs)."""
        kubelet = ca.issue("kubelet", f"system:node:{NODE_NAME}",
                           organizations=("system:nodes",), client=True)
        node_kubeconfig = self.dir / "kubelet.kubeconfig"
        node_kubeconfig.write_text(kubeconfig_yaml(server, ca.cert_path, kubelet))
        self.env["KUBECTL"] = str(self.bin / "kubectl")
        self.kubectl("create", "clusterrolebinding", "sandbox-nodes",
                     "--clusterrole=system:node", "--group=system:nodes")
        real.start(self._spawn, ca.cert_path, node_kubeconfig, self.kubeconfig,
                   (serving.cert, serving.key), f"{host}:{registry_port}", NODE_NAME,
                   free_port())

    def _write_env(self) -> None:
        (self.dir / "env").write_text("".join(f"{k}={v}\n" for k, v in self.env.items()))

    # -- registry, Trivy DB, test images, Trivy server ---------------------------------

    def _start_registry_and_trivy(self, timeout: float, host: str, registry_port: int
                                  ) -> None:
        # The registry notifies the operator's push receiver of every push, as a real
        # registry would; it trusts the sandbox CA that issues the receiver's certificate.
        push_port, push_token = free_port(), secrets.token_hex(20)
        registry = Registry(self.dir / "registry", registry_port, bind=host,
                            notify=[f"https://127.0.0.1:{push_port}/push"],
                            notify_headers={"Authorization": [f"Bearer {push_token}"]})
        self._spawn("registry", registry.command(),
                    env={"SSL_CERT_FILE": str(self.dir / "pki" / "ca.crt")})
        self.env.update({"PUSH_PORT": str(push_port), "PUSH_TOKEN": push_token})
        self._until(registry.ready, timeout, "registry")
        pusher = Pusher(registry.url)
        archive = build_db(self.dir / "trivydb")
        db_repository = f"{registry.host}/trivy-db:2"
        pusher.trivy_db("trivy-db", "2", archive.read_bytes())
        # The real node's images: its pod sandboxes' pause, and test images that run
        # (busybox's sh and sleep beside the declared packages).
        runnable = []
        if self.node == "real":
            repository, _, tag = PAUSE_IMAGE.partition(":")
            pusher.image(repository, tag, pause_image())
            busybox = busybox_image()
            for tag in ("latest", "1.36"):
                pusher.image("library/busybox", tag, busybox)
            runnable = [busybox_layer()]
        listing = []
        for name, decl in load_images().items():
            repository, tag = f"scangate-test/{name}", "1.0"
            images = [build_image(d, platform, runnable if "platforms" not in decl else [])
                      for platform, d in platforms(decl).items()]
            if "platforms" in decl:
                pusher.index(repository, tag, images)
            else:
                pusher.image(repository, tag, images[0])
            for image, d in zip(images, platforms(decl).values(), strict=True):
                listing.append({"name": name, "image": f"{registry.host}/{repository}:{tag}",
                                "digest": image.digest,
                                **({"platform": image.platform} if "platforms" in decl else {}),
                                "expected": expected_findings(d)})
        pusher.close()
        (self.dir / "images.json").write_text(json.dumps(listing, indent=1))
        trivy = str(Path(sys.executable).parent / "trivy")
        trivy_port = free_port()
        token = secrets.token_hex(20)
        self._spawn("trivy-server", [
            trivy, "server", "--listen", f"{host}:{trivy_port}", "--insecure",
            "--db-repository", db_repository, "--cache-dir", str(self.dir / "trivy-server")],
            env={"TRIVY_TOKEN": token})
        trivy_url = f"http://{host}:{trivy_port}"
        self._until(lambda: _http_ok(httpx.get, f"{trivy_url}/healthz"), timeout, "trivy server")
        # With these exported (`set -a; . DIR/env; set +a`) a plain `trivy image` or
        # `scangate scan` uses the sandbox's Trivy server and its plain-HTTP registry.
        self.env.update({"REGISTRY": registry.host, "TRIVY": trivy,
                         "TRIVY_DB_REPOSITORY": db_repository, "TRIVY_SERVER": trivy_url,
                         "TRIVY_TOKEN": token, "TRIVY_INSECURE": "true"})

    def db_update(self, timeout: float = 60.0, restore: bool = False) -> str:
        """Publish the sandbox's next vulnerability DB (advisories.yaml and
        advisories-update.yaml, built at UPDATE_BUILT_AT) to its DB repository, and have the
        Trivy server load it: restarted, on the same port, with its DB (not its layer
        cache) removed, as a server's own hourly update would do in a cluster. `restore`:
        the first DB again (what `up` published). Returns the DB's UpdatedAt as the
        server's /version reports it."""
        built_at = BUILT_AT if restore else UPDATE_BUILT_AT
        archive = build_db(self.dir / f"trivydb-{built_at:%Y%m%d}", [
            *load_advisories(), *([] if restore else load_update())], built_at)
        pusher = Pusher(f"http://{self.env['REGISTRY']}")
        try:
            pusher.trivy_db("trivy-db", "2", archive.read_bytes())
        finally:
            pusher.close()
        command = self.stop_process("trivy-server")
        shutil.rmtree(self.dir / "trivy-server" / "db", ignore_errors=True)
        self.start_process("trivy-server", command)
        wanted = built_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        version = f"{self.env['TRIVY_SERVER']}/version"

        def loaded() -> bool:
            try:
                answer = httpx.get(version, timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return False
            return bool((answer.get("VulnerabilityDB") or {}).get("UpdatedAt") == wanted)

        self._until(loaded, timeout, "trivy server with the new DB")
        return wanted

    # -- the operator from the checkout ----------------------------------------------

    def kubectl(self, *args: str, input: str | None = None) -> str:
        out = subprocess.run([self.env["KUBECTL"], *args], input=input, capture_output=True,
                             text=True, env={**os.environ, "KUBECONFIG": str(self.kubeconfig)})
        if out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def operator_kubeconfig(self, namespace: str = "scangate-system") -> Path:
        """Credentials of the chart's ServiceAccount, bound by the chart's own RBAC."""
        self.kubectl("apply", "-f", "-", input=self.kubectl(
            "create", "namespace", namespace, "--dry-run=client", "-o", "yaml"))
        rbac = subprocess.run(
            [self.env["HELM"], "template", "scangate", str(REPO / "charts" / "scangate"),
             "--namespace", namespace, "--show-only", "templates/rbac.yaml"],
            check=True, capture_output=True, text=True).stdout
        self.kubectl("apply", "-f", "-", input=rbac)
        token = self.kubectl("create", "token", "scangate", "-n", namespace,
                             "--duration=48h").strip()
        server = self.kubectl("config", "view", "--minify", "-o",
                              "jsonpath={.clusters[0].cluster.server}")
        path = self.dir / "operator.kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "scangate",
            "clusters": [{"name": "sandbox", "cluster": {
                "server": server, "certificate-authority": str(self.dir / "pki" / "ca.crt")}}],
            "users": [{"name": "scangate", "user": {"token": token}}],
            "contexts": [{"name": "scangate", "context": {
                "cluster": "sandbox", "user": "scangate", "namespace": namespace}}]}))
        path.chmod(0o600)
        return path

    def stop_operator(self, sig: int = signal.SIGTERM, name: str = "operator") -> None:
        """Stop the operator (SIGKILL to simulate a crash); the rest keeps running."""
        pids = self._pids()
        for p in pids:
            if p["name"] == name:
                self._stop(int(str(p["pid"])), sig, grace=15)
        self.pids_file.write_text(json.dumps([p for p in pids if p["name"] != name]))

    def operator_pid(self, name: str = "operator") -> int:
        return int(str(next(p["pid"] for p in self._pids() if p["name"] == name)))

    def stop_process(self, name: str, sig: int = signal.SIGTERM, grace: float = 15
                     ) -> tuple[list[str], dict[str, str]]:
        """Stop one of the sandbox's processes by its name in pids.json (a fault: the
        registry, the Trivy server, the API server down; SIGKILL after `grace`); its
        command line and environment, as read from /proc, for start_process to start it
        again as it was."""
        pid = self.operator_pid(name)
        proc = Path(f"/proc/{pid}")
        argv = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0")[:-1]]
        env = {k: v for k, _, v in (e.decode().partition("=")
                                    for e in (proc / "environ").read_bytes().split(b"\0") if e)}
        self._stop(pid, sig, grace)
        self.pids_file.write_text(json.dumps([p for p in self._pids() if p["name"] != name]))
        return argv, env

    def start_process(self, name: str, command: tuple[list[str], dict[str, str]]) -> None:
        """Start again (same argv, same environment, so the same port) a process that
        stop_process stopped."""
        self._spawn(name, *command)

    def start_operator(self, timeout: float = 60.0, extra_args: tuple[str, ...] = (),
                       name: str = "operator") -> None:
        """Install the CRDs and run `scangate run` from the checkout with its webhooks,
        as the chart's ServiceAccount (so the tests exercise the chart's RBAC). Another
        `name` starts another replica beside it (its webhooks then take over)."""
        self.kubectl("apply", "-f", str(REPO / "crds"))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                     "-f", str(REPO / "crds"))
        kubeconfig = self.operator_kubeconfig()
        # The Trivy server's token, as the chart keeps it in the operator's namespace.
        self.kubectl("apply", "-f", "-", input=self.kubectl(
            "create", "secret", "generic", "scangate-trivy-token", "-n", "scangate-system",
            f"--from-literal=token={self.env['TRIVY_TOKEN']}", "--dry-run=client", "-o", "yaml"))
        self.kubectl("apply", "-f", "-", input=self.kubectl(
            "create", "secret", "generic", "scangate-push-token", "-n", "scangate-system",
            f"--from-literal=token={self.env['PUSH_TOKEN']}", "--dry-run=client", "-o", "yaml"))
        ca = CertificateAuthority(self.dir / "pki")
        cert = ca.issue("operator-webhook", "scangate-webhook", server=True, hosts=("127.0.0.1",))
        webhook_port, metrics_port, health_port, admission_port = (
            free_port(), free_port(), free_port(), free_port())
        if name == "operator" and self.env.get("GATE_PORT"):
            # The port the API server has a client certificate for (gate_client_auth).
            admission_port = int(self.env["GATE_PORT"])
        self._spawn(name, [
            str(Path(sys.executable).parent / "scangate"), "run",
            "--namespace", "scangate-system", "--log-format", "text",
            "--webhook-host", "127.0.0.1", "--listen-address", "127.0.0.1",
            "--webhook-port", str(webhook_port), "--metrics-port", str(metrics_port),
            "--health-port", str(health_port),
            # The registry notifies the first replica's port; another needs its own.
            "--push-port", self.env["PUSH_PORT"] if name == "operator" else str(free_port()),
            "--admission-port", str(admission_port),
            "--webhook-cert-file", str(cert.cert), "--webhook-key-file", str(cert.key),
            "--webhook-ca-file", str(ca.cert_path),
            "--insecure-registries", json.dumps([self.env["REGISTRY"]]),
            # The sandbox's registries live on loopback, which is refused by default.
            "--allowed-networks", json.dumps(["127.0.0.0/8"]),
            "--trivy-server-url", self.env["TRIVY_SERVER"],
            "--trivy-db-repository", self.env["TRIVY_DB_REPOSITORY"],
            "--trivy-insecure-db-repository", "--trivy-token-secret", "scangate-trivy-token",
            "--retry-backoff", "1s",
            # A DB the sandbox publishes (db_update) is noticed within seconds.
            "--trivy-db-check-interval", "2s",
            # Tests scrape /metrics in the clear on loopback; test_metrics_security turns
            # the default (HTTPS, authorised tokens) back on with --metrics-secure.
            "--no-metrics-secure",
            "--reconcile-interval", "1", *extra_args,
        ], env={"KUBECONFIG": str(kubeconfig)})
        self.env["SCANGATE_METRICS"] = f"http://127.0.0.1:{metrics_port}"
        self.env["SCANGATE_ADMISSION"] = f"https://127.0.0.1:{admission_port}"
        self._write_env()
        # Ready when the API server routes a bad object to the webhook and it refuses it.
        probe = ('{"apiVersion": "scangate.dev/v1alpha1", "kind": "ScanRule", "metadata": '
                 '{"name": "probe", "namespace": "default"}, "spec": {"registry": {"url": '
                 '"http://probe.invalid"}, "scope": {"namespaces": ["probe"]}, '
                 '"tagFilter": "("}}')

        def refused() -> bool:
            try:
                self.kubectl("create", "--dry-run=server", "-f", "-", input=probe)
            except RuntimeError as e:
                return "spec.tagFilter" in str(e)
            return False

        self._until(refused, timeout, "operator webhook")
        if "--no-manage-admission-configuration" not in extra_args:
            # And its gate is the one the API server calls (a second replica takes over).
            gate = f"{self.env['SCANGATE_ADMISSION']}/validate"

            def gate_current() -> bool:
                with contextlib.suppress(RuntimeError):  # not created yet
                    return self.kubectl(
                        "get", "validatingwebhookconfiguration", "scangate-workloads", "-o",
                        "jsonpath={.webhooks[0].clientConfig.url}") == gate
                return False

            self._until(gate_current, timeout, "operator gate")

    def _image_map(self) -> Path:
        """The node's images: the operator's is this checkout's `scangate` (the chart runs
        it with `args: [run]`, as the Dockerfile's entrypoint would)."""
        path = self.dir / "image-map.json"
        path.write_text(json.dumps({"scangate/scangate": [
            str(Path(sys.executable).parent / "scangate")]}))
        return path

    def _node_path(self) -> str:
        """PATH of the node's containers: the host's, plus the virtualenv (trivy lives there)."""
        return f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"

    def _client(self, ca: Path, admin: KeyPair) -> httpx.Client:
        return httpx.Client(verify=client_context(ca, admin.cert, admin.key), timeout=5)

    def _wait_ready(self, server: str, ca: Path, admin: KeyPair, timeout: float) -> None:
        with self._client(ca, admin) as client:
            self._until(lambda: _http_ok(client.get, f"{server}/readyz"), timeout,
                        "kube-apiserver")

    def _wait_controllers_and_node(
        self, server: str, ca: Path, admin: KeyPair, timeout: float
    ) -> None:
        """The default ServiceAccount proves the controllers run; a Ready Node, the agent."""

        def ready() -> bool:
            sa = client.get(f"{server}/api/v1/namespaces/default/serviceaccounts/default")
            node = client.get(f"{server}/api/v1/nodes/{NODE_NAME}")
            if sa.status_code != 200 or node.status_code != 200:
                return False
            conditions = node.json().get("status", {}).get("conditions", [])
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        with self._client(ca, admin) as client:
            self._until(ready, timeout, "controllers and node agent")

    def _until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll `check` while every process of the sandbox stays up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if check():
                return
            time.sleep(0.3)
        raise TimeoutError(f"{what} not ready after {timeout}s; see {self.dir}/logs")

    def check_alive(self) -> None:
        for p in self._pids():
            pid = int(str(p["pid"]))
            if not self._ours(pid):
                raise RuntimeError(self._death(str(p["name"]), pid))

    def _death(self, name: str, pid: int) -> str:
        """Which process died, how, and the end of its log."""
        proc = self._children.get(pid)
        code = None
        if proc:
            # A multi-threaded leader shows as a zombie before its threads are gone and
            # it can be waited for.
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(5)
        if code is None:
            how = "exited (status unknown: not started by this process)"
        elif code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with status {code}"
        log = self.dir / "logs" / f"{name}.log"
        lines = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else []
        tail = "\n".join(f"  | {line}" for line in lines) or "  | (empty log)"
        return f"{name} (pid {pid}) {how}; last lines of {log}:\n{tail}"

    def down(self, grace: float = 10.0) -> None:
        """Stop every process this sandbox started, newest first, and nothing else."""
        for p in reversed(self._pids()):
            self._stop(int(str(p["pid"])), signal.SIGTERM, grace)
        self.pids_file.unlink(missing_ok=True)
        problems = RealNode(self.dir).cleanup()
        if problems:
            raise RuntimeError("the real node was not wholly cleaned up: " + "; ".join(problems))

    def _stop(self, pid: int, sig: int, grace: float) -> None:
        """Signal one of our process groups; SIGKILL it if it outlives `grace`."""
        if self._ours(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + grace
            while self._ours(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        self._reap(pid)

    def _reap(self, pid: int) -> None:
        """Collect a child's exit status, so that no zombie is left behind."""
        proc = self._children.pop(pid, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat);
    None once it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    return None if fields[0] == "Z" else int(fields[19])


def _http_ok(get: Callable[..., httpx.Response], url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return get(url, timeout=2).status_code == 200
    return False


def load_env(directory: Path) -> dict[str, str]:
    """Read DIR/env as written by `up`."""
    env: dict[str, str] = {}
    for line in (directory / "env").read_text().splitlines():
        name, _, value = line.partition("=")
        env[name] = value
    return env
