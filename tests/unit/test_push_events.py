"""Push notifications from distribution, Harbor, ACR and Event Grid, parsed into the images
pushed. The samples in tests/data/push copy upstream documented examples (see its README)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from scangate.registry.events import (
    MAX_EVENTS,
    PushedImage,
    PushEventError,
    parse_push_events,
)

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "push"
DISTRIBUTION_V1 = "application/vnd.docker.distribution.events.v1+json"
DISTRIBUTION_V2 = "application/vnd.docker.distribution.events.v2+json"

EXPECTED = {
    # Event 1 only: event 2 is a blob push and event 3 a pull.
    "distribution.json": [PushedImage(
        "127.0.0.1:5000", "team-a/api", "v1.2.3",
        "sha256:fea8895f450959fa676bcc1df0611ea93823a735a01205fd8622846041d0c7cf")],
    "harbor_default.json": [PushedImage(
        "127.0.0.1:5000", "team-a/api", "v1.2.3",
        "sha256:8a9e9863dbb6e10edb5adfe917c00da84e1700fa76e7ed02476aa6e6fb8ee0d8")],
    # Pushed by digest: Harbor repeats the digest in `tag`, which is no tag.
    "harbor_cloudevents.json": [PushedImage(
        "127.0.0.1:5000", "team-a/api", None,
        "sha256:954b378c375d852eb3c63ab88978f640b4348b01c1b3456a024a81536dafbbf4")],
    "acr.json": [PushedImage(
        "myregistry.azurecr.io", "team-a/api", "v1",
        "sha256:213bbc182920ab41e18edc2001e06abcca6735d87782d9cef68abd83941cf0e5")],
    "acr_event_grid.json": [PushedImage(
        "demo.azurecr.io", "team-a/api", "v1",
        "sha256:213bbc182920ab41e18edc2001e06abcca6735d87782d9cef68abd83941cf0e5")],
    "plain.json": [PushedImage("registry.example.com", "team-a/api", "v1.2.3", None)],
}


def sample(name: str) -> Any:
    return json.loads((SAMPLES / name).read_bytes())


def parse(doc: object, content_type: str | None = None) -> list[PushedImage]:
    return parse_push_events(json.dumps(doc).encode(), content_type)


def refused(doc: object, match: str, content_type: str | None = None) -> None:
    with pytest.raises(PushEventError, match=match):
        parse(doc, content_type)


def manifest_push(tag: str | None = "v1", digest: str = "sha256:" + "a" * 64) -> dict[str, Any]:
    """A distribution manifest push event, shaped like the sample's first event."""
    event: dict[str, Any] = copy.deepcopy(sample("distribution.json")["events"][0])
    event["target"]["digest"] = digest
    if tag is None:
        del event["target"]["tag"]
    else:
        event["target"]["tag"] = tag
    return event


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_parses_to_the_images_pushed(name: str) -> None:
    assert sorted(p.name for p in SAMPLES.glob("*.json")) == sorted(EXPECTED)
    assert parse_push_events((SAMPLES / name).read_bytes()) == EXPECTED[name]


@pytest.mark.parametrize("content_type", [
    DISTRIBUTION_V1, DISTRIBUTION_V2, f"{DISTRIBUTION_V2}; charset=utf-8", "application/json"])
def test_distribution_envelope_under_its_media_types(content_type: str) -> None:
    assert parse(sample("distribution.json"), content_type) == EXPECTED["distribution.json"]


def test_distribution_media_type_requires_an_envelope() -> None:
    refused(sample("acr.json"), "must be an object with `events`", DISTRIBUTION_V1)


def test_push_by_digest_has_no_tag() -> None:
    digest = "sha256:" + "b" * 64
    assert parse({"events": [manifest_push(tag=None, digest=digest)]}) == [
        PushedImage("127.0.0.1:5000", "team-a/api", None, digest)]


def test_empty_strings_read_as_absent() -> None:
    # Go's zero value: Harbor's Resource.Tag has no omitempty, so an untagged push may say "".
    doc = sample("harbor_default.json")
    doc["event_data"]["resources"][0]["tag"] = ""
    assert [p.tag for p in parse(doc)] == [None]
    event = manifest_push(tag="")
    event["request"]["host"] = ""
    assert [(p.host, p.tag) for p in parse({"events": [event]})] == [("", None)]


def test_index_and_oci_media_types_are_images_blobs_are_not() -> None:
    events = []
    for i, media_type in enumerate([
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/octet-stream",
    ]):
        event = manifest_push(tag=f"t{i}")
        event["target"]["mediaType"] = media_type
        events.append(event)
    # A manifest media type on a /blobs/ URL is still a blob.
    blob = manifest_push(tag="t9")
    blob["target"]["url"] = "http://127.0.0.1:5000/v2/team-a/api/blobs/sha256:" + "a" * 64
    untyped = manifest_push(tag="t10")
    del untyped["target"]["mediaType"]
    assert [p.tag for p in parse({"events": [*events, blob, untyped]})] == ["t0", "t1", "t2", "t3"]


@pytest.mark.parametrize("action", ["pull", "mount", "delete"])
def test_distribution_non_push_actions_are_ignored(action: str) -> None:
    event = manifest_push()
    event["action"] = action
    assert parse({"events": [event]}) == []


def test_host_is_empty_when_the_event_has_none() -> None:
    event = manifest_push()
    del event["request"]
    no_host = manifest_push(tag="v2")
    del no_host["request"]["host"]
    assert [p.host for p in parse({"events": [event, no_host]})] == ["", ""]


def test_duplicates_are_returned_once_in_order() -> None:
    first, second = manifest_push(tag="v1"), manifest_push(tag="v2")
    assert parse({"events": [first, second, copy.deepcopy(first), second]}) == [
        PushedImage("127.0.0.1:5000", "team-a/api", tag, "sha256:" + "a" * 64)
        for tag in ("v1", "v2")]
    grid = sample("acr_event_grid.json")
    assert parse(grid * 3) == EXPECTED["acr_event_grid.json"]


def test_same_repository_on_another_host_is_another_image() -> None:
    other = manifest_push()
    other["request"]["host"] = "registry.example.com"
    assert len(parse({"events": [manifest_push(), other]})) == 2


def test_acr_event_grid_cloudevents_schema() -> None:
    # The CloudEvents tab of the same Azure page: type/source/time/specversion.
    event = sample("acr_event_grid.json")[0]
    cloud = {"id": event["id"], "source": event["topic"], "subject": event["subject"],
             "type": event["eventType"], "time": event["eventTime"], "data": event["data"],
             "specversion": "1.0"}
    assert parse([cloud]) == parse(cloud) == EXPECTED["acr_event_grid.json"]


def test_acr_single_event_grid_event_without_array() -> None:
    assert parse(sample("acr_event_grid.json")[0]) == EXPECTED["acr_event_grid.json"]


@pytest.mark.parametrize("event_type", [
    "Microsoft.ContainerRegistry.ImageDeleted",
    "Microsoft.ContainerRegistry.ChartPushed",
    "Microsoft.EventGrid.SubscriptionValidationEvent",
])
def test_other_event_grid_types_are_ignored(event_type: str) -> None:
    event = sample("acr_event_grid.json")[0]
    event["eventType"] = event_type
    assert parse([event]) == []


@pytest.mark.parametrize("action", ["chart_push", "delete", "chart_delete"])
def test_acr_non_image_push_actions_are_ignored(action: str) -> None:
    event = sample("acr.json")
    event["action"] = action
    assert parse(event) == []


@pytest.mark.parametrize("harbor_type", [
    "PULL_ARTIFACT", "DELETE_ARTIFACT", "SCANNING_COMPLETED", "QUOTA_EXCEED", "REPLICATION"])
def test_harbor_default_non_push_types_are_ignored(harbor_type: str) -> None:
    doc = sample("harbor_default.json")
    doc["type"] = harbor_type
    assert parse(doc) == []
    # Whatever their event_data holds, or lacks.
    assert parse({"type": harbor_type, "occur_at": 1680502598, "operator": "auto",
                  "event_data": {"replication": {"job_status": "Success"}}}) == []


@pytest.mark.parametrize("harbor_type", [
    "harbor.artifact.pulled", "harbor.artifact.deleted", "harbor.scan.completed",
    "harbor.replication.status.changed"])
def test_harbor_cloudevents_non_push_types_are_ignored(harbor_type: str) -> None:
    doc = sample("harbor_cloudevents.json")
    doc["type"] = harbor_type
    assert parse(doc) == []


def test_harbor_several_resources_and_a_missing_resource_url() -> None:
    doc = sample("harbor_default.json")
    resource = doc["event_data"]["resources"][0]
    doc["event_data"]["resources"] = [resource, {"digest": resource["digest"], "tag": "latest"}]
    assert [(p.host, p.tag) for p in parse(doc)] == [("127.0.0.1:5000", "v1.2.3"), ("", "latest")]


def test_plain_image_is_normalised_by_parse_image() -> None:
    assert parse({"image": "nginx"}) == [PushedImage("docker.io", "library/nginx", "latest", None)]
    digest = "sha256:" + "c" * 64
    assert parse({"image": f"127.0.0.1:5000/team-a/api@{digest}"}) == [
        PushedImage("127.0.0.1:5000", "team-a/api", None, digest)]


@pytest.mark.parametrize("body", [
    b"", b"{", b"{'events': []}", b'{"events": [}', b"\xff\xfe\x00", b"[" * 100_000])
def test_malformed_json_is_refused(body: bytes) -> None:
    with pytest.raises(PushEventError, match="not valid JSON"):
        parse_push_events(body)


@pytest.mark.parametrize("doc", ["push", 42, 1.5, True, None])
def test_top_level_scalars_are_refused(doc: object) -> None:
    refused(doc, "must be a JSON object or array")


@pytest.mark.parametrize(("doc", "match"), [
    ([1, 2], r"\$\[0\]: must be an object, not a number"),
    (["push"], r"\$\[0\]: must be an object, not a string"),
    ([{"image": "nginx"}], r"\$\[0\]: not an Event Grid event or a CloudEvent"),
    ([sample("distribution.json")], r"\$\[0\]: not an Event Grid event"),
    ([sample("acr_event_grid.json")[0], None], r"\$\[1\]: missing"),
])
def test_arrays_of_wrong_things_are_refused(doc: object, match: str) -> None:
    refused(doc, match)


@pytest.mark.parametrize("doc", [{}, {"foo": 1}, {"name": "team-a/api", "tag": "v1"}])
def test_unknown_format_is_refused(doc: object) -> None:
    refused(doc, "no known format")


def _without_target() -> dict[str, Any]:
    event = manifest_push()
    del event["target"]
    return event


@pytest.mark.parametrize(("doc", "match"), [
    ({"events": [_without_target()]}, r"\$\.events\[0\]\.target: missing"),
    ({"action": "push", "request": {"host": "myregistry.azurecr.io"}}, r"\$\.target: missing"),
    ({"events": [{"target": {}}]}, r"\$\.events\[0\]\.action: missing"),
    ([{"eventType": "Microsoft.ContainerRegistry.ImagePushed"}], r"\$\[0\]\.data: missing"),
    ({"type": "PUSH_ARTIFACT", "occur_at": 1}, r"\$\.event_data: missing"),
    ({"type": "PUSH_ARTIFACT", "event_data": {"resources": []}},
     r"\$\.event_data\.repository: missing"),
    ({"type": "PUSH_ARTIFACT", "event_data": {"repository": {"repo_full_name": "team-a/api"}}},
     r"\$\.event_data\.resources: missing"),
    ({"occur_at": 1586922308, "event_data": {}}, r"\$\.type: missing"),
])
def test_missing_required_fields_are_refused(doc: object, match: str) -> None:
    refused(doc, match)


def test_missing_repository_and_reference_are_refused() -> None:
    event = manifest_push()
    del event["target"]["repository"]
    refused({"events": [event]}, r"\$\.events\[0\]\.target\.repository: missing")
    event = manifest_push(tag=None)
    del event["target"]["digest"]
    refused({"events": [event]}, r"\$\.events\[0\]: names neither a tag nor a digest")
    harbor = sample("harbor_default.json")
    harbor["event_data"]["resources"] = [{"resource_url": "127.0.0.1:5000/team-a/api"}]
    refused(harbor, r"resources\[0\]: names neither a tag nor a digest")


def _with_target(**fields: object) -> dict[str, Any]:
    event = manifest_push()
    event["target"].update(fields)
    return {"events": [event]}


@pytest.mark.parametrize(("doc", "match"), [
    (_with_target(tag=123), r"\$\.events\[0\]\.target\.tag: must be a string, not a number"),
    (_with_target(repository=["team-a/api"]),
     r"target\.repository: must be a string, not an array"),
    (_with_target(digest={"sha256": "a"}), r"target\.digest: must be a string, not an object"),
    (_with_target(mediaType=True), r"target\.mediaType: must be a string, not a boolean"),
    ({"events": {"0": manifest_push()}}, r"\$\.events: must be an array, not an object"),
    ({"events": [manifest_push() | {"target": "team-a/api:v1"}]},
     r"\$\.events\[0\]\.target: must be an object, not a string"),
    ({"events": [manifest_push() | {"request": ["127.0.0.1:5000"]}]},
     r"\$\.events\[0\]\.request: must be an object, not an array"),
    ({"events": [manifest_push() | {"action": 1}]}, r"\$\.events\[0\]\.action: must be a string"),
    ({"image": 7}, r"\$\.image: must be a string, not a number"),
    ([{"eventType": None, "type": 5}], r"\$\[0\]\.eventType: missing"),
    ({"specversion": "1.0", "type": 5}, r"\$\.type: must be a string, not a number"),
    ({"specversion": "1.0", "type": "harbor.artifact.pushed", "data": []},
     r"\$\.data: must be an object, not an array"),
])
def test_wrong_types_are_refused(doc: object, match: str) -> None:
    refused(doc, match)


def test_harbor_wrong_types_are_refused() -> None:
    doc = sample("harbor_cloudevents.json")
    doc["data"]["resources"][0]["tag"] = 1
    refused(doc, r"\$\.data\.resources\[0\]\.tag: must be a string, not a number")
    doc = sample("harbor_default.json")
    doc["event_data"]["resources"] = {"digest": "sha256:" + "a" * 64}
    refused(doc, r"\$\.event_data\.resources: must be an array, not an object")
    doc = sample("harbor_default.json")
    doc["event_data"]["repository"]["repo_full_name"] = None
    refused(doc, r"\$\.event_data\.repository\.repo_full_name: missing")


@pytest.mark.parametrize(("target", "request_host"), [
    ({"tag": "v1 "}, "127.0.0.1:5000"),
    ({"tag": "has space"}, "127.0.0.1:5000"),
    ({"tag": "-leading-dash"}, "127.0.0.1:5000"),
    ({"repository": "Team-A/API"}, "127.0.0.1:5000"),
    ({"repository": "team-a/api:v1"}, "127.0.0.1:5000"),
    # parse_image would read these as valid, but not as what the event says.
    ({"repository": "team-a/api:v1", "tag": None}, "127.0.0.1:5000"),
    ({"digest": "sha256:" + "a" * 64 + " "}, "127.0.0.1:5000"),
    ({"repository": "../etc/passwd"}, "127.0.0.1:5000"),
    ({"digest": "sha256:0123456789abcdef0"}, "127.0.0.1:5000"),
    ({}, "127.0.0.1:5000/evil"),
    ({}, "registry example"),
])
def test_values_outside_the_reference_grammar_are_refused(
        target: dict[str, str | None], request_host: str) -> None:
    doc = _with_target(**target)
    doc["events"][0]["request"]["host"] = request_host
    with pytest.raises(PushEventError, match=r"\$\.events\[0\]: ") as e:
        parse(doc)
    # The message names the field, never quoting the sender's value.
    for value in [*target.values(), request_host]:
        assert value is None or value not in str(e.value)


def test_plain_invalid_reference_is_refused_without_quoting_it() -> None:
    with pytest.raises(PushEventError, match=r"\$\.image: not a valid image reference") as e:
        parse({"image": "Registry.Example.com/TEAM/api::v1"})
    assert "TEAM" not in str(e.value)


def test_more_than_max_events_are_refused() -> None:
    blob = sample("distribution.json")["events"][1]
    assert parse({"events": [blob] * MAX_EVENTS}) == []
    refused({"events": [blob] * (MAX_EVENTS + 1)}, f"more than {MAX_EVENTS} events")
    grid = sample("acr_event_grid.json")[0]
    refused([grid] * (MAX_EVENTS + 1), f"more than {MAX_EVENTS} events")
    harbor = sample("harbor_default.json")
    harbor["event_data"]["resources"] *= MAX_EVENTS + 1
    refused(harbor, f"more than {MAX_EVENTS} events")


def test_error_is_a_value_error() -> None:
    assert issubclass(PushEventError, ValueError)
