"""A small OCI distribution API client: tags, catalog, digests, platform resolution.

Auth follows the distribution token flow that Docker Hub, Harbor, ACR, GHCR and
Quay use: an anonymous request gets 401 with `WWW-Authenticate`; Basic is
answered with the credentials, Bearer by fetching a token for the scope from
the realm (with the credentials, if any) and retrying.

A registry is not trusted to answer well: a body that is not what the API
promises raises RegistryError naming what was wrong, without quoting the body.
"""

from __future__ import annotations

import base64
import re
import ssl
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urljoin

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scangate.core.errors import describe_validation
from scangate.core.images import ImageRef

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[:2]
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_NEXT_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
# Not transport failures but URLs that no retry can reach.
_BAD_URL = (httpx.InvalidURL, httpx.UnsupportedProtocol)
# RFC 6750 b64token: anything else cannot go into an Authorization header.
_TOKEN = r"^[A-Za-z0-9._~+/-]+=*$"


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


class _Page(_Body):
    """A page of a tag list or of the catalog."""

    tags: list[str] | None = None
    repositories: list[str] | None = None


class _Token(_Body):
    token: str | None = Field(default=None, pattern=_TOKEN)
    access_token: str | None = Field(default=None, pattern=_TOKEN)


_B = TypeVar("_B", bound=_Body)


def _parse(model: type[_B], response: httpx.Response, what: str,
           error: type[RegistryError] = RegistryError) -> _B:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as e:
        raise error(f"{what} is malformed: {describe_validation(e)}") from None


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never print a password
        return f"Credentials(username={self.username!r}, password=***)"


@dataclass(frozen=True)
class Resolved:
    """What a reference points at, for one platform."""

    digest: str
    """The image manifest's digest (for an index: the chosen platform's manifest)."""
    media_type: str
    index_digest: str | None = None
    """The index's digest when the reference named a multi-platform index."""


class RegistryClient:
    """One registry, one set of credentials; use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        credentials: Credentials | None = None,
        verify: ssl.SSLContext | bool = True,
        timeout: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.credentials = credentials
        self._http = httpx.AsyncClient(verify=verify, timeout=timeout, follow_redirects=True)
        self._tokens: dict[str, str] = {}

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._http.aclose()

    # -- requests with auth --------------------------------------------------------

    async def _request(self, method: str, path: str, scope: str,
                       headers: dict[str, str] | None = None) -> httpx.Response:
        url = path if path.startswith("http") else f"{self.base_url}{path}"
        headers = dict(headers or {})
        for _ in range(2):
            if scope in self._tokens:
                headers["Authorization"] = self._tokens[scope]
            try:
                response = await self._http.request(method, url, headers=headers)
            except _BAD_URL:  # our own URLs are sound: this is a Link the registry sent
                raise RegistryError(
                    f"registry {self.base_url} linked to {url[:200]!r}, not an http(s) URL"
                ) from None
            except httpx.HTTPError as e:
                raise RegistryUnavailable(f"registry {self.base_url} unreachable: {e}") from None
            if response.status_code != 401 or not await self._authenticate(response, scope):
                break
        if response.status_code in (401, 403):
            who = f"as {self.credentials.username!r}" if self.credentials else "anonymously"
            raise RegistryAuthError(
                f"registry {self.base_url} refused access to {scope} {who} "
                f"(HTTP {response.status_code})")
        if response.status_code >= 500 or response.status_code == 429:
            raise RegistryUnavailable(
                f"registry {self.base_url} answered HTTP {response.status_code}")
        return response

    async def _authenticate(self, response: httpx.Response, scope: str) -> bool:
        """Obtain an Authorization header for the challenge; False when there is nothing to try."""
        challenge = response.headers.get("WWW-Authenticate", "")
        scheme, _, params_text = challenge.partition(" ")
        if scope in self._tokens and self._tokens[scope].startswith(scheme.capitalize()):
            return False  # our credentials were just refused
        if scheme.lower() == "basic":
            if not self.credentials:
                return False
            pair = f"{self.credentials.username}:{self.credentials.password}".encode()
            self._tokens[scope] = "Basic " + base64.b64encode(pair).decode()
            return True
        if scheme.lower() != "bearer":
            return False
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        if "realm" not in params:
            return False
        query = {"service": params.get("service", "")}
        if scope:
            query["scope"] = scope
        basic = (httpx.BasicAuth(self.credentials.username, self.credentials.password)
                 if self.credentials else None)
        realm = params["realm"]
        try:
            token_response = await self._http.get(realm, params=query, auth=basic)
        except _BAD_URL:
            raise RegistryAuthError(
                f"registry {self.base_url} sent a token realm {realm[:200]!r}, not an http(s) URL"
            ) from None
        except httpx.HTTPError as e:
            raise RegistryUnavailable(f"token service {realm[:200]} unreachable: {e}") from None
        if token_response.status_code in (401, 403):
            who = f"of {self.credentials.username!r}" if self.credentials else "(none given)"
            raise RegistryAuthError(
                f"token service of {self.base_url} refused the credentials {who} for {scope}")
        if token_response.status_code != 200:
            raise RegistryUnavailable(
                f"token service answered HTTP {token_response.status_code}")
        body = _parse(_Token, token_response, f"the token service's answer to {self.base_url}",
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
        reference = ref.digest or ref.tag or "latest"
        response = await self._request(
            "GET", f"/v2/{ref.repository}/manifests/{reference}", scope,
            {"Accept": ", ".join(MANIFEST_TYPES)})
        if response.status_code == 404:
            raise ImageNotFound(f"image {ref} not found in registry {self.base_url}")
        if response.status_code != 200:
            raise RegistryError(f"registry answered HTTP {response.status_code} for {ref}")
        media_type = response.headers.get("Content-Type", "").split(";")[0]
        digest = response.headers.get("Docker-Content-Digest") or ref.digest
        body = _parse(_Manifest, response, f"the manifest of {ref} from {self.base_url}")
        media_type = body.media_type or media_type
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

    async def tags(self, repository: str, page_size: int = 1000) -> list[str]:
        """Every tag of a repository, following pagination."""
        return await self._paginate(f"/v2/{repository}/tags/list?n={page_size}",
                                    f"repository:{repository}:pull", "tags")

    async def catalog(self, page_size: int = 1000) -> list[str]:
        """Every repository the credentials may see, following pagination."""
        return await self._paginate(f"/v2/_catalog?n={page_size}", "registry:catalog:*",
                                    "repositories")

    async def _paginate(self, path: str, scope: str, key: str) -> list[str]:
        items: list[str] = []
        url: str | None = path
        seen: set[str] = set()
        while url:
            if url in seen:  # a Link back to an earlier page would never end
                raise RegistryError(f"registry {self.base_url} paginates {path} in a loop")
            seen.add(url)
            response = await self._request("GET", url, scope)
            if response.status_code == 404:
                raise ImageNotFound(f"{path.split('?')[0]} not found in {self.base_url}")
            if response.status_code != 200:
                raise RegistryError(f"registry answered HTTP {response.status_code} for {path}")
            page = _parse(_Page, response, f"a page of {path} from {self.base_url}")
            items += getattr(page, key) or []
            link = _NEXT_LINK.search(response.headers.get("Link", ""))
            url = urljoin(self.base_url + "/", link.group(1)) if link else None
        return items


def _platform(text: str) -> tuple[str, str, str | None]:
    parts = text.split("/")
    return parts[0], parts[1] if len(parts) > 1 else "amd64", parts[2] if len(parts) > 2 else None
