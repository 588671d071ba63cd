"""The VEX documents of the operator's namespace, held current by a watch.

Only ConfigMaps of the operator's own namespace are read (a tenant's never are): the ones
ScanPolicies reference (spec.vex) and the one the vexConfigMap setting names. Each is
parsed once per change (scangate.core.vex); a document that cannot be used is logged,
counted (scangate_object_failures_total{kind="VEX"}) and named in the messages of the
policies that reference it, never a crash. Scan Jobs mount the same ConfigMaps
(scanning.job): `wanted` tells the reconciler which.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

from scangate import metrics
from scangate.config import Settings
from scangate.core.policy import Policy
from scangate.core.scanstate import resource_version
from scangate.core.vex import VexDocument, VexError, VexState, document_name, parse_openvex
from scangate.kube import Kube, Obj
from scangate.watch import Feed, Sink

log = logging.getLogger("scangate.vex")
MAX_KEYS = 64
"""Keys of one ConfigMap read as documents (the rest are left out, and said so)."""


@dataclass(frozen=True)
class ConfigMapDocuments:
    """One ConfigMap's keys, parsed: documents, and the reason of each that is not one."""

    name: str
    version: int
    documents: dict[str, VexDocument] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def project_configmap(obj: Obj) -> ConfigMapDocuments:
    meta = obj.get("metadata") or {}
    name = str(meta.get("name", ""))
    held = ConfigMapDocuments(name, resource_version(obj))
    data = obj.get("data") or {}
    for i, (key, text) in enumerate(sorted(data.items() if isinstance(data, dict) else [])):
        doc = document_name(name, str(key))
        if i >= MAX_KEYS:
            held.errors[doc] = f"ConfigMap {name} has more than {MAX_KEYS} keys"
            continue
        try:
            held.documents[doc] = parse_openvex(doc, str(text))
        except VexError as e:
            held.errors[doc] = str(e)
        except Exception as e:  # one hostile document is its own problem
            held.errors[doc] = f"{type(e).__name__}: {e}"
    return held


class VexDocuments:
    """ConfigMaps of the operator's namespace as VEX documents."""

    def __init__(self, kube: Kube, settings: Settings) -> None:
        self.settings = settings
        self.configmaps: dict[str, ConfigMapDocuments] = {}
        self.policies: Callable[[], Iterable[Policy]] = lambda: ()
        """The usable ScanPolicies (the gate's)."""
        self._reported: set[tuple[str, str]] = set()
        self.feed: Feed[ConfigMapDocuments] = Feed(
            "vex-configmaps", partial(kube.core.list_namespaced_config_map, settings.namespace),
            project_configmap, Sink(self._replace, self._upsert, self._delete))

    async def run(self) -> None:
        await self.feed.run()

    def _replace(self, items: list[ConfigMapDocuments]) -> None:
        self.configmaps = {c.name: c for c in items}

    def _upsert(self, item: ConfigMapDocuments) -> None:
        held = self.configmaps.get(item.name)
        if held is None or item.version < 0 or item.version >= held.version:
            self.configmaps[item.name] = item

    def _delete(self, item: ConfigMapDocuments) -> None:
        self.configmaps.pop(item.name, None)

    def _cluster_wide(self) -> tuple[str, ...]:
        held = self.configmaps.get(self.settings.vex_config_map or "")
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
            held = self.configmaps.get(configmap)
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
