"""Types shared by the custom resources."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict


class Model(BaseModel):
    """Base of every API type: camelCase on the wire, docstrings as descriptions."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        extra="forbid",
    )

    def dump(self) -> dict[str, Any]:
        """The object as Kubernetes stores it: camelCase, without unset optionals."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    """One `x-kubernetes-validations` entry."""
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"
"""A duration as users write them in specs: one or more numbers each with a unit (ms, s,
m, h, d), e.g. 90s, 10m, 1h30m, 7d. Here, not in core/durations.py (which parses it), so
that the API types import nothing of core/: core imports api, never the other way."""
Duration = Annotated[str, Field(pattern=DURATION_PATTERN, max_length=32)]

Name = Annotated[str, Field(min_length=1, max_length=253)]


class Severity(StrEnum):
    """Trivy's severities, most severe first."""

    CRITICAL = "CRITICAL"
    HIGH = "HIGH"
    MEDIUM = "MEDIUM"
    LOW = "LOW"
    UNKNOWN = "UNKNOWN"


class LocalObjectReference(Model):
    """A reference to an object in the same namespace."""

    name: Name
    """Name of the object."""


class SecretKeyReference(Model):
    """A key of a Secret in the same namespace."""

    name: Name
    """Name of the Secret."""
    key: str = Field(default="url", min_length=1, max_length=253)
    """Key within the Secret's data."""


class LabelSelectorRequirement(Model):
    """A label selector requirement, as in Kubernetes' LabelSelector."""

    key: str = Field(min_length=1, max_length=317)
    """The label key the selector applies to."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """How the key relates to the values."""
    values: list[str] | None = None
    """Values for In and NotIn; empty for Exists and DoesNotExist."""


class LabelSelector(Model):
    """A Kubernetes label selector; an empty selector matches everything."""

    match_labels: dict[str, str] | None = None
    """Labels that must all be present with these values."""
    match_expressions: list[LabelSelectorRequirement] | None = None
    """Requirements that must all hold."""


class Condition(Model):
    """A kstatus-style condition, as in metav1.Condition."""

    type: str = Field(max_length=316)
    """Type of the condition, e.g. Ready."""
    status: Literal["True", "False", "Unknown"]
    """Status of the condition."""
    reason: str | None = Field(default=None, max_length=1024)
    """A CamelCase reason for the last transition."""
    message: str | None = Field(default=None, max_length=32768)
    """A human-readable message about the last transition."""
    last_transition_time: datetime | None = None
    """When the condition last changed status."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The generation the condition was set for."""


Conditions = Annotated[
    list[Condition],
    Field(
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        }
    ),
]


class SeverityCounts(Model):
    """Finding counts by severity."""

    critical: int = Field(default=0, ge=0)
    """CRITICAL findings."""
    high: int = Field(default=0, ge=0)
    """HIGH findings."""
    medium: int = Field(default=0, ge=0)
    """MEDIUM findings."""
    low: int = Field(default=0, ge=0)
    """LOW findings."""
    unknown: int = Field(default=0, ge=0)
    """Findings of UNKNOWN (or unrecognised) severity."""
    total: int = Field(default=0, ge=0)
    """All findings, whatever their severity."""


class StatusBase(Model):
    """Fields every scangate status has."""

    observed_generation: int | None = Field(default=None, ge=0)
    """The .metadata.generation this status reflects."""
    conditions: Conditions | None = None
    """Current state: Ready at least."""
