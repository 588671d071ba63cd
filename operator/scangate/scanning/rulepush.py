"""What a push asks of the ScanRules: the ImageScan of each pushed tag under every rule
that covers it, created or sent back to Pending when it holds another digest's result.
An event repeated (registries retry) or a tag pushed again with the same digest asks
for nothing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from scangate.api.imagescan import Phase
from scangate.core.patterns import TagFilter
from scangate.core.rules import Wanted, matching_rules, registry_host, scan_name
from scangate.core.rulestate import RuleState
from scangate.core.scanstate import Ref, ScanState
from scangate.registry.events import PushedImage


@dataclass(frozen=True)
class PushedScan:
    """The ImageScan `wanted` of `rule` for a pushed tag: to create when `held` is None,
    else `held`, to scan again."""

    rule: RuleState
    wanted: Wanted
    held: ScanState | None

    @property
    def ref(self) -> Ref:
        return (self.rule.namespace, self.wanted.name)


def pushed_scans(images: Iterable[PushedImage], rules: Iterable[tuple[RuleState, TagFilter]],
                 scans: Mapping[Ref, ScanState]) -> list[PushedScan]:
    """The ImageScans to create or scan again for `images` under `rules` (each with its
    compiled tag filter), given the ImageScans held."""
    rules = list(rules)
    candidates = [(f"{r.namespace}/{r.name}", registry_host(r.host), r.scope, f,
                   (r.spec.get("triggers") or {}).get("onPush", True)
                   and not r.spec.get("suspend")) for r, f in rules]
    by_ref = {f"{r.namespace}/{r.name}": r for r, _ in rules}
    found = []
    for image in images:
        if not image.tag:
            continue  # by digest: an index's platform manifests, then the index's tag
        for ref in matching_rules(candidates, registry_host(image.host), image.repository,
                                  image.tag):
            rule = by_ref[ref]
            name = scan_name(rule.name, image.repository, image.tag)
            held = scans.get((rule.namespace, name))
            if held is None:
                found.append(PushedScan(rule, Wanted(name, image.repository, image.tag), None))
            elif held.phase in (Phase.COMPLETED, Phase.FAILED) and image.digest != held.digest:
                # Pushed again (by the plain format: with no digest, so resolve anew).
                found.append(PushedScan(rule, Wanted(name, image.repository, image.tag), held))
    return found
