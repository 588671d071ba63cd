"""What the operator holds of one ScanRule (the shared cache's projection), and the
names a rule's objects are read and written under."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

from scangate.api import GROUP, VERSION
from scangate.core.patterns import PatternError, TagFilter, check_tag_filter
from scangate.core.rules import Scope
from scangate.core.scanstate import SCAN_NOW, SEVERITY_KEYS, Ref, parse_time, resource_version

Obj = dict[str, Any]
PLURAL = "scanrules"
RULE_LABEL = "scangate.dev/scanrule"


@dataclass(frozen=True)
class RuleState:
    """What the controller keeps of one ScanRule (its spec is small)."""

    namespace: str
    name: str
    uid: str
    generation: int
    version: int
    created: datetime
    spec: dict[str, Any] = field(hash=False, compare=False)
    scan_now: str | None = None
    observed: int | None = None
    last_run: datetime | None = None
    last_scheduled: datetime | None = None
    last_scan_now: str | None = None
    images: int | None = None
    totals: tuple[int, ...] | None = None
    receivers: list[dict[str, Any]] = field(default_factory=list, hash=False, compare=False)
    """status.notifications: each receiver's delivery state."""
    conditions: list[dict[str, Any]] = field(default_factory=list, hash=False, compare=False)
    """status.conditions, as stored."""

    @property
    def ref(self) -> Ref:
        return (self.namespace, self.name)

    @cached_property
    def tag_filter(self) -> TagFilter | None:
        """spec.tagFilter compiled (once per version held); None when it does not compile
        (the webhook refuses such a filter, and a run of the rule reports it)."""
        try:
            return check_tag_filter(self.spec.get("tagFilter") or ".*")
        except PatternError:
            return None

    @property
    def registry(self) -> Obj:
        registry = self.spec.get("registry")
        return registry if isinstance(registry, dict) else {}

    @property
    def url(self) -> str:
        return str(self.registry.get("url", "")).rstrip("/")

    @property
    def host(self) -> str:
        """The registry's host[:port], as images name it."""
        return urlsplit(self.url).netloc

    @property
    def scope(self) -> Scope:
        scope = self.spec.get("scope") or {}
        return Scope(tuple(scope.get("namespaces") or ()), tuple(scope.get("repositories") or ()))

    @property
    def schedule(self) -> str | None:
        return (self.spec.get("triggers") or {}).get("schedule") or None

    @property
    def involved(self) -> Obj:
        """The rule as an Event's involved object."""
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ScanRule",
                "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid}}


def project_rule(obj: Obj) -> RuleState:
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    observed = status.get("observedGeneration")
    return RuleState(
        namespace=str(meta.get("namespace", "")), name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")), generation=int(meta.get("generation") or 0),
        version=resource_version(obj),
        created=parse_time(meta.get("creationTimestamp")) or datetime.now(UTC),
        spec=obj.get("spec") or {},
        scan_now=(meta.get("annotations") or {}).get(SCAN_NOW),
        observed=observed if isinstance(observed, int) else None,
        last_run=parse_time((status.get("lastRun") or {}).get("time")),
        last_scheduled=parse_time(status.get("lastScheduleTime")),
        last_scan_now=status.get("lastScanNow"),
        images=status.get("images") if isinstance(status.get("images"), int) else None,
        totals=tuple((status.get("totals") or {}).get(k, 0) for k in (*SEVERITY_KEYS, "total"))
        if isinstance(status.get("totals"), dict) else None,
        receivers=[r for r in status.get("notifications") or [] if isinstance(r, dict)],
        conditions=[c for c in status.get("conditions") or [] if isinstance(c, dict)])


def describe(error: BaseException) -> str:
    """A failure in one line for a condition or an Event (never a traceback)."""
    status = getattr(error, "status", None)
    if isinstance(status, int):  # the API server's answer (kubernetes' ApiException)
        return f"the API server answered {status} {getattr(error, 'reason', '')}"
    return f"{type(error).__name__}: {str(error)[:500]}"
