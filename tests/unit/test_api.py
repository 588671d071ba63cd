"""The models, the generated CRDs and the semantic validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from scangate.api import ImageScan, ScanPolicy, ScanRule
from scangate.api.crds import all_crds
from scangate.cli import render_yaml
from scangate.core.validation import validate_imagescan, validate_scanpolicy, validate_scanrule

ROOT = Path(__file__).resolve().parents[2]


def test_crds_directory_is_up_to_date() -> None:
    for crd in all_crds():
        path = ROOT / "crds" / f"{crd['metadata']['name']}.yaml"
        assert path.read_text() == render_yaml(crd), (
            f"{path} is stale: run `scangate crds --output-dir crds`")


def _walk(node: dict[str, Any], path: str) -> list[str]:
    """Schema nodes lacking a type or (below the root) a description."""
    problems = [] if "type" in node else [f"{path}: no type"]
    for name, child in node.get("properties", {}).items():
        if "description" not in child and name not in ("metadata",):
            problems.append(f"{path}.{name}: no description")
        problems += _walk(child, f"{path}.{name}")
    if "items" in node:
        problems += _walk(node["items"], f"{path}[]")
    return problems


def test_every_field_is_typed_and_documented() -> None:
    for crd in all_crds():
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert "$ref" not in yaml.safe_dump(schema)
        assert _walk(schema, crd["spec"]["names"]["kind"]) == []


def test_examples_parse_as_models_and_validate() -> None:
    models: dict[str, type[BaseModel]] = {
        "ScanRule": ScanRule, "ImageScan": ImageScan, "ScanPolicy": ScanPolicy}
    seen = set()
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] in models:
                model = models[doc["kind"]].model_validate(doc)
                seen.add(doc["kind"])
                assert getattr(model, "spec", None) is not None
    assert seen == set(models)


def test_semantic_validation_names_fields() -> None:
    errors = validate_scanrule({"tagFilter": "(a)\\1", "triggers": {"schedule": "99 * * * *"},
                                "scan": {"timeout": "7h"},
                                "notifications": [{"caBundle": "not pem"}]})
    assert [e.path for e in errors] == ["spec.tagFilter", "spec.triggers.schedule",
                                        "spec.scan.timeout", "spec.notifications[0].caBundle"]
    assert [e.path for e in validate_imagescan({"image": "UPPER/case"})] == ["spec.image"]
    errors = validate_scanpolicy({"match": {"images": ["ok/*", "[bad"]},
                                  "allowlist": [{"id": "CVE-1", "images": ["x", "[y"]}],
                                  "maxScanAge": "0s"})
    assert [e.path for e in errors] == ["spec.match.images[1]", "spec.maxScanAge",
                                        "spec.allowlist[0].images[1]"]
    assert validate_scanrule({"tagFilter": ".*", "triggers": {"schedule": "@daily"}}) == []


def test_objects_that_stopped_the_operator_are_refused_naming_the_field() -> None:
    # Each of these matches the CRD's schema; stored, the cron ended the rule controller
    # (and the process) and the duration raised OverflowError on every relist of the gate.
    huge = "1000000000d"
    assert [str(e) for e in validate_scanrule({"triggers": {"schedule": "0 0 30 2 *"}})] == [
        "spec.triggers.schedule: cron expression '0 0 30 2 *' never fires: no date matches "
        "its day and month"]
    assert [e.path for e in validate_scanrule({"scan": {"timeout": huge}})] == [
        "spec.scan.timeout"]
    assert [e.path for e in validate_imagescan({"image": "a/b:1", "timeout": huge})] == [
        "spec.timeout"]
    errors = validate_scanpolicy({"maxScanAge": huge})
    assert [str(e) for e in errors] == [
        "spec.maxScanAge: invalid duration '1000000000d': longer than 3650d"]
    # A policy's receivers get the same checks as a rule's.
    assert [e.path for e in validate_scanpolicy({"notifications": [{"caBundle": "x"}]})] == [
        "spec.notifications[0].caBundle"]


def test_models_use_camel_case_and_defaults() -> None:
    rule = ScanRule.model_validate({"spec": {"registry": {"url": "http://r:5000",
                                                          "insecureSkipTLSVerify": True},
                                             "scope": {"namespaces": ["a"]}}})
    assert rule.spec.registry.insecure_skip_tls_verify is True
    dumped = rule.dump()
    assert dumped["spec"]["tagFilter"] == ".*"
    assert dumped["spec"]["scan"] == {"scanners": ["vuln"], "ignoreUnfixed": False,
                                      "timeout": "10m", "platform": "linux/amd64"}


def test_chart_crds_are_up_to_date() -> None:
    for crd in all_crds():
        path = ROOT / "charts" / "scangate" / "crds" / f"{crd['metadata']['name']}.yaml"
        assert path.read_text() == render_yaml(crd), (
            f"{path} is stale: run `scangate crds --output-dir charts/scangate/crds`")


def test_chart_values_mirror_the_settings() -> None:
    from pydantic.alias_generators import to_camel

    from scangate.config import Settings

    values = yaml.safe_load((ROOT / "charts" / "scangate" / "values.yaml").read_text())
    from scangate.api.chart import DERIVED as derived  # set by the templates, not values
    expected = {to_camel(name) for name in Settings.model_fields if name not in derived}
    assert set(values["config"]) == expected
    defaults = Settings()
    for name in Settings.model_fields:
        if name not in derived:
            default = getattr(defaults, name)
            assert values["config"][to_camel(name)] == ("" if default is None else default), name


def test_the_chart_values_schema_is_generated_and_covers_the_values() -> None:
    import json

    from scangate.api.chart import values_schema

    path = ROOT / "charts" / "scangate" / "values.schema.json"
    assert json.loads(path.read_text()) == values_schema(), (
        f"{path} is stale: run `scangate values-schema > {path}`")
    values = yaml.safe_load((ROOT / "charts" / "scangate" / "values.yaml").read_text())
    schema = values_schema()
    assert set(values) == set(schema["properties"])
    assert set(values["config"]) == set(schema["properties"]["config"]["properties"])
