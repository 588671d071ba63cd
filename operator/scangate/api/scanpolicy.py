"""ScanPolicy: the cluster's blocking policy for workloads at admission."""

from __future__ import annotations

from datetime import date
from enum import StrEnum
from typing import Literal

from pydantic import Field
from pydantic.config import JsonDict

from scangate.api.common import Duration, LabelSelector, Model, StatusBase
from scangate.api.scanrule import Notification

# Field-level item constraints replace pydantic's items schema, so they repeat the type.
GLOB_LIST: JsonDict = {"items": {"type": "string", "minLength": 1, "maxLength": 512}}
# The vulnerability IDs an allowlist entry may name (and so the IDs worth indexing exactly).
ALLOWLIST_ID_MAX_LENGTH = 128
ALLOWLIST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"


class Action(StrEnum):
    """What happens to a workload that fails the policy."""

    ENFORCE = "Enforce"
    WARN = "Warn"
    AUDIT = "Audit"


class Match(Model):
    """Which workloads and images the policy applies to; empty matches everything."""

    namespace_selector: LabelSelector | None = None
    """Namespaces whose labels match."""
    namespaces: list[str] | None = Field(default=None, max_length=256)
    """Namespaces by name."""
    exclude_namespaces: list[str] | None = Field(default=None, max_length=256)
    """Namespaces never matched."""
    images: list[str] | None = Field(default=None, max_length=256,
                                     json_schema_extra=GLOB_LIST)
    """Glob patterns on the normalised image reference, e.g. "registry.example.com/prod/*"."""
    exclude_images: list[str] | None = Field(default=None, max_length=256,
                                             json_schema_extra=GLOB_LIST)
    """Glob patterns of images the policy never applies to."""


class Thresholds(Model):
    """The largest allowed count per severity; a severity left out is unlimited."""

    critical: int | None = Field(default=None, ge=0)
    """Allowed CRITICAL findings."""
    high: int | None = Field(default=None, ge=0)
    """Allowed HIGH findings."""
    medium: int | None = Field(default=None, ge=0)
    """Allowed MEDIUM findings."""
    low: int | None = Field(default=None, ge=0)
    """Allowed LOW findings."""
    unknown: int | None = Field(default=None, ge=0)
    """Allowed UNKNOWN findings."""


CONFIGMAP_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
CHECK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"


class Misconfig(Model):
    """What the policy allows of the image's configuration checks (the baseline check: Trivy's
    misconfig scanner over the image's config and history, e.g. DS-0002 "Image user should
    not be 'root'"). Setting anything here makes the policy need results of the misconfig
    scanner: an image scanned without it counts as unscanned, and the gate's scans ask for it."""

    thresholds: Thresholds = Field(default_factory=Thresholds,
                                   json_schema_extra={"default": {}})
    """The largest allowed count of failed checks per severity; a severity left out is
    unlimited."""
    deny_checks: list[str] | None = Field(default=None, max_length=256, json_schema_extra={
        "items": {"type": "string", "minLength": 1, "maxLength": 64,
                  "pattern": CHECK_ID_PATTERN}})
    """Check IDs that refuse an image on their own when it fails them, e.g. DS-0002
    (case-insensitive)."""


class VexReference(Model):
    """An OpenVEX document: a key of a ConfigMap in the operator's namespace (a ScanPolicy
    has no namespace of its own; tenants' ConfigMaps are never read)."""

    name: str = Field(min_length=1, max_length=253, pattern=CONFIGMAP_NAME_PATTERN)
    """The ConfigMap's name."""
    key: str = Field(default="openvex.json", min_length=1, max_length=253,
                     pattern=r"^[-._a-zA-Z0-9]+$")
    """The key holding the document (default openvex.json)."""


class AllowlistEntry(Model):
    """A finding that does not count against the thresholds, until it expires."""

    id: str = Field(min_length=1, max_length=ALLOWLIST_ID_MAX_LENGTH,
                    pattern=ALLOWLIST_ID_PATTERN)
    """The vulnerability ID, e.g. CVE-2023-4863."""
    expires: date | None = None
    """The last day the entry applies (UTC); after it the entry stops applying by itself."""
    reason: str | None = Field(default=None, max_length=1024)
    """Why the finding is accepted."""
    images: list[str] | None = Field(default=None, max_length=64, json_schema_extra=GLOB_LIST)
    """Glob patterns of images the entry applies to; all images when omitted."""


class BreakGlass(Model):
    """Emergency override with the annotation scangate.dev/break-glass: <reason>."""

    enabled: bool = False
    """Admit workloads carrying the annotation, leaving an Event, a metric and a notification."""


class ScanPolicySpec(Model):
    """The blocking policy."""

    action: Action = Action.ENFORCE
    """Enforce denies, Warn admits with warnings, Audit admits and records."""
    match: Match = Field(default_factory=Match, json_schema_extra={"default": {}})
    """Which workloads and images the policy applies to."""
    thresholds: Thresholds = Field(default_factory=Thresholds, json_schema_extra={"default": {}})
    """Largest allowed finding counts per severity."""
    fixable_only: bool = False
    """Count only findings that have a fixed version."""
    allowlist: list[AllowlistEntry] | None = Field(default=None, max_length=512)
    """Findings accepted, each until its expiry."""
    unscanned: Literal["Deny", "Warn", "Allow"] = "Deny"
    """What to do with an image that has no result yet (a scan is started either way)."""
    max_scan_age: Duration | None = None
    """Results older than this count as unscanned, e.g. 24h or 7d."""
    failed_scan: Literal["Deny", "Allow"] = "Deny"
    """What to do with an image whose scan failed."""
    stale_results: Literal["Allow", "Warn", "Deny"] = "Allow"
    """What a result made with a vulnerability DB older than the one the operator knows
    (the Trivy server's; status.scannedWith.dbUpdatedAt) is worth while its rescan runs:
    Allow judges it as it is, Warn also warns (at most the policy's action), Deny refuses
    it as the policy's action says. A result that does not name its DB is judged as it is."""
    misconfig: Misconfig | None = None
    """Thresholds and refused check IDs for the image's configuration checks (scanner
    misconfig)."""
    vex: list[VexReference] | None = Field(default=None, max_length=32)
    """OpenVEX documents whose not_affected and fixed statements suppress findings under
    this policy: Trivy applies them at scan time (the suppressed findings are kept apart in
    the ImageScan's status), and admission judges by what they say now."""
    secrets: Literal["Deny", "Warn", "Allow"] | None = None
    """What to do with an image in which secrets were found (scanner secret): Deny refuses it
    (as the action says), Warn admits it with a warning, Allow (or unset) does not look. Deny
    and Warn make the policy need results of the secret scanner."""
    malware: Literal["Deny", "Warn", "Allow"] | None = None
    """What to do with an image in which ClamAV found malware (scanner malware): Deny refuses
    it (as the action says), Warn admits it with a warning, Allow does not look. Unset: a
    result that has detections is denied as the action says (Deny when the policy
    enforces), but the policy does not require malware scans. Deny and Warn make the policy
    need results of the malware scanner."""
    notifications: list[Notification] | None = Field(default=None, max_length=16)
    """Receivers of this policy's Blocked events (and, subscribed to NewlyVulnerable, of
    running images it admitted and refuses after a rescan with a newer vulnerability DB);
    their Secrets live in the operator's namespace (a ScanPolicy has none of its own)."""
    break_glass: BreakGlass = Field(default_factory=BreakGlass, json_schema_extra={"default": {}})
    """Emergency override."""
    pin_digests: bool = False
    """A mutating webhook rewrites each admitted image reference to the digest that was
    judged (repo:tag@sha256:...), so that what runs is what passed."""


class ScanPolicyStatus(StatusBase):
    """Observed state of a ScanPolicy."""


class ScanPolicy(Model):
    """A cluster-wide blocking policy: thresholds per severity, an allowlist with expiry,
    and what to do with unscanned images; enforced by scangate's admission webhook."""

    api_version: Literal["scangate.dev/v1alpha1"] = "scangate.dev/v1alpha1"
    kind: Literal["ScanPolicy"] = "ScanPolicy"
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: ScanPolicySpec
    """The policy."""
    status: ScanPolicyStatus | None = None
    """Observed state, written by scangate."""
