"""Hostile input to the pure result and credentials code: each is refused with the
module's own error, never an unexpected exception, and never echoes secrets."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import tracemalloc
from typing import Any

import pytest
from pydantic import ValidationError

from scangate.api.imagescan import Finding
from scangate.core import framing
from scangate.core.framing import BEGIN, END, FrameError
from scangate.core.results import log_tail, result_from_log
from scangate.core.trivy import FINDING_MAX_LENGTHS, ReportError, parse_report, summarize
from scangate.registry.auth import CredentialsError, credentials_from_secret
from scangate.registry.client import Credentials


def report(*vulns: dict[str, Any], **result: Any) -> dict[str, Any]:
    return {"SchemaVersion": 2,
            "Results": [{"Target": "t", "Class": "os-pkgs", "Vulnerabilities": list(vulns),
                         **result}]}


def vuln(vid: Any = "CVE-2024-0001", severity: Any = "HIGH", **more: Any) -> dict[str, Any]:
    return {"VulnerabilityID": vid, "PkgName": "openssl", "InstalledVersion": "1",
            "Severity": severity, **more}


# -- Trivy reports ---------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "field"), [
    ({"SchemaVersion": 2, "Results": "x"}, "Results"),
    (report(vuln(vid=5)), "Results[0].Vulnerabilities[0].VulnerabilityID"),
    (report(vuln(severity=["HIGH"])), "Results[0].Vulnerabilities[0].Severity"),
    (report(Vulnerabilities="x"), "Results[0].Vulnerabilities"),
    (report({"PkgName": "a"}), "Results[0].Vulnerabilities[0].VulnerabilityID"),
    (report(vuln(FixedVersion={"v": 1})), "Results[0].Vulnerabilities[0].FixedVersion"),
    ({"SchemaVersion": 2, "Metadata": []}, "Metadata"),
    ({"SchemaVersion": 2, "CreatedAt": "yesterday"}, "CreatedAt"),
])
def test_report_with_wrong_types_is_a_report_error(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(ReportError) as caught:
        parse_report(json.dumps(raw))
    assert not isinstance(caught.value, ValidationError)
    assert caught.value.__cause__ is None
    assert f"{field}: " in str(caught.value)


def test_report_error_names_the_first_few_problems_only() -> None:
    bad = report(*[vuln(vid=i) for i in range(100)])
    with pytest.raises(ReportError, match=r"and 97 more$") as caught:
        parse_report(json.dumps(bad))
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize("data", [
    "[" * 100_000, b"\xff\xfe\x00", '{"SchemaVersion": 2, "x": 1' + "0" * 5000 + "}",
])
def test_unparseable_reports_are_report_errors(data: str | bytes) -> None:
    with pytest.raises(ReportError, match="not JSON"):
        parse_report(data)


def test_a_huge_schema_version_is_not_echoed_whole() -> None:
    with pytest.raises(ReportError) as caught:
        parse_report(json.dumps({"SchemaVersion": "9" * 10_000}))
    assert len(str(caught.value)) < 100


def test_unknown_severities_count_as_unknown() -> None:
    parsed = parse_report(json.dumps(report(vuln(severity="NEGLIGIBLE"), vuln(severity=""),
                                            vuln(severity="critical"))))
    result = summarize(parsed)
    assert result["summary"] == {"critical": 1, "high": 0, "medium": 0, "low": 0,
                                 "unknown": 2, "total": 3}
    assert [f["severity"] for f in result["findings"]] == ["CRITICAL", "UNKNOWN", "UNKNOWN"]


def test_finding_limits_come_from_the_crd_model() -> None:
    assert FINDING_MAX_LENGTHS == {"id": 128, "package": 256, "installedVersion": 128,
                                   "fixedVersion": 256, "class": 64, "target": 512}


def test_overlong_finding_fields_are_cut_to_the_crd_limits() -> None:
    long = "é" * 5000  # characters, not bytes, as the API server counts maxLength
    raw = report(vuln(vid=long, PkgName=long, InstalledVersion=long, FixedVersion=long),
                 Target=long, Class=long)
    result = summarize(parse_report(json.dumps(raw)))
    (finding,) = result["findings"]
    assert {k: len(v) for k, v in finding.items() if k != "severity"} == FINDING_MAX_LENGTHS
    Finding.model_validate(finding)  # what the CRD schema would accept
    assert result["summary"]["total"] == 1 and result["fixable"]["total"] == 1


def test_fifty_thousand_findings_give_exact_counts_within_the_budget() -> None:
    severities = ["CRITICAL", "HIGH", "MEDIUM", "LOW", "NEGLIGIBLE"]
    vulns = [vuln(f"CVE-2024-{i:05d}", severities[i % 5], PkgName="p" * 300,
                  FixedVersion="2" if i % 2 else None) for i in range(50_000)]
    budget = 64 * 1024
    result = summarize(parse_report(json.dumps(report(*vulns))), budget)
    assert result["summary"] == {"critical": 10_000, "high": 10_000, "medium": 10_000,
                                 "low": 10_000, "unknown": 10_000, "total": 50_000}
    assert result["fixable"]["total"] == 25_000
    assert result["findingsTruncated"] is True
    assert 0 < len(result["findings"]) < 50_000
    assert all(f["severity"] == "CRITICAL" for f in result["findings"])
    assert len(json.dumps(result["findings"], separators=(",", ":")).encode()) <= budget


# -- Frames ----------------------------------------------------------------------------

def frame(name: str, packed: bytes) -> str:
    """A frame around already-compressed bytes, whatever they are."""
    return (f"{BEGIN} name={name} size={len(packed)} "
            f"sha256={hashlib.sha256(packed).hexdigest()}\n"
            f"{base64.encodebytes(packed).decode()}{END} name={name}\n")


MIB = 1024 * 1024


def test_a_gzip_bomb_is_refused_without_inflating_it() -> None:
    log = framing.encode("report", bytes(64 * MIB))  # 64 MiB of zeros: some 64 KiB of gzip
    tracemalloc.start()
    try:
        with pytest.raises(FrameError,
                           match=r"^frame 'report' decompresses to more than 1048576 bytes$"):
            framing.decode(log, max_bytes=MIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MIB


def test_the_limit_covers_the_frames_of_a_log_together() -> None:
    log = framing.encode("a", bytes(MIB // 2)) + framing.encode("b", bytes(MIB // 2 + 1))
    with pytest.raises(FrameError, match="'b' decompresses to more than 1048576 bytes with"):
        framing.decode(log, max_bytes=MIB)
    assert framing.decode(log, max_bytes=MIB + 1).keys() == {"a", "b"}


def test_a_frame_of_exactly_the_limit_is_accepted() -> None:
    assert framing.decode(framing.encode("r", b"x" * 1000), max_bytes=1000) == {"r": b"x" * 1000}


def test_a_log_longer_than_the_limit_is_refused() -> None:
    log = framing.encode("r", b"{}")
    with pytest.raises(FrameError, match="longer than"):
        framing.decode(log, max_log_chars=len(log) - 1)
    assert framing.decode(log, max_log_chars=len(log)) == {"r": b"{}"}


def test_concatenated_gzip_members_and_zero_padding_are_read() -> None:
    packed = gzip.compress(b"one ") + gzip.compress(b"two") + bytes(16)
    assert framing.decode(frame("r", packed)) == {"r": b"one two"}


@pytest.mark.parametrize("packed", [
    gzip.compress(b"x" * 1000)[:-12],  # intact checksum, but the stream stops short
    gzip.compress(b"x") + b"trailing garbage",
    b"not gzip at all",
    gzip.compress(b"x")[:10] + b"\xff" * 20 + gzip.compress(b"x")[30:],
])
def test_damaged_gzip_is_a_frame_error(packed: bytes) -> None:
    with pytest.raises(FrameError, match="does not decompress"):
        framing.decode(frame("r", packed))


def test_a_hostile_version_frame_is_a_report_error() -> None:
    good = framing.encode("report", json.dumps(report(vuln())).encode())
    for version in (b"not json", b"[]", b'{"Version": ["0.76"]}'):
        with pytest.raises(ReportError, match="trivy version output"):
            result_from_log(framing.encode("version", version) + good, 65536)


def test_a_hostile_report_frame_is_a_report_error() -> None:
    log = framing.encode("report", json.dumps({"SchemaVersion": 2, "Results": "x"}).encode())
    with pytest.raises(ReportError, match="Results"):
        result_from_log(log, 65536)


# -- Log tails -------------------------------------------------------------------------

def test_log_tail_keeps_the_end_of_an_overlong_line() -> None:
    line = "".join(f"{i:05d} " for i in range(5000)) + "FATAL the end"
    tail = log_tail(f"first\n{line}\n")
    assert len(tail) == 1024 and tail.endswith("FATAL the end")
    assert len(log_tail(line, max_chars=10)) == 10
    assert log_tail(line, max_chars=0) == ""


def test_log_tail_of_many_lines_fits_a_status_message() -> None:
    log = "".join(f"line {i} " + "x" * 900 + "\n" for i in range(10_000))
    tail = log_tail(log)
    assert len(tail) <= 1024 and tail.endswith("x")
    assert len("Trivy failed: " + log_tail(log, lines=50, max_chars=4000)) <= 4096


# -- Registry credentials --------------------------------------------------------------

SECRET = "s3cr3t-value"


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def docker_secret(config: Any, *, raw: str | None = None) -> dict[str, Any]:
    value = raw if raw is not None else b64(json.dumps(config))
    return {"metadata": {"name": "pull"}, "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": value}}


def basic_secret(username: str, password: str) -> dict[str, Any]:
    return {"metadata": {"name": "pull"}, "type": "kubernetes.io/basic-auth",
            "data": {"username": username, "password": password}}


@pytest.mark.parametrize(("secret", "message"), [
    (docker_secret([SECRET]), "not a JSON object"),
    (docker_secret(SECRET), "not a JSON object"),
    (docker_secret({"auths": [SECRET]}), "auths is not an object"),
    (docker_secret({"auths": {"reg.example": [SECRET]}}), "entry for reg.example is not an"),
    (docker_secret({"auths": {"reg.example": {"auth": f"!{SECRET}!"}}}), "auth is not base64"),
    (docker_secret({"auths": {"reg.example": {"auth": b64(b"\xff" + SECRET.encode())}}}),
     "auth is not base64 of UTF-8"),
    (docker_secret({"auths": {"reg.example": {"auth": 42}}}), "auth is not base64"),
    (docker_secret({"auths": {"reg.example": {"auth": b64(SECRET)}}}),
     "auth is not base64 of username:password"),
    (docker_secret({"auths": {"reg.example": {"username": SECRET, "password": 7}}}),
     "not text"),
    (docker_secret({}, raw=f"%{SECRET}%"), ".dockerconfigjson is not base64"),
    (docker_secret({}, raw=b64(f"{{{SECRET}")), ".dockerconfigjson is not JSON"),
    (docker_secret({}, raw=b64("[" * 100_000)), ".dockerconfigjson is not JSON"),
    (basic_secret(f"*{SECRET}*", b64("pw")), "username is not base64"),
    (basic_secret(b64("me"), b64(b"\xc3(" + SECRET.encode())), "password is not base64 of UTF-8"),
])
def test_hostile_secrets_are_credentials_errors(secret: dict[str, Any], message: str) -> None:
    with pytest.raises(CredentialsError, match=message) as caught:
        credentials_from_secret(secret, "reg.example")
    assert SECRET not in str(caught.value) and "Secret pull" in str(caught.value)


def test_good_secrets_still_work() -> None:
    entry = {"auth": b64(f"me:{SECRET}:with-colon")}
    config = {"auths": {"https://other.example/v1/": ["ignored: not ours"], "reg.example": entry}}
    assert credentials_from_secret(docker_secret(config), "reg.example") == \
        Credentials("me", f"{SECRET}:with-colon")
    assert credentials_from_secret(docker_secret(config), "nowhere.example") is None
    assert credentials_from_secret(basic_secret(b64("me"), b64("pw")), "x") == \
        Credentials("me", "pw")
