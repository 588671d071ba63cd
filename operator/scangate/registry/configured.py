"""A registry client as a ScanRule configures it (its credentials, CA and TLS options),
where an image's registry is spoken to, and one TLS context per trust store (the notifier's
receivers use them too)."""

from __future__ import annotations

import functools
import ssl
from typing import Any
from urllib.parse import urlsplit

from scangate.config import Settings
from scangate.core.destinations import Destinations
from scangate.core.durations import parse_duration
from scangate.core.images import ImageRef, registry_host
from scangate.registry.auth import credentials_from_secret
from scangate.registry.client import Credentials, RegistryClient


@functools.lru_cache(maxsize=64)
def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """A TLS context per trust store, made once: loading the system's roots costs ~17 ms
    of CPU, which a new context per lookup paid every time."""
    return ssl.create_default_context(cadata=ca_bundle) if ca_bundle else (
        ssl.create_default_context())


def base_url(ref: ImageRef, rule_url: str | None, settings: Settings) -> str:
    """Where an image's registry is spoken to: its ScanRule's URL when the rule is for
    that host, Docker Hub's API host, or HTTPS (plain HTTP for insecure registries)."""
    if rule_url:
        url = rule_url.rstrip("/")
        if registry_host(urlsplit(url).netloc) == ref.registry:
            return url
    if ref.registry == "docker.io":
        return "https://registry-1.docker.io"
    insecure = ref.registry in {registry_host(r) for r in settings.insecure_registries}
    return f"{'http' if insecure else 'https'}://{ref.registry}"


def registry_client(base_url: str, registry: dict[str, Any], secret: dict[str, Any] | None,
                    host: str, settings: Settings,
                    destinations: Destinations) -> RegistryClient:
    """A client of `base_url` with the rule's `registry` settings and credentials `secret`
    (for `host` only); use as an async context manager."""
    credentials: Credentials | None = None
    if secret is not None:
        credentials = credentials_from_secret(secret, host)
    verify: ssl.SSLContext | bool = tls_context(None)
    if registry.get("insecureSkipTLSVerify"):
        verify = False
    elif registry.get("caBundle"):
        verify = tls_context(registry["caBundle"])
    return RegistryClient(base_url, credentials=credentials, verify=verify,
                          timeout=parse_duration(settings.registry_timeout).total_seconds(),
                          destinations=destinations)
