"""The admission gate: a workload's new images judged under the ScanPolicies.

Everything a decision reads is in memory: the ScanPolicies, the namespaces' labels and
the ImageScans from the shared cache (scangate.cache), a tag's
digest from a short-lived cache (one registry lookup for many requests: single-flight),
and an ImageScan's full result from a cache keyed by its resourceVersion. A request
for what is cached costs no API or registry round trip. An image with no usable
result gets an ImageScan (trigger Admission), once per digest, never on a dry run.

The gate's side effects (scans, Events, Blocked notifications) follow only from reviews
a real API server could send: from a namespace its webhook configuration covers, and
scans within a token bucket. Break-glass is honoured only for a requester the API
server says may use it (a SubjectAccessReview, asked only when the annotation would
change the outcome, its answer cached briefly).

Refusals are published to the cache (the notifier sends Blocked events from there).
A ScanPolicy the gate cannot use is that policy's problem: it is left out of decisions
and says so in its Ready condition and an Event (written by the leader), and the gate
stays ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

from scangate import metrics
from scangate.admission.configuration import covers
from scangate.admission.digests import DigestLookups
from scangate.api import GROUP, VERSION
from scangate.api.imagescan import Phase, Trigger
from scangate.cache import Cache, Refusal
from scangate.config import Settings
from scangate.core.conditions import condition
from scangate.core.destinations import Destinations
from scangate.core.images import ImageRef, parse_image
from scangate.core.policy import (
    BreakGlassGrant,
    Decision,
    ImageResult,
    Kind,
    applies,
    decide,
)
from scangate.core.policystate import PolicyState
from scangate.core.vex import VexState
from scangate.core.workloads import (
    new_images,
    normalise,
    owned_by_controller_request,
    reference,
)
from scangate.kube import Kube, Obj, now
from scangate.scanrequests import Asked, ScanRequests, ScanResults

log = logging.getLogger("scangate.admission")
RESULTS_CACHED = 2048
BREAK_GLASS_TTL = 10.0
"""Seconds an answer on break-glass (allowed or not) is reused for the same requester,
namespace and policy."""
BREAK_GLASS_CACHED = 1024
POLICY_STATUS_EVERY = 5.0
"""Seconds between the leader's looks at the ScanPolicies' Ready conditions (changes wake
it sooner)."""


@dataclass(frozen=True)
class Review:
    """What the gate answers: the decision, and the images it judged."""

    decision: Decision
    judged: tuple[str, ...]


class Gate:
    def __init__(self, kube: Kube, settings: Settings, cache: Cache,
                 destinations: Destinations) -> None:
        self.kube, self.settings, self.cache = kube, settings, cache
        self.index = cache.scans
        self.policies = cache.scanpolicies.items
        """ScanPolicies by ("", name)."""
        self.destinations = destinations
        self.operator_user: str | None = None
        """The operator's own user: its scan Jobs are never judged (a gate that refused
        them would refuse every scan that could lift a denial)."""
        self.policies_changed = asyncio.Event()
        self.vex: Callable[[], VexState] | None = None
        """The VEX documents as they are now (scangate.vexdocs)."""
        self.digests = DigestLookups(settings, destinations)
        """Tags' digests: cached, single-flight and bounded lookups (admission.digests)."""
        self.results = ScanResults(kube, self.index, RESULTS_CACHED)
        self.scans = ScanRequests(kube, self.index, Trigger.ADMISSION,
                                  settings.admission_scan_rate, settings.admission_scan_burst)
        """The scans the gate may create: a review forged or repeated cannot make more."""
        self._break_glass: OrderedDict[str, tuple[float, BreakGlassGrant]] = OrderedDict()
        self._policy_news = asyncio.Event()
        self._invalid: dict[str, str] = {}
        """Policies that cannot be used, and why (counted once per reason)."""
        self.active: Callable[[], bool] = lambda: True
        """Whether this replica leads (scangate.leader): only the leader writes the
        ScanPolicies' conditions."""
        self._tasks: set[asyncio.Task[None]] = set()
        cache.scanpolicies.subscribe(self._policy_changed)

    def _policy_changed(self, state: PolicyState, gone: bool) -> None:
        if not gone:
            self._count_invalid(state)
        self.policies_changed.set()
        self._policy_news.set()

    def _count_invalid(self, state: PolicyState) -> None:
        if state.policy is not None:
            self._invalid.pop(state.name, None)
        elif self._invalid.get(state.name) != state.error:
            self._invalid[state.name] = state.error
            metrics.OBJECT_FAILURES.labels("ScanPolicy", "InvalidSpec").inc()

    def namespace_labels(self, namespace: str) -> dict[str, str] | None:
        held = self.cache.namespaces.items.get(("", namespace))
        return held.labels if held is not None else None

    async def _keep_policy_status(self) -> None:
        """The leader keeps each ScanPolicy's Ready condition true to what the gate does
        with it, with a Warning Event when one becomes unusable. Runs until cancelled."""
        written: dict[tuple[str, str], tuple[str, str, str, int]] = {}
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._policy_news.wait(), POLICY_STATUS_EVERY)
            self._policy_news.clear()
            if not self.active():
                written.clear()  # another replica writes; look afresh when leading
                continue
            for state in list(self.policies.values()):
                desired = state.desired()
                key = (state.name, state.uid)
                if state.current() == desired or written.get(key) == (*desired,
                                                                      state.generation):
                    continue
                try:
                    await self._write_policy_status(state, desired)
                except Exception as e:  # retried at the next look
                    log.warning("ScanPolicy %s: could not write its condition: %s",
                                state.name, type(e).__name__)
                    continue
                written[key] = (*desired, state.generation)

    async def _write_policy_status(self, state: PolicyState, desired: tuple[str, str, str]
                                   ) -> None:
        status, reason, message = desired
        await self.kube.patch_cluster_status("scanpolicies", state.name, {
            "observedGeneration": state.generation,
            "conditions": [condition("Ready", status, reason, message, state.generation,
                                     [state.ready] if state.ready else [], now())]})
        if status == "False":
            await self.kube.event(
                {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ScanPolicy",
                 "metadata": {"name": state.name, "uid": state.uid}},
                "Warning", reason, message)

    def pinning(self) -> bool:
        """Whether a ScanPolicy pins digests (and the mutating webhook is wanted)."""
        return any(p.policy is not None and p.policy.spec.pin_digests
                   for p in self.policies.values())

    async def run(self) -> None:
        await asyncio.gather(self._whoami(), self._keep_policy_status())

    async def _whoami(self) -> None:
        """The operator's user, asked until the API server answers (the gate is not ready
        before: it would judge the operator's own scan Jobs)."""
        delay = 0.5
        while self.operator_user is None:
            try:
                self.operator_user = await self.kube.whoami()
            except Exception as e:
                log.warning("the gate could not learn its own user (%s); retrying in %.0fs",
                            type(e).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    @property
    def ready(self) -> bool:
        return (self.operator_user is not None and self.cache.scanpolicies.synced.is_set()
                and self.cache.namespaces.synced.is_set())

    # -- a request -------------------------------------------------------------------

    async def review(self, request: Obj) -> Review:
        """Judge an AdmissionReview request (v1)."""
        policies = [p.policy for p in self.policies.values() if p.policy is not None]
        kind = str((request.get("kind") or {}).get("kind", ""))
        namespace = str(request.get("namespace") or "")
        obj = request.get("object") or {}
        user = request.get("userInfo") or {}
        username = str(user.get("username", ""))
        if (not policies or username == self.operator_user
                or owned_by_controller_request(obj, username, list(user.get("groups") or []))):
            return Review(Decision(allowed=True, action="Allow"), ())
        images = normalise(new_images(kind, obj, request.get("oldObject")))
        if not images.references and not images.errors:
            return Review(Decision(allowed=True, action="Allow"), ())
        refs = {name: parse_image(name) for name in images.references}
        # Images the registry does not resolve by the deadline are unscanned for this
        # review: the policy's `unscanned` rule decides, in time.
        resolved = await self.digests.digests(list(refs.values()), namespace,
                                              self.digests.review_deadline())
        now = datetime.now(UTC)
        results: dict[str, ImageResult | None] = {}
        # The scanners the policies need (secret, misconfig): a result made with them wins.
        wanted = frozenset[str]().union(*(p.scanners for p in policies))
        # An image whose digest the registry would not tell is unscanned: the scan the
        # gate starts for it keeps trying, and its status says why.
        for name, (digest, _) in zip(refs, resolved, strict=True):
            results[name] = await self.results.result(digest, wanted) if digest else None
        for error in images.errors:  # refused by every Enforce policy of the namespace
            results[error] = ImageResult(phase=Phase.FAILED, reason=Kind.INVALID_REFERENCE,
                                         message=error)
        meta = obj.get("metadata") or {}
        judge = partial(decide, policies, results, namespace,
                        (self.namespace_labels(namespace) or {}), meta.get("annotations") or {},
                        now, scans_namespace=namespace,
                        vex=self.vex() if self.vex is not None else None,
                        known_db=self.cache.scans.known_db)
        decision = judge()
        if decision.break_glass_wanted:  # only then: other reviews never pay for it
            decision = judge(break_glass=await self._break_glass_grants(
                decision.break_glass_wanted, user, namespace))
        if request.get("dryRun"):
            return Review(decision, tuple(results))
        if not covers(self.settings, namespace, self.namespace_labels(namespace)):
            # Not a review the API server sends (kube-system, the operator's namespace, an
            # ignored or unknown one): answered, but it causes nothing.
            if decision.needs_scan:
                metrics.ADMISSION_SCANS.labels("uncovered").inc()
            return Review(decision, tuple(results))
        if not decision.allowed:
            self.cache.refusals.publish(Refusal(decision, namespace))
        for image in decision.needs_scan:
            if image in refs:
                self._request_scan(namespace, refs[image],
                                   resolved[list(refs).index(image)][0],
                                   decision.scanners.get(image, ()))
        self._record(decision, request, kind, namespace, meta)
        return Review(decision, tuple(results))

    async def _break_glass_grants(self, policies: tuple[str, ...], user: Obj,
                                  namespace: str) -> dict[str, BreakGlassGrant]:
        """Whether the API server lets the requester use break-glass of each policy in
        this namespace (verb `use` on scanpolicies/breakglass, named by the policy: RBAC
        decides), each answer reused for BREAK_GLASS_TTL. A check that fails is a no."""
        grants = {}
        who = str(user.get("username") or "")
        for policy in policies:
            key = json.dumps([user.get("username"), user.get("uid"), user.get("groups"),
                              user.get("extra"), namespace, policy], sort_keys=True,
                             default=str)
            held = self._break_glass.get(key)
            if held is not None and held[0] > time.monotonic():
                grants[policy] = held[1]
                continue
            try:
                allowed, reason = await asyncio.wait_for(self.kube.may(user, {
                    "group": GROUP, "resource": "scanpolicies", "subresource": "breakglass",
                    "verb": "use", "name": policy, "namespace": namespace}),
                    max(self.settings.admission_timeout_seconds - 3, 1))
            except Exception as e:
                grants[policy] = BreakGlassGrant(False, (
                    f"the API server could not be asked whether {who} may use it "
                    f"({type(e).__name__}), so it is not honoured"))
                continue
            grants[policy] = BreakGlassGrant(allowed, "" if allowed else (
                f"RBAC does not let {who} use scanpolicies/breakglass {policy} in "
                f"namespace {namespace}" + (f" ({reason[:200]})" if reason else "")))
            self._break_glass[key] = (time.monotonic() + BREAK_GLASS_TTL, grants[policy])
            while len(self._break_glass) > BREAK_GLASS_CACHED:
                self._break_glass.popitem(last=False)
        return grants

    async def pins(self, request: Obj) -> list[Obj]:
        """JSON patch ops that pin each new image under a policy with pinDigests to the
        digest it is judged by (repo:tag@sha256:...): what runs is what passed, even if
        the tag moves before the kubelet pulls it."""
        pinning = [p.policy for p in self.policies.values()
                   if p.policy is not None and p.policy.spec.pin_digests]
        user = request.get("userInfo") or {}
        username = str(user.get("username", ""))
        obj = request.get("object") or {}
        if (not pinning or username == self.operator_user
                or owned_by_controller_request(obj, username, list(user.get("groups") or []))):
            return []
        kind = str((request.get("kind") or {}).get("kind", ""))
        namespace = str(request.get("namespace") or "")
        labels = (self.namespace_labels(namespace) or {})
        pinned = []
        for image in new_images(kind, obj, request.get("oldObject")):
            normalised = reference(image).normalised
            if normalised is None or "@" in normalised or not any(
                    applies(p, namespace, labels, normalised) for p in pinning):
                continue
            pinned.append((image, parse_image(normalised)))
        # An image not resolved in time is left unpinned; the validating review judges it.
        digests = await self.digests.digests([ref for _, ref in pinned], namespace,
                                             self.digests.review_deadline())
        return [{"op": "replace", "path": image.path, "value": f"{image.image}@{digest}"}
                for (image, _), (digest, _) in zip(pinned, digests, strict=True) if digest]

    # -- side effects ----------------------------------------------------------------

    def _request_scan(self, namespace: str, ref: ImageRef, digest: str | None,
                      scanners: tuple[str, ...] = ()) -> None:
        """An ImageScan (trigger Admission) for an image with no result
        (scangate.scanrequests, shared with the inventory)."""
        asked = self.scans.request(namespace, ref, digest, scanners)
        if asked is not Asked.HELD:  # the next review asks again for what is shed
            metrics.ADMISSION_SCANS.labels(asked.value).inc()

    def _record(self, decision: Decision, request: Obj, kind: str, namespace: str,
                meta: Obj) -> None:
        """Events for what admitted a failing workload (audit, break-glass), and metrics."""
        for verdict in decision.violations:
            metrics.ADMISSION_DECISIONS.labels(verdict.policy, verdict.effect.label,
                                               "overridden" if verdict.overridden
                                               else "failed").inc()
        if not decision.violations:
            metrics.ADMISSION_DECISIONS.labels("", "Allow", "passed").inc()
        involved = {"apiVersion": (request.get("kind") or {}).get("version", "v1"),
                    "kind": kind, "metadata": {"name": meta.get("name") or
                                               meta.get("generateName") or "?",
                                               "namespace": namespace, "uid": meta.get("uid")}}
        for verdict in decision.audit:
            self._background(self.kube.event(involved, "Warning", "PolicyAudit",
                                              verdict.summary), "an audit Event")
        if decision.break_glass is not None:
            policies = ", ".join(sorted({v.policy for v in decision.break_glass.verdicts}))
            who = (request.get("userInfo") or {}).get("username") or "?"
            self._background(self.kube.event(
                involved, "Warning", "BreakGlass",
                f"admitted by break-glass ({decision.break_glass.reason}) used by {who} "
                f"despite ScanPolicy {policies}"), "a break-glass Event")

    def _background(self, work: Awaitable[Any], what: str) -> None:
        """Side effects do not hold the answer up; a failure is logged."""
        async def run() -> None:
            try:
                await work
            except Exception as e:
                log.warning("admission could not create %s: %s", what, e)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

