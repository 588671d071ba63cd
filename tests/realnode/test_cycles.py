"""`hack/sandbox up --node real` ten times in a row, each under 30 s with the binaries
cached, and `down` leaves nothing behind: no process, mount, bridge, cgroup, iptables
chain, changed kernel setting or path outside the sandbox directory."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from sandbox.controlplane import REPO
from sandbox.realnode import machine_state

pytestmark = [pytest.mark.sandbox, pytest.mark.realnode]
CYCLES = 10


def sandbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "hack" / "sandbox"), *args], capture_output=True,
                          text=True, timeout=300)


def test_up_and_down_ten_times_each_under_30_s_leaving_nothing_behind(tmp_path: Path) -> None:
    directory = tmp_path / "sandbox"
    before = machine_state(directory)
    assert before["processes"] == [] and before["mounts"] == [] and not before["lock"]
    times = []
    for cycle in range(CYCLES):
        started = time.monotonic()
        up = sandbox("up", "--dir", str(directory), "--node", "real")
        times.append(time.monotonic() - started)
        try:
            assert up.returncode == 0, f"cycle {cycle}: {up.stderr[-3000:]}"
            during = machine_state(directory)
            # The node really ran: its processes, its bridge, the kubelet's settings.
            assert during["processes"] and during["bridges"] and during["lock"], during
            assert during["sysctls"]["vm/overcommit_memory"] == "1"
        finally:
            down = sandbox("down", "--dir", str(directory))
        assert down.returncode == 0, f"cycle {cycle}: {down.stderr[-3000:]}"
        after = machine_state(directory)
        assert after == before, f"cycle {cycle} left: " + repr(
            {k: (before[k], after[k]) for k in before if before[k] != after[k]})
        assert times[-1] < 30, f"cycle {cycle}: up took {times[-1]:.1f}s"
    print(f"up times: {', '.join(f'{t:.1f}s' for t in times)}")
