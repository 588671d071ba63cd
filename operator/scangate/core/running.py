"""What runs in the cluster: each running Pod as a small projection (its workload and
the images it runs, by digest where the node reports one), and the index of which
images run where that the inventory keeps from them.

Pods come from a watch of the whole cluster, so a projection keeps a few strings per
container and never the Pod; every field is read defensively (a Pod is a tenant's
object). Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from scangate.core.images import ImageRef, InvalidReference, parse_image
from scangate.core.policy import Decision, Effect, ImageResult
from scangate.core.scanstate import ScanIndex

Obj = dict[str, Any]
Key = tuple[str, str]
"""(namespace, name)"""

VERDICTS = ("Refused", "Unscanned", "Warned", "Admitted")
"""What the ScanPolicies would do with a running image now, worst first."""
RUNNING = "Running"
"""The Pod phase the inventory keeps (a Pending pod runs nothing yet; a Succeeded or
Failed one runs nothing any more)."""
MAX_POD_IMAGES = 64
"""Images kept of one Pod: a Pod may declare any number of containers (ephemeral ones
grow with each `kubectl debug`), the projection stays bounded."""
MAX_IMAGE_LENGTH = 4096
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_CRONJOB_JOB = re.compile(r"^(?P<cronjob>.+)-(?P<minutes>\d{8,10})$")
"""A Job the CronJob controller made: `<cronjob>-<scheduled time in minutes since the
epoch>` (8 digits from 1960 to 2160)."""
_STATUS_FIELDS = (("initContainers", "initContainerStatuses"),
                  ("containers", "containerStatuses"),
                  ("ephemeralContainers", "ephemeralContainerStatuses"))


@dataclass(frozen=True, slots=True, order=True)
class Workload:
    """A Pod's top controller as `kubectl get` names it: Deployment, StatefulSet,
    DaemonSet, CronJob, Job, ReplicaSet (one no Deployment made), ReplicationController,
    another controller's kind, or Pod for a bare (or static) pod."""

    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True, slots=True, order=True)
class RunningImage:
    """One image a Pod runs: the reference its spec names (normalised), and the digest
    the node reports it runs (`imageID`), or the spec's own digest, if any."""

    image: str
    """Normalised, without a digest (`registry/repository[:tag]`)."""
    digest: str | None = None

    @property
    def key(self) -> str:
        """What identifies the image for dedup: the digest, else the reference (a tag the
        node has not reported a digest for: the scan resolves it)."""
        return self.digest or self.image

    @property
    def reference(self) -> str:
        """The reference to scan: pinned to the digest where one is known."""
        return self.image if self.digest is None else f"{self.image}@{self.digest}"


@dataclass(frozen=True, slots=True)
class RunningPod:
    namespace: str
    name: str
    phase: str
    workload: Workload
    images: tuple[RunningImage, ...]

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)


def digest_of(image_id: object) -> str | None:
    """The manifest digest in a container status's `imageID` (`repo@sha256:…`,
    `docker-pullable://repo@sha256:…`), None when it holds none: a bare `sha256:…` is a
    runtime's local image ID (the config's digest, no manifest a registry knows), and
    other runtimes report their own words."""
    if not isinstance(image_id, str) or "@" not in image_id:
        return None
    digest = image_id.rsplit("@", 1)[1]
    return digest if _DIGEST.fullmatch(digest) else None


def _parsed(image: object) -> ImageRef | None:
    if not isinstance(image, str) or not image or len(image) > MAX_IMAGE_LENGTH:
        return None
    try:
        return parse_image(image)
    except InvalidReference:
        return None


def pod_images(spec: Mapping[str, Any], status: Mapping[str, Any]) -> tuple[RunningImage, ...]:
    """Every container's image (init, main, ephemeral): by the digest the node reports in
    its status when there is one, else the spec's reference (and the digest it pins).
    Unparseable references are left out (the gate refuses them; nothing to scan)."""
    found: dict[RunningImage, None] = {}
    for spec_field, status_field in _STATUS_FIELDS:
        reported = {s.get("name"): s for s in _dicts(status.get(status_field))}
        for container in _dicts(spec.get(spec_field)):
            ref = _parsed(container.get("image"))
            if ref is None:
                continue
            held = reported.get(container.get("name")) or {}
            digest = digest_of(held.get("imageID")) or ref.digest
            name = ref.name + (f":{ref.tag}" if ref.tag else "")
            found[RunningImage(name, digest)] = None
            if len(found) >= MAX_POD_IMAGES:
                return tuple(found)
    return tuple(found)


def _dicts(value: object) -> Iterator[Mapping[str, Any]]:
    if isinstance(value, list):
        yield from (v for v in value if isinstance(v, dict))


def workload_of(name: str, labels: Mapping[str, Any], owners: object) -> Workload:
    """A Pod's top controller, from the Pod alone.

    The names the controllers write are enough, so the operator watches no ReplicaSets
    or Jobs (a cluster-wide watch of each, and the rights to it, and a ReplicaSet kept
    for every revision of every Deployment): the Deployment controller names each
    ReplicaSet `<deployment>-<pod-template-hash>` and puts that hash on its pods' labels;
    the CronJob controller names each Job `<cronjob>-<scheduled minute>`. A Job a user
    named like that is taken for a CronJob's (its pods are reported under that name)."""
    controller = next((o for o in _dicts(owners) if o.get("controller") is True), None)
    kind = str((controller or {}).get("kind") or "")
    owner = str((controller or {}).get("name") or "")
    if not kind or not owner or kind == "Node":  # bare, or a static pod's mirror
        return Workload("Pod", name)
    if kind == "ReplicaSet":
        template = labels.get("pod-template-hash")
        if isinstance(template, str) and template and owner.endswith(f"-{template}") \
                and len(owner) > len(template) + 1:
            return Workload("Deployment", owner[:-len(template) - 1])
    if kind == "Job" and (made := _CRONJOB_JOB.match(owner)) is not None:
        return Workload("CronJob", made["cronjob"])
    return Workload(kind, owner)


def project_running_pod(obj: Obj) -> RunningPod:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    name = str(meta.get("name") or "")
    labels = meta.get("labels")
    labels = labels if isinstance(labels, dict) else {}
    return RunningPod(str(meta.get("namespace") or ""), name, str(status.get("phase") or ""),
                      workload_of(name, labels, meta.get("ownerReferences")),
                      pod_images(spec if isinstance(spec, dict) else {},
                                 status if isinstance(status, dict) else {}))


_KEPT_METADATA = ("name", "namespace", "uid", "resourceVersion", "generation",
                  "deletionTimestamp", "ownerReferences")
_KEPT_CONTAINER = ("name", "image")
_KEPT_STATUS = ("name", "imageID")


def slim_pod(obj: Obj) -> None:
    """Cut a Pod's body down, in place, to what kopf needs to route it and the projection
    reads, before kopf queues it: kopf keeps each body in its object's worker until the
    worker idles out, and a cluster-wide listing of 10,000 Pods of 10 KiB each would be
    100 MB held at once."""
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        labels = meta.get("labels")
        template = labels.get("pod-template-hash") if isinstance(labels, dict) else None
        for name in [k for k in meta if k not in _KEPT_METADATA]:
            del meta[name]
        if isinstance(template, str):
            meta["labels"] = {"pod-template-hash": template}
    for part, fields, kept in (("spec", [f for f, _ in _STATUS_FIELDS], _KEPT_CONTAINER),
                               ("status", [f for _, f in _STATUS_FIELDS], _KEPT_STATUS)):
        held = obj.get(part)
        if not isinstance(held, dict):
            continue
        slim: Obj = {"phase": held["phase"]} if part == "status" and "phase" in held else {}
        for name in fields:
            if isinstance(held.get(name), list):
                slim[name] = [{k: c[k] for k in kept if k in c} if isinstance(c, dict) else c
                              for c in held[name][:MAX_POD_IMAGES * 4]]
        held.clear()
        held.update(slim)


def is_running(obj: Obj) -> bool:
    """Whether the store keeps the Pod (what is not running leaves it)."""
    status = obj.get("status")
    return isinstance(status, dict) and status.get("phase") == RUNNING


class RunningIndex:
    """Which images run in which namespace, counted by pod: the inventory asks for a scan
    of an image when it starts running in a namespace (not for each pod of a Deployment
    with 100 replicas), and forgets it when its last pod there stops."""

    def __init__(self) -> None:
        self.pods: dict[Key, RunningPod] = {}
        self._uses: dict[tuple[str, str], int] = {}
        self._by_key: dict[str, dict[str, RunningImage]] = {}
        """image key (digest or reference) -> namespace -> the image."""
        self._by_namespace: dict[str, dict[str, RunningImage]] = {}
        """namespace -> image key -> the image (a namespace's labels changed)."""

    def update(self, pod: RunningPod, gone: bool) -> list[tuple[str, RunningImage]]:
        """Take a pod's change; the (namespace, image) pairs that started running."""
        old = self.pods.pop(pod.key, None)
        if not gone:
            self.pods[pod.key] = pod
        before = {i.key: i for i in old.images} if old is not None else {}
        after = {i.key: i for i in pod.images} if not gone else {}
        for key in before.keys() - after.keys():
            self._release(pod.namespace, key)
        started = []
        for key in after.keys() - before.keys():
            use = (pod.namespace, key)
            self._uses[use] = self._uses.get(use, 0) + 1
            if self._uses[use] == 1:
                self._by_key.setdefault(key, {})[pod.namespace] = after[key]
                self._by_namespace.setdefault(pod.namespace, {})[key] = after[key]
                started.append((pod.namespace, after[key]))
        return started

    def _release(self, namespace: str, key: str) -> None:
        use = (namespace, key)
        left = self._uses.get(use, 0) - 1
        if left > 0:
            self._uses[use] = left
            return
        self._uses.pop(use, None)
        for index, outer, inner in ((self._by_key, key, namespace),
                                    (self._by_namespace, namespace, key)):
            held = index.get(outer, {})
            held.pop(inner, None)
            if not held:
                index.pop(outer, None)

    def running(self, namespace: str, key: str) -> bool:
        return (namespace, key) in self._uses

    def images(self) -> Iterator[tuple[str, RunningImage]]:
        """Each (namespace, image) running now, once."""
        for held in self._by_key.values():
            yield from held.items()

    def where(self, key: str) -> list[tuple[str, RunningImage]]:
        """The namespaces where an image (digest or reference) runs."""
        return list(self._by_key.get(key, {}).items())

    def in_namespace(self, namespace: str) -> list[RunningImage]:
        """The images running in a namespace."""
        return list(self._by_namespace.get(namespace, {}).values())

    def __len__(self) -> int:
        return len(self._uses)


def verdict_of(decision: Decision) -> str:
    """A decision in one word (VERDICTS): Refused when an Enforce policy would refuse it
    today (break-glass is a workload's, at admission: not counted here), Unscanned when no
    result speaks for it yet, Warned when a Warn or Audit policy fails it, else Admitted
    (also when no policy applies)."""
    if not decision.allowed:
        return VERDICTS[0]
    if decision.needs_scan:
        return VERDICTS[1]
    if decision.violations or decision.audit:
        return VERDICTS[2]
    return VERDICTS[3]


def needs_scan(image: RunningImage, covered: bool, scans: ScanIndex) -> bool:
    """Whether the inventory asks for a scan of a running image: in a namespace scangate
    covers, and by digest only when no ImageScan of that digest exists anywhere, in any
    phase (whoever made it: a rule, the gate, a user; a result is the digest's, a scan in
    progress will be one, a failed one has had its attempts, and a stale one is rescanned
    by the reconciler). An image by tag (the node has not reported its digest) is asked
    for once; its scan resolves the tag."""
    if not covered:
        return False
    if image.digest is None:  # one of its tag (the gate's, pinned when it resolved it)
        return not scans.by_tag(image.reference)
    return not scans.by_digest(image.digest)


# -- Newly vulnerable --------------------------------------------------------------------

WORKLOAD_API_VERSIONS = {"Deployment": "apps/v1", "StatefulSet": "apps/v1",
                         "DaemonSet": "apps/v1", "ReplicaSet": "apps/v1", "Job": "batch/v1",
                         "CronJob": "batch/v1", "Pod": "v1", "ReplicationController": "v1"}
"""The API group of each workload kind an Event can be recorded on."""
NEW_FINDINGS = 20
"""New findings named per image."""


@dataclass(frozen=True)
class Settled:
    """A running image's last verdict with a result (not while a scan is under way), and
    what that result was: the DB it was made with and its findings' IDs."""

    verdict: str
    db_updated_at: datetime | None
    ids: frozenset[str]

    @classmethod
    def of(cls, verdict: str, result: ImageResult | None) -> Settled:
        return cls(verdict, result.db_updated_at if result else None,
                   frozenset(f.id.upper() for f in result.findings) if result else frozenset())


@dataclass(frozen=True)
class NewlyVulnerable:
    """A running image that an Enforce policy admitted and refuses after a rescan with a
    newer vulnerability DB: news for receivers (scangate.notify) and the workloads."""

    namespace: str
    image: str
    digest: str | None
    workloads: tuple[Workload, ...]
    policies: tuple[str, ...]
    """The Enforce policies that refuse it now."""
    findings: tuple[dict[str, str], ...]
    """The findings the earlier result did not have: id, severity, package,
    installedVersion, fixedVersion ("" without a fix)."""
    db_updated_at: datetime

    @property
    def message(self) -> str:
        found = "; ".join(
            f"{f['id']} ({f['severity']}) in {f['package']} {f['installedVersion']}"
            f"{', fixed in ' + f['fixedVersion'] if f['fixedVersion'] else ', no fix yet'}"
            for f in self.findings[:5])
        more = len(self.findings) - 5
        return (f"{self.image} is refused by ScanPolicy {', '.join(self.policies)} since the "
                f"vulnerability DB of {self.db_updated_at:%Y-%m-%d %H:%M} UTC; it was "
                f"admitted before. New findings: {found or 'none kept in status'}"
                f"{f' and {more} more' if more > 0 else ''}. Running in "
                f"{', '.join(str(w) for w in self.workloads[:5])}"
                f"{' …' if len(self.workloads) > 5 else ''} (namespace {self.namespace}).")


def newly_refused(before: Settled | None, decision: Decision, result: ImageResult | None
                  ) -> tuple[tuple[str, ...], tuple[dict[str, str], ...]] | None:
    """(refusing Enforce policies, new findings) when a running image admitted (or only
    warned about) by its last result is refused by a result made with a newer DB; None
    otherwise (a refusal for another reason, such as a policy's change, is not this news;
    nor is a first verdict, which has no before)."""
    if before is None or before.verdict not in ("Admitted", "Warned") or decision.allowed:
        return None
    if (result is None or result.db_updated_at is None or before.db_updated_at is None
            or result.db_updated_at <= before.db_updated_at):
        return None
    policies = tuple(sorted({v.policy for v in decision.violations
                             if v.effect is Effect.ENFORCE and not v.overridden}))
    new = tuple({"id": f.id, "severity": f.severity, "package": f.package,
                 "installedVersion": f.installed_version or "",
                 "fixedVersion": f.fixed_version or ""}
                for f in result.findings if f.id.upper() not in before.ids)[:NEW_FINDINGS]
    return policies, new
