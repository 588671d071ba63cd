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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from scangate.api import GROUP, VERSION
from scangate.cache import Cache
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


@dataclass
class Reviewer:
    """What the webhooks read, in kopf's memo as `reviewer` (scangate.operator): the
    cache's ScanRules (a rule's run creates thousands of ImageScans at once, which then
    cost the webhook no API call), the operator's namespace, and an API client of their
    own for what the cache cannot say."""

    cache: Cache
    operator_namespace: str
    kube: Kube = field(default_factory=lambda: Kube(threads=4))
    operator_user: str | None = None
    """Who the operator is (asked once)."""

    async def rule_registry(self, namespace: str, rule: str) -> Obj | None:
        """The spec.registry of ScanRule `rule`, None when there is no such rule."""
        held = self.cache.scanrules.items.get((namespace, rule))
        if held is not None:
            return held.registry
        # A rule created a moment ago: not seen by the watch yet.
        found = await self.kube.get_custom("scanrules", namespace, rule)
        return found["spec"]["registry"] if found is not None else None


@kopf.on.validate(GROUP, VERSION, "imagescans", id="validate-imagescan-registry",
                  operations=["CREATE", "UPDATE"])
async def imagescan_on_its_rules_registry(spec: kopf.Spec, namespace: str | None,
                                          memo: kopf.Memo, **_: Any) -> None:
    rule_ref = spec.get("ruleRef")
    if not rule_ref:
        return
    registry = await memo.reviewer.rule_registry(namespace or "", rule_ref["name"])
    if registry is None:
        errors = [FieldError("spec.ruleRef", f"ScanRule {rule_ref['name']} not found")]
    else:
        errors = check_image_on_registry(spec["image"], registry["url"], rule_ref["name"])
    _refuse("ImageScan", errors)


async def _is_operator(reviewer: Reviewer, username: str) -> bool:
    """The operator's own writes (a rule's ImageScans) name what was checked when the rule
    was admitted: no review per ImageScan of a run."""
    if reviewer.operator_user is None:
        try:
            reviewer.operator_user = await reviewer.kube.whoami()
        except Exception as e:  # asked again next time; meanwhile the review decides
            log.warning("could not learn the operator's own user: %s", type(e).__name__)
            return False
    return username == reviewer.operator_user


async def _uses(reviewer: Reviewer, kind: str, spec: Mapping[str, Any],
                namespace: str) -> list[SecretUse]:
    registry = None
    if kind == "ImageScan" and (spec.get("ruleRef") or {}).get("name"):
        registry = await reviewer.rule_registry(namespace, spec["ruleRef"]["name"])
    return secret_uses(kind, spec, namespace, reviewer.operator_namespace, registry)


async def _may_read(reviewer: Reviewer, userinfo: kopf.UserInfo, use: SecretUse) -> str | None:
    """None when the user may get the Secret; else why the object is refused."""
    who = str(userinfo.get("username") or "?")
    try:
        allowed, _ = await asyncio.wait_for(reviewer.kube.may(dict(userinfo), {
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
        reviewer: Reviewer, kind: str, spec: Mapping[str, Any], namespace: str,
        userinfo: kopf.UserInfo, old: kopf.Body | None, operation: str | None
) -> list[FieldError]:
    if await _is_operator(reviewer, str(userinfo.get("username") or "")):
        return []
    uses = await _uses(reviewer, kind, spec, namespace)
    if operation == "UPDATE" and old is not None:
        uses = secrets_to_check(uses, await _uses(reviewer, kind, old.get("spec") or {},
                                                  namespace))
    answers: dict[tuple[str, str], str | None] = {}
    errors = []
    for use in uses:
        key = (use.namespace, use.name)
        if key not in answers:
            answers[key] = await _may_read(reviewer, userinfo, use)
        if answers[key] is not None:
            errors.append(FieldError(use.path, str(answers[key])))
    return errors


def _register(kind: str) -> None:
    """One webhook per kind: the spec's checks, then (for a valid spec) its Secrets."""
    check = VALIDATORS[kind]

    async def validate(spec: kopf.Spec, namespace: str | None, userinfo: kopf.UserInfo,
                       memo: kopf.Memo, old: kopf.Body | None = None,
                       operation: str | None = None, **_: Any) -> None:
        _refuse(kind, check(spec))
        _refuse(kind, await _secrets_readable_by_requester(
            memo.reviewer, kind, spec, namespace or "", userinfo, old, operation))

    kopf.on.validate(GROUP, VERSION, PLURALS[kind], id=f"validate-{PLURALS[kind]}",
                     operations=["CREATE", "UPDATE"])(validate)


for _kind in PLURALS:
    _register(_kind)

