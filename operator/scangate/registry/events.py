"""Registry push notifications, parsed into the images that were pushed.

Formats, told apart by their shape (the Content-Type only pins the distribution envelope):

- Docker distribution (registry v2) envelopes, `{"events": [...]}`;
- Azure Container Registry webhooks: one distribution-style event, not enveloped;
- Event Grid (Event Grid or CloudEvents 1.0 schema) events for ACR, alone or in a JSON array;
- Harbor webhooks, Default (`type`, `occur_at`, `event_data`) and CloudEvents payloads;
- `{"image": "registry.example.com/team-a/api:v1.2.3"}`.

Events that are not image pushes (pulls, deletes, blob pushes, scans, chart pushes) are
skipped rather than refused: a sender that gets errors for them retries and backs up its
queue. Messages say which field is wrong, never quoting it: the body is the sender's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from scangate.core.images import InvalidReference, parse_image

MAX_EVENTS = 1000
"""Events one body may carry, pushes or not; each image pushed may start a scan."""

MANIFEST_MEDIA_TYPES = frozenset({
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    # Schema 1: old registries still notify its pushes, and they name an image all the same.
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
})
"""Target media types of a manifest or index push; anything else (layers, configs) is a blob."""

DISTRIBUTION_EVENTS_TYPES = frozenset({
    "application/vnd.docker.distribution.events.v1+json",  # distribution 2.x
    "application/vnd.docker.distribution.events.v2+json",  # distribution 3
})

ACR_IMAGE_PUSHED = "Microsoft.ContainerRegistry.ImagePushed"
HARBOR_PUSH_ARTIFACT = "PUSH_ARTIFACT"  # Harbor's Default payload `type`
HARBOR_ARTIFACT_PUSHED = "harbor.artifact.pushed"  # its CloudEvents `type`

_HOST = re.compile(  # a name or [IPv6], and an optional port
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


class PushEventError(ValueError):
    """A push notification that cannot be read."""


@dataclass(frozen=True)
class PushedImage:
    """An image a push notification names."""

    host: str
    """Registry host[:port] as the event gives it; "" when the event does not say."""
    repository: str
    tag: str | None
    digest: str | None


def parse_push_events(body: bytes, content_type: str | None = None) -> list[PushedImage]:
    """The images pushed according to a notification body, each once, in body order."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser
        raise PushEventError(f"push event body is not valid JSON ({type(e).__name__})") from None
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if media_type in DISTRIBUTION_EVENTS_TYPES and not (isinstance(doc, dict) and "events" in doc):
        raise PushEventError(f"a {media_type} body must be an object with `events`")
    images: dict[PushedImage, None] = {}  # a dict: unique, and in order
    for count, image in enumerate(_events(doc), start=1):
        if count > MAX_EVENTS:
            raise PushEventError(f"push event body has more than {MAX_EVENTS} events")
        if image is not None:
            images[image] = None
    return list(images)


def _events(doc: object) -> Iterator[PushedImage | None]:
    """One item per event in the body: the image it pushed, or None for any other event."""
    if isinstance(doc, list):
        for i, item in enumerate(doc):
            event = _object(item, f"$[{i}]")
            if "eventType" not in event and "specversion" not in event:
                raise PushEventError(f"$[{i}]: not an Event Grid event or a CloudEvent")
            yield from _typed_event(event, f"$[{i}]")
    elif not isinstance(doc, dict):
        raise PushEventError(f"push event body must be a JSON object or array, not {_kind(doc)}")
    elif "events" in doc:
        for i, item in enumerate(_list(doc["events"], "$.events")):
            yield _registry_event(_object(item, f"$.events[{i}]"), f"$.events[{i}]")
    elif "eventType" in doc or "specversion" in doc:
        yield from _typed_event(doc, "$")
    elif "event_data" in doc or "occur_at" in doc:
        if _required_text(doc, "type", "$") == HARBOR_PUSH_ARTIFACT:
            yield from _harbor(_object(doc.get("event_data"), "$.event_data"), "$.event_data")
        else:
            yield None
    elif "action" in doc or "target" in doc:
        yield _registry_event(doc, "$")
    elif "image" in doc:
        yield _plain(doc)
    else:
        raise PushEventError("push event body is in no known format")


def _typed_event(event: dict[str, Any], where: str) -> Iterator[PushedImage | None]:
    """An Event Grid event (`eventType`) or a CloudEvent (`type`), from ACR or Harbor."""
    kind = _required_text(event, "eventType" if "eventType" in event else "type", where)
    if kind == ACR_IMAGE_PUSHED:
        yield _registry_event(_object(event.get("data"), f"{where}.data"), f"{where}.data")
    elif kind == HARBOR_ARTIFACT_PUSHED:
        yield from _harbor(_object(event.get("data"), f"{where}.data"), f"{where}.data")
    else:
        yield None


def _registry_event(event: dict[str, Any], where: str) -> PushedImage | None:
    """A distribution notification event; ACR's webhook and Event Grid data have its shape."""
    if _required_text(event, "action", where) != "push":  # pull, mount, delete; ACR chart_push
        return None
    target = _object(event.get("target"), f"{where}.target")
    media_type = _text(target, "mediaType", f"{where}.target")
    url = _text(target, "url", f"{where}.target") or ""
    if media_type not in MANIFEST_MEDIA_TYPES or "/blobs/" in url:
        return None
    request = event.get("request")  # distribution omits it when empty
    host = None
    if request is not None:
        host = _text(_object(request, f"{where}.request"), "host", f"{where}.request")
    return _image(
        where,
        host or "",
        _required_text(target, "repository", f"{where}.target"),
        _text(target, "tag", f"{where}.target"),
        _text(target, "digest", f"{where}.target"),
    )


def _harbor(data: dict[str, Any], where: str) -> Iterator[PushedImage]:
    """Harbor's event data: the same in its Default and CloudEvents payloads."""
    repository = _required_text(
        _object(data.get("repository"), f"{where}.repository"), "repo_full_name",
        f"{where}.repository")
    for i, item in enumerate(_list(data.get("resources"), f"{where}.resources")):
        at = f"{where}.resources[{i}]"
        resource = _object(item, at)
        digest = _text(resource, "digest", at)
        tag = _text(resource, "tag", at)
        if tag == digest:  # Harbor names an untagged artifact by its digest in `tag`
            tag = None
        # resource_url is `<external host[:port]>/<repo_full_name>(:tag|@digest)`.
        url = _text(resource, "resource_url", at) or ""
        yield _image(at, url.partition("/")[0] if "/" in url else "", repository, tag, digest)


def _plain(doc: dict[str, Any]) -> PushedImage:
    reference = _required_text(doc, "image", "$")
    try:
        ref = parse_image(reference)
    except InvalidReference:
        raise PushEventError("$.image: not a valid image reference") from None
    return PushedImage(ref.registry, ref.repository, ref.tag, ref.digest)


def _image(where: str, host: str, repository: str, tag: str | None,
           digest: str | None) -> PushedImage:
    if tag is None and digest is None:
        raise PushEventError(f"{where}: names neither a tag nor a digest")
    port = host.rpartition("]")[2].partition(":")[2]
    if host and (not _HOST.fullmatch(host) or (port and not 0 < int(port) <= 65535)):
        raise PushEventError(f"{where}: registry host is not host[:port]")
    # The grammar is parse_image's. The placeholder registry keeps the repository as the event
    # names it (no Docker Hub normalisation); the round trip refuses what parse_image would
    # quietly read otherwise, such as surrounding blanks or a `:` inside the repository.
    reference = f"localhost/{repository}" + (f":{tag}" if tag else "") + (
        f"@{digest}" if digest else "")
    try:
        ref = parse_image(reference)
    except InvalidReference:
        ref = None
    if ref is None or (ref.repository, ref.tag, ref.digest) != (repository, tag, digest):
        raise PushEventError(f"{where}: repository, tag or digest is not image reference grammar")
    return PushedImage(host, repository, tag, digest)


def _object(value: object, where: str) -> dict[str, Any]:
    if value is None:
        raise PushEventError(f"{where}: missing")
    if not isinstance(value, dict):
        raise PushEventError(f"{where}: must be an object, not {_kind(value)}")
    return value


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        raise PushEventError(f"{where}: missing")
    if not isinstance(value, list):
        raise PushEventError(f"{where}: must be an array, not {_kind(value)}")
    return value


def _text(obj: dict[str, Any], key: str, where: str) -> str | None:
    """An optional string field; absent, null and "" (Go's zero value) all read as None."""
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise PushEventError(f"{where}.{key}: must be a string, not {_kind(value)}")
    return value or None


def _required_text(obj: dict[str, Any], key: str, where: str) -> str:
    value = _text(obj, key, where)
    if value is None:
        raise PushEventError(f"{where}.{key}: missing")
    return value


def _kind(value: object) -> str:
    """The JSON type of a parsed value, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
