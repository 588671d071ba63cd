"""Which namespaces scangate looks after: the gate's webhook configuration sends it the
requests of these only, and the inventory scans what runs in these only.

Requests from the operator's own namespace, kube-system and namespaces labelled
scangate.dev/ignore=true never reach the gate, so the operator can always be repaired and
the cluster's own machinery never waits on it; the same namespaces are left out of the
inventory, so that one selector says what scangate covers. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scangate.api.common import LabelSelector
from scangate.core.policy import selector_matches

IGNORE_LABEL = "scangate.dev/ignore"
NAME_LABEL = "kubernetes.io/metadata.name"
"""Set by the API server on every namespace to its name (immutable)."""


def namespace_selector(operator_namespace: str) -> dict[str, Any]:
    """The namespaces whose requests the API server sends to the gate."""
    return {"matchExpressions": [
        {"key": IGNORE_LABEL, "operator": "NotIn", "values": ["true"]},
        {"key": NAME_LABEL, "operator": "NotIn",
         "values": sorted({"kube-system", operator_namespace})},
    ]}


def covers(operator_namespace: str, namespace: str, labels: Mapping[str, str] | None) -> bool:
    """Whether `namespace` (with `labels`, as the namespace watch holds them; None for one
    not known) is one the selector takes."""
    if not namespace or labels is None:
        return False
    selector = LabelSelector.model_validate(namespace_selector(operator_namespace))
    return selector_matches(selector, {**labels, NAME_LABEL: namespace})
