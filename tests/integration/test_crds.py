"""The custom resources on a real API server: schemas, CEL rules, the operator's webhook."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import Kubectl

pytestmark = pytest.mark.sandbox
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def scanrule(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"registry": {"url": "https://registry.example.com"},
                            "scope": {"namespaces": ["team-a"]}}
    base.update(spec)
    return {"apiVersion": "scangate.dev/v1alpha1", "kind": "ScanRule",
            "metadata": {"name": "bad"}, "spec": base}


def scanpolicy(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "scangate.dev/v1alpha1", "kind": "ScanPolicy",
            "metadata": {"name": "bad"}, "spec": spec}


def imagescan(image: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "scangate.dev/v1alpha1", "kind": "ImageScan",
            "metadata": {"name": "bad"}, "spec": {"image": image, **spec}}


def notification(name: str, type_: str = "webhook") -> dict[str, Any]:
    return {"name": name, "type": type_, "urlSecretRef": {"name": "s"}}


INVALID = {
    "regex that does not compile": (scanrule(tagFilter="v(1"), "spec.tagFilter"),
    "regex outside RE2": (scanrule(tagFilter=r"(v)\1"), "spec.tagFilter"),
    "cron out of range": (scanrule(triggers={"schedule": "61 * * * *"}),
                          "spec.triggers.schedule"),
    "cron with three fields": (scanrule(triggers={"schedule": "* * *"}),
                               "spec.triggers.schedule"),
    "unknown scanner": (scanrule(scan={"scanners": ["vulns"]}), "spec.scan.scanners"),
    "unparseable duration": (scanrule(scan={"timeout": "10 minutes"}), "spec.scan.timeout"),
    "timeout too short": (scanrule(scan={"timeout": "1s"}), "spec.scan.timeout"),
    "missing registry url": (scanrule(registry={}), "spec.registry.url"),
    "caBundle that holds no certificate": (scanrule(registry={
        "url": "https://registry.example.com",
        "caBundle": "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"}),
        "spec.registry.caBundle"),
    "registry url not http(s)": (scanrule(registry={"url": "ftp://registry.example.com"}),
                                 "spec.registry.url"),
    "unknown notification type": (scanrule(notifications=[notification("n", "slack")]),
                                  "spec.notifications[0].type"),
    "duplicate notification names": (
        scanrule(notifications=[notification("a"), notification("a")]), "spec.notifications"),
    "repositories with two namespaces": (
        scanrule(scope={"namespaces": ["a", "b"], "repositories": ["api"]}),
        "spec.scope.repositories"),
    "misspelt field": (scanrule(tagfilter=".*"), "tagfilter"),
    "unknown action": (scanpolicy(action="Block"), "spec.action"),
    "negative threshold": (scanpolicy(thresholds={"critical": -1}), "spec.thresholds.critical"),
    "allowlist entry without id": (scanpolicy(allowlist=[{"reason": "x"}]), "spec.allowlist[0].id"),
    "allowlist expiry not a date": (scanpolicy(allowlist=[{"id": "CVE-2023-1", "expires": "soon"}]),
                                    "spec.allowlist[0].expires"),
    "unknown unscanned mode": (scanpolicy(unscanned="Maybe"), "spec.unscanned"),
    "unclosed glob": (scanpolicy(match={"images": ["registry.example.com/[prod"]}),
                      "spec.match.images[0]"),
    "bad maxScanAge": (scanpolicy(maxScanAge="a week"), "spec.maxScanAge"),
    "selector In without values": (
        scanpolicy(match={"namespaceSelector": {"matchExpressions": [
            {"key": "env", "operator": "In"}]}}),
        "spec.match.namespaceSelector.matchExpressions[0].values"),
    "image reference with uppercase repository": (imagescan("registry.example.com/Team/API:1"),
                                                  "spec.image"),
    "image reference with a bad digest": (imagescan("registry.example.com/a/b@sha256:xyz"),
                                          "spec.image"),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_invalid_objects_are_refused_naming_the_field(
    kubectl: Kubectl, namespace: str, case: str
) -> None:
    obj, field = INVALID[case]
    result = kubectl.run("apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=False)
    assert result.returncode != 0, f"{case}: accepted"
    assert field in result.stderr, f"{case}: {result.stderr}"
    kind = obj["kind"].lower()
    assert kubectl.run("get", kind, "bad", "-n", namespace, check=False).returncode != 0


def test_every_example_applies_and_lists_in_the_category(kubectl: Kubectl) -> None:
    for example in sorted(EXAMPLES.glob("*.yaml")):
        kubectl("apply", "-f", str(example))
    listing = kubectl("get", "scangate", "-A", "-o", "name")
    assert "scanrule.scangate.dev/team-a-releases" in listing
    assert "imagescan.scangate.dev/api-1-4-2" in listing
    assert "scanpolicy.scangate.dev/production" in listing
    assert "scanpolicy.scangate.dev/staging-warn" in listing

    headers = {
        "scanrules": ["NAME", "REGISTRY", "SCHEDULE", "READY", "LAST RUN", "CRITICAL", "HIGH"],
        "imagescans": ["NAME", "IMAGE", "PHASE", "CRITICAL", "HIGH", "MEDIUM", "LOW", "AGE"],
        "scanpolicies": ["NAME", "ACTION", "CRITICAL", "HIGH", "FIXABLE ONLY", "UNSCANNED"],
    }
    for plural, columns in headers.items():
        header = kubectl("get", plural, "-A").splitlines()[0]
        for column in columns:
            assert column in header, f"{plural}: {column} missing from {header!r}"
    row = kubectl("get", "scanpolicy", "production", "--no-headers").split()
    assert row[:5] == ["production", "Enforce", "0", "0", "true"]

    # Defaults from the schema are applied by the API server.
    rule = json.loads(kubectl("get", "scanrule", "team-a-releases", "-n", "team-a", "-o", "json"))
    assert rule["spec"]["scan"]["platform"] == "linux/amd64"
    assert rule["spec"]["suspend"] is False


def test_kubectl_explain_documents_fields(kubectl: Kubectl) -> None:
    explained = kubectl("explain", "scanrule.spec.tagFilter")
    assert "must match the whole tag" in explained
    for path in ("imagescan.status.findingsTruncated", "scanpolicy.spec.allowlist.expires",
                 "scanrule.spec.notifications.urlSecretRef"):
        description = kubectl("explain", path).split("DESCRIPTION:")[1].strip()
        assert len(description) > 20, path


def test_status_is_written_only_through_the_subresource(
    kubectl: Kubectl, namespace: str
) -> None:
    # No rule, no operator reconciling ImageScans yet: status stays as we write it.
    kubectl.apply(json.dumps({"apiVersion": "scangate.dev/v1alpha1", "kind": "ScanPolicy",
                              "metadata": {"name": f"status-{namespace}"},
                              "spec": {"action": "Audit"}}))
    name = f"status-{namespace}"
    patch = json.dumps({"status": {"observedGeneration": 42}})
    kubectl("patch", "scanpolicy", name, "--type=merge", "-p", patch)
    obj = json.loads(kubectl("get", "scanpolicy", name, "-o", "json"))
    assert obj.get("status", {}).get("observedGeneration") != 42
    kubectl("patch", "scanpolicy", name, "--type=merge", "-p", patch, "--subresource=status")
    obj = json.loads(kubectl("get", "scanpolicy", name, "-o", "json"))
    assert obj["status"]["observedGeneration"] == 42
    # ...and the spec cannot be changed through the status subresource.
    kubectl("patch", "scanpolicy", name, "--type=merge", "--subresource=status",
            "-p", json.dumps({"spec": {"action": "Enforce"}}))
    assert json.loads(kubectl("get", "scanpolicy", name, "-o", "json"))["spec"]["action"] == "Audit"
    kubectl("delete", "scanpolicy", name)


def test_imagescan_image_is_immutable(kubectl: Kubectl, namespace: str) -> None:
    scan = imagescan("registry.example.com/team-a/api:1.0.0")
    scan["metadata"]["name"] = "immutable"
    kubectl.apply(json.dumps(scan), namespace)
    scan["spec"]["image"] = "registry.example.com/team-a/api:2.0.0"
    result = kubectl.run("apply", "-n", namespace, "-f", "-", input=json.dumps(scan), check=False)
    assert result.returncode != 0
    assert "image is immutable" in result.stderr


def test_crds_in_the_repository_are_what_the_api_server_serves(kubectl: Kubectl) -> None:
    served = json.loads(kubectl("get", "crd", "scanrules.scangate.dev", "-o", "json"))
    on_disk = yaml.safe_load((EXAMPLES.parent / "crds" / "scanrules.scangate.dev.yaml").read_text())
    assert served["spec"]["versions"][0]["schema"] == on_disk["spec"]["versions"][0]["schema"]


@pytest.mark.parametrize("tag_filter", ["((a|b)|a)*c", "(a?){50}a{50}", ".*.*.*.*.*x"])
def test_backtracking_bombs_are_plain_re2_and_accepted(
    kubectl: Kubectl, namespace: str, tag_filter: str
) -> None:
    """A backtracking engine would hang on these; RE2 matches them in linear time, so
    they are accepted as what they are: valid expressions."""
    rule = scanrule(tagFilter=tag_filter)
    rule["metadata"]["name"] = "bomb"
    kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(rule))
