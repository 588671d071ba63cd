"""What the operator holds of each ScanPolicy and Namespace (the shared cache's
projections): the parsed policy or why it cannot be used, and a namespace's labels."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from scangate.core.policy import Policy, PolicyError, parse_policy
from scangate.core.scanstate import resource_version

log = logging.getLogger("scangate.admission")
Obj = dict[str, Any]


@dataclass(frozen=True)
class PolicyState:
    name: str
    version: int
    policy: Policy | None
    """None when the stored object cannot be used (the webhook refuses such objects)."""
    error: str = ""
    """Why it cannot be used."""
    uid: str = ""
    generation: int = 0
    ready: Obj | None = field(default=None, compare=False)
    """The stored Ready condition."""

    def desired(self) -> tuple[str, str, str]:
        """The Ready condition it should carry: status, reason, message."""
        if self.policy is None:
            return ("False", "InvalidSpec",
                    f"{self.error}; the admission gate leaves this policy out until it is "
                    "fixed")
        return ("True", "Enforced", "the admission gate applies this policy")

    def current(self) -> tuple[str, str, str] | None:
        held = self.ready or {}
        if held.get("observedGeneration") != self.generation:
            return None
        return (str(held.get("status")), str(held.get("reason")), str(held.get("message")))


def project_policy(obj: Obj) -> PolicyState:
    meta = obj.get("metadata") or {}
    name = str(meta.get("name", ""))
    policy: Policy | None = None
    error = ""
    try:
        policy = parse_policy(obj)
    except PolicyError as e:
        error = str(e)
    except Exception as e:  # whatever else one policy raises is that policy's
        error = f"ScanPolicy {name}: {type(e).__name__}: {e}"
    if policy is None:
        log.warning("ScanPolicy %s ignored: %s", name, error)
    conditions = (obj.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if isinstance(c, dict) and c.get("type") == "Ready"),
                 None)
    generation = meta.get("generation")
    return PolicyState(name, resource_version(obj), policy, error[:2000],
                       str(meta.get("uid", "")),
                       generation if isinstance(generation, int) else 0, ready)


@dataclass(frozen=True)
class NamespaceState:
    name: str
    labels: dict[str, str] = field(hash=False)


def project_namespace(obj: Obj) -> NamespaceState:
    meta = obj.get("metadata") or {}
    return NamespaceState(str(meta.get("name", "")), dict(meta.get("labels") or {}))
