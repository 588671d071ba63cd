"""The sandbox's emulated node: the one part of the test cluster that is not real.

It registers a Ready Node and keeps its Lease fresh, binds unscheduled pods to
itself, runs each pod's containers as host processes and reports their status
through the API server, and serves container logs over TLS the way a kubelet does.

Images are not pulled. A container runs its `command`/`args` on the host; a
container without a command runs the entrypoint that the image map
(`--image-map FILE`, JSON `{"<repository suffix>": ["entrypoint", ...]}`) gives
for its image's repository, e.g. `{"aquasec/trivy": ["/path/to/trivy"]}`.

Each container runs in a private mount namespace, chrooted into a recursive bind
of the host root, with its volumes (emptyDir, secret, configMap, projected,
hostPath) bind-mounted at their mountPaths. readOnlyRootFilesystem remounts that
root read-only; runAsUser/runAsGroup/fsGroup, dropped capabilities and
allowPrivilegeEscalation=false are applied with setpriv. Mount points that do not
exist on the host are created there as empty directories.

A pod that declares container ports gets a pod IP of its own, from 198.18.0.0/15 (the
benchmarking range of RFC 2544, unused on real networks), added to the host's loopback
interface while it runs: Endpoints accept it (loopback addresses are refused), and
replicas that listen on their pod IP do not collide. Other pods report 127.0.0.1.
readinessProbes (httpGet, tcpSocket) are run, and decide the pod's Ready condition;
containers see KUBERNETES_SERVICE_HOST/PORT of the real API server, as a kubelet sets them.

Fault injection for tests: a pod annotation `sandbox.scangate.dev/truncate-log: "N"`
makes the log endpoint serve only the first N bytes of that pod's logs. For pods
that a controller creates, the faults file (`--faults FILE`, JSON) does the same
without touching the pod: `{"truncateLogs": [{"labels": {"k": "v"}, "bytes": N,
"times": T}]}` truncates the logs of the next T pods whose labels include those
(each pod counts once, however often its log is read), and `{"replaceCommand":
[{"labels": {...}, "command": [...], "times": T}]}` runs that command instead of
the containers' own in the next T matching pods (a crash, a hang, hostile output);
`{"delayStart": [{"labels": {...}, "seconds": S, "times": T}]}` holds the next T
matching pods for S seconds before their containers start (a slow image pull), so
that a test can break what they need while they wait.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import random
import re
import shlex
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from sandbox.pki import client_context

log = logging.getLogger("nodeagent")
Obj = dict[str, Any]
TRUNCATE_ANNOTATION = "sandbox.scangate.dev/truncate-log"
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
HOST_IP = "127.0.0.1"
POD_NETWORK = ipaddress.ip_network("198.18.0.0/15")


def claim_pod_ip() -> str:
    """A free address of POD_NETWORK, added to the loopback interface. Random, so that
    sandboxes side by side on one host do not need to agree (the kernel refuses a
    duplicate)."""
    for _ in range(100):
        ip = str(POD_NETWORK[random.randrange(1, POD_NETWORK.num_addresses - 1)])
        done = subprocess.run(["ip", "address", "add", f"{ip}/32", "dev", "lo"],
                              capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return ip
        if "exists" not in done.stderr:
            raise RuntimeError(f"ip address add {ip}: {done.stderr.strip()}")
    raise RuntimeError("no free pod IP")


def release_pod_ip(ip: str) -> None:
    if ip != HOST_IP:
        subprocess.run(["ip", "address", "del", f"{ip}/32", "dev", "lo"],
                       capture_output=True, check=False)


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Api:
    """Just enough of a Kubernetes REST client, speaking raw JSON."""

    def __init__(self, server: str, ca: str, cert: str, key: str) -> None:
        self.server = server
        self._args: dict[str, Any] = {"verify": client_context(ca, cert, key)}
        self.http = httpx.Client(base_url=server, timeout=30, **self._args)

    def get(self, path: str) -> Obj | None:
        r = self.http.get(path)
        if r.status_code == 404:
            return None
        r.raise_for_status()
        body: Obj = r.json()
        return body

    def post(self, path: str, body: Obj) -> httpx.Response:
        return self.http.post(path, json=body)

    def patch(self, path: str, body: Obj) -> httpx.Response:
        return self.http.patch(
            path, content=json.dumps(body),
            headers={"Content-Type": "application/merge-patch+json"},
        )

    def delete(self, path: str, body: Obj | None = None) -> httpx.Response:
        return self.http.request("DELETE", path, json=body)

    def watch(self, path: str, resource_version: str) -> Iterator[Obj]:
        params = {"watch": "true", "resourceVersion": resource_version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": "300"}
        with httpx.Client(base_url=self.server, timeout=httpx.Timeout(30, read=330),
                          **self._args) as client, client.stream("GET", path,
                                                                 params=params) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line:
                    yield json.loads(line)


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known names are replaced, $$ escapes."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, text)


class Container:
    """One container of a pod: its process, restarts and status."""

    def __init__(self, spec: Obj, pod_dir: Path) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.log_path = pod_dir / "logs" / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: str | None = None
        self.restarts = 0
        self.terminated: Obj | None = None  # the last termination
        self.waiting: Obj | None = {"reason": "ContainerCreating"}
        self.next_start = 0.0
        self.ready = False
        """The readinessProbe's last answer (running, without a probe)."""
        self.next_probe = 0.0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )
        self.started_at, self.waiting = now(), None
        probe = self.spec.get("readinessProbe") or {}
        self.ready = False
        self.next_probe = time.monotonic() + probe.get("initialDelaySeconds", 0)

    def reap(self) -> bool:
        """Record the exit of a finished process; True when it just ended."""
        if self.proc is None or self.proc.poll() is None:
            return False
        code = self.proc.returncode
        exit_code = 128 - code if code < 0 else code  # a signal, as a runtime reports it
        self.terminated = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": self.started_at, "finishedAt": now(),
            "containerID": self.container_id,
        }
        self.proc = None
        return True

    def kill(self, sig: int) -> None:
        if self.running and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    @property
    def container_id(self) -> str:
        return f"sandbox://{self.name}-{self.restarts}"

    def status(self) -> Obj:
        state: Obj
        if self.running:
            state = {"running": {"startedAt": self.started_at}}
        elif self.waiting is not None:
            state = {"waiting": self.waiting}
        elif self.terminated is not None:
            state = {"terminated": self.terminated}
        else:
            state = {"waiting": {"reason": "PodInitializing"}}
        status: Obj = {
            "name": self.name, "image": self.spec.get("image", ""),
            "imageID": f"sandbox://{self.spec.get('image', '')}",
            "ready": self.running and self.ready, "started": self.running,
            "restartCount": self.restarts, "state": state,
        }
        if self.running or self.terminated:
            status["containerID"] = self.container_id
        return status


class PodRunner(threading.Thread):
    """Runs one pod to completion (or deletion) and reports its status."""

    def __init__(self, agent: NodeAgent, pod: Obj) -> None:
        super().__init__(daemon=True, name=f"pod-{pod['metadata']['name']}")
        self.agent, self.pod = agent, pod
        meta = pod["metadata"]
        self.ns, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.dir = agent.work_dir / "pods" / self.uid
        spec = pod["spec"]
        self.init = [Container(c, self.dir) for c in spec.get("initContainers", [])]
        self.main = [Container(c, self.dir) for c in spec.get("containers", [])]
        self.stop_grace: float | None = None
        self.phase = "Pending"
        self.reason: str | None = None
        self.message: str | None = None
        self.start_time = now()
        self.ip = HOST_IP
        self._began = time.monotonic()
        self._last_status: Obj | None = None

    # -- public ---------------------------------------------------------------------

    def container(self, name: str) -> Container | None:
        return next((c for c in self.init + self.main if c.name == name), None)

    def request_stop(self, grace: float) -> None:
        self.stop_grace = grace if self.stop_grace is None else min(grace, self.stop_grace)

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    # -- the loop ------------------------------------------------------------------

    def run(self) -> None:
        try:
            spec = self.pod["spec"]
            if not spec.get("hostNetwork") and any(
                    c.get("ports") for c in spec.get("containers", [])):
                self.ip = claim_pod_ip()
            self._run()
        except Exception:
            log.exception("pod %s/%s runner crashed", self.ns, self.name)
            self.phase, self.reason, self.message = "Failed", "NodeAgentError", "see node-agent log"
            self._kill_all(0)
            self._report()
        finally:
            release_pod_ip(self.ip)
        if self.stop_grace is not None:
            self.agent.finalize_deletion(self.ns, self.name, self.uid)

    def _run(self) -> None:
        self._report()
        volumes = self._wait_for_volumes()
        delayed = self.agent.fault("delayStart", self.pod)
        until = time.monotonic() + float(delayed["seconds"]) if delayed else 0.0
        while self.stop_grace is None and time.monotonic() < until:
            time.sleep(0.1)
        if volumes is not None and self.stop_grace is None:
            policy = self.pod["spec"].get("restartPolicy", "Always")
            # Init containers run in order, each to success; Always behaves as OnFailure.
            init_policy = "Never" if policy == "Never" else "OnFailure"
            if all(self._supervise([c], init_policy, volumes) for c in self.init):
                self.phase = "Running"
                if self._supervise(self.main, policy, volumes):
                    self.phase = "Succeeded"
        if self.phase != "Succeeded":
            self.phase = "Failed"  # what a kubelet reports for a failed or deleted pod
        self._kill_all(self.stop_grace or 0)
        self._report()

    def _wait_for_volumes(self) -> dict[str, Path] | None:
        while self.stop_grace is None:
            try:
                return self._prepare_volumes()
            except Exception as e:  # a missing Secret may appear later, as with a kubelet
                for c in self.init + self.main:
                    c.waiting = {"reason": "CreateContainerConfigError", "message": str(e)}
                self._report()
                time.sleep(1)
        return None

    def _supervise(self, containers: list[Container], policy: str,
                   volumes: dict[str, Path]) -> bool:
        """Run containers under a restart policy; True when all of them succeeded."""
        for c in containers:
            self._start(c, volumes)
        while self._alive_checks():
            for c in containers:
                if c.reap():
                    c.next_start = time.monotonic() + min(10.0, 0.5 * 2 ** min(c.restarts, 5))
                failed = c.terminated is not None and c.terminated["exitCode"] != 0
                restart = policy == "Always" or (policy == "OnFailure" and failed)
                if not c.running and (restart or c.waiting) and time.monotonic() >= c.next_start:
                    self._start(c, volumes)
                self._probe(c)
            done = [c.terminated for c in containers if not c.running and not c.waiting]
            if policy != "Always" and len(done) == len(containers):
                ok = all(t and t["exitCode"] == 0 for t in done)
                if ok or policy == "Never":
                    return ok
            self._report()
            time.sleep(0.1)
        return False

    def _alive_checks(self) -> bool:
        """False once the pod must stop: deleted, or past activeDeadlineSeconds."""
        if self.stop_grace is not None or self.finished:
            return False
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        if deadline is not None and time.monotonic() - self._began > deadline:
            self._kill_all(0)
            self.phase, self.reason = "Failed", "DeadlineExceeded"
            self.message = "Pod was active on the node longer than the specified deadline"
            return False
        return True

    def _probe(self, c: Container) -> None:
        """Run the container's readinessProbe when due (httpGet or tcpSocket)."""
        probe = c.spec.get("readinessProbe")
        if not c.running or not probe:
            c.ready = c.running
            return
        if time.monotonic() < c.next_probe:
            return
        c.next_probe = time.monotonic() + probe.get("periodSeconds", 10)
        timeout = probe.get("timeoutSeconds", 1)
        action = probe.get("httpGet") or probe.get("tcpSocket")
        if action is None:
            c.ready = True  # exec and grpc probes are not run here
            return
        port = action["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in c.spec.get("ports", [])
                        if p.get("name") == port)
        host = action.get("host") or self.ip
        try:
            if "httpGet" in probe:
                scheme = action.get("scheme", "HTTP").lower()
                r = httpx.get(f"{scheme}://{host}:{port}{action.get('path', '/')}",
                              verify=False, timeout=timeout)
                c.ready = 200 <= r.status_code < 400
            else:
                socket.create_connection((host, port), timeout=timeout).close()
                c.ready = True
        except (httpx.HTTPError, OSError):
            c.ready = False

    def _kill_all(self, grace: float) -> None:
        everyone = self.init + self.main
        for c in everyone:
            c.kill(signal.SIGTERM)
        deadline = time.monotonic() + min(grace, 30)
        while any(c.running for c in everyone) and time.monotonic() < deadline:
            time.sleep(0.1)
        for c in everyone:
            c.kill(signal.SIGKILL)
            if c.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(5)
            c.reap()

    # -- starting a container ------------------------------------------------------

    def _start(self, c: Container, volumes: dict[str, Path]) -> None:
        if c.terminated is not None:
            c.restarts += 1
        try:
            env = self._env(c.spec)
            argv = self._argv(c, env, volumes)
        except Exception as e:
            c.waiting = {"reason": "CreateContainerError", "message": str(e)}
            c.next_start = time.monotonic() + 2
            return
        api = urllib.parse.urlsplit(self.agent.args.server)
        host_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": self.name,
                    "KUBERNETES_SERVICE_HOST": api.hostname or HOST_IP,
                    "KUBERNETES_SERVICE_PORT": str(api.port or 443)}
        c.start(argv, {**host_env, **env})
        self._report()

    def _argv(self, c: Container, env: dict[str, str], volumes: dict[str, Path]) -> list[str]:
        spec = c.spec
        command = spec.get("command")
        args = spec.get("args")
        replaced = self.agent.fault("replaceCommand", self.pod)
        if replaced:
            command, args = replaced["command"], None
        if not command:
            command = self.agent.entrypoint(spec.get("image", ""))
            if command is None:
                raise RuntimeError(f"sandbox: no host command for image {spec.get('image')!r}")
        argv = [expand(a, env) for a in [*command, *(args or [])]]

        root = self.dir / "root" / c.name
        script = ["set -e", f"mkdir -p {shlex.quote(str(root))}"]
        mounts = []
        for m in spec.get("volumeMounts", []):
            src = volumes[m["name"]]
            if m.get("subPath"):
                src = src / m["subPath"]
            dst = m["mountPath"]
            kind = "-d" if src.is_dir() else "-f"
            # Mount points must exist on the host before the root turns read-only.
            if kind == "-d":
                script.append(f"[ -e {shlex.quote(dst)} ] || mkdir -p {shlex.quote(dst)}")
            else:
                script.append(f"[ -e {shlex.quote(dst)} ] || {{ mkdir -p "
                              f"{shlex.quote(os.path.dirname(dst))}; : > {shlex.quote(dst)}; }}")
            mounts.append((src, dst, bool(m.get("readOnly"))))
        quoted_root = shlex.quote(str(root))
        script.append(f"mount --rbind / {quoted_root}")
        security = self._security(spec)
        if security.get("readOnlyRootFilesystem"):
            script.append(f"mount -o remount,bind,ro {quoted_root}")
        # Volumes are mounted from inside the new root, so that a mountPath through a
        # symlink (/var/run -> /run) lands where the container will look for it.
        inner = ["set -e"]
        for src, dst, ro in mounts:
            # A bind takes the flags of its source's mount: the root may be read-only.
            inner.append(f"mount --bind {shlex.quote(str(src))} {shlex.quote(dst)}")
            inner.append(f"mount -o remount,bind,{'ro' if ro else 'rw'} {shlex.quote(dst)}")
        inner.append(f"cd {shlex.quote(spec.get('workingDir') or '/')}")
        inner.append('exec "$@"')
        script.append(f'exec chroot {quoted_root} sh -c {shlex.quote(chr(10).join(inner))} sh "$@"')
        return ["unshare", "--mount", "--propagation", "private", "--",
                "sh", "-c", "\n".join(script), "sh", *self._privileges(security), *argv]

    def _security(self, spec: Obj) -> Obj:
        """The container's security context over the pod's."""
        merged: Obj = self.pod["spec"].get("securityContext", {}) | spec.get("securityContext", {})
        return merged

    def _privileges(self, security: Obj) -> list[str]:
        """setpriv arguments for the pod's and container's security context."""
        opts: list[str] = []
        uid = security.get("runAsUser")
        if uid is not None and uid != 0:
            gid = security.get("runAsGroup", 0)
            groups = [str(g) for g in [security.get("fsGroup"),
                                       *security.get("supplementalGroups", [])] if g is not None]
            opts += [f"--reuid={uid}", f"--regid={gid}"]
            opts += [f"--groups={','.join(groups)}"] if groups else ["--clear-groups"]
        elif security.get("runAsNonRoot"):
            raise RuntimeError("container has runAsNonRoot and would run as root")
        if "ALL" in security.get("capabilities", {}).get("drop", []):
            opts += ["--inh-caps=-all", "--bounding-set=-all"]
        if security.get("allowPrivilegeEscalation") is False:
            opts += ["--no-new-privs"]
        return ["setpriv", *opts, "--"] if opts else []

    def _env(self, spec: Obj) -> dict[str, str]:
        env: dict[str, str] = {}
        uid = self._security(spec).get("runAsUser")
        env["HOME"] = "/root" if not uid else "/"
        for source in spec.get("envFrom", []):
            prefix = source.get("prefix", "")
            for kind in ("secretRef", "configMapRef"):
                if kind in source:
                    data = self._data(kind, source[kind]["name"], source[kind].get("optional"))
                    env.update({prefix + k: v.decode() for k, v in data.items()})
        for item in spec.get("env", []):
            if "valueFrom" not in item:
                env[item["name"]] = expand(item.get("value", ""), env)
                continue
            ref = item["valueFrom"]
            if "fieldRef" in ref:
                env[item["name"]] = self._field(ref["fieldRef"]["fieldPath"])
            for kind, refkind in (("secretKeyRef", "secretRef"),
                                  ("configMapKeyRef", "configMapRef")):
                if kind in ref:
                    data = self._data(refkind, ref[kind]["name"], ref[kind].get("optional"))
                    if ref[kind]["key"] in data:
                        env[item["name"]] = data[ref[kind]["key"]].decode()
                    elif not ref[kind].get("optional"):
                        raise RuntimeError(f"couldn't find key {ref[kind]['key']} in "
                                           f"{refkind[:-3]} {self.ns}/{ref[kind]['name']}")
        return env

    def _field(self, path: str) -> str:
        meta = self.pod["metadata"]
        values: dict[str, str] = {"metadata.name": self.name, "metadata.namespace": self.ns,
                  "metadata.uid": self.uid, "spec.nodeName": self.agent.node_name,
                  "spec.serviceAccountName": self.pod["spec"].get("serviceAccountName", ""),
                  "status.podIP": self.ip, "status.hostIP": HOST_IP}
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return str(meta.get(m.group(1), {}).get(m.group(2), ""))
        return values.get(path, "")

    def _data(self, kind: str, name: str, optional: bool | None) -> dict[str, bytes]:
        """The data of a Secret ("secretRef") or ConfigMap ("configMapRef") as bytes."""
        resource = "secrets" if kind == "secretRef" else "configmaps"
        obj = self.agent.api.get(f"/api/v1/namespaces/{self.ns}/{resource}/{name}")
        if obj is None:
            if optional:
                return {}
            raise RuntimeError(f'{resource[:-1]} "{name}" not found')
        if resource == "secrets":
            return {k: base64.b64decode(v) for k, v in obj.get("data", {}).items()}
        data = {k: v.encode() for k, v in obj.get("data", {}).items()}
        data.update({k: base64.b64decode(v) for k, v in obj.get("binaryData", {}).items()})
        return data

    # -- volumes -------------------------------------------------------------------

    def _prepare_volumes(self) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for vol in self.pod["spec"].get("volumes", []):
            path = self.dir / "volumes" / vol["name"]
            if "hostPath" in vol:
                paths[vol["name"]] = Path(vol["hostPath"]["path"])
                continue
            path.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in vol:
                path.chmod(0o777)
            elif "secret" in vol or "configMap" in vol:
                self._project(path, vol, vol.get("secret", vol.get("configMap", {})))
            elif "projected" in vol:
                for source in vol["projected"].get("sources", []):
                    self._project(path, source, vol["projected"])
            else:
                raise RuntimeError(f"volume {vol['name']}: type not supported by the sandbox")
            paths[vol["name"]] = path
        return paths

    def _project(self, path: Path, source: Obj, defaults: Obj) -> None:
        mode = defaults.get("defaultMode", 0o644)
        files: dict[str, tuple[bytes, int]] = {}
        for kind, refkind, name_key in (("secret", "secretRef", "secretName"),
                                        ("configMap", "configMapRef", "name")):
            if kind not in source:
                continue
            ref = source[kind]
            name = ref.get(name_key) or ref.get("name")
            data = self._data(refkind, name, ref.get("optional"))
            items = ref.get("items")
            if items:
                for it in items:
                    if it["key"] not in data:
                        raise RuntimeError(f"{kind} {name}: no key {it['key']}")
                    files[it["path"]] = (data[it["key"]], it.get("mode", mode))
            else:
                files.update({k: (v, mode) for k, v in data.items()})
        if "serviceAccountToken" in source:
            tok = source["serviceAccountToken"]
            sa = self.pod["spec"].get("serviceAccountName", "default")
            r = self.agent.api.post(
                f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                 "spec": {"audiences": [tok["audience"]] if tok.get("audience") else None,
                          "expirationSeconds": tok.get("expirationSeconds", 3607),
                          "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                                             "name": self.name, "uid": self.uid}}})
            r.raise_for_status()
            files[tok["path"]] = (r.json()["status"]["token"].encode(), mode)
        if "downwardAPI" in source:
            for it in source["downwardAPI"].get("items", []):
                if "fieldRef" in it:
                    files[it["path"]] = (self._field(it["fieldRef"]["fieldPath"]).encode(), mode)
        for rel, (content, file_mode) in files.items():
            target = path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            target.chmod(file_mode)

    # -- status --------------------------------------------------------------------

    def _report(self) -> None:
        initialized = all(c.terminated and c.terminated["exitCode"] == 0 for c in self.init)
        ready = self.phase == "Running" and all(c.running and c.ready for c in self.main)

        def cond(kind: str, ok: bool) -> Obj:
            return {"type": kind, "status": "True" if ok else "False"}

        status: Obj = {
            "phase": self.phase, "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}],
            "podIP": self.ip, "podIPs": [{"ip": self.ip}], "startTime": self.start_time,
            "conditions": [cond("PodScheduled", True), cond("Initialized", initialized),
                           cond("ContainersReady", ready), cond("Ready", ready)],
            "initContainerStatuses": [c.status() for c in self.init] or None,
            "containerStatuses": [c.status() for c in self.main],
            "reason": self.reason, "message": self.message,
        }
        if status == self._last_status:
            return
        stamped = json.loads(json.dumps(status))
        for c in stamped["conditions"]:
            c["lastTransitionTime"] = now()
        while True:
            try:
                r = self.agent.api.patch(f"/api/v1/namespaces/{self.ns}/pods/{self.name}/status",
                                         {"status": stamped})
                break
            except httpx.TransportError as e:
                # The API server is away (restarting): a kubelet keeps the pod's status and
                # reports it once the server is back, rather than losing the pod.
                log.warning("status of %s/%s: %s; retrying", self.ns, self.name, e)
                if self.agent.stopping.wait(1):
                    return
        if r.status_code < 300:
            self._last_status = status
        elif r.status_code != 404:
            log.warning("status of %s/%s: %s %s", self.ns, self.name, r.status_code, r.text)


class LogHandler(BaseHTTPRequestHandler):
    """The kubelet's /containerLogs/{namespace}/{pod}/{container} endpoint."""

    agent: NodeAgent
    protocol_version = "HTTP/1.1"  # chunked responses, as the API server's proxy expects

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        query = dict(urllib.parse.parse_qsl(url.query))
        if len(parts) != 4 or parts[0] != "containerLogs":
            self.send_error(404, "not found")
            return
        runner = self.agent.runner(parts[1], parts[2])
        container = runner.container(parts[3]) if runner else None
        if runner is None or container is None or not container.log_path.exists():
            self.send_error(404, f"container {parts[3]} in pod {parts[1]}/{parts[2]} not found")
            return
        limit = int(query["limitBytes"]) if "limitBytes" in query else None
        truncate = self.agent.truncation(runner.pod)
        if truncate is not None:
            limit = min(limit or 2**62, truncate)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with open(container.log_path, "rb") as f:
            data = f.read()
            if "tailLines" in query:
                tail = int(query["tailLines"])
                data = b"".join(data.splitlines(keepends=True)[-tail:]) if tail else b""
            sent = self._send(data, limit, 0)
            while query.get("follow") == "true" and (limit is None or sent < limit):
                chunk = f.read(65536)
                if chunk:
                    sent = self._send(chunk, limit, sent)
                elif not container.running:
                    break
                else:
                    time.sleep(0.1)
        self.wfile.write(b"0\r\n\r\n")

    def _send(self, data: bytes, limit: int | None, sent: int) -> int:
        if limit is not None:
            data = data[: max(0, limit - sent)]
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        return sent + len(data)


class NodeAgent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.api = Api(args.server, args.ca, args.client_cert, args.client_key)
        self.node_name: str = args.node_name
        self.port: int = args.port
        self.work_dir = Path(args.work_dir)
        self.image_map: dict[str, list[str]] = (
            json.loads(Path(args.image_map).read_text()) if args.image_map else {}
        )
        self.args = args
        self.faults_file = Path(args.faults) if args.faults else None
        self.faulted: dict[tuple[str, str], Obj] = {}  # (kind, pod uid) -> the rule applied
        self.runners: dict[str, PodRunner] = {}  # by pod uid
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def truncation(self, pod: Obj) -> int | None:
        """Bytes to truncate this pod's log to, by annotation or the faults file."""
        annotated = pod["metadata"].get("annotations", {}).get(TRUNCATE_ANNOTATION)
        if annotated is not None:
            return int(annotated)
        rule = self.fault("truncateLogs", pod)
        return int(rule["bytes"]) if rule else None

    def fault(self, kind: str, pod: Obj) -> Obj | None:
        """The rule of the faults file of this kind that applies to the pod: the first
        with matching labels and times left, taken once per pod, however often asked."""
        meta = pod["metadata"]
        if not self.faults_file or not self.faults_file.exists():
            return None
        with self.lock:
            key = (kind, meta["uid"])
            if key in self.faulted:
                return self.faulted[key]
            faults = json.loads(self.faults_file.read_text() or "{}")
            labels = meta.get("labels", {})
            for rule in faults.get(kind, []):
                if rule.get("times", 0) > 0 and all(
                    labels.get(k) == v for k, v in rule.get("labels", {}).items()
                ):
                    rule["times"] -= 1
                    self.faults_file.write_text(json.dumps(faults))
                    self.faulted[key] = rule
                    log.info("fault %s on %s/%s", kind, meta["namespace"], meta["name"])
                    return dict(rule)
        return None

    def entrypoint(self, image: str) -> list[str] | None:
        repository = image.split("@")[0]
        if ":" in repository.rsplit("/", 1)[-1]:
            repository = repository.rsplit(":", 1)[0]
        for suffix, command in self.image_map.items():
            if repository == suffix or repository.endswith("/" + suffix):
                return command
        return None

    def runner(self, ns: str, name: str) -> PodRunner | None:
        with self.lock:
            found = [r for r in self.runners.values() if (r.ns, r.name) == (ns, name)]
        return found[-1] if found else None

    # -- node registration ---------------------------------------------------------

    def node_status(self) -> Obj:
        stamp = now()

        def cond(kind: str, status: str, reason: str) -> Obj:
            return {"type": kind, "status": status, "reason": reason,
                    "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}

        resources = {"cpu": str(os.cpu_count() or 2), "memory": "16Gi", "pods": "110",
                     "ephemeral-storage": "50Gi"}
        return {
            "capacity": resources, "allocatable": resources,
            "conditions": [cond("Ready", "True", "KubeletReady"),
                           cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                           cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                           cond("PIDPressure", "False", "KubeletHasSufficientPID")],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.node_name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
            "nodeInfo": {"machineID": "sandbox", "systemUUID": "sandbox", "bootID": "sandbox",
                         "kernelVersion": os.uname().release, "osImage": "scangate sandbox",
                         "containerRuntimeVersion": "sandbox://0.1", "kubeletVersion": "v0.0.0",
                         "kubeProxyVersion": "", "operatingSystem": "linux",
                         "architecture": "amd64"},
        }

    def register(self) -> None:
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node_name,
                             "labels": {"kubernetes.io/hostname": self.node_name,
                                        "kubernetes.io/os": "linux",
                                        "kubernetes.io/arch": "amd64"}}}
        r = self.api.post("/api/v1/nodes", node)
        if r.status_code not in (201, 409):
            raise RuntimeError(f"registering node: {r.status_code} {r.text}")
        self.heartbeat()

    def heartbeat(self) -> None:
        self.api.patch(f"/api/v1/nodes/{self.node_name}/status",
                       {"status": self.node_status()}).raise_for_status()
        leases = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
        lease_path = f"{leases}/{self.node_name}"
        renew = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        r = self.api.patch(lease_path, {"spec": {"renewTime": renew,
                                                 "holderIdentity": self.node_name}})
        if r.status_code == 404:
            self.api.post(
                leases,
                {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": self.node_name},
                 "spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": 40,
                          "renewTime": renew}})

    def heartbeat_loop(self) -> None:
        while not self.stopping.wait(10):
            try:
                self.heartbeat()
            except Exception:
                log.exception("heartbeat failed")

    # -- pods ----------------------------------------------------------------------

    def handle(self, pod: Obj) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        node = spec.get("nodeName")
        deleting = meta.get("deletionTimestamp") is not None
        if not node and not deleting and spec.get("schedulerName", "default-scheduler") == (
            "default-scheduler"
        ):
            self.bind(pod)
            return
        if node != self.node_name:
            return
        phase = pod.get("status", {}).get("phase")
        with self.lock:
            runner = self.runners.get(meta["uid"])
            if runner is None and not deleting and phase not in ("Succeeded", "Failed"):
                runner = self.runners[meta["uid"]] = PodRunner(self, pod)
                runner.start()
                return
        if runner is not None:
            runner.pod["metadata"] = meta  # annotations may change (fault injection)
        if deleting:
            grace = float(meta.get("deletionGracePeriodSeconds") or 0)
            if runner is not None and runner.is_alive():
                runner.request_stop(grace)
            else:
                self.finalize_deletion(meta["namespace"], meta["name"], meta["uid"])

    def bind(self, pod: Obj) -> None:
        meta = pod["metadata"]
        r = self.api.post(
            f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding",
            {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"]},
             "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}})
        if r.status_code >= 300 and r.status_code != 409:
            log.warning("binding %s/%s: %s", meta["namespace"], meta["name"], r.text)

    def finalize_deletion(self, ns: str, name: str, uid: str) -> None:
        """What a kubelet does once a deleted pod's containers are gone."""
        self.api.delete(f"/api/v1/namespaces/{ns}/pods/{name}",
                        {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}})
        with self.lock:
            self.runners.pop(uid, None)

    def watch_pods(self) -> None:
        while not self.stopping.is_set():
            try:
                listing = self.api.get("/api/v1/pods")
                assert listing is not None
                for pod in listing["items"]:
                    self.handle(pod)
                rv = listing["metadata"]["resourceVersion"]
                for event in self.api.watch("/api/v1/pods", rv):
                    if event["type"] == "ERROR":
                        break  # e.g. 410 Gone: relist
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self.handle(event["object"])
                    elif event["type"] == "DELETED":
                        with self.lock:
                            runner = self.runners.pop(event["object"]["metadata"]["uid"], None)
                        if runner is not None:
                            runner.request_stop(0)
            except Exception:
                if not self.stopping.is_set():
                    log.exception("pod watch failed; relisting")
                    time.sleep(1)

    # -- main ----------------------------------------------------------------------

    def serve_logs(self) -> ThreadingHTTPServer:
        handler = type("Handler", (LogHandler,), {"agent": self})
        server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.args.serving_cert, self.args.serving_key)
        ctx.load_verify_locations(self.args.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED  # only the API server (a client cert of our CA)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True, name="logs").start()
        return server

    def shutdown(self, *_: Any) -> None:
        self.stopping.set()
        with self.lock:
            runners = list(self.runners.values())
        for r in runners:
            r._kill_all(0)
            release_pod_ip(r.ip)
        os._exit(0)

    def run(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        signal.signal(signal.SIGTERM, self.shutdown)
        signal.signal(signal.SIGINT, self.shutdown)
        self.serve_logs()
        self.register()
        threading.Thread(target=self.heartbeat_loop, daemon=True, name="heartbeat").start()
        self.watch_pods()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    for flag in ("--server", "--ca", "--client-cert", "--client-key", "--serving-cert",
                 "--serving-key", "--work-dir"):
        p.add_argument(flag, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--node-name", default="sandbox-node")
    p.add_argument("--image-map", help="JSON file: repository suffix -> host entrypoint")
    p.add_argument("--faults", help="JSON file of injected faults (see the module docstring)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    NodeAgent(args).run()


if __name__ == "__main__":
    main()
