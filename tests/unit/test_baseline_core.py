"""Baseline checks and secrets (issue 27): Trivy's misconfigurations and secrets as scangate
stores them (never a matched value), the scan Job's options and the scrubbing of its
report, and ScanPolicy's misconfig thresholds, denyChecks and `secrets`."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from scangate.core.framing import BEGIN, END
from scangate.core.policy import Effect, ImageResult, Kind, Policy, decide, judge, parse_policy
from scangate.core.results import result_from_log
from scangate.core.scanstate import ScanIndex, ScanState, scan_key
from scangate.core.trivy import parse_report, summarize
from scangate.scanning.job import SCRUB, ScanJobSpec, TrivySettings, trivy_command

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
IMAGE = "registry.example.com/prod/api:1.0"
DIGEST = "sha256:" + "cd" * 32
# Random, not a real key; Trivy's rules ignore keys that look like AWS's documented examples.
KEY = "Zq3vT8mW1pR7xK2nB5cY9dL4fH6jS0aG3eU8iO2w"
KEY_ID = "AKIA2E0A8F3B244C9986"


def code(*lines: str) -> dict[str, Any]:
    return {"Lines": [{"Number": i + 1, "Content": line, "IsCause": i == 1,
                       "Highlighted": line} for i, line in enumerate(lines)]}


def check(cid: str, severity: str, title: str, status: str = "FAIL") -> dict[str, Any]:
    return {"Type": "Dockerfile Security Check", "ID": cid, "AVDID": "", "Title": title,
            "Message": f"'apt-get install -y sudo' with {KEY}", "Severity": severity,
            "Status": status,
            "CauseMetadata": {"Code": code(f"ENV AWS_SECRET_ACCESS_KEY={KEY}")}}


def report(with_secrets: bool = True, with_checks: bool = True) -> dict[str, Any]:
    """Shaped as Trivy 0.76 writes it for an image that runs as root with an AWS key in
    its ENV and a credentials file (the shape seen in tests/integration/test_baseline.py)."""
    results: list[dict[str, Any]] = [
        {"Target": "img (debian 12.5)", "Class": "os-pkgs", "Type": "debian",
         "Vulnerabilities": [{"VulnerabilityID": "CVE-2024-0001", "PkgName": "openssl",
                              "InstalledVersion": "3.0.0", "FixedVersion": "3.0.1",
                              "Severity": "HIGH"}]}]
    if with_checks:
        results.append({"Target": "img", "Class": "config", "Type": "dockerfile",
                        "MisconfSummary": {"Successes": 24, "Failures": 3},
                        "Misconfigurations": [
                            check("DS-0026", "LOW", "No HEALTHCHECK defined"),
                            check("DS-0002", "HIGH", "Image user should not be 'root'"),
                            check("DS-0031", "CRITICAL", "Secrets passed via envs"),
                            check("DS-0001", "MEDIUM", "':latest' tag used", "PASS")]})
    if with_secrets:
        results += [
            {"Target": "/app/.aws/credentials", "Class": "secret", "Secrets": [
                {"RuleID": "aws-access-key-id", "Category": "AWS", "Severity": "CRITICAL",
                 "Title": "AWS Access Key ID", "StartLine": 2, "EndLine": 2,
                 "Code": code("[default]", "aws_access_key_id = " + "*" * 20,
                              f"aws_secret_access_key = {KEY}"),
                 "Match": "aws_access_key_id = " + "*" * 20,
                 "Layer": {"DiffID": "sha256:00", "CreatedBy": f"RUN echo {KEY_ID}"}}]},
            {"Target": "img", "Class": "secret", "Secrets": [
                {"RuleID": "aws-secret-access-key", "Category": "AWS", "Severity": "CRITICAL",
                 "Title": "AWS Secret Access Key", "StartLine": 38, "EndLine": 38,
                 "Code": code(f'"AWS_SECRET_ACCESS_KEY={"*" * 40}"', f"{KEY_ID}"),
                 "Match": f'  "AWS_SECRET_ACCESS_KEY={"*" * 40}"'}]}]
    return {"SchemaVersion": 2, "ArtifactName": "img", "ArtifactType": "container_image",
            "Metadata": {"OS": {"Family": "debian", "Name": "12.5"},
                         "ImageConfig": {"config": {"Env": [f"AWS_SECRET_ACCESS_KEY={KEY}"]},
                                         "history": [{"created_by": f"ENV K={KEY}"}]}},
            "Results": results}


def test_checks_and_secrets_are_summarised_by_rule_and_place_never_by_value() -> None:
    out = summarize(parse_report(json.dumps(report())), scanners=["vuln", "misconfig", "secret"])
    assert out["misconfigurations"] == {"critical": 1, "high": 1, "medium": 0, "low": 1,
                                        "unknown": 0, "total": 3}
    assert [c["id"] for c in out["failedChecks"]] == ["DS-0031", "DS-0002", "DS-0026"]
    assert out["failedChecks"][1] == {"id": "DS-0002", "title": "Image user should not be "
                                      "'root'", "severity": "HIGH", "target": "image config"}
    assert out["secretSummary"]["critical"] == 2 and out["secretSummary"]["total"] == 2
    assert {(s["ruleID"], s["target"], s.get("field")) for s in out["secrets"]} == {
        ("aws-access-key-id", "/app/.aws/credentials", None),
        ("aws-secret-access-key", "image config", "Env AWS_SECRET_ACCESS_KEY")}
    assert out["baseline"] == "3 checks, 2 secrets" and out["baselineTruncated"] is False
    text = json.dumps(out)
    assert KEY not in text and KEY_ID not in text and "*" * 4 not in text
    assert out["summary"]["high"] == 1  # the vulnerabilities as before


def test_a_scanner_that_did_not_run_clears_its_fields() -> None:
    out = summarize(parse_report(json.dumps(report(False, False))), scanners=["vuln"])
    assert all(out[k] is None for k in ("misconfigurations", "failedChecks", "secretSummary",
                                         "secrets", "baseline", "baselineTruncated"))
    # Ran, found nothing: zero counts, and the column says so.
    clean = summarize(parse_report(json.dumps(report(False, False))),
                      scanners=["vuln", "secret", "misconfig"])
    assert clean["baseline"] == "0 checks, 0 secrets" and clean["secrets"] == []
    # Without the options (`scangate report summarize`), what the report shows.
    assert summarize(parse_report(json.dumps(report())))["baseline"] == "3 checks, 2 secrets"


def test_checks_and_secrets_keep_to_their_share_of_the_budget() -> None:
    many = report()
    many["Results"][-1]["Secrets"] *= 2000
    out = summarize(parse_report(json.dumps(many)), budget_bytes=16 * 1024,
                    scanners=["vuln", "secret", "misconfig"])
    assert out["secretSummary"]["total"] == 2001 and out["baselineTruncated"] is True
    assert len(json.dumps(out["secrets"], separators=(",", ":"))) <= 4 * 1024
    assert out["findings"] and out["findingsTruncated"] is False  # the CVE still fits


SPEC = ScanJobSpec(scan_name="api", scan_namespace="ns", scan_uid="u1",
                   image="r.example/team/api@sha256:aa", queued_at="2026-12-03T12:00:00Z",
                   attempt=1, timeout_seconds=300)


def test_the_job_runs_the_config_scanners_offline_only_when_asked() -> None:
    plain = trivy_command(SPEC, TrivySettings())
    assert "--image-config-scanners" not in plain and "--skip-check-update" not in plain
    every = ScanJobSpec(**{**SPEC.__dict__, "scanners": ("vuln", "misconfig", "secret")})
    alone = trivy_command(every, TrivySettings(mode="Standalone")).splitlines()
    main = next(line for line in alone if line.startswith("trivy image"))
    assert "--scanners vuln,misconfig,secret" in main
    assert "--image-config-scanners misconfig,secret" in main and "--skip-check-update" in main
    assert "emit checks" not in "\n".join(alone)
    # A Trivy server loses the config's checks: they run in a local Trivy of their own.
    client = trivy_command(every, TrivySettings()).splitlines()
    served, local = [line for line in client if line.startswith("trivy image")]
    assert "--scanners vuln,secret" in served and "--server" in served
    assert "--image-config-scanners secret " in served and "--skip-check-update" not in served
    assert "--scanners misconfig --" in local and "--server" not in local
    assert "--image-config-scanners misconfig" in local and "--skip-check-update" in local
    assert "emit checks /var/run/scangate/checks.clean.json" in client
    # Whatever the scanners, each report is scrubbed before it is printed.
    assert all("emit report /var/run/scangate/result.json" in s
               for s in (plain, "\n".join(alone), "\n".join(client)))


def test_the_checks_of_a_local_run_join_the_servers_report() -> None:
    served = report(with_checks=False)
    checks = {"SchemaVersion": 2, "ArtifactName": "img",
              "Results": [r for r in report()["Results"] if r["Class"] == "config"]}
    log = "\n".join(_frame(name, json.dumps(body).encode())
                    for name, body in (("checks", checks), ("report", served)))
    out = result_from_log(log, 64 * 1024, scanners=["vuln", "misconfig", "secret"])
    assert out["baseline"] == "3 checks, 2 secrets" and out["summary"]["high"] == 1


def _frame(name: str, data: bytes) -> str:
    packed = gzip.compress(data)
    return "\n".join([f"{BEGIN} name={name} size={len(packed)} "
                      f"sha256={hashlib.sha256(packed).hexdigest()}",
                      base64.encodebytes(packed).decode().rstrip("\n"), f"{END} name={name}"])


@pytest.mark.parametrize("awk", ["awk", "busybox awk"])
def test_the_job_scrubs_every_value_a_secret_may_be_in_and_nothing_scangate_reads(
        tmp_path: Any, awk: str) -> None:
    if awk == "busybox awk" and subprocess.run(["sh", "-c", "command -v busybox"],
                                               capture_output=True).returncode:
        pytest.skip("no busybox here (the scan image's awk)")
    raw = report()
    # Go's MarshalIndent lays JSON out as Python's indent=2 does, non-ASCII as is.
    path = tmp_path / "report.json"
    path.write_text(json.dumps(raw, indent=2, ensure_ascii=False))
    script = SCRUB.replace("awk '", f"{awk} '", 1)
    done = subprocess.run(["sh", "-c", f"{script} {path}"], capture_output=True, text=True,
                          check=True)
    assert KEY not in done.stdout and KEY_ID not in done.stdout
    scrubbed = json.loads(done.stdout)
    assert scrubbed["Metadata"]["ImageConfig"] == {}
    assert scrubbed["Metadata"]["OS"] == raw["Metadata"]["OS"]
    assert scrubbed["Results"][-1]["Secrets"][0]["Match"] == "AWS_SECRET_ACCESS_KEY=****"
    options = ["vuln", "misconfig", "secret"]
    assert (summarize(parse_report(done.stdout), scanners=options)
            == summarize(parse_report(json.dumps(raw)), scanners=options))
    # A report cut inside ImageConfig is refused, not passed on half-scrubbed.
    lines = path.read_text().splitlines()
    cut = tmp_path / "cut.json"
    cut.write_text("\n".join(lines[:lines.index('    "ImageConfig": {') + 3]))
    assert subprocess.run(["sh", "-c", f"{script} {cut}"], capture_output=True).returncode


def policy(name: str = "gate", **spec: Any) -> Policy:
    return parse_policy({"metadata": {"name": name}, "spec": spec})


def result(scanners: list[str] | None = None, **source: Any) -> ImageResult:
    options = scanners or ["vuln", "misconfig", "secret"]
    status = {**summarize(parse_report(json.dumps(report(**source))), scanners=options),
              "phase": "Completed", "digest": DIGEST, "scannedAt": NOW.isoformat(),
              "scannedWith": {"scanners": options}}
    return ImageResult.from_status(status)


def test_secrets_deny_refuses_naming_the_rule_and_where_warn_warns_allow_looks_away() -> None:
    denied = judge(policy(secrets="Deny"), result(), IMAGE, NOW)
    assert denied.kind is Kind.SECRETS_FOUND and denied.effect is Effect.ENFORCE
    for said in ("2 secrets found", "aws-secret-access-key (CRITICAL, AWS) in image config "
                 "(Env AWS_SECRET_ACCESS_KEY)", "aws-access-key-id", "/app/.aws/credentials "
                 "line 2", "remove the secrets"):
        assert said in denied.message, (said, denied.message)
    assert KEY not in denied.message
    warned = judge(policy(secrets="Warn"), result(), IMAGE, NOW)
    assert warned.effect is Effect.WARN and "2 secrets found" in warned.summary
    assert not judge(policy(secrets="Allow"), result(), IMAGE, NOW).failed
    assert not judge(policy(secrets="Deny"), result(with_secrets=False), IMAGE, NOW).failed


def test_a_denied_check_refuses_on_its_own_and_thresholds_count_failed_checks() -> None:
    verdict = judge(policy(misconfig={"denyChecks": ["ds-0002"]}), result(), IMAGE, NOW)
    assert verdict.kind is Kind.MISCONFIGURED and verdict.effect is Effect.ENFORCE
    assert "check DS-0002 failed" in verdict.message
    assert "DS-0002 (HIGH) Image user should not be 'root' in image config" in verdict.message
    assert not judge(policy(misconfig={"denyChecks": ["DS-0004"]}), result(), IMAGE,
                     NOW).failed
    over = judge(policy(misconfig={"thresholds": {"critical": 0}}), result(), IMAGE, NOW)
    assert over.counts == ("misconfig critical 1 > 0",) and "DS-0031" in over.message
    assert not judge(policy(misconfig={"thresholds": {"critical": 1, "high": 1}}), result(),
                     IMAGE, NOW).failed
    # Vulnerabilities, checks and secrets failing together: one story, every part named.
    both = judge(policy(thresholds={"high": 0}, secrets="Warn",
                        misconfig={"denyChecks": ["DS-0002"]}), result(), IMAGE, NOW)
    assert both.kind is Kind.VULNERABLE and both.effect is Effect.ENFORCE
    assert both.counts == ("high 1 > 0", "check DS-0002 failed", "2 secrets found")


def test_a_result_without_a_needed_scanner_is_unscanned_and_the_scan_asks_for_it() -> None:
    vuln_only = result(scanners=["vuln"], with_secrets=False, with_checks=False)
    strict = policy("strict", secrets="Deny", misconfig={"denyChecks": ["DS-0002"]})
    verdict = judge(strict, vuln_only, IMAGE, NOW)
    assert verdict.kind is Kind.UNSCANNED and verdict.needs_scan
    assert "without the misconfig (configuration checks) and secret scanners" in verdict.message
    decision = decide([strict, policy("plain", thresholds={"critical": 0})],
                      {IMAGE: vuln_only}, "prod", {}, {}, NOW)
    assert not decision.allowed and decision.needs_scan == (IMAGE,)
    assert decision.scanners == {IMAGE: ("misconfig", "secret", "vuln")}
    # A result made before scannedWith existed was a vulnerability scan.
    old = ImageResult.from_status({"phase": "Completed", "digest": DIGEST,
                                   "summary": {"total": 0}, "scannedAt": NOW.isoformat()})
    assert judge(strict, old, IMAGE, NOW).kind is Kind.UNSCANNED
    assert not judge(policy(thresholds={"critical": 0}), old, IMAGE, NOW).failed
    # A clean image scanned with everything passes the same policy.
    assert not judge(strict, result(with_secrets=False, with_checks=False), IMAGE, NOW).failed


def test_admission_prefers_the_newest_result_made_with_the_scanners_it_needs() -> None:
    index = ScanIndex(timedelta(hours=24))

    def scan(name: str, scanners: list[str], hours: int) -> ScanState:
        return ScanState("ns", name, uid=name, version=1, image="r/a:1", phase="Completed",
                         digest=DIGEST, scanners=tuple(scanners),
                         scanned_at=NOW - timedelta(hours=hours),
                         result_key=scan_key(DIGEST, scanners, False),
                         summary=(0, 0, 0, 0, 0, 0))

    index.upsert_scan(scan("full", ["vuln", "secret", "misconfig"], 5))
    index.upsert_scan(scan("newer", ["vuln"], 1))
    newest = index.newest_vulnerabilities(DIGEST)
    assert newest is not None and newest.name == "newer"
    chosen = index.newest_vulnerabilities(DIGEST, {"vuln", "secret"})
    assert chosen is not None and chosen.name == "full"
    # None has them all: the newest, which the policy then calls unscanned for that scanner.
    index.delete_scan(("ns", "full"))
    fallback = index.newest_vulnerabilities(DIGEST, {"secret"})
    assert fallback is not None and fallback.name == "newer"


def test_policy_check_takes_the_scanners_a_clean_report_cannot_show(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from scangate.cli import main

    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps(report(with_secrets=False, with_checks=False)))
    risky = tmp_path / "risky.json"
    risky.write_text(json.dumps(report()))
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("apiVersion: scangate.dev/v1alpha1\nkind: ScanPolicy\n"
                           "metadata: {name: s}\nspec: {secrets: Deny}\n")
    check = ["policy", "check", "--policy", str(policy_file), "--image", IMAGE, "--report"]
    # No secret results: the report alone cannot tell the scanner ran.
    assert main([*check, str(clean)]) == 1
    assert "without the secret scanner" in capsys.readouterr().out
    assert main([*check, str(clean), "--scanners", "vuln,secret"]) == 0
    capsys.readouterr()
    assert main([*check, str(risky)]) == 1
    out = capsys.readouterr().out
    assert "2 secrets found" in out and KEY not in out
