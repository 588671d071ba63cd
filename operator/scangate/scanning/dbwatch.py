"""Noticing a new vulnerability DB every TRIVY_DB_CHECK_INTERVAL: in ClientServer mode the
Trivy server's `GET /version`; in Standalone mode the DB repository's manifest digest
(a HEAD), and, when it changes, the new DB's metadata.json, read from its archive as it
streams (the archive is not kept).

When the DB's `UpdatedAt` is another than the one known, the scan index learns it
(ScanIndex.new_db) and the leader requeues every result made with an older DB
(ScanIndex.requeue_older) through the one scan queue (its Job limit, its dedup by
digest), those of the digests running Pods first; only results of the DB known are
reused; and admission knows which results are stale (ScanPolicy staleResults). A DB
rolled back to an older one rescans nothing (no result is older than it). Every replica
asks (a gate replica needs the DB it judges staleness by); only the leader requeues,
once per DB (and at its first look after it gains the lead): the scan reconciler runs
on it alone.

The server answers with what a Trivy server is, not a tenant: still, the answer is
bounded in size and read through db_stamps (a stamp that is not a time says nothing).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime

import httpx

from scangate import metrics
from scangate.cache import Cache
from scangate.config import Settings
from scangate.core.dbmetadata import MetadataReader
from scangate.core.destinations import Destinations
from scangate.core.durations import parse_duration
from scangate.core.images import parse_image
from scangate.core.results import db_stamps
from scangate.core.scanstate import parse_time
from scangate.registry.configured import base_url, registry_client

log = logging.getLogger("scangate.dbwatch")
MAX_ANSWER_BYTES = 64 * 1024
"""A /version answer is a few hundred bytes; a larger one is not read."""
TIMEOUT_SECONDS = 10.0
DEFAULT_DB_REPOSITORY = "mirror.gcr.io/aquasec/trivy-db:2"
"""Trivy's own first DB repository: where Standalone Jobs download the DB without
TRIVY_DB_REPOSITORY."""
DB_DOWNLOAD_SECONDS = 600.0


class DBCheckError(Exception):
    """The server's DB could not be told."""


def server_db(answer: bytes) -> datetime:
    """The DB's UpdatedAt in a Trivy server's /version answer."""
    if len(answer) > MAX_ANSWER_BYTES:
        raise DBCheckError(f"the answer is larger than {MAX_ANSWER_BYTES} bytes")
    try:
        version = json.loads(answer)
    except (ValueError, RecursionError):
        raise DBCheckError("the answer is not JSON") from None
    stamps = db_stamps(version.get("VulnerabilityDB") if isinstance(version, dict) else None)
    updated = parse_time(stamps.get("dbUpdatedAt"))
    if updated is None:
        raise DBCheckError("the answer names no VulnerabilityDB.UpdatedAt")
    return updated


class DBWatch:
    def __init__(self, settings: Settings, cache: Cache,
                 destinations: Destinations | None = None) -> None:
        self.settings, self.cache = settings, cache
        self.destinations = destinations or Destinations.of(settings.allowed_networks, [])
        self._repository_digest: str | None = None
        self._repository_db: datetime | None = None
        """Standalone: the DB repository's manifest digest last read, and its DB."""
        self._requeued_for: datetime | None = None
        """The DB whose older results this replica, leading, last requeued."""
        self.interval = parse_duration(settings.trivy_db_check_interval).total_seconds()
        self.url = settings.trivy_server_url.rstrip("/") + "/version"
        self.active: Callable[[], bool] = lambda: True
        """Whether this replica leads (scangate.leader): only its requeues are acted on."""
        self.checked = asyncio.Event()
        """Set after each look (tests and the bench wait on it)."""

    async def run(self) -> None:
        if self.interval <= 0:
            await asyncio.Event().wait()  # nothing to watch; the operator runs on
        # Results are compared with the DB once they are all known.
        await self.cache.imagescans.synced.wait()
        async with httpx.AsyncClient(timeout=TIMEOUT_SECONDS, follow_redirects=False) as http:
            while True:
                try:
                    if self.settings.trivy_mode == "ClientServer":
                        await self.check(http)
                    else:
                        await self.check_repository()
                except Exception as e:  # looked at again next time
                    metrics.DB_CHECKS.labels("failed").inc()
                    log.warning("could not tell the vulnerability DB (%s): %s",
                                self.url if self.settings.trivy_mode == "ClientServer"
                                else self.repository, e)
                self.checked.set()
                await asyncio.sleep(self.interval)

    async def check(self, http: httpx.AsyncClient) -> None:
        async with http.stream("GET", self.url) as response:
            if response.status_code != 200:
                raise DBCheckError(f"HTTP {response.status_code}")
            answer = b""
            async for chunk in response.aiter_bytes():
                answer += chunk
                if len(answer) > MAX_ANSWER_BYTES:
                    break
        self.learn(server_db(answer))

    @property
    def repository(self) -> str:
        return self.settings.trivy_db_repository or DEFAULT_DB_REPOSITORY

    async def check_repository(self) -> None:
        """Standalone: the DB the repository serves now (what the next Job downloads)."""
        ref = parse_image(self.repository)
        url = base_url(ref, None, self.settings)
        registry = {"insecureSkipTLSVerify": self.settings.trivy_insecure_db_repository}
        async with registry_client(url, registry, None, ref.registry, self.settings,
                                   self.destinations) as client:
            digest = (await client.resolve(ref)).digest
            if digest != self._repository_digest or self._repository_db is None:
                layers = await client.layers(ref.repository, digest)
                if not layers:
                    raise DBCheckError(f"the DB artifact {digest} has no layer")
                reader = MetadataReader()

                async def read(response: httpx.Response) -> None:
                    async for chunk in response.aiter_bytes():
                        reader.feed(chunk)
                        if reader.metadata is not None:
                            return  # the rest of the archive is not needed

                await client.blob(ref.repository, layers[0][0], read, DB_DOWNLOAD_SECONDS)
                updated = parse_time(db_stamps(reader.metadata).get("dbUpdatedAt"))
                if updated is None:
                    raise DBCheckError(f"the DB artifact {digest} names no UpdatedAt")
                self._repository_digest, self._repository_db = digest, updated
        self.learn(self._repository_db)

    def learn(self, updated: datetime) -> int:
        """The scanner uses a DB made at `updated`: hold results to it, and (the leader,
        once per DB, also after it gains the lead) rescan what an older one made."""
        known = self.cache.scans.known_db
        changed = self.cache.scans.new_db(updated, datetime.now(UTC))
        metrics.VULNERABILITY_DB.set(updated.timestamp())
        metrics.DB_CHECKS.labels("new" if changed else "same").inc()
        if changed:
            log.info("vulnerability DB %s (the operator knew %s)", updated.isoformat(),
                     known.isoformat() if known else "none",
                     extra={"dbUpdatedAt": updated.isoformat()})
        if not self.active() or self._requeued_for == updated:
            return 0
        self._requeued_for = updated
        running = {image.digest for pod in self.cache.running_pods.items.values()
                   for image in pod.images if image.digest}
        stale = self.cache.scans.requeue_older(first=running)
        metrics.DB_RESCANS.inc(stale)
        if stale:
            log.info("%d results made with a DB older than %s are scanned again, those of "
                     "running images first", stale, updated.isoformat(),
                     extra={"dbUpdatedAt": updated.isoformat(), "rescans": stale})
        return stale
