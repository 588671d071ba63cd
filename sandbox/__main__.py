"""`hack/sandbox up|down --dir DIR`: the sandbox from the command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sandbox.controlplane import Sandbox


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/sandbox", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "images", "db-update"],
                        help="start, stop, list the named test images (JSON), or publish "
                             "the next vulnerability DB (one more real advisory) and have "
                             "the Trivy server load it")
    parser.add_argument("--dir", required=True, type=Path, help="state, logs and env go here")
    parser.add_argument("--operator", action="store_true",
                        help="also install the CRDs and run the operator from the checkout")
    parser.add_argument("--node", choices=["emulated", "real"], default="emulated",
                        help="the emulated node agent (default) or a real node: containerd, "
                             "kubelet, kube-scheduler, kube-proxy (root; sandbox.realnode)")
    parser.add_argument("--restore", action="store_true",
                        help="db-update: publish the first DB again (what `up` published)")
    args = parser.parse_args(argv)
    if args.operator and args.node == "real":
        parser.error("--operator runs the checkout's operator beside the emulated node; on a "
                     "real node install the chart with the built images (README: the real node)")
    sandbox = Sandbox(args.dir.resolve(), node=args.node)
    if args.command == "images":
        print((sandbox.dir / "images.json").read_text())
        return 0
    if args.command == "db-update":
        try:
            updated = Sandbox.attach(args.dir.resolve()).db_update(restore=args.restore)
        except (RuntimeError, TimeoutError) as e:
            print(f"hack/sandbox db-update failed: {e}", file=sys.stderr)
            return 1
        print(f"the Trivy server serves the DB of {updated}")
        return 0
    if args.command == "down":
        sandbox.down()
        print(f"sandbox in {sandbox.dir} stopped")
        return 0
    started = time.monotonic()
    try:
        sandbox.up(operator=args.operator)
    except (RuntimeError, TimeoutError) as e:
        print(f"hack/sandbox up failed: {e}", file=sys.stderr)
        return 1
    print(f"sandbox up in {time.monotonic() - started:.1f}s; source {sandbox.dir}/env")
    for name, value in sandbox.env.items():
        print(f"  {name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
