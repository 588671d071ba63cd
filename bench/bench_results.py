"""How much scangate adds on top of the unavoidable work of reading a Trivy result.

Baselines, measured in the same run:
- summarize: `json.loads` of the report (scangate must at least parse it);
- frame decode: base64 + gunzip of the same bytes without framing or checksum.

Run: .venv/bin/python bench/bench_results.py
"""

from __future__ import annotations

import base64
import gzip
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from scangate.core import framing
from scangate.core.results import result_from_log
from scangate.core.trivy import parse_report, summarize

SEVERITIES = ["CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN"]


def report(vulns: int) -> bytes:
    results = [{"Target": f"target-{t}", "Class": "os-pkgs", "Vulnerabilities": [
        {"VulnerabilityID": f"CVE-2024-{t:02d}{i:05d}", "PkgName": f"pkg{i % 300}",
         "InstalledVersion": "1.0.0-1", "FixedVersion": "1.0.1-1" if i % 3 else "",
         "Severity": SEVERITIES[i % 5], "Title": "x" * 80, "Description": "y" * 400}
        for i in range(vulns // 10)]} for t in range(10)]
    return json.dumps({"SchemaVersion": 2, "Results": results}).encode()


def best(fn: Any, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    print(f"{'case':<34}{'scangate':>12}{'baseline':>12}{'ratio':>8}")
    for vulns in (1_000, 10_000, 50_000):
        data = report(vulns)
        ours = best(lambda d=data: summarize(parse_report(d)))
        base = best(lambda d=data: json.loads(d))
        print(f"{f'summarize {vulns} vulns ({len(data) >> 10} KiB)':<34}"
              f"{ours * 1000:>10.1f}ms{base * 1000:>10.1f}ms{ours / base:>8.2f}")
        log = framing.encode("report", data)
        ours = best(lambda log=log: framing.decode(log))
        packed = base64.b64encode(gzip.compress(data, mtime=0))
        base = best(lambda p=packed: gzip.decompress(base64.b64decode(p)))
        print(f"{f'frame decode {vulns} vulns':<34}"
              f"{ours * 1000:>10.1f}ms{base * 1000:>10.1f}ms{ours / base:>8.2f}")
        ours = best(lambda log=log: result_from_log(log, 65536))
        base = best(lambda d=data, p=packed: (json.loads(gzip.decompress(base64.b64decode(p)))))
        print(f"{f'log -> status {vulns} vulns':<34}"
              f"{ours * 1000:>10.1f}ms{base * 1000:>10.1f}ms{ours / base:>8.2f}")


if __name__ == "__main__":
    main()
