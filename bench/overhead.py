"""Scan overhead: an ImageScan from creation to Completed, against the same `trivy image`
run directly.

Over the sandbox's named test images (each platform of the multi-platform one), in
rounds after a warm-up round:
- directly: the `trivy image` line of the scan Job's script (scangate's own
  trivy_command, with the same arguments and a new empty cache directory as the Job's
  emptyDir), run on this host against the sandbox's Trivy server, its DB warm;
- through scangate: an ImageScan of the image, from its POST until a watch sees it
  Completed; then it is deleted (and gone) so that the next round scans again instead
  of reusing the result.
Figure: the sum over the images of the median ImageScan time, divided by the same sum of
the direct run. Target <= 1.15 (ClientServer). To tell where the difference goes, the
Job's whole script (also the result frames) is timed on this host too, and watches of
the scan's ImageScan, Job, Pod and Events time each step between (medians).

The named images are tiny (Trivy scans one in under 0.1 s), so the same is measured,
image by image, over images the bench builds of a realistic size (--sized, in MB
uncompressed): Trivy's time grows with what it pulls and unpacks, scangate's does not.

Then the operator is restarted with --trivy-mode Standalone (each Job downloads the DB
from the sandbox registry) and the same is measured against the direct Standalone run
(also from an empty cache, so also downloading the DB), and ClientServer against
Standalone; the operator is restarted in ClientServer mode at the end.

Run: .venv/bin/python bench/overhead.py [--rounds 3] [--sandbox-dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import (
    GROUP_VERSION,
    Api,
    Figures,
    Target,
    bench_parser,
    log,
    restart_operator,
    run_bench,
    run_in_sandbox,
    target,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from sandbox.controlplane import Sandbox
from sandbox.images import Pusher, build_image
from scangate.core.scanstate import SCAN_LABEL, SCAN_NAMESPACE_LABEL
from scangate.scanning.job import WORK, ScanJobSpec, TrivySettings, trivy_command

RATIO_TARGET = 1.15
SIZED_MEGABYTES = (125, 500)
"""About a slim Python base image, and a full one halved."""
SIZED_FILES = 4800
SCAN_TIMEOUT_S = 600
OPERATOR_NAMESPACE = "scangate-system"
"""The sandbox operator's namespace, where the scan Jobs run."""
Obj = dict[str, Any]
# The steps of one scan, each between two moments the watches saw (medians are shown).
STEPS = (
    ("resolve the tag to a digest", "created", "scan Queued"),
    ("queue, create the Job", "scan Queued", "job created"),
    ("Job controller creates the pod", "job created", "pod created"),
    ("node starts the container", "pod created", "pod running"),
    ("container runs (trivy image, the result frames)", "pod running", "pod succeeded"),
    ("operator reads the log, writes the result", "pod succeeded", "scan Completed"),
)


@dataclass(frozen=True)
class Entry:
    """One named test image on one platform."""

    name: str
    image: str
    digest: str
    platform: str | None
    megabytes: int = 0
    """One of the bench's own sized images (of this size), not a named test image; it is
    built afresh for each scan."""

    @property
    def sized(self) -> bool:
        return self.megabytes > 0

    @property
    def key(self) -> str:
        return self.name + (f" ({self.platform})" if self.platform else "")


def entries(sandbox_dir: Path) -> list[Entry]:
    return [Entry(e["name"], e["image"], e["digest"], e.get("platform"))
            for e in json.loads((sandbox_dir / "images.json").read_text())]


@functools.cache
def sized_files(megabytes: int) -> dict[str, bytes]:
    """About `megabytes` in SIZED_FILES files, compressing about 3:1, the same each run."""
    rng = random.Random(megabytes)
    size = megabytes * 1_000_000 // SIZED_FILES
    text = b"def handler(event):\n    return event\n" * (size // 36 + 1)
    files = {}
    for i in range(SIZED_FILES):
        noise = rng.randbytes(size // 3)
        files[f"usr/lib/bench/d{i // 50}/lib{i}.so"] = noise + text[:size - len(noise)]
    return files


def push_sized(registry: str, megabytes: int, variant: str) -> tuple[str, str]:
    """A Debian image of about `megabytes` uncompressed (4,800 files, 90 dpkg and 60
    Python packages), pushed; its reference and digest.

    Each `variant` differs in one file, so each has layers no scan has seen: a Trivy
    server keeps what it found in each layer, and its clients skip the layers it knows.
    A second scan of one image would measure that cache, not a scan."""
    image = build_image({
        "os": {"id": "debian", "version": "12", "version_id": "12.7",
               "pretty": "Debian GNU/Linux 12 (bookworm)"},
        "dpkg": [{"name": f"bench-lib{i}", "version": "1.0-1"} for i in range(90)],
        "python": [{"name": f"bench-py{i}", "version": "1.0"} for i in range(60)],
        "files": {**sized_files(megabytes), "etc/bench-variant": variant.encode()},
    })
    pusher = Pusher(f"http://{registry}")
    try:
        tag = f"{megabytes}mb-{variant}"
        return (f"{registry}/scangate-bench/sized:{tag}",
                pusher.image("scangate-bench/sized", tag, image))
    finally:
        pusher.close()


def job_script(entry: Entry, trivy: TrivySettings, work: Path) -> str:
    """The scan Job's script for this image, with its paths under `work`."""
    repository = entry.image.rsplit(":", 1)[0]
    spec = ScanJobSpec(scan_name="bench", scan_namespace="bench", scan_uid="bench",
                       image=f"{repository}@{entry.digest}", queued_at="", attempt=1,
                       timeout_seconds=SCAN_TIMEOUT_S,
                       platform=entry.platform or "linux/amd64", insecure_registry=True)
    return trivy_command(spec, trivy).replace(WORK, str(work))


def states(kind: str, obj: Obj) -> tuple[str, list[str]]:
    """The scan an object belongs to, and the states it shows."""
    metadata, status = obj.get("metadata") or {}, obj.get("status") or {}
    if kind == "scan":
        phase = status.get("phase")
        return metadata.get("name", ""), [f"scan {phase}"] if phase else []
    if kind == "event":
        return (obj.get("involvedObject") or {}).get("name", ""), [f"event {obj.get('reason')}"]
    scan = (metadata.get("labels") or {}).get(SCAN_LABEL, "")
    if kind == "job":
        done = any(c.get("type") == "Complete" and c.get("status") == "True"
                   for c in status.get("conditions") or [])
        return scan, ["job created", *(["job complete"] if done else [])]
    phase = status.get("phase")
    return scan, ["pod created", *(["pod running"] if phase in ("Running", "Succeeded") else []),
                  *(["pod succeeded"] if phase == "Succeeded" else [])]


@dataclass
class Timeline:
    """When each scan's objects were first seen in each state (monotonic seconds), from
    watches of ImageScans and Events in one namespace, and of the scan Jobs and pods of
    its ImageScans (in the operator's namespace)."""

    api: Api
    namespace: str
    seen: dict[tuple[str, str], float] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        ours = {"labelSelector": f"{SCAN_NAMESPACE_LABEL}={self.namespace}"}
        for kind, path, selector in (
                ("scan", f"/apis/{GROUP_VERSION}/namespaces/{self.namespace}/imagescans", {}),
                ("job", f"/apis/batch/v1/namespaces/{OPERATOR_NAMESPACE}/jobs", ours),
                ("pod", f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/pods", ours),
                ("event", f"/api/v1/namespaces/{self.namespace}/events", {})):
            self.tasks.append(asyncio.create_task(self.watch(kind, path, selector)))
        await asyncio.sleep(1)  # the watches are established

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def watch(self, kind: str, path: str, selector: dict[str, str]) -> None:
        params = {"watch": "true", "timeoutSeconds": "3600", **selector}
        async with self.api.client.stream("GET", path, params=params,
                                          timeout=httpx.Timeout(None)) as response:
            async for line in response.aiter_lines():
                seen = time.monotonic()
                if line.strip():
                    scan, found = states(kind, json.loads(line)["object"])
                    for state in found:
                        self.seen.setdefault((scan, state), seen)
                    self.changed.set()

    async def wait(self, scan: str, states: tuple[str, ...], timeout: float) -> str | None:
        """The first of `states` the scan reached, or None after `timeout`."""
        deadline = time.monotonic() + timeout
        while not (reached := [s for s in states if (scan, s) in self.seen]):
            if any(t.done() for t in self.tasks):
                raise RuntimeError(f"a watch of {self.namespace} ended")
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return reached[0]


class Bench:
    def __init__(self, api: Api, env: dict[str, str], args: argparse.Namespace,
                 sandbox: Sandbox) -> None:
        self.api, self.env, self.args, self.sandbox = api, env, args, sandbox
        self.run = uuid.uuid4().hex[:6]
        self.entries = entries(Path(args.sandbox_dir))
        self.figures: Figures = {}
        self.namespaces: list[str] = []

    def trivy(self, mode: str) -> TrivySettings:
        return TrivySettings(mode=mode, server_url=self.env["TRIVY_SERVER"],
                             db_repository=self.env["TRIVY_DB_REPOSITORY"],
                             insecure_db_repository=True)

    async def direct(self, entry: Entry, mode: str, whole: bool = False) -> float:
        """Seconds of the Job's `trivy image` run on this host, from an empty cache (with
        `whole`, of the Job's whole script: also the result frames)."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TRIVY_")}
        environ.update(TRIVY_INSECURE="true", **(
            {"TRIVY_TOKEN": self.env["TRIVY_TOKEN"]} if mode == "ClientServer" else {}))
        environ["PATH"] = f"{Path(self.env['TRIVY']).parent}:{environ.get('PATH', '')}"
        with tempfile.TemporaryDirectory(prefix="scangate-bench-trivy-") as work:
            script = job_script(entry, self.trivy(mode), Path(work))
            argv = (["sh", "-c", script] if whole else shlex.split(next(
                line for line in script.splitlines() if line.startswith("trivy image "))))
            began = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *argv, env=environ, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            seconds = time.monotonic() - began
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)}: exit {proc.returncode}: "
                               f"{err.decode(errors='replace')[-1000:]}")
        return seconds

    async def fresh(self, entry: Entry, round_: str) -> tuple[Entry, Entry]:
        """What to run directly and what to scan: a named image twice, or two new pushes
        of a sized one."""
        if not entry.sized:
            return entry, entry
        pushed = [await asyncio.to_thread(push_sized, self.env["REGISTRY"], entry.megabytes,
                                          f"{round_}-{use}") for use in ("direct", "scan")]
        ran, scanned = (dataclasses.replace(entry, image=image, digest=digest)
                        for image, digest in pushed)
        return ran, scanned

    async def scan(self, timeline: Timeline, name: str, entry: Entry) -> dict[str, float]:
        """One ImageScan from POST to Completed, then deleted (and gone): the moments the
        watches saw, relative to the POST."""
        namespace = timeline.namespace
        path = f"/apis/{GROUP_VERSION}/namespaces/{namespace}/imagescans/{name}"
        began = time.monotonic()
        await self.api.create_scan(namespace, name, entry.image, self.run, entry.platform)
        reached = await timeline.wait(name, ("scan Completed", "scan Failed"), SCAN_TIMEOUT_S)
        status = (await self.api.get_scan(namespace, name)).get("status") or {}
        if reached != "scan Completed":
            raise RuntimeError(f"ImageScan {namespace}/{name} ({entry.key}) not Completed "
                               f"after {time.monotonic() - began:.0f}s: phase "
                               f"{status.get('phase')}, {status.get('reason')}: "
                               f"{status.get('message')}")
        if status.get("reusedFrom"):
            raise RuntimeError(f"{namespace}/{name} reused the result of "
                               f"{status['reusedFrom']}: this bench needs a sandbox where no "
                               "other ImageScan holds a result of the named test images")
        # The operator records the event once it holds the result it wrote. A deletion it
        # sees before that is undone in its index by that late write, and every later
        # scan of the digest then waits in Queued to reuse the deleted result.
        await timeline.wait(name, ("event ScanCompleted",), 30)
        await self.api.call("DELETE", path)
        while (await self.api.call("GET", path, ok=(200, 404))).status_code == 200:
            await asyncio.sleep(0.05)
        return {state: seen - began
                for (scan, state), seen in list(timeline.seen.items()) if scan == name}

    async def mode(self, mode: str, rounds: int) -> Figures:
        namespace = f"bench-overhead-{self.run}-{mode.lower()}"
        self.namespaces.append(namespace)
        await self.api.create_namespace(namespace)
        timeline = Timeline(self.api, namespace)
        await timeline.start()
        direct: dict[str, list[float]] = {e.key: [] for e in self.entries}
        scripts: dict[str, list[float]] = {e.key: [] for e in self.entries}
        scans: dict[str, list[float]] = {e.key: [] for e in self.entries}
        steps: dict[str, list[float]] = {step: [] for step, _, _ in STEPS}
        try:
            for r in range(rounds + 1):  # round 0 warms up: not counted
                log(f"  {mode}: round {r} of {rounds}{' (warm-up)' if r == 0 else ''}")
                for i, entry in enumerate(self.entries):
                    ran, scanned = await self.fresh(entry, f"{mode.lower()}-{self.run}-{r}")
                    seconds = await self.direct(ran, mode)
                    script = await self.direct(ran, mode, whole=True)
                    moments = await self.scan(timeline, f"r{r}-{i}", scanned)
                    if r:
                        direct[entry.key].append(seconds)
                        scripts[entry.key].append(script)
                        scans[entry.key].append(moments["scan Completed"])
                        moments["created"] = 0.0
                        for step, a, b in STEPS:
                            if a in moments and b in moments:
                                steps[step].append(moments[b] - moments[a])
        finally:
            await timeline.stop()
        per_image = {e.key: {"scan_seconds": round(statistics.median(scans[e.key]), 3),
                             "direct_seconds": round(statistics.median(direct[e.key]), 3),
                             "sized": e.sized}
                     for e in self.entries}
        for v in per_image.values():
            v["ratio"] = round(v["scan_seconds"] / v["direct_seconds"], 2)
        named = [v for v in per_image.values() if not v["sized"]]
        scan_total = sum(v["scan_seconds"] for v in named)
        direct_total = sum(v["direct_seconds"] for v in named)
        return {"rounds": rounds, "images": per_image,
                "scan_seconds": round(scan_total, 3), "direct_seconds": round(direct_total, 3),
                "ratio": round(scan_total / direct_total, 2),
                # What an ImageScan adds to a scan, whatever the image: the ratio meets
                # the target once `trivy image` takes this divided by 0.15 or more.
                "added_seconds": round(statistics.median(
                    v["scan_seconds"] - v["direct_seconds"] for v in named), 3),
                "job_script_seconds": round(sum(statistics.median(scripts[e.key])
                                                for e in self.entries if not e.sized), 3),
                "steps_median_seconds": {step: round(statistics.median(v), 3) if v else None
                                         for step, v in steps.items()}}

    async def main(self) -> None:
        self.entries += [Entry(f"{mb} MB image", "", "", None, mb) for mb in self.args.sized]
        log(f"scan overhead, ClientServer: {len(self.entries)} images, "
            f"{self.args.rounds} rounds")
        self.figures["ClientServer"] = await self.mode("ClientServer", self.args.rounds)
        if not self.args.standalone_rounds:
            return
        log("restarting the operator in Standalone mode")
        await restart_operator(self.sandbox, "--trivy-mode", "Standalone")
        try:
            self.figures["Standalone"] = await self.mode("Standalone",
                                                         self.args.standalone_rounds)
        finally:
            log("restarting the operator in ClientServer mode")
            await restart_operator(self.sandbox)
        self.figures["clientserver_vs_standalone"] = round(
            self.figures["ClientServer"]["scan_seconds"]
            / self.figures["Standalone"]["scan_seconds"], 2)

    async def cleanup(self) -> None:
        await self.api.delete_namespaces(self.namespaces)


def describe(figures: Figures) -> str:
    lines = ["scan overhead: median seconds per image, ImageScan (POST to Completed) and the "
             "same `trivy image` run directly"]
    modes = [m for m in ("ClientServer", "Standalone") if m in figures]
    for mode in modes:
        f = figures[mode]
        lines.append(f"  {mode} ({f['rounds']} rounds)")
        for key, v in f["images"].items():
            lines.append(f"    {key:<24} ImageScan {v['scan_seconds']:6.2f} s   direct "
                         f"{v['direct_seconds']:6.2f} s   ratio {v['ratio']}")
        lines.append(f"    {'all named images':<24} ImageScan {f['scan_seconds']:6.2f} s   "
                     f"direct {f['direct_seconds']:6.2f} s   ratio {f['ratio']}")
        lines.append(f"    added by an ImageScan (median over the named images): "
                     f"{f['added_seconds']:.3f} s")
        lines.append(f"    the Job's whole script (trivy image, result frames) on this host: "
                     f"{f['job_script_seconds']:.2f} s for the named images")
        lines.append("    where an ImageScan's time goes (median of each step):")
        for step, seconds in f["steps_median_seconds"].items():
            shown = "-" if seconds is None else f"{seconds:.3f} s"
            lines.append(f"      {step:<60} {shown}")
    if "clientserver_vs_standalone" in figures:
        lines.append(f"  ClientServer against Standalone (ImageScan time): "
                     f"{figures['clientserver_vs_standalone']}")
    return "\n".join(lines)


def targets(figures: Figures) -> list[Target]:
    cs = figures["ClientServer"]
    named = [v for v in cs["images"].values() if not v["sized"]]
    found = [target("scan overhead ratio, ClientServer", f"<= {RATIO_TARGET}",
                    f"{cs['ratio']} ({cs['scan_seconds']:.2f} s / {cs['direct_seconds']:.2f} s "
                    f"over {len(named)} named images; {cs['added_seconds']:.2f} s added per "
                    "scan)", cs["ratio"] <= RATIO_TARGET)]
    found += [target(f"scan overhead ratio, {key}", f"<= {RATIO_TARGET}",
                     f"{v['ratio']} ({v['scan_seconds']:.2f} s / {v['direct_seconds']:.2f} s)",
                     v["ratio"] <= RATIO_TARGET)
              for key, v in cs["images"].items() if v["sized"]]
    if "Standalone" in figures:
        sa = figures["Standalone"]
        found.append(target("scan overhead ratio, Standalone", "reported",
                            f"{sa['ratio']} ({sa['scan_seconds']:.2f} s / "
                            f"{sa['direct_seconds']:.2f} s); ClientServer against Standalone "
                            f"{figures['clientserver_vs_standalone']}", True))
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench/overhead.py", __doc__)
    parser.add_argument("--rounds", type=int, default=3,
                        help="measured rounds over the images, ClientServer (default 3)")
    parser.add_argument("--sized", type=int, nargs="*", default=list(SIZED_MEGABYTES),
                        metavar="MB", help="sizes of the bench's own images, measured with "
                        "the named ones (default: %(default)s; none with no value)")
    parser.add_argument("--standalone-rounds", type=int, default=2,
                        help="measured rounds in Standalone mode (default 2; 0 skips it)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.standalone_rounds < 0:
        parser.error("--rounds must be positive")
    return args


async def run(args: argparse.Namespace, sandbox: Sandbox) -> Figures:
    return await run_bench(args, 8, lambda api, env: Bench(api, env, args, sandbox))


def main(argv: list[str] | None = None) -> int:
    return run_in_sandbox("bench-overhead", parse_args(argv), run, targets, describe)


if __name__ == "__main__":
    sys.exit(main())
