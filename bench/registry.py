"""Registry benchmark of ScanRules on a sandbox: push latency and enumeration at scale.

1. Push latency, on an idle operator: a ScanRule with the push trigger over a registry
   namespace; N times, an image of a new digest is pushed to it, and the time from
   the registry's answer to the manifest PUT until the scan Job exists is measured
   (the registry's own notification, the push receiver, the ImageScan, the digest
   lookup, the queue and the Job). Target: p95 <= 1 s.
2. Enumeration: 200 repositories x 25 tags (5,000 tags) under one registry namespace;
   a ScanRule over it; the time until its run has created all 5,000 ImageScans, the
   registry requests that took (counted in the registry's own log), and, as the
   baseline of the same run, the same listing by one plain sequential client.
   Target: all ImageScans within 60 s.

A MISS is a finding, not an error: the exit status is non-zero only when the benchmark
itself could not run.

Run: make bench-registry [ARGS="--repositories 20 --tags 5 --pushes 5"]
     .venv/bin/python bench/registry.py [--sandbox-dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from harness import (
    GROUP_VERSION,
    Api,
    Figures,
    Target,
    bench_parser,
    log,
    percentile,
    run_bench,
    run_in_sandbox,
    target,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from sandbox.advisories import load_images
from sandbox.controlplane import Sandbox
from sandbox.images import OCI_MANIFEST, Pusher, build_image
from scangate.core.rules import scan_name
from scangate.registry.client import RegistryClient
from scangate.scanning.job import scan_label

ENUMERATION_TARGET_S = 60.0
PUSH_TARGET_S = 1.0
_REQUEST = re.compile(r'http\.request\.method=(\w+) .*?http\.request\.uri="?([^"\s]+)')


def rule(name: str, registry: str, namespace: str, on_push: bool) -> bytes:
    return json.dumps({
        "apiVersion": GROUP_VERSION, "kind": "ScanRule", "metadata": {"name": name},
        "spec": {"registry": {"url": f"http://{registry}"}, "scope": {"namespaces": [namespace]},
                 "tagFilter": ".*", "triggers": {"onPush": on_push}}}).encode()


def variant() -> Any:
    """The clean test image with a file of its own: a new digest."""
    decl = {**load_images()["clean"], "files": {"etc/scangate-bench-id": uuid.uuid4().hex}}
    return build_image(decl)


class Bench:
    def __init__(self, api: Api, env: dict[str, str], args: argparse.Namespace) -> None:
        self.api, self.env, self.args = api, env, args
        self.registry = env["REGISTRY"]
        self.run = uuid.uuid4().hex[:6]
        self.namespace = f"bench-registry-{self.run}"
        self.figures: Figures = {}

    async def create_rule(self, name: str, scope: str, on_push: bool) -> None:
        await self.api.call("POST", f"/apis/{GROUP_VERSION}/namespaces/{self.namespace}/"
                            "scanrules", body=rule(name, self.registry, scope, on_push))

    async def rule_status(self, name: str) -> dict[str, Any]:
        response = await self.api.call(
            "GET", f"/apis/{GROUP_VERSION}/namespaces/{self.namespace}/scanrules/{name}")
        status: dict[str, Any] = response.json().get("status") or {}
        return status

    async def wait_run(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await self.rule_status(name)
            if status.get("lastRun"):
                return status
            await asyncio.sleep(0.05)
        raise RuntimeError(f"ScanRule {name} did not run within {timeout:.0f}s")

    # -- push latency --------------------------------------------------------------------

    async def push_latency(self) -> None:
        scope = f"bench-push-{self.run}"
        await self.create_rule("push", scope, on_push=True)
        await self.wait_run("push", 60)
        pusher = Pusher(f"http://{self.registry}")
        latencies = []
        try:
            for i in range(self.args.pushes):
                image, tag = variant(), f"v{i}"
                for blob in image.blobs.values():
                    pusher.blob(f"{scope}/app", blob)
                pusher.manifest(f"{scope}/app", tag, image.manifest, OCI_MANIFEST)
                pushed = time.monotonic()
                label = scan_label(scan_name("push", f"{scope}/app", tag))
                await self.wait_job(label, 30)
                latencies.append(time.monotonic() - pushed)
                await asyncio.sleep(0.5)  # idle between pushes: each one alone
        finally:
            pusher.close()
        latencies.sort()
        self.figures["push"] = {
            "samples": len(latencies),
            "p50_seconds": round(statistics.median(latencies), 3),
            "p95_seconds": round(percentile(latencies, 0.95), 3),
            "max_seconds": round(latencies[-1], 3)}

    async def wait_job(self, label: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = (await self.api.call(
                "GET", "/apis/batch/v1/namespaces/scangate-system/jobs",  # the operator's
                params={"labelSelector": f"scangate.dev/imagescan={label},"
                                         f"scangate.dev/imagescan-namespace={self.namespace}"}
            )).json()
            if jobs["items"]:
                return
            await asyncio.sleep(0.01)
        raise RuntimeError(f"no scan Job for {label} within {timeout:.0f}s")

    # -- enumeration ---------------------------------------------------------------------

    def populate(self, scope: str) -> None:
        """repositories x tags, one image: blobs once per repository, a manifest per tag."""
        image = variant()
        pusher = Pusher(f"http://{self.registry}")
        try:
            for r in range(self.args.repositories):
                repository = f"{scope}/app{r:03d}"
                for blob in image.blobs.values():
                    pusher.blob(repository, blob)
                for t in range(self.args.tags):
                    pusher.manifest(repository, f"1.{t}.0", image.manifest, OCI_MANIFEST)
        finally:
            pusher.close()

    async def baseline(self, scope: str) -> tuple[float, int]:
        """The same listing by one client, one request at a time: seconds and tags."""
        began = time.monotonic()
        tags = 0
        async with RegistryClient(f"http://{self.registry}") as client:
            async for page in client.catalog():
                for repository in page:
                    if repository.startswith(f"{scope}/"):
                        tags += len(await client.tags(repository))
        return time.monotonic() - began, tags

    def registry_log(self) -> Path:
        return Path(self.args.sandbox_dir) / "logs" / "registry.log"

    def requests_since(self, offset: int) -> Counter[str]:
        """The registry's requests logged after `offset`, by kind."""
        kinds: Counter[str] = Counter()
        with self.registry_log().open("rb") as log_file:
            log_file.seek(offset)
            for line in log_file.read().decode(errors="replace").splitlines():
                if "response completed" not in line:
                    continue
                found = _REQUEST.search(line)
                if not found:
                    continue
                method, uri = found.groups()
                kind = ("catalog" if "/_catalog" in uri else "tags" if "/tags/list" in uri
                        else "manifest" if "/manifests/" in uri else "other")
                kinds[f"{method} {kind}"] += 1
        return kinds

    async def enumeration(self) -> None:
        scope = f"bench-enum-{self.run}"
        total = self.args.repositories * self.args.tags
        log(f"pushing {self.args.repositories} repositories x {self.args.tags} tags")
        began = time.monotonic()
        await asyncio.to_thread(self.populate, scope)
        self.figures["populate_seconds"] = round(time.monotonic() - began, 1)
        baseline_seconds, listed = await self.baseline(scope)
        if listed != total:
            raise RuntimeError(f"the registry lists {listed} tags, not {total}")
        offset = self.registry_log().stat().st_size
        log("creating the ScanRule")
        began = time.monotonic()
        await self.create_rule("enum", scope, on_push=False)
        status = await self.wait_run("enum", 600)
        seconds = time.monotonic() - began
        last_run = status["lastRun"]
        if last_run.get("scansCreated") != total:
            raise RuntimeError(f"the run created {last_run.get('scansCreated')} ImageScans, "
                               f"not {total}: {json.dumps(status)[:2000]}")
        requests = self.requests_since(offset)
        self.figures["enumeration"] = {
            "tags": total, "seconds": round(seconds, 2),
            "baseline_listing_seconds": round(baseline_seconds, 2),
            "registry_requests_by_kind": dict(requests),
            "listing_requests": sum(n for k, n in requests.items()
                                    if k.endswith(("catalog", "tags")))}

    async def cleanup(self) -> None:
        await self.api.delete_namespaces([self.namespace])

    async def main(self) -> None:
        await self.api.create_namespace(self.namespace)
        log(f"push latency: {self.args.pushes} pushes on an idle operator")
        await self.push_latency()
        await self.enumeration()


def targets(figures: Figures) -> list[Target]:
    push, enum = figures["push"], figures["enumeration"]
    return [
        target("push to scan Job, p95", f"<= {PUSH_TARGET_S} s",
               f"{push['p95_seconds']} s (p50 {push['p50_seconds']} s, max "
               f"{push['max_seconds']} s, {push['samples']} pushes)",
               push["p95_seconds"] <= PUSH_TARGET_S),
        target(f"{enum['tags']} tags enumerated into ImageScans",
               f"<= {ENUMERATION_TARGET_S:.0f} s",
               f"{enum['seconds']} s ({enum['listing_requests']} listing requests; the "
               f"listing alone by one sequential client: {enum['baseline_listing_seconds']} s)",
               enum["seconds"] <= ENUMERATION_TARGET_S),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench/registry.py", __doc__)
    parser.add_argument("--repositories", type=int, default=200)
    parser.add_argument("--tags", type=int, default=25, help="tags per repository")
    parser.add_argument("--pushes", type=int, default=20, help="pushes timed")
    args = parser.parse_args(argv)
    if min(args.repositories, args.tags, args.pushes) < 1:
        parser.error("--repositories, --tags and --pushes must be positive")
    return args


async def run(args: argparse.Namespace, sandbox: Sandbox) -> Figures:
    return await run_bench(args, 16, lambda api, env: Bench(api, env, args))


def main(argv: list[str] | None = None) -> int:
    return run_in_sandbox("bench-registry", parse_args(argv), run, targets)


if __name__ == "__main__":
    sys.exit(main())
