"""From a scan Job's log to the ImageScan status fields it yields."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from datetime import UTC
from typing import Any

from scangate.core import malware
from scangate.core.framing import BEGIN, END, MAX_FRAME_BYTES, decode
from scangate.core.scanstate import parse_time, stamp
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
    db = (server if server and server.db_updated_at else local)
    result[DB_KEY] = db_stamps(db.vulnerability_db if db else None)
    os_ = os_info(report)
    if os_:
        result["os"] = os_
    return result


DB_KEY = "vulnerabilityDB"
"""The key of result_from_log's output holding the DB's stamps, for status.scannedWith."""


def db_stamps(metadata: object) -> dict[str, str]:
    """dbUpdatedAt / dbNextUpdate (RFC 3339, UTC, seconds) of a Trivy DB's metadata as
    Trivy reports it (`VulnerabilityDB` of `trivy version` or of a server's `/version`,
    or the DB's metadata.json); a stamp that is not a time is left out."""
    out: dict[str, str] = {}
    if not isinstance(metadata, dict):
        return out
    for field, key in (("UpdatedAt", "dbUpdatedAt"), ("NextUpdate", "dbNextUpdate")):
        moment = parse_time(metadata.get(field))
        if moment is not None:
            out[key] = stamp(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    return out


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
