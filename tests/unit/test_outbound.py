"""Connections to user-named hosts go to the address that was checked (no second
resolution: DNS rebinding), TLS and Host still name the host, and a registry answering
slowly line by line is cut off at the deadline of the whole request.

Real servers on 127.0.0.1 (allowed by allowedNetworks, as the sandbox allows it); the
only stand-in is the resolver, the hook the transport takes for name lookups.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from rawserver import raw_server
from sandbox.pki import CertificateAuthority
from scangate.core.destinations import DestinationRefused, Destinations
from scangate.core.images import parse_image
from scangate.outbound import pinned_client
from scangate.registry.client import RegistryClient, RegistryRefused, RegistryUnavailable

LOOPBACK = Destinations.of(["127.0.0.0/8"], [])
METADATA = "169.254.169.254"


class Answering(ThreadingHTTPServer):
    hosts: list[str]


class Handler(BaseHTTPRequestHandler):
    server: Answering

    def do_GET(self) -> None:
        self.server.hosts.append(self.headers.get("Host", ""))
        body = b'{"tags": ["1.0"]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@contextlib.contextmanager
def server(tls: ssl.SSLContext | None = None) -> Iterator[Answering]:
    http = Answering(("127.0.0.1", 0), Handler)
    http.hosts = []
    if tls:
        http.socket = tls.wrap_socket(http.socket, server_side=True)
    thread = threading.Thread(target=http.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield http
    finally:
        http.shutdown()
        http.server_close()
        thread.join()


class Rebinding:
    """A resolver answering each of `answers` in turn (the last one for good), counting."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def tags(url: str, resolver: Rebinding, **options: Any) -> list[str]:
    async def go() -> list[str]:
        async with RegistryClient(url, destinations=LOOPBACK, resolver=resolver,
                                  **options) as client:
            return await client.tags("team/app")
    return asyncio.run(go())


def test_a_name_answering_allowed_then_refused_is_connected_where_it_was_checked() -> None:
    with server() as http:
        port = http.server_address[1]
        resolver = Rebinding(["127.0.0.1"], [METADATA])
        assert tags(f"http://rebind.test:{port}", resolver) == ["1.0"]
        # One lookup: the check's answer is where the connection went (a second lookup
        # would have named the metadata service).
        assert resolver.calls == ["rebind.test"]
        assert http.hosts == [f"rebind.test:{port}"]  # Host still names the host
        # Its next answer is refused before any connection is made.
        with pytest.raises(RegistryRefused, match=r"169\.254\.169\.254, a cloud metadata"):
            tags(f"http://rebind.test:{port}", resolver)
        assert len(http.hosts) == 1


def test_a_name_with_any_refused_address_is_refused() -> None:
    with server() as http:
        resolver = Rebinding(["127.0.0.1", METADATA])
        with pytest.raises(RegistryRefused, match="metadata"):
            tags(f"http://mixed.test:{http.server_address[1]}", resolver)
        assert http.hosts == []


def test_without_allowed_networks_loopback_is_refused_by_name_and_literal() -> None:
    with server() as http:
        port = http.server_address[1]

        async def go(url: str, resolver: Rebinding) -> None:
            async with RegistryClient(url, destinations=Destinations(),
                                      resolver=resolver) as client:
                await client.tags("team/app")
        for url in (f"http://name.test:{port}", f"http://127.0.0.1:{port}",
                    f"http://[::ffff:127.0.0.1]:{port}"):
            with pytest.raises(RegistryRefused, match="loopback"):
                asyncio.run(go(url, Rebinding(["127.0.0.1"])))
        assert http.hosts == []


def test_tls_verifies_the_name_not_the_address(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    pair = ca.issue("registry", "registry.test", server=True, hosts=("registry.test",))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pair.cert, pair.key)
    trust = ssl.create_default_context(cafile=str(ca.cert_path))
    with server(tls) as https:
        port = https.server_address[1]
        assert tags(f"https://registry.test:{port}", Rebinding(["127.0.0.1"]),
                    verify=trust) == ["1.0"]
        # Another name that resolves to the same address: the certificate does not fit.
        with pytest.raises(RegistryUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            tags(f"https://other.test:{port}", Rebinding(["127.0.0.1"]), verify=trust)


def test_receivers_connect_where_checked_and_ignore_environment_proxies(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy would resolve the name again out of the policy's sight: not used.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    with server() as http:
        port = http.server_address[1]
        resolver = Rebinding(["127.0.0.1"], [METADATA])

        async def go() -> int:
            async with pinned_client(LOOPBACK, resolver=resolver) as client:
                return (await client.get(f"http://hook.test:{port}/x")).status_code
        assert asyncio.run(go()) == 200
        assert resolver.calls == ["hook.test"]
        with pytest.raises(DestinationRefused):
            asyncio.run(go())


@contextlib.contextmanager
def trickling(line_every: float) -> Iterator[int]:
    """A server that answers with a header line every `line_every` seconds, forever."""
    def serve(conn: socket.socket, stop: threading.Event) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        while not stop.wait(line_every):
            conn.sendall(b"X-Slow: 1\r\n")

    with raw_server(serve) as port:
        yield port


def test_a_registry_trickling_header_lines_is_cut_off_at_the_whole_request_deadline() -> None:
    with trickling(0.4) as port:
        async def go() -> None:
            async with RegistryClient(f"http://127.0.0.1:{port}", destinations=LOOPBACK,
                                      timeout=1.5) as client:
                await client.resolve(parse_image(f"127.0.0.1:{port}/team/app:1"))
        start = time.monotonic()
        with pytest.raises(RegistryUnavailable, match=r"no complete answer within 1\.5s"):
            asyncio.run(go())
        # httpx's read timeout alone never fires: a line comes every 0.4 s.
        assert time.monotonic() - start < 3.0

