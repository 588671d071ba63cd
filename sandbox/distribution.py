"""A real registry for the tests: Debian's `docker-registry` (distribution v2.8) on loopback.

Variants: plain HTTP (the default), TLS with a test CA, htpasswd Basic auth, and
bearer-token auth with sandbox.tokenserver;
push notifications go to any endpoints given.
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import httpx
import yaml

from sandbox.pki import CertificateAuthority

BINARY = "/usr/bin/docker-registry"


@dataclass
class Registry:
    dir: Path
    port: int
    tls: CertificateAuthority | None = None
    users: dict[str, str] = field(default_factory=dict)
    notify: list[str] = field(default_factory=list)
    notify_headers: dict[str, list[str]] = field(default_factory=dict)
    """Headers of every notification, e.g. the receiver's token."""
    token_auth: dict[str, object] | None = None
    """The `auth:` section for token auth (see sandbox.tokenserver)."""
    proc: subprocess.Popen[bytes] | None = None
    bind: str = "127.0.0.1"
    """The address it listens on (the real node's pods reach it on the node's bridge)."""

    @property
    def host(self) -> str:
        return f"{self.bind}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def config(self) -> dict[str, object]:
        self.dir.mkdir(parents=True, exist_ok=True)
        http: dict[str, object] = {"addr": self.host, "secret": "scangate-sandbox"}
        if self.tls:
            pair = self.tls.issue("registry", "registry", server=True, hosts=("127.0.0.1",))
            http["tls"] = {"certificate": str(pair.cert), "key": str(pair.key)}
        config: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text"},
            "storage": {"filesystem": {"rootdirectory": str(self.dir / "data")},
                        "delete": {"enabled": True}},
            "http": http,
        }
        if self.token_auth:
            config["auth"] = self.token_auth
        elif self.users:
            htpasswd = self.dir / "htpasswd"
            htpasswd.write_text("".join(
                f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                for user, pw in self.users.items()))
            config["auth"] = {"htpasswd": {"realm": "scangate-sandbox", "path": str(htpasswd)}}
        if self.notify:
            config["notifications"] = {"endpoints": [
                {"name": f"endpoint-{i}", "url": url, "timeout": "2s", "threshold": 5,
                 "backoff": "1s", "ignore": {"actions": ["pull"]},
                 **({"headers": self.notify_headers} if self.notify_headers else {})}
                for i, url in enumerate(self.notify)]}
        return config

    def command(self) -> list[str]:
        """Write the configuration; the command line that serves it."""
        path = self.dir / "config.yml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.config()))
        return [BINARY, "serve", str(path)]

    def start(self, timeout: float = 30) -> None:
        argv = self.command()
        with open(self.dir / "registry.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.wait_ready(timeout)

    def ready(self) -> bool:
        """The registry answers its API root (200, or 401 when it wants credentials)."""
        verify = (ssl.create_default_context(cafile=str(self.tls.cert_path)) if self.tls
                  else True)
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/v2/", verify=verify, timeout=2).status_code in (200,
                                                                                         401)
        return False

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited with status {self.proc.returncode}; "
                                   f"see {self.dir}/registry.log")
            if self.ready():
                return
            time.sleep(0.1)
        raise TimeoutError(f"docker-registry not ready; see {self.dir}/registry.log")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
