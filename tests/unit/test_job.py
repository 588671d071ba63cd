"""The scan Job's name and script."""

from __future__ import annotations

from scangate.core.scanstate import scan_key
from scangate.scanning.job import ScanJobSpec, TrivySettings, build_job, job_name, trivy_command

SPEC = ScanJobSpec(scan_name="api", namespace="ns", scan_uid="u1",
                   image="r.example/team/api@sha256:aa", queued_at="2026-11-29T12:00:00Z",
                   attempt=1, timeout_seconds=300)


def test_a_job_is_named_for_its_attempt_and_for_the_digest_and_options_it_scans() -> None:
    key = scan_key("sha256:aa", ["vuln"], False)
    name = job_name("api", "u1", "2026-11-29T12:00:00Z", 1, key)
    assert build_job(SPEC, TrivySettings())["metadata"]["name"] == name
    # A tag moved within the same second of queueing: another digest, another Job, never
    # the last one's result.
    assert name != job_name("api", "u1", "2026-11-29T12:00:00Z", 1,
                            scan_key("sha256:bb", ["vuln"], False))
    assert name != job_name("api", "u1", "2026-11-29T12:00:00Z", 1,
                            scan_key("sha256:aa", ["vuln"], True))
    assert name != job_name("api", "u1", "2026-11-29T12:00:00Z", 2, key)
    assert name == job_name("api", "u1", "2026-11-29T12:00:00Z", 1, key)  # a restart finds it


def test_only_a_standalone_job_asks_trivy_which_db_it_has() -> None:
    client = trivy_command(SPEC, TrivySettings(mode="ClientServer"))
    standalone = trivy_command(SPEC, TrivySettings(mode="Standalone"))
    assert "trivy version" not in client and "emit version" not in client
    assert "trivy version --format json" in standalone and "emit version" in standalone
    assert all("emit report" in script for script in (client, standalone))
