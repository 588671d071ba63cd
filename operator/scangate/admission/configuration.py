"""The ValidatingWebhookConfiguration that sends workloads to the gate.

Requests from the operator's own namespace, kube-system and namespaces labelled
scangate.dev/ignore=true never reach it (its namespaceSelector), so the operator can
always be repaired and the cluster's own machinery never waits on it.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from scangate.config import Settings
from scangate.kube import Kube, Obj

log = logging.getLogger("scangate.admission")
NAME = "scangate-workloads"
PATH = "/validate"
IGNORE_LABEL = "scangate.dev/ignore"
SERVICE_PORT = 8443
"""The port of the webhook Service that leads to the gate (the chart's)."""

RULES = [
    {"apiGroups": [""], "apiVersions": ["v1"],
     "resources": ["pods", "pods/ephemeralcontainers", "replicationcontrollers"]},
    {"apiGroups": ["apps"], "apiVersions": ["v1"],
     "resources": ["deployments", "statefulsets", "daemonsets", "replicasets"]},
    {"apiGroups": ["batch"], "apiVersions": ["v1"], "resources": ["jobs", "cronjobs"]},
]


def webhook_configuration(settings: Settings, ca_bundle: bytes) -> Obj:
    client: dict[str, Any] = {"caBundle": base64.b64encode(ca_bundle).decode()}
    if settings.webhook_host:  # outside a cluster (the sandbox): by URL
        client["url"] = f"https://{settings.webhook_host}:{settings.admission_port}{PATH}"
    else:
        client["service"] = {"namespace": settings.namespace, "name": settings.webhook_service,
                             "path": PATH, "port": SERVICE_PORT}
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/managed-by": "scangate"}},
        "webhooks": [{
            "name": "workloads.scangate.dev",
            "admissionReviewVersions": ["v1"],
            "clientConfig": client,
            "rules": [{**r, "operations": ["CREATE", "UPDATE"], "scope": "*"} for r in RULES],
            "failurePolicy": settings.admission_failure_policy,
            "matchPolicy": "Equivalent",
            # A dry run is answered but starts no scan.
            "sideEffects": "NoneOnDryRun",
            "timeoutSeconds": settings.admission_timeout_seconds,
            "namespaceSelector": {"matchExpressions": [
                {"key": IGNORE_LABEL, "operator": "NotIn", "values": ["true"]},
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                 "values": sorted({"kube-system", settings.namespace})},
            ]},
        }],
    }


async def keep_current(kube: Kube, settings: Settings) -> None:
    """Create the configuration, or bring the one there up to date."""
    if settings.webhook_ca_file is None:
        log.warning("no webhook CA file: the workload webhook configuration is not managed")
        return
    await kube.put_validating_webhook(
        webhook_configuration(settings, settings.webhook_ca_file.read_bytes()))
    log.info("workload webhook configuration %s current", NAME)
