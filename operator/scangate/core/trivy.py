"""Trivy's JSON report (SchemaVersion 2) and what scangate keeps of it.

The summary counts every vulnerability entry of every Result, as Trivy's own
table summary does; a severity Trivy does not define counts as UNKNOWN. The
findings kept in status are compact, most severe first, and bounded in bytes so
that an ImageScan never nears etcd's object size limit; the counts always cover
every finding. A report that does not fit the schema raises ReportError, never
pydantic's own error, so that callers need to handle one type.

Beside the bounded findings, a summary carries an exact per-ID index (ID, severity,
count, fixable count) so that a policy's allowlist subtracts exactly the findings it
names even when most findings were left out of status; see encode_index.
"""

from __future__ import annotations

import base64
import json
import re
import zlib
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

from annotated_types import MaxLen
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scangate.api.imagescan import (
    FailedCheck,
    Finding,
    ImageScanStatus,
    SecretFinding,
    SuppressedFinding,
)
from scangate.api.scanpolicy import ALLOWLIST_ID_MAX_LENGTH, ALLOWLIST_ID_PATTERN
from scangate.core.errors import describe_validation
from scangate.core.vex import source_of

SEVERITIES = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}
DEFAULT_FINDINGS_BUDGET = 64 * 1024


def _max_lengths(model: type[BaseModel]) -> dict[str, int | None]:
    return {field.alias or name: m.max_length for name, field in model.model_fields.items()
            for m in field.metadata if isinstance(m, MaxLen)}


# The CRD's maxLength of each finding field, by its name in status: the API server
# refuses a whole status patch for one overlong package name.
FINDING_MAX_LENGTHS = _max_lengths(Finding)
# The CRD's maxLength of status.vulnerabilityIndex: the index's byte budget (base64 is ASCII).
_CHECK_LIMITS = _max_lengths(FailedCheck)
_SECRET_LIMITS = _max_lengths(SecretFinding)
_SUPPRESSED_LIMITS = _max_lengths(SuppressedFinding)
INDEX_MAX_BYTES = next(m.max_length for m in
                       ImageScanStatus.model_fields["vulnerability_index"].metadata
                       if isinstance(m, MaxLen))


class _Trivy(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Vulnerability(_Trivy):
    vulnerability_id: str = Field(alias="VulnerabilityID")
    pkg_name: str = Field(default="", alias="PkgName")
    installed_version: str | None = Field(default=None, alias="InstalledVersion")
    fixed_version: str | None = Field(default=None, alias="FixedVersion")
    severity: str = Field(default="UNKNOWN", alias="Severity")
    title: str | None = Field(default=None, alias="Title")
    status: str | None = Field(default=None, alias="Status")


class Misconfiguration(_Trivy):
    """One configuration check's outcome (scanner misconfig). Trivy 0.76's embedded checks
    leave AVDID empty and put the ID in ID; older releases had both."""

    id: str = Field(default="", alias="ID")
    avd_id: str | None = Field(default=None, alias="AVDID")
    title: str | None = Field(default=None, alias="Title")
    severity: str = Field(default="UNKNOWN", alias="Severity")
    status: str | None = Field(default=None, alias="Status")


# NAME=**** in a masked match (Trivy masks the value with asterisks); "ENV " before it
# in the history's build command.
_ASSIGNED = re.compile(r"(\bENV\s+)?\b([A-Za-z_][A-Za-z0-9_.-]{0,100})\s*[=:]\s*[\"']?\*{4,}")


class Secret(_Trivy):
    """One secret match (scanner secret). Only the rule and the location are read: the
    model ignores Match and Code, which hold the matched line and its neighbours (Trivy
    masks the match, not the lines around it), so that no value can reach a summary."""

    rule_id: str = Field(default="", alias="RuleID")
    category: str | None = Field(default=None, alias="Category")
    severity: str = Field(default="UNKNOWN", alias="Severity")
    title: str | None = Field(default=None, alias="Title")
    start_line: int | None = Field(default=None, alias="StartLine")
    variable: str | None = None
    """The name of the variable the match assigns (e.g. AWS_SECRET_ACCESS_KEY in the
    config's Env), read out of the masked Match: a name, never a value."""

    @model_validator(mode="before")
    @classmethod
    def _variable(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            found = _ASSIGNED.search(str(raw.get("Match") or ""))
            raw = {k: v for k, v in raw.items() if k not in ("Match", "Code", "variable")}
            if found:
                raw["variable"] = found.group(2)
                if found.group(1):
                    raw["variable"] = f"ENV {found.group(2)}"
        return raw


class ModifiedFinding(_Trivy):
    """A finding a VEX statement suppressed (`--show-suppressed`)."""

    type: str | None = Field(default=None, alias="Type")
    status: str = Field(default="", alias="Status")
    statement: str | None = Field(default=None, alias="Statement")
    source: str = Field(default="", alias="Source")
    finding: Vulnerability | None = Field(default=None, alias="Finding")

    @model_validator(mode="before")
    @classmethod
    def _vulnerabilities_only(cls, raw: Any) -> Any:
        # A suppressed misconfiguration or secret has another Finding shape: not read.
        if isinstance(raw, dict) and raw.get("Type") != "vulnerability":
            raw = {k: v for k, v in raw.items() if k != "Finding"}
        return raw


class Result(_Trivy):
    target: str = Field(default="", alias="Target")
    class_: str | None = Field(default=None, alias="Class")
    type: str | None = Field(default=None, alias="Type")
    vulnerabilities: list[Vulnerability] | None = Field(default=None, alias="Vulnerabilities")
    misconfigurations: list[Misconfiguration] | None = Field(default=None,
                                                             alias="Misconfigurations")
    secrets: list[Secret] | None = Field(default=None, alias="Secrets")
    modified: list[ModifiedFinding] | None = Field(default=None,
                                                   alias="ExperimentalModifiedFindings")


class OS(_Trivy):
    family: str | None = Field(default=None, alias="Family")
    name: str | None = Field(default=None, alias="Name")
    eosl: bool | None = Field(default=None, alias="EOSL")


class Metadata(_Trivy):
    os: OS | None = Field(default=None, alias="OS")
    image_id: str | None = Field(default=None, alias="ImageID")
    repo_digests: list[str] | None = Field(default=None, alias="RepoDigests")


class VersionInfo(_Trivy):
    """`trivy version --format json`: the scanner and its vulnerability DB."""

    version: str | None = Field(default=None, alias="Version")
    vulnerability_db: dict[str, Any] | None = Field(default=None, alias="VulnerabilityDB")

    @property
    def db_updated_at(self) -> str | None:
        value = (self.vulnerability_db or {}).get("UpdatedAt")
        return str(value) if value else None

    @property
    def db_next_update(self) -> str | None:
        value = (self.vulnerability_db or {}).get("NextUpdate")
        return str(value) if value else None


class TrivyInfo(_Trivy):
    """The report's own note of the scanner; in client/server mode, also the server's DB."""

    version: str | None = Field(default=None, alias="Version")
    server: VersionInfo | None = Field(default=None, alias="Server")


class Report(_Trivy):
    """A Trivy JSON report; only SchemaVersion 2 is accepted."""

    schema_version: int = Field(alias="SchemaVersion")
    artifact_name: str | None = Field(default=None, alias="ArtifactName")
    created_at: datetime | None = Field(default=None, alias="CreatedAt")
    metadata: Metadata | None = Field(default=None, alias="Metadata")
    results: list[Result] | None = Field(default=None, alias="Results")
    trivy: TrivyInfo | None = Field(default=None, alias="Trivy")


class ReportError(ValueError):
    """A report that cannot be trusted or understood."""


_M = TypeVar("_M", bound=BaseModel)


def _load(data: bytes | str, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # ValueError: also undecodable bytes
        raise ReportError(f"{what} is not JSON: {e}") from None


def _validate(model: type[_M], raw: Any, what: str) -> _M:
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ReportError(f"{what} does not fit its schema: {describe_validation(e)}") from None


def parse_report(data: bytes | str) -> Report:
    raw = _load(data, "Trivy report")
    if not isinstance(raw, dict) or raw.get("SchemaVersion") != 2:
        version = raw.get("SchemaVersion") if isinstance(raw, dict) else None
        raise ReportError(f"unsupported Trivy report SchemaVersion {version!r:.40} (want 2)")
    return _validate(Report, raw, "Trivy report")


def parse_version(data: bytes | str) -> VersionInfo:
    """The output of `trivy version --format json`."""
    return _validate(VersionInfo, _load(data, "trivy version output"), "trivy version output")


def normalise_severity(severity: str) -> str:
    value = severity.upper()
    return value if value in _RANK else "UNKNOWN"


def _counts() -> dict[str, int]:
    return {s.lower(): 0 for s in SEVERITIES} | {"total": 0}


def summarize(report: Report, budget_bytes: int = DEFAULT_FINDINGS_BUDGET,
              index_budget_bytes: int = INDEX_MAX_BYTES,
              scanners: Iterable[str] | None = None) -> dict[str, Any]:
    """The summary, fixable counts, bounded findings and per-ID index scangate stores for a
    report, with the failed checks and secrets of the scanners that ran (`scanners`: what
    the scan asked for; None: what the report shows)."""
    summary, fixable = _counts(), _counts()
    findings: list[dict[str, Any]] = []
    per_id: dict[str, dict[str, list[int]]] = {}
    for result in report.results or []:
        for v in result.vulnerabilities or []:
            severity = normalise_severity(v.severity)
            summary[severity.lower()] += 1
            summary["total"] += 1
            if v.fixed_version:
                fixable[severity.lower()] += 1
                fixable["total"] += 1
            key = v.vulnerability_id.upper()
            if _indexable(key):
                tally = per_id.setdefault(key, {}).setdefault(severity, [0, 0])
                tally[0] += 1
                tally[1] += bool(v.fixed_version)
            finding = {"id": v.vulnerability_id, "severity": severity, "package": v.pkg_name,
                       "installedVersion": v.installed_version,
                       "fixedVersion": v.fixed_version or None,
                       "class": result.class_, "target": result.target or None}
            # [:None] for severity, which has no limit
            findings.append({k: val[:FINDING_MAX_LENGTHS.get(k)]
                             for k, val in finding.items() if val is not None})
    findings.sort(key=lambda f: (_RANK[f["severity"]], "fixedVersion" not in f, f["id"],
                                 f["package"], f.get("installedVersion", "")))
    kept, truncated = bound_findings(findings, budget_bytes)
    index, index_truncated = encode_index(
        {vid: {sev: IdCounts(*tally) for sev, tally in by_severity.items()}
         for vid, by_severity in per_id.items()}, index_budget_bytes)
    out = {"summary": summary, "fixable": fixable, "findings": kept,
           "findingsTruncated": truncated, "vulnerabilityIndex": index,
           "vulnerabilityIndexTruncated": index_truncated}
    # The checks and secrets take their share of the budget first (there are few of them,
    # and each may refuse an image on its own); the vulnerabilities get what is left.
    baseline = summarize_baseline(report, scanners, budget_bytes // BASELINE_SHARE)
    baseline |= summarize_suppressed(report, budget_bytes // BASELINE_SHARE)
    spent = sum(len(json.dumps(baseline.get(k) or [], separators=(",", ":")))
                for k in ("failedChecks", "secrets", "suppressedFindings"))
    if spent:
        out["findings"], truncated = bound_findings(findings, max(budget_bytes - spent, 2))
        out["findingsTruncated"] = truncated
    return out | baseline


BASELINE_FIELDS = ("misconfigurations", "failedChecks", "secretSummary", "secrets",
                   "baselineTruncated", "baseline")
"""The status fields of the misconfig and secret scanners (summarize_baseline)."""
BASELINE_SHARE = 4
"""The failed checks and the secrets each get at most 1/BASELINE_SHARE of the findings
budget."""
CONFIG_TARGET = "image config"
FAILED = "FAIL"


def ran(report: Report, scanners: Iterable[str] | None) -> set[str]:
    """The scanners a report was made with: `scanners` when the caller knows them (the scan
    Job's options), else those whose findings the report holds."""
    if scanners is not None:
        return set(scanners)
    found = {"vuln"}
    for result in report.results or []:
        if result.misconfigurations is not None:
            found.add("misconfig")
        if result.secrets is not None:
            found.add("secret")
    return found


def summarize_baseline(report: Report, scanners: Iterable[str] | None = None,
                       budget_bytes: int = DEFAULT_FINDINGS_BUDGET // BASELINE_SHARE
                       ) -> dict[str, Any]:
    """The status fields of the misconfig and secret scanners: counts by severity, the
    failed checks and the secrets found (each list bounded to `budget_bytes`), and a line
    at a glance. A scanner that did not run gets None in each of its fields, so that a
    status patch clears what an earlier scan with it left."""
    used = ran(report, scanners)
    checks: list[dict[str, Any]] = []
    secrets: list[dict[str, Any]] = []
    for result in report.results or []:
        config = result.class_ == "config" and result.type == "dockerfile" and (
            result.target == report.artifact_name)
        for m in result.misconfigurations or []:
            if (m.status or FAILED).upper() != FAILED:
                continue
            check = {"id": m.id or m.avd_id or "unknown", "title": m.title,
                     "severity": normalise_severity(m.severity),
                     "target": CONFIG_TARGET if config else result.target or None}
            checks.append(_clipped(check, _CHECK_LIMITS))
        in_config = result.class_ == "secret" and result.target == report.artifact_name
        for sec in result.secrets or []:
            where: dict[str, Any] = {"target": CONFIG_TARGET if in_config
                                     else result.target or None, "line": sec.start_line}
            if in_config and sec.variable:
                where["field"] = (f"history: {sec.variable}" if sec.variable.startswith("ENV ")
                                  else f"Env {sec.variable}")
            secret = {"ruleID": sec.rule_id or "unknown", "category": sec.category,
                      "severity": normalise_severity(sec.severity), "title": sec.title, **where}
            secrets.append(_clipped(secret, _SECRET_LIMITS))
    checks.sort(key=lambda c: (_RANK[c["severity"]], c["id"], c.get("target", "")))
    secrets.sort(key=lambda f: (_RANK[f["severity"]], f["ruleID"], f.get("target", ""),
                                f.get("line", 0)))
    out: dict[str, Any] = dict.fromkeys(BASELINE_FIELDS)
    truncated = False
    glance = []
    if "misconfig" in used:
        out["misconfigurations"] = _tally(checks)
        out["failedChecks"], cut = bound_findings(checks, budget_bytes)
        truncated |= cut
        glance.append(_plural(len(checks), "check"))
    if "secret" in used:
        out["secretSummary"] = _tally(secrets)
        out["secrets"], cut = bound_findings(secrets, budget_bytes)
        truncated |= cut
        glance.append(_plural(len(secrets), "secret"))
    if glance:
        out["baselineTruncated"] = truncated
        out["baseline"] = ", ".join(glance)
    return out


SUPPRESSED_FIELDS = ("suppressed", "suppressedFindings", "suppressedTruncated")


def summarize_suppressed(report: Report, budget_bytes: int = DEFAULT_FINDINGS_BUDGET
                         ) -> dict[str, Any]:
    """The vulnerability findings VEX statements suppressed (scangate.core.vex): counts by
    severity and the findings with status, justification and document, bounded. None in
    each field when nothing was suppressed, so that a rescan clears what is gone."""
    found: list[dict[str, Any]] = []
    for result in report.results or []:
        for m in result.modified or []:
            v = m.finding
            if m.type != "vulnerability" or v is None:
                continue
            entry = {"id": v.vulnerability_id, "severity": normalise_severity(v.severity),
                     "package": v.pkg_name, "installedVersion": v.installed_version,
                     "fixedVersion": v.fixed_version or None, "status": m.status or "unknown",
                     "justification": m.statement or None, "source": source_of(m.source)}
            found.append(_clipped(entry, _SUPPRESSED_LIMITS))
    if not found:
        return dict.fromkeys(SUPPRESSED_FIELDS)
    found.sort(key=lambda f: (_RANK[f["severity"]], f["id"], f["package"]))
    kept, truncated = bound_findings(found, budget_bytes)
    return {"suppressed": _tally(found), "suppressedFindings": kept,
            "suppressedTruncated": truncated}


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _tally(items: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    counts = _counts()
    for item in items:
        counts[item["severity"].lower()] += 1
        counts["total"] += 1
    return counts


def _clipped(item: dict[str, Any], limits: Mapping[str, int | None]) -> dict[str, Any]:
    return {k: v[:limits.get(k)] if isinstance(v, str) else v
            for k, v in item.items() if v is not None}


def bound_findings(
    findings: list[dict[str, Any]], budget_bytes: int
) -> tuple[list[dict[str, Any]], bool]:
    """The longest prefix of `findings` whose JSON fits in `budget_bytes`."""
    size, kept = 2, list[dict[str, Any]]()  # 2: the brackets of the list
    for finding in findings:
        cost = len(json.dumps(finding, separators=(",", ":")).encode()) + 1
        if size + cost > budget_bytes:
            return kept, True
        size += cost
        kept.append(finding)
    return kept, False


def os_info(report: Report) -> dict[str, Any] | None:
    os_ = report.metadata.os if report.metadata else None
    if os_ is None:
        return None
    info = {"family": os_.family, "name": os_.name, "eosl": os_.eosl}
    return {k: v for k, v in info.items() if v is not None}


# -- The per-ID index ---------------------------------------------------------------------

class IdCounts(NamedTuple):
    """The findings of one vulnerability ID at one severity."""

    total: int
    fixable: int


VulnIndex = dict[str, dict[str, IdCounts]]
"""Upper-cased vulnerability ID -> severity (CRITICAL, ...) -> counts."""

INDEX_HEADER = "scangate-index/1"
_LETTER = {"CRITICAL": "C", "HIGH": "H", "MEDIUM": "M", "LOW": "L", "UNKNOWN": "U"}
_SEVERITY_OF = {letter: severity for severity, letter in _LETTER.items()}
# Only IDs an allowlist entry could name are indexed: that also keeps tabs and newlines
# out of the lines. IDs are upper-cased so that an entry matches whatever case it uses.
_ALLOWABLE_ID = re.compile(ALLOWLIST_ID_PATTERN)
_COUNT = re.compile(r"[0-9]{1,9}")
# A 256 KiB index inflates to a few MiB at most; anything past this is not ours.
_MAX_PLAIN_BYTES = 32 * 1024 * 1024


def _indexable(vid: str) -> bool:
    return len(vid) <= ALLOWLIST_ID_MAX_LENGTH and _ALLOWABLE_ID.fullmatch(vid) is not None


def _pack(groups: Iterable[tuple[str, Mapping[str, IdCounts]]]) -> str:
    lines = sorted(f"{vid}\t{_LETTER[severity]}\t{c.total}\t{c.fixable}"
                   for vid, by_severity in groups for severity, c in by_severity.items())
    text = "\n".join([INDEX_HEADER, *lines]).encode()
    return base64.b64encode(zlib.compress(text, 9)).decode("ascii")


def encode_index(index: Mapping[str, Mapping[str, IdCounts]],
                 budget_bytes: int = INDEX_MAX_BYTES) -> tuple[str, bool]:
    """The index as compact text, and whether IDs were left out to fit `budget_bytes`.

    An ID is kept or left out whole (all its severities), so the counts of every ID in
    the text are exact; the IDs of the most severe findings are kept first. An empty
    index still yields a header, which tells "no findings" from "no index".
    """
    text = _pack(index.items())
    if len(text) <= budget_bytes:
        return text, False
    groups = sorted(index.items(), key=lambda g: (min(_RANK[s] for s in g[1]), g[0]))
    # Compressed size grows with the prefix, near enough to bisect on it; every candidate
    # kept is checked against the budget itself.
    lo, hi = 0, len(groups) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(_pack(groups[:mid])) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return _pack(groups[:lo]), True


def decode_index(text: object) -> VulnIndex | None:
    """The index encoded by encode_index, or None for anything else (missing, damaged,
    hostile): the caller then cannot count by ID and must not pretend to."""
    if not isinstance(text, str) or len(text) > 2 * INDEX_MAX_BYTES:
        return None
    try:
        inflater = zlib.decompressobj()
        plain = inflater.decompress(base64.b64decode(text, validate=True), _MAX_PLAIN_BYTES)
        if not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
            return None
        header, *lines = plain.decode().split("\n")
    except (ValueError, zlib.error):  # binascii.Error and UnicodeDecodeError are ValueErrors
        return None
    if header != INDEX_HEADER:
        return None
    index: VulnIndex = {}
    for line in lines:
        parts = line.split("\t")
        if len(parts) != 4:
            return None
        vid, letter, count, fixable = parts
        severity = _SEVERITY_OF.get(letter)
        if (severity is None or not _indexable(vid) or not _COUNT.fullmatch(count)
                or not _COUNT.fullmatch(fixable) or int(fixable) > int(count)):
            return None
        by_severity = index.setdefault(vid, {})
        if severity in by_severity:
            return None
        by_severity[severity] = IdCounts(int(count), int(fixable))
    return index
