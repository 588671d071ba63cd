"""`scangate scan --format sarif`: valid SARIF 2.1.0 by the official schema, with GitHub's
properties, and the decision and exit status of the other formats."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import sarif_schema
from scangate import __version__, localscan
from scangate.cli import main
from scangate.core.images import parse_image
from scangate.core.sarif import advisories_of, sarif_log
from scangate.core.trivy import parse_report, summarize

IMAGE = "registry.example.com/team-a/api:v1.2.3"
DIGEST = "sha256:" + "5f" * 32


def vuln(vid: str, pkg: str, installed: str, severity: str, fixed: str | None = None,
         title: str | None = None, url: str | None = None) -> dict[str, Any]:
    """A vulnerability entry as Trivy 0.5x-0.7x writes it (the fields scangate ignores too)."""
    entry: dict[str, Any] = {
        "VulnerabilityID": vid, "PkgID": f"{pkg}@{installed}", "PkgName": pkg,
        "PkgIdentifier": {"PURL": f"pkg:deb/debian/{pkg}@{installed}?distro=debian-12.5"},
        "InstalledVersion": installed, "Status": "fixed" if fixed else "affected",
        "Layer": {"DiffID": "sha256:" + "1a" * 32}, "SeveritySource": "nvd",
        "DataSource": {"ID": "debian", "Name": "Debian Security Tracker",
                       "URL": "https://salsa.debian.org/security-tracker-team/security-tracker"},
        "Severity": severity, "CweIDs": ["CWE-787"],
        "VendorSeverity": {"debian": 1, "nvd": 4},
        "CVSS": {"nvd": {"V3Vector": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H",
                         "V3Score": 9.8}},
        "References": ["https://www.cve.org/CVERecord?id=" + vid],
        "PublishedDate": "2024-04-17T18:15:15.833Z", "LastModifiedDate": "2024-07-03T02:04:34Z",
    }
    if fixed:
        entry["FixedVersion"] = fixed
    if title:
        entry["Title"] = title
        entry["Description"] = title + ". " + "A longer account of the flaw. " * 60
    if url:
        entry["PrimaryURL"] = url
    return entry


REPORT: dict[str, Any] = {
    "SchemaVersion": 2, "CreatedAt": "2026-11-20T08:31:02.123456789Z",
    "ArtifactName": IMAGE, "ArtifactType": "container_image",
    "Metadata": {"OS": {"Family": "debian", "Name": "12.5"}, "ImageID": "sha256:" + "9c" * 32,
                 "RepoTags": [IMAGE], "RepoDigests": [f"registry.example.com/team-a/api@{DIGEST}"]},
    "Results": [
        {"Target": f"{IMAGE} (debian 12.5)", "Class": "os-pkgs", "Type": "debian",
         "Vulnerabilities": [
             vuln("CVE-2023-45853", "zlib1g", "1:1.2.13.dfsg-1", "CRITICAL",
                  title="zlib: integer overflow and heap-based buffer overflow",
                  url="https://avd.aquasec.com/nvd/cve-2023-45853"),
             vuln("CVE-2024-2961", "libc6", "2.36-9+deb12u4", "HIGH", "2.36-9+deb12u7",
                  title="glibc: Out of bounds write in iconv",
                  url="https://avd.aquasec.com/nvd/cve-2024-2961"),
             vuln("CVE-2024-2961", "libc-bin", "2.36-9+deb12u4", "HIGH", "2.36-9+deb12u7",
                  title="glibc: Out of bounds write in iconv",
                  url="https://avd.aquasec.com/nvd/cve-2024-2961"),
             vuln("CVE-2023-4039", "gcc-12-base", "12.2.0-14", "MEDIUM",
                  title="gcc: -fstack-protector fails to guard dynamic stack allocations",
                  url="not a url"),
             vuln("CVE-2011-3374", "apt", "2.6.1", "LOW",
                  url="https://avd.aquasec.com/nvd/cve-2011-3374"),
             vuln("TEMP-0841856-B18BAF", "bash", "5.2.15-2+b2", "NEGLIGIBLE"),
         ]},
        {"Target": "Python", "Class": "lang-pkgs", "Type": "python-pkg",
         "Vulnerabilities": [
             vuln("CVE-2024-6345", "setuptools", "68.2.2", "HIGH", "70.0.0",
                  title="pypa/setuptools: Remote code execution via download functions",
                  url="https://avd.aquasec.com/nvd/cve-2024-6345"),
         ]},
    ],
}
STRICT = ("apiVersion: scangate.dev/v1alpha1\nkind: ScanPolicy\n"
          "metadata: {name: no-critical}\nspec: {thresholds: {critical: 0}}\n")


@pytest.fixture(scope="module")
def validator() -> Any:
    return sarif_schema.validator()


@pytest.fixture
def scan(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
         ) -> Callable[..., tuple[int, dict[str, Any]]]:
    """`scangate scan IMAGE --format sarif ARGS` on REPORT, as Trivy would have written it."""
    monkeypatch.setattr(localscan, "trivy_report", lambda *_: json.dumps(REPORT).encode())
    policy = tmp_path / "policy.yaml"
    policy.write_text(STRICT)

    def run(*args: str) -> tuple[int, dict[str, Any]]:
        argv = [a.replace("STRICT", str(policy)) for a in args]
        code = main(["scan", IMAGE, "--format", "sarif", *argv])
        return code, json.loads(capsys.readouterr().out)
    return run


def errors(validator: Any, log: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(log)]


def test_a_blocked_scan_is_valid_sarif_with_a_result_per_finding(
    validator: Any, scan: Callable[..., tuple[int, dict[str, Any]]],
) -> None:
    code, log = scan("--policy", "STRICT")
    assert code == 1
    assert errors(validator, log) == []
    run = log["runs"][0]
    driver = run["tool"]["driver"]
    assert (driver["name"], driver["version"]) == ("scangate", __version__)
    assert driver["informationUri"].startswith("https://")
    assert run["invocations"] == [{"executionSuccessful": True, "exitCode": 1,
                                   "exitCodeDescription": "blocked by a ScanPolicy"}]
    assert run["properties"]["decision"]["allowed"] is False
    assert run["properties"]["summary"]["critical"] == 1
    assert run["properties"]["digest"] == DIGEST

    results = run["results"]
    assert len(results) == 7  # one per finding, CVE-2024-2961 twice (two packages)
    assert [r["level"] for r in results] == [
        "error", "error", "error", "error", "warning", "note", "note"]
    rules = driver["rules"]
    assert [r["id"] for r in rules] == list(dict.fromkeys(r["ruleId"] for r in results))
    for result in results:
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
        location = result["locations"][0]
        assert location["physicalLocation"]["artifactLocation"]["uri"] == "team-a/api"
        assert location["message"]["text"] == IMAGE
        assert re.fullmatch(r"[a-z0-9._/-]+", location["physicalLocation"]
                            ["artifactLocation"]["uri"])  # a valid relative URI
    glibc = [r for r in results if r["ruleId"] == "CVE-2024-2961"]
    assert {r["partialFingerprints"]["scangateFinding/v1"] for r in glibc} == {
        "registry.example.com/team-a/api|libc6|CVE-2024-2961",
        "registry.example.com/team-a/api|libc-bin|CVE-2024-2961"}
    assert glibc[0]["message"]["text"] == (
        "Package libc-bin, installed 2.36-9+deb12u4, has CVE-2024-2961 (HIGH): "
        "fixed in 2.36-9+deb12u7.")
    zlib = next(r for r in results if r["ruleId"] == "CVE-2023-45853")
    assert "no fixed version yet" in zlib["message"]["text"]

    by_id = {r["id"]: r for r in rules}
    assert by_id["CVE-2023-45853"]["helpUri"] == "https://avd.aquasec.com/nvd/cve-2023-45853"
    assert by_id["CVE-2023-45853"]["shortDescription"]["text"].startswith("zlib: integer")
    assert len(by_id["CVE-2023-45853"]["fullDescription"]["text"]) <= 1000
    assert "helpUri" not in by_id["CVE-2023-4039"]  # "not a url"
    assert by_id["TEMP-0841856-B18BAF"]["shortDescription"]["text"] == "TEMP-0841856-B18BAF"
    assert {vid: r["properties"]["security-severity"] for vid, r in by_id.items()} == {
        "CVE-2023-45853": "9.5", "CVE-2024-2961": "8.0", "CVE-2024-6345": "8.0",
        "CVE-2023-4039": "5.5", "CVE-2011-3374": "2.0", "TEMP-0841856-B18BAF": "0.0"}
    assert by_id["CVE-2024-6345"]["properties"]["tags"] == ["security", "vulnerability", "HIGH"]


def test_severity_filters_the_results_but_not_the_decision(
    validator: Any, scan: Callable[..., tuple[int, dict[str, Any]]],
) -> None:
    code, log = scan("--policy", "STRICT", "--severity", "low,MEDIUM")
    assert code == 1 and errors(validator, log) == []
    run = log["runs"][0]
    assert {r["properties"]["severity"] for r in run["results"]} == {"LOW", "MEDIUM"}
    assert run["properties"]["decision"]["allowed"] is False
    assert run["properties"]["summary"]["total"] == 7
    code, log = scan()  # no policy: passes, no decision
    assert code == 0 and errors(validator, log) == []
    assert log["runs"][0]["properties"]["decision"] is None
    assert log["runs"][0]["invocations"][0]["exitCode"] == 0


def test_a_rule_takes_the_worst_severity_of_its_findings(validator: Any) -> None:
    report = parse_report(json.dumps(REPORT))
    findings = summarize(report)["findings"]
    findings.append({**findings[0], "severity": "LOW", "package": "zlib1g-dev"})
    log = sarif_log(parse_image(IMAGE), findings[::-1], version="1.2.3",
                    advisories=advisories_of(REPORT))
    assert errors(validator, log) == []
    rule = next(r for r in log["runs"][0]["tool"]["driver"]["rules"]
                if r["id"] == "CVE-2023-45853")
    assert rule["defaultConfiguration"]["level"] == "error"
    assert rule["properties"]["security-severity"] == "9.5"
    empty = sarif_log(parse_image("alpine"), [], version="1.2.3")
    assert errors(validator, empty) == [] and empty["runs"][0]["results"] == []


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(log: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = log
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value
    return mutate


@pytest.mark.parametrize("mutate", [
    _set("runs.0.results.0.level", "fatal"),
    _set("runs.0.results.0.message", "a message must be an object"),
    _set("runs.0.results.0.severity", "CRITICAL"),  # no such property of a result
    _set("runs.0.tool.driver.rules.0.properties.tags", ["security", "security"]),
    _set("runs.0.invocations.0.executionSuccessful", "yes"),
    _set("version", "2.2.0"),
], ids=["level-fatal", "message-string", "unknown-property", "duplicate-tags",
        "success-not-boolean", "version"])
def test_the_schema_refuses_what_is_not_sarif(
    validator: Any, scan: Callable[..., tuple[int, dict[str, Any]]],
    mutate: Callable[[dict[str, Any]], None],
) -> None:
    _, log = scan("--policy", "STRICT")
    broken = copy.deepcopy(log)
    mutate(broken)
    assert errors(validator, log) == []
    assert errors(validator, broken) != []
