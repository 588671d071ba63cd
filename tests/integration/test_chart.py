"""The Helm chart: linted, and rendered for several values combinations that the real API
server accepts (server-side dry run), with the conventions an HA install needs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import Kubectl
from scans import helm

pytestmark = pytest.mark.sandbox
CHART = Path(__file__).resolve().parents[2] / "charts" / "scangate"
COMBINATIONS = {
    "defaults": [],
    "three replicas": ["--set", "replicas=3"],
    "one replica": ["--set", "replicas=1"],
    "standalone trivy": ["--set", "trivyServer.enabled=false",
                         "--set", "config.trivyMode=Standalone",
                         "--set", "config.trivyDbRepository=mirror.example.com/trivy-db:2"],
    "certificate from a Secret": ["--set", "webhook.existingSecret=scangate-tls"],
    "gate and push receiver off": ["--set", "config.admissionPort=0",
                                   "--set", "config.pushPort=0"],
    "fail open": ["--set", "config.admissionFailurePolicy=Ignore"],
    "gate answers the API server only": ["--set", "webhook.clientAuth.enabled=true",
                                         "--set", "webhook.clientAuth.caSecret=apiserver-ca"],
    "malware signature mirror": ["--set", "malwareMirror.enabled=true"],
    "wgpolicyk8s.io reports": ["--set", "config.policyReports=wgpolicyk8s.io/v1alpha2"],
    "grafana dashboard": ["--set", "grafanaDashboard.enabled=true"],
}


def render(env: dict[str, str], namespace: str, *values: str, release: str = "scangate"
           ) -> list[dict[str, Any]]:
    text = helm(env, "template", release, str(CHART), "--namespace", namespace, *values)
    return [d for d in yaml.safe_load_all(text) if d]


def test_the_chart_lints(sandbox_env: dict[str, str]) -> None:
    out = helm(sandbox_env, "lint", str(CHART), "--strict")
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("values", list(COMBINATIONS), ids=list(COMBINATIONS))
def test_each_values_combination_is_accepted_by_the_api_server(
    kubectl: Kubectl, sandbox_env: dict[str, str], namespace: str, values: str,
) -> None:
    # A release of this test's own name: its cluster-scoped objects are named after it.
    objects = render(sandbox_env, namespace, *COMBINATIONS[values], release=namespace)
    manifest = "\n---\n".join(yaml.safe_dump(o) for o in objects)
    out = kubectl.run("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                      input=manifest, check=False)
    assert out.returncode == 0, out.stderr
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "Role", "Service"} <= kinds


def test_an_ha_install_spreads_replicas_and_keeps_the_gate_up(
    sandbox_env: dict[str, str],
) -> None:
    objects = {(o["kind"], o["metadata"]["name"]): o
               for o in render(sandbox_env, "scangate-system")}
    deployment = objects[("Deployment", "scangate")]["spec"]
    assert deployment["replicas"] >= 2
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["template"]["spec"]
    assert pod["affinity"]["podAntiAffinity"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admission",
                                                      "scheme": "HTTPS"}
    assert objects[("PodDisruptionBudget", "scangate")]["spec"]["minAvailable"] == 1
    ports = {p["name"]: p for p in objects[("Service", "scangate-webhook")]["spec"]["ports"]}
    assert ports["admission"]["port"] == 8443  # where the gate's configuration points
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SCANGATE_ADMISSION_FAILURE_POLICY"] == "Fail"
    one = {(o["kind"], o["metadata"]["name"]) for o in
           render(sandbox_env, "scangate-system", "--set", "replicas=1")}
    assert ("PodDisruptionBudget", "scangate") not in one  # it would block every drain
    assert json.dumps(container["securityContext"]).count("readOnlyRootFilesystem") == 1


@pytest.mark.parametrize(("values", "named"), [
    (["--set", "config.admissionFailurePolicy=Sometimes"], "/config/admissionFailurePolicy"),
    (["--set", "config.rescanInterval=daily"], "/config/rescanInterval"),
    (["--set", "replicas=0"], "/replicas"),
    (["--set", "config.noSuchSetting=1"], "noSuchSetting"),
    (["--set", "webhook.clientAuth.enabled=true"], "webhook.clientAuth.caSecret"),
    (["--set", "config.admissionScanRate=0"], "/config/admissionScanRate"),
])
def test_a_wrong_value_is_refused_naming_it(sandbox_env: dict[str, str], values: list[str],
                                            named: str) -> None:
    out = subprocess.run([sandbox_env["HELM"], "template", "scangate", str(CHART), *values],
                         capture_output=True, text=True)
    assert out.returncode != 0 and named in out.stderr, out.stderr


def test_the_certificate_comes_from_cert_manager_or_a_secret_when_asked(
    sandbox_env: dict[str, str],
) -> None:
    def kinds(*values: str) -> set[tuple[str, str]]:
        return {(o["kind"], o["metadata"]["name"])
                for o in render(sandbox_env, "scangate-system", *values)}

    generated = kinds()
    assert ("Secret", "scangate-webhook-tls") in generated
    managed = kinds("--set", "webhook.certManager.enabled=true")
    assert {("Certificate", "scangate-webhook"), ("Issuer", "scangate-selfsigned")} <= managed
    assert ("Secret", "scangate-webhook-tls") not in managed
    own_issuer = kinds("--set", "webhook.certManager.enabled=true",
                       "--set", "webhook.certManager.issuerRef.kind=ClusterIssuer",
                       "--set", "webhook.certManager.issuerRef.name=corp-ca")
    assert ("Issuer", "scangate-selfsigned") not in own_issuer
    provided = kinds("--set", "webhook.existingSecret=corp-tls")
    assert not {k for k in provided if k[0] in ("Certificate", "Secret")
                and "webhook" in k[1]}
    assert ("ServiceMonitor", "scangate") in kinds("--set", "serviceMonitor.enabled=true")


@pytest.mark.parametrize("values", list(COMBINATIONS), ids=list(COMBINATIONS))
def test_every_rendered_setting_is_one_the_operator_accepts(
    sandbox_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, values: str,
) -> None:
    # Helm reads numbers as floats: 67108864 (the log cap then) once rendered as
    # 6.7108864e+07, which the
    # operator refused at start (found by test_helm_install).
    from scangate.config import Settings

    objects = render(sandbox_env, "scangate-system", *COMBINATIONS[values])
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    env = {e["name"]: e["value"] for e in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.max_result_log_bytes == 16 * 1024 * 1024
    assert settings.max_result_bytes == 8 * 1024 * 1024
    assert str(settings.max_running_scans) == env["SCANGATE_MAX_RUNNING_SCANS"]
    if values == "malware signature mirror":
        assert settings.malware_db_url == "http://scangate-clamav-mirror.scangate-system/"
        mirror = next(o for o in objects if o["kind"] == "ConfigMap"
                      and o["metadata"]["name"] == "scangate-clamav-mirror")
        assert "ScriptedUpdates no" in mirror["data"]["freshclam.conf"]
    else:
        assert settings.malware_db_url is None


def test_every_pod_the_chart_makes_runs_confined_and_only_its_ports_are_open(
    sandbox_env: dict[str, str], namespace: str,
) -> None:
    objects = render(sandbox_env, namespace)
    templates = [(o["kind"], o["spec"]["template"]["spec"]) for o in objects
                 if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]
    assert {kind for kind, _ in templates} == {"Deployment", "StatefulSet"}
    for kind, pod in templates:
        context = pod["securityContext"]
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, kind
        assert context["runAsNonRoot"] is True, kind
        # Only the operator talks to the API server.
        assert pod.get("automountServiceAccountToken") is False or kind == "Deployment", kind
        for container in pod["containers"]:
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
    policies = {o["metadata"]["name"]: o["spec"] for o in objects
                if o["kind"] == "NetworkPolicy"}
    operator = policies["scangate"]
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    assert operator["podSelector"]["matchLabels"] == deployment["spec"]["selector"][
        "matchLabels"]
    opened = {p["port"] for rule in operator["ingress"] for p in rule["ports"]}
    declared = {p["containerPort"] for c in deployment["spec"]["template"]["spec"][
        "containers"] for p in c["ports"]}
    assert opened == declared
    restricted = render(sandbox_env, namespace, "--set-json", 'networkPolicy.metricsFrom='
                        '[{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}]')
    rules = next(o for o in restricted if o["kind"] == "NetworkPolicy"
                 and o["metadata"]["name"] == "scangate")["spec"]["ingress"]
    assert rules[1]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}]


@pytest.mark.parametrize(("chosen", "rule"), [
    ([], ("openreports.io", "reports")),
    (["--set", "config.policyReports=wgpolicyk8s.io/v1alpha2"],
     ("wgpolicyk8s.io", "policyreports")),
    (["--set", "config.policyReports="], None),
], ids=["openreports.io", "wgpolicyk8s.io", "off"])
def test_the_operator_may_write_only_the_report_api_chosen(
    sandbox_env: dict[str, str], chosen: list[str], rule: tuple[str, str] | None,
) -> None:
    role = next(o for o in render(sandbox_env, "scangate-system", *chosen)
                if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "scangate")
    reports = [(r["apiGroups"], r["resources"], r["verbs"]) for r in role["rules"]
               if {"openreports.io", "wgpolicyk8s.io"} & set(r["apiGroups"])]
    assert reports == ([([rule[0]], [rule[1]], ["get", "list", "create", "update", "delete"])]
                       if rule else [])
