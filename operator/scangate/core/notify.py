"""What scangate tells notification receivers, and when: pure functions of their
inputs (no I/O, no clock: times are parameters), used by scangate.notify.notifier.

Webhook payload
---------------
A webhook receiver gets one HTTP POST per event. The body is JSON (UTF-8, ASCII only,
compact, keys sorted); the signature covers exactly these bytes:

    {
      "apiVersion": "scangate.dev/v1",
      "kind": "ScanEvent",
      "event": "ScanCompleted",
      "idempotencyKey": "team-a/api-7f3c/sha256:9b1e.../2024-05-01T12:00:00Z",
      "source": {"kind": "ScanRule", "name": "team-a/release"},
      "image": "registry.example.com/team-a/api:v1",
      "digest": "sha256:9b1e...",
      "namespace": "team-a",
      "time": "2024-05-01T12:00:00Z",
      "summary": {"critical": 1, "high": 4, "medium": 0, "low": 2, "unknown": 0, "total": 7},
      "fixable": {"critical": 1, "high": 2, "medium": 0, "low": 0, "unknown": 0, "total": 3},
      "worst": [{"id": "CVE-2023-4863", "severity": "CRITICAL", "package": "libwebp7",
                 "installedVersion": "1.2.4-0.1", "fixedVersion": "1.2.4-0.2"}],
      "reason": null,
      "message": null
    }

- apiVersion, kind: the payload's schema. Within scangate.dev/v1 fields are only ever
  added; a field removed or changed in meaning comes with a new apiVersion.
- event: ScanCompleted, ScanFailed, Blocked (admission refused a workload) or
  NewlyVulnerable (a running image an Enforce policy admitted is refused after a rescan
  with a newer vulnerability DB).
- idempotencyKey: the same for every delivery of one event (retries, restarts): a
  receiver that has seen it can ignore the repeat.
- source: what the receiver belongs to: {"kind": "ScanRule", "name": "<namespace>/<name>"}
  or {"kind": "ScanPolicy", "name": "<name>"}.
- image, digest: the image as referenced, and its manifest digest (null if unknown).
- namespace: the ImageScan's namespace, or the refused workload's (null if none).
- time: when the scan finished or admission refused, UTC, RFC 3339.
- summary: findings by severity (CRITICAL counted on its own, never within high) and
  their total; fixable: those of them with a fixed version. Both null when there is no
  result (ScanFailed, Blocked).
- worst: up to 5 findings, most severe first; fixedVersion is null or "" when there is
  no fix yet.
- reason, message: why a scan failed or a workload was refused (may be set, and then
  informational, for other events).
- workloads (NewlyVulnerable only): the workloads running the image, "Kind/name" in
  `namespace`; worst then lists the findings the new DB added, with their fixed versions.

Headers: Content-Type: application/json; X-Scangate-Event: the event;
X-Scangate-Idempotency-Key: the key (printable ASCII); and, when the receiver has a
signing secret, X-Scangate-Signature: sha256=<hex HMAC-SHA256 of the body, keyed with
the secret>. A receiver verifies it over the raw body, before parsing, with a
constant-time comparison.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import urllib.parse
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from scangate.core.trivy import SEVERITIES, normalise_severity

PAYLOAD_API_VERSION = "scangate.dev/v1"
EVENT_TYPES = ("ScanCompleted", "ScanFailed", "Blocked", "NewlyVulnerable")
DEFAULT_EVENTS = ("ScanCompleted", "ScanFailed")
"""Events a notification hears when its spec lists none (the CRD's default)."""
COUNT_KEYS = (*(s.lower() for s in SEVERITIES), "total")
WORST = 5
"""Findings shown per event."""
DINGTALK_LIMIT = 20
"""Messages a DingTalk robot accepts per minute; beyond it DingTalk refuses them for a while."""
MESSAGE_CHARS = 4000
"""Bound of one event's markdown (DingTalk accepts 20,000 bytes; a chat message this long
is already unread)."""
SUMMARY_LINES = 100
SUMMARY_BYTES = 16_000
"""Bound of a summary's markdown in UTF-8 bytes: under DingTalk's 20,000, title and JSON
included."""
ID_DIGEST_MAX = 20_000
"""Hashes kept per result: the CRD's maxItems of ImageScan status.notified[].ids."""
MAX_ATTEMPTS = 8
"""Sends of one message before it is given up (until the next start): with retry_delay's
defaults, about two minutes of trying."""

_HEADINGS = {"ScanCompleted": "Scan completed", "ScanFailed": "Scan failed",
             "Blocked": "Workload blocked", "NewlyVulnerable": "Running image newly vulnerable"}
WORKLOADS = 20
"""Workloads named per NewlyVulnerable event (the rest counted)."""
# CommonMark's escapable characters that could make a link, an image, HTML or emphasis
# out of text that comes from an image (package names, tags) or a workload.
_MARKDOWN = str.maketrans({c: "\\" + c for c in "\\`*_[]()<>#!|"})


@dataclass(frozen=True)
class ScanEvent:
    """One thing to tell a receiver: a scan's outcome, or an admission refusal."""

    event: str
    """ScanCompleted, ScanFailed or Blocked."""
    key: str
    """Idempotency key: the same for every delivery of this event."""
    source_kind: str
    """ScanRule or ScanPolicy: whose notification this is."""
    source: str
    """The rule as namespace/name, or the policy's name."""
    image: str
    digest: str | None
    namespace: str | None
    counts: Mapping[str, int] | None
    """Findings by severity: critical, high, medium, low, unknown, total. None (or empty)
    when there is no result."""
    fixable: Mapping[str, int] | None
    """The same counts, of findings with a fixed version."""
    worst: tuple[Mapping[str, Any], ...]
    """The most severe findings, most severe first, as in ImageScan status.findings: id,
    severity, package, installedVersion, fixedVersion. Only the first WORST are used."""
    time: datetime
    """When the scan finished or admission refused (UTC; a naive time is taken as UTC)."""
    reason: str | None
    message: str | None
    """Why a scan failed or a workload was refused."""
    malware_count: int | None = None
    """Malicious files ClamAV found (None: no malware scan)."""
    malware: tuple[Mapping[str, str], ...] = ()
    """The first detections: layer, path, signature."""
    workloads: tuple[str, ...] = ()
    """NewlyVulnerable: the workloads running the image ("Kind/name" in namespace)."""


# -- DingTalk ------------------------------------------------------------------------------

def dingtalk_signed_url(url: str, secret: str, timestamp_ms: int) -> str:
    """The robot's URL with DingTalk's signature: HMAC-SHA256, keyed with the secret, of
    "<timestamp>\\n<secret>", base64 then URL-encoded, added as &timestamp=…&sign=…
    DingTalk refuses a timestamp more than an hour from its own clock."""
    key = secret.encode("utf-8")
    digest = hmac.new(key, f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    sign = urllib.parse.quote_plus(base64.b64encode(digest))
    parts = urllib.parse.urlsplit(url)
    added = f"timestamp={timestamp_ms}&sign={sign}"
    query = f"{parts.query}&{added}" if parts.query else added
    return urllib.parse.urlunsplit(parts._replace(query=query))


def dingtalk_message(event: ScanEvent) -> dict[str, Any]:
    """One event as a DingTalk markdown message, at most MESSAGE_CHARS long."""
    heading = _HEADINGS.get(event.event, event.event)
    counts, fixable = _counts(event.counts), _counts(event.fixable)
    title = f"{heading}: {_line(event.image, 80)}"
    if counts:
        title += f" ({counts['critical']} critical, {counts['high']} high)"
    # DingTalk's markdown needs a blank line between paragraphs.
    parts = [f"### {_md(heading, 40)}", f"**Image:** {_md(event.image, 300)}"]
    if event.digest:
        parts.append(f"**Digest:** {_md(event.digest, 100)}")
    if event.namespace:
        parts.append(f"**Namespace:** {_md(event.namespace, 63)}")
    if event.workloads:
        more = len(event.workloads) - WORKLOADS
        parts.append("**Workloads:** " + ", ".join(
            _md(w, 300) for w in event.workloads[:WORKLOADS]) + (
            f" and {more} more" if more > 0 else ""))
    if counts:
        parts.append(f"**Findings:** {_count_text(counts)}")
    if fixable:
        parts.append(f"**Fixable:** {_count_text(fixable)}")
    worst = [_finding_line(f) for f in event.worst[:WORST]]
    if worst:
        label = "New findings" if event.event == "NewlyVulnerable" else "Worst findings"
        parts.append(f"**{label}:**\n\n" + "\n".join(worst))
    if event.malware_count is not None:
        found = "; ".join(f"{_md(d.get('signature', ''), 96)} in "
                          f"{_md(d.get('path') or 'the layer blob', 200)}"
                          for d in event.malware[:WORST])
        parts.append(f"**Malware:** {event.malware_count} file"
                     f"{'' if event.malware_count == 1 else 's'}" + (f": {found}" if found else ""))
    if event.event != "ScanCompleted":  # a completed scan's message is only noise here
        if event.reason and event.reason != event.event:  # "Blocked: Blocked" says nothing
            parts.append(f"**Reason:** {_md(event.reason, 100)}")
        if event.message:
            parts.append(f"**Message:** {_md(event.message, 600)}")
    parts.append(f"**{_md(event.source_kind, 20)}:** {_md(event.source, 300)}")
    parts.append(f"**Time:** {_iso(event.time)}")
    # The parts are bounded one by one; this only guards the sum.
    text = "\n\n".join(parts)[:MESSAGE_CHARS]
    return {"msgtype": "markdown", "markdown": {"title": title[:128], "text": text}}


def dingtalk_summary(events: Sequence[ScanEvent], now: datetime) -> dict[str, Any]:
    """One markdown message accounting for all the events (a robot over its rate): their
    number and totals by event type, exact; then one line per event, up to SUMMARY_LINES
    lines and SUMMARY_BYTES, and the rest counted by event type."""
    noun = "scan event" if len(events) == 1 else "scan events"
    head = (f"**{len(events)} more {noun}** (rate limit: {DINGTALK_LIMIT} messages a "
            f"minute)\n\n{_by_type(events)}, as of {_iso(now)}\n\n")
    used = len(head.encode())
    lines: list[str] = []
    for event in events:
        line = _summary_line(event)
        # Room is kept for the closing "and N more" line (under 200 bytes).
        if len(lines) == SUMMARY_LINES or used + len(line.encode()) + 1 > SUMMARY_BYTES - 200:
            break
        lines.append(line)
        used += len(line.encode()) + 1
    rest = events[len(lines):]
    if rest:
        lines.append(f"- … and {len(rest)} more: {_by_type(rest)}")
    return {"msgtype": "markdown",
            "markdown": {"title": f"scangate: {len(events)} more {noun} (summary)",
                         "text": head + "\n".join(lines)}}


class RobotWindow:
    """The messages sent to one DingTalk robot over a sliding window.

    Guarantee, when a sender calls plan() with available() before each message and sent()
    after it: no window [t, t + window) holds more than `limit` messages, and nothing is
    dropped, since a single message takes the oldest pending event, a summary takes all
    of them, and "wait" keeps them."""

    def __init__(self, limit: int = DINGTALK_LIMIT,
                 window: timedelta = timedelta(minutes=1)) -> None:
        self.limit, self.window = limit, window
        self._sent: deque[datetime] = deque()

    def sent(self, now: datetime) -> None:
        """Record a message sent at `now`."""
        while self._sent and self._sent[0] + self.window <= now:
            self._sent.popleft()  # expired: keeps the deque at about `limit` entries
        self._sent.append(now)

    def _counted(self, now: datetime) -> list[datetime]:
        # A message from a clock later than `now` (the clock stepped back) still counts.
        return sorted(t for t in self._sent if t + self.window > now)

    def available(self, now: datetime) -> int:
        """Messages that may be sent at `now`."""
        return max(self.limit - len(self._counted(now)), 0)

    def next_free(self, now: datetime) -> datetime:
        """When a message may be sent next: `now` if one may be now."""
        counted = self._counted(now)
        if len(counted) < self.limit:
            return now
        return counted[len(counted) - self.limit] + self.window


def plan(pending: int, available: int) -> Literal["single", "summary", "wait"]:
    """The next step of a robot with `pending` events queued and `available` messages left
    in its window: wait when none is left (or nothing is pending); send the oldest event
    on its own while one message stays in reserve; else one summary of all pending, so
    that the window's last message accounts for everything. A lone event goes on its own
    even in the last message: a summary of it would cover no more."""
    if available <= 0 or pending <= 0:
        return "wait"
    if pending <= max(available - 1, 1):
        return "single"
    return "summary"


# -- Webhooks ------------------------------------------------------------------------------

def webhook_payload(event: ScanEvent) -> bytes:
    """The JSON body of a webhook (see the module's docstring): stable bytes for one event."""
    body: dict[str, Any] = {
        "apiVersion": PAYLOAD_API_VERSION,
        "kind": "ScanEvent",
        "event": event.event,
        "idempotencyKey": event.key,
        "source": {"kind": event.source_kind, "name": event.source},
        "image": event.image,
        "digest": event.digest,
        "namespace": event.namespace,
        "time": _iso(event.time),
        "summary": _counts(event.counts),
        "fixable": _counts(event.fixable),
        "worst": [_finding(f) for f in event.worst[:WORST]],
        "reason": event.reason,
        "message": event.message[:4096] if event.message else event.message,
    }
    if event.event == "NewlyVulnerable":  # only there: other bodies unchanged
        body["workloads"] = [w[:300] for w in event.workloads[:WORKLOADS]]
    if event.malware_count is not None:  # only with a malware scan: other bodies unchanged
        body["malware"] = {"count": event.malware_count, "detections": [
            {k: str(d.get(k, ""))[:1024] for k in ("layer", "path", "signature")}
            for d in event.malware[:WORST]]}
    # ASCII only: a receiver that decodes and re-encodes the body still verifies it.
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")


def webhook_headers(event: ScanEvent, body: bytes, secret: str | None) -> dict[str, str]:
    """The headers of a webhook: the event, its key, and the body's HMAC if there is a
    secret (an empty secret is none: a signature anybody can make proves nothing)."""
    headers = {"Content-Type": "application/json",
               "X-Scangate-Event": _header(event.event),
               "X-Scangate-Idempotency-Key": _header(event.key)}
    if secret:
        mac = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
        headers["X-Scangate-Signature"] = f"sha256={mac}"
    return headers


# -- Filters -------------------------------------------------------------------------------

def wants(notification: Mapping[str, Any], event: ScanEvent,
          previous_hashes: Iterable[str] | None, current_ids: Iterable[str] | None) -> bool:
    """Whether a notification (its spec, camelCase keys) hears of an event: it subscribes
    to the event's type; and, for ScanCompleted only, a finding of at least minSeverity
    exists (by the counts; unknown counts pass) and, with onlyNewFindings, the result has
    a vulnerability ID the previous one lacked (see new_ids: `previous_hashes` is
    id_digest of the previous result's IDs, None when there was none)."""
    if event.event not in (notification.get("events") or DEFAULT_EVENTS):
        return False
    if event.event != "ScanCompleted":
        return True
    minimum = notification.get("minSeverity")
    if minimum and not _at_least(event.counts, str(minimum)):
        return False
    return not notification.get("onlyNewFindings") or new_ids(previous_hashes, current_ids)


def id_digest(ids: Iterable[str]) -> list[str]:
    """What is kept of a result's vulnerability IDs to compare the next result with: the
    sorted, distinct short hashes (8 hex digits of SHA-256 of the upper-cased ID), at most
    ID_DIGEST_MAX. An ID whose hash was cut off, or (rarely: 32 bits) one colliding with
    a kept hash, only makes new_ids answer True where it might have said False."""
    return sorted({_short(i) for i in ids})[:ID_DIGEST_MAX]


def new_ids(previous_hashes: Iterable[str] | None, current_ids: Iterable[str] | None) -> bool:
    """Whether the current result has an ID the previous one (as id_digest) had not. No
    previous result: whether the current has any ID. Current IDs unknown: True (speaking
    twice is better than missing a new finding)."""
    if current_ids is None:
        return True
    current = {_short(i) for i in current_ids}
    if previous_hashes is None:
        return bool(current)
    return not current <= set(previous_hashes)


# -- Retries -------------------------------------------------------------------------------

def retry_delay(attempt: int, first: float = 1.0, cap: float = 300.0) -> float:
    """Seconds to wait after the `attempt`-th failed attempt (1, 2, …): first, doubling,
    at most cap."""
    exponent = min(max(attempt, 1) - 1, 64)  # 2.0 ** 1100 would overflow
    return float(min(cap, first * 2.0 ** exponent))


# -- Helpers -------------------------------------------------------------------------------

def _short(vulnerability_id: str) -> str:
    return hashlib.sha256(vulnerability_id.upper().encode("utf-8")).hexdigest()[:8]


def _int(value: Any) -> int:
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0


def _counts(counts: Mapping[str, Any] | None) -> dict[str, int] | None:
    """Counts with every key, or None for no result (an empty mapping is none either)."""
    if not counts:
        return None
    return {k: _int(counts.get(k)) for k in COUNT_KEYS}


def _at_least(counts: Mapping[str, Any] | None, minimum: str) -> bool:
    known = _counts(counts)
    if known is None:
        return True  # unknown: better to speak than to hide a critical finding
    rank = SEVERITIES.index(normalise_severity(minimum))
    return any(known[s.lower()] > 0 for s in SEVERITIES[:rank + 1])


def _count_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{s} {counts[s.lower()]}" for s in SEVERITIES) + \
        f" (total {counts['total']})"


def _finding(finding: Mapping[str, Any]) -> dict[str, str | None]:
    def text(key: str) -> str | None:
        value = finding.get(key)
        return None if value is None else str(value)
    severity = text("severity")
    return {"id": text("id"), "severity": normalise_severity(severity or "UNKNOWN"),
            "package": text("package"), "installedVersion": text("installedVersion"),
            "fixedVersion": text("fixedVersion")}


def _finding_line(finding: Mapping[str, Any]) -> str:
    f = _finding(finding)
    fixed = f"fixed in {_md(f['fixedVersion'], 60)}" if f["fixedVersion"] else "no fix yet"
    return (f"- **{f['severity']}** {_md(f['id'] or '?', 64)} in "
            f"{_md(f['package'] or '?', 100)} {_md(f['installedVersion'] or '', 60)}: {fixed}")


def _summary_line(event: ScanEvent) -> str:
    counts = _counts(event.counts)
    if counts:
        detail = _count_text(counts)
    else:
        said = (event.reason if event.reason != event.event else None, event.message)
        detail = _md(" ".join(x for x in said if x) or "-", 160)
    via = f" ({_md(event.source, 80)})" if event.event == "Blocked" else ""
    return f"- {_md(event.event, 20)} {_md(event.image, 160)}{via}: {detail}"


def _by_type(events: Iterable[ScanEvent]) -> str:
    counted = Counter(e.event for e in events)
    order = [t for t in EVENT_TYPES if counted[t]] + sorted(set(counted) - set(EVENT_TYPES))
    return ", ".join(f"{_md(t, 20)} {counted[t]}" for t in order)


def _line(text: str, limit: int) -> str:
    """One line of at most `limit` characters: a newline in a value must not start a
    heading or a list of its own."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def _md(text: str, limit: int) -> str:
    """Text from outside as inert markdown on one line, at most `limit` characters with
    its escapes (so that the bounds of a message's parts add up)."""
    escaped = " ".join(text.split()).translate(_MARKDOWN)
    if len(escaped) <= limit:
        return escaped
    cut = escaped[:limit - 1]
    if (len(cut) - len(cut.rstrip("\\"))) % 2:  # an escape cut in half would escape "…"
        cut = cut[:-1]
    return cut + "…"


def _iso(moment: datetime) -> str:
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _header(value: str) -> str:
    # Header values must be printable ASCII: no CR/LF splitting a header off.
    return "".join(c if " " <= c <= "~" else "?" for c in value)[:512]
