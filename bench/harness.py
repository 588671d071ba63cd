"""What the sandbox benchmarks share: the API client, the sandbox's processes read from
/proc, a sandbox of their own or a running one, and the report (the figures, then one
PASS or MISS line per target)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, Protocol

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox.controlplane import Sandbox, load_env

GROUP_VERSION = "scangate.dev/v1alpha1"
MERGE_PATCH = "application/merge-patch+json"
# The server-side table printing of `kubectl get`: the Phase column without the
# objects, so that polling 10,000 ImageScans does not move 640 MB of findings.
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"
PAGE = 500

BENCH_ERRORS = (RuntimeError, OSError, httpx.HTTPError, subprocess.CalledProcessError,
                ssl.SSLError)
"""What makes a benchmark fail (rather than miss a target)."""

Figures = dict[str, Any]
Target = dict[str, Any]
"""name, target (text), value (text), pass (bool)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(samples: list[float], q: float) -> float:
    """The sample at quantile q (nearest rank): p99 of 300 samples is the 297th."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def target(name: str, limit: str, value: str, ok: bool) -> Target:
    return {"name": name, "target": limit, "value": value, "pass": ok}


def target_line(t: Target) -> str:
    return f"{'PASS' if t['pass'] else 'MISS'}  {t['name']:<46} {t['target']:<11} {t['value']}"


# -- the API server -------------------------------------------------------------------


class Api:
    """An async client with the sandbox's admin certificate, retrying overload answers."""

    RETRY = frozenset({429, 500, 502, 503, 504})

    def __init__(self, kubeconfig: Path, concurrency: int) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
        self.server = str(cluster["server"])
        context = ssl.create_default_context(cafile=cluster["certificate-authority"])
        context.load_cert_chain(user["client-certificate"], user["client-key"])
        self.client = httpx.AsyncClient(
            base_url=self.server, verify=context, timeout=httpx.Timeout(60, connect=10),
            limits=httpx.Limits(max_connections=concurrency + 4,
                                max_keepalive_connections=concurrency + 4))
        self.warnings: Counter[str] = Counter()

    async def close(self) -> None:
        await self.client.aclose()

    async def call(self, method: str, path: str, *, body: bytes | None = None,
                   content_type: str = "application/json", accept: str = "application/json",
                   params: dict[str, Any] | None = None,
                   ok: tuple[int, ...] = (200, 201)) -> httpx.Response:
        delay = 0.2
        for attempt in range(8):
            try:
                response = await self.client.request(
                    method, path, content=body, params=params,
                    headers={"Content-Type": content_type, "Accept": accept})
            except httpx.TransportError:
                if attempt == 7:
                    raise
            else:
                for warning in response.headers.get_list("warning"):
                    self.warnings[warning] += 1
                if response.status_code in ok:
                    return response
                if response.status_code not in self.RETRY:
                    raise RuntimeError(f"{method} {path}: {response.status_code} "
                                       f"{response.text[:500]}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        raise RuntimeError(f"{method} {path}: still refused after retries")

    async def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        body = json.dumps({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": name, "labels": labels or {}}}).encode()
        await self.call("POST", "/api/v1/namespaces", body=body, ok=(201, 409))

    async def delete_namespaces(self, names: list[str], wait: float = 0) -> None:
        """Delete namespaces; with `wait`, until they are gone (their objects too)."""
        for name in names:
            await self.call("DELETE", f"/api/v1/namespaces/{name}", ok=(200, 202, 404))
        deadline = time.monotonic() + wait
        while names and time.monotonic() < deadline:
            await asyncio.sleep(1)
            names = [n for n in names if (await self.call(
                "GET", f"/api/v1/namespaces/{n}", ok=(200, 404))).status_code == 200]
        if names and wait:
            raise RuntimeError(f"namespaces {names} still there after {wait:.0f}s")

    async def create_scan(self, namespace: str, name: str, image: str, run: str,
                          platform: str | None = None) -> None:
        spec = {"image": image, **({"platform": platform} if platform else {})}
        body = json.dumps({"apiVersion": GROUP_VERSION, "kind": "ImageScan",
                           "metadata": {"name": name, "labels": {"bench.scangate.dev/run": run}},
                           "spec": spec}).encode()
        await self.call("POST", f"/apis/{GROUP_VERSION}/namespaces/{namespace}/imagescans",
                        body=body)

    async def patch_status(self, namespace: str, name: str, body: bytes) -> None:
        await self.call("PATCH",
                        f"/apis/{GROUP_VERSION}/namespaces/{namespace}/imagescans/{name}/status",
                        body=body, content_type=MERGE_PATCH)

    async def get_scan(self, namespace: str, name: str) -> dict[str, Any]:
        response = await self.call(
            "GET", f"/apis/{GROUP_VERSION}/namespaces/{namespace}/imagescans/{name}")
        obj: dict[str, Any] = response.json()
        return obj

    async def phases(self, namespace: str) -> dict[str, str]:
        """name -> status.phase ("" before the first status) of a namespace's ImageScans."""
        phases: dict[str, str] = {}
        params: dict[str, Any] = {"limit": PAGE, "includeObject": "None"}
        while True:
            table = (await self.call("GET", f"/apis/{GROUP_VERSION}/namespaces/{namespace}/"
                                     "imagescans", accept=TABLE, params=params)).json()
            columns = [c["name"] for c in table["columnDefinitions"]]
            name, phase = columns.index("Name"), columns.index("Phase")
            for row in table["rows"]:
                phases[row["cells"][name]] = row["cells"][phase] or ""
            token = (table.get("metadata") or {}).get("continue")
            if not token:
                return phases
            params["continue"] = token


async def bounded(count: int, concurrency: int, work: Callable[[int], Awaitable[None]],
                  what: str = "") -> None:
    """work(0..count-1) with at most `concurrency` in flight; the first error stops all."""
    items = iter(range(count))
    done = 0
    started = time.monotonic()
    step = max(count // 10, 1)

    async def worker() -> None:
        nonlocal done
        for i in items:  # one iterator shared by the workers: each item is taken once
            await work(i)
            done += 1
            if what and done % step == 0 and done < count:
                log(f"  {what} {done}/{count} ({done / (time.monotonic() - started):.0f}/s)")

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, count)):
            group.create_task(worker())


# -- the sandbox's processes -------------------------------------------------------------


class Process:
    """One process of the sandbox (by its name in DIR/pids.json), read from /proc."""

    def __init__(self, sandbox_dir: Path, name: str) -> None:
        pids = json.loads((sandbox_dir / "pids.json").read_text())
        entry = next((p for p in pids if p["name"] == name), None)
        if entry is None:
            raise RuntimeError(f"no {name} in {sandbox_dir}/pids.json (started with "
                               "--operator?)")
        self.name, self.pid = name, int(entry["pid"])

    def status_kib(self, field_name: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field_name} in /proc/{self.pid}/status")

    def rss_mib(self) -> float:
        return self.status_kib("VmRSS") / 1024

    def peak_mib(self) -> float:
        return self.status_kib("VmHWM") / 1024

    def cpu_seconds(self) -> float:
        """utime + stime of all the process's threads."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # the name may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU time the whole machine has spent busy (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # less idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _tree_seconds(pid: int) -> float | None:
    """utime + stime of a process and of its children it has waited for."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class CpuShare(threading.Thread):
    """How much CPU the rest of the machine took while a benchmark ran: every second, the
    machine's busy time less that of the sandbox's processes (their pods included) and of
    this process (its subprocesses included). The machine is shared: a time-based
    figure is read against this. (A stopped operator, reaped by this process, lands in
    its children's time at once: that second counts as none taken by others.)"""

    def __init__(self, sandbox_dir: Path) -> None:
        super().__init__(daemon=True)
        self.sandbox_dir = sandbox_dir
        self.done = threading.Event()
        self.wall = self.busy = self.others = 0.0

    def ours_now(self) -> dict[int, float]:
        pids = [int(p["pid"]) for p in json.loads((self.sandbox_dir / "pids.json").read_text())]
        seen = {pid: _tree_seconds(pid) for pid in pids}
        times = os.times()
        seen[os.getpid()] = sum(times[:4])
        return {pid: s for pid, s in seen.items() if s is not None}

    def run(self) -> None:
        ours, busy, wall = self.ours_now(), _busy_seconds(), time.monotonic()
        while not self.done.wait(1.0):
            try:
                now_ours = self.ours_now()
            except (OSError, ValueError):  # pids.json being rewritten (a restart)
                continue
            now_busy, now_wall = _busy_seconds(), time.monotonic()
            mine = sum(s - ours[pid] for pid, s in now_ours.items() if pid in ours)
            self.others += max(now_busy - busy - mine, 0.0)
            self.busy += now_busy - busy
            self.wall += now_wall - wall
            ours, busy, wall = now_ours, now_busy, now_wall

    def stop(self) -> Figures:
        self.done.set()
        self.join()
        wall = max(self.wall, 1e-9)
        return {"cores": os.cpu_count(), "busy_cores": round(self.busy / wall, 2),
                "ours_cores": round((self.busy - self.others) / wall, 2),
                "others_cores": round(self.others / wall, 2)}


async def restart_operator(sandbox: Sandbox, *extra_args: str) -> None:
    """A new operator process (with these extra `scangate run` flags); the sandbox's env
    file then names its new ports."""
    await asyncio.to_thread(sandbox.stop_operator)
    await asyncio.to_thread(sandbox.start_operator, 60.0, extra_args)


# -- running a benchmark -------------------------------------------------------------------


class Bench(Protocol):
    figures: Figures

    async def main(self) -> None: ...

    async def cleanup(self) -> None: ...


async def run_bench(args: argparse.Namespace, concurrency: int,
                    make: Callable[[Api, dict[str, str]], Bench]) -> Figures:
    """Run a Bench with a client of the sandbox's API server; its figures. It deletes what
    it made (`cleanup`) only in a sandbox that outlives the run."""
    api = Api(args.sandbox_dir / "kubeconfig", concurrency)
    bench = make(api, load_env(args.sandbox_dir))
    try:
        await bench.main()
    finally:
        if args.cleanup:
            try:
                await bench.cleanup()
            except BENCH_ERRORS as e:
                log(f"cleaning up after the bench failed: {e}")
        await api.close()
    return bench.figures


def bench_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring as help, --sandbox-dir and --json."""
    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sandbox-dir", type=Path,
                        help="use this running sandbox (`hack/sandbox up --operator`) instead "
                             "of starting one; what the bench made there is deleted afterwards")
    parser.add_argument("--json", type=Path, help="also write the figures and targets here")
    return parser


def show_json(figures: Figures) -> str:
    return json.dumps({k: v for k, v in figures.items() if k != "samples"}, indent=1)


def _terminate(signum: int, _frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops the sandbox


def start_sandbox(args: argparse.Namespace) -> tuple[Sandbox, bool]:
    """The sandbox of `args.sandbox_dir`, or a new one (started here, to be stopped by
    `stop_sandbox`); sets `args.cleanup` (delete what the bench made: pointless in a
    sandbox thrown away whole)."""
    signal.signal(signal.SIGTERM, _terminate)
    started_here = args.sandbox_dir is None
    args.cleanup = not started_here and not getattr(args, "keep", False)
    if not started_here:
        args.sandbox_dir = Path(args.sandbox_dir).resolve()
        sandbox = Sandbox.attach(args.sandbox_dir)
        sandbox.check_alive()
        return sandbox, False
    args.sandbox_dir = Path(tempfile.mkdtemp(prefix="sb-bench-"))
    sandbox = Sandbox(args.sandbox_dir)
    log(f"starting a sandbox in {args.sandbox_dir}")
    began = time.monotonic()
    sandbox.up(operator=True)
    log(f"sandbox up in {time.monotonic() - began:.1f}s")
    return sandbox, True


def stop_sandbox(sandbox: Sandbox) -> None:
    """Stop a sandbox started here; keep its logs, drop the rest (etcd's data alone is
    about 100 KiB per stored ImageScan)."""
    sandbox.down()
    for path in sandbox.dir.iterdir():
        if path.name != "logs":
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    log(f"sandbox stopped; its logs are in {sandbox.dir}/logs")


def run_in_sandbox(prog: str, args: argparse.Namespace,
                   bench: Callable[[argparse.Namespace, Sandbox], Coroutine[Any, Any, Figures]],
                   targets: Callable[[Figures], list[Target]],
                   show: Callable[[Figures], str] = show_json) -> int:
    """Run `bench` on the sandbox of `args.sandbox_dir`, or on one started (and stopped)
    here; print its figures and target lines, and write both to `args.json` if given. A
    MISS is a finding, not an error: the status is non-zero only when the bench could
    not run."""
    sandbox, started_here = None, False
    try:
        sandbox, started_here = start_sandbox(args)
        figures = asyncio.run(bench(args, sandbox))
        lines = targets(figures)
        print(show(figures))
        print()
        for t in lines:
            print(target_line(t))
        if args.json:
            Path(args.json).write_text(json.dumps({"figures": figures, "targets": lines},
                                                  indent=1) + "\n")
    except BENCH_ERRORS as e:
        print(f"{prog} failed: {e}", file=sys.stderr)
        print(f"  logs: {args.sandbox_dir}/logs", file=sys.stderr)
        return 1
    finally:
        if started_here and sandbox is not None:
            stop_sandbox(sandbox)
    return 0
