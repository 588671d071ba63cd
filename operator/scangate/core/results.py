"""From a scan Job's log to the ImageScan status fields it yields."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from scangate.core import malware
from scangate.core.framing import BEGIN, END, MAX_FRAME_BYTES, decode
from scangate.core.trivy import ReportError, os_info, parse_report, parse_version, summarize


def result_from_log(log: str, budget_bytes: int, max_bytes: int = MAX_FRAME_BYTES,
                    scanners: Iterable[str] | None = None) -> dict[str, Any]:
    """Status fields for a finished scan's log, made with `scanners` (None: as the report
    shows); raises FrameError (FrameTooLarge when its frames decompress past `max_bytes`)
    or ReportError."""
    frames = decode(log, max_bytes=max_bytes)
    if "report" not in frames:
        raise ReportError("the scan log holds no report frame")
    report = parse_report(frames["report"])
    if "checks" in frames:
        # The image's configuration checks, run apart from a Trivy server (scanning.job).
        checks = parse_report(frames["checks"])
        report.results = [*(report.results or []),
                          *(r for r in checks.results or [] if r.misconfigurations is not None)]
    result = summarize(report, budget_bytes, scanners=scanners)
    if scanners is not None and "malware" in scanners:
        # No report from the malware step is a failed scan, never a clean one.
        if malware.FRAME not in frames:
            raise malware.MalwareError(malware.SCAN_FAILED, (
                "the malware step left no report (it crashed or was killed; see the scan "
                "pod's malware container)"))
        result.update(malware.summarize(malware.parse_report(frames[malware.FRAME]),
                                        budget_bytes // 4))
    scanner: dict[str, Any] = {"name": "trivy"}
    # Standalone: the Job's own DB (`trivy version`); client/server: the server's, in the report.
    local = parse_version(frames["version"]) if "version" in frames else None
    server = report.trivy.server if report.trivy else None
    version = (local.version if local else None) or (report.trivy.version if report.trivy
                                                      else None)
    db_updated_at = (server.db_updated_at if server else None) or (
        local.db_updated_at if local else None)
    if version:
        scanner["version"] = version
    if db_updated_at:
        scanner["dbUpdatedAt"] = db_updated_at
    result["scanner"] = scanner
    os_ = os_info(report)
    if os_:
        result["os"] = os_
    return result


def log_tail(log: str, lines: int = 5, max_chars: int = 1024) -> str:
    """The last lines of a log outside result frames, for failure messages: at most
    `max_chars` of their end, so that a message quoting them fits status.message."""
    kept: deque[str] = deque(maxlen=lines)
    in_frame = False
    for line in log.splitlines():
        if line.startswith(BEGIN):
            in_frame = True
        elif line.startswith(END):
            in_frame = False
        elif not in_frame and line.strip():
            kept.append(line)
    tail = "\n".join(kept)
    return tail[max(len(tail) - max_chars, 0):]
