"""Noticing a new vulnerability DB (scangate.scanning.dbwatch) on the scan index."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from scangate.cache import Cache
from scangate.config import Settings
from scangate.core.scanstate import ScanIndex, ScanState, scan_key
from scangate.scanning.dbwatch import MAX_ANSWER_BYTES, DBCheckError, DBWatch, server_db

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)
OLD, NEW = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 28, 6, tzinfo=UTC)


def version(updated: str) -> bytes:
    return json.dumps({"Version": "0.76.0", "VulnerabilityDB": {
        "Version": 2, "UpdatedAt": updated, "NextUpdate": "2026-11-28T12:00:00Z"}}).encode()


def test_the_servers_db_is_read_from_its_version_answer() -> None:
    assert server_db(version("2026-11-28T06:00:00.123456789Z")) == NEW


@pytest.mark.parametrize("answer", [b"<html>", b"[]", b'{"VulnerabilityDB": {}}',
                                    version("soon"), b"x" * (MAX_ANSWER_BYTES + 1)])
def test_an_answer_that_names_no_db_is_an_error(answer: bytes) -> None:
    with pytest.raises(DBCheckError):
        server_db(answer)


def done(name: str, digest: str, db: datetime) -> ScanState:
    return ScanState("ns", name, uid=name, version=1, image=f"r/{name}:1", phase="Completed",
                     digest=digest, scanned_at=NOW - timedelta(hours=1),
                     queued_at=NOW - timedelta(hours=1),
                     result_key=scan_key(digest, ["vuln"], False), summary=(0,) * 6,
                     db_updated_at=db)


def test_a_newer_db_rescans_older_results_once() -> None:
    cache = Cache(ScanIndex(timedelta(hours=24)))
    for s in (done("a", "sha256:a", OLD), done("b", "sha256:b", NEW)):
        cache.scans.upsert_scan(s)
    watch = DBWatch(Settings(), cache)  # type: ignore[call-arg]
    assert watch.learn(OLD) == 0  # the first DB known: no result is older than it
    assert watch.learn(NEW) == 1
    assert cache.scans.known_db == NEW
    assert [a.scan.name for a in cache.scans.plan(NOW, 1)] == ["a"]
    assert watch.learn(NEW) == 0


def test_only_the_leader_requeues_and_a_new_leader_does_at_its_first_look() -> None:
    cache = Cache(ScanIndex(timedelta(hours=24)))
    cache.scans.upsert_scan(done("a", "sha256:a", OLD))
    watch = DBWatch(Settings(), cache)  # type: ignore[call-arg]
    leading = False
    watch.active = lambda: leading
    assert watch.learn(NEW) == 0 and cache.scans.known_db == NEW  # held to it all the same
    assert cache.scans.plan(NOW, 1) == []  # nothing piled up on a replica that does not plan
    leading = True
    assert watch.learn(NEW) == 1
    assert [a.scan.name for a in cache.scans.plan(NOW, 1)] == ["a"]
