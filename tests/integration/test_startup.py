"""The sandbox starts every time, and says which process died and how when one does."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from sandbox.controlplane import Sandbox

pytestmark = [pytest.mark.sandbox, pytest.mark.startup]


def test_sandbox_starts_and_stops_ten_times_in_a_row(tmp_path: Path) -> None:
    took = []
    for i in range(10):
        sandbox = Sandbox(tmp_path / f"sb{i}")
        started = time.monotonic()
        sandbox.up(timeout=60)
        took.append(time.monotonic() - started)
        try:
            assert "sandbox-node" in sandbox.kubectl("get", "nodes", "-o", "name")
            pids = [int(str(p["pid"])) for p in sandbox._pids()]
        finally:
            sandbox.down()
        assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()
                    and b"Z" not in Path(f"/proc/{pid}/stat").read_bytes().split(b") ")[1][:1]]
    print(f"start times: {', '.join(f'{t:.1f}s' for t in took)}")
    assert max(took) < 30, took


def test_a_dead_process_is_named_with_its_signal_and_log(tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path / "sb")
    sandbox.up(timeout=60)
    try:
        registry = next(int(str(p["pid"])) for p in sandbox._pids() if p["name"] == "registry")
        os.kill(registry, signal.SIGKILL)
        deadline = time.monotonic() + 10
        with pytest.raises(RuntimeError) as died:
            while time.monotonic() < deadline:
                sandbox.check_alive()
                time.sleep(0.1)
    finally:
        sandbox.down()
    message = str(died.value)
    assert f"registry (pid {registry}) was killed by SIGKILL" in message
    last = (sandbox.dir / "logs" / "registry.log").read_text().splitlines()[-1]
    assert message.endswith(f"| {last}")
