"""Where a RegistryClient's requests and credentials go: an Authorization header only to
the registry's own origin, credentials to a token realm only over HTTPS (unless the
registry is configured insecure), and no request where the destination policy refuses.

Real servers on loopback stand for the hosts: to a client, 127.0.0.1 and localhost are two
hosts (even on one port), and 127.0.0.2 is a third, which the tests' policy refuses.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_registry_bodies import (  # the registry server and helpers
    DIGEST,
    IMAGE,
    MANIFEST,
    REF,
    TAGS,
    Answer,
    Registry,
    Responder,
    no_proxy,  # noqa: F401 (an autouse fixture)
    refused,
    reply,
    run,
    serve,
)

from sandbox.pki import CertificateAuthority
from scangate.core.destinations import Destinations
from scangate.registry.client import Credentials, RegistryAuthError, RegistryRefused

USER = Credentials("ci", "s3cret")
BASIC = "Basic " + base64.b64encode(b"ci:s3cret").decode()
SCOPE = "repository:team/app:pull"


def authorizations(server: Registry) -> list[str | None]:
    return [seen.headers.get("Authorization") for seen in server.seen]


def guarded(answer: Answer) -> Responder:
    """`answer` to USER's Basic credentials, a Basic challenge to anyone else."""
    challenge = reply({}, 401, WWW_Authenticate='Basic realm="registry"')
    return lambda seen: answer if seen.headers.get("Authorization") == BASIC else challenge


def bearer(registry: Registry, realm: str) -> None:
    """MANIFEST to the token "t0ken" only; anyone else is sent to `realm` for it."""
    challenge = reply({}, 401, WWW_Authenticate=f'Bearer realm="{realm}",service="registry"')
    image = reply({}, Content_Type=IMAGE, Docker_Content_Digest=DIGEST)
    registry.answers[MANIFEST] = (
        lambda seen: image if seen.headers.get("Authorization") == "Bearer t0ken" else challenge)


@pytest.fixture
def registry() -> Iterator[Registry]:
    with serve() as server:
        yield server


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context for 127.0.0.1 and localhost, and a client context trusting it."""
    ca = CertificateAuthority(Path(tmp_path_factory.mktemp("pki")))
    pair = ca.issue("server", "localhost", hosts=("localhost", "127.0.0.1"), server=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pair.cert, pair.key)
    return server, ssl.create_default_context(cafile=str(ca.cert_path))


# -- a token realm on another host gets credentials only over HTTPS -------------------------


@pytest.mark.parametrize(("registry_tls", "realm_tls", "sent"), [
    (True, False, False), (True, True, True), (False, False, True),
], ids=["https registry, http realm: withheld", "https realm: sent",
        "insecure registry: sent"])
def test_credentials_go_to_a_token_realm_only_over_https(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], registry_tls: bool, realm_tls: bool,
    sent: bool,
) -> None:
    server, client = tls
    with (serve(tls=server if registry_tls else None) as registry,
          serve(name="localhost", tls=server if realm_tls else None) as tokens):
        bearer(registry, f"{tokens.url}/token")
        tokens.answer("/token", {"token": "t0ken"})  # anonymous tokens are enough here
        assert run(registry, "resolve", REF, credentials=USER, verify=client).digest == DIGEST
    assert authorizations(tokens) == [BASIC if sent else None]


def test_a_plain_http_realm_that_wants_the_credentials_does_not_get_them(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server, client = tls
    with serve(tls=server) as registry, serve(name="localhost") as tokens:
        bearer(registry, f"{tokens.url}/token")
        tokens.answer("/token", {}, 401)
        assert refused(registry, "resolve", REF, error=RegistryAuthError, credentials=USER,
                       verify=client) == (
            f"token service localhost of {registry.url} refused an anonymous token for "
            f"{SCOPE} (HTTP 401); the credentials of 'ci' were withheld from it because it "
            "is plain HTTP and the registry is not configured insecure")
        tokens.answer("/token", {"token": "not-enough"})  # the registry refuses it
        assert refused(registry, "resolve", REF, error=RegistryAuthError, credentials=USER,
                       verify=client).endswith(
            "(HTTP 401); the credentials were withheld from the plain-HTTP token service "
            "localhost")
    assert authorizations(tokens) == [None, None]


# -- Authorization only for the registry's origin -------------------------------------------


def test_a_link_to_another_host_is_followed_without_authorization(registry: Registry) -> None:
    with serve(name="localhost") as other:
        registry.answers[f"{TAGS}?n=1000"] = guarded(
            reply({"tags": ["a"]}, Link=f'<{TAGS}?last=a>; rel="next"'))
        registry.answers[f"{TAGS}?last=a"] = guarded(
            reply({"tags": ["b"]}, Link=f'<{other.url}{TAGS}?last=b>; rel="next"'))
        other.answer(TAGS, {"tags": ["c"]})
        assert run(registry, "tags", "team/app", credentials=USER) == ["a", "b", "c"]
    assert authorizations(other) == [None]


@pytest.mark.parametrize("challenge", ['Basic realm="x"', "Bearer realm=\"{url}/token\""])
def test_a_host_linked_to_cannot_ask_for_the_credentials(registry: Registry,
                                                         challenge: str) -> None:
    with serve(name="localhost") as other:
        registry.answers[TAGS] = guarded(
            reply({"tags": ["a"]}, Link=f'<{other.url}{TAGS}?last=a>; rel="next"'))
        other.answer(TAGS, {}, 401, WWW_Authenticate=challenge.format(url=other.url))
        other.answer("/token", {"token": "t0ken"})
        assert refused(registry, "tags", "team/app", error=RegistryAuthError,
                       credentials=USER).endswith(f"refused access to {SCOPE} as 'ci' (HTTP 401)")
    assert [(seen.path, seen.headers.get("Authorization")) for seen in other.seen] == [
        (f"{TAGS}?last=a", None)]  # and no token request


def test_a_redirect_keeps_authorization_only_on_the_registrys_origin(registry: Registry) -> None:
    # The same server by another name is another origin.
    elsewhere = f"http://localhost:{registry.server_address[1]}/elsewhere"
    moved = "/v2/team/app/manifests/moved"
    registry.answers[MANIFEST] = guarded(reply({}, 307, Location=moved))
    registry.answers[moved] = guarded(reply({}, 302, Location=elsewhere))
    registry.answer("/elsewhere", {}, Content_Type=IMAGE, Docker_Content_Digest=DIGEST)
    assert run(registry, "resolve", REF, credentials=USER).digest == DIGEST
    assert [(seen.method, seen.path, seen.headers.get("Authorization"))
            for seen in registry.seen] == [
        ("HEAD", MANIFEST, None), ("HEAD", MANIFEST, BASIC), ("HEAD", moved, BASIC),
        ("HEAD", "/elsewhere", None)]


def test_a_token_realms_redirect_gets_no_credentials(registry: Registry) -> None:
    elsewhere = f"http://localhost:{registry.server_address[1]}/elsewhere"
    bearer(registry, f"{registry.url}/token")
    registry.answer("/token", {}, 307, Location=elsewhere)
    registry.answer("/elsewhere", {"token": "t0ken"})
    assert run(registry, "resolve", REF, credentials=USER).digest == DIGEST
    assert [(seen.path.split("?")[0], seen.headers.get("Authorization"))
            for seen in registry.seen][1:3] == [("/token", BASIC), ("/elsewhere", None)]


def test_redirects_are_bounded_and_must_be_http(registry: Registry) -> None:
    registry.answer(MANIFEST, {}, 307, Location="/r0")
    for n in range(7):
        registry.answer(f"/r{n}", {}, 307, Location=f"/r{n + 1}")
    assert refused(registry, "resolve", REF) == (
        f"registry {registry.url} redirected more than 5 times")
    assert len(registry.seen) == 6
    registry.answer(MANIFEST, {}, 302, Location="file:///etc/passwd")
    assert refused(registry, "resolve", REF) == (
        f"registry {registry.url} redirected to 'file:///etc/passwd', not an http(s) URL")


# -- the destination policy ---------------------------------------------------------------

POLICY = Destinations.of(["127.0.0.1/32"], [])
"""Allows the test registry's 127.0.0.1, refuses the rest of loopback, 127.0.0.2 too."""


@pytest.fixture
def far() -> Iterator[Registry]:
    """A registry on 127.0.0.2, which POLICY refuses; it would answer everything well."""
    with serve("127.0.0.2") as server:
        server.answer(MANIFEST, {}, Content_Type=IMAGE, Docker_Content_Digest=DIGEST)
        server.answer(TAGS, {"tags": ["far"]})
        server.answer("/token", {"token": "t0ken"})
        yield server


@pytest.mark.parametrize("via", ["base URL", "link", "redirect", "token realm"])
def test_a_refused_destination_gets_no_request(registry: Registry, far: Registry,
                                               via: str) -> None:
    registry.answer(MANIFEST, {}, 307, Location=f"{far.url}{MANIFEST}")
    registry.answer(TAGS, {"tags": ["a"]}, Link=f'<{far.url}{TAGS}>; rel="next"')
    if via == "token realm":
        bearer(registry, f"{far.url}/token")
    call, args = ("tags", ["team/app"]) if via == "link" else ("resolve", [REF])
    with pytest.raises(RegistryRefused) as caught:
        run(far if via == "base URL" else registry, call, *args, destinations=POLICY)
    assert str(caught.value).startswith("127.0.0.2 resolves to 127.0.0.2, a loopback address")
    assert (caught.value.reason, caught.value.transient) == ("RegistryRefused", False)
    assert far.seen == []


def test_the_policy_allows_what_it_allows(registry: Registry) -> None:
    registry.answer(MANIFEST, {}, Content_Type=IMAGE, Docker_Content_Digest=DIGEST)
    localhost = f"http://localhost:{registry.server_address[1]}"
    for url in (registry.url, localhost):  # localhost by its address, 127.0.0.1
        assert run(url, "resolve", REF, destinations=POLICY).digest == DIGEST


def test_a_host_name_is_checked_by_the_addresses_it_resolves_to(registry: Registry) -> None:
    localhost = f"http://localhost:{registry.server_address[1]}"
    with pytest.raises(RegistryRefused, match=r"^localhost resolves to 127\.0\.0\.1, a loopback"):
        run(localhost, "resolve", REF, destinations=Destinations.of([], []))
    assert registry.seen == []
