"""The ScanRules' change handlers: kopf says when a rule is new, changed, or found at
start-up, and when its scangate.dev/scan-now annotation takes a new value; each asks the
rule controller (scangate.scanning.rules) to look at the rule.

Whether a rule then runs is decided from its status (`observedGeneration`,
`lastScanNow`, `lastScheduleTime`), not from which handler fired: a run the operator did
not finish before it stopped, or that a replica which is not the leader was told of, is
not lost, and a handler kopf calls twice does not run the rule twice.

What kopf offers and scangate does not use here, and why:
- no `@kopf.on.delete`: it would put a finalizer on every ScanRule, and a rule (and its
  namespace) could not be deleted while scangate is not running, after `helm uninstall`
  say. A deleted rule leaves the cache by its DELETED event; its ImageScans go by
  garbage collection (they are owned by it).
- no `@kopf.daemon` or `@kopf.timer` for the schedule, for the same reason (kopf puts a
  finalizer on every object with a daemon or timer): the rule controller keeps the due
  times of all rules in one heap, and one task wakes for the next.
kopf records what it handled in the rule's status (`status.kopf`, see
scangate.operator.configure), which the operator may write, not in the tenant's metadata.
"""

from __future__ import annotations

from typing import Any

import kopf

from scangate.api import GROUP, VERSION
from scangate.core.scanstate import SCAN_NOW


@kopf.on.resume(GROUP, VERSION, "scanrules")
@kopf.on.create(GROUP, VERSION, "scanrules")
@kopf.on.update(GROUP, VERSION, "scanrules")
async def scanrule_changed(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    memo.rules.look_at((namespace or "", name))


@kopf.on.field(GROUP, VERSION, "scanrules", field=("metadata", "annotations", SCAN_NOW))
async def scanrule_scan_now(namespace: str | None, name: str, memo: Any,
                            **_: Any) -> None:
    memo.rules.look_at((namespace or "", name))
