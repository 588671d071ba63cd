"""Registry credentials from Kubernetes Secrets (basic-auth and dockerconfigjson)."""

from __future__ import annotations

import base64
import json
from typing import Any

from scangate.registry.client import Credentials

BASIC_AUTH = "kubernetes.io/basic-auth"
DOCKER_CONFIG_JSON = "kubernetes.io/dockerconfigjson"


class CredentialsError(ValueError):
    """A credentials Secret scangate cannot use."""


def _field(secret: dict[str, Any], key: str) -> str | None:
    value = (secret.get("data") or {}).get(key)
    return base64.b64decode(value).decode() if value else None


def credentials_from_secret(secret: dict[str, Any], registry: str) -> Credentials | None:
    """The credentials a Secret holds for `registry` (host[:port]); None if it has none."""
    name = secret.get("metadata", {}).get("name", "?")
    kind = secret.get("type")
    if kind == BASIC_AUTH:
        username, password = _field(secret, "username"), _field(secret, "password")
        if username is None or password is None:
            raise CredentialsError(f"Secret {name} lacks username or password")
        return Credentials(username, password)
    if kind == DOCKER_CONFIG_JSON:
        raw = _field(secret, ".dockerconfigjson")
        try:
            auths = json.loads(raw or "{}").get("auths", {})
        except json.JSONDecodeError:
            raise CredentialsError(f"Secret {name}: .dockerconfigjson is not JSON") from None
        for host, entry in auths.items():
            if _host(host) != _host(registry):
                continue
            if entry.get("username") and entry.get("password"):
                return Credentials(entry["username"], entry["password"])
            if entry.get("auth"):
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                return Credentials(user, password)
        return None
    raise CredentialsError(
        f"Secret {name} has type {kind!r}; use {BASIC_AUTH} or {DOCKER_CONFIG_JSON}")


def _host(value: str) -> str:
    """`https://index.docker.io/v1/` and `docker.io` name the same registry."""
    host = value.split("://", 1)[-1].split("/", 1)[0]
    return "docker.io" if host in ("index.docker.io", "registry-1.docker.io") else host
