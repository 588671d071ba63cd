"""Delivery of notifications: ScanRule receivers (ScanCompleted, ScanFailed, Blocked)
and ScanPolicy receivers (Blocked), to DingTalk robots and HTTP(S) webhooks.

At least once, across restarts: what was delivered is recorded in the ImageScan's
status (`status.notified[receiver]`, the event's key), so an event whose key is not
recorded there is pending, whoever looks; the record is written after the receiver
accepted it (a crash in between sends it again, and the idempotency key lets the
receiver tell). A receiver's state (since, last delivery, failures, last error) is
kept in its ScanRule's status. Blocked events come from admission, which stores
nothing: they are retried like the others while the operator runs.

Each receiver has one worker and a bounded queue; a failed send is retried with a
doubling delay up to MAX_ATTEMPTS, then recorded (an Event, the receiver's status, a
metric) and left for the next restart. A DingTalk robot gets at most 20 messages a
minute: what exceeds that is folded into a summary message, never dropped. URLs and
secrets are read from Secrets when sending and appear in no log, Event, status or
metric label; receivers resolving to refused addresses (link-local, metadata, the API
server; loopback unless allowed) are not contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import httpx
from kubernetes.client.exceptions import ApiException

from scangate import metrics
from scangate.api import GROUP, VERSION
from scangate.api.imagescan import Phase
from scangate.cache import Cache, Refusal
from scangate.config import Settings
from scangate.core.destinations import DestinationRefused, Destinations
from scangate.core.images import InvalidReference, parse_image
from scangate.core.notify import (
    MAX_ATTEMPTS,
    RobotWindow,
    ScanEvent,
    dingtalk_message,
    dingtalk_signed_url,
    dingtalk_summary,
    id_digest,
    plan,
    retry_delay,
    wants,
    webhook_headers,
    webhook_payload,
)
from scangate.core.policy import ImageResult, Verdict
from scangate.core.rules import matching_rules, registry_host
from scangate.core.rulestate import RuleState
from scangate.core.running import NewlyVulnerable
from scangate.core.scanstate import ScanState, parse_time
from scangate.kube import Kube, Obj, now
from scangate.outbound import Resolver, pinned_client
from scangate.registry.auth import CredentialsError, secret_field
from scangate.registry.configured import tls_context

SEND_DEADLINE = 30.0
"""Seconds one delivery may take, from connecting to the last byte of the answer."""
log = logging.getLogger("scangate.notify")
QUEUE_LIMIT = 10_000
"""Pending events held per receiver; more wait in the API (their keys are not recorded)
and are picked up when the queue drains or at the next start."""
SECRET_TTL = 30.0
STATUS_EVERY = 2.0
"""Seconds between writes of a rule's receiver states (deliveries coalesce)."""


@dataclass(frozen=True)
class Receiver:
    """One notification of a ScanRule or ScanPolicy."""

    kind: str  # ScanRule | ScanPolicy
    namespace: str
    """Where its Secrets live: the rule's namespace, or the operator's for a policy."""
    owner: str
    name: str

    @property
    def label(self) -> str:
        return f"{self.kind} {self.namespace + '/' if self.kind == 'ScanRule' else ''}" \
               f"{self.owner} receiver {self.name}"


@dataclass
class Pending:
    event: ScanEvent
    scan: ScanState | None = None
    """The ImageScan whose status records the delivery (None for Blocked)."""
    current_ids: frozenset[str] | None = None
    previous: list[str] | None = None
    """The short ID hashes of the result this receiver last heard of (onlyNewFindings)."""
    delivered: bool = False
    """Recorded as delivered already (by the replica that led before)."""


@dataclass
class ReceiverState:
    spec: Mapping[str, Any]
    queue: deque[Pending] = field(default_factory=deque)
    queued: set[str] = field(default_factory=set)
    since: datetime | None = None
    last_delivery: str | None = None
    deliveries: int = 0
    failures: int = 0
    last_error: str | None = None
    task: asyncio.Task[None] | None = None


class Notifier:
    def __init__(self, kube: Kube, settings: Settings, cache: Cache,
                 destinations: Destinations) -> None:
        self.kube, self.settings, self.cache = kube, settings, cache
        self.index = cache.scans
        self.destinations = destinations
        self.resolver: Resolver | None = None
        """Replaces the system's resolver for receivers' names (tests)."""
        self.active: Callable[[], bool] = lambda: True
        """Whether this replica leads (scangate.leader): only the leader sends."""
        self.receivers: dict[Receiver, ReceiverState] = {}
        self._of_rule: dict[tuple[str, str], dict[str, Receiver]] = {}
        """Each ScanRule's receivers by name: an ImageScan's change looks at its rule's
        receivers only, never at every receiver of the cluster."""
        self.rules: dict[tuple[str, str], str] = {}
        """ScanRule namespace/name -> uid, of the rules seen."""
        self._windows: dict[str, RobotWindow] = {}
        self._secrets: dict[tuple[str, str], tuple[float, Obj | None]] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        cache.scanrules.subscribe(self._rule)
        cache.imagescans.subscribe(lambda scan, gone: None if gone else self.scan_changed(scan))
        cache.refusals.subscribe(self.blocked)
        cache.newly_vulnerable.subscribe(self.newly_vulnerable)

    def _rule(self, rule: RuleState, gone: bool) -> None:
        """A ScanRule changed or went: its receivers follow. What fails is the rule's."""
        try:
            if gone:
                self.rule_deleted(rule.namespace, rule.name)
            else:
                self.rule_changed(rule.namespace, rule.name, rule.uid, rule.spec,
                                  {"notifications": rule.receivers})
        except Exception as e:
            log.exception("ScanRule %s/%s: its notifications could not be updated", *rule.ref)
            self._trouble("ScanRule", rule.namespace, rule.name,
                          f"its notifications could not be updated: {_describe(e)}")

    def covering(self, image: str) -> list[tuple[str, str, list[Obj]]]:
        """The rules whose registry, scope and tag filter cover an image, with their
        notifications (for Blocked events)."""
        try:
            ref = parse_image(image)
        except InvalidReference:
            return []
        rules = self.cache.scanrules.items
        candidates = [(f"{r.namespace}/{r.name}", registry_host(r.host), r.scope, f, True)
                      for r in rules.values() if r.spec.get("notifications")
                      and (f := r.tag_filter) is not None]
        found = []
        for match in matching_rules(candidates, registry_host(ref.registry), ref.repository,
                                    ref.tag or ""):
            namespace, _, name = match.partition("/")
            rule = rules[(namespace, name)]
            found.append((namespace, name, list(rule.spec.get("notifications") or [])))
        return found

    def rule_changed(self, namespace: str, name: str, uid: str, spec: Obj, status: Obj
                     ) -> None:
        """A ScanRule was seen (from the rule controller's watch). What fails here is the
        rule's: the caller reports it on the rule."""
        self.rules[(namespace, name)] = uid
        wanted = {n.get("name"): n for n in spec.get("notifications") or []}
        held = self._of_rule.setdefault((namespace, name), {})
        for gone in set(held) - set(wanted):
            state = self.receivers.pop(held.pop(gone))
            if state.task:
                state.task.cancel()
        if not wanted:
            del self._of_rule[(namespace, name)]
        recorded = {r.get("name"): r for r in status.get("notifications") or []}
        added = False
        for receiver_name, receiver_spec in wanted.items():
            receiver = Receiver("ScanRule", namespace, name, str(receiver_name))
            held_state = self.receivers.get(receiver)
            if held_state is None:
                old = recorded.get(receiver_name) or {}
                held[str(receiver_name)] = receiver
                held_state = self.receivers[receiver] = ReceiverState(
                    receiver_spec, since=parse_time(old.get("since")),
                    last_delivery=old.get("lastDelivery"),
                    deliveries=int(old.get("deliveries") or 0))
                if held_state.since is None:  # new: what finished before is not news to it
                    # In whole seconds, as the scans' times are: a scan that finished in
                    # the same second as the receiver came is news to it.
                    held_state.since = datetime.now(UTC).replace(microsecond=0)
                    self._dirty.add((namespace, name))
                added = True
            held_state.spec = receiver_spec
        if added:  # what the rule's scans hold may be news to a new receiver
            for scan in self.index.by_rule(namespace, name):
                self.scan_changed(scan)

    def rule_deleted(self, namespace: str, name: str) -> None:
        self.rule_changed(namespace, name, "", {}, {})
        self.rules.pop((namespace, name), None)

    def scan_changed(self, scan: ScanState) -> None:
        """An ImageScan changed (from the scan reconciler's watch): queue its outcome for
        each receiver of its rule that has not had it. What fails is that rule's, never
        the scan reconciler's."""
        try:
            self._scan_changed(scan)
        except Exception as e:
            rule = scan.owner or scan.rule or "?"
            log.exception("ScanRule %s/%s: the outcome of ImageScan %s could not be queued",
                          scan.namespace, rule, scan.name)
            self._trouble("ScanRule", scan.namespace, rule,
                          f"the outcome of ImageScan {scan.name} could not be queued for "
                          f"its receivers: {_describe(e)}")

    def _scan_changed(self, scan: ScanState) -> None:
        key = scan.event_key
        rule = scan.owner or scan.rule
        if key is None or rule is None:
            return
        event = "ScanCompleted" if scan.phase == Phase.COMPLETED else "ScanFailed"
        done = dict(scan.notified)
        finished = scan.completion_time or scan.scanned_at
        for receiver in self._of_rule.get((scan.namespace, rule), {}).values():
            state = self.receivers[receiver]
            if (done.get(receiver.name) == key or key in state.queued
                    or len(state.queue) >= QUEUE_LIMIT):
                continue
            if event not in (state.spec.get("events") or ["ScanCompleted", "ScanFailed"]):
                continue
            if state.since and finished and finished < state.since:
                continue
            state.queued.add(key)
            state.queue.append(Pending(ScanEvent(
                event=event, key=key, source_kind="ScanRule",
                source=f"{scan.namespace}/{rule}", image=scan.image, digest=scan.digest,
                namespace=scan.namespace, counts=None, fixable=None, worst=(),
                time=finished or datetime.now(UTC), reason=None, message=None), scan))
            self._start(receiver, state)

    def blocked(self, refusal: Refusal) -> None:
        """Admission refused a workload: tell the failing policies' receivers and those of
        the rules covering each refused image that subscribe to Blocked. What fails for
        one policy's verdict is that policy's."""
        stamp = datetime.now(UTC)
        decision, namespace = refusal.decision, refusal.namespace
        policy_notifications = {
            p.name: [n.dump() for n in p.policy.spec.notifications or []]
            for p in self.cache.scanpolicies.items.values()
            if p.policy is not None and p.policy.spec.notifications}
        for verdict in decision.violations:
            if verdict.overridden or verdict.effect.label != "Enforce":
                continue
            try:
                self._blocked(verdict, namespace, policy_notifications, stamp)
            except Exception as e:
                log.exception("ScanPolicy %s: a Blocked event could not be queued",
                              verdict.policy)
                self._trouble("ScanPolicy", "", verdict.policy,
                              f"a Blocked event could not be queued: {_describe(e)}")

    def _blocked(self, verdict: Verdict, namespace: str,
                 policy_notifications: Mapping[str, list[Obj]], stamp: datetime) -> None:
        event = ScanEvent(
            event="Blocked", key=f"blocked/{namespace}/{verdict.policy}/{verdict.image}/"
            f"{stamp.isoformat()}", source_kind="ScanPolicy", source=verdict.policy,
            image=verdict.image, digest=verdict.digest, namespace=namespace,
            counts=None, fixable=None,
            worst=(), time=stamp, reason="Blocked", message=verdict.message)
        targets = [(Receiver("ScanPolicy", self.settings.namespace, verdict.policy,
                             str(n.get("name"))), n)
                   for n in policy_notifications.get(verdict.policy) or []]
        for rule_ns, rule, notifications in self.covering(verdict.image):
            targets += [(Receiver("ScanRule", rule_ns, rule, str(n.get("name"))), n)
                        for n in notifications]
        for receiver, spec in targets:
            if "Blocked" not in (spec.get("events") or []):
                continue
            state = self.receivers.setdefault(receiver, ReceiverState(spec))
            if len(state.queue) < QUEUE_LIMIT:
                state.queue.append(Pending(event))
                self._start(receiver, state)

    def newly_vulnerable(self, news: NewlyVulnerable) -> None:
        """A running image became refused under a newer DB (the inventory): tell the
        refusing policies' receivers and those of the rules covering the image that
        subscribe to NewlyVulnerable, once each (the inventory publishes it once)."""
        if not self.active():
            return
        stamp = datetime.now(UTC)
        policy_notifications = {
            p.name: [n.dump() for n in p.policy.spec.notifications or []]
            for p in self.cache.scanpolicies.items.values()
            if p.policy is not None and p.policy.spec.notifications}
        db = news.db_updated_at.isoformat()
        targets = [(Receiver("ScanPolicy", self.settings.namespace, policy, str(n.get("name"))),
                    n, policy) for policy in news.policies
                   for n in policy_notifications.get(policy) or []]
        for rule_ns, rule, notifications in self.covering(news.image):
            targets += [(Receiver("ScanRule", rule_ns, rule, str(n.get("name"))), n,
                         f"{rule_ns}/{rule}") for n in notifications]
        for receiver, spec, source in targets:
            if "NewlyVulnerable" not in (spec.get("events") or []):
                continue
            event = ScanEvent(
                event="NewlyVulnerable", key=f"newly-vulnerable/{news.namespace}/"
                f"{news.digest or news.image}/{db}/{source}", source_kind=receiver.kind,
                source=source, image=news.image, digest=news.digest, namespace=news.namespace,
                counts=None, fixable=None, worst=news.findings, time=stamp,
                reason="NewlyVulnerable", message=news.message,
                workloads=tuple(str(w) for w in news.workloads))
            state = self.receivers.setdefault(receiver, ReceiverState(spec))
            if len(state.queue) < QUEUE_LIMIT and event.key not in state.queued:
                state.queued.add(event.key)
                state.queue.append(Pending(event))
                self._start(receiver, state)

    # -- workers -----------------------------------------------------------------------

    def _start(self, receiver: Receiver, state: ReceiverState) -> None:
        if state.task is None or state.task.done():
            state.task = asyncio.create_task(self._work(receiver, state))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _work(self, receiver: Receiver, state: ReceiverState) -> None:
        attempts = 0
        while state.queue:
            if not self.active():
                await asyncio.sleep(1.0)
                continue
            kind = str(state.spec.get("type", "webhook"))
            try:
                batch = await self._next_batch(receiver, state, kind)
                if not batch:
                    continue
                await self._send(receiver, state, kind, batch)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                attempts += 1
                state.failures += 1
                state.last_error = _describe(e)
                metrics.NOTIFICATIONS.labels(kind, "failed").inc()
                self._dirty.add((receiver.namespace, receiver.owner))
                if attempts >= MAX_ATTEMPTS:
                    # _give_up drops the event before anything there can fail: the worker
                    # goes on with the next one whatever happens.
                    await self._give_up(receiver, state)
                    attempts = 0
                    continue
                await asyncio.sleep(retry_delay(attempts))
                continue
            attempts = 0

    async def _next_batch(self, receiver: Receiver, state: ReceiverState, kind: str
                          ) -> list[Pending]:
        """The next message's events: one, or (a DingTalk robot over its rate) all pending
        in one summary; events the receiver's filters pass over are recorded and dropped."""
        head = state.queue[0]
        await self._fill(receiver, head)
        if head.delivered:
            self._pop(state, 1)
            return []
        if not wants(state.spec, head.event, head.previous, head.current_ids):
            await self._record(receiver, [head])
            self._pop(state, 1)
            return []
        if kind != "dingtalk":
            return [head]
        window = self._windows.setdefault(await self._robot(receiver, state), RobotWindow())
        while True:
            current = datetime.now(UTC)
            step = plan(len(state.queue), window.available(current))
            if step == "single":
                return [head]
            if step == "summary":
                for pending in list(state.queue)[1:]:
                    await self._fill(receiver, pending)
                return list(state.queue)
            await asyncio.sleep(max((window.next_free(current) - current).total_seconds(),
                                    0.05))

    async def _fill(self, receiver: Receiver, pending: Pending) -> None:
        """Complete a scan event from the ImageScan (counts, worst findings, IDs)."""
        scan = pending.scan
        if scan is None or pending.event.counts is not None:
            return
        obj = await self.kube.get_custom("imagescans", scan.namespace, scan.name) or {}
        status = obj.get("status") or {}
        if ((status.get("notified") or {}).get(receiver.name) or {}).get(
                "key") == pending.event.key:
            pending.delivered = True  # by another replica, before it stopped leading
        result = ImageResult.from_status(status)  # the one reading of a stored result
        worst = tuple({"id": f.id, "severity": f.severity, "package": f.package,
                       "installedVersion": f.installed_version,
                       "fixedVersion": f.fixed_version} for f in result.findings[:5])
        index = result.index
        pending.current_ids = frozenset(index) if index is not None else None
        pending.event = replace(pending.event, counts=result.summary or {},
                                fixable=result.fixable, worst=worst,
                                reason=result.reason, message=result.message,
                                malware_count=result.malware_count,
                                malware=tuple({"layer": h.layer, "path": h.path,
                                               "signature": h.signature}
                                              for h in result.malware[:5]))
        pending.previous = ((status.get("notified") or {}).get(receiver.name) or {}).get("ids")

    async def _send(self, receiver: Receiver, state: ReceiverState, kind: str,
                    batch: list[Pending]) -> None:
        url, secret = await self._url_and_secret(receiver, state)
        # Connections go to the receiver's address that was checked, resolved once.
        client = pinned_client(self.destinations, verify=tls_context(state.spec.get("caBundle")),
                               timeout=10.0, resolver=self.resolver)
        try:
            # httpx's timeout bounds each read: a receiver trickling a byte at a time
            # would hold its worker forever without this deadline on the whole exchange.
            async with client, asyncio.timeout(SEND_DEADLINE):
                await self._post(client, kind, url, secret, batch)
        except TimeoutError:
            raise NotifyError(f"no complete answer within {SEND_DEADLINE:.0f}s") from None
        metrics.NOTIFICATIONS.labels(kind, "delivered").inc()
        state.deliveries += 1
        state.failures = 0
        state.last_error = None
        state.last_delivery = now()
        self._dirty.add((receiver.namespace, receiver.owner))
        await self._record(receiver, batch)
        self._pop(state, len(batch))

    async def _post(self, client: httpx.AsyncClient, kind: str, url: str, secret: str | None,
                    batch: list[Pending]) -> None:
        if kind == "dingtalk":
            if not secret:
                raise NotifyError("a DingTalk robot needs its signing secret "
                                  "(signingSecretRef)")
            body = (dingtalk_message(batch[0].event) if len(batch) == 1 else
                    dingtalk_summary([p.event for p in batch], datetime.now(UTC)))
            target = dingtalk_signed_url(url, secret, int(time.time() * 1000))
            response = await client.post(target, json=body)
            _check(response)
            answer = response.json() if response.content else {}
            code = answer.get("errcode", 0) if isinstance(answer, dict) else "?"
            if code != 0:  # DingTalk answers 200 with its error in the body
                raise NotifyError(f"DingTalk answered errcode {code}")
            self._windows[_robot_key(url)].sent(datetime.now(UTC))
        else:
            payload = webhook_payload(batch[0].event)
            response = await client.post(url, content=payload, headers=webhook_headers(
                batch[0].event, payload, secret))
            _check(response)

    def _pop(self, state: ReceiverState, count: int) -> None:
        for _ in range(count):
            state.queued.discard(state.queue.popleft().event.key)

    async def _record(self, receiver: Receiver, batch: list[Pending]) -> None:
        """Write each delivered (or passed-over) event's key into its ImageScan's status."""
        for pending in batch:
            scan = pending.scan
            if scan is None:
                continue
            marker: Obj = {"key": pending.event.key}
            if pending.current_ids is not None:
                marker["ids"] = id_digest(pending.current_ids)
            with contextlib.suppress(ApiException):  # deleted meanwhile: nothing to record
                await self.kube.patch_status("imagescans", scan.namespace, scan.name,
                                             {"notified": {receiver.name: marker}})

    async def _give_up(self, receiver: Receiver, state: ReceiverState) -> None:
        pending = state.queue[0]
        metrics.NOTIFICATIONS.labels(str(state.spec.get("type")), "abandoned").inc()
        log.warning("%s: giving up on %s after %d attempts (%s); it is sent again at the "
                    "next start", receiver.label, pending.event.key, MAX_ATTEMPTS,
                    state.last_error)
        self._pop(state, 1)
        await self._event(receiver.kind, receiver.namespace, receiver.owner,
                          "NotificationFailed",
                          f"receiver {receiver.name}: {pending.event.event} of "
                          f"{pending.event.image} not delivered after {MAX_ATTEMPTS} "
                          f"attempts: {state.last_error}")

    def _policy_uid(self, name: str) -> str | None:
        held = self.cache.scanpolicies.items.get(("", name))
        return held.uid if held is not None else None

    async def _event(self, kind: str, namespace: str, name: str, reason: str,
                     message: str) -> None:
        """A Warning Event on a ScanRule or ScanPolicy (cluster-scoped: `namespace` is
        ignored) the notifier knows the uid of; never failing."""
        uid = (self.rules.get((namespace, name)) if kind == "ScanRule"
               else self._policy_uid(name))
        if not uid:
            return
        metadata = {"name": name, "uid": uid}
        if kind == "ScanRule":
            metadata["namespace"] = namespace
        try:
            await self.kube.event({"apiVersion": f"{GROUP}/{VERSION}", "kind": kind,
                                   "metadata": metadata}, "Warning", reason, message)
        except Exception as e:
            log.warning("%s %s: could not record %s: %s", kind, name, reason, _describe(e))

    def _trouble(self, kind: str, namespace: str, name: str, message: str) -> None:
        """Something unexpected in one object's notifications: the metric, and an Event on
        the object (by the leader), in the background."""
        metrics.OBJECT_FAILURES.labels(kind, "NotificationsFailed").inc()
        if not self.active():
            return
        task = asyncio.create_task(self._event(kind, namespace, name, "NotificationsFailed",
                                               message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- secrets and status --------------------------------------------------------------

    async def _secret(self, namespace: str, name: str) -> Obj | None:
        held = self._secrets.get((namespace, name))
        if held is None or time.monotonic() - held[0] > SECRET_TTL:
            held = (time.monotonic(), await self.kube.get_secret(namespace, name))
            self._secrets[(namespace, name)] = held
        return held[1]

    async def _value(self, namespace: str, ref: Mapping[str, Any] | None) -> str | None:
        if not ref:
            return None
        secret = await self._secret(namespace, str(ref.get("name")))
        if secret is None:
            raise NotifyError(f"Secret {ref.get('name')} not found")
        try:
            value = secret_field(secret, str(ref.get("name")), str(ref.get("key", "url")))
        except CredentialsError as e:
            raise NotifyError(str(e)) from None
        if value is None:
            raise NotifyError(f"Secret {ref.get('name')} has no key {ref.get('key', 'url')}")
        return value.strip()

    async def _url_and_secret(self, receiver: Receiver, state: ReceiverState
                              ) -> tuple[str, str | None]:
        url = await self._value(receiver.namespace, state.spec.get("urlSecretRef"))
        assert url is not None
        if not url.lower().startswith(("https://", "http://")):
            raise NotifyError("the receiver URL in its Secret is not http(s)")
        return url, await self._value(receiver.namespace, state.spec.get("signingSecretRef"))

    async def _robot(self, receiver: Receiver, state: ReceiverState) -> str:
        url, _ = await self._url_and_secret(receiver, state)
        return _robot_key(url)

    async def _flush(self) -> None:
        """Write the receiver states of rules with news, at most every STATUS_EVERY."""
        while True:
            await asyncio.sleep(STATUS_EVERY)
            dirty, self._dirty = self._dirty, set()
            for namespace, name in dirty:
                if (namespace, name) not in self.rules:
                    continue
                try:
                    states = [{"name": r.name, "since": s.since.strftime("%Y-%m-%dT%H:%M:%SZ")
                               if s.since else None, "lastDelivery": s.last_delivery,
                               "deliveries": s.deliveries, "failures": s.failures,
                               "lastError": s.last_error}
                              for r, s in ((r, self.receivers[r]) for _, r in sorted(
                                  self._of_rule.get((namespace, name), {}).items()))]
                    await self.kube.patch_status("scanrules", namespace, name,
                                                 {"notifications": states})
                except Exception as e:  # deleted meanwhile, the API server away, a bug
                    transient = not isinstance(e, ApiException) or e.status in (429, 500,
                                                                                 502, 503, 504)
                    if transient:
                        self._dirty.add((namespace, name))  # written at the next flush
                    if not isinstance(e, ApiException) or e.status != 404:
                        log.warning("ScanRule %s/%s: receiver states not written: %s",
                                    namespace, name, _describe(e))

def _robot_key(url: str) -> str:
    """A robot is its URL (several rules may share one): the key of its rate window,
    held as a hash so that the URL's token stays out of memory dumps of the map."""
    return hashlib.sha256(url.encode()).hexdigest()


class NotifyError(Exception):
    """A receiver's answer or set-up that is not a delivery."""


def _check(response: httpx.Response) -> None:
    if not 200 <= response.status_code < 300:
        raise NotifyError(f"the receiver answered HTTP {response.status_code}")


def _describe(error: Exception) -> str:
    """A failure in words that never carry the URL (httpx's messages quote it)."""
    if isinstance(error, NotifyError | DestinationRefused):
        return str(error)[:500]
    if isinstance(error, httpx.TimeoutException):
        return "the receiver did not answer in time"
    if isinstance(error, httpx.HTTPError):
        return f"the receiver could not be reached ({type(error).__name__})"
    if isinstance(error, ApiException):
        return f"the API server answered {error.status}"
    return type(error).__name__

