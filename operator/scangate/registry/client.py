"""A small OCI distribution API client: tags, catalog, digests, platform resolution.

Auth follows the distribution token flow that Docker Hub, Harbor, ACR, GHCR and
Quay use: an anonymous request gets 401 with `WWW-Authenticate`; Basic is
answered with the credentials, Bearer by fetching a token for the scope from
the realm (with the credentials, if any) and retrying.

A registry is not trusted to answer well: a body that is not what the API
promises raises RegistryError naming what was wrong, without quoting the body;
bodies, pages and redirects are bounded. Nor is it trusted with where requests
go: an Authorization header goes only to the registry's own origin (a token
realm's Basic credentials only to the realm), never over plain HTTP unless the
registry itself is plain HTTP (configured insecure), and with `destinations`
every request is checked against the operator's address policy first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import heapq
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import cached_property
from typing import TypeVar
from urllib.parse import urljoin

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scangate.core.destinations import DestinationRefused, Destinations
from scangate.core.errors import describe_validation
from scangate.core.headers import HeaderError, next_link, parse_challenge
from scangate.core.images import ImageRef
from scangate.outbound import Resolver, pinned_client

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[:2]
IMAGE_TYPES = MANIFEST_TYPES[2:]

# What a registry can make scangate read or do. Manifests are a few KiB (registries
# need only accept 4 MiB); a page of 1,000 tags is a few tens of KiB.
MANIFEST_LIMIT = 4 << 20
PAGE_LIMIT = 1 << 20
LIST_LIMIT = 64 << 20
"""All pages of one repository's tag list read together: they are read one page at a
time (only the tags kept stay in memory), and reading stops here."""
TOKEN_LIMIT = 64 << 10
MAX_PAGES = 10_000
MAX_REDIRECTS = 5
MAX_RETRY_DELAY = 30.0
"""The longest wait for a Retry-After; a registry asking for more is unavailable now."""

# RFC 6750 b64token: anything else cannot go into an Authorization header.
_TOKEN = r"^[A-Za-z0-9._~+/-]+=*$"
_PORTS = {"http": 80, "https": 443}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

_Origin = tuple[str, str, int]
BodySink = Callable[[httpx.Response], Awaitable[None]]
"""Takes a 200's body as it streams (a layer blob to a file)."""


class RegistryError(Exception):
    """A registry answer scangate cannot use; `transient` ones are worth retrying."""

    transient = False
    reason = "RegistryError"


class ImageNotFound(RegistryError):
    reason = "ImageNotFound"


class RegistryAuthError(RegistryError):
    reason = "RegistryAuthFailed"


class RegistryUnavailable(RegistryError):
    transient = True
    reason = "RegistryUnavailable"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        """Seconds the registry asked to wait (Retry-After), if it did."""


class RegistryRefused(RegistryError):
    """A request the destination policy forbids (see scangate.core.destinations)."""

    reason = "RegistryRefused"


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _Platform(_Body):
    os: str | None = None
    architecture: str | None = None
    variant: str | None = None


class _Descriptor(_Body):
    media_type: str = Field(alias="mediaType")
    digest: str
    platform: _Platform = Field(default_factory=_Platform)


class _Manifest(_Body):
    """An image manifest or an index, as far as platform resolution looks."""

    media_type: str | None = Field(default=None, alias="mediaType")
    manifests: list[_Descriptor] | None = None


class _Layer(_Body):
    media_type: str = Field(alias="mediaType", max_length=256)
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    size: int = Field(ge=0)


class _ImageManifest(_Body):
    """An image manifest, as far as its layers go."""

    layers: list[_Layer] = Field(max_length=1000)


class _Page(_Body):
    """A page of a tag list or of the catalog."""

    tags: list[str] | None = None
    repositories: list[str] | None = None


class _Token(_Body):
    token: str | None = Field(default=None, pattern=_TOKEN)
    access_token: str | None = Field(default=None, pattern=_TOKEN)


_B = TypeVar("_B", bound=_Body)


@dataclass(frozen=True)
class _Answer:
    """A response, its body read (within a limit) only when it was wanted."""

    status: int
    headers: httpx.Headers
    body: bytes
    url: httpx.URL
    """The URL that answered, after redirects."""

    @property
    def media_type(self) -> str:
        return str(self.headers.get("Content-Type", "")).split(";")[0].strip()


def _parse(model: type[_B], answer: _Answer, what: str,
           error: type[RegistryError] = RegistryError) -> _B:
    try:
        return model.model_validate_json(answer.body)
    except ValidationError as e:
        raise error(f"{what} is malformed: {describe_validation(e)}") from None


def _url(text: str, what: str, error: type[RegistryError],
         base: httpx.URL | None = None) -> httpx.URL:
    """`text` (relative to `base`) as an absolute http(s) URL; anything else is refused
    here, before httpx, which would try a scheme-less or odd URL in its own way."""
    try:
        url: httpx.URL | None = base.join(text) if base else httpx.URL(text)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in _PORTS or not url.host:
        raise error(f"{what} {text[:200]!r}, not an http(s) URL")
    return url


def _origin(url: httpx.URL) -> _Origin:
    return url.scheme, url.host, url.port or _PORTS.get(url.scheme, 0)


async def _read(response: httpx.Response, limit: int, what: str) -> bytes:
    """The body, refused as soon as it exceeds `limit` bytes. Counted after decompression,
    so that a small gzip bomb is refused too."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise RegistryError(f"{what} exceeds {limit >> 10} KiB")
    return bytes(body)


DRAIN_LIMIT = 4096
"""An answer not needed is still read when it says it is at most this long."""


async def _drain(response: httpx.Response) -> None:
    """Read an answer that is not needed (a HEAD's, a 401's, a redirect's) when it is known
    to be small, so that its connection can serve the next request: httpx closes a
    connection whose answer was not read to its end. A large, endless or lying one is left
    unread (its connection is closed)."""
    length = response.headers.get("Content-Length", "")
    if response.request.method == "HEAD" or (length.isdigit() and int(length) <= DRAIN_LIMIT):
        with contextlib.suppress(RegistryError, httpx.HTTPError):
            await _read(response, DRAIN_LIMIT, "an answer")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never print a password
        return f"Credentials(username={self.username!r}, password=***)"

    @property
    def basic(self) -> str:
        """As an Authorization header value."""
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()


@dataclass(frozen=True)
class TagListing:
    """The tags kept of a repository's listing (sorted), and whether some were not."""

    tags: list[str]
    matched: int
    """Tags accepted in all that was read."""
    truncated: str = ""
    """Why not every matching tag is in `tags` ("" when all are)."""


@dataclass(frozen=True)
class Resolved:
    """What a reference points at, for one platform."""

    digest: str
    """The image manifest's digest (for an index: the chosen platform's manifest)."""
    media_type: str
    index_digest: str | None = None
    """The index's digest when the reference named a multi-platform index."""


class RegistryClient:
    """One registry, one set of credentials; use as an async context manager.

    An `http://` base_url means the registry is configured insecure (plain HTTP): only
    then may credentials travel over plain HTTP, e.g. to a token realm.
    """

    def __init__(
        self,
        base_url: str,
        *,
        credentials: Credentials | None = None,
        verify: ssl.SSLContext | bool = True,
        timeout: float = 10.0,
        destinations: Destinations | None = None,
        retries: int = 0,
        backoff: float = 0.5,
        resolver: Resolver | None = None,
        connections: httpx.AsyncClient | None = None,
    ) -> None:
        """`timeout`: the deadline of each whole request (connecting, the headers and the
        body together, redirects included), not only of each read: a registry trickling
        its answer a line at a time must not hold a lookup for longer.
        `retries`: how often a request answered 429 or 5xx, or not answered at all, is
        sent again, after `backoff` seconds doubling each time or the registry's
        Retry-After (at most MAX_RETRY_DELAY).
        `destinations`: every connection goes to an address this policy allows, the one
        checked (scangate.outbound); `resolver` replaces the system's resolver there.
        `connections`: an open httpx client (see shared_connections) to send through
        instead of one of its own; it is left open on exit."""
        self.base_url = base_url.rstrip("/")
        self.retries, self.backoff = retries, backoff
        self.credentials = credentials
        self.destinations = destinations
        self.timeout = timeout
        self._insecure = self.base_url.lower().startswith("http://")
        # Redirects are followed in _send, which decides where Authorization may go.
        self._owns_http = connections is None
        self._http = connections or (
            pinned_client(destinations, verify=verify, timeout=timeout, resolver=resolver)
            if destinations else httpx.AsyncClient(verify=verify, timeout=timeout,
                                                   follow_redirects=False, trust_env=False))
        self._tokens: dict[str, str] = {}
        self._withheld_from: str | None = None
        """The plain-HTTP token realm host the credentials were withheld from, if any."""

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._owns_http:
            await self._http.aclose()

    # -- where requests go -----------------------------------------------------------

    @cached_property
    def _registry_origin(self) -> _Origin:
        return _origin(_url(self.base_url, "the registry URL is", RegistryError))

    def _may_carry_credentials(self, url: httpx.URL) -> bool:
        return url.scheme == "https" or self._insecure

    async def _send(self, method: str, url: httpx.URL, who: str, *,
                    error: type[RegistryError] = RegistryError,
                    authorization: str | None = None, origin: _Origin | None = None,
                    headers: dict[str, str] | None = None, limit: int = 0,
                    sink: BodySink | None = None, deadline: float | None = None) -> _Answer:
        """One request and its redirects. `authorization` goes only to `origin` (by
        default `url`'s own) and over plain HTTP only for an insecure registry: a redirect
        elsewhere is followed without it. The body of a 200 is read up to `limit` bytes;
        other bodies (and any with limit 0) are not read at all; with `sink`, a 200's body
        goes to it instead. The whole exchange has `deadline` (default `self.timeout`)
        seconds."""
        seconds = deadline or self.timeout
        try:
            async with asyncio.timeout(seconds):
                return await self._send_within(method, url, who, error=error,
                                               authorization=authorization, origin=origin,
                                               headers=headers, limit=limit, sink=sink)
        except TimeoutError:
            raise RegistryUnavailable(
                f"{who} sent no complete answer within {seconds:g}s") from None
        except DestinationRefused as e:
            raise RegistryRefused(str(e)) from None

    async def _send_within(self, method: str, url: httpx.URL, who: str, *,
                           error: type[RegistryError], authorization: str | None,
                           origin: _Origin | None, headers: dict[str, str] | None,
                           limit: int, sink: BodySink | None = None) -> _Answer:
        origin = origin or _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            sent = dict(headers or {})
            if authorization and _origin(url) == origin and self._may_carry_credentials(url):
                sent["Authorization"] = authorization
            try:
                response = await self._http.send(
                    self._http.build_request(method, url, headers=sent), stream=True)
                try:
                    location = response.headers.get("Location")
                    if response.status_code in _REDIRECTS and location:
                        await _drain(response)
                        url = _url(location, f"{who} redirected to", error, base=url)
                        continue
                    body = b""
                    if sink is not None and response.status_code == 200:
                        await sink(response)
                    elif limit and response.status_code == 200:
                        body = await _read(response, limit,
                                           f"{who}'s answer for {url.path[:200]}")
                    else:
                        await _drain(response)
                finally:
                    await response.aclose()
            except httpx.HTTPError as e:
                raise RegistryUnavailable(f"{who} unreachable: {e}") from None
            return _Answer(response.status_code, response.headers, body, url)
        raise error(f"{who} redirected more than {MAX_REDIRECTS} times")

    # -- requests with auth --------------------------------------------------------

    async def _request(self, method: str, path: str, scope: str,
                       headers: dict[str, str] | None = None, limit: int = 0,
                       sink: BodySink | None = None, deadline: float | None = None
                       ) -> _Answer:
        for attempt in range(self.retries + 1):
            try:
                return await self._request_once(method, path, scope, headers, limit, sink,
                                                deadline)
            except RegistryUnavailable as e:
                delay = self.backoff * 2 ** attempt if e.retry_after is None else e.retry_after
                if attempt == self.retries or delay > MAX_RETRY_DELAY:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _request_once(self, method: str, path: str, scope: str,
                            headers: dict[str, str] | None, limit: int,
                            sink: BodySink | None = None, deadline: float | None = None
                            ) -> _Answer:
        who, origin = f"registry {self.base_url}", self._registry_origin
        # A path of the API, or a Link the registry sent (made absolute by _pages).
        url = _url(f"{self.base_url}{path}" if path.startswith("/") else path,
                   f"{who} linked to", RegistryError)
        for _ in range(2):
            answer = await self._send(method, url, who, authorization=self._tokens.get(scope),
                                      origin=origin, headers=headers, limit=limit, sink=sink,
                                      deadline=deadline)
            # Only the registry's own challenge is answered: a host it links or redirects
            # to must not name a token realm that would receive the credentials.
            if (answer.status != 401 or _origin(answer.url) != origin
                    or not await self._authenticate(answer, scope)):
                break
        if answer.status in (401, 403):
            user = f"as {self.credentials.username!r}" if self.credentials else "anonymously"
            withheld = (f"; the credentials were withheld from the plain-HTTP token service "
                        f"{self._withheld_from}" if self._withheld_from else "")
            raise RegistryAuthError(
                f"registry {self.base_url} refused access to {scope} {user} "
                f"(HTTP {answer.status}){withheld}")
        # 501 to a HEAD is a registry that does not implement HEAD: resolve() reads with GET.
        unsupported = method == "HEAD" and answer.status == 501
        if (answer.status >= 500 and not unsupported) or answer.status == 429:
            raise RegistryUnavailable(
                f"registry {self.base_url} answered HTTP {answer.status}",
                retry_after=_retry_after(answer.headers.get("Retry-After")))
        return answer

    async def _authenticate(self, answer: _Answer, scope: str) -> bool:
        """Obtain an Authorization header for the challenge; False when there is nothing to try."""
        try:
            challenge = parse_challenge(answer.headers.get("WWW-Authenticate", ""))
        except HeaderError as e:
            raise RegistryAuthError(f"registry {self.base_url} sent an authentication "
                                    f"challenge scangate cannot use: {e}") from None
        if challenge is None:
            return False
        scheme = challenge.scheme
        if scope in self._tokens and self._tokens[scope].startswith(scheme.capitalize()):
            return False  # our credentials were just refused
        if scheme == "basic":
            if not self.credentials:
                return False
            self._tokens[scope] = self.credentials.basic
            return True
        if scheme != "bearer":
            return False
        params = challenge.params
        if "realm" not in params:
            return False
        # The realm may be another host (Docker Hub's is), but the credentials go there only
        # over HTTPS or for an insecure registry (_send withholds them); without them the
        # realm may still grant an anonymous token that is enough.
        realm = _url(params["realm"], f"registry {self.base_url} sent a token realm",
                     RegistryAuthError)
        withheld = self.credentials is not None and not self._may_carry_credentials(realm)
        if withheld:
            self._withheld_from = realm.host
        query = {"service": params.get("service", "")}
        if scope:
            query["scope"] = scope
        token_answer = await self._send(
            "GET", realm.copy_merge_params(query), f"token service {realm.host}",
            error=RegistryAuthError, limit=TOKEN_LIMIT,
            authorization=self.credentials.basic if self.credentials else None)
        if token_answer.status in (401, 403):
            user = f"of {self.credentials.username!r}" if self.credentials else "(none given)"
            if withheld:
                raise RegistryAuthError(
                    f"token service {realm.host} of {self.base_url} refused an anonymous token "
                    f"for {scope} (HTTP {token_answer.status}); the credentials {user} were "
                    "withheld from it because it is plain HTTP and the registry is not "
                    "configured insecure")
            raise RegistryAuthError(
                f"token service of {self.base_url} refused the credentials {user} for {scope}")
        if token_answer.status != 200:
            raise RegistryUnavailable(
                f"token service answered HTTP {token_answer.status}")
        body = _parse(_Token, token_answer, f"the token service's answer to {self.base_url}",
                      RegistryAuthError)
        token = body.token or body.access_token
        if not token:
            raise RegistryAuthError("token service answered without a token")
        self._tokens[scope] = f"Bearer {token}"
        return True

    # -- API -----------------------------------------------------------------------

    async def resolve(self, ref: ImageRef, platform: str = "linux/amd64") -> Resolved:
        """The digest of `ref`'s image manifest for `platform`."""
        scope = f"repository:{ref.repository}:pull"
        path = f"/v2/{ref.repository}/manifests/{ref.digest or ref.tag or 'latest'}"
        accept = {"Accept": ", ".join(MANIFEST_TYPES)}
        # HEAD first: for an image manifest its headers are all that is needed, and Docker
        # Hub counts GETs of manifests against its pull limit but not HEADs.
        head = await self._request("HEAD", path, scope, accept)
        digest = head.headers.get("Docker-Content-Digest") or ref.digest
        if head.status == 200 and digest and head.media_type in IMAGE_TYPES:
            return Resolved(digest=digest, media_type=head.media_type)
        if head.status == 404:
            raise ImageNotFound(f"image {ref} not found in registry {self.base_url}")
        # An index (the platforms are in its body), a HEAD without a digest or of a type
        # not known to be an image manifest, or a registry that does not answer HEAD.
        response = await self._request("GET", path, scope, accept, MANIFEST_LIMIT)
        if response.status == 404:
            raise ImageNotFound(f"image {ref} not found in registry {self.base_url}")
        if response.status != 200:
            raise RegistryError(f"registry answered HTTP {response.status} for {ref}")
        digest = response.headers.get("Docker-Content-Digest") or ref.digest
        body = _parse(_Manifest, response, f"the manifest of {ref} from {self.base_url}")
        media_type = body.media_type or response.media_type
        if media_type not in INDEX_TYPES and body.manifests is None:
            if not digest:
                raise RegistryError(f"registry sent no digest for {ref}")
            return Resolved(digest=digest, media_type=media_type)
        want = _platform(platform)
        for manifest in body.manifests or []:
            p = manifest.platform
            if (p.os, p.architecture) == want[:2] and want[2] in (None, p.variant):
                return Resolved(digest=manifest.digest, media_type=manifest.media_type,
                                index_digest=digest)
        available = ", ".join(
            "/".join(x for x in (m.platform.os, m.platform.architecture) if x)
            for m in body.manifests or [])
        raise ImageNotFound(f"image {ref} has no {platform} manifest (has: {available})")

    async def layers(self, repository: str, digest: str) -> list[tuple[str, int]]:
        """The (digest, size) of each layer of the image manifest `digest`, its body
        checked against the digest (a registry cannot swap the layers of a digest)."""
        response = await self._request("GET", f"/v2/{repository}/manifests/{digest}",
                                       f"repository:{repository}:pull",
                                       {"Accept": ", ".join(IMAGE_TYPES)}, MANIFEST_LIMIT)
        if response.status == 404:
            raise ImageNotFound(f"manifest {digest} not found in {repository}")
        if response.status != 200:
            raise RegistryError(f"registry answered HTTP {response.status} for {digest}")
        if f"sha256:{hashlib.sha256(response.body).hexdigest()}" != digest:
            raise RegistryError(f"the manifest {repository}@{digest} the registry sent does "
                                f"not have that digest")
        body = _parse(_ImageManifest, response, f"the manifest {repository}@{digest}")
        return [(layer.digest, layer.size) for layer in body.layers]

    async def blob(self, repository: str, digest: str, sink: BodySink, deadline: float
                   ) -> None:
        """Stream the blob `digest` to `sink` within `deadline` seconds (the sink checks
        the size and the digest: it knows what it expects)."""
        response = await self._request("GET", f"/v2/{repository}/blobs/{digest}",
                                       f"repository:{repository}:pull", sink=sink,
                                       deadline=deadline)
        if response.status == 404:
            raise ImageNotFound(f"blob {digest} not found in {repository}")
        if response.status != 200:
            raise RegistryError(f"registry answered HTTP {response.status} for blob {digest}")

    async def tags(self, repository: str, page_size: int = 1000) -> list[str]:
        """Every tag of a repository, following pagination."""
        path = f"/v2/{repository}/tags/list?n={page_size}"
        tags: list[str] = []
        read = 0
        async for page, size in self._pages(path, f"repository:{repository}:pull", "tags"):
            read += size
            if read > LIST_LIMIT:
                raise RegistryError(
                    f"registry {self.base_url} sent more than {LIST_LIMIT >> 10} KiB for {path}")
            tags += page
        return tags

    async def list_tags(self, repository: str, keep: Callable[[str], bool], most: int,
                        page_size: int = 1000) -> TagListing:
        """The tags of a repository that `keep` accepts, at most `most` of them: the last
        ones in lexical order (for dated or zero-padded version tags, the newest), so the
        same listing always gives the same choice. Only the tags kept are held in memory,
        and reading stops after LIST_LIMIT bytes of pages (said in `truncated`)."""
        path = f"/v2/{repository}/tags/list?n={page_size}"
        chosen: list[str] = []  # a min-heap: the smallest kept tag goes first
        matched = read = 0
        truncated = ""
        async for page, size in self._pages(path, f"repository:{repository}:pull", "tags"):
            for tag in page:
                if not isinstance(tag, str) or not keep(tag):
                    continue
                matched += 1
                if len(chosen) < most:
                    heapq.heappush(chosen, tag)
                elif tag > chosen[0]:
                    heapq.heapreplace(chosen, tag)
            read += size
            if read > LIST_LIMIT:
                truncated = (f"its tag list was read up to {LIST_LIMIT >> 10} KiB, "
                             "the rest not")
                break
        if matched > most:
            truncated = "; ".join(x for x in (
                truncated, f"{matched} tags match, the last {most} in lexical order are "
                "kept") if x)
        return TagListing(sorted(set(chosen)), matched, truncated)

    async def catalog(self, page_size: int = 1000) -> AsyncIterator[list[str]]:
        """The repositories the credentials may see, page by page: a catalog of any size
        is read in the memory of one page."""
        async for page, _ in self._pages(f"/v2/_catalog?n={page_size}", "registry:catalog:*",
                                         "repositories"):
            yield page

    async def _pages(self, path: str, scope: str, key: str
                     ) -> AsyncIterator[tuple[list[str], int]]:
        """The items of each page and the page's size in bytes, following Link headers."""
        url = path
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            if url in seen:  # a Link back to an earlier page would never end
                raise RegistryError(f"registry {self.base_url} paginates {path} in a loop")
            seen.add(url)
            response = await self._request("GET", url, scope, limit=PAGE_LIMIT)
            if response.status == 404:
                raise ImageNotFound(f"{path.split('?')[0]} not found in {self.base_url}")
            if response.status != 200:
                raise RegistryError(f"registry answered HTTP {response.status} for {path}")
            page = _parse(_Page, response, f"a page of {path} from {self.base_url}")
            yield getattr(page, key) or [], len(response.body)
            try:
                link = next_link(response.headers.get("Link", ""))
            except HeaderError as e:
                raise RegistryError(f"registry {self.base_url} paginates {path} with a "
                                    f"Link scangate cannot use: {e}") from None
            if not link:
                return
            url = urljoin(self.base_url + "/", link)
        raise RegistryError(f"registry {self.base_url} has more than {MAX_PAGES} pages of {path}")


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: a number of seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def _platform(text: str) -> tuple[str, str, str | None]:
    parts = text.split("/")
    return parts[0], parts[1] if len(parts) > 1 else "amd64", parts[2] if len(parts) > 2 else None
