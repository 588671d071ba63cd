"""The ValidatingWebhookConfiguration that sends workloads to the gate.

Requests from the operator's own namespace, kube-system and namespaces labelled
scangate.dev/ignore=true never reach it (its namespaceSelector), so the operator can
always be repaired and the cluster's own machinery never waits on it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from scangate.config import Settings
from scangate.core import coverage
from scangate.kube import Kube, Obj

log = logging.getLogger("scangate.admission")
NAME = "scangate-workloads"
PATH = "/validate"
PIN_NAME = "scangate-pin-digests"
PIN_PATH = "/mutate"
SERVICE_PORT = 8443
"""The port of the webhook Service that leads to the gate (the chart's)."""

CONTROLLER_WRITES = (
    "!((request.userInfo.username == 'system:kube-controller-manager'"
    " || (request.userInfo.username.startsWith('system:serviceaccount:kube-system:')"
    " && has(request.userInfo.groups)"
    " && 'system:serviceaccounts:kube-system' in request.userInfo.groups))"
    " && has(object.metadata.ownerReferences)"
    " && object.metadata.ownerReferences.exists(r, has(r.controller) && r.controller))")
"""CEL: false when a Kubernetes controller writes an object it controls (its owner's
template was judged), the only requests the webhook is not called for."""

RULES = [
    {"apiGroups": [""], "apiVersions": ["v1"],
     "resources": ["pods", "pods/ephemeralcontainers", "replicationcontrollers"]},
    {"apiGroups": ["apps"], "apiVersions": ["v1"],
     "resources": ["deployments", "statefulsets", "daemonsets", "replicasets"]},
    {"apiGroups": ["batch"], "apiVersions": ["v1"], "resources": ["jobs", "cronjobs"]},
]


def _client(settings: Settings, ca_bundle: bytes, path: str) -> Obj:
    client: Obj = {"caBundle": base64.b64encode(ca_bundle).decode()}
    if settings.webhook_host:  # outside a cluster (the sandbox): by URL
        client["url"] = f"https://{settings.webhook_host}:{settings.admission_port}{path}"
    else:
        client["service"] = {"namespace": settings.namespace, "name": settings.webhook_service,
                             "path": path, "port": SERVICE_PORT}
    return client


def _webhook(settings: Settings, ca_bundle: bytes, name: str, path: str) -> Obj:
    return {
        "name": name,
        "admissionReviewVersions": ["v1"],
        "clientConfig": _client(settings, ca_bundle, path),
        "rules": [{**r, "operations": ["CREATE", "UPDATE"], "scope": "*"} for r in RULES],
        "failurePolicy": settings.admission_failure_policy,
        "matchPolicy": "Equivalent",
        # A dry run is answered but starts no scan.
        "sideEffects": "NoneOnDryRun",
        "timeoutSeconds": settings.admission_timeout_seconds,
        # Judged in the gate too (core.workloads.owned_by_controller_request); here as well
        # so that controllers keep working while the gate cannot answer: Pods of an
        # admitted ReplicaSet are created, scan Jobs' pods lose their finalizers.
        "matchConditions": [{"name": "not-a-controller-writing-what-it-controls",
                             "expression": CONTROLLER_WRITES}],
        "namespaceSelector": namespace_selector(settings),
    }


def namespace_selector(settings: Settings) -> Obj:
    """The namespaces whose requests the API server sends to the gate (core.coverage)."""
    return coverage.namespace_selector(settings.namespace)


def covers(settings: Settings, namespace: str, labels: Mapping[str, str] | None) -> bool:
    """Whether a review from `namespace` (with `labels`, as the gate holds them from its
    watch; None for a namespace it does not know) can come from the API server through
    this configuration. Anything else reached the gate's port some other way: it is
    answered, but causes nothing (no scan, Event or notification)."""
    return coverage.covers(settings.namespace, namespace, labels)


def _metadata(name: str, owners: Sequence[Obj]) -> Obj:
    metadata: Obj = {"name": name, "labels": {"app.kubernetes.io/managed-by": "scangate"}}
    if owners:
        metadata["ownerReferences"] = list(owners)
    return metadata


def webhook_configuration(settings: Settings, ca_bundle: bytes, owners: Sequence[Obj] = ()
                          ) -> Obj:
    """The validating configuration: every workload to the gate."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": _metadata(NAME, owners),
        "webhooks": [_webhook(settings, ca_bundle, "workloads.scangate.dev", PATH)],
    }


def pin_configuration(settings: Settings, ca_bundle: bytes, owners: Sequence[Obj] = ()
                      ) -> Obj:
    """The mutating configuration of pinDigests: it answers at once, with no patch, while
    no ScanPolicy pins digests."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": _metadata(PIN_NAME, owners),
        "webhooks": [{**_webhook(settings, ca_bundle, "pin-digests.scangate.dev", PIN_PATH),
                      "reinvocationPolicy": "Never"}],
    }


async def own_kopf_configurations(kube: Kube, name: str, owners: Sequence[Obj],
                                  interval: float = 2.0, recheck: float = 60.0) -> None:
    """Keep kopf's own configurations (`name`, validating and mutating) owned as the gate's
    are, whenever kopf (re)creates them: kopf empties them when it stops, but never
    deletes them. Runs until cancelled."""
    uids = {o["uid"] for o in owners}
    while True:
        owned = 0
        try:
            for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
                found = await kube.get_webhook(kind, name)
                if found is None:
                    continue
                if not uids <= {o.get("uid")
                                for o in found["metadata"].get("ownerReferences") or []}:
                    await kube.put_webhook({"kind": kind, "metadata": _metadata(name, owners)})
                    log.info("webhook configuration %s %s owned by %s", kind, name,
                             ", ".join(f"{o['kind']} {o['name']}" for o in owners))
                owned += 1
        except Exception as e:  # the API server away: tried again, never the end of it
            log.warning("webhook configurations %s not checked: %s", name, type(e).__name__)
        await asyncio.sleep(recheck if owned == 2 else interval)


async def keep_current(kube: Kube, settings: Settings, ca_bundle: bytes,
                       pinning: Callable[[], bool], changed: asyncio.Event,
                       listening: asyncio.Event, owners: Sequence[Obj]) -> None:
    """Keep the configurations current: the gate's always; the pinDigests one only while
    a ScanPolicy pins digests, so that a cluster without one pays no second webhook call
    per request. Runs until cancelled, acting each time `changed` is set; starts once the
    gate is `listening` (a configuration naming a closed port would refuse workloads).
    `owners` (the chart's ClusterRole) have them removed with the release."""
    await listening.wait()
    await _until_done(f"the webhook configuration {NAME}", lambda: kube.put_webhook(
        webhook_configuration(settings, ca_bundle, owners)))
    log.info("workload webhook configuration %s current", NAME)
    pinned: bool | None = None
    while True:
        await changed.wait()
        changed.clear()
        if pinning() == pinned:
            continue
        pinned = pinning()
        if pinned:
            await _until_done(PIN_NAME, lambda: kube.put_webhook(
                pin_configuration(settings, ca_bundle, owners)))
        else:
            await _until_done(PIN_NAME, lambda: kube.delete_webhook(
                pin_configuration(settings, ca_bundle)))
        log.info("digest pinning webhook %s", "registered" if pinned else "removed")


async def _until_done(what: str, action: Callable[[], Awaitable[None]]) -> None:
    """Do `action`, again after a doubling delay while it fails (the API server away): a
    failure must not end the task that keeps the configurations (and the process)."""
    delay = 1.0
    while True:
        try:
            return await action()
        except Exception as e:
            log.warning("%s not written (%s); retrying in %.0fs", what, type(e).__name__,
                        delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
