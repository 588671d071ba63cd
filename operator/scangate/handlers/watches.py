"""kopf's watches feed the shared cache (scangate.cache): one event handler per kind.

Event handlers, not kopf indexes: measured with kopf 1.45.2 and 10,000 ImageScans, one
`@kopf.index` took 502 s at a full core to warm up (every object's worker waits on the
index-readiness condition and all of them wake on each change), an `@kopf.on.event`
handler feeding a dict 7.0 s. Event handlers also write nothing to the objects (no
progress or diff-base annotations: 10,000 ImageScans would be 10,000 writes).

The handlers are coroutines: kopf runs plain functions on a thread pool, and the cache
belongs to the event loop.

Scan Jobs and their pods live in the operator's namespace only, and the operator may
list them there only (RBAC pinned by tests): they are handlers of a second kopf
operator, limited to that namespace, in the same process (`SCAN_JOBS`).
"""

from __future__ import annotations

from typing import Any

import kopf

from scangate.api import GROUP, VERSION
from scangate.cache import Cache
from scangate.handlers import listing

SCAN_JOBS = kopf.OperatorRegistry()
"""The handlers of the kopf operator that watches the operator's namespace only."""


@kopf.on.login(registry=SCAN_JOBS)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """As the default registry does: the kubernetes client's configuration."""
    return kopf.login_via_client(**kwargs)


def follow_listings(cache: Cache) -> None:
    for group, plural, store in (
            (GROUP, "imagescans", cache.imagescans), (GROUP, "scanrules", cache.scanrules),
            (GROUP, "scanpolicies", cache.scanpolicies), ("", "namespaces", cache.namespaces),
            ("batch", "jobs", cache.scan_jobs), ("", "configmaps", cache.configmaps)):
        listing.follow(group, plural, store)
    listing.follow("", "pods", cache.scan_pods, cluster_wide=False)
    listing.follow("", "pods", cache.running_pods, cluster_wide=True)


@kopf.on.event(GROUP, VERSION, "imagescans")
async def imagescan_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.cache.imagescans.event(event["type"], event["object"])


@kopf.on.event(GROUP, VERSION, "scanrules")
async def scanrule_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.cache.scanrules.event(event["type"], event["object"])


@kopf.on.event(GROUP, VERSION, "scanpolicies")
async def scanpolicy_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.cache.scanpolicies.event(event["type"], event["object"])


@kopf.on.event("", "v1", "namespaces")
async def namespace_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.cache.namespaces.event(event["type"], event["object"])


# Every Pod of the cluster, for the inventory of what runs (scangate.inventory): the
# store keeps the running ones, as their workload and images.
@kopf.on.event("", "v1", "pods")
async def pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.cache.running_pods.event(event["type"], event["object"])


@kopf.on.event("batch", "v1", "jobs", registry=SCAN_JOBS)
async def scan_job_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.cache.scan_jobs.event(event["type"], event["object"])


# A Job is marked complete up to a second after its pod succeeds (the Job controller
# batches its syncs): the pods say first that a result is ready.
@kopf.on.event("", "v1", "pods", registry=SCAN_JOBS)
async def scan_pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.cache.scan_pods.event(event["type"], event["object"])


# VEX documents (scangate.vexdocs): ConfigMaps of the operator's namespace only, never a
# tenant's.
@kopf.on.event("", "v1", "configmaps", registry=SCAN_JOBS)
async def configmap_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.cache.configmaps.event(event["type"], event["object"])
