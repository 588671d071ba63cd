"""Real Trivy against the sandbox registry, with the offline DB built from the advisory list.

Every expectation is computed from tests/data/advisories.yaml, never from Trivy's output.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from sandbox.advisories import load_advisories, load_images
from sandbox.controlplane import free_port
from sandbox.distribution import Registry
from sandbox.images import Pusher, build_image
from sandbox.pki import CertificateAuthority
from scangate.core.images import parse_image
from scangate.registry.client import (
    Credentials,
    ImageNotFound,
    RegistryAuthError,
    RegistryClient,
    RegistryUnavailable,
)

pytestmark = pytest.mark.sandbox


def named_images(env: dict[str, str]) -> list[dict[str, Any]]:
    listing: list[dict[str, Any]] = json.loads(
        (Path(env["SANDBOX_DIR"]) / "images.json").read_text())
    return listing


def findings(report: dict[str, Any]) -> list[dict[str, str]]:
    return sorted(({"id": v["VulnerabilityID"], "package": v["PkgName"],
                    "installedVersion": v["InstalledVersion"],
                    "fixedVersion": v.get("FixedVersion", ""), "severity": v["Severity"]}
                   for r in report.get("Results") or [] for v in r.get("Vulnerabilities") or []),
                  key=lambda f: (f["id"], f["package"]))


def trivy(env: dict[str, str], tmp: Path, image: dict[str, Any], mode: str) -> dict[str, Any]:
    args = [env["TRIVY"], "image", "--format", "json", "--quiet", "--insecure",
            "--scanners", "vuln", "--skip-version-check", "--cache-dir", str(tmp / mode),
            "--platform", image.get("platform", "linux/amd64")]
    if mode == "standalone":
        args += ["--db-repository", env["TRIVY_DB_REPOSITORY"], "--skip-java-db-update"]
    else:
        args += ["--server", env["TRIVY_SERVER"]]
    out = subprocess.run([*args, image["image"]], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRIVY_TOKEN": env["TRIVY_TOKEN"]})
    assert out.returncode == 0, out.stderr
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def test_advisory_list_is_large_and_real_shaped() -> None:
    advisories = load_advisories()
    assert len(advisories) >= 40
    assert {a["ecosystem"] for a in advisories} == {"debian", "ubuntu", "alpine", "pip", "npm"}
    assert any(a.get("fixed", "x") is None or a.get("patched") == [] for a in advisories)
    for a in advisories:
        assert a["id"].startswith(("CVE-", "GHSA-")) and a["source"].startswith("https://")


@pytest.mark.parametrize("mode", ["standalone", "client-server"])
def test_trivy_finds_exactly_the_expected_findings(
    sandbox_env: dict[str, str], tmp_path: Path, mode: str
) -> None:
    images = named_images(sandbox_env)
    assert {i["name"] for i in images} >= {"clean", "debian-critical", "alpine-mixed",
                                           "python-app", "npm-app", "multiarch", "all-low"}
    for image in images:
        report = trivy(sandbox_env, tmp_path, image, mode)
        assert findings(report) == image["expected"], f"{image['name']} {mode}"
    by_name = {(i["name"], i.get("platform")): i for i in images}
    assert by_name[("clean", None)]["expected"] == []
    assert {f["severity"] for f in by_name[("all-low", None)]["expected"]} == {"LOW"}
    alpine = by_name[("alpine-mixed", None)]["expected"]
    assert any(f["fixedVersion"] for f in alpine) and any(not f["fixedVersion"] for f in alpine)
    amd, arm = by_name[("multiarch", "linux/amd64")], by_name[("multiarch", "linux/arm64")]
    assert amd["expected"] != arm["expected"] and amd["digest"] != arm["digest"]


def test_images_are_reproducible(sandbox_env: dict[str, str]) -> None:
    """The digests pushed at sandbox start equal a fresh build of the same declarations."""
    declared, pushed = load_images(), named_images(sandbox_env)
    assert {i["name"] for i in pushed} == set(declared), "every declared image is pushed"
    for image in pushed:
        decl = declared[image["name"]]
        if "platform" in image:
            decl = decl["platforms"][image["platform"]]
        assert build_image(decl, image.get("platform", "linux/amd64")).digest == image["digest"]


class _Events(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.extend(body.get("events", []))
        self.send_response(200)
        self.end_headers()


@pytest.fixture
def event_sink() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Events)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/events"
    server.shutdown()


def test_push_sends_a_notification_with_digest_and_tag(tmp_path: Path, event_sink: str) -> None:
    import time

    registry = Registry(tmp_path / "registry", free_port(), notify=[event_sink])
    registry.start()
    try:
        pusher = Pusher(registry.url)
        image = build_image(load_images()["all-low"])
        digest = pusher.image("team-a/app", "v1.2.3", image)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pushes = [e for e in _Events.received if e.get("action") == "push"
                      and e["target"].get("tag") == "v1.2.3"]
            if pushes:
                break
            time.sleep(0.2)
        assert pushes, _Events.received
        target = pushes[0]["target"]
        assert (target["digest"], target["repository"]) == (digest, "team-a/app")
    finally:
        registry.stop()


def _resolve(url: str, ref: str, **kwargs: Any) -> str:
    async def go() -> str:
        async with RegistryClient(url, **kwargs) as client:
            return (await client.resolve(parse_image(ref))).digest
    return asyncio.run(go())


def test_registry_client_with_basic_auth_and_tls(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    registry = Registry(tmp_path / "registry", free_port(), tls=ca, users={"reader": "s3cret"})
    registry.start()
    try:
        tls = ssl.create_default_context(cafile=str(ca.cert_path))
        pusher = Pusher(registry.url, auth=("reader", "s3cret"), verify=tls)
        digest = pusher.image("team-a/api", "1.0", build_image(load_images()["clean"]))
        ref = f"{registry.host}/team-a/api:1.0"
        good = Credentials("reader", "s3cret")
        assert _resolve(registry.url, ref, credentials=good, verify=tls) == digest
        with pytest.raises(RegistryAuthError, match="reader"):
            _resolve(registry.url, ref, credentials=Credentials("reader", "wrong"), verify=tls)
        with pytest.raises(RegistryAuthError):
            _resolve(registry.url, ref, verify=tls)
        with pytest.raises(RegistryUnavailable):  # the CA is not trusted by default
            _resolve(registry.url, ref, credentials=good)
        with pytest.raises(ImageNotFound, match="missing"):
            _resolve(registry.url, f"{registry.host}/team-a/missing:1.0", credentials=good,
                     verify=tls)

        async def tags() -> list[str]:
            async with RegistryClient(registry.url, credentials=good, verify=tls) as client:
                return await client.tags("team-a/api")
        assert asyncio.run(tags()) == ["1.0"]
    finally:
        registry.stop()


def test_registry_client_resolves_platforms_and_paginates(sandbox_env: dict[str, str]) -> None:
    url = f"http://{sandbox_env['REGISTRY']}"
    images = {(i["name"], i.get("platform")): i for i in named_images(sandbox_env)}
    ref = images[("multiarch", "linux/arm64")]["image"]

    async def go() -> tuple[str, str, list[str], list[list[str]]]:
        async with RegistryClient(url) as client:
            arm = await client.resolve(parse_image(ref), "linux/arm64")
            amd = await client.resolve(parse_image(ref), "linux/amd64")
            pusher = Pusher(url)
            image = build_image(load_images()["clean"])
            for i in range(25):
                pusher.image("paging/app", f"t{i:02d}", image)
            pusher.close()
            # distribution 2.8 pages the catalog (Link: rel="next"); pages of 3 need several.
            return (arm.digest, amd.digest, await client.tags("paging/app"),
                    [page async for page in client.catalog(page_size=3)])
    arm, amd, tags, pages = asyncio.run(go())
    catalog = [repository for page in pages for repository in page]
    assert len(pages) > 1 and all(len(page) <= 3 for page in pages)
    assert arm == images[("multiarch", "linux/arm64")]["digest"]
    assert amd == images[("multiarch", "linux/amd64")]["digest"]
    assert sorted(tags) == [f"t{i:02d}" for i in range(25)]
    repositories = {i["image"].split("/", 1)[1].rsplit(":", 1)[0] for i in images.values()}
    assert repositories | {"paging/app", "trivy-db"} <= set(catalog)
    assert len(catalog) == len(set(catalog)) > 3


def test_registry_client_with_token_auth(tmp_path: Path) -> None:
    from sandbox.tokenserver import TokenServer

    tokens = TokenServer(tmp_path, {"ci": "t0ken-pass"}, service="registry.test")
    tokens.start()
    registry = Registry(tmp_path / "registry", free_port(), token_auth=tokens.registry_auth())
    registry.start()
    try:
        assert httpx.get(f"{registry.url}/v2/").status_code == 401
        good = Credentials("ci", "t0ken-pass")

        async def go(credentials: Credentials | None) -> str:
            async with RegistryClient(registry.url, credentials=credentials) as client:
                return (await client.resolve(parse_image(f"{registry.host}/team-a/api:1.0"))
                        ).digest

        # Push through the same flow: a token with push rights.
        token = httpx.get(tokens.realm, params={"service": "registry.test",
                                                "scope": "repository:team-a/api:pull,push"},
                          auth=("ci", "t0ken-pass")).json()["token"]
        pusher = Pusher(registry.url)
        pusher.http.headers["Authorization"] = f"Bearer {token}"
        digest = pusher.image("team-a/api", "1.0", build_image(load_images()["clean"]))
        assert asyncio.run(go(good)) == digest
        assert tokens.issued[-1]["access"] == [
            {"type": "repository", "name": "team-a/api", "actions": ["pull"]}]
        with pytest.raises(RegistryAuthError, match="refused"):
            asyncio.run(go(Credentials("ci", "wrong")))
        with pytest.raises(RegistryAuthError):
            asyncio.run(go(None))
    finally:
        registry.stop()
        tokens.stop()


def test_vulnerability_db_is_reproducible(tmp_path: Path) -> None:
    from sandbox.advisories import build_db

    first = build_db(tmp_path / "one").read_bytes()
    assert build_db(tmp_path / "two").read_bytes() == first
