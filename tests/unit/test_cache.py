"""The shared cache and the kopf handlers that feed it, without an API server: what a
store holds and tells, when it is synced, what a relist removes, and which kopf handlers
importing the handler modules registers."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, cast

import kopf
import pytest
from kopf._cogs.clients import watching

from scangate.cache import Cache, Store
from scangate.core.scanstate import ScanIndex


def _obj(name: str, version: int, namespace: str = "ns", **extra: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name, "uid": f"uid-{name}",
                         "resourceVersion": str(version), **extra}}


def _names(store: Store[Any]) -> list[str]:
    return sorted(name for _, name in store.items)


def _store() -> tuple[Store[dict[str, Any]], list[tuple[str, bool]]]:
    told: list[tuple[str, bool]] = []
    store: Store[dict[str, Any]] = Store("things", lambda obj: obj)
    store.subscribe(lambda obj, gone: told.append((obj["metadata"]["name"], gone)))
    return store, told


def test_a_store_holds_the_newest_and_tells_its_subscribers() -> None:
    store, told = _store()
    store.event(None, _obj("a", 5))
    store.event("MODIFIED", _obj("a", 7))
    store.apply(_obj("a", 6))  # older than held: the watch's late news
    assert store.items[("ns", "a")]["metadata"]["resourceVersion"] == "7"
    store.event("DELETED", _obj("a", 8))
    assert store.items == {}
    assert told == [("a", False), ("a", False), ("a", True)]


def test_one_failing_subscriber_does_not_keep_the_news_from_the_others() -> None:
    store, told = _store()

    def broken(obj: dict[str, Any], gone: bool) -> None:
        raise RuntimeError("boom")

    store._subscribers.insert(0, broken)
    store.event(None, _obj("a", 1))
    assert told == [("a", False)]


def test_an_unreadable_object_is_left_out_and_the_listing_still_syncs() -> None:
    def project(obj: dict[str, Any]) -> str:
        if obj["metadata"]["name"] == "bad":
            raise ValueError("cannot read")
        return str(obj["metadata"]["name"])

    store: Store[str] = Store("things", project)
    store.listing_started()
    store.event(None, _obj("good", 1))
    store.event(None, _obj("bad", 2))
    store.listed({("ns", "good"), ("ns", "bad")})
    assert store.synced.is_set()
    assert _names(store) == ["good"]


def test_synced_only_once_every_listed_object_is_handled() -> None:
    store, _ = _store()
    store.listing_started()
    store.event(None, _obj("a", 1))  # handled before the listing ends (kopf's workers)
    store.listed({("ns", "a"), ("ns", "b"), ("ns", "c")})
    assert not store.synced.is_set()
    store.event(None, _obj("b", 2))
    assert not store.synced.is_set()
    store.event("DELETED", _obj("c", 3))  # deleted before its listing event was handled
    assert store.synced.is_set()
    assert _names(store) == ["a", "b"]


def test_an_empty_listing_is_synced_at_once() -> None:
    store, _ = _store()
    store.listing_started()
    store.listed(set())
    assert store.synced.is_set()


def test_a_relist_removes_what_was_deleted_while_the_watch_was_down() -> None:
    store, told = _store()
    store.listing_started()
    for name in ("a", "b"):
        store.event(None, _obj(name, 1))
    store.listed({("ns", "a"), ("ns", "b")})
    told.clear()
    store.listing_started()  # the watch expired: kopf lists again, with no DELETED for b
    store.event(None, _obj("a", 1))
    store.listed({("ns", "a")})
    assert _names(store) == ["a"]
    assert ("b", True) in told


def test_a_relist_keeps_what_the_operator_created_meanwhile() -> None:
    """An ImageScan the operator creates while kopf relists is held from the create's
    answer; the listing's snapshot may predate it. Dropping it would tell the reconciler
    it was deleted, and its scan Job would be deleted as an orphan."""
    store, told = _store()
    store.listing_started()
    store.event(None, _obj("a", 1))
    store.listed({("ns", "a")})
    store.listing_started()
    store.apply(_obj("new", 5))  # created now, after the list's snapshot
    store.event(None, _obj("a", 1))
    store.listed({("ns", "a")})
    assert _names(store) == ["a", "new"]
    assert ("new", True) not in told


def test_scan_jobs_of_someone_else_are_not_held() -> None:
    cache = Cache(ScanIndex(timedelta(hours=1)))
    job = {**_obj("other", 1, namespace="scangate-system"), "spec": {}, "status": {}}
    cache.scan_jobs.event(None, job)
    assert cache.scan_jobs.items == {}
    assert cache.scans.jobs == {}


def test_imagescans_reach_the_scan_index() -> None:
    cache = Cache(ScanIndex(timedelta(hours=1)))
    cache.imagescans.event(None, {**_obj("s", 3), "spec": {"image": "reg/app:1"}})
    assert ("ns", "s") in cache.scans.scans
    cache.imagescans.event("DELETED", {**_obj("s", 4), "spec": {"image": "reg/app:1"}})
    assert cache.scans.scans == {}


def test_the_listing_hook_reports_each_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook over kopf's list-then-watch (scangate.handlers.listing) passes every event
    on and tells the store what each listing held; kopf's private function it wraps must
    still take the arguments kopf's watcher passes."""
    from scangate.handlers import listing

    params = inspect.signature(listing._kopf_continuous_watch).parameters
    assert {"settings", "resource", "namespace", "operator_pause_waiter"} <= set(params)

    async def upstream(**_: Any) -> AsyncIterator[Any]:
        yield {"type": None, "object": _obj("a", 1)}
        yield {"type": None, "object": _obj("b", 2)}
        yield watching.Bookmark.LISTED
        yield {"type": "ADDED", "object": _obj("c", 3)}

    monkeypatch.setattr(listing, "_kopf_continuous_watch", upstream)
    store, _ = _store()
    store.event(None, _obj("stale", 1))
    listing.follow("example.dev", "things", store)
    assert watching.continuous_watch is listing._listing_watch

    class Resource:
        group, plural = "example.dev", "things"

    async def consume() -> list[Any]:
        stream = watching.continuous_watch(
            resource=Resource(), settings=None, namespace=None,  # type: ignore[arg-type]
            operator_pause_waiter=None)  # type: ignore[arg-type]
        return [e async for e in stream]

    events = asyncio.run(consume())
    assert len(events) == 4 and events[2] is watching.Bookmark.LISTED
    assert _names(store) == []  # "stale" was not listed; a and b not handled yet
    assert not store.synced.is_set()
    for name in ("a", "b"):
        store.event(None, _obj(name, 1))
    assert store.synced.is_set()


def _handlers(registry: kopf.OperatorRegistry, group: str, plural: str) -> list[str]:
    """The ids of the handlers of one resource in a kopf registry (as kopf lists them)."""
    return [str(h.id) for kind in (registry._watching, registry._changing, registry._webhooks)
            for h in kind.get_all_handlers()
            if h.selector is not None and h.selector.group == group
            and plural in (h.selector.plural, h.selector.any_name)]


def test_importing_the_handler_modules_registers_kopf_handlers() -> None:
    from scangate.handlers import scanrules, validation, watches  # noqa: F401

    registry = kopf.get_default_registry()
    scanrule = _handlers(registry, "scangate.dev", "scanrules")
    imagescan = _handlers(registry, "scangate.dev", "imagescans")
    assert any("scanrule_event" in h for h in scanrule)
    assert any("scanrule_changed" in h for h in scanrule)
    assert any("scanrule_scan_now" in h for h in scanrule)
    assert any("imagescan_event" in h for h in imagescan)
    assert any("scanpolicy_event" in h
               for h in _handlers(registry, "scangate.dev", "scanpolicies"))
    jobs = _handlers(watches.SCAN_JOBS, "batch", "jobs")
    assert any("scan_job_event" in h for h in jobs)
    assert any("scan_pod_event" in h for h in _handlers(watches.SCAN_JOBS, "", "pods"))


def test_a_trimmed_imagescan_projects_as_the_whole_one() -> None:
    """What kopf queues is the trimmed body: its projection must not change, and what is
    dropped is the bulk (findings, the per-ID index, managedFields)."""
    from scangate.core.scanstate import project_scan

    whole = {"metadata": {"namespace": "ns", "name": "s", "uid": "u", "resourceVersion": "9",
                          "generation": 2, "annotations": {"a": "b"},
                          "ownerReferences": [{"kind": "ScanRule", "name": "r",
                                               "controller": True}],
                          "managedFields": [{"manager": "scangate", "fieldsV1": {}}] * 20},
             "spec": {"image": "reg/app:1", "scanners": ["vuln"], "ruleRef": {"name": "r"}},
             "status": {"phase": "Completed", "digest": "sha256:1", "indexDigest": "sha256:2",
                        "summary": {"critical": 1, "high": 0, "medium": 0, "low": 0,
                                    "unknown": 0, "total": 1},
                        "fixable": {"critical": 1, "high": 0, "medium": 0, "low": 0,
                                    "unknown": 0, "total": 1},
                        "findings": [{"id": f"CVE-{i}", "severity": "CRITICAL"}
                                     for i in range(500)],
                        "vulnerabilityIndex": "x" * 100_000,
                        "scannedAt": "2026-12-01T00:00:00Z", "completionTime":
                        "2026-12-01T00:00:00Z", "queuedAt": "2026-12-01T00:00:00Z",
                        "attempts": 1, "jobName": "j", "jobUID": "ju",
                        "scannedWith": {"scanners": ["vuln"], "ignoreUnfixed": False},
                        "notified": {"hook": {"key": "k"}}, "rescanRequest": "pushed (t)",
                        "rescanAnswered": "pushed (t)",
                        "conditions": [{"type": "Ready", "status": "True",
                                        "lastTransitionTime": "2026-12-01T00:00:00Z"}]}}
    import copy
    import json

    trimmed = copy.deepcopy(whole)
    Cache(ScanIndex(timedelta(hours=1))).imagescans.trim(trimmed)
    assert project_scan(trimmed) == project_scan(whole)
    assert len(json.dumps(trimmed)) < len(json.dumps(whole)) / 20


def test_only_the_kinds_with_change_handlers_get_an_essence_built() -> None:
    """kopf builds an essence (deep copies of the body) on every event; scangate has it
    built only for the kinds whose change handlers compare it. A change handler on another
    kind would see no change at all: the set is pinned against the registries."""
    from scangate.handlers import scanrules, validation, watches  # noqa: F401
    from scangate.operator import CHANGE_HANDLED_KINDS, kopf_settings

    changed = {h.selector.plural or h.selector.any_name
               for registry in (kopf.get_default_registry(), watches.SCAN_JOBS)
               for h in registry._changing.get_all_handlers() if h.selector is not None}
    assert changed == {"scanrules"}
    assert {"ScanRule"} == CHANGE_HANDLED_KINDS

    storage = kopf_settings().persistence.diffbase_storage
    rule = kopf.Body(cast(kopf.RawBody, {"apiVersion": "scangate.dev/v1alpha1",
                                         "kind": "ScanRule", **_obj("r", 1),
                                         "spec": {"schedule": "@daily"}}))
    scan = kopf.Body(cast(kopf.RawBody, {"apiVersion": "scangate.dev/v1alpha1",
                                         "kind": "ImageScan", **_obj("s", 1),
                                         "spec": {"image": "reg/app:1"}}))
    assert storage.build(body=rule).get("spec") == {"schedule": "@daily"}
    assert storage.build(body=scan) == {}
    assert storage.fetch(body=scan) == {}


def test_pods_are_told_to_the_store_of_their_watch_scope(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Pods are watched twice: cluster-wide (the inventory's running pods) and in the
    operator's namespace (scan pods); each listing reaches the store of its own watch."""
    from scangate.handlers import listing, watches

    async def upstream(**_: Any) -> AsyncIterator[Any]:
        yield {"type": None, "object": _obj("p", 1)}
        yield watching.Bookmark.LISTED

    monkeypatch.setattr(listing, "_kopf_continuous_watch", upstream)
    monkeypatch.setattr(listing, "_stores", {})
    cache = Cache(ScanIndex(timedelta(hours=24)))
    watches.follow_listings(cache)

    class Resource:
        group, plural = "", "pods"

    async def consume(namespace: str | None) -> None:
        stream = watching.continuous_watch(
            resource=Resource(), settings=None, namespace=namespace,  # type: ignore[arg-type]
            operator_pause_waiter=None)  # type: ignore[arg-type]
        [e async for e in stream]

    asyncio.run(consume(None))
    assert not cache.running_pods.synced.is_set() and not cache.scan_pods.synced.is_set()
    cache.running_pods.event(None, _obj("p", 1))
    assert cache.running_pods.synced.is_set() and not cache.scan_pods.synced.is_set()
    asyncio.run(consume("scangate-system"))
    cache.scan_pods.event(None, _obj("p", 1))
    assert cache.scan_pods.synced.is_set()
    assert any("pod_event" in h
               for h in _handlers(kopf.get_default_registry(), "", "pods"))


def test_a_slimmed_pod_projects_as_the_whole_one() -> None:
    """A Pod's body is cut to what the projection reads before kopf queues it."""
    from scangate.core.running import project_running_pod

    digest = "sha256:" + "a" * 64
    container = {"name": "app", "image": "reg.example/app:1", "env": [{"name": "X",
                 "value": "y" * 1000}], "resources": {"limits": {"cpu": "1"}}}
    whole = {"metadata": {**_obj("web-5f7-abc", 7)["metadata"],
                          "labels": {"pod-template-hash": "5f7", "app": "web"},
                          "annotations": {"note": "z" * 4000},
                          "ownerReferences": [{"kind": "ReplicaSet", "name": "web-5f7",
                                               "controller": True}],
                          "managedFields": [{"manager": "kubelet"}] * 20},
             "spec": {"containers": [container], "initContainers": [dict(container)],
                      "volumes": [{"name": "v"}] * 10, "nodeName": "n1"},
             "status": {"phase": "Running", "podIP": "10.0.0.1",
                        "conditions": [{"type": "Ready"}] * 5,
                        "containerStatuses": [{"name": "app", "imageID": f"r/app@{digest}",
                                               "state": {"running": {}}}]}}
    import copy
    import json

    cache = Cache(ScanIndex(timedelta(hours=24)))
    slimmed = copy.deepcopy(whole)
    cache.running_pods.trim(slimmed)
    assert project_running_pod(slimmed) == project_running_pod(whole)
    assert len(json.dumps(slimmed)) * 5 < len(json.dumps(whole))
    assert slimmed["metadata"]["labels"] == {"pod-template-hash": "5f7"}
    assert "annotations" not in slimmed["metadata"]
    assert slimmed["spec"]["containers"] == [{"name": "app", "image": "reg.example/app:1"}]
    # what is not running leaves the store
    cache.running_pods.event(None, whole)
    assert list(cache.running_pods.items) == [("ns", "web-5f7-abc")]
    cache.running_pods.event("MODIFIED", {**whole, "status": {"phase": "Succeeded"}})
    assert cache.running_pods.items == {}
