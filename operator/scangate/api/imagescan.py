"""ImageScan: one image's scan and its result."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import Field

from scangate.api.common import (
    Duration,
    LocalObjectReference,
    Model,
    Severity,
    SeverityCounts,
    StatusBase,
    cel,
)
from scangate.api.scanrule import Scanner


class Trigger(StrEnum):
    """What asked for a scan."""

    MANUAL = "Manual"
    PUSH = "Push"
    SCHEDULE = "Schedule"
    ADMISSION = "Admission"
    INVENTORY = "Inventory"
    """An image a running Pod runs (scangate's inventory of the cluster)."""


class Phase(StrEnum):
    """Where a scan is: Pending -> Queued -> Scanning -> Completed | Failed."""

    PENDING = "Pending"
    QUEUED = "Queued"
    SCANNING = "Scanning"
    COMPLETED = "Completed"
    FAILED = "Failed"


class ImageScanSpec(Model):
    """The image to scan and how."""

    image: str = Field(min_length=1, max_length=1024,
                       pattern=r"^[a-z0-9]([a-zA-Z0-9._/:@-]*[a-zA-Z0-9])?$")
    """An image reference with a tag and/or a digest, e.g.
    registry.example.com/team-a/api:1.4.2 or ...@sha256:<hex>."""
    rule_ref: LocalObjectReference | None = None
    """The ScanRule that created this scan, if any."""
    trigger: Trigger = Trigger.MANUAL
    """What asked for the scan."""
    scanners: list[Scanner] | None = Field(default=None, min_length=1, max_length=4)
    """Override of the scanners (default: vuln)."""
    ignore_unfixed: bool | None = None
    """Override: leave out vulnerabilities without a fixed version."""
    timeout: Duration | None = None
    """Override of the scan timeout, e.g. 90s, 10m, 1h (default from the operator's
    configuration)."""
    platform: str | None = Field(default=None, max_length=64,
                                 pattern=r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$")
    """Override of the platform picked out of an image index (default linux/amd64)."""


class ScannerInfo(Model):
    """The scanner that produced the result."""

    name: str = "trivy"
    """Scanner name."""
    version: str | None = None
    """Scanner version."""
    db_updated_at: datetime | None = None
    """When the vulnerability database was built."""


class OSInfo(Model):
    """The image's operating system as the scanner detected it."""

    family: str | None = None
    """OS family, e.g. debian, alpine, ubuntu."""
    name: str | None = None
    """OS version, e.g. 12.5."""
    eosl: bool | None = None
    """Whether the OS version is past its end of service life."""


class Finding(Model):
    """One finding, compact."""

    id: str = Field(max_length=128)
    """Vulnerability ID, e.g. CVE-2023-4863 or GHSA-...."""
    severity: Severity
    """Severity as the scanner reports it."""
    package: str = Field(max_length=256)
    """Affected package name."""
    installed_version: str | None = Field(default=None, max_length=128)
    """Installed version of the package."""
    fixed_version: str | None = Field(default=None, max_length=256)
    """First version with a fix; empty when there is none yet."""
    class_: str | None = Field(default=None, alias="class", max_length=64)
    """Result class: os-pkgs, lang-pkgs, secret, config."""
    target: str | None = Field(default=None, max_length=512)
    """Where it was found: the OS, or a lock file or package directory."""


class FailedCheck(Model):
    """A configuration check (Trivy's misconfig scanner, the baseline check) the image
    failed. The check's own message is not kept: it may quote a build command, and a build
    command may hold a secret."""

    id: str = Field(max_length=64)
    """The check's ID, e.g. DS-0002 (Trivy's ID, or its AVDID when that is all it has)."""
    title: str | None = Field(default=None, max_length=256)
    """What the check asks, e.g. "Image user should not be 'root'"."""
    severity: Severity
    """Severity of the check."""
    target: str | None = Field(default=None, max_length=512)
    """Where: "image config" (the Dockerfile rebuilt from its config and history), or the
    path of a configuration file in the image."""


class SecretFinding(Model):
    """A secret found in the image: its rule and where, never the matched value."""

    rule_id: str = Field(alias="ruleID", max_length=128)
    """The rule that matched, e.g. aws-secret-access-key."""
    category: str | None = Field(default=None, max_length=64)
    """The rule's category, e.g. AWS."""
    severity: Severity
    """Severity of the rule."""
    title: str | None = Field(default=None, max_length=256)
    """The rule's title, e.g. AWS Secret Access Key."""
    target: str | None = Field(default=None, max_length=512)
    """Where: the path of a file in the image, or "image config"."""
    line: int | None = Field(default=None, ge=0)
    """The line of the match in that file (in the image config: of its JSON)."""
    field: str | None = Field(default=None, max_length=160)
    """In the image config: the field, e.g. "Env AWS_SECRET_ACCESS_KEY" (a name, never a
    value)."""


class SuppressedFinding(Finding):
    """A vulnerability finding a VEX statement suppressed at scan time."""

    status: str = Field(max_length=32)
    """The statement's status: not_affected or fixed."""
    justification: str | None = Field(default=None, max_length=256)
    """The statement's justification, e.g. vulnerable_code_not_in_execute_path."""
    source: str = Field(max_length=512)
    """The document: <configmap>/<key> in the operator's namespace."""


class MalwareDetection(Model):
    """A file ClamAV found malicious in a layer of the image."""

    layer: str = Field(max_length=80)
    """The digest of the layer blob it is in."""
    path: str = Field(max_length=1024)
    """Its path inside that layer (a file inside a nested archive is named by the archive);
    empty when only the layer blob as a whole matched."""
    signature: str = Field(max_length=256)
    """The ClamAV signature that matched, e.g. Win.Test.EICAR_HDB-1."""


class MalwareSummary(Model):
    """What ClamAV found in the image's layers (scanner malware)."""

    count: int = Field(ge=0)
    """Detections in all (a file counts once, with its first signature)."""
    layers: int = Field(default=0, ge=0)
    """The layers scanned."""
    detections: list[MalwareDetection] = Field(default_factory=list, max_length=1000)
    """The detections, bounded in size by the findings budget; count covers all."""
    truncated: bool | None = None
    """True when detections were left out to bound the size."""


class ScannedWith(Model):
    """The options a result was produced with: only a scan asking for the same ones may
    reuse it."""

    scanners: list[Scanner] = Field(default_factory=lambda: [Scanner.VULN], max_length=4)
    """The scanners that ran."""
    ignore_unfixed: bool = False
    """Whether vulnerabilities without a fixed version were left out."""
    malware_db: str | None = Field(default=None, alias="malwareDB", max_length=512)
    """Scanner malware: ClamAV's version and its signature databases' versions, e.g.
    "ClamAV 1.4.6 daily:27450 main:62"."""
    db_updated_at: datetime | None = Field(default=None, alias="dbUpdatedAt")
    """The vulnerability DB the result was made with: its UpdatedAt as Trivy reports it
    (the Trivy server's DB in ClientServer mode, the scan Job's own in Standalone). A
    result whose DB is older than the one the operator knows is stale (ScanPolicy
    staleResults), and is rescanned."""
    db_next_update: datetime | None = Field(default=None, alias="dbNextUpdate")
    """That DB's NextUpdate as Trivy reports it: when its publisher meant to replace it."""


class Notified(Model):
    """What one receiver was last sent about this scan."""

    key: str = Field(max_length=256)
    """The idempotency key of the event delivered (or passed over by the receiver's
    filters): an event with another key is still to be sent."""
    ids: list[str] | None = Field(default=None, max_length=20000)
    """Short hashes of the vulnerability IDs of the result it was about, for
    onlyNewFindings (scangate.core.notify.id_digest)."""


class ImageScanStatus(StatusBase):
    """The scan's progress and result."""

    phase: Phase | None = None
    """Pending, Queued, Scanning, Completed or Failed."""
    digest: str | None = Field(default=None, max_length=128)
    """The manifest digest that was scanned (for an index: the platform's manifest)."""
    index_digest: str | None = Field(default=None, max_length=128)
    """When the image named a multi-platform index: the index's digest. Admission judges
    a reference by either digest with this result."""
    platform: str | None = None
    """The platform that was scanned."""
    queued_at: datetime | None = None
    """When the scan entered the queue."""
    start_time: datetime | None = None
    """When the scan Job started."""
    completion_time: datetime | None = None
    """When the scan completed or failed."""
    scanned_at: datetime | None = None
    """When the result was produced by a scan (for a reused result: by the source's scan);
    results older than the rescan interval are refreshed."""
    scanned_with: ScannedWith | None = None
    """The scan options the result was produced with."""
    retry_after: datetime | None = None
    """A failed attempt is retried, not before this time."""
    attempts: int | None = Field(default=None, ge=0)
    """Scan attempts made so far."""
    job_name: str | None = None
    """The current or last scan Job, in the operator's namespace."""
    job_uid: str | None = Field(default=None, alias="jobUID", max_length=64)
    """The uid of that Job, recorded when scangate created it: a result is read only from
    a pod this Job controls."""
    scanner: ScannerInfo | None = None
    """The scanner and its database."""
    os: OSInfo | None = None
    """The image's operating system."""
    reason: str | None = None
    """A CamelCase reason for a failure."""
    message: str | None = Field(default=None, max_length=4096)
    """A human-readable explanation of a failure."""
    reused_from: str | None = None
    """The ImageScan (namespace/name) whose result of the same digest was reused."""
    summary: SeverityCounts | None = None
    """Counts of all findings by severity."""
    fixable: SeverityCounts | None = None
    """Counts of findings that have a fixed version."""
    findings: list[Finding] | None = None
    """The findings, most severe first, bounded in size; summary counts cover all of them."""
    notified: dict[str, Notified] | None = None
    """Per receiver (ScanRule notification name): the last event delivered to it. A
    completion whose event is not recorded here is delivered, after a restart too."""
    rescan_request: str | None = Field(default=None, max_length=512)
    """Why and when the scan was last asked to scan again (written by the ScanRule that
    owns it: the tag was pushed again, or moved)."""
    rescan_answered: str | None = Field(default=None, max_length=512)
    """The rescanRequest the last lookup of the tag answered (written by the scan
    reconciler): a new request scans again."""
    findings_truncated: bool | None = None
    """True when some findings were left out of .status.findings to bound the object's size."""
    vulnerability_index: str | None = Field(default=None, max_length=256 * 1024)
    """Exact counts per vulnerability ID, covering every finding even when .status.findings is
    truncated, so that allowlist entries subtract exactly what they name: zlib-compressed,
    base64-encoded text, a header line then sorted lines "ID<TAB>S<TAB>count<TAB>fixable"
    (S: C, H, M, L or U for the severity; IDs upper-cased)."""
    vulnerability_index_truncated: bool | None = None
    """True when IDs were left out of .status.vulnerabilityIndex to bound its size (those of
    the most severe findings are kept); an allowlist entry for an ID not in it does not apply."""
    misconfigurations: SeverityCounts | None = None
    """Counts of the failed configuration checks by severity (scanner misconfig)."""
    failed_checks: list[FailedCheck] | None = None
    """The failed configuration checks, most severe first, bounded in size; the counts cover
    all of them."""
    secret_summary: SeverityCounts | None = None
    """Counts of the secrets found by severity (scanner secret)."""
    secrets: list[SecretFinding] | None = None
    """The secrets found (rule, category, severity, where; never the value), most severe
    first, bounded in size; secretSummary covers all of them."""
    baseline_truncated: bool | None = None
    """True when failed checks or secrets were left out of their lists to bound the size."""
    suppressed: SeverityCounts | None = None
    """Counts of the vulnerability findings VEX statements suppressed at scan time (not in
    summary)."""
    suppressed_findings: list[SuppressedFinding] | None = None
    """Those findings with the statement's status, justification and document, bounded in
    size; .status.suppressed counts all of them."""
    suppressed_truncated: bool | None = None
    """True when some suppressed findings were left out to bound the size."""
    malware: MalwareSummary | None = None
    """Malicious files ClamAV found in the layers (scanner malware): a file deleted by a
    later layer is still reported, as its bytes are still in the image."""
    baseline: str | None = Field(default=None, max_length=64)
    """The misconfig and secret results at a glance, e.g. "5 checks, 1 secret" (empty when
    the scan ran neither scanner)."""


class ImageScan(Model):
    """One image's scan by Trivy and its result, keyed by the image's digest."""

    api_version: Literal["scangate.dev/v1alpha1"] = "scangate.dev/v1alpha1"
    kind: Literal["ImageScan"] = "ImageScan"
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: ImageScanSpec = Field(json_schema_extra={"x-kubernetes-validations": [cel(
        "self.image == oldSelf.image",
        "image is immutable: create a new ImageScan to scan another image",
        ".image",
    )]})
    """The image to scan."""
    status: ImageScanStatus | None = None
    """Progress and result, written by scangate."""
