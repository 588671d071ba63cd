"""`scangate scan IMAGE`: a local Trivy (the pinned one of the virtualenv) against the
sandbox registry and Trivy server, configured by nothing but the sandbox's env file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import sarif_schema
from sandbox.controlplane import load_env
from scans import push_variant

pytestmark = pytest.mark.sandbox
BIN = Path(sys.executable).parent


def scan(env: dict[str, str], *args: str, path: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    """`scangate scan` in a shell that sourced the sandbox's env file, and no more: the
    virtualenv is not on PATH, so its pinned Trivy is found beside scangate's interpreter."""
    sandbox_env = {**load_env(Path(env["SANDBOX_DIR"])),
                   "PATH": path if path is not None else "/usr/bin:/bin",
                   "HOME": str(Path(env["SANDBOX_DIR"]) / "home")}
    return subprocess.run([str(BIN / "scangate"), "scan", *args], capture_output=True,
                          text=True, timeout=300, env=sandbox_env)


def test_a_local_scan_summarises_and_judges_under_a_policy_file(
    sandbox_env: dict[str, str], tmp_path: Path,
) -> None:
    bad, _ = push_variant(sandbox_env, "debian-critical")
    clean, _ = push_variant(sandbox_env, "clean")
    policy = tmp_path / "policy.yaml"
    policy.write_text("apiVersion: scangate.dev/v1alpha1\nkind: ScanPolicy\n"
                      "metadata: {name: no-critical}\nspec: {thresholds: {critical: 0}}\n")
    blocked = scan(sandbox_env, bad, "--policy", str(policy), "--format", "json")
    assert blocked.returncode == 1, blocked.stderr
    found: dict[str, Any] = json.loads(blocked.stdout)
    assert found["summary"]["critical"] > 0 and found["decision"]["allowed"] is False
    assert any(f["severity"] == "CRITICAL" and f.get("fixedVersion")
               for f in found["findings"])
    table = scan(sandbox_env, bad, "--policy", str(policy), "--severity", "CRITICAL")
    assert table.returncode == 1
    assert "CRITICAL" in table.stdout and "BLOCKED" in table.stdout
    assert " LOW " not in table.stdout.split("SEVERITY", 1)[1]  # only CRITICAL rows
    passed = scan(sandbox_env, clean, "--policy", str(policy))
    assert passed.returncode == 0 and "PASS" in passed.stdout, passed.stderr


def test_a_sarif_scan_is_valid_sarif_2_1_0_and_exits_1_when_blocked(
    sandbox_env: dict[str, str], tmp_path: Path,
) -> None:
    bad, _ = push_variant(sandbox_env, "debian-critical")
    policy = tmp_path / "policy.yaml"
    policy.write_text("apiVersion: scangate.dev/v1alpha1\nkind: ScanPolicy\n"
                      "metadata: {name: no-critical}\nspec: {thresholds: {critical: 0}}\n")
    blocked = scan(sandbox_env, bad, "--policy", str(policy), "--format", "sarif")
    assert blocked.returncode == 1, blocked.stderr
    log: dict[str, Any] = json.loads(blocked.stdout)
    assert [e.message for e in sarif_schema.validator().iter_errors(log)] == []
    run = log["runs"][0]
    assert run["properties"]["decision"]["allowed"] is False
    assert run["invocations"][0]["exitCode"] == 1
    assert len(run["results"]) == run["properties"]["summary"]["total"] > 0
    critical = [r for r in run["results"] if r["properties"]["severity"] == "CRITICAL"]
    assert critical and all(r["level"] == "error" for r in critical)
    assert any(rule.get("helpUri", "").startswith("https://")
               for rule in run["tool"]["driver"]["rules"])


def test_errors_are_one_clear_line_and_exit_2(sandbox_env: dict[str, str]) -> None:
    for args, says in ((["Not An Image!"], "invalid"),
                       (["--trivy", "/nonexistent/trivy", "registry.invalid/x:1"],
                        "cannot run /nonexistent/trivy")):
        out = scan(sandbox_env, *args)
        assert out.returncode == 2 and says in out.stderr.lower(), out.stderr
        assert "Traceback" not in out.stderr
