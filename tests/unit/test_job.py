"""The scan Job's name and script."""

from __future__ import annotations

from dataclasses import replace

from scangate.core.scanstate import scan_key
from scangate.scanning.job import (
    ScanJobSpec,
    TrivySettings,
    build_job,
    credentials_secret,
    credentials_secret_name,
    job_name,
    trivy_command,
)

SPEC = ScanJobSpec(scan_name="api", scan_namespace="ns", scan_uid="u1",
                   image="r.example/team/api@sha256:aa", queued_at="2026-11-29T12:00:00Z",
                   attempt=1, timeout_seconds=300)


def test_a_job_is_named_for_its_attempt_and_for_the_digest_and_options_it_scans() -> None:
    key = scan_key("sha256:aa", ["vuln"], False)
    name = job_name("ns", "api", "u1", "2026-11-29T12:00:00Z", 1, key)
    assert build_job(SPEC, TrivySettings(), "scangate-system")["metadata"]["name"] == name
    # A tag moved within the same second of queueing: another digest, another Job, never
    # the last one's result.
    assert name != job_name("ns", "api", "u1", "2026-11-29T12:00:00Z", 1,
                            scan_key("sha256:bb", ["vuln"], False))
    assert name != job_name("ns", "api", "u1", "2026-11-29T12:00:00Z", 1,
                            scan_key("sha256:aa", ["vuln"], True))
    assert name != job_name("ns", "api", "u1", "2026-11-29T12:00:00Z", 2, key)
    assert name == job_name("ns", "api", "u1", "2026-11-29T12:00:00Z", 1, key)  # a restart finds it


def test_only_a_standalone_job_asks_trivy_which_db_it_has() -> None:
    client = trivy_command(SPEC, TrivySettings(mode="ClientServer"))
    standalone = trivy_command(SPEC, TrivySettings(mode="Standalone"))
    assert "trivy version" not in client and "emit version" not in client
    assert "trivy version --format json" in standalone and "emit version" in standalone
    assert all("emit report" in script for script in (client, standalone))


def test_a_job_runs_in_the_operators_namespace_and_names_its_scan_by_uid() -> None:
    job = build_job(SPEC, TrivySettings(token_secret="trivy-token"), "scangate-system")
    meta = job["metadata"]
    assert meta["namespace"] == "scangate-system" and "ownerReferences" not in meta
    assert meta["labels"]["scangate.dev/imagescan-uid"] == "u1"
    assert meta["labels"]["scangate.dev/imagescan-namespace"] == "ns"
    assert meta["annotations"]["scangate.dev/imagescan"] == "ns/api"
    assert job["spec"]["suspend"] is False
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    # The Trivy token is read from the operator's own Secret, where the Job runs.
    assert {"name": "TRIVY_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "trivy-token", "key": "token"}}} in env


def test_credentials_reach_a_job_through_a_copy_it_owns() -> None:
    spec = replace(SPEC, credentials_type="kubernetes.io/basic-auth")
    job = build_job(spec, TrivySettings(), "scangate-system")
    assert job["spec"]["suspend"] is True  # resumed once its copy of the credentials exists
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    copy = credentials_secret_name(job["metadata"]["name"])
    assert {"name": "TRIVY_PASSWORD", "valueFrom": {"secretKeyRef": {
        "name": copy, "key": "password"}}} in env
    job["metadata"]["uid"] = "job-uid"
    source = {"type": "kubernetes.io/basic-auth", "metadata": {"name": "creds"},
              "data": {"username": "dQ==", "password": "cA==", "note": "bm90IGNvcGllZA=="}}
    secret = credentials_secret(job, source)
    assert secret["metadata"]["name"] == copy
    assert secret["metadata"]["namespace"] == "scangate-system"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "job-uid"
    assert secret["data"] == {"username": "dQ==", "password": "cA=="}
    docker = replace(SPEC, credentials_type="kubernetes.io/dockerconfigjson")
    mounted = build_job(docker, TrivySettings(), "scangate-system")["spec"]["template"]["spec"]
    assert mounted["volumes"][1]["secret"]["secretName"] == credentials_secret_name(
        build_job(docker, TrivySettings(), "scangate-system")["metadata"]["name"])


def test_the_scan_pods_memory_limit_is_the_setting() -> None:
    container = build_job(SPEC, TrivySettings(memory_limit="300Mi"), "scangate-system")[
        "spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["memory"] == "300Mi"
    assert container["resources"]["requests"]["memory"] == "256Mi"
    assert TrivySettings().resources["limits"]["memory"] == "1Gi"
    # Below the usual request, the request follows it down (the API server refuses more).
    small = TrivySettings(memory_limit="10Mi").resources
    assert small["requests"]["memory"] == small["limits"]["memory"] == "10Mi"
    assert TrivySettings(memory_limit="2G").resources["requests"]["memory"] == "256Mi"
