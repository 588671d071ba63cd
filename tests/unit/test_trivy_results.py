"""Report parsing, summaries, bounded findings, and the framed result."""

from __future__ import annotations

import base64
import gzip
import json
from typing import Any

import pytest

from scangate.core import framing
from scangate.core.framing import FrameError
from scangate.core.results import db_stamps, log_tail, result_from_log
from scangate.core.trivy import ReportError, bound_findings, parse_report, summarize


def vuln(vid: str, severity: str, pkg: str = "openssl", fixed: str | None = "3.0.1",
         installed: str = "3.0.0") -> dict[str, Any]:
    v = {"VulnerabilityID": vid, "PkgName": pkg, "InstalledVersion": installed,
         "Severity": severity, "Title": f"{vid} title"}
    if fixed is not None:
        v["FixedVersion"] = fixed
    return v


def report(*results: dict[str, Any]) -> dict[str, Any]:
    return {"SchemaVersion": 2, "ArtifactName": "img", "Trivy": {"Version": "0.76.0"},
            "Metadata": {"OS": {"Family": "debian", "Name": "12.5", "EOSL": False}},
            "Results": list(results)}


OS_RESULT = {"Target": "img (debian 12.5)", "Class": "os-pkgs", "Type": "debian",
             "Vulnerabilities": [vuln("CVE-2024-0001", "LOW"), vuln("CVE-2024-0002", "CRITICAL"),
                                 vuln("CVE-2024-0003", "HIGH", fixed=None),
                                 vuln("CVE-2024-0004", "HIGH", pkg="zlib1g", fixed=""),
                                 vuln("CVE-2024-0005", "weird")]}
LANG_RESULT = {"Target": "app/package-lock.json", "Class": "lang-pkgs", "Type": "npm",
               "Vulnerabilities": [vuln("GHSA-aaaa-bbbb-cccc", "MEDIUM", pkg="lodash"),
                                   vuln("CVE-2024-0002", "CRITICAL", pkg="other")]}


def test_summary_counts_every_entry_and_unknown_severities() -> None:
    result = summarize(parse_report(json.dumps(report(OS_RESULT, LANG_RESULT))))
    assert result["summary"] == {"critical": 2, "high": 2, "medium": 1, "low": 1, "unknown": 1,
                                 "total": 7}
    assert result["fixable"] == {"critical": 2, "high": 0, "medium": 1, "low": 1, "unknown": 1,
                                 "total": 5}
    assert result["findingsTruncated"] is False
    severities = [f["severity"] for f in result["findings"]]
    assert severities == ["CRITICAL", "CRITICAL", "HIGH", "HIGH", "MEDIUM", "LOW", "UNKNOWN"]
    first = result["findings"][0]
    assert first == {"id": "CVE-2024-0002", "severity": "CRITICAL", "package": "openssl",
                     "installedVersion": "3.0.0", "fixedVersion": "3.0.1", "class": "os-pkgs",
                     "target": "img (debian 12.5)"}
    assert "fixedVersion" not in result["findings"][2]


def test_findings_are_bounded_but_counts_are_complete() -> None:
    many = {"Target": "t", "Class": "os-pkgs",
            "Vulnerabilities": [vuln(f"CVE-2024-{i:05d}", "MEDIUM") for i in range(5000)]}
    result = summarize(parse_report(json.dumps(report(many))), budget_bytes=16 * 1024)
    assert result["summary"]["medium"] == 5000
    assert result["findingsTruncated"] is True
    assert 0 < len(result["findings"]) < 5000
    assert len(json.dumps(result["findings"], separators=(",", ":"))) <= 16 * 1024


def test_bound_findings_keeps_the_prefix() -> None:
    items = [{"id": str(i)} for i in range(10)]
    kept, truncated = bound_findings(items, 40)
    assert kept == items[: len(kept)] and truncated and len(kept) >= 1
    assert bound_findings(items, 10_000) == (items, False)


@pytest.mark.parametrize("bad", ["not json", json.dumps({"SchemaVersion": 1}), "[]"])
def test_bad_reports_are_refused(bad: str) -> None:
    with pytest.raises(ReportError):
        parse_report(bad)


def test_frames_round_trip() -> None:
    payload = json.dumps(report(OS_RESULT)).encode()
    log = "trivy says hello\n" + framing.encode("version", b'{"Version": "0.76.0"}') + \
        framing.encode("report", payload) + "bye\n"
    frames = framing.decode(log)
    assert frames == {"version": b'{"Version": "0.76.0"}', "report": payload}


def _damaged(log: str, how: str) -> str:
    lines = log.splitlines(keepends=True)
    if how == "truncated":
        return log[: len(log) // 2]
    if how == "no-end":
        return "".join(lines[:-1])
    if how == "flipped":
        body = lines[1]
        return lines[0] + body[:10] + ("A" if body[10] != "A" else "B") + body[11:] + \
            "".join(lines[2:])
    if how == "garbage":
        return lines[0] + "!!!not base64!!!\n" + "".join(lines[1:])
    if how == "line-lost":
        return lines[0] + "".join(lines[2:])
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "no-end", "flipped", "garbage", "line-lost"])
def test_damaged_frames_are_detected(how: str) -> None:
    payload = json.dumps(report(OS_RESULT, LANG_RESULT)).encode() * 20
    log = framing.encode("report", payload)
    with pytest.raises(FrameError):
        framing.decode(_damaged(log, how))


def test_frame_written_by_the_job_shell_is_read(tmp_path: Any) -> None:
    """The Job's POSIX sh emitter and the Python decoder agree (gzip, base64, sha256sum)."""
    import subprocess

    from scangate.scanning.job import _EMIT

    payload = json.dumps(report(OS_RESULT)).encode()
    (tmp_path / "r.json").write_bytes(payload)
    out = subprocess.run(["sh", "-c", f'{_EMIT}\nemit report "$1"', "sh",
                          str(tmp_path / "r.json")], capture_output=True, text=True, check=True)
    assert framing.decode(out.stdout) == {"report": payload}


def test_result_from_log() -> None:
    version = {"Version": "0.76.0", "VulnerabilityDB": {"UpdatedAt": "2026-11-01T00:00:00Z"}}
    log = framing.encode("version", json.dumps(version).encode()) + \
        framing.encode("report", json.dumps(report(OS_RESULT)).encode())
    result = result_from_log(log, 65536)
    assert result["scanner"] == {"name": "trivy", "version": "0.76.0",
                                 "dbUpdatedAt": "2026-11-01T00:00:00Z"}
    assert result["vulnerabilityDB"] == {"dbUpdatedAt": "2026-11-01T00:00:00Z"}
    assert result["os"] == {"family": "debian", "name": "12.5", "eosl": False}
    assert result["summary"]["total"] == 5
    with pytest.raises(ReportError):
        result_from_log("no frames here\n", 65536)


def test_the_db_a_result_was_made_with_is_the_servers_in_client_server_mode() -> None:
    """A client's report names its server's DB (Trivy.Server.VulnerabilityDB): its
    UpdatedAt and NextUpdate become status.scannedWith's dbUpdatedAt / dbNextUpdate."""
    served = report(OS_RESULT)
    served["Trivy"] = {"Version": "0.76.0", "Server": {"Version": "0.76.0", "VulnerabilityDB": {
        "Version": 2, "UpdatedAt": "2026-11-02T06:13:29.123456789Z",
        "NextUpdate": "2026-11-02T12:13:29.123456789Z"}}}
    local = {"Version": "0.76.0", "VulnerabilityDB": {"UpdatedAt": "2020-01-01T00:00:00Z"}}
    log = framing.encode("version", json.dumps(local).encode()) + \
        framing.encode("report", json.dumps(served).encode())
    result = result_from_log(log, 65536)
    assert result["vulnerabilityDB"] == {"dbUpdatedAt": "2026-11-02T06:13:29Z",
                                         "dbNextUpdate": "2026-11-02T12:13:29Z"}


def test_db_stamps_leave_out_what_is_not_a_time() -> None:
    assert db_stamps({"UpdatedAt": "yesterday", "NextUpdate": 7}) == {}
    assert db_stamps(["UpdatedAt"]) == {}
    assert db_stamps({"UpdatedAt": "2026-11-01T00:00:00"}) == {
        "dbUpdatedAt": "2026-11-01T00:00:00Z"}


def test_log_tail_skips_frames() -> None:
    log = "2024 FATAL image not found\n" + framing.encode("x", b"y" * 500)
    assert log_tail(log) == "2024 FATAL image not found"


def test_frame_header_must_be_well_formed() -> None:
    packed = gzip.compress(b"x")
    bad = f"SCANGATE-FRAME-BEGIN name=r size=zz\n{base64.b64encode(packed).decode()}\n"
    with pytest.raises(FrameError, match="malformed"):
        framing.decode(bad)
