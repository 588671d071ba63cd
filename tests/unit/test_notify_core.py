"""Notification content and rules (scangate.core.notify): DingTalk's signature, markdown
and rate limit, the webhook payload and its HMAC, the receivers' filters, retries."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import urllib.parse
from collections import deque
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from annotated_types import MaxLen

from scangate.api.imagescan import Notified
from scangate.core.notify import (
    ID_DIGEST_MAX,
    MAX_ATTEMPTS,
    MESSAGE_CHARS,
    SUMMARY_BYTES,
    RobotWindow,
    ScanEvent,
    dingtalk_message,
    dingtalk_signed_url,
    dingtalk_summary,
    id_digest,
    new_ids,
    plan,
    retry_delay,
    wants,
    webhook_headers,
    webhook_payload,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
ROBOT = "https://oapi.dingtalk.com/robot/send?access_token=0123abcd"


def finding(vid: str, severity: str, package: str, installed: str,
            fixed: str | None) -> dict[str, Any]:
    return {"id": vid, "severity": severity, "package": package,
            "installedVersion": installed, "fixedVersion": fixed}


COMPLETED = ScanEvent(
    event="ScanCompleted", key="team-a/api-1/sha256:ab12/2024-05-01T12:00:00Z",
    source_kind="ScanRule", source="team-a/release",
    image="registry.example.com/team-a/api:v1", digest="sha256:ab12", namespace="team-a",
    counts={"critical": 2, "high": 7, "medium": 1, "low": 0, "unknown": 3, "total": 13},
    fixable={"critical": 1, "high": 4, "medium": 0, "low": 0, "unknown": 0, "total": 5},
    worst=(finding("CVE-2023-4863", "CRITICAL", "libwebp7", "1.2.4-0.1", "1.2.4-0.2"),
           finding("CVE-2024-0001", "CRITICAL", "openssl", "3.0.11-1", ""),
           finding("CVE-2024-0002", "HIGH", "zlib1g", "1.2.13", "1.2.13.1"),
           finding("CVE-2024-0003", "HIGH", "curl", "7.88", "7.88.2"),
           finding("CVE-2024-0004", "HIGH", "bash", "5.2", "5.2.1"),
           finding("CVE-2024-0005", "HIGH", "tar", "1.34", "1.35")),
    # 20:00 at UTC+8 is 12:00 UTC: messages say UTC whatever the caller's zone.
    time=datetime(2024, 5, 1, 20, 0, tzinfo=timezone(timedelta(hours=8))),
    reason=None, message=None)
FAILED = replace(COMPLETED, event="ScanFailed", key="failed-1", counts=None, fixable=None,
                 worst=(), reason="ScanTimeout", message="the scan ran longer than 10m")
BLOCKED = replace(COMPLETED, event="Blocked", key="blocked/prod/no-critical/x", counts=None,
                  fixable=None, worst=(), source_kind="ScanPolicy", source="no-critical",
                  namespace="prod", reason="Blocked",
                  message="2 CRITICAL findings exceed the policy's maximum of 0")

# How the integration test reads a DingTalk message: one event, or a summary's number.
ACCOUNTED = re.compile(r"\*\*(\d+) (?:more )?scan events?\*\*")


def accounted(message: dict[str, Any]) -> int:
    found = ACCOUNTED.search(message["markdown"]["text"])
    return int(found.group(1)) if found else 1


# -- DingTalk signature --------------------------------------------------------------------

def documented_sign(timestamp: str, secret: str) -> str:
    """DingTalk's documented Python example, step by step."""
    secret_enc = secret.encode("utf-8")
    string_to_sign = f"{timestamp}\n{secret}"
    string_to_sign_enc = string_to_sign.encode("utf-8")
    hmac_code = hmac.new(secret_enc, string_to_sign_enc, digestmod=hashlib.sha256).digest()
    return urllib.parse.quote_plus(base64.b64encode(hmac_code))


def test_the_signed_url_follows_dingtalks_documented_example() -> None:
    secret = "SEC5a3ecf88f2b3eb50db30ecfc00f53033ac909c99bf7f88fd612bda89d7f3a9dc"
    signed = dingtalk_signed_url(ROBOT, secret, 1714564800123)
    assert signed == f"{ROBOT}&timestamp=1714564800123&sign=" \
                     f"{documented_sign('1714564800123', secret)}"


def test_the_signature_matches_a_published_test_vector() -> None:
    # From the test of the "dingding" Rust crate's create_signature("1700000000000", "secret").
    signed = dingtalk_signed_url("https://robot.example/send", "secret", 1700000000000)
    assert signed == ("https://robot.example/send?timestamp=1700000000000"
                      "&sign=OuzzJR5%2BxZ4%2FEYwqtNt6sMYZQMTa%2FHEGvc9miJe7XzY%3D")


def test_the_sign_decodes_to_the_hmac_and_other_query_parameters_stay() -> None:
    secret = "SECpässwort+/="  # UTF-8, and characters that base64 and URLs treat specially
    signed = dingtalk_signed_url(ROBOT, secret, 1714564800000)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(signed).query, strict_parsing=True)
    assert query["access_token"] == ["0123abcd"]
    assert query["timestamp"] == ["1714564800000"]
    mac = hmac.new(secret.encode(), f"1714564800000\n{secret}".encode(), hashlib.sha256)
    assert base64.b64decode(query["sign"][0]) == mac.digest()


# -- DingTalk markdown ---------------------------------------------------------------------

def test_a_completed_scan_shows_every_severity_and_the_fixed_versions() -> None:
    message = dingtalk_message(COMPLETED)
    assert message["msgtype"] == "markdown"
    text = message["markdown"]["text"]
    assert "registry.example.com/team-a/api:v1" in text and "sha256:ab12" in text
    # CRITICAL is a level of its own: 2 critical and 7 high, not 9 high.
    assert "CRITICAL 2, HIGH 7, MEDIUM 1, LOW 0, UNKNOWN 3 (total 13)" in text
    assert "CRITICAL 1, HIGH 4, MEDIUM 0, LOW 0, UNKNOWN 0 (total 5)" in text  # fixable
    assert "CVE-2023-4863 in libwebp7 1.2.4-0.1: fixed in 1.2.4-0.2" in text
    assert "CVE-2024-0001 in openssl 3.0.11-1: no fix yet" in text
    assert "CVE-2024-0004" in text and "CVE-2024-0005" not in text  # the worst 5
    assert "**ScanRule:** team-a/release" in text
    assert "**Time:** 2024-05-01T12:00:00Z" in text
    assert "2 critical" in message["markdown"]["title"]
    assert accounted(message) == 1  # no summary's count in a single message


def test_failures_and_refusals_say_why_and_whose() -> None:
    failed = dingtalk_message(FAILED)["markdown"]["text"]
    assert "Scan failed" in failed and "**Reason:** ScanTimeout" in failed
    assert "the scan ran longer than 10m" in failed and "**Findings:**" not in failed
    blocked = dingtalk_message(BLOCKED)["markdown"]["text"]
    assert "Workload blocked" in blocked and "**ScanPolicy:** no-critical" in blocked
    assert "**Namespace:** prod" in blocked and "exceed the policy" in blocked
    assert "**Reason:**" not in blocked  # "Blocked" again would say nothing
    # A completed scan's status message is not news.
    noisy = dingtalk_message(replace(COMPLETED, message="Scanned 1 image"))["markdown"]
    assert "Scanned 1 image" not in noisy["text"]


def test_text_from_images_cannot_format_the_message_and_it_stays_bounded() -> None:
    hostile = "x\n### Hacked [click](http://evil) <b>*" * 200
    event = replace(COMPLETED, image=hostile, digest=hostile, namespace=hostile,
                    source=hostile, event="ScanFailed", reason=hostile, message=hostile,
                    worst=tuple(finding(hostile, "CRITICAL", hostile, hostile, hostile)
                                for _ in range(9)))
    text = dingtalk_message(event)["markdown"]["text"]
    assert len(text) <= MESSAGE_CHARS
    assert text.endswith("**Time:** 2024-05-01T12:00:00Z")  # bounded part by part
    assert "\n### Hacked" not in text and "](http" not in text and "<b>" not in text
    assert "\\[click\\]\\(http://evil\\) \\<b\\>\\*" in text


def test_a_cut_value_does_not_end_in_half_an_escape() -> None:
    text = dingtalk_message(replace(COMPLETED, image="[" * 500))["markdown"]["text"]
    line = next(x for x in text.split("\n\n") if x.startswith("**Image:**"))
    assert re.fullmatch(r"\*\*Image:\*\* (\\\[)+…", line), line


# -- DingTalk summary ----------------------------------------------------------------------

def events_of(count: int, kind: ScanEvent = COMPLETED, start: int = 0) -> list[ScanEvent]:
    return [replace(kind, key=f"{kind.event}-{i}", image=f"r.example/team-a/app:t{i:03d}")
            for i in range(start, start + count)]


def test_a_summary_accounts_for_every_event() -> None:
    events = events_of(25) + events_of(4, FAILED, 25) + events_of(2, BLOCKED, 29)
    message = dingtalk_summary(events, T0)
    text = message["markdown"]["text"]
    assert text.startswith("**31 more scan events** (rate limit: 20 messages a minute)")
    assert "ScanCompleted 25, ScanFailed 4, Blocked 2, as of 2024-05-01T12:00:00Z" in text
    for event in events:
        assert f"{event.event} {event.image}" in text
    assert "ScanFailed r.example/team-a/app:t025: ScanTimeout the scan ran" in text
    assert "Blocked r.example/team-a/app:t029 (no-critical): 2 CRITICAL findings" in text
    assert "more" in message["markdown"]["title"] and accounted(message) == 31
    assert "and" not in text.splitlines()[-1]


def test_a_long_summary_lists_a_hundred_events_and_counts_the_rest_exactly() -> None:
    events = events_of(200) + events_of(40, FAILED, 200) + events_of(10, BLOCKED, 240)
    text = dingtalk_summary(events, T0)["markdown"]["text"]
    assert "ScanCompleted 200, ScanFailed 40, Blocked 10," in text
    listed = [x for x in text.splitlines() if x.startswith("- ") and "… and" not in x]
    assert len(listed) == 100
    assert text.splitlines()[-1] == "- … and 150 more: ScanCompleted 100, ScanFailed 40, " \
                                    "Blocked 10"


def test_a_summary_of_long_lines_stays_within_its_bytes_and_still_counts_all() -> None:
    events = [replace(e, image="ü" * 1000) for e in events_of(100)]
    text = dingtalk_summary(events, T0)["markdown"]["text"]
    assert len(text.encode()) <= SUMMARY_BYTES
    listed = [x for x in text.splitlines() if x.startswith("- ") and "… and" not in x]
    rest = re.search(r"… and (\d+) more: ScanCompleted (\d+)$", text)
    assert rest and 0 < len(listed) < 100
    assert len(listed) + int(rest.group(1)) == 100 and rest.group(1) == rest.group(2)


def test_a_summary_of_one_event_says_event() -> None:
    text = dingtalk_summary(events_of(1), T0)["markdown"]["text"]
    assert text.startswith("**1 more scan event** ")


# -- DingTalk rate -------------------------------------------------------------------------

def test_the_window_counts_the_last_minute() -> None:
    window = RobotWindow()
    for i in range(20):
        assert window.available(T0 + timedelta(seconds=i)) == 20 - i
        window.sent(T0 + timedelta(seconds=i))
    at = T0 + timedelta(seconds=30)
    assert window.available(at) == 0
    assert window.next_free(at) == T0 + timedelta(seconds=60)
    assert window.available(T0 + timedelta(seconds=59.999)) == 0
    assert window.available(T0 + timedelta(seconds=60)) == 1
    assert window.next_free(T0 + timedelta(seconds=60)) == T0 + timedelta(seconds=60)
    assert window.available(T0 + timedelta(seconds=80)) == 20


def test_the_window_honours_its_limit_and_length() -> None:
    window = RobotWindow(limit=2, window=timedelta(seconds=10))
    window.sent(T0)
    window.sent(T0 + timedelta(seconds=4))
    assert window.available(T0 + timedelta(seconds=5)) == 0
    assert window.next_free(T0 + timedelta(seconds=5)) == T0 + timedelta(seconds=10)
    assert window.available(T0 + timedelta(seconds=10)) == 1


@pytest.mark.parametrize(("pending", "available", "step"), [
    (1, 0, "wait"), (30, 0, "wait"), (0, 20, "wait"),
    (1, 20, "single"), (19, 20, "single"), (20, 20, "summary"),
    (2, 2, "summary"), (1, 2, "single"),
    (1, 1, "single"),  # a lone event alone: a summary of it would say less
    (2, 1, "summary"),
])
def test_plan(pending: int, available: int, step: str) -> None:
    assert plan(pending, available) == step


def run_robot(window: RobotWindow, arrivals: list[tuple[datetime, ScanEvent]],
              until: datetime, send_time: timedelta) -> list[tuple[datetime, dict[str, Any],
                                                                   list[ScanEvent]]]:
    """A robot's sender on a fake clock: events arrive, plan() picks each step, and a
    send takes send_time."""
    clock, pending, waiting = arrivals[0][0], deque[ScanEvent](), deque(arrivals)
    messages: list[tuple[datetime, dict[str, Any], list[ScanEvent]]] = []
    while clock < until:
        while waiting and waiting[0][0] <= clock:
            pending.append(waiting.popleft()[1])
        step = plan(len(pending), window.available(clock))
        if step == "wait":
            ahead = [window.next_free(clock)] if pending else []
            ahead += [waiting[0][0]] if waiting else []
            clock = max(min(ahead, default=until), clock + timedelta(milliseconds=1))
            continue
        batch = [pending.popleft()] if step == "single" else list(pending)
        if step == "summary":
            pending.clear()
        body = (dingtalk_message(batch[0]) if step == "single"
                else dingtalk_summary(batch, clock))
        messages.append((clock, body, batch))
        window.sent(clock)
        clock += send_time
    assert not pending and not waiting
    return messages


def test_fifty_events_in_five_seconds_make_at_most_twenty_messages_and_lose_none() -> None:
    window = RobotWindow()
    burst = [(T0 + timedelta(seconds=i / 10), e) for i, e in enumerate(events_of(50))]
    messages = run_robot(window, burst, T0 + timedelta(minutes=3), timedelta(seconds=0.15))
    times = [t for t, _, _ in messages]
    assert sum(1 for t in times if t < T0 + timedelta(seconds=60)) <= 20
    for start in times:  # any window, not only the first
        assert sum(1 for t in times if start <= t < start + timedelta(seconds=60)) <= 20
    keys = [e.key for _, _, batch in messages for e in batch]
    assert sorted(keys) == sorted(e.key for _, e in burst)  # each once: none lost or doubled
    singles = sum(1 for _, _, batch in messages if len(batch) == 1)
    summarised = sum(len(batch) for _, _, batch in messages if len(batch) > 1)
    assert singles + summarised == 50 and summarised > 0
    assert sum(accounted(body) for _, body, _ in messages) == 50  # as the receiver counts

    # After the window, events go one by one again.
    later = [(T0 + timedelta(minutes=5, seconds=i), e)
             for i, e in enumerate(events_of(3, start=50))]
    more = run_robot(window, later, T0 + timedelta(minutes=6), timedelta(seconds=0.15))
    assert [len(batch) for _, _, batch in more] == [1, 1, 1]
    assert all(accounted(body) == 1 and "Scan completed" in body["markdown"]["title"]
               for _, body, _ in more)


# -- Webhooks ------------------------------------------------------------------------------

def test_the_payload_is_stable_compact_and_sorted() -> None:
    event = replace(COMPLETED, worst=COMPLETED.worst[:1])
    assert webhook_payload(event) == (
        b'{"apiVersion":"scangate.dev/v1","digest":"sha256:ab12","event":"ScanCompleted",'
        b'"fixable":{"critical":1,"high":4,"low":0,"medium":0,"total":5,"unknown":0},'
        b'"idempotencyKey":"team-a/api-1/sha256:ab12/2024-05-01T12:00:00Z",'
        b'"image":"registry.example.com/team-a/api:v1","kind":"ScanEvent","message":null,'
        b'"namespace":"team-a","reason":null,'
        b'"source":{"kind":"ScanRule","name":"team-a/release"},'
        b'"summary":{"critical":2,"high":7,"low":0,"medium":1,"total":13,"unknown":3},'
        b'"time":"2024-05-01T12:00:00Z",'
        b'"worst":[{"fixedVersion":"1.2.4-0.2","id":"CVE-2023-4863",'
        b'"installedVersion":"1.2.4-0.1","package":"libwebp7","severity":"CRITICAL"}]}')


def test_a_payload_without_a_result_has_null_counts_and_keeps_five_findings() -> None:
    failed = json.loads(webhook_payload(replace(FAILED, counts={})))
    assert failed["summary"] is None and failed["fixable"] is None and failed["worst"] == []
    assert failed["reason"] == "ScanTimeout" and failed["event"] == "ScanFailed"
    blocked = json.loads(webhook_payload(BLOCKED))
    assert blocked["source"] == {"kind": "ScanPolicy", "name": "no-critical"}
    worst = json.loads(webhook_payload(replace(COMPLETED, worst=(
        *COMPLETED.worst, finding("CVE-1", "weird", "p", "1", None)))))["worst"]
    assert [w["id"] for w in worst] == [f["id"] for f in COMPLETED.worst[:5]]
    odd = json.loads(webhook_payload(replace(COMPLETED, worst=(
        finding("CVE-1", "weird", "p", "1", None),))))["worst"][0]
    assert odd["severity"] == "UNKNOWN" and odd["fixedVersion"] is None


def test_the_payload_is_ascii_so_a_re_encoded_body_still_verifies() -> None:
    body = webhook_payload(replace(COMPLETED, message="Prüfung 漏洞"))
    assert body.isascii() and json.loads(body)["message"] == "Prüfung 漏洞"


def test_the_signature_header_is_the_hmac_of_the_body() -> None:
    body = webhook_payload(COMPLETED)
    headers = webhook_headers(COMPLETED, body, "hook-key")
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Scangate-Event"] == "ScanCompleted"
    assert headers["X-Scangate-Idempotency-Key"] == COMPLETED.key
    scheme, _, mac = headers["X-Scangate-Signature"].partition("=")
    expected = hmac.new(b"hook-key", body, hashlib.sha256).hexdigest()
    assert scheme == "sha256" and hmac.compare_digest(mac, expected)
    assert not hmac.compare_digest(
        mac, hmac.new(b"hook-key", body + b" ", hashlib.sha256).hexdigest())


def test_no_secret_no_signature_and_headers_stay_on_one_line() -> None:
    body = webhook_payload(COMPLETED)
    assert "X-Scangate-Signature" not in webhook_headers(COMPLETED, body, None)
    assert "X-Scangate-Signature" not in webhook_headers(COMPLETED, body, "")
    odd = webhook_headers(replace(COMPLETED, key="a\r\nX-Evil: 1\x00é"), body, None)
    assert odd["X-Scangate-Idempotency-Key"] == "a??X-Evil: 1??"


# -- Filters -------------------------------------------------------------------------------

LOW_ONLY = replace(COMPLETED, counts={"critical": 0, "high": 0, "medium": 0, "low": 4,
                                      "unknown": 0, "total": 4})
UNKNOWN_ONLY = replace(COMPLETED, counts={"critical": 0, "high": 0, "medium": 0, "low": 0,
                                          "unknown": 1, "total": 1})
CLEAN = replace(COMPLETED, counts={"critical": 0, "high": 0, "medium": 0, "low": 0,
                                   "unknown": 0, "total": 0})
A, B = frozenset({"CVE-2024-1"}), frozenset({"CVE-2024-1", "GHSA-xxxx-yyyy-zzzz"})


@pytest.mark.parametrize(("spec", "event", "previous", "current", "expected"), [
    # Events: the default is ScanCompleted and ScanFailed.
    ({}, COMPLETED, None, None, True),
    ({}, FAILED, None, None, True),
    ({}, BLOCKED, None, None, False),
    ({"events": ["Blocked"]}, BLOCKED, None, None, True),
    ({"events": ["Blocked"]}, COMPLETED, None, None, False),
    ({"events": ["ScanCompleted"]}, FAILED, None, None, False),
    # minSeverity, for ScanCompleted only, by the counts (CRITICAL counts for HIGH).
    ({"minSeverity": "HIGH"}, COMPLETED, None, None, True),
    ({"minSeverity": "HIGH"}, LOW_ONLY, None, None, False),
    ({"minSeverity": "LOW"}, LOW_ONLY, None, None, True),
    ({"minSeverity": "CRITICAL"}, replace(COMPLETED, counts={"high": 9, "total": 9}),
     None, None, False),
    ({"minSeverity": "UNKNOWN"}, UNKNOWN_ONLY, None, None, True),
    ({"minSeverity": "UNKNOWN"}, CLEAN, None, None, False),
    ({"minSeverity": "HIGH"}, replace(COMPLETED, counts=None), None, None, True),
    ({"minSeverity": "CRITICAL"}, FAILED, None, None, True),
    # onlyNewFindings, for ScanCompleted only; previous as id_digest.
    ({"onlyNewFindings": True}, COMPLETED, None, frozenset(), False),
    ({"onlyNewFindings": True}, COMPLETED, None, A, True),
    ({"onlyNewFindings": True}, COMPLETED, id_digest(A), A, False),
    ({"onlyNewFindings": True}, COMPLETED, id_digest(A), frozenset({"cve-2024-1"}), False),
    ({"onlyNewFindings": True}, COMPLETED, id_digest(B), A, False),
    ({"onlyNewFindings": True}, COMPLETED, id_digest(A), B, True),
    ({"onlyNewFindings": True}, COMPLETED, [], A, True),
    ({"onlyNewFindings": True}, COMPLETED, id_digest(A), None, True),
    ({"onlyNewFindings": False}, COMPLETED, id_digest(A), A, True),
    ({"onlyNewFindings": True, "events": ["ScanFailed"]}, FAILED, id_digest(A), A, True),
    # Both filters must pass.
    ({"onlyNewFindings": True, "minSeverity": "HIGH"}, LOW_ONLY, id_digest(A), B, False),
    ({"onlyNewFindings": True, "minSeverity": "HIGH"}, COMPLETED, id_digest(B), B, False),
    ({"onlyNewFindings": True, "minSeverity": "HIGH"}, COMPLETED, id_digest(A), B, True),
])
def test_wants(spec: dict[str, Any], event: ScanEvent, previous: list[str] | None,
               current: frozenset[str] | None, expected: bool) -> None:
    assert wants({"name": "r", "type": "webhook", **spec}, event, previous, current) \
        is expected


def test_id_digest_is_sorted_distinct_short_hashes_of_upper_cased_ids() -> None:
    digest = id_digest(["ghsa-abcd-efgh-ijkl", "CVE-2024-1", "cve-2024-1", "CVE-2023-2"])
    expected = {hashlib.sha256(i.encode()).hexdigest()[:8]
                for i in ("GHSA-ABCD-EFGH-IJKL", "CVE-2024-1", "CVE-2023-2")}
    assert digest == sorted(expected) and len(digest) == 3


def test_id_digest_fits_the_status_field_and_a_cut_one_errs_towards_speaking() -> None:
    limit = next(m.max_length for m in Notified.model_fields["ids"].metadata
                 if isinstance(m, MaxLen))
    assert limit == ID_DIGEST_MAX
    ids = [f"CVE-2024-{i}" for i in range(ID_DIGEST_MAX + 50)]
    digest = id_digest(ids)
    assert len(digest) == ID_DIGEST_MAX
    kept = set(digest)
    inside = {i for i in ids if hashlib.sha256(i.encode()).hexdigest()[:8] in kept}
    outside = [i for i in ids if i not in inside]
    assert len(outside) == 50 and not new_ids(digest, inside)
    assert new_ids(digest, outside[:1])  # an ID whose hash was cut off looks new


# -- Retries -------------------------------------------------------------------------------

def test_retry_delays_double_up_to_the_cap() -> None:
    assert [retry_delay(a) for a in range(1, 11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert retry_delay(0) == 1.0 and retry_delay(10_000) == 300.0
    assert retry_delay(3, first=0.5, cap=1.5) == 1.5
    assert MAX_ATTEMPTS == 8


NEWLY = replace(BLOCKED, event="NewlyVulnerable", key="newly-vulnerable/prod/sha256:ab12/x/p",
                reason="NewlyVulnerable", message="refused since the DB of 2026-11-02",
                worst=(finding("CVE-2023-45803", "MEDIUM", "urllib3", "1.26.12",
                               "2.0.7, 1.26.18"),),
                workloads=("Deployment/app", "CronJob/report"))


def test_a_newly_vulnerable_message_names_the_workloads_and_the_new_findings() -> None:
    body = json.loads(webhook_payload(NEWLY))
    assert body["event"] == "NewlyVulnerable"
    assert body["workloads"] == ["Deployment/app", "CronJob/report"]
    assert body["worst"] == [{"id": "CVE-2023-45803", "severity": "MEDIUM",
                              "package": "urllib3", "installedVersion": "1.26.12",
                              "fixedVersion": "2.0.7, 1.26.18"}]
    assert "workloads" not in json.loads(webhook_payload(BLOCKED))  # other bodies unchanged
    text = dingtalk_message(NEWLY)["markdown"]["text"]
    assert "**Workloads:** Deployment/app, CronJob/report" in text
    assert "**New findings:**" in text and "fixed in 2.0.7, 1.26.18" in text
    many = replace(NEWLY, workloads=tuple(f"Deployment/d{i}" for i in range(25)))
    assert "and 5 more" in dingtalk_message(many)["markdown"]["text"]
    assert len(json.loads(webhook_payload(many))["workloads"]) == 20
