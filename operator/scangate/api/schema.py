"""Pydantic JSON Schema -> Kubernetes structural OpenAPI v3 schema.

A CRD schema must be structural: every node has a type, no $ref, no anyOf for
optionality, no JSON-Schema-only keywords. This converts pydantic's output to
that form, keeping descriptions, defaults, enums, patterns, bounds and the
x-kubernetes-* extensions set on fields.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

Schema = dict[str, Any]

_KEEP = {
    "description", "default", "enum", "pattern", "format", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems",
    "minProperties", "maxProperties", "type", "nullable",
}
_FORMATS = {"date-time", "date", "byte", "int32", "int64", "duration"}


def structural(model: type[BaseModel]) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs: dict[str, Schema] = raw.pop("$defs", {})
    return _convert(raw, defs)


def _convert(node: Schema, defs: dict[str, Schema]) -> Schema:
    node = dict(node)
    if "$ref" in node:  # inline, letting the field's own keywords win over the model's
        target = defs[node.pop("$ref").split("/")[-1]]
        node = {**target, **node}
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**node.pop("allOf")[0], **node}
        return _convert(node, defs)
    if "anyOf" in node:  # Optional[X] -> X: absence is how optionality is spelled
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"unsupported union in schema: {options}")
        node.pop("default", None) if node.get("default") is None else None
        return _convert({**_convert(options[0], defs), **node}, defs)
    if "const" in node:
        node["enum"] = [node.pop("const")]
        node.setdefault("type", "string")
    # Lists copied: an enum shared by two fields would come out of YAML as an anchor.
    out: Schema = {k: list(v) if isinstance(v, list) else v for k, v in node.items()
                   if k in _KEEP or k.startswith("x-kubernetes-")}
    if out.get("format") not in _FORMATS:
        out.pop("format", None)
    if "description" in out:  # docstrings wrap; kubectl explain re-wraps
        out["description"] = " ".join(out["description"].split())
    if "default" in out and out["default"] is None:
        del out["default"]
    kind = node.get("type")
    if kind == "object" or "properties" in node:
        out["type"] = "object"
        props = node.get("properties")
        if props:
            out["properties"] = {k: _convert(v, defs) for k, v in props.items()}
            required = [r for r in node.get("required", []) if r in props]
            if required:
                out["required"] = required
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and not props:
            out["additionalProperties"] = _convert(extra, defs)
        elif not props and extra is not False:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = _convert(node.get("items", {}), defs)
    if "type" not in out:
        raise ValueError(f"schema node without a type: {node}")
    return out
