"""`scangate scan --format sarif`: SARIF 2.1.0 (OASIS), as GitHub code scanning ingests it.

Pure: the log is built as plain data from the findings scangate keeps of a Trivy report
(core.trivy.summarize) and the policies' decision; the caller serialises it.

- One rule per vulnerability ID, one result per finding. A result's level follows its
  severity (CRITICAL, HIGH: error; MEDIUM: warning; LOW, UNKNOWN: note); a rule's
  `security-severity`, the score GitHub orders and labels alerts by, follows the worst
  severity of its findings, so that GitHub's labels are the ones the policies count.
- Every result is located in the image: its repository is the artifact (as in Trivy's
  own SARIF; a relative URI whatever the registry), the package a logical location.
- The decision is in run.properties, and blocked is exit code 1 in invocations[0].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from scangate.core.images import ImageRef
    from scangate.core.policy import Decision

SCHEMA_URI = ("https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/"
              "sarif-schema-2.1.0.json")
INFORMATION_URI = "https://scangate.dev/"
LEVELS = {"CRITICAL": "error", "HIGH": "error", "MEDIUM": "warning", "LOW": "note",
          "UNKNOWN": "note"}
# GitHub labels a score over 9.0 critical, from 7.0 high, from 4.0 medium, else low.
SCORES = {"CRITICAL": "9.5", "HIGH": "8.0", "MEDIUM": "5.5", "LOW": "2.0", "UNKNOWN": "0.0"}
_RANK = {severity: i for i, severity in enumerate(SCORES)}
DESCRIPTION_LIMIT = 1000


class Advisory(NamedTuple):
    """What a Trivy report says of a vulnerability ID beyond the findings scangate keeps."""

    title: str | None = None
    description: str | None = None
    url: str | None = None


def advisories_of(report: Any) -> dict[str, Advisory]:
    """Title, description and primary URL of each vulnerability ID of a decoded Trivy JSON
    report (the first entry of an ID wins; entries of another shape are left out)."""
    out: dict[str, Advisory] = {}
    results = report.get("Results") if isinstance(report, dict) else None
    for result in results if isinstance(results, list) else []:
        vulns = result.get("Vulnerabilities") if isinstance(result, dict) else None
        for v in vulns if isinstance(vulns, list) else []:
            if isinstance(v, dict) and isinstance(v.get("VulnerabilityID"), str):
                out.setdefault(v["VulnerabilityID"], Advisory(
                    *(_text(v.get(key)) for key in ("Title", "Description", "PrimaryURL"))))
    return out


def sarif_log(image: ImageRef, findings: Sequence[Mapping[str, Any]], *, version: str,
              digest: str | None = None, summary: Mapping[str, int] | None = None,
              decision: Decision | None = None,
              advisories: Mapping[str, Advisory] | None = None,
              checks: Sequence[Mapping[str, Any]] = (),
              secrets: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The SARIF log of `findings` (finding dicts of summarize) in `image`, with the failed
    configuration `checks` and the `secrets` found (summarize_baseline's entries: a secret's
    rule and place, never its value). `summary` (the counts of all findings) and `decision`
    (None without policies) go to run.properties."""
    worst: dict[str, str] = {}
    for f in findings:
        worst[f["id"]] = min(worst.get(f["id"], "UNKNOWN"), _severity(f), key=_RANK.__getitem__)
    index = {vid: i for i, vid in enumerate(worst)}
    extra_rules: dict[str, dict[str, Any]] = {}
    extra_results = []
    for c in checks:
        rule_id = str(c["id"])
        extra_rules.setdefault(rule_id, _baseline_rule(rule_id, _severity(c), str(
            c.get("title") or rule_id), "misconfiguration"))
        extra_results.append((rule_id, _severity(c), f"The image fails check {rule_id}: "
                              f"{c.get('title') or rule_id} ({c.get('target') or 'image'}).",
                              str(c.get("target") or "image config"), dict(c)))
    for f in secrets:
        rule_id = f"secret/{f['ruleID']}"
        where = str(f.get("target") or "image")
        detail = f.get("field") or (f"line {f['line']}" if f.get("line") else "")
        extra_rules.setdefault(rule_id, _baseline_rule(rule_id, _severity(f), str(
            f.get("title") or f["ruleID"]), "secret"))
        extra_results.append((rule_id, _severity(f), f"A secret ({f.get('title') or f['ruleID']}"
                              f") is in {where}{' ' + str(detail) if detail else ''}; its value "
                              "is not reported.", f"{where} {detail}".strip(), dict(f)))
    rule_index = {rid: len(index) + i for i, rid in enumerate(extra_rules)}
    blocked = decision is not None and not decision.allowed
    run = {
        "tool": {"driver": {
            "name": "scangate", "version": version, "informationUri": INFORMATION_URI,
            "rules": [*(_rule(vid, severity, (advisories or {}).get(vid) or Advisory())
                        for vid, severity in worst.items()), *extra_rules.values()]}},
        "automationDetails": {"id": f"scangate/{image.name}/"},
        "invocations": [{"executionSuccessful": True, "exitCode": int(blocked),
                         "exitCodeDescription": "blocked by a ScanPolicy" if blocked
                         else "passed"}],
        "results": [*(_result(image, f, index[f["id"]]) for f in findings),
                    *(_baseline_result(image, rid, rule_index[rid], severity, text, where, props)
                      for rid, severity, text, where, props in extra_results)],
        "properties": {"image": str(image), "digest": digest,
                       "summary": dict(summary) if summary is not None else None,
                       "decision": decision.to_json() if decision is not None else None},
    }
    return {"$schema": SCHEMA_URI, "version": "2.1.0", "runs": [run]}


def _rule(vid: str, severity: str, advisory: Advisory) -> dict[str, Any]:
    title = advisory.title or vid
    url = _web_url(advisory.url)
    rule: dict[str, Any] = {
        "id": vid,
        "shortDescription": {"text": title},
        "fullDescription": {"text": _clip(advisory.description or title)},
        "help": {"text": f"{vid} ({severity}): {title}" + (f"\n{url}" if url else "")},
        "defaultConfiguration": {"level": LEVELS[severity]},
        "properties": {"security-severity": SCORES[severity], "precision": "very-high",
                       "tags": ["security", "vulnerability", severity]},
    }
    if url:
        rule["helpUri"] = url
    return rule


def _result(image: ImageRef, f: Mapping[str, Any], rule_index: int) -> dict[str, Any]:
    severity = _severity(f)
    package = str(f.get("package") or "(unknown package)")
    installed = str(f.get("installedVersion") or "(unknown version)")
    fixed = f"fixed in {f['fixedVersion']}" if f.get("fixedVersion") else "no fixed version yet"
    return {
        "ruleId": f["id"], "ruleIndex": rule_index, "level": LEVELS[severity],
        "message": {"text": f"Package {package}, installed {installed}, has {f['id']} "
                            f"({severity}): {fixed}."},
        "locations": [{
            "physicalLocation": {"artifactLocation": {"uri": image.repository},
                                 "region": {"startLine": 1}},
            "logicalLocations": [{"kind": "package", "name": package,
                                  "fullyQualifiedName": f"{package}@{installed}"}],
            "message": {"text": str(image)}}],
        # Keeps the alerts of one ID in several packages apart in GitHub, and one alert
        # per package across rebuilds (installed versions change, the package does not).
        "partialFingerprints": {"scangateFinding/v1": f"{image.name}|{package}|{f['id']}"},
        "properties": dict(f),
    }


def _baseline_rule(rule_id: str, severity: str, title: str, kind: str) -> dict[str, Any]:
    return {"id": rule_id, "shortDescription": {"text": title},
            "fullDescription": {"text": _clip(title)},
            "help": {"text": f"{rule_id} ({severity}): {title}"},
            "defaultConfiguration": {"level": LEVELS[severity]},
            "properties": {"security-severity": SCORES[severity], "precision": "high",
                           "tags": ["security", kind, severity]}}


def _baseline_result(image: ImageRef, rule_id: str, rule_index: int, severity: str, text: str,
                     where: str, props: dict[str, Any]) -> dict[str, Any]:
    return {
        "ruleId": rule_id, "ruleIndex": rule_index, "level": LEVELS[severity],
        "message": {"text": text},
        "locations": [{
            "physicalLocation": {"artifactLocation": {"uri": image.repository},
                                 "region": {"startLine": 1}},
            "logicalLocations": [{"kind": "resource", "name": where}],
            "message": {"text": str(image)}}],
        "partialFingerprints": {"scangateFinding/v1": f"{image.name}|{where}|{rule_id}"},
        "properties": props,
    }


def _severity(finding: Mapping[str, Any]) -> str:
    severity = str(finding.get("severity", "UNKNOWN"))
    return severity if severity in LEVELS else "UNKNOWN"


def _text(value: object) -> str | None:
    return (value.strip() or None) if isinstance(value, str) else None


def _clip(text: str) -> str:
    return text if len(text) <= DESCRIPTION_LIMIT else text[:DESCRIPTION_LIMIT - 1] + "…"


def _web_url(url: str | None) -> str | None:
    """`url` if it is an absolute http(s) URL with no blanks (the schema's format uri)."""
    try:
        parts = urlsplit(url or "")
    except ValueError:
        return None
    ok = parts.scheme in ("http", "https") and parts.netloc and not any(
        c.isspace() or not c.isprintable() for c in url or "")
    return url if ok else None
