"""Admission checks of scangate's own resources beyond what the CRD schema can say."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kopf

from scangate.api import GROUP, VERSION
from scangate.core.validation import VALIDATORS, FieldError, check_image_on_registry
from scangate.kube import Kube

PLURALS = {"ScanRule": "scanrules", "ImageScan": "imagescans", "ScanPolicy": "scanpolicies"}


def _register(kind: str) -> None:
    check = VALIDATORS[kind]

    def validate(spec: kopf.Spec, **_: Any) -> None:
        errors = check(spec)
        if errors:
            raise kopf.AdmissionError(
                f"{kind} is invalid: " + "; ".join(str(e) for e in errors), code=422
            )

    kopf.on.validate(GROUP, VERSION, PLURALS[kind], id=f"validate-{PLURALS[kind]}",
                     operations=["CREATE", "UPDATE"])(validate)


for _kind in PLURALS:
    _register(_kind)


_kube: Kube | None = None
_known_registry: Callable[[str, str], str | None] | None = None
"""The registry URL of a ScanRule the operator holds in memory (set by scangate.operator)."""


def use_rules(registry_of: Callable[[str, str], str | None]) -> None:
    """Answer from the operator's watch-fed ScanRules: the operator's own ImageScans
    (a rule's run creates thousands at once) then cost the webhook no API call."""
    global _known_registry
    _known_registry = registry_of


@kopf.on.validate(GROUP, VERSION, "imagescans", id="validate-imagescan-registry",
                  operations=["CREATE", "UPDATE"])
async def imagescan_on_its_rules_registry(spec: kopf.Spec, namespace: str | None,
                                          **_: Any) -> None:
    rule_ref = spec.get("ruleRef")
    if not rule_ref:
        return
    url = _known_registry(namespace or "", rule_ref["name"]) if _known_registry else None
    if url is None:  # a rule created a moment ago: not seen by the watch yet
        global _kube
        _kube = _kube or Kube(threads=4)
        rule = await _kube.get_custom("scanrules", namespace or "", rule_ref["name"])
        url = rule["spec"]["registry"]["url"] if rule is not None else None
    if url is None:
        errors = [FieldError("spec.ruleRef", f"ScanRule {rule_ref['name']} not found")]
    else:
        errors = check_image_on_registry(spec["image"], url, rule_ref["name"])
    if errors:
        raise kopf.AdmissionError(
            "ImageScan is invalid: " + "; ".join(str(e) for e in errors), code=422)
