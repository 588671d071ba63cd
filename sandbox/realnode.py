"""A real node for the sandbox: containerd, kubelet, kube-scheduler and kube-proxy.

`hack/sandbox up --node real` runs it instead of the emulated node agent (which binds
every pod to itself, so the two never run side by side). Everything the node changes on
the machine is recorded in DIR/realnode.json *before* it is changed, so that `down`
undoes exactly that, even after a failed start:

- a bridge with a private /24 of its own: the node's address (the kubelet refuses a
  loopback node IP) and the pods' (the CNI bridge plugin with `isGateway: false`, no
  masquerade). Pods get a route to the Service range through the host and no default
  route, and `net.ipv4.ip_forward` is left as it is: no packet can leave the machine.
  The registry, the Trivy server and the API server listen on the bridge address;
- the kernel settings the kubelet insists on (`protectKernelDefaults`: it checks them
  instead of changing them itself), restored as they were;
- the cgroups of the pods (the kubelet's `cgroupRoot`) and of containerd and its shims;
- the mounts under DIR (container root filesystems, volumes, network namespaces);
- kube-proxy's iptables chains, and the few paths outside DIR that the kubelet and
  containerd write whatever they are told (/var/lib/kubelet/device-plugins,
  /var/log/containers, /run/containerd/s), removed when they were not there before.

One real node at a time per machine: kube-proxy's chains and those fixed paths are
machine-wide (/run/scangate-realnode names the sandbox that holds it).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.images import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Image, layer, sha256

REPO = Path(__file__).resolve().parents[1]
CGROUPS = Path("/sys/fs/cgroup")
LOCK = Path("/run/scangate-realnode")
SERVICE_RANGE = "10.0.0.0/24"
PAUSE_IMAGE = "scangate/pause:3.10"
RUNC = os.environ.get("SCANGATE_RUNC", "/usr/sbin/runc")  # Debian's runc 1.1.5
CNI_BIN = "/usr/lib/cni"
KERNEL_DEFAULTS = {
    # What the kubelet's protectKernelDefaults requires (and would otherwise set itself).
    "vm/overcommit_memory": "1", "vm/panic_on_oom": "0", "kernel/panic": "10",
    "kernel/panic_on_oops": "1", "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}
WATCHED_SYSCTLS = (*KERNEL_DEFAULTS, "net/ipv4/ip_forward", "net/ipv4/conf/all/route_localnet",
                   "net/netfilter/nf_conntrack_max", "net/bridge/bridge-nf-call-iptables")
"""Kernel settings the node could change; `down` leaves each as it was (the test checks)."""
HOST_PATHS = ("/var/lib/kubelet", "/var/log/containers", "/var/log/pods", "/run/containerd",
              "/var/lib/cni", "/opt/containerd")
"""Paths outside DIR the kubelet or containerd may create whatever their configuration.
(/usr/libexec/kubernetes is kube-controller-manager's, in either mode: not the node's.)"""
MNT_DETACH = 2


def node_testbin() -> Path:
    out = subprocess.run([str(REPO / "hack" / "testbin"), "--node"], check=True,
                         stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def read_sysctl(name: str) -> str | None:
    with contextlib.suppress(OSError):
        return (Path("/proc/sys") / name).read_text().strip()
    return None


def write_sysctl(name: str, value: str) -> None:
    (Path("/proc/sys") / name).write_text(value)


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below `directory`, deepest first."""
    prefix = str(directory).rstrip("/") + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")  # octal escapes (\040)
        if point.startswith(prefix) or point == str(directory):
            points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def bridges() -> set[str]:
    return {p.name for p in Path("/sys/class/net").iterdir() if (p / "bridge").exists()}


def iptables_chains() -> dict[str, list[str]]:
    """`iptables-save`'s chains per (command, table), KUBE-* ones only."""
    chains: dict[str, list[str]] = {}
    for command in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            out = subprocess.run([f"{command}-save", "-t", table], capture_output=True,
                                 text=True).stdout
            chains[f"{command}/{table}"] = sorted(
                line[1:].split()[0] for line in out.splitlines()
                if line.startswith(":KUBE-"))
    return chains


def pause_binary() -> Path:
    """hack/pause built with Go (static), cached by its source's digest."""
    source = REPO / "hack" / "pause"
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(source.iterdir()))
                            ).hexdigest()[:12]
    cache = Path(os.environ.get("SCANGATE_CACHE", Path.home() / ".cache" / "scangate"))
    binary = cache / "images" / f"pause-{digest}"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o",
                        f"{binary}.part", "."], cwd=source, check=True,
                       env={**os.environ, "CGO_ENABLED": "0"})
        os.replace(f"{binary}.part", binary)
    return binary


def image_of(layers: list[tuple[bytes, str]], config: dict[str, Any]) -> Image:
    body = json.dumps({"architecture": "amd64", "os": "linux", "config": config,
                       "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]}},
                      sort_keys=True).encode()
    blobs = {sha256(body): body, **{sha256(blob): blob for blob, _ in layers}}
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(body), "size": len(body)},
        "layers": [{"mediaType": OCI_LAYER, "digest": sha256(b), "size": len(b)}
                   for b, _ in layers]}, sort_keys=True).encode()
    return Image(manifest, blobs)


def pause_image() -> Image:
    return image_of([layer({"pause": pause_binary().read_bytes()}, 0o755)],
                    {"Entrypoint": ["/pause"], "User": "65535:65535"})


def busybox_image() -> Image:
    """`busybox` as the tests name it (docker.io/library/busybox, served by the sandbox's
    registry as the node's mirror of docker.io): Debian's busybox-static, every applet."""
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    return image_of([layer({"bin/busybox": Path("/bin/busybox").read_bytes()}, 0o755,
                           {f"bin/{a}": "busybox" for a in applets if a != "busybox"},
                           {"tmp": 0o1777})],
                    {"Cmd": ["sh"], "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]})


def busybox_layer() -> tuple[bytes, str]:
    """Debian's busybox-static as /bin/busybox with /bin/sh and /bin/sleep: what makes a
    test image runnable on the real node (no package database: no finding of its own)."""
    return layer({"bin/busybox": Path("/bin/busybox").read_bytes()}, 0o755,
                 {"bin/sh": "busybox", "bin/sleep": "busybox"})


@dataclass
class RealNode:
    """The real node of the sandbox in `dir`; its record is DIR/realnode.json."""

    dir: Path
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def record(self) -> Path:
        return self.dir / "realnode.json"

    @property
    def work(self) -> Path:
        return self.dir / "realnode"

    def _save(self) -> None:
        self.record.write_text(json.dumps(self.state, indent=1))

    def load(self) -> bool:
        if not self.record.exists():
            return False
        self.state = json.loads(self.record.read_text())
        return True

    # -- before the control plane: the bridge and the kernel settings -------------------

    def prepare(self) -> str:
        """Take the machine's real-node lock, make the bridge, set the kubelet's kernel
        settings; the bridge address (the node's, and where the sandbox's servers listen)."""
        if os.geteuid() != 0:
            raise RuntimeError("the real node needs root (bridges, mounts, cgroups)")
        for tool in (RUNC, f"{CNI_BIN}/bridge", f"{CNI_BIN}/host-local", f"{CNI_BIN}/loopback"):
            if not Path(tool).exists():
                raise RuntimeError(f"the real node needs {tool} (hack/deps installs it)")
        if LOCK.exists():
            holder = Path(LOCK.read_text().strip())
            if holder != self.dir and (holder / "pids.json").exists() and any(
                    _alive(p) for p in json.loads((holder / "pids.json").read_text())):
                raise RuntimeError(f"a real node already runs on this machine ({holder}); "
                                   "one at a time (kube-proxy's iptables chains are global)")
        LOCK.write_text(str(self.dir))
        tag = hashlib.sha256(str(self.dir).encode()).hexdigest()[:6]
        self.state = {
            "lock": True,
            "bridge": f"sgbr-{tag}",
            "cgroup": f"scangate-{tag}",
            "sysctls": {name: read_sysctl(name) for name in WATCHED_SYSCTLS},
            "chains": iptables_chains(),
            "host_paths": [p for p in HOST_PATHS if not Path(p).exists()],
        }
        subnet = self._free_subnet()
        self.state["subnet"] = str(subnet)
        self.state["ip"] = str(subnet.network_address + 1)
        self._save()
        bridge = self.state["bridge"]
        if bridge in bridges():
            _run("ip", "link", "del", bridge)
        self.state["bridge_made"] = True
        self._save()
        _run("ip", "link", "add", bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.state['ip']}/{subnet.prefixlen}", "dev", bridge)
        _run("ip", "link", "set", bridge, "up")
        for name, value in KERNEL_DEFAULTS.items():
            if read_sysctl(name) != value:
                write_sysctl(name, value)
        return str(self.state["ip"])

    def _free_subnet(self) -> ipaddress.IPv4Network:
        """A /24 of 10.200.0.0/16 that no route or address of the machine overlaps."""
        used: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for line in subprocess.run(["ip", "-4", "route", "show", "table", "all"],
                                   capture_output=True, text=True).stdout.splitlines():
            word = line.split()[0] if line.split() else ""
            if word in ("local", "broadcast", "unreachable"):
                word = line.split()[1]
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(word, strict=False))
        candidates = list(ipaddress.IPv4Network("10.200.0.0/16").subnets(new_prefix=24))
        random.shuffle(candidates)
        for net in candidates:
            if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
                return net
        raise RuntimeError("no free /24 in 10.200.0.0/16 for the node's bridge")

    # -- after the API server: containerd, kubelet, scheduler, proxy ---------------------

    def start(self, spawn: Any, ca: Path, node_kubeconfig: Path,
              admin_kubeconfig: Path, serving: tuple[Path, Path], registry: str,
              node_name: str, kubelet_port: int) -> None:
        """Start the node's processes through `spawn` (the sandbox's, so that pids.json
        has them and `down` stops them by pid). `registry` is host:port of the sandbox's
        plain-HTTP registry, where the pause image will be."""
        binaries = node_testbin()
        work = self.work
        for sub in ("containerd", "kubelet", "cni", "cni-ipam", "pod-logs", "runc", "certs.d"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        # A unix socket's path has at most 107 bytes, which a pytest basetemp can exceed:
        # containerd's sockets go to a short directory of their own, removed by `down`.
        sockets = Path(f"/run/{self.state['cgroup']}")
        self.state["sockets"] = str(sockets)
        self._save()
        sockets.mkdir(mode=0o700, exist_ok=True)
        sock = sockets / "containerd.sock"
        # The kubelet's sockets live in its root directory (pod-resources, plugins): it is
        # DIR/realnode/kubelet seen through a bind mount at the short path.
        kubelet_root = sockets / "kubelet"
        kubelet_root.mkdir(exist_ok=True)
        _run("mount", "--bind", str(work / "kubelet"), str(kubelet_root))
        hosts = work / "certs.d" / registry
        hosts.mkdir(parents=True, exist_ok=True)
        (hosts / "hosts.toml").write_text(
            f'server = "http://{registry}"\n[host."http://{registry}"]\n'
            '  capabilities = ["pull", "resolve"]\n')
        # docker.io's images (`busybox` in the sandbox's self-test) from the sandbox's
        # registry: the machine reaches no public registry, and must not try.
        mirror = work / "certs.d" / "docker.io"
        mirror.mkdir(parents=True, exist_ok=True)
        (mirror / "hosts.toml").write_text(
            f'server = "http://{registry}"\n[host."http://{registry}"]\n'
            '  capabilities = ["pull", "resolve"]\n')
        cri = 'plugins."io.containerd.cri.v1'
        (work / "containerd.toml").write_text(f"""version = 3
root = "{work}/containerd/root"
state = "{work}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile", "io.containerd.nri.v1.nri",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{work}/containerd/opt"
[{cri}.images"]
  snapshotter = "overlayfs"
  [{cri}.images".pinned_images]
    sandbox = "{registry}/{PAUSE_IMAGE}"
  [{cri}.images".registry]
    config_path = "{work}/certs.d"
[{cri}.runtime"]
  enable_selinux = false
  netns_mounts_under_state_dir = true
  # The kubelet asks for -998 for pod sandboxes; lowering a score needs CAP_SYS_RESOURCE,
  # which a machine (a VM, a container) may withhold: no lower than containerd's own.
  restrict_oom_score_adj = true
  [{cri}.runtime".containerd]
    default_runtime_name = "runc"
    [{cri}.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.runtime".containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        Root = "{work}/runc"
        SystemdCgroup = false
  [{cri}.runtime".cni]
    bin_dirs = ["{CNI_BIN}"]
    conf_dir = "{work}/cni"
""")
        subnet = ipaddress.ip_network(self.state["subnet"])
        hosts_ = list(subnet.hosts())
        (work / "cni" / "10-sandbox.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": self.state["bridge"], "plugins": [{
                "type": "bridge", "bridge": self.state["bridge"], "isGateway": False,
                "isDefaultGateway": False, "ipMasq": False, "hairpinMode": True,
                "ipam": {"type": "host-local", "dataDir": str(work / "cni-ipam"),
                         "ranges": [[{"subnet": str(subnet), "rangeStart": str(hosts_[9]),
                                      "rangeEnd": str(hosts_[-1])}]],
                         # Services only, through the host (kube-proxy's rules); no
                         # default route: nothing beyond the machine is reachable.
                         "routes": [{"dst": SERVICE_RANGE, "gw": self.state["ip"]}]}}]}))
        # containerd and its shims in a cgroup of their own, so that `down` finds every
        # shim (they outlive containerd by design).
        self.state["runtime_cgroup"] = f"{self.state['cgroup']}-runtime"
        self._save()
        runtime_cgroups = self._make_cgroup(self.state["runtime_cgroup"])
        spawn("containerd", [str(binaries / "containerd"), "--config",
                             str(work / "containerd.toml")],
              {"PATH": f"{binaries}:{os.environ.get('PATH', '/usr/bin:/bin')}"},
              runtime_cgroups)
        self._wait_socket(sock, self.dir / "logs" / "containerd.log")

        cert, key = serving
        self._make_cgroup(self.state["cgroup"])  # the kubelet's cgroupRoot must exist
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False, "protectKernelDefaults": True,
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{self.state['cgroup']}",
            "containerRuntimeEndpoint": f"unix://{sock}",
            "address": self.state["ip"], "port": kubelet_port, "readOnlyPort": 0,
            "healthzPort": 0, "tlsCertFile": str(cert), "tlsPrivateKeyFile": str(key),
            "authentication": {"x509": {"clientCAFile": str(ca)},
                               "webhook": {"enabled": False}, "anonymous": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "podLogsDir": str(work / "pod-logs"),
            "volumePluginDir": str(work / "kubelet" / "volume-plugins"),
            "failSwapOn": False, "serializeImagePulls": False,
            "resolvConf": "/etc/resolv.conf",
            # A shared test machine: no evictions for a nearly full disk or a busy memory.
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "fileCheckFrequency": "5s", "syncFrequency": "5s",
        }
        (work / "kubelet.yaml").write_text(json.dumps(config))
        spawn("kubelet", [
            str(binaries / "kubelet"), "--config", str(work / "kubelet.yaml"),
            "--kubeconfig", str(node_kubeconfig), "--root-dir", str(kubelet_root),
            "--node-ip", self.state["ip"], "--hostname-override", node_name, "--v", "1",
        ], {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}, None)
        spawn("kube-scheduler", [
            str(binaries / "kube-scheduler"), "--kubeconfig", str(admin_kubeconfig),
            "--authentication-kubeconfig", str(admin_kubeconfig),
            "--authorization-kubeconfig", str(admin_kubeconfig),
            "--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", "0",
            "--v", "1"], None, None)
        proxy_config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(admin_kubeconfig)},
            "mode": "iptables", "hostnameOverride": node_name,
            "clusterCIDR": self.state["subnet"], "bindAddress": self.state["ip"],
            "healthzBindAddress": "", "metricsBindAddress": "",
            # Leave the machine's conntrack settings and route_localnet alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False},
            "nodePortAddresses": [self.state["subnet"]],
        }
        (work / "kube-proxy.yaml").write_text(json.dumps(proxy_config))
        spawn("kube-proxy", [str(binaries / "kube-proxy"), "--config",
                             str(work / "kube-proxy.yaml"), "--v", "1"], None, None)

    def _make_cgroup(self, name: str) -> list[Path]:
        """`name` in every cgroup v1 hierarchy (and the unified one): its cgroup.procs."""
        made = []
        for hierarchy in sorted(CGROUPS.iterdir()):
            if hierarchy.is_dir() and (hierarchy / "cgroup.procs").exists():
                group = hierarchy / name
                group.mkdir(exist_ok=True)
                for inherited in ("cpuset.cpus", "cpuset.mems"):  # empty: no task may join
                    if (group / inherited).exists() and not (group / inherited).read_text().strip():
                        (group / inherited).write_text((hierarchy / inherited).read_text())
                made.append(group / "cgroup.procs")
        return made

    @staticmethod
    def _wait_socket(sock: Path, log: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sock.exists():
                return
            time.sleep(0.05)
        raise TimeoutError(f"containerd socket {sock} not there after {timeout}s; see {log}")

    # -- down ---------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Undo what the record says, after the sandbox stopped its processes: kill what
        is left in the node's cgroups (pods, shims), unmount, remove the cgroups, the
        bridge, the iptables chains and the host paths it made, restore the kernel
        settings. What could not be undone is returned (and kept in the record)."""
        if not self.load():
            return []
        problems: list[str] = []
        groups = [g for g in (self.state.get("cgroup"), self.state.get("runtime_cgroup")) if g]
        self._kill_cgroups(groups)
        libc = ctypes.CDLL(None, use_errno=True)
        short = [Path(self.state["sockets"])] if self.state.get("sockets") else []
        for _ in range(10):  # mounts can be stacked on one point (propagation): again
            points = [p for d in short for p in mounts_under(d)] + mounts_under(self.dir)
            if not points:
                break
            for point in points:
                libc.umount2(point.encode(), MNT_DETACH)
        else:
            problems += [f"umount {p}: still mounted" for d in [*short, self.dir]
                         for p in mounts_under(d)]
        for group in groups:
            problems += self._remove_cgroup(group)
        bridge = self.state.get("bridge")
        if self.state.get("bridge_made") and bridge in bridges():
            # Pod veths went with their network namespaces; any left go with the bridge.
            for port in Path(f"/sys/class/net/{bridge}/brif").glob("*"):
                subprocess.run(["ip", "link", "del", port.name], capture_output=True)
            if subprocess.run(["ip", "link", "del", bridge], capture_output=True).returncode:
                problems.append(f"bridge {bridge} not removed")
        if "chains" in self.state:
            problems += self._remove_chains(self.state["chains"])
        for name, value in self.state.get("sysctls", {}).items():
            if value is not None and read_sysctl(name) != value:
                try:
                    write_sysctl(name, value)
                except OSError as e:
                    problems.append(f"sysctl {name}: {e}")
        for path in self.state.get("host_paths", []):
            if Path(path).exists() and not mounts_under(Path(path)):
                shutil.rmtree(path, ignore_errors=True)
        for d in short:
            if not mounts_under(d):
                shutil.rmtree(d, ignore_errors=True)
        if self.work.exists() and not mounts_under(self.work):
            shutil.rmtree(self.work, ignore_errors=True)
        if problems:
            self.state["problems"] = problems
            self._save()
            return problems
        if self.state.get("lock") and LOCK.exists() and LOCK.read_text().strip() == str(self.dir):
            LOCK.unlink()
        self.record.unlink()
        return []

    def _cgroup_dirs(self, name: str) -> list[Path]:
        """Every cgroup directory at or below `name`, in every hierarchy, deepest first."""
        dirs = []
        for hierarchy in CGROUPS.iterdir():
            top = hierarchy / name
            if top.is_dir():
                dirs += [Path(d) for d, _, _ in os.walk(top)]
        return sorted(dirs, key=lambda d: -len(d.parts))

    def _kill_cgroups(self, names: list[str], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = set()
            for name in names:
                for d in self._cgroup_dirs(name):
                    with contextlib.suppress(OSError):
                        pids |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def _remove_cgroup(self, name: str) -> list[str]:
        problems = []
        for d in self._cgroup_dirs(name):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)  # the kernel frees a dying cgroup asynchronously
            else:
                problems.append(f"cgroup {d} not removed")
        return problems

    def _remove_chains(self, before: dict[str, list[str]]) -> list[str]:
        """kube-proxy's (and the kubelet's canary) chains that were not there before."""
        binaries = node_testbin()
        subprocess.run([str(binaries / "kube-proxy"), "--cleanup"], capture_output=True,
                       timeout=60)
        problems = []
        for where, chains in iptables_chains().items():
            command, table = where.split("/")
            new = [c for c in chains if c not in before.get(where, [])]
            if not new:
                continue
            rules = subprocess.run([f"{command}-save", "-t", table], capture_output=True,
                                   text=True).stdout.splitlines()
            for rule in rules:  # the jumps into them first, then the chains themselves
                if rule.startswith("-A ") and any(f"-j {c}" in rule for c in new):
                    subprocess.run([command, "-t", table, "-D", *rule[3:].split()],
                                   capture_output=True)
            for c in new:
                subprocess.run([command, "-t", table, "-F", c], capture_output=True)
            for c in new:
                if subprocess.run([command, "-t", table, "-X", c],
                                  capture_output=True).returncode:
                    problems.append(f"{command} -t {table} chain {c} not removed")
        return problems


def _alive(entry: dict[str, Any]) -> bool:
    try:
        stat = Path(f"/proc/{entry['pid']}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0] != "Z" and int(fields[19]) == entry.get("started")


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")


# -- what a real node may leave on the machine (read before `up` and after `down`) -----

def processes_naming(directory: Path) -> list[str]:
    """Processes whose command line names `directory` (every process of a sandbox does:
    its state, sockets and configuration live there)."""
    found = []
    needle = str(directory).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            words = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{proc.name}: {words}")
    return found


def machine_state(directory: Path) -> dict[str, Any]:
    return {
        "processes": processes_naming(directory),
        "mounts": mounts_under(directory),
        "bridges": sorted(b for b in bridges() if b.startswith("sgbr-")),
        "sysctls": {name: read_sysctl(name) for name in WATCHED_SYSCTLS},
        "iptables": iptables_chains(),
        "host_paths": [p for p in HOST_PATHS if Path(p).exists()],
        "run": sorted(str(p) for p in Path("/run").glob("scangate-*")),
        "cgroups": sorted(str(g) for h in CGROUPS.iterdir() if h.is_dir()
                          for g in h.glob("scangate-*")),
        "lock": LOCK.exists(),
    }
