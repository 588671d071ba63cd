"""Admission checks of scangate's own resources beyond what the CRD schema can say.

Besides the spec checks of core.validation: an ImageScan with a ruleRef names only images
on its rule's registry, and an object that has the operator read a Secret (a rule's
credentials, a receiver's URL and signing key, an ImageScan's rule's credentials) is
accepted only from a user the API server lets read that Secret (a SubjectAccessReview
with the request's user, groups, uid and extra). An UPDATE is checked only for Secrets
named anew or put to a new use (see core.validation.secrets_to_check).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from scangate.api import GROUP, VERSION
from scangate.config import Settings
from scangate.core.validation import (
    VALIDATORS,
    FieldError,
    SecretUse,
    check_image_on_registry,
    secret_uses,
    secrets_to_check,
)
from scangate.kube import Kube, Obj

log = logging.getLogger("scangate.validation")
PLURALS = {"ScanRule": "scanrules", "ImageScan": "imagescans", "ScanPolicy": "scanpolicies"}
REVIEW_TIMEOUT = 5.0
"""Seconds the API server may take to say whether a user may read a Secret."""


def _refuse(kind: str, errors: list[FieldError]) -> None:
    if errors:
        raise kopf.AdmissionError(f"{kind} is invalid: " + "; ".join(str(e) for e in errors),
                                  code=422)


_kube: Kube | None = None
_known_registry: Callable[[str, str], Obj | None] | None = None
"""The spec.registry of a ScanRule the operator holds in memory (set by scangate.operator)."""
_operator_namespace = Settings.model_fields["namespace"].default
_operator_user: str | None = None


def use_rules(registry_of: Callable[[str, str], Obj | None], operator_namespace: str) -> None:
    """Answer from the operator's watch-fed ScanRules: the operator's own ImageScans
    (a rule's run creates thousands at once) then cost the webhook no API call."""
    global _known_registry, _operator_namespace
    _known_registry = registry_of
    _operator_namespace = operator_namespace


def _api() -> Kube:
    global _kube
    _kube = _kube or Kube(threads=4)
    return _kube


async def _rule_registry(namespace: str, rule: str) -> Obj | None:
    """The spec.registry of ScanRule `rule`, None when there is no such rule."""
    registry = _known_registry(namespace, rule) if _known_registry else None
    if registry is None:  # a rule created a moment ago: not seen by the watch yet
        found = await _api().get_custom("scanrules", namespace, rule)
        registry = found["spec"]["registry"] if found is not None else None
    return registry


@kopf.on.validate(GROUP, VERSION, "imagescans", id="validate-imagescan-registry",
                  operations=["CREATE", "UPDATE"])
async def imagescan_on_its_rules_registry(spec: kopf.Spec, namespace: str | None,
                                          **_: Any) -> None:
    rule_ref = spec.get("ruleRef")
    if not rule_ref:
        return
    registry = await _rule_registry(namespace or "", rule_ref["name"])
    if registry is None:
        errors = [FieldError("spec.ruleRef", f"ScanRule {rule_ref['name']} not found")]
    else:
        errors = check_image_on_registry(spec["image"], registry["url"], rule_ref["name"])
    _refuse("ImageScan", errors)


async def _is_operator(username: str) -> bool:
    """The operator's own writes (a rule's ImageScans) name what was checked when the rule
    was admitted: no review per ImageScan of a run."""
    global _operator_user
    if _operator_user is None:
        try:
            _operator_user = await _api().whoami()
        except Exception as e:  # asked again next time; meanwhile the review decides
            log.warning("could not learn the operator's own user: %s", type(e).__name__)
            return False
    return username == _operator_user


async def _uses(kind: str, spec: Mapping[str, Any], namespace: str) -> list[SecretUse]:
    registry = None
    if kind == "ImageScan" and (spec.get("ruleRef") or {}).get("name"):
        registry = await _rule_registry(namespace, spec["ruleRef"]["name"])
    return secret_uses(kind, spec, namespace, _operator_namespace, registry)


async def _may_read(userinfo: kopf.UserInfo, use: SecretUse) -> str | None:
    """None when the user may get the Secret; else why the object is refused."""
    who = str(userinfo.get("username") or "?")
    try:
        allowed, _ = await asyncio.wait_for(_api().may(dict(userinfo), {
            "namespace": use.namespace, "verb": "get", "group": "", "resource": "secrets",
            "name": use.name}), REVIEW_TIMEOUT)
    except Exception as e:
        return (f"could not ask the API server whether {who} may get Secret "
                f"{use.namespace}/{use.name} ({type(e).__name__}); try again")
    if allowed:
        return None
    return (f"{who} may not get Secret {use.namespace}/{use.name}: scangate reads a Secret "
            "on behalf of whoever names it only if they may read it themselves")


async def _secrets_readable_by_requester(
        kind: str, spec: Mapping[str, Any], namespace: str, userinfo: kopf.UserInfo,
        old: kopf.Body | None, operation: str | None) -> list[FieldError]:
    if await _is_operator(str(userinfo.get("username") or "")):
        return []
    uses = await _uses(kind, spec, namespace)
    if operation == "UPDATE" and old is not None:
        uses = secrets_to_check(uses, await _uses(kind, old.get("spec") or {}, namespace))
    answers: dict[tuple[str, str], str | None] = {}
    errors = []
    for use in uses:
        key = (use.namespace, use.name)
        if key not in answers:
            answers[key] = await _may_read(userinfo, use)
        if answers[key] is not None:
            errors.append(FieldError(use.path, str(answers[key])))
    return errors


def _register(kind: str) -> None:
    """One webhook per kind: the spec's checks, then (for a valid spec) its Secrets."""
    check = VALIDATORS[kind]

    async def validate(spec: kopf.Spec, namespace: str | None, userinfo: kopf.UserInfo,
                       old: kopf.Body | None = None, operation: str | None = None,
                       **_: Any) -> None:
        _refuse(kind, check(spec))
        _refuse(kind, await _secrets_readable_by_requester(
            kind, spec, namespace or "", userinfo, old, operation))

    kopf.on.validate(GROUP, VERSION, PLURALS[kind], id=f"validate-{PLURALS[kind]}",
                     operations=["CREATE", "UPDATE"])(validate)


for _kind in PLURALS:
    _register(_kind)

