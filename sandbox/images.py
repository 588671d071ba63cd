"""Synthetic OCI images with real package metadata, pushed through the distribution API.

An image is declared (see tests/data/images.yaml): OS identity, the distro's
package database (dpkg `status`, apk `installed`), Python `*.dist-info/METADATA`,
npm `node_modules/*/package.json`. The OS goes into one layer and the app
packages into another; tar entries, times and gzip headers are fixed, so the same
declaration always gives the same digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Any

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
TRIVY_DB_CONFIG = "application/vnd.aquasec.trivy.config.v1+json"
TRIVY_DB_LAYER = "application/vnd.aquasec.trivy.db.layer.v1.tar+gzip"
Decl = dict[str, Any]
ARCH = {"amd64": "x86_64", "arm64": "aarch64"}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- rendering declarations into files ----------------------------------------------

def os_files(decl: Decl, arch: str) -> dict[str, bytes]:
    os_ = decl.get("os")
    if not os_:
        return {}
    files = {"etc/os-release": (
        f'NAME="{os_["pretty"].split(" ")[0]}"\nID={os_["id"]}\n'
        f'VERSION_ID="{os_["version_id"] if os_["id"] == "alpine" else os_["version"]}"\n'
        f'PRETTY_NAME="{os_["pretty"]}"\n'
        + (f"VERSION_CODENAME={os_['codename']}\n" if os_.get("codename") else "")).encode()}
    if os_["id"] == "debian":
        files["etc/debian_version"] = f"{os_['version_id']}\n".encode()
    if os_["id"] == "alpine":
        files["etc/alpine-release"] = f"{os_['version_id']}\n".encode()
    if os_["id"] == "ubuntu":
        files["etc/lsb-release"] = (
            f"DISTRIB_ID=Ubuntu\nDISTRIB_RELEASE={os_['version']}\n"
            f"DISTRIB_CODENAME={os_.get('codename', '')}\n"
            f'DISTRIB_DESCRIPTION="{os_["pretty"]}"\n').encode()
    if decl.get("dpkg"):
        stanzas = []
        for p in decl["dpkg"]:
            stanza = [f"Package: {p['name']}", "Status: install ok installed",
                      "Priority: optional", "Section: misc", "Installed-Size: 100",
                      "Maintainer: scangate tests <tests@scangate.dev>", f"Architecture: {arch}"]
            if p.get("source") and p["source"] != p["name"]:
                stanza.append(f"Source: {p['source']}")
            stanza += [f"Version: {p['version']}", f"Description: {p['name']} (test package)"]
            stanzas.append("\n".join(stanza) + "\n")
        files["var/lib/dpkg/status"] = "\n".join(stanzas).encode()
    if decl.get("apk"):
        entries = []
        for p in decl["apk"]:
            entries.append("\n".join([
                f"C:Q1{hashlib.sha1(p['name'].encode()).hexdigest()[:27]}=",
                f"P:{p['name']}", f"V:{p['version']}", f"A:{ARCH.get(arch, arch)}",
                "S:1000", "I:2000", f"T:{p['name']} (test package)",
                "U:https://scangate.dev/", "L:MIT", f"o:{p.get('origin') or p['name']}",
                "m:scangate tests <tests@scangate.dev>", "t:1700000000",
                "c:0000000000000000000000000000000000000000"]) + "\n")
        files["lib/apk/db/installed"] = "\n".join(entries).encode()
    return files


def app_files(decl: Decl) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for p in decl.get("python", []):
        files[f"usr/local/lib/python3.11/site-packages/{p['name']}-{p['version']}.dist-info/"
              "METADATA"] = (f"Metadata-Version: 2.1\nName: {p['name']}\n"
                             f"Version: {p['version']}\n").encode()
    if decl.get("npm"):
        deps = {p["name"]: p["version"] for p in decl["npm"]}
        files["app/package.json"] = json.dumps(
            {"name": "app", "version": "1.0.0", "dependencies": deps}, indent=2).encode()
        for name, version in deps.items():
            files[f"app/node_modules/{name}/package.json"] = json.dumps(
                {"name": name, "version": version, "license": "MIT"}, indent=2).encode()
    files.update({path.lstrip("/"): content.encode() if isinstance(content, str) else content
                  for path, content in decl.get("files", {}).items()})
    return files


def layer(files: dict[str, bytes], mode: int = 0o644, links: dict[str, str] | None = None,
          modes: dict[str, int] | None = None) -> tuple[bytes, str]:
    """A deterministic gzip'd tar of `files` (with `mode`; 0o755 for executables),
    symbolic `links` (path -> target) and directories of other `modes` than 0o755 (e.g.
    a sticky /tmp), and the digest of the uncompressed tar."""
    links, modes = links or {}, modes or {}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({"/".join(p.split("/")[:i]) for p in [*files, *links]
                       for i in range(1, p.count("/") + 1)} | set(modes))
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, modes.get(d, 0o755)
            tar.addfile(info)
        for path in sorted(files):
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(files[path]), mode
            tar.addfile(info, io.BytesIO(files[path]))
        for path, target in sorted(links.items()):
            info = tarfile.TarInfo(path)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    data = raw.getvalue()
    return gzip.compress(data, mtime=0), sha256(data)


@dataclass
class Image:
    """An image ready to push: its blobs and manifest."""

    manifest: bytes
    blobs: dict[str, bytes] = field(default_factory=dict)
    platform: str = "linux/amd64"

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


def build_image(decl: Decl, platform: str = "linux/amd64",
                extra_layers: list[tuple[bytes, str]] | None = None,
                config: dict[str, Any] | None = None,
                history: list[dict[str, Any]] | None = None) -> Image:
    """`extra_layers` (gzip'd blob, diff id) go on top, e.g. executables for a real node.
    `config` replaces fields of the image's run config (e.g. {"User": ""} runs it as root),
    `history` is the config's build history (what Trivy's misconfig checks rebuild the
    Dockerfile from)."""
    os_name, arch = platform.split("/")[:2]
    layers = [layer(files) for files in (os_files(decl, arch), app_files(decl)) if files]
    layers += extra_layers or []
    config_file = json.dumps({
        "architecture": arch, "os": os_name,
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["/bin/sh"],
                   "User": "65532", **(config or {})},
        "rootfs": {"type": "layers", "diff_ids": [diff for _, diff in layers]},
        **({"history": history} if history else {}),
    }, sort_keys=True).encode()
    blobs = {sha256(config_file): config_file}
    blobs.update({sha256(blob): blob for blob, _ in layers})
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config_file),
                   "size": len(config_file)},
        "layers": [{"mediaType": OCI_LAYER, "digest": sha256(blob), "size": len(blob)}
                   for blob, _ in layers],
    }, sort_keys=True).encode()
    return Image(manifest, blobs, platform)


def platforms(decl: Decl) -> dict[str, Decl]:
    """Each platform's declaration (a single-platform image has just linux/amd64)."""
    return decl.get("platforms") or {"linux/amd64": decl}


# -- pushing -------------------------------------------------------------------------

class Pusher:
    """Pushes blobs and manifests to one registry (anonymous or Basic auth)."""

    def __init__(self, base_url: str, auth: tuple[str, str] | None = None,
                 verify: Any = True) -> None:
        self.http = httpx.Client(base_url=base_url, auth=auth, verify=verify, timeout=30)

    def close(self) -> None:
        self.http.close()

    def blob(self, repository: str, data: bytes) -> str:
        digest = sha256(data)
        if self.http.head(f"/v2/{repository}/blobs/{digest}").status_code == 200:
            return digest
        start = self.http.post(f"/v2/{repository}/blobs/uploads/")
        start.raise_for_status()
        location = start.headers["Location"]
        sep = "&" if "?" in location else "?"
        self.http.put(f"{location}{sep}digest={digest}", content=data,
                      headers={"Content-Type": "application/octet-stream"}).raise_for_status()
        return digest

    def manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> str:
        r = self.http.put(f"/v2/{repository}/manifests/{reference}", content=body,
                          headers={"Content-Type": media_type})
        r.raise_for_status()
        return str(r.headers.get("Docker-Content-Digest") or sha256(body))

    def image(self, repository: str, tag: str, image: Image) -> str:
        for data in image.blobs.values():
            self.blob(repository, data)
        return self.manifest(repository, tag, image.manifest, OCI_MANIFEST)

    def index(self, repository: str, tag: str, images: list[Image]) -> str:
        manifests = []
        for image in images:
            self.image(repository, image.digest, image)
            os_name, arch = image.platform.split("/")[:2]
            manifests.append({"mediaType": OCI_MANIFEST, "digest": image.digest,
                              "size": len(image.manifest),
                              "platform": {"os": os_name, "architecture": arch}})
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests},
                          sort_keys=True).encode()
        return self.manifest(repository, tag, body, OCI_INDEX)

    def trivy_db(self, repository: str, tag: str, archive: bytes) -> str:
        """Push db.tar.gz as the OCI artifact `trivy --db-repository` downloads."""
        config = b"{}"
        self.blob(repository, config)
        self.blob(repository, archive)
        body = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": TRIVY_DB_CONFIG, "digest": sha256(config),
                       "size": len(config)},
            "layers": [{"mediaType": TRIVY_DB_LAYER, "digest": sha256(archive),
                        "size": len(archive),
                        "annotations": {"org.opencontainers.image.title": "db.tar.gz"}}],
        }, sort_keys=True).encode()
        return self.manifest(repository, tag, body, OCI_MANIFEST)
