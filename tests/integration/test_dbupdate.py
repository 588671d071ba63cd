"""A new vulnerability DB re-judges what runs: Deployments admitted under the sandbox's
first DB, a DB that adds a real advisory for a package of one of their images (hack/sandbox
db-update), and that image is refused, its receivers told once, without a layer pulled
again (the Trivy server's layer cache)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from test_inventory import MANIFEST_TYPES, status_running
from test_notify import Received, secret, serve

from conftest import Kubectl, wait_for
from sandbox.advisories import UPDATE_BUILT_AT, expected_findings, load_advisories, load_update
from sandbox.controlplane import Sandbox
from scangate.cache import Cache
from scangate.config import Settings
from scangate.core.scanstate import ScanIndex
from scangate.scanning.dbwatch import DBWatch
from scans import Policy, admit, counts, metric, push_variant, scans, sleeper

pytestmark = pytest.mark.sandbox
UPDATED_AT = UPDATE_BUILT_AT.strftime("%Y-%m-%dT%H:%M:%SZ")
ADDED = load_update()[0]["id"]
_BLOB_GET = re.compile(r'"GET /v2/(?P<repository>[^ ]+)/blobs/(?P<digest>sha256:[0-9a-f]{64}) ')


def layers(env: dict[str, str], image: str) -> set[str]:
    """The layer digests of a single-platform image, from its manifest."""
    repository, tag = image.split("/", 1)[1].rsplit(":", 1)
    answer = httpx.get(f"http://{env['REGISTRY']}/v2/{repository}/manifests/{tag}",
                       headers={"Accept": MANIFEST_TYPES}, timeout=10)
    answer.raise_for_status()
    return {layer["digest"] for layer in answer.json()["layers"]}


def blob_gets(sandbox: Sandbox, offset: int) -> list[tuple[str, str]]:
    """(repository, digest) of each blob GET the registry logged after `offset`."""
    with (sandbox.dir / "logs" / "registry.log").open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    return [(m["repository"], m["digest"]) for m in _BLOB_GET.finditer(text)]


@pytest.fixture
def db_restored(sandbox: Sandbox) -> Iterator[None]:
    """The sandbox's first DB again afterwards, for the tests that follow (a rollback
    rescans nothing, and results of the newer DB are not reused)."""
    yield
    sandbox.db_update(restore=True)


def test_a_new_db_refuses_a_running_image_and_tells_its_receivers_once_without_pulling(
    sandbox: Sandbox, kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
    policy: Policy, db_restored: None,
) -> None:
    app, variants = push_variant(sandbox_env, "python-app")
    clean, _ = push_variant(sandbox_env, "clean")
    decl = next(iter(variants.values()))
    before = counts(expected_findings(decl, load_advisories()))
    after = expected_findings(decl, [*load_advisories(), *load_update()])
    added = next(f for f in after if f["id"] == ADDED)
    assert counts(after)["medium"] == before["medium"] + 1  # the advisory is the image's
    start = (sandbox.dir / "logs" / "registry.log").stat().st_size

    def scanned() -> dict[str, dict[str, Any]] | None:
        found = {s["spec"]["image"].partition("@")[0]: s for s in scans(
            kubectl, namespace).values() if (s.get("status") or {}).get("phase") == "Completed"}
        return found if {app, clean} <= set(found) else None

    hook = Received()
    name = f"news-{uuid.uuid4().hex[:6]}"
    with serve(hook, False) as hook_url:
        secret(kubectl, "scangate-system", name, url=f"{hook_url}/news")
        try:
            # Today's counts pass: at the medium threshold, not over it. What is not
            # scanned yet is admitted with a warning, so that the inventory's count goes
            # from Unscanned to Admitted once it has judged the results.
            policy(action="Enforce", thresholds={"high": before["high"],
                                                 "medium": before["medium"]},
                   unscanned="Warn",
                   notifications=[{"name": "news", "type": "webhook",
                                   "events": ["Blocked", "NewlyVulnerable"],
                                   "urlSecretRef": {"name": name}}])
            for workload, image in {"app": app, "clean": clean}.items():
                # Admitted with the policy's warning: the operator holds the policy (the
                # gate and the inventory read one cache), so no verdict without it counts.
                admitted, said = admit(kubectl, sleeper(workload, image), namespace)
                assert admitted and "not scanned yet" in said, said
            first = wait_for(scanned, 180, "the running images' scans")[app]["status"]
            assert first["scannedWith"]["dbUpdatedAt"] == "2026-11-01T00:00:00Z"
            assert ADDED not in {f["id"] for f in first["findings"]}
            # The first scan fetched the app's own layer (a fresh variant's): the log
            # counts it.
            own = layers(sandbox_env, app) | layers(sandbox_env, clean)
            assert own & {d for _, d in blob_gets(sandbox, start)}
            wait_for(lambda: status_running(sandbox_env, "-n", namespace).returncode == 0, 60,
                     "what runs to be admitted under the first DB")
            # ...and the operator's inventory has judged the results so (it recounts
            # every 15 s): what a newer DB refuses is news only against a verdict it had.
            wait_for(lambda: metric(sandbox_env, "scangate_running_images",
                                    f'namespace="{namespace}",verdict="Admitted"') == 2, 60,
                     "the inventory's verdicts under the first DB")
            offset = (sandbox.dir / "logs" / "registry.log").stat().st_size
            assert sandbox.db_update() == UPDATED_AT

            def rescanned() -> dict[str, Any] | None:
                found = scanned()
                status = found[app]["status"] if found else {}
                return status if status.get("scannedWith", {}).get(
                    "dbUpdatedAt") == UPDATED_AT else None

            status = wait_for(rescanned, 120, "the running image rescanned with the new DB")
            new = next(f for f in status["findings"] if f["id"] == ADDED)
            assert (new["fixedVersion"], new["installedVersion"]) == (
                added["fixedVersion"], added["installedVersion"])
            answer = wait_for(lambda: (r := status_running(
                sandbox_env, "-n", namespace, "-o", "json")).returncode == 1 and r, 60,
                "status --running to exit 1")
            workloads = {w["name"]: w["verdict"] for w in json.loads(answer.stdout)["workloads"]}
            assert workloads == {"app": "Refused", "clean": "Admitted"}

            wait_for(lambda: hook.bodies, 60, "the NewlyVulnerable message")
            news = [b for b in hook.bodies if b["event"] == "NewlyVulnerable"]
            assert len(news) == 1, hook.bodies
            assert news[0]["namespace"] == namespace and news[0]["workloads"] == [
                "Deployment/app"]
            assert [(f["id"], f["fixedVersion"]) for f in news[0]["worst"]] == [
                (ADDED, added["fixedVersion"])]
            assert hook.headers[0]["X-Scangate-Event"] == "NewlyVulnerable"
            events = json.loads(kubectl("get", "events", "-n", namespace, "--field-selector",
                                        "reason=NewlyVulnerable", "-o", "json"))["items"]
            assert [(e["involvedObject"]["kind"], e["involvedObject"]["name"])
                    for e in events] == [("Deployment", "app")]
            assert ADDED in events[0]["message"]
            # No layer of either image was fetched again: the server had them.
            pulled = [d for _, d in blob_gets(sandbox, offset) if d in own]
            assert pulled == [], pulled
        finally:
            kubectl.run("delete", "secret", name, "-n", "scangate-system", check=False)


def test_standalone_mode_reads_the_db_repository_s_newest_db_once_per_digest(
    sandbox: Sandbox, sandbox_env: dict[str, str],
) -> None:
    """Without a server to ask, the DB watch reads the DB repository (what the next
    Standalone Job downloads): its manifest each time, its archive's metadata.json only
    when the digest changed."""
    settings = Settings(  # type: ignore[call-arg]
        trivy_mode="Standalone", trivy_db_repository=sandbox_env["TRIVY_DB_REPOSITORY"],
        insecure_registries=[sandbox_env["REGISTRY"]], allowed_networks=["127.0.0.0/8"])
    cache = Cache(ScanIndex(timedelta(hours=24)))
    watch = DBWatch(settings, cache)
    served = httpx.get(f"{sandbox_env['TRIVY_SERVER']}/version", timeout=10).json()
    offset = (sandbox.dir / "logs" / "registry.log").stat().st_size
    asyncio.run(watch.check_repository())
    assert cache.scans.known_db is not None
    assert cache.scans.known_db.strftime("%Y-%m-%dT%H:%M:%SZ") == served[
        "VulnerabilityDB"]["UpdatedAt"]
    asyncio.run(watch.check_repository())
    fetched = [d for repository, d in blob_gets(sandbox, offset) if repository == "trivy-db"]
    assert len(fetched) == 1, fetched  # the second look was the manifest's alone
