"""The CustomResourceDefinitions, generated from the models (`scangate crds`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from scangate.api import GROUP, VERSION, ImageScan, ScanPolicy, ScanRule
from scangate.api.schema import Schema, structural

CATEGORY = "scangate"


@dataclass(frozen=True)
class Kind:
    model: type[BaseModel]
    kind: str
    plural: str
    short_names: tuple[str, ...]
    scope: str
    columns: tuple[tuple[str, str, str, int], ...]  # name, type, jsonPath, priority


def _age() -> tuple[str, str, str, int]:
    return ("Age", "date", ".metadata.creationTimestamp", 0)


def _ready() -> tuple[str, str, str, int]:
    return ("Ready", "string", '.status.conditions[?(@.type=="Ready")].status', 0)


KINDS = (
    Kind(ScanRule, "ScanRule", "scanrules", ("sr", "scanrule"), "Namespaced", (
        ("Registry", "string", ".spec.registry.url", 0),
        ("Tag Filter", "string", ".spec.tagFilter", 1),
        ("Schedule", "string", ".spec.triggers.schedule", 0),
        _ready(),
        ("Reachable", "string",
         '.status.conditions[?(@.type=="RegistryReachable")].reason', 0),
        ("Last Run", "date", ".status.lastRun.time", 0),
        ("Trigger", "string", ".status.lastRun.trigger", 1),
        ("Images", "integer", ".status.images", 1),
        ("Critical", "integer", ".status.totals.critical", 0),
        ("High", "integer", ".status.totals.high", 0),
        _age(),
    )),
    Kind(ImageScan, "ImageScan", "imagescans", ("is", "imgscan"), "Namespaced", (
        ("Image", "string", ".spec.image", 0),
        ("Phase", "string", ".status.phase", 0),
        ("Critical", "integer", ".status.summary.critical", 0),
        ("High", "integer", ".status.summary.high", 0),
        ("Medium", "integer", ".status.summary.medium", 0),
        ("Low", "integer", ".status.summary.low", 0),
        ("Baseline", "string", ".status.baseline", 0),
        ("Malware", "integer", ".status.malware.count", 0),
        ("Digest", "string", ".status.digest", 1),
        ("Reused From", "string", ".status.reusedFrom", 1),
        _age(),
    )),
    Kind(ScanPolicy, "ScanPolicy", "scanpolicies", ("sp", "scanpol"), "Cluster", (
        ("Action", "string", ".spec.action", 0),
        ("Critical", "integer", ".spec.thresholds.critical", 0),
        ("High", "integer", ".spec.thresholds.high", 0),
        ("Fixable Only", "boolean", ".spec.fixableOnly", 0),
        ("Unscanned", "string", ".spec.unscanned", 0),
        _ready(),
        _age(),
    )),
)


def _schema(kind: Kind) -> Schema:
    schema = structural(kind.model)
    # apiVersion, kind and metadata are the API server's: describe them, never constrain them.
    schema["properties"]["apiVersion"] = {"type": "string",
                                          "description": "APIVersion of the object."}
    schema["properties"]["kind"] = {"type": "string", "description": "Kind of the object."}
    schema["properties"]["metadata"] = {"type": "object"}
    schema.pop("required", None)
    schema["required"] = ["spec"]
    return schema


def crd(kind: Kind) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{kind.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.kind.lower(),
                "shortNames": list(kind.short_names),
                "categories": [CATEGORY],
            },
            "scope": kind.scope,
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": n, "type": t, "jsonPath": p, **({"priority": pr} if pr else {})}
                    for n, t, p, pr in kind.columns
                ],
                "schema": {"openAPIV3Schema": _schema(kind)},
            }],
        },
    }


def all_crds() -> list[dict[str, Any]]:
    return [crd(k) for k in KINDS]
