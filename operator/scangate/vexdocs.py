"""The VEX documents of the operator's namespace, from the shared cache.

Only ConfigMaps of the operator's own namespace are read (a tenant's never are): the ones
ScanPolicies reference (spec.vex) and the one the vexConfigMap setting names. Each is
parsed once per change (scangate.core.vex); a document that cannot be used is logged,
counted (scangate_object_failures_total{kind="VEX"}) and named in the messages of the
policies that reference it, never a crash. Scan Jobs mount the same ConfigMaps
(scanning.job): `wanted` tells the reconciler which.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from scangate import metrics
from scangate.cache import Cache
from scangate.config import Settings
from scangate.core.policy import Policy
from scangate.core.vex import ConfigMapDocuments, VexDocument, VexState

log = logging.getLogger("scangate.vex")


class VexDocuments:
    """ConfigMaps of the operator's namespace as VEX documents: what the cache holds of
    them (handlers.watches feeds it) read for the scan reconciler and the gate."""

    def __init__(self, cache: Cache, settings: Settings) -> None:
        self.settings, self.cache = settings, cache
        self._reported: set[tuple[str, str]] = set()

    def _configmap(self, name: str) -> ConfigMapDocuments | None:
        return self.cache.configmaps.items.get((self.settings.namespace, name))

    def policies(self) -> Iterable[Policy]:
        """The usable ScanPolicies."""
        return [p.policy for p in self.cache.scanpolicies.items.values() if p.policy]

    def _cluster_wide(self) -> tuple[str, ...]:
        held = self._configmap(self.settings.vex_config_map or "")
        return tuple(sorted([*held.documents, *held.errors])) if held else ()

    def wanted(self) -> tuple[str, ...]:
        """The documents scan Jobs apply: every policy's and the setting's (sorted)."""
        names = set(self._cluster_wide())
        for policy in self.policies():
            names.update(policy.vex_documents)
        return tuple(sorted(names))

    def state(self) -> VexState:
        """The documents the policies reference, as they are now."""
        documents: dict[str, VexDocument] = {}
        errors: dict[str, str] = {}
        for name in self.wanted():
            configmap, _, key = name.partition("/")
            held = self._configmap(configmap)
            if held is None:
                errors[name] = f"ConfigMap {configmap} not found in namespace " \
                               f"{self.settings.namespace}"
            elif name in held.documents:
                documents[name] = held.documents[name]
            else:
                errors[name] = held.errors.get(name) or f"ConfigMap {configmap} has no key {key}"
            if name in errors:
                self._report(name, errors[name])
        return VexState(documents, errors, self._cluster_wide())

    def _report(self, name: str, error: str) -> None:
        if (name, error) not in self._reported:
            if len(self._reported) > 1024:
                self._reported.clear()
            self._reported.add((name, error))
            metrics.OBJECT_FAILURES.labels("VEX", "InvalidDocument").inc()
            log.warning("VEX document %s not applied: %s", name, error[:300])
