"""Admission benchmark: the gate's latency, alone and through the API server.

1. Through the API server. Deployments are created (server-side dry run, so nothing
   is stored and no controller acts) in two namespaces, alternately: one is judged by
   scangate's gate under an Enforce ScanPolicy, the other by a no-op webhook registered
   the same way (same TLS, same failure policy and timeout; an aiohttp server that
   allows everything) and left alone by scangate (scangate.dev/ignore=true). The same
   kubectl-equivalent client measures each create. Target: p99 with scangate at most
   2 ms above p99 with the no-op webhook.
2. The webhook alone. With 10,000 ImageScans in the operator's index, vegeta (a load
   generator built from its Go module into ~/.cache/scangate/bin) sends AdmissionReviews
   straight to the gate's HTTPS endpoint at a constant rate: p99 at 200 requests/s
   (target <= 5 ms), and the highest rate tried whose p99 stays under 10 ms. The no-op
   webhook under the same load is the baseline of the same run. (--scans 0 stores none
   and counts those already stored, as `make bench` does after the scale benchmark.)
With --plot FILE, both latency distributions are drawn (bench/plot.py, matplotlib).

Run: make bench-admission [ARGS="--scans 1000 --creates 100"]
     .venv/bin/python bench/admission.py [--sandbox-dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness import (
    GROUP_VERSION,
    TABLE,
    Api,
    Figures,
    Target,
    bench_parser,
    bounded,
    log,
    percentile,
    run_bench,
    run_in_sandbox,
    target,
)

from sandbox.controlplane import Sandbox, free_port

VEGETA_MODULE = "github.com/tsenart/vegeta/v12@v12.13.0"
CACHE = Path(os.environ.get("SCANGATE_CACHE", Path.home() / ".cache" / "scangate")) / "bin"
OVERHEAD_TARGET_MS = 2.0
P99_TARGET_MS = 5.0
RATE_LIMIT_MS = 10.0

NOOP_SERVER = '''
import json, ssl, sys
from aiohttp import web
async def review(request):
    uid = (await request.json())["request"]["uid"]
    return web.json_response({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                              "response": {"uid": uid, "allowed": True}})
app = web.Application()
app.router.add_post("/validate", review)
context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain(sys.argv[2], sys.argv[3])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), ssl_context=context,
            access_log=None, print=None)
'''


def vegeta() -> Path:
    """The vegeta binary, built once from its Go module and cached."""
    binary = CACHE / "vegeta"
    if not binary.exists():
        log(f"building vegeta ({VEGETA_MODULE}) into {CACHE}")
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["go", "install", VEGETA_MODULE], check=True,
                       env={**os.environ, "GOBIN": str(CACHE), "GOFLAGS": "-mod=mod"})
    return binary


def pod_review(namespace: str, image: str) -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": str(uuid.uuid4()), "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": namespace, "operation": "CREATE", "dryRun": True,
        "userInfo": {"username": "bench", "groups": ["system:authenticated"]},
        "object": {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "bench", "namespace": namespace},
                   "spec": {"containers": [{"name": "app", "image": image}]}}}}


class Bench:
    def __init__(self, api: Api, env: dict[str, str], args: argparse.Namespace) -> None:
        self.api, self.env, self.args = api, env, args
        self.run = uuid.uuid4().hex[:6]
        self.judged, self.noop = f"bench-adm-{self.run}", f"bench-noop-{self.run}"
        self.figures: Figures = {"samples": {}}
        self.work = Path(tempfile.mkdtemp(prefix="scangate-bench-admission-"))
        self.noop_port = free_port()
        self.noop_proc: subprocess.Popen[bytes] | None = None

    # -- set-up ----------------------------------------------------------------------

    async def setup(self) -> None:
        sandbox_dir = Path(self.args.sandbox_dir)
        await self.api.create_namespace(self.judged)
        await self.api.create_namespace(self.noop, {"scangate.dev/ignore": "true",
                                                    "bench.scangate.dev/noop": "true"})
        # The no-op webhook: the sandbox CA's certificate for 127.0.0.1, like the gate's.
        pki = sandbox_dir / "pki"
        cert = sorted(pki.glob("operator-webhook*.crt"))
        key = sorted(pki.glob("operator-webhook*.key"))
        if not cert or not key:
            raise RuntimeError(f"no operator-webhook certificate in {pki}")
        script = self.work / "noop.py"
        script.write_text(NOOP_SERVER)
        self.noop_proc = subprocess.Popen([sys.executable, str(script), str(self.noop_port),
                                           str(cert[0]), str(key[0])])
        ca = (pki / "ca.crt").read_bytes()
        await self.api.call("POST", "/apis/admissionregistration.k8s.io/v1/"
                            "validatingwebhookconfigurations", body=json.dumps({
                                "apiVersion": "admissionregistration.k8s.io/v1",
                                "kind": "ValidatingWebhookConfiguration",
                                "metadata": {"name": f"bench-noop-{self.run}"},
                                "webhooks": [{
                                    "name": "noop.bench.scangate.dev",
                                    "admissionReviewVersions": ["v1"],
                                    "clientConfig": {
                                        "url": f"https://127.0.0.1:{self.noop_port}/validate",
                                        "caBundle": base64.b64encode(ca).decode()},
                                    "rules": [{"apiGroups": ["apps"], "apiVersions": ["v1"],
                                               "resources": ["deployments"],
                                               "operations": ["CREATE", "UPDATE"]}],
                                    "failurePolicy": "Fail", "sideEffects": "None",
                                    "timeoutSeconds": 5,
                                    "namespaceSelector": {"matchLabels": {
                                        "bench.scangate.dev/noop": "true"}}}]}).encode())
        await self.api.call("POST", f"/apis/{GROUP_VERSION}/scanpolicies", body=json.dumps({
            "apiVersion": GROUP_VERSION, "kind": "ScanPolicy",
            "metadata": {"name": f"bench-{self.run}"},
            "spec": {"action": "Enforce", "thresholds": {"critical": 0},
                     "match": {"namespaces": [self.judged]}}}).encode())
        # The image the workloads use, scanned, so that every decision is a cached one.
        self.image = next(i["image"] for i in json.loads(
            (sandbox_dir / "images.json").read_text()) if i["name"] == "clean")
        await self.api.call("POST", f"/apis/{GROUP_VERSION}/namespaces/{self.judged}/"
                            "imagescans", body=json.dumps({
                                "apiVersion": GROUP_VERSION, "kind": "ImageScan",
                                "metadata": {"name": "clean"},
                                "spec": {"image": self.image}}).encode())
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            scan = (await self.api.call("GET", f"/apis/{GROUP_VERSION}/namespaces/"
                                        f"{self.judged}/imagescans/clean")).json()
            if (scan.get("status") or {}).get("phase") == "Completed":
                break
            await asyncio.sleep(0.5)
        else:
            raise RuntimeError("the bench image's scan did not complete")

    async def populate(self) -> None:
        """ImageScans with small completed results, for the index the gate looks into."""
        namespace = f"bench-adm-{self.run}-index"
        await self.api.create_namespace(namespace)
        summary = {"critical": 1, "high": 2, "medium": 3, "low": 4, "unknown": 0, "total": 10}
        # Fresh results: older ones would be rescanned (their made-up images fail to
        # resolve), and the bench would measure that work rather than an idle index.
        scanned_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        def status(i: int) -> bytes:
            return json.dumps({"status": {
                "phase": "Completed", "digest": f"sha256:{i:064x}", "scannedAt": scanned_at,
                "completionTime": scanned_at, "summary": summary,
                "fixable": summary}}).encode()

        async def one(i: int) -> None:
            name = f"s{i:05d}"
            # A host the operator refuses to contact: its lookup fails at once, for good.
            await self.api.create_scan(namespace, name, f"169.254.169.254/app{i}:1", self.run)
            await self.api.patch_status(namespace, name, status(i))

        await bounded(self.args.scans, 32, one, "ImageScans")
        # The operator may write its own verdict after the bench's patch: patch again until
        # every result stands, so that the gate is measured on an idle index.
        for _ in range(10):
            await asyncio.sleep(3)
            phases = await self.api.phases(namespace)
            wrong = [int(n[1:]) for n, p in phases.items() if p != "Completed"]
            if not wrong:
                break
            log(f"  re-patching {len(wrong)} ImageScans the operator overwrote")

            async def repatch(k: int, wrong: list[int] = wrong) -> None:
                await self.api.patch_status(namespace, f"s{wrong[k]:05d}", status(wrong[k]))

            await bounded(len(wrong), 32, repatch)

    # -- 1. through the API server ---------------------------------------------------

    async def through_api_server(self) -> None:
        timings: dict[str, list[float]] = {self.judged: [], self.noop: []}
        for i in range(self.args.creates):
            for namespace in (self.judged, self.noop):
                body = json.dumps({
                    "apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": f"d{i}"},
                    "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "b"}},
                             "template": {"metadata": {"labels": {"app": "b"}},
                                          "spec": {"containers": [{"name": "app",
                                                                   "image": self.image}]}}}})
                began = time.perf_counter()
                await self.api.call("POST", f"/apis/apps/v1/namespaces/{namespace}/deployments",
                                    body=body.encode(), params={"dryRun": "All"})
                timings[namespace].append((time.perf_counter() - began) * 1000)
        judged, noop = timings[self.judged], timings[self.noop]
        self.figures["samples"].update(api_scangate_ms=judged, api_noop_ms=noop)
        self.figures["through_api_server"] = {
            "creates_each": self.args.creates,
            "scangate_p50_ms": round(statistics.median(judged), 2),
            "scangate_p99_ms": round(percentile(judged, 0.99), 2),
            "noop_p50_ms": round(statistics.median(noop), 2),
            "noop_p99_ms": round(percentile(noop, 0.99), 2),
            "p99_overhead_ms": round(percentile(judged, 0.99) - percentile(noop, 0.99), 2)}

    # -- 2. the webhook alone, under vegeta ------------------------------------------

    def attack(self, url: str, rate: int, seconds: float,
               samples: str | None = None) -> dict[str, Any]:
        """One vegeta attack: its figures; with `samples`, each request's latency (ms) is
        kept in figures["samples"] under that name."""
        body = self.work / "review.json"
        body.write_text(json.dumps(pod_review(self.judged, self.image)))
        targets = self.work / "targets.txt"
        targets.write_text(f"POST {url}\nContent-Type: application/json\n@{body}\n")
        ca = Path(self.args.sandbox_dir) / "pki" / "ca.crt"
        attack = subprocess.run(
            [str(vegeta()), "attack", f"-targets={targets}", f"-rate={rate}",
             f"-duration={seconds}s", f"-root-certs={ca}", "-keepalive=true", "-workers=8"],
            check=True, capture_output=True)
        report = subprocess.run([str(vegeta()), "report", "-type=json"], input=attack.stdout,
                                check=True, capture_output=True)
        result: dict[str, Any] = json.loads(report.stdout)
        latencies = result["latencies"]
        if samples:
            encoded = subprocess.run([str(vegeta()), "encode", "-to=json"],
                                     input=attack.stdout, check=True, capture_output=True)
            self.figures["samples"][samples] = [
                round(json.loads(line)["latency"] / 1e6, 3)
                for line in encoded.stdout.splitlines() if line.strip()]
        return {"rate": rate, "requests": result["requests"],
                "success": round(result["success"], 4),
                "p50_ms": round(latencies["50th"] / 1e6, 2),
                "p99_ms": round(latencies["99th"] / 1e6, 2),
                "status_codes": result.get("status_codes", {})}

    async def webhook_alone(self) -> None:
        gate = f"{self.env['SCANGATE_ADMISSION']}/validate"
        noop = f"https://127.0.0.1:{self.noop_port}/validate"
        seconds = self.args.seconds
        log(f"vegeta: 200/s for {seconds}s at the gate and at the no-op webhook")
        at_200 = await asyncio.to_thread(self.attack, gate, 200, seconds, "alone_scangate_ms")
        baseline = await asyncio.to_thread(self.attack, noop, 200, seconds, "alone_noop_ms")
        steps = []
        for rate in (400, 800, 1600, 3200):
            log(f"vegeta: {rate}/s for {self.args.step_seconds}s at the gate")
            step = await asyncio.to_thread(self.attack, gate, rate, self.args.step_seconds)
            steps.append(step)
            if step["p99_ms"] >= RATE_LIMIT_MS or step["success"] < 1:
                break
        sustained = max([s["rate"] for s in [at_200, *steps]
                         if s["p99_ms"] < RATE_LIMIT_MS and s["success"] == 1] or [0])
        self.figures["webhook_alone"] = {"at_200": at_200, "noop_at_200": baseline,
                                         "steps": steps, "highest_rate_p99_under_10ms":
                                         sustained}

    def stop_noop(self) -> None:
        if self.noop_proc is not None:
            self.noop_proc.terminate()
            self.noop_proc.wait(10)
        shutil.rmtree(self.work, ignore_errors=True)

    async def cleanup(self) -> None:
        await self.api.call("DELETE", "/apis/admissionregistration.k8s.io/v1/"
                            f"validatingwebhookconfigurations/bench-noop-{self.run}",
                            ok=(200, 404))
        await self.api.call("DELETE", f"/apis/{GROUP_VERSION}/scanpolicies/bench-{self.run}",
                            ok=(200, 404))

    async def main(self) -> None:
        try:
            vegeta()
            await self.setup()
            if self.args.scans:
                log(f"indexing {self.args.scans} ImageScans")
                await self.populate()
                await asyncio.sleep(5)  # the operator's watch takes them in
            self.figures["indexed_scans"] = await self.count_scans()
            log(f"{self.args.creates} dry-run Deployment creates in each namespace")
            await self.through_api_server()
            await self.webhook_alone()
        finally:
            self.stop_noop()
        if getattr(self.args, "plot", None):
            from plot import admission_latency  # matplotlib: the `bench` extra
            admission_latency(self.figures["samples"], self.args.plot)

    async def count_scans(self) -> int:
        """The ImageScans stored in the whole cluster (all of them in the gate's index)."""
        table = (await self.api.call("GET", f"/apis/{GROUP_VERSION}/imagescans", accept=TABLE,
                                     params={"limit": 1, "includeObject": "None"})).json()
        return len(table["rows"]) + int(table["metadata"].get("remainingItemCount") or 0)


def targets(figures: Figures) -> list[Target]:
    api, alone = figures["through_api_server"], figures["webhook_alone"]
    return [
        target("admission overhead over a no-op webhook, p99", f"<= {OVERHEAD_TARGET_MS} ms",
               f"{api['p99_overhead_ms']} ms (scangate {api['scangate_p99_ms']} ms, no-op "
               f"{api['noop_p99_ms']} ms)", api["p99_overhead_ms"] <= OVERHEAD_TARGET_MS),
        target(f"decision p99 at 200/s, {figures['indexed_scans']} ImageScans",
               f"<= {P99_TARGET_MS} ms", f"{alone['at_200']['p99_ms']} ms (no-op webhook "
               f"{alone['noop_at_200']['p99_ms']} ms)",
               alone["at_200"]["p99_ms"] <= P99_TARGET_MS and alone["at_200"]["success"] == 1),
        target("highest rate tried with p99 under 10 ms", "reported",
               f"{alone['highest_rate_p99_under_10ms']}/s", True),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench/admission.py", __doc__)
    parser.add_argument("--scans", type=int, default=10_000, help="ImageScans indexed")
    parser.add_argument("--creates", type=int, default=1000,
                        help="dry-run Deployment creates per namespace")
    parser.add_argument("--seconds", type=float, default=20,
                        help="length of the attacks at 200/s, the gate's and the no-op's")
    parser.add_argument("--step-seconds", type=float, default=10,
                        help="length of each attack at the higher rates")
    parser.add_argument("--plot", type=Path,
                        help="draw the latency distributions into this PNG (matplotlib)")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, sandbox: Sandbox) -> Figures:
    return await run_bench(args, 32, lambda api, env: Bench(api, env, args))


def main(argv: list[str] | None = None) -> int:
    return run_in_sandbox("bench-admission", parse_args(argv), run, targets)


if __name__ == "__main__":
    sys.exit(main())
