from __future__ import annotations

from datetime import timedelta

import pytest

from scangate.core.durations import parse_duration
from scangate.core.images import InvalidReference, parse_image

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("reference", "normalised"), [
    ("nginx", "docker.io/library/nginx:latest"),
    ("nginx:1.25", "docker.io/library/nginx:1.25"),
    ("index.docker.io/bitnami/redis:7", "docker.io/bitnami/redis:7"),
    ("127.0.0.1:5000/team-a/api:v1", "127.0.0.1:5000/team-a/api:v1"),
    ("localhost/foo", "localhost/foo:latest"),
    (f"ghcr.io/org/app@{DIGEST}", f"ghcr.io/org/app@{DIGEST}"),
    (f"ghcr.io/org/app:1.0@{DIGEST}", f"ghcr.io/org/app:1.0@{DIGEST}"),
    # HTTPS's own port and the host's case make no other registry (as a resolver reaches it).
    ("registry.example.com:443/a/b/c:tag_1.0-x", "registry.example.com/a/b/c:tag_1.0-x"),
    ("Registry.Example.COM:5000/a:1", "registry.example.com:5000/a:1"),
    ("registry.example.com:80/a:1", "registry.example.com/a:1"),
])
def test_parse_and_normalise(reference: str, normalised: str) -> None:
    assert str(parse_image(reference)) == normalised


def test_parts() -> None:
    ref = parse_image("127.0.0.1:5000/team-a/api:v1")
    assert (ref.registry, ref.repository, ref.namespace, ref.tag) == (
        "127.0.0.1:5000", "team-a/api", "team-a", "v1")


@pytest.mark.parametrize("reference", ["", "Nginx", "a/b:bad tag", "a/b@sha256:xyz",
                                       "a//b", "a/b:" + "x" * 200, "-a/b"])
def test_invalid_references(reference: str) -> None:
    with pytest.raises(InvalidReference):
        parse_image(reference)


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("10m", 600), ("1h30m", 5400), ("7d", 604800), ("1.5h", 5400), ("250ms", 0.25),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "10", "10 minutes", "1w", "m5", "-5m"])
def test_invalid_durations(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["1000000000d", "99999999999999999999999999999s", "3651d",
                                  "3650d1s", "87601h"])
def test_durations_past_the_bound_are_refused_not_overflowed(text: str) -> None:
    # 1000000000d matches the CRD's pattern; timedelta raised OverflowError for it on every
    # relist of a ScanPolicy holding it, and the gate never became ready.
    with pytest.raises(ValueError, match="longer than 3650d"):
        parse_duration(text)


def test_the_bound_itself_is_a_duration() -> None:
    assert parse_duration("3650d") == timedelta(days=3650)
