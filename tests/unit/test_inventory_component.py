"""The inventory component on the shared cache, with a fake API: what it asks for (once
per image and namespace, none where the gate does not look or a scan of the digest
exists), at its own rate, and what it counts per namespace."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from prometheus_client import REGISTRY

from scangate.cache import Cache
from scangate.config import Settings
from scangate.core.scanstate import ScanIndex
from scangate.inventory import inventory as inventory_module
from scangate.inventory.inventory import Inventory

DIGESTS = ["sha256:" + f"{i:064x}" for i in range(10)]


class FakeKube:
    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}

    async def create_custom(self, plural: str, namespace: str, body: dict[str, Any]) -> bool:
        self.created.append(body)
        return True

    async def get_custom(self, plural: str, namespace: str, name: str
                         ) -> dict[str, Any] | None:
        return self.objects.get((namespace, name))


def pod(name: str, namespace: str, *digests: str, phase: str = "Running") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
            "spec": {"containers": [{"name": f"c{i}", "image": f"reg.example/app{i}:1"}
                                    for i in range(len(digests))]},
            "status": {"phase": phase, "containerStatuses": [
                {"name": f"c{i}", "imageID": f"reg.example/app{i}@{d}"}
                for i, d in enumerate(digests)]}}


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": "1", "labels": labels}}


def _inventory(**settings: Any) -> tuple[Inventory, Cache, FakeKube]:
    cache = Cache(ScanIndex(timedelta(hours=24)))
    kube = FakeKube()
    inventory = Inventory(kube, Settings(namespace="scangate-system", **settings),  # type: ignore[arg-type]
                          cache)
    for store in (cache.imagescans, cache.namespaces, cache.running_pods):
        store.listed(set())
    return inventory, cache, kube


async def _settle(inventory: Inventory, seconds: float) -> None:
    task = asyncio.create_task(inventory.run())
    await asyncio.sleep(seconds)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_each_running_image_is_asked_for_once_where_the_gate_looks() -> None:
    async def scenario() -> None:
        inventory, cache, kube = _inventory()
        for ns in (namespace("team-a"), namespace("quiet", **{"scangate.dev/ignore": "true"}),
                   namespace("kube-system")):
            cache.namespaces.event(None, ns)
        # A scan of DIGESTS[2] exists elsewhere (a rule's, in another namespace).
        cache.imagescans.event(None, {
            "metadata": {"namespace": "ci", "name": "rule-x", "resourceVersion": "1"},
            "spec": {"image": "reg.example/app2:1"},
            "status": {"phase": "Completed", "digest": DIGESTS[2],
                       "scannedAt": "2026-12-03T00:00:00Z"}})
        for i in range(5):  # five replicas of one workload
            cache.running_pods.event(None, pod(f"web-{i}", "team-a", DIGESTS[0], DIGESTS[1]))
        cache.running_pods.event(None, pod("db", "team-a", DIGESTS[2]))
        cache.running_pods.event(None, pod("p", "quiet", DIGESTS[3]))
        cache.running_pods.event(None, pod("p", "kube-system", DIGESTS[4]))
        cache.running_pods.event(None, pod("p", "team-a", DIGESTS[5], phase="Pending"))
        await _settle(inventory, 0.2)
        assert sorted(b["spec"]["image"] for b in kube.created) == [
            f"reg.example/app0:1@{DIGESTS[0]}", f"reg.example/app1:1@{DIGESTS[1]}"]
        assert {b["spec"]["trigger"] for b in kube.created} == {"Inventory"}
        assert {b["metadata"]["namespace"] for b in kube.created} == {"team-a"}
        assert all(b["metadata"]["name"].startswith("inventory-app") for b in kube.created)
        # The namespace is no longer ignored: what runs there is looked at.
        cache.namespaces.event("MODIFIED", namespace("quiet"))
        await _settle(inventory, 0.2)
        assert kube.created[-1]["spec"]["image"] == f"reg.example/app0:1@{DIGESTS[3]}"
        assert len(kube.created) == 3

    asyncio.run(scenario())


def test_a_cold_start_is_asked_for_at_the_inventorys_rate_and_nothing_is_dropped() -> None:
    async def scenario() -> None:
        inventory, cache, kube = _inventory(inventory_scan_rate=20.0, inventory_scan_burst=2)
        cache.namespaces.event(None, namespace("team-a"))
        for i, digest in enumerate(DIGESTS):
            cache.running_pods.event(None, pod(f"p{i}", "team-a", digest))
        await _settle(inventory, 0.15)
        # the burst at once, then 20 a second: not all ten within 0.15 s
        assert 2 <= len(kube.created) <= 6
        await _settle(inventory, 0.6)
        assert sorted(b["spec"]["image"].rsplit("@", 1)[1] for b in kube.created) == DIGESTS

    asyncio.run(scenario())


def test_the_leader_counts_running_images_by_verdict_per_namespace(monkeypatch: Any) -> None:
    monkeypatch.setattr(inventory_module, "JUDGE_EVERY", 0.05)

    async def scenario() -> None:
        inventory, cache, kube = _inventory()
        cache.namespaces.event(None, namespace("team-a"))
        cache.scanpolicies.event(None, {
            "apiVersion": "scangate.dev/v1alpha1", "kind": "ScanPolicy",
            "metadata": {"name": "strict", "resourceVersion": "1"},
            "spec": {"thresholds": {"critical": 0}}})
        scanned = {"phase": "Completed", "digest": DIGESTS[0],
                   "scannedAt": "2026-12-03T00:00:00Z",
                   "summary": {"critical": 2, "high": 0, "medium": 0, "low": 0,
                               "unknown": 0, "total": 2}}
        cache.imagescans.event(None, {"metadata": {"namespace": "team-a", "name": "s",
                                                   "resourceVersion": "1"},
                                      "spec": {"image": "reg.example/app0:1"},
                                      "status": scanned})
        kube.objects[("team-a", "s")] = {"status": scanned}
        cache.running_pods.event(None, pod("a", "team-a", DIGESTS[0]))
        cache.running_pods.event(None, pod("b", "team-a", DIGESTS[1]))
        await _settle(inventory, 1.3)

        def sample(verdict: str) -> float | None:
            return REGISTRY.get_sample_value(
                "scangate_running_images", {"namespace": "team-a", "verdict": verdict})

        assert sample("Refused") == 2  # critical 2 > 0, and one unscanned (Deny)
        inventory.active = lambda: False  # another replica leads: it counts, not this one
        await _settle(inventory, 1.2)
        assert sample("Refused") is None

    asyncio.run(scenario())
