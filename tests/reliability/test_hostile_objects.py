"""No object can stop the process: a ScanRule whose schedule never fires and a ScanPolicy
whose maxScanAge overflows.

Both match their CRD's schema. Before, the rule's `0 0 30 2 *` raised CroniterBadDateError
in the rule controller, which ended the controller's task and so the process (every
replica in turn, as it became leader), and the policy's `1000000000d` raised OverflowError
on every relist of ScanPolicies, so the gate never became ready. Now both are refused at
`kubectl apply` naming the field, and, stored behind the webhook's back, each ends up a
condition, an Event and a metric on itself while the operator, the gate and the other
objects carry on, across a restart too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from conftest import Kubectl, Tenant, wait_for
from sandbox.controlplane import Sandbox
from scans import Policy, admit, deployment, events, https, metric

pytestmark = [pytest.mark.reliability, pytest.mark.sandbox]
NEVER = "0 0 30 2 *"
HUGE = "1000000000d"
KOPF_CONFIGURATION = "scangate.dev"


def rule(name: str, registry: str, schedule: str | None = None) -> str:
    """A ScanRule over a registry namespace with nothing in it: a run lists the catalog
    and scans nothing."""
    triggers: dict[str, Any] = {"onPush": False}
    if schedule:
        triggers["schedule"] = schedule
    return json.dumps({"apiVersion": "scangate.dev/v1alpha1", "kind": "ScanRule",
                       "metadata": {"name": name},
                       "spec": {"registry": {"url": registry},
                                "scope": {"namespaces": ["nothing-here"]},
                                "triggers": triggers}})


def huge_policy(name: str, namespace: str) -> str:
    return json.dumps({"apiVersion": "scangate.dev/v1alpha1", "kind": "ScanPolicy",
                       "metadata": {"name": name},
                       "spec": {"maxScanAge": HUGE, "match": {"namespaces": [namespace]}}})


def ready(kubectl: Kubectl, kind: str, name: str, namespace: str | None = None
          ) -> dict[str, Any]:
    """The object's Ready condition ({} while it has none)."""
    where = ["-n", namespace] if namespace else []
    obj = json.loads(kubectl("get", kind, name, *where, "-o", "json"))
    return next((c for c in (obj.get("status") or {}).get("conditions") or []
                 if c["type"] == "Ready"), {})


def gate_ready(env: dict[str, str]) -> bool:
    with https(env) as client:
        return client.get(f"{env['SCANGATE_ADMISSION']}/readyz").status_code == 200


def running(sandbox: Sandbox) -> bool:
    """The operator process is there and not a zombie (a crashed child is one until it is
    reaped, and its start time still reads as ours)."""
    status = Path(f"/proc/{sandbox.operator_pid()}/status")
    return status.exists() and "\nState:\tZ" not in status.read_text()


@contextmanager
def behind_the_webhooks_back(kubectl: Kubectl) -> Iterator[None]:
    """scangate's own validating webhooks away (kopf's configuration `scangate.dev`), then
    put back as they were: what is applied meanwhile is stored unchecked, as an object
    written before a check existed would be."""
    saved = json.loads(kubectl("get", "validatingwebhookconfiguration", KOPF_CONFIGURATION,
                               "-o", "json"))
    for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
        saved["metadata"].pop(key, None)
    kubectl("delete", "validatingwebhookconfiguration", KOPF_CONFIGURATION)
    try:
        yield
    finally:
        kubectl("create", "-f", "-", input=json.dumps(saved))


def test_they_are_refused_at_apply_naming_the_field(
    kubectl: Kubectl, tenant: Tenant, sandbox_env: dict[str, str],
) -> None:
    ns, registry = tenant.namespace, f"http://{sandbox_env['REGISTRY']}"
    out = tenant.kubectl.run("apply", "-n", ns, "-f", "-", input=rule("never", registry, NEVER),
                             check=False)
    assert out.returncode != 0, out.stdout
    assert "spec.triggers.schedule: cron expression '0 0 30 2 *' never fires" in out.stderr
    scan = {"apiVersion": "scangate.dev/v1alpha1", "kind": "ImageScan",
            "metadata": {"name": "forever"}, "spec": {"image": "x/y:1", "timeout": HUGE}}
    out = tenant.kubectl.run("apply", "-n", ns, "-f", "-", input=json.dumps(scan), check=False)
    assert out.returncode != 0 and "spec.timeout" in out.stderr, out.stderr
    assert "longer than 3650d" in out.stderr
    out = kubectl.run("apply", "-f", "-", input=huge_policy(f"huge-{ns}", ns), check=False)
    assert out.returncode != 0, out.stdout
    assert "spec.maxScanAge: invalid duration '1000000000d': longer than 3650d" in out.stderr


def test_stored_behind_the_webhooks_back_they_stop_nothing(
    kubectl: Kubectl, tenant: Tenant, sandbox: Sandbox, sandbox_env: dict[str, str],
    operator: Callable[..., None], policy: Policy,
) -> None:
    env, ns = sandbox_env, tenant.namespace
    registry, bad_policy = f"http://{env['REGISTRY']}", f"huge-{ns}"
    rule_failures = metric(env, "scangate_object_failures_total",
                           'kind="ScanRule",reason="InvalidSchedule"')
    with behind_the_webhooks_back(kubectl):
        # The API server drops the deleted configuration from its cache within a moment.
        wait_for(lambda: tenant.kubectl.run(
            "apply", "-n", ns, "-f", "-", input=rule("never", registry, NEVER),
            check=False).returncode == 0, 30, "the schedule to be stored unchecked")
        kubectl.apply(huge_policy(bad_policy, ns))
    try:
        # The rule: Ready False naming the field, an Event, the metric; nothing else.
        condition = wait_for(lambda: ready(kubectl, "scanrule", "never", ns).get("reason")
                             == "InvalidSchedule" and ready(kubectl, "scanrule", "never", ns),
                             60, "the rule's InvalidSchedule condition")
        assert condition["status"] == "False"
        assert condition["message"].startswith("spec.triggers.schedule: cron expression "
                                               "'0 0 30 2 *' gives no time")
        wait_for(lambda: events(kubectl, ns, "InvalidSchedule")["never"], 30,
                 "the InvalidSchedule Event")
        assert metric(env, "scangate_object_failures_total",
                      'kind="ScanRule",reason="InvalidSchedule"') > rule_failures
        # The policy: left out by the gate, which says so on it.
        condition = wait_for(lambda: ready(kubectl, "scanpolicy", bad_policy).get("reason")
                             == "InvalidSpec" and ready(kubectl, "scanpolicy", bad_policy),
                             60, "the policy's InvalidSpec condition")
        assert "spec.maxScanAge" in condition["message"] and condition["status"] == "False"
        wait_for(lambda: events(kubectl, "default", "InvalidSpec")[bad_policy], 30,
                 "the InvalidSpec Event on the policy")
        assert running(sandbox) and gate_ready(env)

        # The other objects keep working: a rule runs, a good policy is enforced.
        tenant.kubectl.apply(rule("good", registry), ns)
        wait_for(lambda: ready(kubectl, "scanrule", "good", ns).get("reason") == "Ran", 60,
                 "the good rule to run")
        good_policy = policy(unscanned="Deny")
        unscanned = deployment("app", f"{env['REGISTRY']}/nothing/here@sha256:{'ab' * 32}")
        said = wait_for(lambda: (r := admit(tenant.kubectl, unscanned, ns,
                                            "--dry-run=server"))[0] is False and r[1],
                        30, "the good policy to be enforced")
        assert f"ScanPolicy {good_policy}" in said and "has not been scanned yet" in said
        # `kubectl get scanpolicies` shows Ready for every policy: True for the one the gate
        # applies, False for the one it leaves out.
        wait_for(lambda: ready(kubectl, "scanpolicy", good_policy).get("reason") == "Enforced",
                 60, "the good policy's Ready condition")
        columns = {line.split()[0]: line.split()[-1] for line in kubectl(
            "get", "scanpolicies", good_policy, bad_policy, "--no-headers", "-o",
            "custom-columns=NAME:.metadata.name,READY:.status.conditions[?(@.type=='Ready')]"
            ".status").splitlines()}
        assert columns == {good_policy: "True", bad_policy: "False"}, columns

        # A restart lists both again and leads again: still running, the gate ready, and
        # the rule controller acting (a manual run of the good rule is done).
        operator()
        wait_for(lambda: gate_ready(env), 60, "the gate to be ready after a restart")
        tenant.kubectl("annotate", "scanrule", "good", "-n", ns, "scangate.dev/scan-now=1",
                       "--overwrite")
        wait_for(lambda: json.loads(kubectl("get", "scanrule", "good", "-n", ns, "-o", "json"))
                 ["status"].get("lastScanNow") == "1", 60, "the manual run after the restart")
        assert running(sandbox) and gate_ready(env)
        assert ready(kubectl, "scanrule", "never", ns)["reason"] == "InvalidSchedule"
    finally:
        kubectl.run("delete", "scanpolicy", bad_policy, "--wait=false", check=False)
