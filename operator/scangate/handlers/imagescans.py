"""ImageScan and scan-Job events wake the scan reconciler; it does the work."""

from __future__ import annotations

from typing import Any

import kopf

from scangate.api import GROUP, VERSION
from scangate.scanning.job import SCAN_LABEL
from scangate.scanning.reconciler import ScanReconciler


def register(reconciler: ScanReconciler) -> None:
    @kopf.on.event(GROUP, VERSION, "imagescans")
    def imagescan_changed(**_: Any) -> None:
        reconciler.wake()

    @kopf.on.event("batch", "v1", "jobs", labels={SCAN_LABEL: kopf.PRESENT})
    def scan_job_changed(**_: Any) -> None:
        reconciler.wake()
