"""Shared fixtures: the sandbox control plane and a kubectl that talks to it.

Set SCANGATE_SANDBOX_DIR to reuse a sandbox started with `hack/sandbox up --operator`;
otherwise one is started for the session and stopped at its end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.controlplane import Sandbox


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SIGTERM (a CI timeout, `kill`) would end pytest without running finalizers and leave
    # the sandbox's processes behind; as an exception, it unwinds through the fixtures.
    raise SystemExit(128 + signum)


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    reuse = os.environ.get("SCANGATE_SANDBOX_DIR")
    if reuse:
        yield Sandbox.attach(Path(reuse))
        return
    started = Sandbox(tmp_path_factory.mktemp("sandbox"))
    started.up(operator=True)
    try:
        yield started
    finally:
        started.down()


@pytest.fixture(scope="session")
def sandbox_env(sandbox: Sandbox) -> dict[str, str]:
    return sandbox.env


def wait_for(check: Callable[[], Any], timeout: float = 120, what: str = "condition",
             interval: float = 0.3) -> Any:
    """Poll `check` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Kubectl:
    """The real kubectl against the sandbox."""

    def __init__(self, env: dict[str, str], as_user: str | None = None) -> None:
        self.binary = env["KUBECTL"]
        self.env = {**os.environ, "KUBECONFIG": env["KUBECONFIG"]}
        self.as_user = as_user
        """Impersonated user (`kubectl --as`), for tests acting as a tenant."""

    def run(self, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        who = [f"--as={self.as_user}"] if self.as_user else []
        proc = subprocess.run([self.binary, *who, *args], input=input, capture_output=True,
                              text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc

    def __call__(self, *args: str, input: str | None = None) -> str:
        return self.run(*args, input=input).stdout

    def apply(self, manifest: str, namespace: str | None = None) -> str:
        ns = ["-n", namespace] if namespace else []
        return self("apply", *ns, "-f", "-", input=manifest)


@pytest.fixture(scope="session")
def kubectl(sandbox_env: dict[str, str]) -> Kubectl:
    return Kubectl(sandbox_env)


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)


class Tenant:
    """A hostile tenant: a user bound to the `edit` ClusterRole in one namespace only (it
    may create Pods, Jobs, Secrets, ScanRules and ImageScans there), acting through the
    real kubectl with impersonation (`kubectl --as`)."""

    def __init__(self, admin: Kubectl, namespace: str) -> None:
        self.namespace = namespace
        self.user = f"tenant-{namespace}"
        admin("create", "rolebinding", "tenant-edit", "-n", namespace,
              "--clusterrole=edit", f"--user={self.user}")
        # scangate's own kinds, as a cluster would aggregate them into `edit`.
        admin.apply(json.dumps({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "tenant-scangate", "namespace": namespace},
            "rules": [{"apiGroups": ["scangate.dev"],
                       "resources": ["scanrules", "imagescans"], "verbs": ["*"]}]}))
        admin("create", "rolebinding", "tenant-scangate", "-n", namespace,
              "--role=tenant-scangate", f"--user={self.user}")
        self.kubectl = Kubectl({"KUBECTL": admin.binary,
                                "KUBECONFIG": admin.env["KUBECONFIG"]}, as_user=self.user)


@pytest.fixture
def tenant(kubectl: Kubectl, namespace: str) -> Tenant:
    """A tenant with `edit` in the test's namespace (and nothing elsewhere)."""
    return Tenant(kubectl, namespace)


@pytest.fixture
def operator(sandbox: Sandbox) -> Iterator[Callable[..., None]]:
    """Restart the operator with extra flags; the default one is back afterwards."""
    changed = []

    def restart(*args: str, sig: int = signal.SIGTERM) -> None:
        sandbox.stop_operator(sig)
        sandbox.start_operator(extra_args=args)
        changed.append(args)

    yield restart
    if changed:
        sandbox.stop_operator()
        sandbox.start_operator()


@pytest.fixture
def policy(kubectl: Kubectl, namespace: str) -> Iterator[Callable[..., str]]:
    """Apply a ScanPolicy confined to the test's namespace; all are deleted afterwards."""
    made: list[str] = []

    def apply(**spec: Any) -> str:
        name = f"p-{uuid.uuid4().hex[:8]}"
        spec.setdefault("match", {})["namespaces"] = [namespace]
        kubectl.apply(json.dumps({"apiVersion": "scangate.dev/v1alpha1",
                                  "kind": "ScanPolicy", "metadata": {"name": name},
                                  "spec": spec}))
        made.append(name)
        return name

    yield apply
    if made:
        kubectl.run("delete", "scanpolicy", *made, "--wait=false", check=False)
