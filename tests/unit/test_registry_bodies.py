"""A registry answering with hostile bodies: RegistryError saying what was wrong,
never a JSON or KeyError, never the body quoted.

The registry is a tiny real HTTP server on 127.0.0.1 that answers each path with a
fixed response, not a mocked transport: the client runs its real httpx stack.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from scangate.core.images import parse_image
from scangate.registry.client import (
    INDEX_TYPES,
    ImageNotFound,
    RegistryAuthError,
    RegistryClient,
    RegistryError,
    Resolved,
)

MARKER = "HOSTILE-BODY"
"""In every hostile body: an error message must not quote it."""

Answer = tuple[int, dict[str, str], bytes]


class Registry(ThreadingHTTPServer):
    answers: dict[str, Answer]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def answer(self, path: str, body: Any, status: int = 200, **headers: str) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answers[path] = (status, {k.replace("_", "-"): v for k, v in headers.items()},
                              data)


class Handler(BaseHTTPRequestHandler):
    server: Registry

    def do_GET(self) -> None:
        status, headers, body = self.server.answers.get(
            self.path, self.server.answers.get(self.path.split("?")[0], (404, {}, b"{}")))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    for proxy in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    server = Registry(("127.0.0.1", 0), Handler)
    server.answers = {}
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


REF = parse_image("127.0.0.1/team/app:1.0")
MANIFEST = "/v2/team/app/manifests/1.0"
TAGS = "/v2/team/app/tags/list"
DIGEST = "sha256:" + "a" * 64


def run(registry: Registry, call: str, *args: Any) -> Any:
    async def go() -> Any:
        async with RegistryClient(registry.url) as client:
            return await getattr(client, call)(*args)
    return asyncio.run(go())


def refused(registry: Registry, call: str, *args: Any,
            error: type[RegistryError] = RegistryError) -> str:
    with pytest.raises(error) as caught:
        run(registry, call, *args)
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
