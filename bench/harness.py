"""What the sandbox benchmarks share: a sandbox of their own or a running one, and the
report (the figures as JSON, then one PASS or MISS line per target)."""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sandbox.controlplane import Sandbox

Figures = dict[str, Any]
Target = dict[str, Any]
"""name, target (text), value (text), pass (bool)."""


def print_report(figures: Figures, targets: list[Target]) -> None:
    print(json.dumps(figures, indent=1))
    for t in targets:
        print(f"{'PASS' if t['pass'] else 'MISS'}  {t['name']}: {t['value']} "
              f"(target {t['target']})")


def run_in_sandbox(prog: str, args: argparse.Namespace,
                   bench: Callable[[argparse.Namespace], Awaitable[Figures]],
                   targets: Callable[[Figures], list[Target]]) -> int:
    """Run `bench` on the sandbox of `args.sandbox_dir`, or on one started (and stopped)
    here; print and optionally (`args.json`) write its figures and target lines. A MISS
    is a finding, not an error: the status is non-zero only when the bench could not
    run. `args.cleanup` tells the bench whether to delete what it made (pointless in a
    sandbox thrown away whole)."""
    started_here = args.sandbox_dir is None
    args.cleanup = not started_here
    args.sandbox_dir = (Path(tempfile.mkdtemp(prefix="scangate-bench-")) if started_here
                        else Path(args.sandbox_dir).resolve())
    sandbox = Sandbox(args.sandbox_dir) if started_here else Sandbox.attach(args.sandbox_dir)
    try:
        if started_here:
            print(f"starting a sandbox in {args.sandbox_dir}", file=sys.stderr, flush=True)
            sandbox.up(operator=True)
        figures = asyncio.run(bench(args))
        lines = targets(figures)
        print_report(figures, lines)
        if args.json:
            Path(args.json).write_text(json.dumps({"figures": figures, "targets": lines},
                                                  indent=1) + "\n")
    except (RuntimeError, OSError, httpx.HTTPError, subprocess.CalledProcessError,
            ssl.SSLError) as e:
        print(f"{prog} failed: {e}", file=sys.stderr)
        return 1
    finally:
        if started_here:
            sandbox.down()
    return 0
