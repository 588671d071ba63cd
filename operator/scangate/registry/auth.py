"""Registry credentials from Kubernetes Secrets (basic-auth and dockerconfigjson).

Messages name what is wrong with a Secret but never quote its values.
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

from scangate.registry.client import Credentials

BASIC_AUTH = "kubernetes.io/basic-auth"
DOCKER_CONFIG_JSON = "kubernetes.io/dockerconfigjson"


class CredentialsError(ValueError):
    """A credentials Secret scangate cannot use."""


def _text(value: object, what: str) -> str:
    """Base64 of UTF-8 text, as Secret data and a dockerconfig `auth` hold it."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # binascii.Error, UnicodeDecodeError
            return base64.b64decode(value.strip(), validate=True).decode()
    raise CredentialsError(f"{what} is not base64 of UTF-8 text")


def secret_field(secret: dict[str, Any], name: str, key: str) -> str | None:
    """A text value of a Secret; None when the key is absent."""
    value = (secret.get("data") or {}).get(key)
    return _text(value, f"Secret {name}: {key}") if value else None


def credentials_from_secret(secret: dict[str, Any], registry: str) -> Credentials | None:
    """The credentials a Secret holds for `registry` (host[:port]); None if it has none."""
    name = secret.get("metadata", {}).get("name", "?")
    kind = secret.get("type")
    if kind == BASIC_AUTH:
        username = secret_field(secret, name, "username")
        password = secret_field(secret, name, "password")
        if username is None or password is None:
            raise CredentialsError(f"Secret {name} lacks username or password")
        return Credentials(username, password)
    if kind == DOCKER_CONFIG_JSON:
        return _from_docker_config(secret_field(secret, name, ".dockerconfigjson") or "{}",
                                   f"Secret {name}: .dockerconfigjson", registry)
    raise CredentialsError(
        f"Secret {name} has type {kind!r}; use {BASIC_AUTH} or {DOCKER_CONFIG_JSON}")


def _from_docker_config(raw: str, what: str, registry: str) -> Credentials | None:
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        raise CredentialsError(f"{what} is not JSON") from None
    if not isinstance(config, dict):
        raise CredentialsError(f"{what} is not a JSON object")
    auths = config.get("auths", {})
    if not isinstance(auths, dict):
        raise CredentialsError(f"{what}: auths is not an object")
    for host, entry in auths.items():
        if _host(host) != _host(registry):
            continue
        # The registry, not the key: a key may be any length of text.
        where = f"{what}: the entry for {registry}"
        if not isinstance(entry, dict):
            raise CredentialsError(f"{where} is not an object")
        username, password = entry.get("username"), entry.get("password")
        if username and password:
            if not isinstance(username, str) or not isinstance(password, str):
                raise CredentialsError(f"{where} has a username or password that is not text")
            return Credentials(username, password)
        if entry.get("auth"):
            user, colon, password = _text(entry["auth"], f"{where}: auth").partition(":")
            if not colon:
                raise CredentialsError(f"{where}: auth is not base64 of username:password")
            return Credentials(user, password)
    return None


def _host(value: str) -> str:
    """`https://index.docker.io/v1/` and `docker.io` name the same registry."""
    host = value.split("://", 1)[-1].split("/", 1)[0]
    return "docker.io" if host in ("index.docker.io", "registry-1.docker.io") else host


def credentials_from_docker_config(raw: str, registry: str) -> Credentials | None:
    """The credentials a docker config.json holds for `registry` (the scan Job's mounted
    copy of a ScanRule's dockerconfigjson Secret)."""
    return _from_docker_config(raw, "the registry's docker config", registry)
