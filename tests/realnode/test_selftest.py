"""The sandbox's self-test (tests/integration/test_sandbox.py: Jobs, logs, deadlines,
hardened pods, GC, RBAC, webhooks, init containers, projected tokens, deletion) passes on
the real node as on the emulated one; only the node agent's fault injection is skipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.controlplane import REPO, Sandbox

pytestmark = [pytest.mark.sandbox, pytest.mark.realnode]


def test_the_sandbox_self_test_passes_on_the_real_node(tmp_path: Path) -> None:
    node = Sandbox(tmp_path / "sandbox", node="real")
    node.up()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             f"--basetemp={tmp_path / 'selftest'}",
             str(REPO / "tests" / "integration" / "test_sandbox.py")],
            env={**os.environ, "SCANGATE_SANDBOX_DIR": str(node.dir)}, cwd=REPO,
            capture_output=True, text=True, timeout=900)
    finally:
        node.down()
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert "8 passed, 1 skipped" in summary, summary
