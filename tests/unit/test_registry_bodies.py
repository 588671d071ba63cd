"""A registry answering with hostile bodies: RegistryError saying what was wrong,
never a JSON or KeyError, never the body quoted.

The registry is a tiny real HTTP server on 127.0.0.1 that answers each path with a
fixed response, not a mocked transport: the client runs its real httpx stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import re
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from scangate.core.images import parse_image
from scangate.registry import client as registry_client
from scangate.registry.client import (
    IMAGE_TYPES,
    INDEX_TYPES,
    MANIFEST_LIMIT,
    PAGE_LIMIT,
    TOKEN_LIMIT,
    ImageNotFound,
    RegistryAuthError,
    RegistryClient,
    RegistryError,
    RegistryUnavailable,
    Resolved,
)

MARKER = "HOSTILE-BODY"
"""In every hostile body: an error message must not quote it."""

Body = bytes | Iterator[bytes]
"""Bytes are sent with a Content-Length; an iterator's chunks until it ends or the
client hangs up, the end of the body being the end of the connection (HTTP/1.0)."""
Answer = tuple[int, dict[str, str], Body]


@dataclass(frozen=True)
class Seen:
    """A request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]


Responder = Callable[[Seen], Answer]


class Registry(ThreadingHTTPServer):
    """Answers each path (with or without its query) as told; 404 otherwise."""

    answers: dict[str, Answer | Responder]
    seen: list[Seen]
    written: int
    """Bytes of iterator bodies sent so far."""
    url: str

    def answer(self, path: str, body: Any, status: int = 200, **headers: str) -> None:
        self.answers[path] = reply(body, status, **headers)


def reply(body: Any, status: int = 200, **headers: str) -> Answer:
    """`headers` as keywords: Docker_Content_Digest is Docker-Content-Digest."""
    data = body if isinstance(body, bytes | Iterator) else json.dumps(body).encode()
    return status, {k.replace("_", "-"): v for k, v in headers.items()}, data


class Handler(BaseHTTPRequestHandler):
    server: Registry

    def do_GET(self) -> None:
        seen = Seen(self.command, self.path, dict(self.headers))
        self.server.seen.append(seen)
        answer = self.server.answers.get(
            self.path, self.server.answers.get(self.path.split("?")[0], (404, {}, b"{}")))
        status, headers, body = answer(seen) if callable(answer) else answer
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if isinstance(body, bytes):  # a HEAD too: a registry sends the GET's length
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if isinstance(body, bytes):
            self.wfile.write(body)
            return
        with contextlib.suppress(OSError):  # the client hung up
            for chunk in body:
                self.wfile.write(chunk)
                self.server.written += len(chunk)

    do_HEAD = do_GET

    def log_message(self, *_: Any) -> None:
        pass


@contextlib.contextmanager
def serve(bind: str = "127.0.0.1", name: str | None = None,
          tls: ssl.SSLContext | None = None) -> Iterator[Registry]:
    """A registry on `bind`, port 0, called `name` in its URL (localhost for 127.0.0.1 is
    another host to a client)."""
    server = Registry((bind, 0), Handler)
    server.answers, server.seen, server.written = {}, [], 0
    if tls:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    server.url = f"{'https' if tls else 'http'}://{name or bind}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for proxy in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                  "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)


@pytest.fixture
def registry() -> Iterator[Registry]:
    with serve() as server:
        yield server


REF = parse_image("127.0.0.1/team/app:1.0")
MANIFEST = "/v2/team/app/manifests/1.0"
TAGS = "/v2/team/app/tags/list"
DIGEST = "sha256:" + "a" * 64


def run(registry: Registry | str, call: str, *args: Any, **options: Any) -> Any:
    """`call` of a RegistryClient(registry, **options)."""
    async def go() -> Any:
        url = registry if isinstance(registry, str) else registry.url
        async with RegistryClient(url, **options) as client:
            result = getattr(client, call)(*args)
            if hasattr(result, "__aiter__"):  # the catalog, page by page
                return [item async for page in result for item in page]
            return await result
    return asyncio.run(go())


def refused(registry: Registry | str, call: str, *args: Any,
            error: type[RegistryError] = RegistryError, **options: Any) -> str:
    with pytest.raises(error) as caught:
        run(registry, call, *args, **options)
    assert MARKER not in str(caught.value)
    return str(caught.value)


def index(*manifests: Any) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": INDEX_TYPES[0], "manifests": list(manifests)}


def entry(platform: Any, digest: str = DIGEST) -> dict[str, Any]:
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
            "size": 1, "platform": platform}


@pytest.mark.parametrize(("body", "message"), [
    (f"<html>{MARKER}</html>".encode(), "Invalid JSON"),
    (b"\xff\xfe" + MARKER.encode(), "Invalid JSON"),
    (b"[" * 10_000, "Invalid JSON"),
    ([MARKER], "Input should be an object"),
    ({"mediaType": [MARKER]}, "mediaType: Input should be a valid string"),
    (index({"mediaType": MARKER, "size": 1}), r"manifests\[0\].digest: Field required"),
    (index({"digest": DIGEST}), r"manifests\[0\].mediaType: Field required"),
    (index(entry(f"linux/amd64 {MARKER}")), r"manifests\[0\].platform: Input should be"),
    (index(entry({"os": ["linux"], "architecture": MARKER})), r"manifests\[0\].platform.os:"),
    ({"manifests": MARKER}, "manifests: Input should be a valid array"),
])
def test_hostile_manifests(registry: Registry, body: Any, message: str) -> None:
    registry.answer(MANIFEST, body, Docker_Content_Digest=DIGEST)
    text = refused(registry, "resolve", REF)
    assert text.startswith(f"the manifest of {REF} from {registry.url} is malformed: ")
    assert re.search(message, text), text


def test_an_index_is_still_resolved(registry: Registry) -> None:
    registry.answer(MANIFEST, index(entry({"os": "linux", "architecture": "amd64"}),
                                    entry({"os": "linux", "architecture": "arm64",
                                           "variant": "v8"}, "sha256:" + "b" * 64)),
                    Docker_Content_Digest=DIGEST)
    assert run(registry, "resolve", REF, "linux/arm64/v8") == Resolved(
        "sha256:" + "b" * 64, "application/vnd.oci.image.manifest.v1+json", DIGEST)
    with pytest.raises(ImageNotFound, match=r"has: linux/amd64, linux/arm64\)"):
        run(registry, "resolve", REF, "linux/s390x")


@pytest.mark.parametrize(("path", "call", "body"), [
    (TAGS, "tags", f"{MARKER}".encode()),
    (TAGS, "tags", {"tags": MARKER}),
    (TAGS, "tags", {"tags": [1, 2]}),
    (TAGS, "tags", [MARKER]),
    ("/v2/_catalog", "catalog", f"not json {MARKER}".encode()),
    ("/v2/_catalog", "catalog", {"repositories": {MARKER: 1}}),
])
def test_hostile_tag_lists_and_catalogs(registry: Registry, path: str, call: str,
                                        body: Any) -> None:
    registry.answer(path, body)
    args = ("team/app",) if call == "tags" else ()
    assert "is malformed: " in refused(registry, call, *args)


def test_pagination_is_followed_but_a_loop_is_refused(registry: Registry) -> None:
    registry.answer(f"{TAGS}?n=1000", {"tags": ["a"]}, Link=f'<{TAGS}?last=a>; rel="next"')
    registry.answer(f"{TAGS}?last=a", {"tags": ["b"], "name": "team/app"})
    assert run(registry, "tags", "team/app") == ["a", "b"]
    registry.answer(f"{TAGS}?last=a", {"tags": ["b"]}, Link=f'<{TAGS}?n=1000>; rel="next"')
    assert "in a loop" in refused(registry, "tags", "team/app")


def test_a_link_that_is_not_http_is_refused(registry: Registry) -> None:
    registry.answer(TAGS, {"tags": ["a"]}, Link='<ftp://elsewhere/x>; rel="next"')
    assert "not an http(s) URL" in refused(registry, "tags", "team/app")


def challenge(registry: Registry, realm: str) -> None:
    registry.answer(MANIFEST, {"errors": []}, 401,
                    WWW_Authenticate=f'Bearer realm="{realm}",service="r"')


@pytest.mark.parametrize("body", [
    f"<html>{MARKER}</html>".encode(),
    [MARKER],
    {"token": f"two words {MARKER}"},
    {"access_token": "t\u00f6ken"},
    {"token": 42},
])
def test_a_hostile_token_service(registry: Registry, body: Any) -> None:
    challenge(registry, f"{registry.url}/token")
    registry.answer("/token", body)
    text = refused(registry, "resolve", REF, error=RegistryAuthError)
    assert text.startswith(f"the token service's answer to {registry.url} is malformed: ")


@pytest.mark.parametrize("realm", ["ftp://example/token", "http://[::1/token", "/token"])
def test_a_token_realm_that_is_not_a_url(registry: Registry, realm: str) -> None:
    challenge(registry, realm)
    assert "not an http(s) URL" in refused(registry, "resolve", REF, error=RegistryAuthError)


def test_a_good_token_is_used(registry: Registry) -> None:
    challenge(registry, f"{registry.url}/token")
    registry.answer("/token", {"token": "eyJhbGciOi.abc-_~+/=="})
    # The server does not check the token: a second 401 means it was sent and refused.
    assert "refused access" in refused(registry, "resolve", REF, error=RegistryAuthError)


# -- HEAD first: a manifest GET counts against Docker Hub's pull limit ---------------------

IMAGE = IMAGE_TYPES[0]
INDEX_DIGEST = "sha256:" + "c" * 64


def methods(registry: Registry) -> list[str]:
    return [seen.method for seen in registry.seen]


def test_an_image_manifest_is_resolved_by_head_alone(registry: Registry) -> None:
    registry.answer(MANIFEST, {"mediaType": IMAGE}, Content_Type=f"{IMAGE}; charset=utf-8",
                    Docker_Content_Digest=DIGEST)
    assert run(registry, "resolve", REF) == Resolved(DIGEST, IMAGE)
    assert methods(registry) == ["HEAD"]
    assert "application/vnd.oci.image.index.v1+json" in registry.seen[0].headers["Accept"]


@pytest.mark.parametrize("head", [
    reply({}, Content_Type=INDEX_TYPES[1], Docker_Content_Digest=INDEX_DIGEST),
    reply({}, Content_Type=IMAGE),
    reply({}, Docker_Content_Digest=INDEX_DIGEST),
    reply({}, Content_Type="application/vnd.docker.distribution.manifest.v1+prettyjws",
          Docker_Content_Digest=INDEX_DIGEST),
    reply({}, 405),
    reply({}, 400),
    reply({}, 501),
], ids=["an index", "no digest", "no type", "another type", "405", "400", "501"])
def test_a_get_where_head_is_not_enough(registry: Registry, head: Answer) -> None:
    get = reply(index(entry({"os": "linux", "architecture": "amd64"})),
                Docker_Content_Digest=INDEX_DIGEST)
    registry.answers[MANIFEST] = lambda seen: head if seen.method == "HEAD" else get
    assert run(registry, "resolve", REF) == Resolved(DIGEST, IMAGE, INDEX_DIGEST)
    assert methods(registry) == ["HEAD", "GET"]


@pytest.mark.parametrize(("status", "error"), [
    (404, ImageNotFound), (403, RegistryAuthError), (429, RegistryUnavailable),
    (503, RegistryUnavailable),
])
def test_a_head_that_answers_is_believed(registry: Registry, status: int,
                                         error: type[RegistryError]) -> None:
    registry.answer(MANIFEST, {"mediaType": IMAGE}, status, Docker_Content_Digest=DIGEST)
    refused(registry, "resolve", REF, error=error)
    assert methods(registry) == ["HEAD"]


# -- bounded bodies and pagination ---------------------------------------------------------


def padded(body: Any, size: int) -> bytes:
    """`body` as JSON of exactly `size` bytes: trailing whitespace is still valid JSON."""
    data = json.dumps(body).encode()
    return data + b" " * (size - len(data))


@pytest.mark.parametrize("encode", [bytes, gzip.compress], ids=["plain", "gzip bomb"])
def test_a_manifest_is_read_up_to_its_limit(registry: Registry,
                                            encode: Callable[[bytes], bytes]) -> None:
    manifest = index(entry({"os": "linux", "architecture": "amd64"}))
    headers = {"Docker_Content_Digest": INDEX_DIGEST}
    if encode is not bytes:
        headers["Content_Encoding"] = "gzip"
    registry.answer(MANIFEST, encode(padded(manifest, MANIFEST_LIMIT)), 200, **headers)
    assert run(registry, "resolve", REF).index_digest == INDEX_DIGEST
    registry.answer(MANIFEST, encode(padded(manifest, MANIFEST_LIMIT + 1)), 200, **headers)
    assert refused(registry, "resolve", REF) == (
        f"registry {registry.url}'s answer for {MANIFEST} exceeds 4096 KiB")


def test_an_endless_manifest_is_not_read_to_its_end() -> None:
    offered = 64 << 20
    with serve() as registry:
        registry.answer(MANIFEST, iter([b"{"] + [b" " * (1 << 16)] * (offered >> 16)),
                        Docker_Content_Digest=DIGEST)
        assert "exceeds 4096 KiB" in refused(registry, "resolve", REF)
    # The client hung up; what the server wrote before noticing sat in socket buffers.
    assert MANIFEST_LIMIT < registry.written < offered // 2


def test_a_token_is_read_up_to_its_limit(registry: Registry) -> None:
    challenge(registry, f"{registry.url}/token")
    registry.answer("/token", padded({"token": "t"}, TOKEN_LIMIT))
    assert "refused access" in refused(registry, "resolve", REF)  # it was used
    registry.answer("/token", padded({"token": "t"}, TOKEN_LIMIT + 1))
    assert "/token exceeds 64 KiB" in refused(registry, "resolve", REF)


def test_a_page_is_read_up_to_its_limit(registry: Registry) -> None:
    registry.answer(TAGS, padded({"tags": ["a"]}, PAGE_LIMIT))
    assert run(registry, "tags", "team/app") == ["a"]
    registry.answer(TAGS, padded({"tags": ["a"]}, PAGE_LIMIT + 1))
    assert "exceeds 1024 KiB" in refused(registry, "tags", "team/app")


def endless_pages(registry: Registry, size: int) -> None:
    """Pages of `size` bytes, each with a Link to a new one."""
    def page(seen: Seen) -> Answer:
        n = len(registry.seen)
        return reply(padded({"tags": [f"t{n}"]}, size), Link=f'<{TAGS}?last=t{n}>; rel="next"')
    registry.answers[TAGS] = page


def test_the_number_of_pages_is_bounded(registry: Registry,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_client, "MAX_PAGES", 5)
    endless_pages(registry, 100)
    assert "has more than 5 pages of /v2/team/app/tags/list?n=1000" in refused(
        registry, "tags", "team/app")
    assert len(registry.seen) == 5


def test_all_pages_together_are_bounded(registry: Registry,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_client, "LIST_LIMIT", 3 << 10)
    endless_pages(registry, 1 << 10)
    assert "sent more than 3 KiB for /v2/team/app/tags/list" in refused(
        registry, "tags", "team/app")
    assert len(registry.seen) == 4


def flaky(registry: Registry, path: str, failures: list[Answer], then: Answer) -> None:
    """`path` answers each of `failures` in turn, then `then` for good."""
    def answer(seen: Seen) -> Answer:
        return failures.pop(0) if failures else then
    registry.answers[path] = answer


def test_429_and_5xx_are_retried_honouring_retry_after(registry: Registry) -> None:
    flaky(registry, TAGS, [reply({}, 429, Retry_After="0"), reply({}, 503),
                           reply({}, 502, Retry_After="Wed, 21 Oct 2015 07:28:00 GMT")],
          reply({"tags": ["a"]}))
    assert run(registry, "tags", "team/app", retries=3, backoff=0.01) == ["a"]
    assert len(registry.seen) == 4


def test_retries_are_bounded(registry: Registry) -> None:
    registry.answer(TAGS, {}, 503)
    message = refused(registry, "tags", "team/app", error=RegistryUnavailable, retries=2,
                      backoff=0.01)
    assert "answered HTTP 503" in message
    assert len(registry.seen) == 3


def test_a_retry_after_beyond_the_limit_is_not_waited_for(registry: Registry) -> None:
    registry.answer(TAGS, {}, 429, Retry_After="3600")
    with pytest.raises(RegistryUnavailable) as caught:
        run(registry, "tags", "team/app", retries=5)
    assert caught.value.retry_after == 3600
    assert len(registry.seen) == 1


def test_the_catalog_is_streamed_page_by_page(registry: Registry) -> None:
    registry.answer("/v2/_catalog?n=2", {"repositories": ["a/1", "a/2"]},
                    Link='</v2/_catalog?last=a/2&n=2>; rel="next"')
    registry.answer("/v2/_catalog?last=a/2&n=2", {"repositories": ["b/1"]})

    async def pages() -> list[tuple[list[str], int]]:
        async with RegistryClient(registry.url) as client:
            out = []
            async for page in client.catalog(page_size=2):
                out.append((page, len(registry.seen)))  # requests made when it arrived
            return out
    assert asyncio.run(pages()) == [(["a/1", "a/2"], 1), (["b/1"], 2)]


def test_a_tag_listing_keeps_the_last_matching_tags_within_its_cap(registry: Registry) -> None:
    pages = [[f"v{i:04d}" for i in range(p * 1000, (p + 1) * 1000)] + ["latest", "dev"]
             for p in range(5)]

    def page(seen: Seen) -> Answer:
        n = int(seen.path.rsplit("page=", 1)[-1]) if "page=" in seen.path else 0
        if n == 4:
            return reply({"tags": pages[n]})
        return reply({"tags": pages[n]}, Link=f'<{TAGS}?n=1000&page={n + 1}>; rel="next"')
    registry.answers[TAGS] = page

    async def go() -> Any:
        async with RegistryClient(registry.url) as client:
            return await client.list_tags("team/app", lambda t: t.startswith("v"), 2000)
    listing = asyncio.run(go())
    assert listing.tags == [f"v{i:04d}" for i in range(3000, 5000)]
    assert listing.matched == 5000
    assert "5000 tags match, the last 2000 in lexical order are kept" in listing.truncated


def test_a_tag_listing_under_its_cap_is_whole(registry: Registry) -> None:
    registry.answer(TAGS, {"tags": ["b", "a", "c"]})

    async def go() -> Any:
        async with RegistryClient(registry.url) as client:
            return await client.list_tags("team/app", lambda t: t != "c", 10)
    listing = asyncio.run(go())
    assert (listing.tags, listing.matched, listing.truncated) == (["a", "b"], 2, "")


def test_a_tag_listing_stops_reading_after_the_list_limit(
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_client, "LIST_LIMIT", 3 << 10)
    endless_pages(registry, 1 << 10)

    async def go() -> Any:
        async with RegistryClient(registry.url) as client:
            return await client.list_tags("team/app", lambda t: True, 100)
    listing = asyncio.run(go())
    assert "read up to 3 KiB, the rest not" in listing.truncated
    assert len(registry.seen) == 4 and len(listing.tags) == 4


# -- connections kept open across lookups (scangate.registry.configured) -------------------

class KeptAlive(Handler):
    """HTTP/1.1: a connection stays open for the next request, as a registry's does."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1  # type: ignore[attr-defined]


def test_lookups_share_connections_but_no_cookies() -> None:
    """Each lookup is a RegistryClient of its own (its own tokens), sending through one
    kept-open httpx client: a second lookup opens no connection, and a cookie the registry
    set for one lookup does not travel with the next (which may be another tenant's)."""
    from scangate.config import Settings
    from scangate.core.destinations import Destinations
    from scangate.registry.configured import registry_client, shared_connections

    server = Registry(("127.0.0.1", 0), KeptAlive)
    server.answers, server.seen, server.written = {}, [], 0
    server.connections = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    server.answer(MANIFEST, {"mediaType": IMAGE}, Content_Type=IMAGE,
                  Docker_Content_Digest=DIGEST, Set_Cookie="session=tenant-a; Path=/")
    settings = Settings(insecure_registries=["127.0.0.1"])
    destinations = Destinations.of(["127.0.0.0/8"], [])

    async def lookups(shared: bool) -> list[Resolved]:
        connections = shared_connections(settings, destinations) if shared else None
        found = []
        for _ in range(3):
            async with registry_client(url, {}, None, "127.0.0.1", settings, destinations,
                                       connections) as client:
                found.append(await client.resolve(REF))
        if connections is not None:
            await connections.aclose()
        return found

    try:
        assert asyncio.run(lookups(shared=True)) == [Resolved(DIGEST, IMAGE)] * 3
        assert server.connections == 1  # type: ignore[attr-defined]
        assert [s for s in server.seen if "Cookie" in s.headers] == []
        # Without them, each lookup connects again (what the count above is against).
        asyncio.run(lookups(shared=False))
        assert server.connections == 4  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
