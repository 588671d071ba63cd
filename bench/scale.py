"""Scale benchmark of the operator's watch-fed ImageScan state, on a sandbox cluster.

Creates N ImageScans (default 10,000) over ten namespaces, each with the status a
completed scan leaves (findings near the byte budget), so no Trivy run is needed
for them. With the operator holding them it measures the operator's RSS, its CPU
over an idle window, the LIST requests of ImageScans and Jobs the API server
served in that window (its own apiserver_request_total), and finally how long 1,000
new ImageScans over the sandbox's named test images take to complete.

Targets (for 10,000 ImageScans): RSS <= 300 MiB; idle CPU <= 2% of a core; no
LIST of ImageScans or Jobs in 60 s idle; 1,000 new ImageScans Completed within 20 s.
A MISS is a finding, not an error: the exit status is non-zero only when the
benchmark itself could not run.

Run: make bench-scale ARGS="--count 1000 --new 100"
     .venv/bin/python bench/scale.py [--sandbox-dir DIR] [--json FILE] ...
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import secrets
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from harness import (
    BENCH_ERRORS,
    GROUP_VERSION,
    TABLE,
    Api,
    Figures,
    Process,
    Target,
    bench_parser,
    bounded,
    log,
    percentile,
    restart_operator,
    run_bench,
    run_in_sandbox,
    target,
)
from prometheus_client.parser import text_string_to_metric_families

# The operator's source root, for its constants.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from sandbox.controlplane import Sandbox, load_env
from scangate.core.trivy import DEFAULT_FINDINGS_BUDGET, SEVERITIES

NAMESPACES = 10
REFUSED_HOST = "169.254.169.254"

RSS_TARGET_MIB = 300.0
CPU_TARGET_PERCENT = 2.0
DRAIN_TARGET_S = 20.0
TARGET_COUNT = 10_000

MiB = 1024 * 1024

# Debian packages that really do collect CVEs, for findings that look like a scan's.
PACKAGES = (
    "openssl", "libssl3", "libc6", "libc-bin", "zlib1g", "curl", "libcurl4", "libexpat1",
    "libxml2", "libwebp7", "libtiff6", "libpng16-16", "libjpeg62-turbo", "libsqlite3-0",
    "perl-base", "bash", "coreutils", "tar", "gzip", "libgnutls30", "libkrb5-3",
    "libgssapi-krb5-2", "libldap-2.5-0", "libsystemd0", "libudev1", "ncurses-base",
    "libncursesw6", "libpcre2-8-0", "libzstd1", "liblzma5", "libgcrypt20", "libtasn1-6",
    "libidn2-0", "libnghttp2-14", "libssh2-1", "openssh-client", "git", "python3.11",
    "libpython3.11-minimal", "libde265-0", "libheif1", "imagemagick",
    "libmagickcore-6.q16-6", "ghostscript", "libfreetype6", "libharfbuzz0b", "libx11-6",
    "libxpm4", "libaom3", "libvpx7", "libavcodec59", "login", "passwd", "util-linux",
    "libblkid1", "libmount1", "e2fsprogs", "libext2fs2", "libpam0g", "sudo", "wget",
    "libnettle8", "libhogweed6", "gnupg", "gpgv", "apt", "libapt-pkg6.0", "dpkg",
    "libdb5.3", "libsasl2-2", "libpq5", "libmariadb3", "libcups2", "libdbus-1-3",
    "libglib2.0-0", "libopenjp2-7", "libraw20", "libsndfile1", "libtinfo6",
)
# Per (severity, has a fix): more entries than any object lists of that kind.
POOL_SIZE = 700


def stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the status of a completed scan ------------------------------------------------------


def _version(rng: random.Random) -> tuple[str, int]:
    base = f"{rng.randint(1, 9)}.{rng.randint(0, 40)}.{rng.randint(0, 20)}-{rng.randint(1, 9)}"
    return base, rng.randint(1, 9)


def finding_pool(seed: int = 2026) -> dict[tuple[str, bool], list[str]]:
    """Compact JSON findings by (severity, fixed), each missing its `"target"` and closing
    brace (the target names the object's image), sorted by id as the operator sorts them."""
    rng = random.Random(seed)
    seen: set[str] = set()
    pool: dict[tuple[str, bool], list[str]] = {}
    for severity in SEVERITIES:
        for fixed in (True, False):
            entries: list[dict[str, str]] = []
            while len(entries) < POOL_SIZE:
                cve = f"CVE-{rng.randint(2016, 2025)}-{rng.randint(1000, 52999)}"
                if cve in seen:
                    continue
                seen.add(cve)
                base, update = _version(rng)
                finding = {"id": cve, "severity": severity, "package": rng.choice(PACKAGES),
                           "installedVersion": f"{base}+deb12u{update}"}
                if fixed:  # the operator leaves fixedVersion out when there is none
                    finding["fixedVersion"] = f"{base}+deb12u{update + rng.randint(1, 3)}"
                finding["class"] = "os-pkgs"
                entries.append(finding)
            entries.sort(key=lambda f: f["id"])
            pool[severity, fixed] = [json.dumps(f, separators=(",", ":"))[:-1] for f in entries]
    return pool


@dataclass
class Result:
    """One generated completed status as a merge-patch body."""

    body: bytes
    critical: int
    findings_bytes: int
    truncated: bool


def completed_status(pool: dict[tuple[str, bool], list[str]], run: str, i: int, image: str,
                     budget: int) -> Result:
    """What a completed scan of a large image leaves in status, the same for the same `i`
    (so that a re-patch keeps the operator's totals). Every tenth is a small image's
    result, the rest hold several hundred findings and are cut at the byte budget."""
    rng = random.Random(i)
    small = i % 10 == 9
    ranges = ({"CRITICAL": (0, 1), "HIGH": (0, 3), "MEDIUM": (0, 8), "LOW": (0, 10),
               "UNKNOWN": (0, 2)} if small else
              {"CRITICAL": (1, 20), "HIGH": (20, 120), "MEDIUM": (250, 600), "LOW": (100, 500),
               "UNKNOWN": (0, 25)})
    summary: dict[str, int] = {}
    fixable: dict[str, int] = {}
    suffix = "," + json.dumps({"target": f"{image} (debian 12.5)"}, separators=(",", ":"))[1:]
    # Most severe first, fixable first within a severity, cut where the next finding would
    # exceed the budget: scangate.core.trivy.bound_findings, with sizes added up per piece.
    listed: list[str] = []
    size, truncated = 2, False
    for severity in SEVERITIES:
        count = rng.randint(*ranges[severity])
        fixed = round(count * rng.uniform(0.6, 0.9))
        summary[severity.lower()], fixable[severity.lower()] = count, fixed
        for has_fix, n in ((True, fixed), (False, count - fixed)):
            entries = pool[severity, has_fix]
            start = rng.randrange(len(entries) - n + 1)
            for entry in entries[start:start + n]:
                if truncated:
                    break
                cost = len(entry) + len(suffix) + 1
                if size + cost > budget:
                    truncated = True
                    break
                size += cost
                listed.append(entry + suffix)
    summary["total"], fixable["total"] = sum(summary.values()), sum(fixable.values())
    now = stamp()
    digest = hashlib.sha256(f"{run}/{i}".encode()).hexdigest()
    status = {
        "observedGeneration": 1, "phase": "Completed", "digest": f"sha256:{digest}",
        "platform": "linux/amd64", "queuedAt": now, "startTime": now, "completionTime": now,
        "scannedAt": now, "attempts": 1, "jobName": f"scan-{digest[:12]}-1",
        "scanner": {"name": "trivy", "version": "0.76.0"},
        "os": {"family": "debian", "name": "12.5"},
        "summary": summary, "fixable": fixable, "findingsTruncated": truncated,
        "scannedWith": {"scanners": ["vuln"], "ignoreUnfixed": False},
        # null removes what the operator may have written first (see settle()).
        "reason": None, "message": None, "retryAfter": None, "reusedFrom": None,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Completed",
                        "message": "scan completed", "lastTransitionTime": now,
                        "observedGeneration": 1}],
    }
    head = json.dumps({"status": status}, separators=(",", ":"))[:-2]
    body = f'{head},"findings":[{",".join(listed)}]}}}}'.encode()
    return Result(body, summary["critical"], size, truncated)


async def request_counts(api: Api) -> Counter[tuple[str, str]]:
    """apiserver_request_total of LIST and WATCH of ImageScans and Jobs, summed over
    codes, scopes and clients (the metric has no client label)."""
    text = (await api.call("GET", "/metrics", accept="text/plain")).text
    # Only the lines of the one counter: the whole exposition is megabytes.
    lines = "\n".join(line for line in text.splitlines()
                      if line.startswith("apiserver_request_total{"))
    counts: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(lines + "\n"):
        for sample in family.samples:
            verb, resource = sample.labels.get("verb"), sample.labels.get("resource")
            if verb in ("LIST", "WATCH") and resource in ("imagescans", "jobs"):
                counts[verb, resource] += int(sample.value)
    return counts


async def operator_metrics(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{url}/metrics")).text
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def critical_total(samples: dict[str, list[tuple[dict[str, str], float]]],
                   namespaces: set[str]) -> int:
    return int(sum(value for labels, value in samples.get("scangate_vulnerabilities", [])
                   if labels.get("severity") == "critical"
                   and labels.get("namespace") in namespaces))


def operator_activity(samples: dict[str, list[tuple[dict[str, str], float]]]) -> float:
    """A number that grows with every registry lookup and scan outcome of the operator."""
    return sum(value for name in ("scangate_registry_requests_total", "scangate_scans_total")
               for _, value in samples.get(name, []))


def scans_by_result(samples: dict[str, list[tuple[dict[str, str], float]]]) -> Counter[str]:
    return Counter({labels.get("result", ""): int(value)
                    for labels, value in samples.get("scangate_scans_total", [])})


# -- the steps -----------------------------------------------------------------------------


@dataclass
class Bench:
    api: Api
    env: dict[str, str]
    operator: Process
    args: argparse.Namespace
    sandbox: Sandbox
    run: str = field(default_factory=lambda: secrets.token_hex(3))
    figures: Figures = field(default_factory=dict)

    @property
    def namespaces(self) -> list[str]:
        return [f"bench-scale-{self.run}-{k}" for k in range(NAMESPACES)]

    def place(self, i: int) -> tuple[str, str, str]:
        """Namespace, name and image of the i-th stored ImageScan: on a host the operator
        refuses to contact (link-local), so that it fails the new scan at once instead of
        asking the registry for a made-up image."""
        return (self.namespaces[i % NAMESPACES], f"app-{i:05d}",
                f"{REFUSED_HOST}/bench/app-{i}:1.0")

    async def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        return await operator_metrics(self.env["SCANGATE_METRICS"])

    async def populate(self, pool: dict[tuple[str, bool], list[str]]) -> int:
        """Create the stored ImageScans with completed statuses; their critical count.

        The status subresource ignores status on create, so each object is first a new,
        Pending scan, which the operator fails (its host is refused). Each result is
        written once a watch has seen that failure: a result written earlier would be
        overwritten by it (see settle()). Creating and writing overlap."""
        count = self.args.count
        for namespace in self.namespaces:
            await self.api.create_namespace(namespace)
        critical, findings_bytes, truncated = 0, 0, 0
        status_bytes = 0
        failed: asyncio.Queue[int] = asyncio.Queue()

        async def create(i: int) -> None:
            namespace, name, image = self.place(i)
            await self.api.create_scan(namespace, name, image, self.run)

        async def complete(_: int) -> None:
            nonlocal critical, findings_bytes, truncated, status_bytes
            try:
                i = await asyncio.wait_for(failed.get(), 300)
            except TimeoutError:
                raise RuntimeError("the operator failed no new stored ImageScan in 300 s "
                                   "(their host is refused)") from None
            namespace, name, image = self.place(i)
            result = completed_status(pool, self.run, i, image, self.args.budget)
            await self.api.patch_status(namespace, name, result.body)
            critical += result.critical
            findings_bytes += result.findings_bytes
            truncated += result.truncated
            status_bytes += len(result.body)

        started = time.monotonic()
        workers = max(self.args.concurrency // 2, 1)
        try:
            async with asyncio.TaskGroup() as group:
                watch = group.create_task(self.watch_failed(failed))
                completing = group.create_task(
                    bounded(count, workers, complete, "results written"))
                await bounded(count, workers, create, "created")
                posted = time.monotonic()
                await completing
                watch.cancel()
        except* BENCH_ERRORS as group_error:
            raise group_error.exceptions[0] from None
        elapsed = time.monotonic() - started
        self.figures["create"] = {
            "count": count, "seconds": round(elapsed, 2), "per_second": round(count / elapsed, 1),
            "post_seconds": round(posted - started, 2),
            "status_kib_avg": round(status_bytes / count / 1024, 1),
            "findings_kib_avg": round(findings_bytes / count / 1024, 1),
            "truncated": truncated, "critical": critical, "budget": self.args.budget}
        log(f"  created {count} in {elapsed:.1f}s")
        return critical

    async def watch_failed(self, failed: asyncio.Queue[int]) -> None:
        """Put the index of each stored ImageScan into `failed` once it has left Pending
        (the operator failed it), as a watch of the run's ImageScans (table rows) sees."""
        params = {"watch": "true", "includeObject": "None", "timeoutSeconds": "3600",
                  "labelSelector": f"bench.scangate.dev/run={self.run}"}
        seen: set[int] = set()
        while True:  # a new watch lists every object again: `seen` skips the known ones
            columns: list[str] = []
            async with self.api.client.stream(
                    "GET", f"/apis/{GROUP_VERSION}/imagescans", params=params,
                    headers={"Accept": TABLE}, timeout=httpx.Timeout(None)) as response:
                async for line in response.aiter_lines():
                    event = json.loads(line) if line.strip() else {}
                    if event.get("type") not in ("ADDED", "MODIFIED"):
                        continue
                    table = event["object"]
                    columns = [c["name"] for c in table.get("columnDefinitions") or []] or columns
                    name, phase = columns.index("Name"), columns.index("Phase")
                    for row in table.get("rows") or []:
                        i = int(row["cells"][name].removeprefix("app-"))
                        if row["cells"][phase] not in (None, "", "Pending") and i not in seen:
                            seen.add(i)
                            failed.put_nowait(i)
            log("  the watch of the stored ImageScans ended; watching again")

    async def wait_loaded(self, expected: int, figure: str = "load_seconds") -> None:
        """Until the operator's per-namespace totals add up to what was stored."""
        names = set(self.namespaces)
        started = time.monotonic()
        timeout = max(120.0, self.args.count / 20)
        seen = -1
        while time.monotonic() - started < timeout:
            seen = critical_total(await self.metrics(), names)
            if seen == expected:
                self.figures[figure] = round(time.monotonic() - started, 2)
                return
            await asyncio.sleep(0.5)
        raise RuntimeError(f"the operator did not load the ImageScans within {timeout:.0f}s: "
                           f"scangate_vulnerabilities critical over the bench namespaces is "
                           f"{seen}, stored {expected}")

    async def settle(self, pool: dict[tuple[str, bool], list[str]]) -> int:
        """Re-patch every stored ImageScan the operator overwrote, until it is quiet.

        populate() writes each result after the operator failed the new scan; should a
        failure still land after the result (work queued with a stale picture), the
        result is written again. This ends when the operator's counters stand still and
        nothing is left to fix."""
        count = self.args.count
        started = time.monotonic()
        timeout = max(300.0, count / 10)
        repatched: set[int] = set()
        before = operator_activity(await self.metrics())
        while True:
            await asyncio.sleep(3)
            wrong: list[int] = []
            listed = 0
            for k, namespace in enumerate(self.namespaces):
                phases = await self.api.phases(namespace)
                listed += len(phases)
                wrong += [i for i in range(k, count, NAMESPACES)
                          if phases.get(self.place(i)[1]) != "Completed"]
            if listed != count:
                raise RuntimeError(f"{listed} ImageScans listed in the bench namespaces, "
                                   f"{count} created")

            async def fix(j: int, wrong: list[int] = wrong) -> None:
                namespace, name, image = self.place(wrong[j])
                result = completed_status(pool, self.run, wrong[j], image, self.args.budget)
                await self.api.patch_status(namespace, name, result.body)

            await bounded(len(wrong), self.args.concurrency, fix)
            repatched.update(wrong)
            after = operator_activity(await self.metrics())
            if not wrong and after == before:
                break
            before = after
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"the operator kept rewriting stored ImageScans for "
                                   f"{timeout:.0f}s ({len(wrong)} not Completed at the last "
                                   "look)")
        self.figures["settle"] = {"repatched": len(repatched),
                                  "seconds": round(time.monotonic() - started, 1)}
        return len(repatched)

    async def idle(self) -> None:
        """RSS, CPU and the API server's request counters over an idle window."""
        seconds = self.args.idle_seconds
        requests_before = await request_counts(self.api)
        cpu_before, wall_before = self.operator.cpu_seconds(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu_after, wall_after = self.operator.cpu_seconds(), time.monotonic()
        requests_after = await request_counts(self.api)
        cpu = cpu_after - cpu_before
        wall = wall_after - wall_before
        delta = {f"{verb} {resource}": requests_after[verb, resource]
                 - requests_before[verb, resource]
                 for verb in ("LIST", "WATCH") for resource in ("imagescans", "jobs")}
        self.figures["idle"] = {"seconds": round(wall, 1), "cpu_seconds": round(cpu, 2),
                                "cpu_percent": round(100 * cpu / wall, 2), "requests": delta}

    async def drain(self) -> None:
        """New ImageScans over the named test images: from the first create to all done."""
        count = self.args.new
        images = list(dict.fromkeys(entry["image"] for entry in json.loads(
            (self.args.sandbox_dir / "images.json").read_text())))
        namespace = f"bench-scale-{self.run}-drain"
        await self.api.create_namespace(namespace)
        results_before = scans_by_result(await self.metrics())
        created: dict[str, float] = {}
        finished: dict[str, tuple[float, str]] = {}

        async def create(i: int) -> None:
            name = f"scan-{i:05d}"
            await self.api.create_scan(namespace, name, images[i % len(images)], self.run)
            created[name] = time.monotonic()

        first = time.monotonic()
        creating = asyncio.create_task(bounded(count, self.args.concurrency, create))
        deadline = first + self.args.drain_timeout
        phases: dict[str, str] = {}
        while len(finished) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if creating.done():
                creating.result()  # a failed create is an error of the benchmark
            phases = await self.api.phases(namespace)
            seen = time.monotonic()  # no later than this: conservative by one LIST
            for name, phase in phases.items():
                if phase in ("Completed", "Failed") and name not in finished:
                    finished[name] = (seen, phase)
        await creating
        creation = max(created.values()) - first
        results = scans_by_result(await self.metrics()) - results_before
        failed = sorted(n for n, (_, phase) in finished.items() if phase == "Failed")
        completed = [t for t, phase in finished.values() if phase == "Completed"]
        latencies = sorted(finished[n][0] - created[n] for n in finished
                           if finished[n][1] == "Completed")
        reasons = []
        for name in failed[:3]:
            status = (await self.api.get_scan(namespace, name)).get("status") or {}
            reasons.append(f"{name}: {status.get('reason')}: {status.get('message')}")
        self.figures["drain"] = {
            "count": count, "images": len(images), "namespace": namespace,
            "create_seconds": round(creation, 2),
            "completed": len(completed), "failed": len(failed),
            "unfinished": dict(Counter(p or "(none)" for n, p in phases.items()
                                       if n not in finished)),
            "all_completed_seconds": (round(max(completed) - first, 2)
                                      if len(completed) == count else None),
            "timeout_seconds": self.args.drain_timeout,
            "latency_p50": round(statistics.median(latencies), 2) if latencies else None,
            "latency_p95": round(percentile(latencies, 0.95), 2) if latencies else None,
            "latency_max": round(latencies[-1], 2) if latencies else None,
            "trivy_scans": results["completed"], "reused": results["reused"],
            "retried": results["retried"], "failed_reasons": reasons}

    async def restart(self, expected: int) -> None:
        """A new operator process that loads the stored ImageScans by its paged LIST, as a
        restarted pod does: its RSS, without the history of the one that saw them made."""
        log("restarting the operator (cold load of the stored ImageScans)")
        self.figures["rss_running_mib"] = self.figures["rss_loaded_mib"]
        began = time.monotonic()
        await restart_operator(self.sandbox)
        # A new process, and a new metrics port.
        self.env = load_env(self.args.sandbox_dir)
        self.operator = Process(self.args.sandbox_dir, "operator")
        await self.wait_loaded(expected, "restart_load_seconds")
        self.figures["restart_load_seconds"] = round(time.monotonic() - began, 2)
        self.figures["rss_loaded_mib"] = round(self.operator.rss_mib(), 1)

    async def cleanup(self) -> None:
        """Delete the bench's namespaces (a reused sandbox); the namespace controller
        removes their ImageScans in the background."""
        await self.api.delete_namespaces([*self.namespaces, f"bench-scale-{self.run}-drain"])

    async def main(self) -> None:
        pool = finding_pool()
        self.figures["rss_before_mib"] = round(self.operator.rss_mib(), 1)
        log(f"creating {self.args.count} ImageScans in {NAMESPACES} namespaces "
            f"(bench-scale-{self.run}-*)")
        expected = await self.populate(pool)
        log("waiting for the operator's totals to match what was stored")
        await self.wait_loaded(expected)
        log("waiting for the operator to settle (re-patching scans it overwrote)")
        await self.settle(pool)
        await self.wait_loaded(expected, "settled_load_seconds")  # all there still
        self.sandbox.check_alive()
        self.figures["rss_loaded_mib"] = round(self.operator.rss_mib(), 1)
        if self.args.restart_operator:
            await self.restart(expected)
        log(f"idle window of {self.args.idle_seconds:.0f}s")
        await self.idle()
        self.sandbox.check_alive()
        self.figures["rss_after_idle_mib"] = round(self.operator.rss_mib(), 1)
        self.figures["rss_peak_mib"] = round(self.operator.peak_mib(), 1)
        self.figures["other_rss_mib"] = {
            name: round(Process(self.args.sandbox_dir, name).rss_mib(), 1)
            for name in ("kube-apiserver", "etcd")}
        log(f"drain: {self.args.new} new ImageScans over the named test images")
        await self.drain()
        self.sandbox.check_alive()
        self.figures["rss_after_drain_mib"] = round(self.operator.rss_mib(), 1)
        self.figures["warnings"] = dict(self.api.warnings)


# -- the report ----------------------------------------------------------------------------


def describe(figures: Figures) -> str:
    """The figures, for people."""
    create, idle, drain = figures["create"], figures["idle"], figures["drain"]
    requests = idle["requests"]
    lines = [
        f"scangate scale benchmark: {create['count']} stored ImageScans, "
        f"{drain['count']} new over {drain['images']} images",
        f"  create          {create['count']} in {create['seconds']:.1f} s "
        f"({create['per_second']:.0f}/s: POSTs done after {create['post_seconds']:.1f} s, "
        "each result PATCHed once the operator failed the new scan); status "
        f"{create['status_kib_avg']:.1f} KiB avg, "
        f"findings {create['findings_kib_avg']:.1f} KiB avg, {create['truncated']} truncated "
        f"at {create['budget']} bytes",
        f"  operator load   totals matched {create['critical']} critical "
        f"{figures['load_seconds']:.1f} s after the last status PATCH",
        f"  settle          {figures['settle']['repatched']} ImageScans overwritten by the "
        f"operator's own resolution and re-patched; quiet after "
        f"{figures['settle']['seconds']:.0f} s"]
    rss = (f"before {figures['rss_before_mib']:.1f} MiB, loaded "
           + (f"{figures['rss_running_mib']:.1f} MiB; restarted: loaded "
              f"{figures['rss_loaded_mib']:.1f} MiB ({figures['restart_load_seconds']:.1f} s "
              "from stop to totals matching)" if "rss_running_mib" in figures else
              f"{figures['rss_loaded_mib']:.1f} MiB"))
    others = figures["other_rss_mib"]
    lines += [
        f"  operator RSS    {rss}, after idle {figures['rss_after_idle_mib']:.1f} MiB, peak "
        f"{figures['rss_peak_mib']:.1f} MiB (VmHWM)",
        f"                  after the drain test {figures['rss_after_drain_mib']:.1f} MiB "
        "(not a target figure)",
        f"  (for scale)     kube-apiserver RSS {others['kube-apiserver']:.0f} MiB, etcd "
        f"{others['etcd']:.0f} MiB",
        f"  idle CPU        {idle['cpu_percent']:.2f}% of a core ({idle['cpu_seconds']:.2f} s "
        f"CPU in {idle['seconds']:.1f} s)",
        "  idle requests   " + ", ".join(f"{k} {v}" for k, v in requests.items()),
        "                  (apiserver_request_total, cluster-wide: the operator is the only "
        "client listing imagescans;\n                  kube-controller-manager may list jobs "
        "on a rare informer relist; WATCH counts watches that ended)"]
    done = drain["all_completed_seconds"]
    lines.append(
        f"  drain           {drain['count']} created in {drain['create_seconds']:.1f} s; "
        + (f"all Completed {done:.1f} s after the first create" if done is not None else
           f"{drain['completed']} Completed, {drain['failed']} Failed, unfinished "
           f"{drain['unfinished']} after {drain['timeout_seconds']:.0f} s"))
    if drain["latency_p50"] is not None:
        lines.append(
            f"                  create to Completed: p50 {drain['latency_p50']:.1f} s, p95 "
            f"{drain['latency_p95']:.1f} s, max {drain['latency_max']:.1f} s (polled every "
            f"0.5 s); Trivy scans {drain['trivy_scans']}, reused {drain['reused']}, "
            f"retried {drain['retried']}, failed {drain['failed']}")
    lines += [f"                  failed {reason}" for reason in drain["failed_reasons"]]
    lines += [f"  API warning     {n}x {warning}" for warning, n in figures["warnings"].items()]
    if create["count"] != TARGET_COUNT:
        lines.append(f"  (the targets are set for {TARGET_COUNT} stored ImageScans; this run "
                     f"has {create['count']})")
    return "\n".join(lines)


def rss_figure(figures: Figures) -> float:
    """The operator's RSS holding the stored ImageScans: the largest of loaded, restarted
    and after the idle window."""
    return float(max(figures["rss_loaded_mib"], figures["rss_after_idle_mib"],
                     figures.get("rss_running_mib", 0.0)))


def targets(figures: Figures) -> list[Target]:
    idle, drain = figures["idle"], figures["drain"]
    requests, done, count = idle["requests"], drain["all_completed_seconds"], drain["count"]
    rss = rss_figure(figures)
    return [
        target(f"operator RSS with {figures['create']['count']} ImageScans",
               f"<= {RSS_TARGET_MIB:.0f} MiB", f"{rss:.1f} MiB", rss <= RSS_TARGET_MIB),
        target("idle CPU", f"<= {CPU_TARGET_PERCENT:g}%", f"{idle['cpu_percent']:.2f}% of a core",
               idle["cpu_percent"] <= CPU_TARGET_PERCENT),
        target(f"LIST of imagescans/jobs in {idle['seconds']:.0f} s idle", "none",
               f"{requests['LIST imagescans']} imagescans, {requests['LIST jobs']} jobs",
               requests["LIST imagescans"] + requests["LIST jobs"] == 0),
        target(f"{count} new ImageScans Completed", f"<= {DRAIN_TARGET_S:.0f} s",
               f"{done:.1f} s (p95 per scan {drain['latency_p95']} s)" if done is not None
               else f"{drain['completed']}/{count} Completed, {drain['failed']} Failed",
               done is not None and done <= DRAIN_TARGET_S),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench/scale.py", __doc__)
    parser.add_argument("--count", type=int, default=TARGET_COUNT,
                        help="ImageScans stored with completed results (default %(default)s)")
    parser.add_argument("--new", type=int, default=1000,
                        help="new ImageScans of the drain test (default %(default)s)")
    parser.add_argument("--idle-seconds", type=float, default=60.0,
                        help="length of the idle window (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="API requests in flight while creating (default %(default)s)")
    parser.add_argument("--budget", type=int, default=DEFAULT_FINDINGS_BUDGET,
                        help="findings byte budget of the stored results (the operator's "
                             "default %(default)s)")
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="give up on the drain test after this many seconds")
    parser.add_argument("--restart-operator", action="store_true",
                        help="after loading, restart the operator and measure the new process "
                             "(a cold load by LIST) as well")
    parser.add_argument("--keep", action="store_true",
                        help="keep the bench's namespaces in a reused sandbox")
    args = parser.parse_args(argv)
    if args.count < 1 or args.new < 1 or args.concurrency < 1 or args.idle_seconds <= 0:
        parser.error("--count, --new, --concurrency and --idle-seconds must be positive")
    return args


async def run(args: argparse.Namespace, sandbox: Sandbox) -> Figures:
    if "SCANGATE_METRICS" not in load_env(args.sandbox_dir):
        raise RuntimeError(f"{args.sandbox_dir} runs no operator (start it with --operator)")
    return await run_bench(args, args.concurrency, lambda api, env: Bench(
        api, env, Process(args.sandbox_dir, "operator"), args, sandbox))


def main(argv: list[str] | None = None) -> int:
    return run_in_sandbox("bench-scale", parse_args(argv), run, targets, describe)


if __name__ == "__main__":
    sys.exit(main())
