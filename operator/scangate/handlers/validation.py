"""Admission checks of scangate's own resources beyond what the CRD schema can say."""

from __future__ import annotations

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


@kopf.on.validate(GROUP, VERSION, "imagescans", id="validate-imagescan-registry",
                  operations=["CREATE", "UPDATE"])
async def imagescan_on_its_rules_registry(spec: kopf.Spec, namespace: str | None,
                                          **_: Any) -> None:
    rule_ref = spec.get("ruleRef")
    if not rule_ref:
        return
    global _kube
    _kube = _kube or Kube()
    rule = await _kube.get_custom("scanrules", namespace or "", rule_ref["name"])
    if rule is None:
        errors = [FieldError("spec.ruleRef", f"ScanRule {rule_ref['name']} not found")]
    else:
        errors = check_image_on_registry(spec["image"], rule["spec"]["registry"]["url"],
                                         rule_ref["name"])
    if errors:
        raise kopf.AdmissionError(
            "ImageScan is invalid: " + "; ".join(str(e) for e in errors), code=422)
