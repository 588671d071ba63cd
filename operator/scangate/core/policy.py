"""Admission decisions: which ScanPolicies apply to an image, and what they say of it.

Pure: no I/O and no clock of its own (`now` is a parameter), so that the webhook can
call it on in-memory projections per request and tests can pin the time.

The rules, as users of Kyverno and Harbor would expect them:

- Globs (match.images, match.excludeImages, allowlist images) are fnmatch patterns on
  the normalised reference (docker.io/library/nginx:1.25), case-sensitive; `*` matches
  any characters, `/` included, as in Kyverno. A reference with a digest is also tried
  without it, so that `app:1.0` still matches once pinDigests has rewritten the
  reference to `app:1.0@sha256:...`. match.namespaces and excludeNamespaces take globs
  too; an empty or missing list does not restrict.
- A policy's action is the most it does: an unscanned image under `unscanned: Warn`
  warns under an Enforce policy and is only recorded under an Audit one.
- A scan in progress (Pending, Queued, Scanning) counts as unscanned even if its status
  still holds an older result: a rescan may have resolved the tag to another digest, so
  that result need not be this image's.
- An allowlist entry subtracts exactly the findings of its ID, counted by the result's
  per-ID index. Where that index is missing, or truncated and without the ID, nothing is
  subtracted and the message says so: an allowlist never hides what cannot be counted.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import IntEnum, StrEnum
from functools import cached_property
from typing import Any

from pydantic import ValidationError

from scangate.api.common import LabelSelector
from scangate.api.imagescan import Phase
from scangate.api.scanpolicy import ScanPolicySpec
from scangate.core.durations import parse_duration
from scangate.core.errors import describe_validation
from scangate.core.scanstate import parse_time
from scangate.core.trivy import SEVERITIES, VulnIndex, decode_index
from scangate.core.vex import VexState, applicable, document_name, scope_in

BREAK_GLASS_ANNOTATION = "scangate.dev/break-glass"
SEVERITY_KEYS = tuple(s.lower() for s in SEVERITIES)
IN_PROGRESS = frozenset({Phase.PENDING, Phase.QUEUED, Phase.SCANNING})
TOP_FINDINGS = 3
MESSAGE_LIMIT = 4096
"""Bound of a whole denial message (kubectl shows it as is)."""
VERDICT_MESSAGE_LIMIT = 1200
WARNING_LIMIT = 256
"""Kubernetes may truncate admission warnings longer than this."""
MAX_WARNINGS = 10


class PolicyError(ValueError):
    """A ScanPolicy object that cannot be used, with the reason."""


class Effect(IntEnum):
    """What a failing policy does to a workload, in order of strictness."""

    ALLOW = 0
    AUDIT = 1
    WARN = 2
    ENFORCE = 3

    @property
    def label(self) -> str:
        """The name as a policy's action spells it (Allow: nothing to do)."""
        return self.name.title()


class Kind(StrEnum):
    """Why a policy passed or failed an image."""

    PASSED = "Passed"
    VULNERABLE = "Vulnerable"
    MISCONFIGURED = "Misconfigured"
    """Failed configuration checks over the policy's misconfig thresholds, or a check it
    denies."""
    SECRETS_FOUND = "SecretsFound"
    MALWARE_FOUND = "MalwareFound"
    """ClamAV found malicious files in the image's layers."""
    UNSCANNED = "Unscanned"
    SCAN_FAILED = "ScanFailed"
    INVALID_REFERENCE = "InvalidReference"
    """The reference could not be parsed: nothing can be known of the image."""
    STALE_RESULT = "StaleResult"
    """The result was made with a vulnerability DB older than the one known (staleResults)."""


FINDING_KINDS = frozenset({Kind.VULNERABLE, Kind.MISCONFIGURED, Kind.SECRETS_FOUND,
                           Kind.MALWARE_FOUND})
"""Failures that say something of the image's findings (each policy's story is its own)."""
SCANNER_NAMES = {"vuln": "vulnerability", "misconfig": "misconfig (configuration checks)",
                 "secret": "secret", "malware": "malware (ClamAV)"}
TOP_BASELINE = 5
"""Failed checks and secrets named in a message."""


@dataclass(frozen=True, eq=False)
class Policy:
    """A ScanPolicy as the engine uses it."""

    name: str
    spec: ScanPolicySpec
    max_scan_age: timedelta | None = None
    """spec.maxScanAge, parsed."""

    @property
    def effect(self) -> Effect:
        """What failing this policy does."""
        return Effect[self.spec.action.name]

    @cached_property
    def scanners(self) -> frozenset[str]:
        """The scanners a result must have been made with for this policy to judge it."""
        needed = {"vuln"}
        misconfig = self.spec.misconfig
        if misconfig is not None and (misconfig.deny_checks or any(
                getattr(misconfig.thresholds, s) is not None for s in SEVERITY_KEYS)):
            needed.add("misconfig")
        if self.spec.secrets in ("Deny", "Warn"):
            needed.add("secret")
        if self.spec.malware in ("Deny", "Warn"):
            needed.add("malware")
        return frozenset(needed)

    @cached_property
    def vex_documents(self) -> tuple[str, ...]:
        """spec.vex as document names (configmap/key)."""
        return tuple(dict.fromkeys(document_name(r.name, r.key) for r in self.spec.vex or ()))

    @cached_property
    def denied_checks(self) -> frozenset[str]:
        """spec.misconfig.denyChecks, upper-cased."""
        misconfig = self.spec.misconfig
        return frozenset(c.upper() for c in (misconfig.deny_checks if misconfig else None)
                         or ())


def parse_policy(obj: Mapping[str, Any]) -> Policy:
    """A ScanPolicy object (as stored or as written for kubectl apply), validated."""
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise PolicyError("ScanPolicy has no metadata.name")
    raw = obj.get("spec")
    if not isinstance(raw, Mapping):
        raise PolicyError(f"ScanPolicy {name} has no spec")
    try:
        spec = ScanPolicySpec.model_validate(raw)
    except ValidationError as e:
        raise PolicyError(f"ScanPolicy {name}: invalid spec: {describe_validation(e)}") from None
    try:
        max_age = parse_duration(spec.max_scan_age) if spec.max_scan_age else None
    except ValueError as e:
        raise PolicyError(f"ScanPolicy {name}: spec.maxScanAge: {e}") from None
    return Policy(name, spec, max_age)


# -- Results -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TopFinding:
    """One of the findings kept in status, for messages."""

    id: str
    severity: str
    package: str = ""
    installed_version: str | None = None
    fixed_version: str | None = None


@dataclass(frozen=True)
class CheckFailure:
    """A failed configuration check kept in status."""

    id: str
    severity: str
    title: str = ""
    target: str = ""


@dataclass(frozen=True)
class SecretHit:
    """A secret found, as kept in status: the rule and where, never the value."""

    rule_id: str
    severity: str
    category: str = ""
    target: str = ""
    line: int | None = None
    field: str = ""

    def where(self) -> str:
        place = _clip(self.target or "the image", 120)
        if self.field:
            place += f" ({_clip(self.field, 80)})"
        elif self.line:
            place += f" line {self.line}"
        return place


@dataclass(frozen=True)
class MalwareHit:
    """A malicious file ClamAV found, as kept in status."""

    signature: str
    path: str = ""
    layer: str = ""

    def describe(self) -> str:
        where = _clip(self.path, 200) if self.path else "the layer blob as a whole"
        return f"{_clip(self.signature, 96)} in {where} (layer {self.layer[:19]})"


@dataclass(frozen=True)
class SuppressedHit:
    """A finding VEX suppressed at scan time, as kept in status."""

    id: str
    severity: str
    package: str = ""
    fixed_version: str | None = None
    status: str = ""
    justification: str = ""
    source: str = ""

    def describe(self) -> str:
        why = ", ".join(filter(None, [self.status, _clip(self.justification, 80)]))
        return (f"{_clip(self.id, 64)} in {_clip(self.package, 60) or 'the image'} "
                f"({_clip(self.source, 120)}: {why})")


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _counts(value: object) -> dict[str, int] | None:
    if not isinstance(value, Mapping):
        return None
    return {k: _count(value.get(k)) for k in SEVERITY_KEYS}


@dataclass(frozen=True)
class ImageResult:
    """What admission needs of an ImageScan's status.

    Build it once per version of the status (from_status) and keep it: the per-ID
    index is decoded on first use only, and only an applicable allowlist uses it.
    """

    phase: str | None = None
    digest: str | None = None
    index_digest: str | None = None
    """The multi-platform index the scanned manifest was chosen from, if any: a reference
    by the index's digest is judged by this result as the tag is."""
    summary: Mapping[str, int] | None = None
    """Counts of all findings by severity (lower-case keys)."""
    fixable: Mapping[str, int] | None = None
    """Counts of the findings that have a fixed version."""
    scanned_at: datetime | None = None
    reason: str | None = None
    message: str | None = None
    """Why the scan failed."""
    findings: tuple[TopFinding, ...] = ()
    """The findings kept in status, most severe first (possibly truncated)."""
    index_text: str | None = field(default=None, repr=False)
    """status.vulnerabilityIndex: exact counts per ID (see scangate.core.trivy)."""
    index_truncated: bool = False
    scanners: frozenset[str] | None = None
    """The scanners the result was made with (status.scannedWith); None when it does not
    say (results made before it did were vulnerability scans)."""
    misconfig: Mapping[str, int] | None = None
    """Failed configuration checks by severity (None: the misconfig scanner did not run)."""
    checks: tuple[CheckFailure, ...] = ()
    """The failed checks kept in status, most severe first."""
    secret_counts: Mapping[str, int] | None = None
    """Secrets found by severity, with "total" (None: the secret scanner did not run)."""
    secrets: tuple[SecretHit, ...] = ()
    """The secrets kept in status, most severe first."""
    baseline_truncated: bool = False
    """Some failed checks or secrets were left out of status."""
    findings_truncated: bool = False
    """Some findings were left out of status.findings."""
    suppressed: tuple[SuppressedHit, ...] = ()
    """The findings VEX suppressed at scan time, as kept in status."""
    suppressed_counts: Mapping[str, int] | None = None
    suppressed_truncated: bool = False
    malware_count: int | None = None
    """Malicious files ClamAV found (None: the malware scanner did not run)."""
    malware: tuple[MalwareHit, ...] = ()
    """The detections kept in status."""
    db_updated_at: datetime | None = None
    """The vulnerability DB the result was made with (status.scannedWith.dbUpdatedAt)."""

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> ImageResult:
        """The view of an ImageScan's status (or of summarize's output), tolerant of junk."""
        findings = []
        for raw in status.get("findings") or ():
            if isinstance(raw, Mapping) and _text(raw.get("id")) and _text(raw.get("severity")):
                findings.append(TopFinding(
                    raw["id"], raw["severity"], _text(raw.get("package")) or "",
                    _text(raw.get("installedVersion")), _text(raw.get("fixedVersion"))))
        checks = tuple(
            CheckFailure(raw["id"], raw["severity"], _text(raw.get("title")) or "",
                         _text(raw.get("target")) or "")
            for raw in status.get("failedChecks") or () if isinstance(raw, Mapping)
            and _text(raw.get("id")) and _text(raw.get("severity")))
        secrets = tuple(
            SecretHit(raw["ruleID"], raw["severity"], _text(raw.get("category")) or "",
                      _text(raw.get("target")) or "", _count(raw.get("line")) or None,
                      _text(raw.get("field")) or "")
            for raw in status.get("secrets") or () if isinstance(raw, Mapping)
            and _text(raw.get("ruleID")) and _text(raw.get("severity")))
        used = status.get("scannedWith")
        listed = used.get("scanners") if isinstance(used, Mapping) else None
        secret_counts = _counts(status.get("secretSummary"))
        if secret_counts is not None:
            secret_counts["total"] = _count((status.get("secretSummary") or {}).get("total"))
        suppressed = tuple(
            SuppressedHit(raw["id"], raw["severity"], _text(raw.get("package")) or "",
                          _text(raw.get("fixedVersion")), _text(raw.get("status")) or "",
                          _text(raw.get("justification")) or "", _text(raw.get("source")) or "")
            for raw in status.get("suppressedFindings") or () if isinstance(raw, Mapping)
            and _text(raw.get("id")) and raw.get("severity") in SEVERITIES)
        found = status.get("malware")
        malware = tuple(
            MalwareHit(raw["signature"], _text(raw.get("path")) or "",
                       _text(raw.get("layer")) or "")
            for raw in (found.get("detections") or () if isinstance(found, Mapping) else ())
            if isinstance(raw, Mapping) and _text(raw.get("signature")))
        return cls(
            db_updated_at=parse_time(used.get("dbUpdatedAt")) if isinstance(used, Mapping)
            else None,
            malware_count=_count(found.get("count")) if isinstance(found, Mapping) else None,
            malware=malware,
            findings_truncated=status.get("findingsTruncated") is True,
            suppressed=suppressed, suppressed_counts=_counts(status.get("suppressed")),
            suppressed_truncated=status.get("suppressedTruncated") is True,
            scanners=frozenset(x for x in listed if isinstance(x, str))
            if isinstance(listed, list) else None,
            misconfig=_counts(status.get("misconfigurations")), checks=checks,
            secret_counts=secret_counts, secrets=secrets,
            baseline_truncated=status.get("baselineTruncated") is True,
            phase=_text(status.get("phase")), digest=_text(status.get("digest")),
            index_digest=_text(status.get("indexDigest")),
            summary=_counts(status.get("summary")), fixable=_counts(status.get("fixable")),
            scanned_at=parse_time(status.get("scannedAt")), reason=_text(status.get("reason")),
            message=_text(status.get("message")), findings=tuple(findings),
            index_text=_text(status.get("vulnerabilityIndex")),
            index_truncated=status.get("vulnerabilityIndexTruncated") is True)

    @cached_property
    def index(self) -> VulnIndex | None:
        """Exact counts per upper-cased ID and severity; None when missing or unreadable."""
        return decode_index(self.index_text)


# -- Matching ----------------------------------------------------------------------------

def _globs_match(patterns: Iterable[str], image: str) -> bool:
    candidates = {image, image.partition("@")[0]}
    return any(fnmatch.fnmatchcase(c, p) for p in patterns for c in candidates)


def selector_matches(selector: LabelSelector | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics; no selector, or an empty one, matches all."""
    if selector is None:
        return True
    if any(labels.get(k) != v for k, v in (selector.match_labels or {}).items()):
        return False
    for req in selector.match_expressions or ():
        present, values = req.key in labels, req.values or []
        held = {
            "In": present and labels.get(req.key) in values,
            # As in Kubernetes, NotIn also matches objects without the label.
            "NotIn": not present or labels.get(req.key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[req.operator]
        if not held:
            return False
    return True


def applies(policy: Policy, namespace: str, namespace_labels: Mapping[str, str],
            image: str | None) -> bool:
    """Whether the policy's match selects this image in this namespace. An image that
    cannot be named (None: its reference does not parse) is selected by every policy of
    the namespace: no image pattern can be said not to match it."""
    match = policy.spec.match

    def named(patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(namespace, p) for p in patterns)

    if match.exclude_namespaces and named(match.exclude_namespaces):
        return False
    if match.namespaces and not named(match.namespaces):
        return False
    if not selector_matches(match.namespace_selector, namespace_labels):
        return False
    if image is None:
        return True
    if match.exclude_images and _globs_match(match.exclude_images, image):
        return False
    return not match.images or _globs_match(match.images, image)


# -- One image under one policy ----------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """One policy's judgement of one image."""

    policy: str
    image: str
    digest: str | None
    kind: Kind
    effect: Effect
    """What it does to the workload: ALLOW when the image passes (or is let through)."""
    counts: tuple[str, ...] = ()
    """Each count over its threshold, e.g. "critical 3 > 0"."""
    message: str = ""
    """What failed and what to do: for the denial, an Event or an audit record."""
    summary: str = ""
    """The same in one short line, for a kubectl warning."""
    needs_scan: bool = False
    """No usable result: the caller should start (or is already running) a scan."""
    break_glass: bool = False
    """The policy lets the break-glass annotation admit the workload."""
    overridden: bool = False
    """Admitted by break-glass although the policy denies it."""
    vex_note: str = ""
    """Which findings VEX documents suppressed under this policy (a kubectl warning when
    the workload is admitted)."""

    @property
    def failed(self) -> bool:
        return self.effect > Effect.ALLOW

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy": self.policy, "action": self.effect.label,
                               "image": self.image, "digest": self.digest,
                               "reason": self.kind.value, "counts": list(self.counts),
                               "message": self.message}
        if self.overridden:
            out["breakGlass"] = True
        return out


def _utc(moment: datetime) -> datetime:
    # A naive time is taken as UTC, as Kubernetes writes every time.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _subject(image: str, digest: str | None) -> str:
    return image if not digest or "@" in image else f"{image}@{digest}"


def _watch_hint(image: str, scans_namespace: str | None) -> str:
    where = f"-n {scans_namespace}" if scans_namespace else "-A"
    return f"watch it with `kubectl get imagescans {where} -w` or `scangate status {image}`"


def _break_glass_hint(policy: Policy) -> str:
    if not policy.spec.break_glass.enabled:
        return ""
    return (f"; or, in an emergency, annotate the workload "
            f"{BREAK_GLASS_ANNOTATION}=<reason> (break-glass is enabled, for users RBAC "
            f"lets `use` scanpolicies/breakglass {policy.name})")


def judge(policy: Policy, result: ImageResult | None, image: str, now: datetime, *,
          scans_namespace: str | None = None, vex: VexState | None = None,
          known_db: datetime | None = None) -> Verdict:
    """The policy's verdict on one image (a normalised reference) and its stored result.

    `scans_namespace` is where the image's ImageScans are watched, for the hint in the
    message of an unscanned image. `known_db`: the UpdatedAt of the newest vulnerability
    DB the operator knows (None: unknown), for the policy's staleResults.
    """
    now = _utc(now)
    wanted = image.partition("@")[2] or None
    verdict = Verdict(policy.name, image, wanted or (result.digest if result else None),
                      Kind.PASSED, Effect.ALLOW, break_glass=policy.spec.break_glass.enabled)
    unscanned = _why_unscanned(policy, result, wanted, now)
    if unscanned is not None:
        return _judge_unscanned(policy, verdict, *unscanned, scans_namespace)
    assert result is not None  # _why_unscanned says so otherwise
    if result.reason == Kind.INVALID_REFERENCE:
        return _judge_invalid(policy, verdict, result)
    if result.phase == Phase.FAILED:
        return _judge_failed(policy, verdict, result)
    judged = _judge_findings(policy, verdict, result, now, vex)
    return _judge_stale(policy, judged, result, known_db)


def _judge_stale(policy: Policy, verdict: Verdict, result: ImageResult,
                 known_db: datetime | None) -> Verdict:
    """staleResults: a result made with an older DB than the one known warns or refuses,
    unless its findings already do as much."""
    setting = policy.spec.stale_results
    made = result.db_updated_at
    if setting == "Allow" or known_db is None or made is None or _utc(made) >= _utc(known_db):
        return verdict
    effect = policy.effect if setting == "Deny" else min(policy.effect, Effect.WARN)
    if verdict.effect >= effect:
        return verdict
    treats = "denies" if setting == "Deny" else "warns about"
    message = (f"The result of {_subject(verdict.image, verdict.digest)} was made with the "
               f"vulnerability DB of {_utc(made):%Y-%m-%d %H:%M} UTC; a newer one "
               f"({_utc(known_db):%Y-%m-%d %H:%M} UTC) is out and the image is being scanned "
               f"with it. ScanPolicy {policy.name} ({policy.spec.action}) {treats} results "
               f"made with an older DB (staleResults: {setting}): "
               f"see `scangate status {verdict.image}`"
               f"{', then try again' if effect is Effect.ENFORCE else ''}"
               f"{_break_glass_hint(policy) if effect is Effect.ENFORCE else ''}.")
    return replace(verdict, kind=Kind.STALE_RESULT, effect=effect, counts=(),
                   message=_clip(message, VERDICT_MESSAGE_LIMIT),
                   summary=_clip(f"ScanPolicy {policy.name}: {verdict.image}: result made "
                                 f"with an older vulnerability DB, rescan under way",
                                 WARNING_LIMIT))


def _why_unscanned(policy: Policy, result: ImageResult | None, wanted: str | None,
                   now: datetime) -> tuple[str, str] | None:
    """(sentence, short form) when there is no result to judge; None when there is."""
    if result is None:
        return "has not been scanned yet", "not scanned yet, scan started"
    if result.phase in IN_PROGRESS:
        return (f"has no result yet (its scan is {result.phase})",
                f"not scanned yet, scan {result.phase}")
    if result.phase == Phase.FAILED:
        return None
    if result.phase != Phase.COMPLETED or result.summary is None:
        return "has no scan result yet", "not scanned yet, scan started"
    if wanted and result.digest and wanted not in (result.digest, result.index_digest):
        # The caller looks results up by digest; never judge one digest by another's.
        return f"has no result for digest {wanted}", "not scanned yet, scan started"
    missing = sorted(policy.scanners - (result.scanners or {"vuln"}))
    if missing:
        names = " and ".join(SCANNER_NAMES.get(m, m) for m in missing)
        return (f"was scanned without the {names} scanner{'s' if len(missing) > 1 else ''} "
                f"that ScanPolicy {policy.name} needs",
                f"not scanned for {', '.join(missing)} yet, scan started")
    if policy.max_scan_age is not None:
        if result.scanned_at is None:
            return "has a scan result of unknown age", "scan result too old, rescan started"
        if now - _utc(result.scanned_at) > policy.max_scan_age:
            return (f"was last scanned at {_utc(result.scanned_at):%Y-%m-%d %H:%M} UTC, more "
                    f"than maxScanAge {policy.spec.max_scan_age} ago",
                    f"scan result older than {policy.spec.max_scan_age}, rescan started")
    return None


def _judge_unscanned(policy: Policy, verdict: Verdict, why: str, short: str,
                     scans_namespace: str | None) -> Verdict:
    setting = policy.spec.unscanned
    effect = {"Deny": policy.effect, "Warn": min(policy.effect, Effect.WARN),
              "Allow": Effect.ALLOW}[setting]
    treats = {"Deny": "denies", "Warn": "warns about", "Allow": "admits"}[setting]
    subject = _subject(verdict.image, verdict.digest)
    message = (f"{subject} {why}. ScanPolicy {policy.name} ({policy.spec.action}) {treats} "
               f"unscanned images. A scan has started: "
               f"{_watch_hint(verdict.image, scans_namespace)}"
               f"{', then try again' if effect is Effect.ENFORCE else ''}"
               f"{_break_glass_hint(policy) if effect is Effect.ENFORCE else ''}.")
    return replace(verdict, kind=Kind.UNSCANNED, effect=effect, needs_scan=True,
                   message=_clip(message, VERDICT_MESSAGE_LIMIT),
                   summary=_clip(f"ScanPolicy {policy.name}: {verdict.image}: {short} "
                                 f"(scangate status {verdict.image})", WARNING_LIMIT))


def _judge_failed(policy: Policy, verdict: Verdict, result: ImageResult) -> Verdict:
    effect = policy.effect if policy.spec.failed_scan == "Deny" else Effect.ALLOW
    cause = result.reason or "ScanFailed"
    if result.message:
        cause += f": {_clip(result.message, 300)}"
    message = (f"The scan of {_subject(verdict.image, verdict.digest)} failed ({cause}). "
               f"ScanPolicy {policy.name} ({policy.spec.action}) "
               f"{'denies' if effect else 'admits'} images whose scan failed: "
               f"see `scangate status {verdict.image}`, fix the cause and scan again"
               f"{_break_glass_hint(policy) if effect is Effect.ENFORCE else ''}.")
    return replace(verdict, kind=Kind.SCAN_FAILED, effect=effect,
                   message=_clip(message, VERDICT_MESSAGE_LIMIT),
                   summary=_clip(f"ScanPolicy {policy.name}: {verdict.image}: scan failed "
                                 f"({result.reason or 'ScanFailed'})", WARNING_LIMIT))


def _judge_invalid(policy: Policy, verdict: Verdict, result: ImageResult) -> Verdict:
    """An unparseable reference is refused by every Enforce policy (warned about by Warn,
    audited by Audit), whatever failedScan says: it names no image a scan could judge, and
    what the node would pull for it is anyone's guess."""
    message = (f"{_clip(result.message or verdict.image, 300)}. ScanPolicy {policy.name} "
               f"({policy.spec.action}) cannot judge an image it cannot identify: write the "
               f"reference as registry/repository:tag or @sha256:<digest>.")
    return replace(verdict, kind=Kind.INVALID_REFERENCE, effect=policy.effect,
                   message=_clip(message, VERDICT_MESSAGE_LIMIT),
                   summary=_clip(f"ScanPolicy {policy.name}: {verdict.image}: not a valid "
                                 f"image reference", WARNING_LIMIT))


def _allowlisted_ids(policy: Policy, image: str, now: datetime) -> list[str]:
    """The upper-cased IDs of the entries in force for this image today (UTC)."""
    today = now.date()
    return sorted({entry.id.upper() for entry in policy.spec.allowlist or ()
                   if (entry.expires is None or today <= entry.expires)
                   and (not entry.images or _globs_match(entry.images, image))})


def _judge_findings(policy: Policy, verdict: Verdict, result: ImageResult,
                    now: datetime, vex: VexState | None = None) -> Verdict:
    spec = policy.spec
    basis = (result.fixable if spec.fixable_only else result.summary) or {}
    counts = {s: basis.get(s, 0) for s in SEVERITY_KEYS}
    exempt: set[str] = set()
    uncounted: list[str] = []
    ids = _allowlisted_ids(policy, verdict.image, now)
    index = result.index if ids else None
    for vid in ids:
        by_severity = index.get(vid) if index is not None else None
        if by_severity is None:
            # A complete index without the ID: the image has no such finding.
            if index is None or result.index_truncated:
                uncounted.append(vid)
            continue
        exempt.add(vid)
        for severity, c in by_severity.items():
            key = severity.lower()
            counts[key] = max(counts[key] - (c.fixable if spec.fixable_only else c.total), 0)
    applied = _apply_vex(policy, result, verdict.image, counts, set(ids), vex)
    exempt |= applied.exempt
    vex_note = ""
    if applied.suppressed:
        vex_note = _clip(f"ScanPolicy {policy.name}: {verdict.image}: VEX suppressed "
                         f"{'; '.join(applied.suppressed[:3])}"
                         f"{' …' if len(applied.suppressed) > 3 else ''}", WARNING_LIMIT)
    verdict = replace(verdict, vex_note=vex_note)
    over = [(s, counts[s], limit) for s in SEVERITY_KEYS
            if (limit := getattr(spec.thresholds, s)) is not None and counts[s] > limit]
    checks_over, checks_named = _judge_checks(policy, result)
    secrets_text = _judge_secrets(policy, result)
    malware_text = _judge_malware(policy, result)
    if not over and not checks_over and not secrets_text and not malware_text:
        return verdict
    scope = " (findings with a fix only)" if spec.fixable_only and over else ""
    vuln_texts = [f"{s} {n} > {limit}" for s, n, limit in over]
    texts = tuple([*vuln_texts, *checks_over, *([secrets_text] if secrets_text else []),
                   *([malware_text] if malware_text else [])])
    listed = ", ".join(vuln_texts) + scope
    listed = ", ".join(filter(None, [malware_text, listed, *checks_over, secrets_text]))
    subject = _subject(verdict.image, verdict.digest)
    parts = [f"{subject} fails ScanPolicy {policy.name} ({spec.action}): {listed}."]
    if malware_text:
        hits = [h.describe() for h in result.malware[:TOP_BASELINE]]
        more = (result.malware_count or 0) - len(hits)
        if hits:
            parts.append(f"Malware: {'; '.join(hits)}{f' and {more} more' if more > 0 else ''}.")
    worst = _worst(result.findings, {s.upper() for s, _, _ in over}, exempt, spec.fixable_only)
    if worst:
        parts.append(f"Worst: {'; '.join(worst)}.")
    if uncounted and over:
        why = ("the result's per-ID index is truncated and does not hold them"
               if index is not None else
               "the result has no exact per-ID counts (scan the image again to get them)")
        parts.append(f"Allowlist entries not applied to this image: "
                     f"{', '.join(uncounted[:5])}{' …' if len(uncounted) > 5 else ''}: {why}.")
    if over and applied.suppressed:
        parts.append(f"Suppressed by VEX: {'; '.join(applied.suppressed[:3])}"
                     f"{' …' if len(applied.suppressed) > 3 else ''}.")
    if over and applied.notes:
        parts.append(f"VEX: {'; '.join(applied.notes[:3])}"
                     f"{' …' if len(applied.notes) > 3 else ''}.")
    if checks_named:
        parts.append(f"Failed checks: {'; '.join(checks_named)}.")
    if secrets_text:
        hits = [f"{_clip(h.rule_id, 64)} ({h.severity}"
                f"{', ' + _clip(h.category, 32) if h.category else ''}) in {h.where()}"
                for h in result.secrets[:TOP_BASELINE]]
        more = (result.secret_counts or {}).get("total", 0) - len(hits)
        if hits:
            parts.append(f"Secrets: {'; '.join(hits)}{f' and {more} more' if more > 0 else ''}"
                         f" (the values are never stored).")
    fixes = []
    if malware_text:
        fixes.append("remove the malicious files from the image and rebuild it from a "
                     "trusted base (a file deleted by a later layer is still in the image: "
                     "rebuild without it)")
    if over:
        fixes.append(f"upgrade the packages to the fixed versions and rebuild, or allowlist "
                     f"the IDs in ScanPolicy {policy.name} (spec.allowlist, with an expiry)")
    if checks_over:
        fixes.append("fix the image's configuration (e.g. a non-root USER) and rebuild")
    if secrets_text:
        fixes.append("remove the secrets from the image (files, ENV, build history), "
                     "rotate them, and rebuild")
    parts.append(f"To pass: {'; '.join(fixes)}{_break_glass_hint(policy)}.")
    kind = (Kind.MALWARE_FOUND if malware_text else Kind.VULNERABLE if over
            else Kind.MISCONFIGURED if checks_over else Kind.SECRETS_FOUND)
    effect = policy.effect
    # A Warn finding alone (secrets, malware) warns; anything else refuses as the action says.
    denies = (over or checks_over or (secrets_text and spec.secrets != "Warn")
              or (malware_text and spec.malware != "Warn"))
    if not denies:
        effect = min(policy.effect, Effect.WARN)
    return replace(verdict, kind=kind, effect=effect, counts=texts,
                   message=_clip(" ".join(parts), VERDICT_MESSAGE_LIMIT),
                   summary=_clip(f"ScanPolicy {policy.name}: {verdict.image}: {listed}",
                                 WARNING_LIMIT))


@dataclass
class _VexOutcome:
    exempt: set[str] = field(default_factory=set)
    """IDs whose findings VEX statements in force suppress (left out of "Worst")."""
    suppressed: list[str] = field(default_factory=list)
    """What is suppressed, and by which document, described."""
    notes: list[str] = field(default_factory=list)
    """Suppressions not honoured, and why."""


def _apply_vex(policy: Policy, result: ImageResult, image: str, counts: dict[str, int],
               allowlisted: set[str], vex: VexState | None) -> _VexOutcome:
    """Adjust `counts` (by severity, fixable only if the policy says so) to the VEX
    documents the policy applies *now* (scangate.core.vex): a finding suppressed at scan
    time counts again unless a document of the policy still suppresses it; a statement made
    since the scan subtracts the findings of its ID."""
    out = _VexOutcome()
    fixable_only = policy.spec.fixable_only
    names = tuple(dict.fromkeys((*policy.vex_documents, *(vex.cluster_wide if vex else ()))))
    documents = vex.documents if vex else {}
    digests = tuple(d for d in (result.digest, result.index_digest) if d)
    for name in names:
        if name not in documents:
            why = (vex.errors.get(name) if vex else None) or "no such ConfigMap key in the " \
                "operator's namespace"
            out.notes.append(f"document {name} not applied: {_clip(why, 160)}")
    for hit in result.suppressed:
        vid = hit.id.upper()
        held = applicable(documents, (hit.source,), vid, image, digests) \
            if hit.source in names else []
        if any(scope.packages is None or hit.package.lower() in scope.packages
               for _, scope in held):
            out.exempt.add(vid)
            out.suppressed.append(hit.describe())
        elif vid not in allowlisted and (hit.fixed_version or not fixable_only):
            counts[hit.severity.lower()] += 1
            out.notes.append(f"{_clip(hit.id, 64)} in {_clip(hit.package, 60)} counts again: "
                             + (f"{hit.source} no longer suppresses it" if hit.source in names
                                else f"ScanPolicy {policy.name} does not apply {hit.source}"))
    if result.suppressed_truncated and result.suppressed_counts:
        # Not listed, so not known to be in force for this policy: counted (stricter).
        listed = {k: 0 for k in SEVERITY_KEYS}
        for hit in result.suppressed:
            listed[hit.severity.lower()] += 1
        for key in SEVERITY_KEYS:
            counts[key] += max(result.suppressed_counts.get(key, 0) - listed[key], 0)
        out.notes.append("suppressed findings left out of status count again")
    index = result.index if names and documents else None
    for name in names:
        document = documents.get(name)
        if document is None or index is None:
            continue
        for vid in sorted(index.keys() & document.statements.keys()):
            if vid in out.exempt or vid in allowlisted:
                continue
            scopes = [sc for st in document.statements[vid]
                      if (sc := scope_in(st, image, digests)) is not None]
            if not scopes:
                continue
            if any(sc.packages is None for sc in scopes):
                for severity, c in index[vid].items():
                    key = severity.lower()
                    counts[key] = max(counts[key] - (c.fixable if fixable_only else c.total), 0)
            elif not result.findings_truncated:
                packages = frozenset().union(*(sc.packages or () for sc in scopes))
                matched = [f for f in result.findings
                           if f.id.upper() == vid and f.package.lower() in packages]
                if not matched:
                    continue  # the ID is in other packages only: nothing suppressed
                for f in matched:
                    if f.fixed_version or not fixable_only:
                        key = f.severity.lower()
                        counts[key] = max(counts[key] - 1, 0)
                if len(matched) < sum(c.total for c in index[vid].values()):
                    # Other packages still have the ID: it is not exempt from "Worst".
                    out.suppressed.append(f"{_clip(vid, 64)} in "
                                          f"{', '.join(sorted(packages))[:80]} ({name})")
                    continue
            else:
                out.notes.append(f"{vid} ({name}) names packages and this result's findings "
                                 "are truncated: it applies from the next scan")
                continue
            out.exempt.add(vid)
            statement = scopes[0].statement
            why = ", ".join(filter(None, [statement.status, _clip(statement.justification, 80)]))
            out.suppressed.append(f"{_clip(vid, 64)} ({name}: {why}; since the scan)")
    return out


def _judge_checks(policy: Policy, result: ImageResult) -> tuple[list[str], list[str]]:
    """What fails the policy's spec.misconfig: ("misconfig high 2 > 0", "check DS-0002
    failed", ...), and the failed checks to name, those denied first."""
    misconfig = policy.spec.misconfig
    if misconfig is None or result.misconfig is None:
        return [], []
    counts = result.misconfig
    over = [(s, counts.get(s, 0), limit) for s in SEVERITY_KEYS
            if (limit := getattr(misconfig.thresholds, s)) is not None
            and counts.get(s, 0) > limit]
    denied = [c for c in result.checks if c.id.upper() in policy.denied_checks]
    texts = [f"misconfig {s} {n} > {limit}" for s, n, limit in over]
    texts += [f"check {_clip(c.id, 64)} failed" for c in
              {c.id.upper(): c for c in denied}.values()]
    severities = {s.upper() for s, _, _ in over}
    named = list(dict.fromkeys([*denied, *(c for c in result.checks
                                           if c.severity in severities)]))
    return texts, [f"{_clip(c.id, 64)} ({c.severity}) {_clip(c.title, 120)} in "
                   f"{_clip(c.target or 'the image', 120)}".replace("  ", " ")
                   for c in named[:TOP_BASELINE]]


def _judge_secrets(policy: Policy, result: ImageResult) -> str:
    """"2 secrets found" when the policy's spec.secrets is Deny or Warn and the result has
    secrets; empty otherwise."""
    total = (result.secret_counts or {}).get("total", 0)
    if policy.spec.secrets not in ("Deny", "Warn") or not total:
        return ""
    return f"{total} secret{'' if total == 1 else 's'} found"


def _judge_malware(policy: Policy, result: ImageResult) -> str:
    """"malware found: 2 files" when the result has detections and the policy looks at
    them: spec.malware Deny or Warn, or unset (a result with detections is never passed
    over unless the policy says Allow)."""
    count = result.malware_count or 0
    if policy.spec.malware == "Allow" or not count:
        return ""
    return f"malware found: {count} file{'' if count == 1 else 's'}"


def _worst(findings: Sequence[TopFinding], severities: set[str], exempt: set[str],
           fixable_only: bool) -> list[str]:
    """The most severe findings that count against a broken threshold, described."""
    out = []
    for f in findings:  # already most severe first, those with a fix first
        if (f.severity not in severities or f.id.upper() in exempt
                or (fixable_only and not f.fixed_version)):
            continue
        package = f"{_clip(f.package, 80)} {_clip(f.installed_version or '', 40)}".strip()
        fix = f"fixed in {_clip(f.fixed_version, 60)}" if f.fixed_version else "no fix yet"
        out.append(f"{_clip(f.id, 64)} ({f.severity}) in {package}, {fix}")
        if len(out) == TOP_FINDINGS:
            break
    return out


# -- A workload under every policy -------------------------------------------------------

@dataclass(frozen=True)
class BreakGlassGrant:
    """The API server's answer to whether the requester may break the glass of one
    ScanPolicy (verb `use` on scanpolicies/breakglass, named by the policy): the gate asks
    it (a SubjectAccessReview) and hands the answer in; core never asks anyone."""

    allowed: bool
    why: str = ""
    """Why not, when not allowed: RBAC's refusal, or that the check itself failed."""


@dataclass(frozen=True)
class BreakGlassUse:
    """Break-glass admitted a workload that policies deny: leave an Event, a metric and a
    notification."""

    reason: str
    verdicts: tuple[Verdict, ...]


@dataclass(frozen=True)
class Decision:
    """The admission decision for a workload."""

    allowed: bool
    action: str
    """Enforce (denied), BreakGlass, Warn, Audit or Allow: the strictest outcome."""
    violations: tuple[Verdict, ...] = ()
    """Every failing verdict, strictest first: each names its policy and image."""
    warnings: tuple[str, ...] = ()
    """Short lines for kubectl."""
    message: str = ""
    """The denial message (empty when allowed), bounded to MESSAGE_LIMIT."""
    audit: tuple[Verdict, ...] = ()
    """Failures of Audit policies, to record as Events and metrics."""
    break_glass: BreakGlassUse | None = None
    needs_scan: tuple[str, ...] = ()
    """Images with no usable result: start (or keep) a scan of each."""
    break_glass_wanted: tuple[str, ...] = ()
    """Policies whose break-glass the workload asks for, with no answer yet on whether its
    requester may use it, when that answer would change the outcome: decide again with
    `break_glass` for them."""
    scanners: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """For each image in needs_scan: the scanners its scan should run, all that the policies
    judging it need (sorted)."""

    def to_json(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "action": self.action,
                "violations": [v.to_json() for v in self.violations],
                "warnings": list(self.warnings)}


def decide(policies: Sequence[Policy], images: Mapping[str, ImageResult | None],
           namespace: str, labels: Mapping[str, str], annotations: Mapping[str, str],
           now: datetime, *, scans_namespace: str | None = None,
           break_glass: Mapping[str, BreakGlassGrant] | None = None,
           vex: VexState | None = None, known_db: datetime | None = None) -> Decision:
    """Judge every image (normalised reference -> its result, None if it has none) under
    every policy that applies in `namespace` (whose labels are `labels`); `annotations`
    are the workload's, for break-glass. The strictest result wins.

    Break-glass overrides a policy only where `break_glass` grants it for that policy;
    where it has no answer and one would change the outcome, the decision names the
    policies to ask about (`break_glass_wanted`). `vex`: the VEX documents as they are now
    (scangate.core.vex); without it, no suppression made at scan time is trusted.
    `known_db`: the newest vulnerability DB known (staleResults)."""
    reason = _clip((annotations.get(BREAK_GLASS_ANNOTATION) or "").strip(), 200)
    grants = break_glass or {}
    failing: list[Verdict] = []
    needs_scan: list[str] = []
    scanners: dict[str, set[str]] = {}
    vex_noted: list[Verdict] = []
    ordered = sorted(policies, key=lambda p: p.name)
    for image, result in images.items():
        invalid = result is not None and result.reason == Kind.INVALID_REFERENCE
        for policy in ordered:
            if not applies(policy, namespace, labels, None if invalid else image):
                continue
            verdict = judge(policy, result, image, now, vex=vex, known_db=known_db,
                            scans_namespace=scans_namespace or namespace)
            if verdict.needs_scan:
                if image not in needs_scan:
                    needs_scan.append(image)
                scanners.setdefault(image, set()).update(policy.scanners)
            grant = grants.get(policy.name)
            if (verdict.effect is Effect.ENFORCE and verdict.break_glass and reason
                    and grant is not None and grant.allowed):
                verdict = replace(verdict, overridden=True)
            if verdict.failed:
                failing.append(verdict)
            elif verdict.vex_note:
                vex_noted.append(verdict)
    failing.sort(key=lambda v: (-v.effect, v.overridden, v.policy, v.image))
    denied = [v for v in failing if v.effect is Effect.ENFORCE and not v.overridden]
    # Break-glass can change the outcome only if every denying policy enables it.
    glass = {v.policy for v in denied if v.break_glass} if reason else set()
    changes_outcome = bool(denied) and len(glass) == len({v.policy for v in denied})
    wanted = tuple(sorted(p for p in glass if p not in grants)) if changes_outcome else ()
    not_honoured = [f"break-glass ({reason}) not honoured for ScanPolicy {p}: "
                    f"{_clip(grants[p].why, 300)}."
                    for p in sorted(glass) if p in grants and not grants[p].allowed]
    broken = tuple(v for v in failing if v.overridden)
    warnings = [f"break-glass used ({reason}): {v.summary}" for v in broken]
    warnings += [v.summary for v in failing if v.effect is Effect.WARN]
    warnings += [v.vex_note for v in vex_noted if v.vex_note]
    if denied:
        action = Effect.ENFORCE.label
    elif broken:
        action = "BreakGlass"
    else:
        action = failing[0].effect.label if failing else Effect.ALLOW.label
    return Decision(
        allowed=not denied, action=action, violations=tuple(failing),
        warnings=_bounded_warnings(warnings),
        message=_denial_message(denied, failing, not_honoured) if denied else "",
        audit=tuple(v for v in failing if v.effect is Effect.AUDIT),
        break_glass=BreakGlassUse(reason, broken) if broken else None,
        needs_scan=tuple(needs_scan), break_glass_wanted=wanted,
        scanners={image: tuple(sorted(used)) for image, used in scanners.items()})


def _bounded_warnings(lines: list[str]) -> tuple[str, ...]:
    unique = [_clip(w, WARNING_LIMIT) for w in dict.fromkeys(lines)]
    if len(unique) > MAX_WARNINGS:
        rest = len(unique) - MAX_WARNINGS + 1
        unique = [*unique[:MAX_WARNINGS - 1], f"… and {rest} more policy warnings"]
    return tuple(unique)


def _denial_message(denied: list[Verdict], failing: list[Verdict],
                    notes: Sequence[str] = ()) -> str:
    names = list(dict.fromkeys(v.policy for v in denied))
    others = list(dict.fromkeys(
        f"{v.policy} ({'break-glass' if v.overridden else v.effect.label})" for v in failing
        if v not in denied and v.policy not in names))
    header = f"scangate denied this workload: ScanPolicy {', '.join(names)}"
    if others:
        header += f"; also failing: {', '.join(others)}"
    # An image unscanned (or failed) under several policies is one story: tell it once.
    groups: dict[tuple[str, Kind] | int, list[Verdict]] = {}
    for i, verdict in enumerate(denied):
        key = i if verdict.kind in FINDING_KINDS else (verdict.image, verdict.kind)
        groups.setdefault(key, []).append(verdict)
    paragraphs = [group[0].message + (
        f" The same holds for ScanPolicy {', '.join(v.policy for v in group[1:])}."
        if len(group) > 1 else "") for group in groups.values()]
    lines = [header + ".", *notes]
    size = sum(len(line) + 1 for line in lines)
    for i, paragraph in enumerate(paragraphs):
        if size + len(paragraph) + 1 > MESSAGE_LIMIT - 64:
            lines.append(f"… and {len(paragraphs) - i} more failures (see the warnings and "
                         "Events)")
            break
        lines.append(paragraph)
        size += len(paragraph) + 1
    return "\n".join(lines)
