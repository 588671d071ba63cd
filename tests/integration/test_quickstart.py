"""The README's quick start, run as written: `make demo ARGS=--no-wait` completes
unattended and tells the whole story; `make demo` then keeps the sandbox up, the
commands the README gives for another terminal work against it, and Ctrl-C cleans up."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

# sandbox too: `make unit` (-m 'not sandbox') must not run `make demo`.
pytestmark = [pytest.mark.startup, pytest.mark.sandbox]
REPO = Path(__file__).resolve().parents[2]
STORY = ["is refused at apply time", "spec.tagFilter", "a push is picked up by the rule",
         "its result is reused", 'admission webhook "workloads.scangate.dev" denied',
         "fails ScanPolicy demo-no-criticals", "deployment.apps/ok created",
         "ScanCompleted: ", "scangate_scans_total"]
"""What `make demo` must show, in this order."""


def quick_start() -> list[list[str]]:
    """The shell blocks of the README's "Quick start" section, as lists of commands."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [[line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]
            for block in blocks]


def assert_story(output: str) -> None:
    at = 0
    for mark in STORY:
        found = output.find(mark, at)
        assert found >= 0, f"{mark!r} missing after position {at}:\n{output[-3000:]}"
        at = found


def _ctrl_c_as_at_a_terminal() -> None:
    """In the demo's process: SIGINT handled as at a terminal even when the suite runs in
    the background (`cmd &` starts it with SIGINT ignored, and bash cannot trap a signal
    ignored on entry, so Ctrl-C would leave the sandbox running)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_the_quick_start_works_as_written() -> None:
    (unattended, kept), in_another_terminal = quick_start()
    assert unattended == "make demo ARGS=--no-wait" and kept == "make demo"
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "SANDBOX_DIR")}

    done = subprocess.run(["bash", "-c", unattended], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:]
    assert_story(done.stdout)
    assert not (REPO / ".sandbox" / "pids.json").exists() or "[]" in (
        REPO / ".sandbox" / "pids.json").read_text()

    demo = subprocess.Popen(["bash", "-c", kept], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_ctrl_c_as_at_a_terminal)
    output = ""
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 900
        while "Press Ctrl-C" not in output and time.monotonic() < deadline:
            line = demo.stdout.readline()
            if not line:
                break
            output += line
        assert "Press Ctrl-C" in output, output[-3000:]
        assert_story(output)
        for command in in_another_terminal[1:]:
            shell = f"{in_another_terminal[0]}\n{command}"
            ran = subprocess.run(["bash", "-c", shell], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=120, check=False)
            assert ran.returncode == 0, (command, ran.stdout, ran.stderr)
            assert ran.stdout.strip(), command
    finally:
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C at the terminal: the whole group
        demo.wait(120)
    pids = REPO / ".sandbox" / "pids.json"
    assert not pids.exists() or pids.read_text().strip() in ("", "[]"), pids.read_text()
