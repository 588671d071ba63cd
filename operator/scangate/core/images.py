"""Image references: parsing and normalisation as the distribution reference grammar has it."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_REGISTRY = "docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9-]+)*(?::[0-9]+)?$"
    r"|^\[[0-9a-fA-F:]+\](?::[0-9]+)?$"
)
# ASCII: the grammar's \w is Go's ([A-Za-z0-9_]), not Unicode's letters and digits.
_TAG = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
_PORT = re.compile(r":([0-9]+)$")
_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-fA-F0-9]{32,}$")


class InvalidReference(ValueError):
    """An image reference that does not follow the grammar."""


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference; `registry` and `repository` are normalised."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """registry/repository, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def namespace(self) -> str:
        """The registry namespace: the first path component of the repository."""
        return self.repository.split("/", 1)[0]

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def with_digest(self, digest: str) -> ImageRef:
        return ImageRef(self.registry, self.repository, self.tag, digest)


def registry_host(netloc: str) -> str:
    """One spelling per registry, as a resolver reaches it: host names are not case
    sensitive, and a scheme's own port is no other registry. Policies, caches, results
    and rules compare references as text: `REGISTRY.example.com:443/app` must not slip
    past a policy for `registry.example.com/*`."""
    host = netloc.lower()
    for default in (":443", ":80"):
        host = host.removesuffix(default)
    return host


def parse_image(reference: str) -> ImageRef:
    """Parse `[registry/]repository[:tag][@digest]` into its canonical form: Docker Hub's
    names (`docker.io/library/...`), the registry host in lowercase and without HTTPS's
    default port.

    >>> str(parse_image("nginx"))
    'docker.io/library/nginx:latest'
    """
    text = reference.strip()
    if not text:
        raise InvalidReference(f"invalid image reference {reference!r}: empty")
    if len(text) > 1024:  # not quoted: the reason would drown in it, or be cut off
        raise InvalidReference(
            f"invalid image reference of {len(text)} characters: longer than 1024")
    rest, at, digest = text.partition("@")
    # fullmatch throughout: `$` alone also matches before a final newline. A bare `@`
    # names no digest: refused, not read as the tag `latest`.
    if at and not _DIGEST.fullmatch(digest):
        raise InvalidReference(f"invalid digest {digest!r} in image reference {reference!r}")
    tag = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise InvalidReference(f"invalid tag {tag!r} in image reference {reference!r}")
    first, _, remainder = rest.partition("/")
    is_domain = "." in first or ":" in first or first == "localhost" or first.startswith("[")
    if remainder and is_domain:
        registry, repository = first, remainder
        if not _DOMAIN.fullmatch(registry):
            raise InvalidReference(
                f"invalid registry {registry!r} in image reference {reference!r}")
        port = _PORT.search(registry)
        if port and not 0 < int(port.group(1)) <= 65535:  # nothing listens there
            raise InvalidReference(
                f"invalid port in registry {registry!r} of image reference {reference!r}")
        registry = registry_host(registry)
    else:
        registry, repository = DEFAULT_REGISTRY, rest
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"
    if not _PATH.fullmatch(repository):
        raise InvalidReference(
            f"invalid repository {repository!r} in image reference {reference!r}: "
            "use lowercase letters, digits and separators (. _ -)"
        )
    if tag is None and not digest:
        tag = "latest"
    return ImageRef(registry, repository, tag, digest or None)
