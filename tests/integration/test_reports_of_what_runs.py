"""PolicyReports on the sandbox, with Open Reports' own CRD (fetched from its upstream
module by hack/reportcrds, never a copy of ours): what runs in a namespace appears as
`fail` and `pass` results against the ScanPolicy, with the CVE IDs, and a fixed image
turns `fail` into `pass`. Before the CRD exists the operator said once that the feature
is off; the report it writes is accepted by the API server under that CRD's schema."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Kubectl, wait_for
from scans import Policy, log_since, metric, operator_log, push_variant, sleeper

pytestmark = pytest.mark.sandbox
REPO = Path(__file__).resolve().parents[2]
OFF = "PolicyReports are off: the CRD reports.openreports.io is not installed"


@pytest.fixture
def report_crd(kubectl: Kubectl) -> Iterator[Path]:
    """Open Reports' Report CRD applied as its project ships it; removed afterwards (with
    every report)."""
    crd = Path(subprocess.run([str(REPO / "hack" / "reportcrds")], check=True,
                              capture_output=True, text=True, timeout=600).stdout.strip())
    kubectl("apply", "-f", str(crd))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(crd))
    yield crd
    kubectl.run("delete", "-f", str(crd), "--wait=false", check=False)


def operator_can(kubectl: Kubectl, verb: str, resource: str) -> bool:
    """What the chart's ClusterRole lets the operator do (the sandbox runs it so)."""
    return kubectl.run("auth", "can-i", verb, resource, "--all-namespaces",
                       "--as=system:serviceaccount:scangate-system:scangate",
                       check=False).stdout.strip() == "yes"


def results(kubectl: Kubectl, namespace: str) -> dict[str, list[dict[str, Any]]]:
    """The namespace's report's results by workload name (none while there is no report)."""
    out = kubectl.run("get", "reports.openreports.io", "scangate", "-n", namespace,
                      "-o", "json", check=False)
    if out.returncode != 0:
        return {}
    found: dict[str, list[dict[str, Any]]] = {}
    for result in json.loads(out.stdout).get("results") or []:
        found.setdefault(result["resources"][0]["name"], []).append(result)
    return found


def test_what_runs_is_reported_fail_and_pass_per_policy_and_a_fix_turns_it_to_pass(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str], policy: Policy,
    report_crd: Path,
) -> None:
    # The operator started before the CRD existed: it said so, once, and kept looking.
    assert operator_log(sandbox_env).read_text(errors="replace").count(OFF) >= 1
    # Its rights over reports, with the CRD there (can-i of an unknown kind means nothing):
    # written whole and listed when it starts leading, never watched or patched.
    assert [v for v in ("get", "list", "create", "update", "delete", "watch", "patch")
            if operator_can(kubectl, v, "reports.openreports.io")] == [
        "get", "list", "create", "update", "delete"]
    clean, _ = push_variant(sandbox_env, "clean")
    critical, _ = push_variant(sandbox_env, "debian-critical")
    # Both run before the policy exists (the gate would refuse the critical one).
    kubectl.apply(sleeper("good", clean), namespace)
    kubectl.apply(sleeper("bad", critical), namespace)
    refusing = policy(action="Enforce", thresholds={"critical": 0})

    def judged() -> dict[str, list[dict[str, Any]]] | None:
        held = results(kubectl, namespace)
        status = {name: [r["result"] for r in rs] for name, rs in held.items()}
        return held if status == {"good": ["pass"], "bad": ["fail"]} else None

    held = wait_for(judged, 240, "a fail and a pass result in the namespace's report")
    report = json.loads(kubectl("get", "reports.openreports.io", "scangate", "-n",
                                namespace, "-o", "json"))
    assert report["source"] == "scangate"
    assert report["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "scangate"}
    assert report["summary"] == {"pass": 1, "fail": 1, "warn": 0, "error": 0, "skip": 0}
    bad = held["bad"][0]
    assert bad["policy"] == refusing and bad["source"] == "scangate"
    assert bad["resources"] == [{"apiVersion": "apps/v1", "kind": "Deployment",
                                 "name": "bad", "namespace": namespace}]
    assert bad["rule"] == critical and bad["severity"] == "critical"
    assert bad["properties"]["cves"].startswith("CVE-")
    assert int(bad["properties"]["critical"]) > 0
    assert bad["properties"]["action"] == "Enforce"
    assert held["good"][0]["policy"] == refusing and "cves" not in held["good"][0][
        "properties"]
    assert metric(sandbox_env, "scangate_policy_report_writes_total",
                  'result="created"') >= 1

    # The image fixed (the gate admits the clean one): fail turns into pass.
    kubectl("set", "image", "deployment/bad", f"app={clean}", "-n", namespace)
    fixed = wait_for(lambda: (r := results(kubectl, namespace)) and {
        n: [x["result"] for x in rs] for n, rs in r.items()} == {
        "good": ["pass"], "bad": ["pass"]} and r, 180, "the fixed workload to pass")
    assert fixed["bad"][0]["rule"] == clean

    # A change that changes no result (a label of the namespace: looked at again) does not
    # write the report again, within more than a pass (POLICY_REPORT_INTERVAL 10 s). The
    # API server would keep the resourceVersion of a write that changes nothing: the
    # operator's log says what it wrote.
    offset = operator_log(sandbox_env).stat().st_size
    kubectl("label", "namespace", namespace, "touched=yes")
    time.sleep(11)
    assert f"PolicyReport of {namespace} " not in log_since(sandbox_env, offset)
