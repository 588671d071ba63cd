"""Every sandbox benchmark in one run, on one sandbox: `make bench`.

In order, on a sandbox started here (or `--sandbox-dir`, a running one that holds
nothing else):
1. scan overhead (overhead.py): ImageScan against direct `trivy image`, ClientServer
   and Standalone; the operator is restarted for Standalone and back;
2. registry (registry.py): push to scan Job, and 5,000 tags enumerated;
3. their namespaces are deleted and the operator restarted: a new process with no
   history, whose RSS after a few idle seconds is the idle figure;
4. scale (scale.py): 10,000 stored ImageScans (RSS, idle CPU, no LIST), then 1,000 new
   ones over the named images;
5. admission (admission.py), with the ImageScans of step 4 as the gate's index: p99
   over a no-op webhook through the API server, and the webhook alone at 200/s; the
   latency distributions drawn into --plot.
Then every target line once more as one table, and all figures into --json. The exit
status is non-zero only when a benchmark could not run (its line then says so); a MISS
is a result.

Run: make bench    .venv/bin/python bench/all.py [--quick] [--sandbox-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import admission
import overhead
import registry
import scale
from harness import (
    BENCH_ERRORS,
    Api,
    CpuShare,
    Figures,
    Process,
    Target,
    bench_parser,
    log,
    restart_operator,
    show_json,
    start_sandbox,
    stop_sandbox,
    target,
    target_line,
)

from sandbox.controlplane import Sandbox

HERE = Path(__file__).resolve().parent
QUICK = {"overhead": "--rounds 1 --standalone-rounds 1 --sized 125",
         "registry": "--repositories 20 --tags 5 --pushes 5",
         "scale": "--count 1000 --new 100 --idle-seconds 10 --restart-operator",
         "admission": "--creates 100 --seconds 5 --step-seconds 3"}
# Without --quick or --NAME-args: each benchmark's own defaults, and these.
DEFAULTS = {"scale": "--restart-operator"}
Run = Callable[[argparse.Namespace, Sandbox], Coroutine[Any, Any, Figures]]


def machine() -> Figures:
    """What the figures were measured on."""
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    memory = next(int(line.split()[1]) for line in
                  Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True,
                              text=True).stdout.strip()

    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_files": len(git("status", "--porcelain").splitlines()),
            "cpu": cpu, "cpus": os.cpu_count(), "memory_gib": round(memory / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


class All:
    def __init__(self, args: argparse.Namespace, sandbox: Sandbox) -> None:
        self.args, self.sandbox = args, sandbox
        self.results: Figures = {"machine": machine(), "seconds": {}, "cpu": {},
                                 "figures": {}, "errors": {}}
        self.targets: list[Target] = []

    def bench_args(self, name: str, module: ModuleType) -> argparse.Namespace:
        given = getattr(self.args, f"{name}_args") or (
            QUICK[name] if self.args.quick else DEFAULTS.get(name, ""))
        args: argparse.Namespace = module.parse_args(shlex.split(given))
        args.sandbox_dir, args.cleanup, args.json = self.args.sandbox_dir, False, None
        return args

    async def step(self, name: str, module: ModuleType, args: argparse.Namespace | None = None,
                   run: Run | None = None) -> Figures | None:
        """One benchmark: its figures and target lines printed and kept; an error is kept
        and reported as a MISS, and the next benchmark runs."""
        log(f"\n=== {name} ===")
        began = time.monotonic()
        cpu = CpuShare(self.args.sandbox_dir)
        cpu.start()
        try:
            self.sandbox.check_alive()
            figures = await (run or module.run)(args or self.bench_args(name, module),
                                                self.sandbox)
        except BENCH_ERRORS as e:
            log(f"{name} failed: {e}")
            self.results["errors"][name] = str(e)
            self.targets.append(target(f"{name} benchmark", "runs", f"failed: {e}"[:200],
                                       False))
            return None
        finally:
            self.results["seconds"][name] = round(time.monotonic() - began, 1)
            self.results["cpu"][name] = cpu.stop()
            log(f"{name}: {self.results['seconds'][name]:.0f} s; CPU cores busy "
                f"{self.results['cpu'][name]}")
        lines = module.targets(figures)
        self.results["figures"][name] = figures
        self.targets += lines
        print(getattr(module, "describe", show_json)(figures), flush=True)
        for line in lines:
            print(target_line(line), flush=True)
        return figures

    async def fresh_operator(self) -> None:
        """Delete what the benchmarks before made and start a new operator process: the
        next ones measure its memory without their history. Its RSS after a few idle
        seconds is the idle figure."""
        api = Api(self.args.sandbox_dir / "kubeconfig", 4)
        try:
            listed = (await api.call("GET", "/api/v1/namespaces")).json()["items"]
            await api.delete_namespaces([n["metadata"]["name"] for n in listed if n[
                "metadata"]["name"].startswith(("bench-overhead-", "bench-registry-"))], 600)
        finally:
            await api.close()
        await restart_operator(self.sandbox)
        await asyncio.sleep(self.args.idle_settle)
        operator = Process(self.args.sandbox_dir, "operator")
        self.results["figures"]["memory"] = {"operator_rss_idle_mib":
                                             round(operator.rss_mib(), 1)}

    async def main(self) -> None:
        await self.step("overhead", overhead)
        await self.step("registry", registry)
        log("\n=== a new operator process ===")
        began = time.monotonic()
        await self.fresh_operator()
        self.results["seconds"]["new operator"] = round(time.monotonic() - began, 1)
        scaled = await self.step("scale", scale)
        args = self.bench_args("admission", admission)
        args.scans = 0  # the gate's index: what scale stored
        args.plot = self.args.plot
        await self.step("admission", admission, args)
        memory = self.results["figures"]["memory"]
        if scaled:
            memory["operator_rss_with_scans_mib"] = scale.rss_figure(scaled)
            memory["stored_scans"] = scaled["create"]["count"]
        self.targets.append(target("operator RSS idle (no ImageScans)", "reported",
                                   f"{memory['operator_rss_idle_mib']:.1f} MiB", True))


def summary(results: Figures, targets: list[Target]) -> str:
    m = results["machine"]
    lines = [f"scangate benchmarks: {m['date']}, commit {m['commit']}"
             + (f" (+{m['uncommitted_files']} uncommitted files)" if m["uncommitted_files"]
                else "") + f", {m['cpus']} x {m['cpu']}, {m['memory_gib']} GiB",
             "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["seconds"].items()),
             "CPU taken by the rest of the machine meanwhile (cores of "
             f"{m['cpus']}): " + ", ".join(f"{k} {v['others_cores']}"
                                           for k, v in results["cpu"].items()),
             ""]
    return "\n".join(lines + [target_line(t) for t in targets])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench/all.py", __doc__)
    parser.set_defaults(json=HERE / "results.json")  # a running sandbox: no other ImageScans
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, to try the whole run in a few minutes: "
                             + "; ".join(f"{k}: {v}" for k, v in QUICK.items()))
    for name in QUICK:
        parser.add_argument(f"--{name}-args", metavar="ARGS",
                            help=f"arguments of bench/{name}.py (instead of its defaults)")
    parser.add_argument("--idle-settle", type=float, default=10.0,
                        help="seconds a new operator is left alone before its idle RSS")
    parser.add_argument("--plot", type=Path, default=HERE / "admission-latency.png",
                        help="the admission latency plot (default bench/admission-latency.png)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    sandbox, started_here = None, False
    try:
        sandbox, started_here = start_sandbox(args)
        run = All(args, sandbox)
        asyncio.run(run.main())
    except BENCH_ERRORS as e:
        print(f"bench/all.py failed: {e}", file=sys.stderr)
        return 1
    finally:
        if started_here and sandbox is not None:
            stop_sandbox(sandbox)
    run.results["seconds"]["total"] = round(time.monotonic() - began, 1)
    run.results["targets"] = run.targets
    args.json.write_text(json.dumps(run.results, indent=1) + "\n")
    print(f"\n{summary(run.results, run.targets)}")
    print(f"\nfigures: {args.json}; plot: {args.plot}")
    return 1 if run.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
