"""`scangate scan IMAGE`: a local Trivy scan, summarised as the operator stores it and
judged under ScanPolicy manifests, for pipelines with no cluster.

Trivy is the user's: `--trivy`, else the one `pip install 'scangate[scan]'` put beside
scangate's interpreter (it pins the Trivy release the operator's scan Jobs use), else
`trivy` on PATH. Its own TRIVY_* environment
applies: TRIVY_SERVER (and TRIVY_TOKEN) for a Trivy server, TRIVY_DB_REPOSITORY for a
mirror, TRIVY_INSECURE for a plain-HTTP registry; the sandbox's env file sets them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scangate.core.policy import Decision
from scangate.core.scanstate import SEVERITY_KEYS

_COLOURS = {"critical": "\033[1;35m", "high": "\033[1;31m", "medium": "\033[33m",
            "low": "\033[36m", "unknown": "\033[2m"}
_RESET = "\033[0m"
WORST = 10


class ScanError(Exception):
    """Trivy is missing or failed: exit status 2."""


def installed_trivy() -> str | None:
    """The Trivy that `pip install 'scangate[scan]'` put beside this interpreter (found even
    when its virtualenv is not activated), else the first on PATH."""
    beside = Path(sys.executable).parent / "trivy"
    return str(beside) if os.access(beside, os.X_OK) else shutil.which("trivy")


def trivy_report(image: str, trivy: str | None = None, scanners: Sequence[str] = ("vuln",),
                 vex: Sequence[str] = ()) -> bytes:
    """Trivy's JSON report of `image` with `scanners` (vuln, misconfig: the image config's
    checks, secret) and the OpenVEX documents `vex` applied (their suppressed findings
    reported apart). Its progress (DB download, layer analysis) goes to the terminal while
    it works; on failure its last lines are in the error.

    With a Trivy server (TRIVY_SERVER), the image config's checks run in a local Trivy of
    their own, as in the operator's scan Jobs: a 0.76 client loses them through a server."""
    binary = trivy or installed_trivy()
    if not binary:
        raise ScanError("no trivy beside scangate or on PATH: install it (pip install "
                        "'scangate[scan]' pins the release scangate uses) or pass --trivy")
    wanted = list(dict.fromkeys(scanners))
    apart = bool(os.environ.get("TRIVY_SERVER")) and "misconfig" in wanted and len(wanted) > 1
    main = [s for s in wanted if not (apart and s == "misconfig")]
    report = _run_trivy(binary, image, main, vex)
    if not apart:
        return report
    checks = _run_trivy(binary, image, ["misconfig"], (), {"TRIVY_SERVER": ""})
    try:
        merged = json.loads(report)
        extra = [r for r in json.loads(checks).get("Results") or []
                 if isinstance(r, dict) and r.get("Misconfigurations") is not None]
    except (ValueError, AttributeError) as e:
        raise ScanError(f"trivy printed no JSON report: {e}") from None
    merged["Results"] = [*(merged.get("Results") or []), *extra]
    return json.dumps(merged).encode()


def _run_trivy(binary: str, image: str, scanners: list[str], vex: Sequence[str],
               env: dict[str, str] | None = None) -> bytes:
    args = [binary, "image", "--format", "json", "--scanners", ",".join(scanners)]
    config = [s for s in ("misconfig", "secret") if s in scanners]
    if config:
        args += ["--image-config-scanners", ",".join(config)]
    if "misconfig" in scanners:
        args.append("--skip-check-update")  # the embedded checks: offline, as in the Jobs
    if vex and "vuln" in scanners:
        for path in vex:
            args += ["--vex", path]
        args.append("--show-suppressed")
    live = sys.stderr.isatty()
    environ = None
    if env is not None:
        environ = {k: v for k, v in os.environ.items() if k not in env} | {
            k: v for k, v in env.items() if v}
    try:
        done = subprocess.run([*args, *([] if live else ["--quiet"]), image],
                              stdout=subprocess.PIPE, stderr=None if live else subprocess.PIPE,
                              check=False, env=environ)
    except OSError as e:
        raise ScanError(f"cannot run {binary}: {e}") from None
    if done.returncode != 0:
        tail = (done.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        raise ScanError(f"trivy failed (exit {done.returncode})"
                        + (": " + " | ".join(tail) if tail else ""))
    return done.stdout


def shown(findings: Sequence[dict[str, Any]], severities: set[str] | None
          ) -> list[dict[str, Any]]:
    return [f for f in findings if severities is None or f.get("severity") in severities]


def table(image: str, summary: dict[str, Any], findings: Sequence[dict[str, Any]],
          decision: Decision | None, colour: bool,
          baseline: dict[str, Any] | None = None) -> str:
    """A readable summary: the counts, the worst findings with their fixed versions, the
    failed checks, secrets (rule and place) and VEX suppressions (`baseline`: the status
    fields of summarize), and the policies' decision."""
    def paint(severity: str, text: str) -> str:
        return f"{_COLOURS[severity]}{text}{_RESET}" if colour else text

    lines = [image, "  " + "  ".join(paint(k, f"{k.upper()} {summary.get(k, 0)}")
                                     for k in SEVERITY_KEYS)
             + f"  (total {summary.get('total', 0)})"]
    if findings:
        lines.append("")
        lines.append(f"  {'ID':<20} {'SEVERITY':<9} {'PACKAGE':<24} {'INSTALLED':<22} FIXED")
        for f in findings[:WORST]:
            severity = str(f.get("severity", "UNKNOWN"))
            lines.append(f"  {f.get('id', ''):<20} "
                         f"{paint(severity.lower(), f'{severity:<9}')} "
                         f"{str(f.get('package', ''))[:24]:<24} "
                         f"{str(f.get('installedVersion', ''))[:22]:<22} "
                         f"{f.get('fixedVersion') or '-'}")
        if len(findings) > WORST:
            lines.append(f"  … and {len(findings) - WORST} more")
    if baseline:
        lines.append("")
        lines.append(f"  baseline: {baseline.get('baseline') or '-'}")
        for c in (baseline.get("failedChecks") or [])[:WORST]:
            severity = str(c["severity"])
            lines.append(f"  {c['id']:<20} {paint(severity.lower(), f'{severity:<9}')} "
                         f"{str(c.get('title', ''))[:60]} ({c.get('target', '')})")
        for f in (baseline.get("secrets") or [])[:WORST]:
            severity = str(f["severity"])
            where = f.get("field") or (f"line {f['line']}" if f.get("line") else "")
            lines.append(f"  {f['ruleID']:<20} {paint(severity.lower(), f'{severity:<9}')} "
                         f"secret in {f.get('target', '')}{' ' + where if where else ''}")
        for f in (baseline.get("suppressedFindings") or [])[:WORST]:
            lines.append(f"  {f['id']:<20} suppressed by {f['source']} ({f['status']}"
                         f"{', ' + f['justification'] if f.get('justification') else ''})")
    if decision is not None:
        lines.append("")
        lines.append(f"policy: {'PASS' if decision.allowed else 'BLOCKED'} "
                     f"({decision.action})")
        if decision.message:
            lines.append(decision.message)
        lines += [f"warning: {w}" for w in decision.warnings]
    return "\n".join(lines)
