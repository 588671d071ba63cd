"""Checks of ScanRule, ImageScan and ScanPolicy specs that a CRD schema cannot express.

Each check returns FieldErrors naming the offending field, so that `kubectl apply`
of a bad object fails with a message a user can act on.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from scangate.core.durations import parse_duration
from scangate.core.images import InvalidReference, parse_image, registry_host
from scangate.core.patterns import PatternError, check_cron, check_glob, check_tag_filter

MAX_SCAN_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _check(path: str, value: Any, check: Callable[[Any], object]) -> list[FieldError]:
    if value is None:
        return []
    try:
        check(value)
    except (PatternError, InvalidReference, ValueError) as e:
        return [FieldError(path, str(e))]
    return []


def _timeout(value: str) -> None:
    delta = parse_duration(value)
    if not timedelta(seconds=10) <= delta <= MAX_SCAN_TIMEOUT:
        hours = int(MAX_SCAN_TIMEOUT.total_seconds()) // 3600
        raise ValueError(f"must be between 10s and {hours}h")


def _positive_duration(value: str) -> None:
    if parse_duration(value) <= timedelta(0):
        raise ValueError("must be greater than zero")


def _pem(value: str) -> None:
    if "-----BEGIN CERTIFICATE-----" not in value:
        raise ValueError("must hold PEM certificates (-----BEGIN CERTIFICATE-----)")
    try:
        # What the operator and Trivy will do with it: load it as trust anchors.
        ssl.create_default_context(cadata=value)
    except (ssl.SSLError, ValueError):
        raise ValueError("holds no PEM certificate that can be loaded") from None


def _globs(path: str, values: Iterable[str] | None) -> list[FieldError]:
    return [e for i, v in enumerate(values or []) for e in _check(f"{path}[{i}]", v, check_glob)]


def _selector(path: str, selector: Mapping[str, Any] | None) -> list[FieldError]:
    errors = []
    for i, expr in enumerate((selector or {}).get("matchExpressions") or []):
        has_values = bool(expr.get("values"))
        if expr.get("operator") in ("In", "NotIn") and not has_values:
            errors.append(FieldError(f"{path}.matchExpressions[{i}].values",
                                     f"required for operator {expr['operator']}"))
        if expr.get("operator") in ("Exists", "DoesNotExist") and has_values:
            errors.append(FieldError(f"{path}.matchExpressions[{i}].values",
                                     f"must be empty for operator {expr['operator']}"))
    return errors


def validate_scanrule(spec: Mapping[str, Any]) -> list[FieldError]:
    errors = _check("spec.tagFilter", spec.get("tagFilter"), check_tag_filter)
    errors += _check("spec.triggers.schedule", (spec.get("triggers") or {}).get("schedule"),
                     check_cron)
    errors += _check("spec.scan.timeout", (spec.get("scan") or {}).get("timeout"), _timeout)
    errors += _check("spec.registry.caBundle", (spec.get("registry") or {}).get("caBundle"), _pem)
    return errors + _receivers(spec)


def _receivers(spec: Mapping[str, Any]) -> list[FieldError]:
    """A ScanRule's or ScanPolicy's notifications."""
    return [e for i, n in enumerate(spec.get("notifications") or [])
            for e in _check(f"spec.notifications[{i}].caBundle", n.get("caBundle"), _pem)]


def validate_imagescan(spec: Mapping[str, Any]) -> list[FieldError]:
    errors = _check("spec.image", spec.get("image"), parse_image)
    errors += _check("spec.timeout", spec.get("timeout"), _timeout)
    return errors


def validate_scanpolicy(spec: Mapping[str, Any]) -> list[FieldError]:
    match = spec.get("match") or {}
    errors = _globs("spec.match.images", match.get("images"))
    errors += _globs("spec.match.excludeImages", match.get("excludeImages"))
    errors += _selector("spec.match.namespaceSelector", match.get("namespaceSelector"))
    errors += _check("spec.maxScanAge", spec.get("maxScanAge"), _positive_duration)
    for i, entry in enumerate(spec.get("allowlist") or []):
        errors += _globs(f"spec.allowlist[{i}].images", entry.get("images"))
    return errors + _receivers(spec)


VALIDATORS: dict[str, Callable[[Mapping[str, Any]], list[FieldError]]] = {
    "ScanRule": validate_scanrule,
    "ImageScan": validate_imagescan,
    "ScanPolicy": validate_scanpolicy,
}


def check_image_on_registry(image: str, registry_url: str, rule: str) -> list[FieldError]:
    """An ImageScan with a ruleRef uses the rule's credentials and TLS settings, so it may
    only name an image on the rule's own registry."""
    try:
        host = parse_image(image).registry
    except InvalidReference as e:
        return [FieldError("spec.image", str(e))]
    expected = registry_host(urlsplit(registry_url).netloc)
    if host != expected:
        return [FieldError("spec.image", f"{host} is not the registry of ScanRule {rule} "
                                         f"({expected}); an ImageScan may only name images on "
                                         "its rule's registry")]
    return []


# -- Secrets an object has scangate use ---------------------------------------------------

@dataclass(frozen=True)
class SecretUse:
    """A Secret an object has the operator read on its behalf, and what for. Only a user
    who may read the Secret may name it (the validating webhook asks the API server):
    otherwise the operator's own right to read Secrets is lent to whoever writes a spec."""

    path: str
    """The field that names it."""
    namespace: str
    """Where the Secret lives."""
    name: str
    use: tuple[str, ...]
    """Where its value goes: the same Secret put to another use is checked again."""


def _receiver_uses(spec: Mapping[str, Any], namespace: str) -> list[SecretUse]:
    uses = []
    for i, receiver in enumerate(spec.get("notifications") or []):
        refs = {field: receiver.get(field) or {} for field in ("urlSecretRef",
                                                                "signingSecretRef")}
        # A receiver's URL and signing key go together (the key signs what is sent to the
        # URL): a change of either is a new use of both.
        use = ("receiver", str(receiver.get("type")),
               *(f"{r.get('name')}/{r.get('key', 'url')}" for r in refs.values()))
        uses += [SecretUse(f"spec.notifications[{i}].{field}", namespace, str(ref["name"]),
                           use) for field, ref in refs.items() if ref.get("name")]
    return uses


def secret_uses(kind: str, spec: Mapping[str, Any], namespace: str,
                operator_namespace: str, rule_registry: Mapping[str, Any] | None = None
                ) -> list[SecretUse]:
    """The Secrets an object of `kind` in `namespace` names: a ScanRule's credentials and
    receivers' Secrets, a ScanPolicy's receivers' (in the operator's namespace), and an
    ImageScan's rule's credentials (`rule_registry`: its rule's spec.registry)."""
    if kind == "ScanPolicy":
        return _receiver_uses(spec, operator_namespace)
    if kind == "ImageScan":
        rule = (spec.get("ruleRef") or {}).get("name")
        creds = ((rule_registry or {}).get("credentialsSecretRef") or {}).get("name")
        return [SecretUse("spec.ruleRef", namespace, str(creds), ("rule", str(rule)))] \
            if rule and creds else []
    registry = spec.get("registry") or {}
    creds = (registry.get("credentialsSecretRef") or {}).get("name")
    uses = [SecretUse("spec.registry.credentialsSecretRef", namespace, str(creds),
                      ("registry", str(registry.get("url", "")).rstrip("/")))] if creds else []
    return uses + _receiver_uses(spec, namespace)


def secrets_to_check(new: list[SecretUse], old: list[SecretUse]) -> list[SecretUse]:
    """On UPDATE: only the Secrets named anew or put to a new use. What was accepted stays
    accepted for whoever may edit the object (a relabel, a scan-now, the garbage
    collector's finalizer removal must not need the right to read its Secrets)."""
    held = {(u.namespace, u.name, u.use) for u in old}
    return [u for u in new if (u.namespace, u.name, u.use) not in held]
