"""Admission checks of scangate's own resources beyond what the CRD schema can say."""

from __future__ import annotations

from typing import Any

import kopf

from scangate.api import GROUP, VERSION
from scangate.core.validation import VALIDATORS

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
