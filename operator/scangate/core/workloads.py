"""What the admission webhook judges in a workload: its pod spec, images and who sent it.

The objects come straight from AdmissionReview requests, so every field is read
defensively: a value of the wrong type counts as absent and nothing here raises.
Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from scangate.core.images import InvalidReference, parse_image

ContainerKind = Literal["initContainer", "container", "ephemeralContainer"]

MAX_CONTAINERS = 1000
"""More containers than this in one request are refused unparsed (the work stays bounded)."""
MAX_IMAGE_LENGTH = 4096
"""Longer image strings are refused unparsed."""

# Where each kind keeps its pod spec. Kinds not listed have none.
_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    **{kind: ("spec", "template", "spec") for kind in (
        "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "ReplicationController", "Job")},
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
# Pod spec field -> the word that names its containers in messages; init first because
# that is the order the kubelet runs them.
_CONTAINER_FIELDS: tuple[tuple[str, ContainerKind], ...] = (
    ("initContainers", "initContainer"),
    ("containers", "container"),
    ("ephemeralContainers", "ephemeralContainer"),
)
_KUBE_SYSTEM_SA = "system:serviceaccount:kube-system:"
_KUBE_SYSTEM_SA_GROUP = "system:serviceaccounts:kube-system"
_CONTROLLER_MANAGER = "system:kube-controller-manager"


@dataclass(frozen=True)
class ContainerImage:
    """One container's image, as written in the object."""

    container: str
    kind: ContainerKind
    image: str
    path: str = field(default="", compare=False)
    """JSON pointer to the image in the object, e.g. /spec/template/spec/containers/0/image
    (for a patch that pins it to its digest)."""

    @property
    def label(self) -> str:
        """How messages name the container, e.g. `initContainer "setup"`."""
        return f"{self.kind} {_quote(self.container)}"


@dataclass(frozen=True)
class Reference:
    """One container's image after parsing: exactly one of normalised and error is set."""

    image: ContainerImage
    normalised: str | None
    error: str | None

    @property
    def written(self) -> str:
        return self.image.image


@dataclass(frozen=True)
class Normalised:
    """The images of a request, ready to judge."""

    references: dict[str, list[ContainerImage]] = field(default_factory=dict)
    """Each unique normalised reference -> the containers that use it, in first-seen order."""
    errors: list[str] = field(default_factory=list)
    """Why images could not be judged, each naming its container; any error refuses."""


def _walk(obj: object, path: Sequence[str]) -> Mapping[str, Any] | None:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj if isinstance(obj, Mapping) else None


def pod_spec(kind: str, obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pod spec of a workload object of `kind`; None for other kinds or a malformed object."""
    path = _SPEC_PATHS.get(kind)
    return None if path is None else _walk(obj, path)


def container_images(spec: Mapping[str, Any] | None, at: str = "") -> list[ContainerImage]:
    """Every init, regular and ephemeral container's image; entries without a string image
    are skipped (the API server's own validation refuses them). `at`: the JSON pointer of
    the pod spec in its object."""
    if not isinstance(spec, Mapping):
        return []
    found = []
    for key, kind in _CONTAINER_FIELDS:
        entries = spec.get(key)
        if not isinstance(entries, list):
            continue
        for i, entry in enumerate(entries):
            if isinstance(entry, Mapping) and isinstance(entry.get("image"), str):
                name = entry.get("name")
                found.append(ContainerImage(name if isinstance(name, str) else "", kind,
                                            entry["image"], f"{at}/{key}/{i}/image"))
    return found


def new_images(kind: str, obj: Mapping[str, Any],
               old_obj: Mapping[str, Any] | None) -> list[ContainerImage]:
    """The images a request brings: all on CREATE; on UPDATE those written nowhere in the
    old object, so that scaling or relabelling an admitted workload judges nothing and a
    policy tightened since cannot stop it from being scaled down."""
    at = "".join(f"/{key}" for key in _SPEC_PATHS.get(kind, ()))
    images = container_images(pod_spec(kind, obj), at)
    if old_obj is None:
        return images
    # Any container of the old object counts: an image moved between containers was admitted.
    old = {i.image for i in container_images(pod_spec(kind, old_obj))}
    return [i for i in images if i.image not in old]


def _quote(text: str, limit: int = 100) -> str:
    # JSON quoting escapes control characters; long strings are cut so messages stay short.
    return json.dumps(text if len(text) <= limit else text[:limit] + "...")


def reference(image: ContainerImage) -> Reference:
    """Parse one container's image; the error names the container."""
    written = image.image
    if len(written) > MAX_IMAGE_LENGTH:
        return Reference(image, None, f"{image.label}: image of {len(written)} characters is "
                                      f"longer than {MAX_IMAGE_LENGTH}")
    try:
        return Reference(image, str(parse_image(written)), None)
    except InvalidReference as e:
        return Reference(image, None,
                         f"{image.label}: image {_quote(written)} is not a valid reference: {e}")


def normalise(images: Iterable[ContainerImage]) -> Normalised:
    """Parse and dedupe images: `nginx` and `docker.io/library/nginx:latest` are one reference.

    More than MAX_CONTAINERS images yield a single error and nothing parsed.
    """
    images = list(images)
    if len(images) > MAX_CONTAINERS:
        return Normalised(errors=[f"{len(images)} container images to judge: at most "
                                  f"{MAX_CONTAINERS} in one object"])
    references: dict[str, list[ContainerImage]] = {}
    errors: list[str] = []
    for ref in map(reference, images):
        if ref.normalised is not None:
            references.setdefault(ref.normalised, []).append(ref.image)
        elif ref.error is not None:
            errors.append(ref.error)
    return Normalised(references, errors)


def _is_controller(user: str, groups: Sequence[str]) -> bool:
    if user == _CONTROLLER_MANAGER:
        return True
    # With --use-service-account-credentials each controller has its own kube-system service
    # account; the API server always adds the namespace's group to such users, so both must
    # agree.
    name = user.removeprefix(_KUBE_SYSTEM_SA)
    return (name != user and bool(name) and ":" not in name
            and _KUBE_SYSTEM_SA_GROUP in groups)


def owned_by_controller_request(obj: Mapping[str, Any], user: str,
                                groups: Sequence[str]) -> bool:
    """True (skip judging) when a Kubernetes controller writes an object it controls: Pods of
    a ReplicaSet, ReplicaSets of a Deployment, Jobs of a CronJob were judged through their
    owner's template. Anyone else writing an ownerReference is judged all the same."""
    if not _is_controller(user, groups):
        return False
    meta = _walk(obj, ("metadata",))
    refs = meta.get("ownerReferences") if meta is not None else None
    return isinstance(refs, list) and any(
        isinstance(r, Mapping) and r.get("controller") is True for r in refs)
