"""ScanRule: what to scan in a registry, when, and who hears about it."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import Field

from scangate.api.common import (
    Duration,
    LocalObjectReference,
    Model,
    SecretKeyReference,
    Severity,
    SeverityCounts,
    StatusBase,
    cel,
)

SCAN_NOW_ANNOTATION = "scangate.dev/scan-now"


class Registry(Model):
    """Where the images live and how to reach the registry."""

    url: str = Field(max_length=2048, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    """Base URL of the registry's distribution API: https://registry.example.com, or
    http://host:port for a plain-HTTP registry."""
    ca_bundle: str | None = Field(default=None, max_length=65536)
    """PEM certificates to trust for the registry's TLS, in addition to the system's."""
    insecure_skip_tls_verify: bool = Field(default=False, alias="insecureSkipTLSVerify")
    """Skip verification of the registry's TLS certificate. Not for production."""
    credentials_secret_ref: LocalObjectReference | None = None
    """A Secret of type kubernetes.io/dockerconfigjson or kubernetes.io/basic-auth in the
    rule's namespace, with credentials for the registry."""


class Scope(Model):
    """Which repositories of the registry the rule covers (ACR's NAMESPACE and REPO scopes)."""

    namespaces: list[str] = Field(
        min_length=1, max_length=64,
        json_schema_extra={"items": {"type": "string", "pattern": r"^[a-z0-9]+([._/-][a-z0-9]+)*$",
                                     "maxLength": 255}},
    )
    """Registry namespaces (the first path component of a repository, e.g. team-a)."""
    repositories: list[str] | None = Field(
        default=None, max_length=256,
        json_schema_extra={"items": {"type": "string", "pattern": r"^[a-z0-9]+([._/-][a-z0-9]+)*$",
                                     "maxLength": 255}},
    )
    """Repository names inside the one namespace listed; all repositories of the
    namespaces when omitted."""


class Triggers(Model):
    """When the rule scans."""

    on_push: bool = True
    """Scan a matching image when a push event for it arrives."""
    schedule: str | None = Field(default=None, max_length=128)
    """A five-field cron expression (UTC), e.g. "0 3 * * *", or a macro like @daily."""


class Scanner(StrEnum):
    """What a scan looks for: Trivy's scanners, and ClamAV's (malware)."""

    VULN = "vuln"
    SECRET = "secret"
    MISCONFIG = "misconfig"
    MALWARE = "malware"


class ScanOptions(Model):
    """How each image is scanned."""

    scanners: list[Scanner] = Field(default_factory=lambda: [Scanner.VULN], min_length=1,
                                    max_length=4, json_schema_extra={"default": ["vuln"]})
    """Scanners: vuln (default), and optionally secret and misconfig (the baseline check) of
    Trivy, and malware (ClamAV over every layer of the image)."""
    ignore_unfixed: bool = False
    """Leave out vulnerabilities that have no fixed version yet."""
    timeout: Duration = "10m"
    """How long one scan may run before its Job is stopped, e.g. 90s, 10m, 1h."""
    platform: str = Field(default="linux/amd64", max_length=64,
                          pattern=r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$")
    """The platform picked out of a multi-platform image index."""


class NotificationType(StrEnum):
    """Kinds of notification receivers."""

    DINGTALK = "dingtalk"
    WEBHOOK = "webhook"


class NotificationEvent(StrEnum):
    """Events a receiver can subscribe to."""

    SCAN_COMPLETED = "ScanCompleted"
    SCAN_FAILED = "ScanFailed"
    BLOCKED = "Blocked"
    NEWLY_VULNERABLE = "NewlyVulnerable"
    """A running image an Enforce policy admitted is refused after a rescan with a newer
    vulnerability DB: the workloads that run it and the new findings."""


class Notification(Model):
    """A receiver of scan events: a DingTalk robot or an HTTP(S) webhook."""

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """Name of the receiver, unique within the rule."""
    type: NotificationType
    """dingtalk (a DingTalk robot) or webhook (JSON over HTTP or HTTPS)."""
    url_secret_ref: SecretKeyReference
    """The Secret key holding the receiver's URL (URLs carry tokens: never in the spec)."""
    signing_secret_ref: SecretKeyReference | None = None
    """The Secret key holding the signing secret: DingTalk's "SEC..." secret, or the HMAC
    key of the X-Scangate-Signature header for webhooks."""
    ca_bundle: str | None = Field(default=None, max_length=65536)
    """PEM certificates to trust for an HTTPS webhook receiver."""
    events: list[NotificationEvent] = Field(
        default_factory=lambda: [NotificationEvent.SCAN_COMPLETED, NotificationEvent.SCAN_FAILED],
        min_length=1, max_length=4,
        json_schema_extra={"default": ["ScanCompleted", "ScanFailed"]},
    )
    """Which events are sent."""
    min_severity: Severity | None = None
    """Send ScanCompleted only when a finding of at least this severity exists."""
    only_new_findings: bool = False
    """Send ScanCompleted only when the scan found something the image's previous scan did not."""


class ScanRuleSpec(Model):
    """What a ScanRule scans and who hears about it."""

    registry: Registry
    """The registry to scan."""
    scope: Scope = Field(json_schema_extra={"x-kubernetes-validations": [cel(
        "!has(self.repositories) || size(self.repositories) == 0 || size(self.namespaces) == 1",
        "repositories can only be listed with exactly one namespace",
        ".repositories",
    )]})
    """The registry namespaces and repositories the rule covers."""
    tag_filter: str = Field(default=".*", min_length=1, max_length=256)
    """A regular expression that must match the whole tag, e.g. "v[0-9]+\\.[0-9]+\\.[0-9]+",
    in RE2 syntax (as Go-based registries use): matching is linear in the tag's length, and
    back-references and lookarounds, which RE2 lacks, are refused."""
    triggers: Triggers = Field(default_factory=Triggers, json_schema_extra={"default": {}})
    """When the rule scans. A manual run: kubectl annotate scanrule NAME
    scangate.dev/scan-now=<anything new> --overwrite."""
    scan: ScanOptions = Field(default_factory=ScanOptions, json_schema_extra={"default": {}})
    """How each image is scanned."""
    notifications: list[Notification] | None = Field(
        default=None, max_length=16,
        json_schema_extra={"x-kubernetes-validations": [cel(
            "self.all(x, self.exists_one(y, y.name == x.name))",
            "notification names must be unique",
        )]},
    )
    """Receivers of this rule's events."""
    suspend: bool = False
    """Stop every trigger of the rule: spec changes, schedule, pushes and scan-now."""


class LastRun(Model):
    """What the rule's most recent run did."""

    time: datetime | None = None
    """When the run started."""
    trigger: Literal["Push", "Schedule", "Manual", "Create"] | None = None
    """What started it."""
    repositories: int = Field(default=0, ge=0)
    """Repositories matched."""
    tags: int = Field(default=0, ge=0)
    """Tags matched by the tag filter."""
    scans_created: int = Field(default=0, ge=0)
    """ImageScans created (images whose digest had a fresh result were not scanned again)."""


class ReceiverStatus(Model):
    """The delivery state of one notification receiver."""

    name: str = Field(max_length=63)
    """The notification's name."""
    since: datetime | None = None
    """When scangate first saw the receiver: scans finished before it are not sent."""
    last_delivery: datetime | None = None
    """When a message last reached it."""
    deliveries: int = Field(default=0, ge=0)
    """Messages delivered (a summary counts once)."""
    failures: int = Field(default=0, ge=0)
    """Failed attempts since the last delivery."""
    last_error: str | None = Field(default=None, max_length=1024)
    """Why the last attempt failed (never the URL or a secret)."""


class HandlerRecord(Model):
    """kopf's record of the rule's change handlers (scangate.handlers.scanrules): in the
    status, which the operator may write, never in the tenant's metadata."""

    last_handled_configuration: str | None = Field(default=None, max_length=262144)
    """The spec and labels last handled, as kopf compares them."""
    progress: dict[str, object] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    """Handlers under way or retried."""


class ScanRuleStatus(StatusBase):
    """Observed state of a ScanRule."""

    last_run: LastRun | None = None
    """The most recent run."""
    images: int | None = Field(default=None, ge=0)
    """Images (digests) whose scans the totals cover."""
    totals: SeverityCounts | None = None
    """Findings by severity over the rule's images."""
    last_scan_now: str | None = Field(default=None, max_length=256)
    """The scangate.dev/scan-now value last acted on."""
    notifications: list[ReceiverStatus] | None = Field(default=None, max_length=16)
    """Delivery state per notification receiver."""
    last_schedule_time: datetime | None = None
    """The scheduled time of the last scheduled run: the next one is the schedule's first
    time after it, so a restart neither misses nor doubles a run."""
    kopf: HandlerRecord | None = None
    """kopf's record of the rule's change handlers."""


class ScanRule(Model):
    """Scans the images of registry namespaces and repositories whose tags match a regular
    expression: on push, on a schedule, or by hand; and notifies receivers."""

    api_version: Literal["scangate.dev/v1alpha1"] = "scangate.dev/v1alpha1"
    kind: Literal["ScanRule"] = "ScanRule"
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: ScanRuleSpec
    """Desired behaviour of the rule."""
    status: ScanRuleStatus | None = None
    """Observed state, written by scangate."""
