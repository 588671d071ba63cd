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
from scangate.core.images import InvalidReference, parse_image
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
    for i, n in enumerate(spec.get("notifications") or []):
        errors += _check(f"spec.notifications[{i}].caBundle", n.get("caBundle"), _pem)
    return errors


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
    return errors


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
    expected = urlsplit(registry_url).netloc
    if host != expected:
        return [FieldError("spec.image", f"{host} is not the registry of ScanRule {rule} "
                                         f"({expected}); an ImageScan may only name images on "
                                         "its rule's registry")]
    return []
