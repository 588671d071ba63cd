"""The curated advisory list: the offline Trivy DB built from it, and expected findings.

The DB follows Trivy DB schema 2 (a bbolt file, written by hack/trivydb):

- `vulnerability`: ID -> {Title, Severity, VendorSeverity}
- `<os> <release>` (e.g. `debian 12`) -> source package -> ID -> {FixedVersion} or {Status}
- `<ecosystem>::GitHub Security Advisory <ecosystem>` -> package -> ID ->
  {VulnerableVersions, PatchedVersions}
- `data-source`: bucket name -> {ID, Name, URL}

Expected findings are computed from the same list with each ecosystem's own
version ordering (dpkg, apk, PEP 440, semver), independently of Trivy.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from univers.versions import AlpineLinuxVersion, DebianVersion, PypiVersion, SemverVersion

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
Decl = dict[str, Any]
SEVERITY_NUMBER = {"UNKNOWN": 0, "LOW": 1, "MEDIUM": 2, "HIGH": 3, "CRITICAL": 4}
STATUS_AFFECTED = 2
# When the DB says it was built: fixed, so that the same list gives the same DB.
BUILT_AT = datetime(2026, 11, 1, tzinfo=UTC)
UPDATE_BUILT_AT = datetime(2026, 11, 2, tzinfo=UTC)
"""When the DB `hack/sandbox db-update` publishes says it was built (advisories.yaml and
advisories-update.yaml)."""

OS_SOURCES = {
    "debian": ("debian", "Debian Security Tracker",
               "https://salsa.debian.org/security-tracker-team/security-tracker"),
    "ubuntu": ("ubuntu", "Ubuntu CVE Tracker",
               "https://git.launchpad.net/ubuntu-cve-tracker"),
    "alpine": ("alpine", "Alpine Secdb", "https://secdb.alpinelinux.org/"),
}
VERSION_CLASS = {"debian": DebianVersion, "ubuntu": DebianVersion, "alpine": AlpineLinuxVersion,
                 "pip": PypiVersion, "npm": SemverVersion}


def load_advisories() -> list[Decl]:
    advisories: list[Decl] = yaml.safe_load((DATA / "advisories.yaml").read_text())
    return advisories


def load_update() -> list[Decl]:
    """The advisories the sandbox's next DB adds (hack/sandbox db-update)."""
    added: list[Decl] = yaml.safe_load((DATA / "advisories-update.yaml").read_text())
    return added


def load_images() -> dict[str, Decl]:
    images: dict[str, Decl] = yaml.safe_load((DATA / "images.yaml").read_text())
    return images


def _bucket(advisory: Decl) -> str:
    eco = advisory["ecosystem"]
    if eco in OS_SOURCES:
        return f"{eco} {advisory['release']}"
    return f"{eco}::GitHub Security Advisory {eco}"


def db_entries(advisories: list[Decl]) -> list[dict[str, Any]]:
    """Every (bucket path, key, value) of the Trivy DB, in a stable order."""
    entries: list[dict[str, Any]] = []
    details: dict[str, Decl] = {}
    sources: dict[str, Decl] = {}
    for adv in advisories:
        eco, bucket = adv["ecosystem"], _bucket(adv)
        source_id = OS_SOURCES[eco][0] if eco in OS_SOURCES else "ghsa"
        if eco in OS_SOURCES:
            _, name, url = OS_SOURCES[eco]
            sources[bucket] = {"ID": source_id, "Name": name, "URL": url}
            value: Decl = ({"FixedVersion": adv["fixed"]} if adv["fixed"]
                           else {"Status": STATUS_AFFECTED})
        else:
            sources[bucket] = {"ID": "ghsa", "Name": f"GitHub Security Advisory {eco}",
                               "URL": f"https://github.com/advisories?query=ecosystem%3A{eco}"}
            value = {"VulnerableVersions": [_trivy_constraint(r) for r in adv["vulnerable"]],
                     "PatchedVersions": adv["patched"]}
        entries.append({"path": [bucket, adv["package"]], "key": adv["id"],
                        "value": json.dumps(value, sort_keys=True)})
        detail = details.setdefault(adv["id"], {"Title": adv["title"],
                                                "Severity": adv["severity"],
                                                "VendorSeverity": {}})
        detail["VendorSeverity"][source_id] = SEVERITY_NUMBER[adv["severity"]]
    for vid, detail in sorted(details.items()):
        entries.append({"path": ["vulnerability"], "key": vid,
                        "value": json.dumps(detail, sort_keys=True)})
    for bucket, source in sorted(sources.items()):
        entries.append({"path": ["data-source"], "key": bucket,
                        "value": json.dumps(source, sort_keys=True)})
    return entries


def _trivy_constraint(text: str) -> str:
    """GitHub writes `>= 1.0, < 2.0`; Trivy's comparers read the same with commas."""
    return ", ".join(part.strip().replace(" ", "") for part in text.split(","))


def build_db(out_dir: Path, advisories: list[Decl] | None = None,
             built_at: datetime = BUILT_AT) -> Path:
    """Write trivy.db, metadata.json and db.tar.gz (deterministic tar) into out_dir: of
    `advisories` (default: advisories.yaml), saying it was built at `built_at`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = subprocess.run([str(REPO / "hack" / "trivydb" / "build")], check=True,
                            capture_output=True, text=True).stdout.strip()
    entries_file = out_dir / "entries.json"
    entries_file.write_text(json.dumps(db_entries(
        load_advisories() if advisories is None else advisories), indent=1))
    db = out_dir / "trivy.db"
    subprocess.run([writer, "-in", str(entries_file), "-out", str(db)], check=True)
    stamp = built_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    metadata = {"Version": 2, "NextUpdate": "2099-01-01T00:00:00Z", "UpdatedAt": stamp,
                "DownloadedAt": stamp}
    (out_dir / "metadata.json").write_text(json.dumps(metadata))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("trivy.db", "metadata.json"):
            data = (out_dir / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, int(built_at.timestamp())
            tar.addfile(info, io.BytesIO(data))
    archive = out_dir / "db.tar.gz"
    archive.write_bytes(gzip.compress(buffer.getvalue(), mtime=0))
    return archive


# -- expected findings -------------------------------------------------------------

def _in_range(version: Any, constraint: str, cls: Any) -> bool:
    for part in constraint.split(","):
        part = part.strip()
        op = next(o for o in ("<=", ">=", "<", ">", "==", "=") if part.startswith(o))
        bound = cls(part[len(op):].strip())
        ok = {"<": version < bound, "<=": version <= bound, ">": version > bound,
              ">=": version >= bound, "==": version == bound, "=": version == bound}[op]
        if not ok:
            return False
    return True


def _finding(adv: Decl, package: str, installed: str, fixed: str) -> dict[str, str]:
    return {"id": adv["id"], "package": package, "installedVersion": installed,
            "fixedVersion": fixed, "severity": adv["severity"]}


def expected_findings(decl: Decl, advisories: list[Decl] | None = None) -> list[dict[str, str]]:
    """The findings Trivy must report for one image (one platform's declaration)."""
    advisories = load_advisories() if advisories is None else advisories
    findings = []
    os_ = decl.get("os", {})
    os_packages = [(p["name"], p.get("source") or p["name"], p["version"])
                   for p in decl.get("dpkg", [])]
    os_packages += [(p["name"], p.get("origin") or p["name"], p["version"])
                    for p in decl.get("apk", [])]
    for name, source, version in os_packages:
        for adv in advisories:
            if (adv["ecosystem"], adv.get("release"), adv["package"]) != (
                os_.get("id"), os_.get("version"), source
            ):
                continue
            cls = VERSION_CLASS[adv["ecosystem"]]
            if adv["fixed"] is None or cls(version) < cls(adv["fixed"]):
                findings.append(_finding(adv, name, version, adv["fixed"] or ""))
    for eco in ("python", "npm"):
        key = "pip" if eco == "python" else "npm"
        for pkg in decl.get(eco, []):
            for adv in advisories:
                if adv["ecosystem"] != key or adv["package"] != pkg["name"].lower():
                    continue
                cls = VERSION_CLASS[key]
                if any(_in_range(cls(pkg["version"]), r, cls) for r in adv["vulnerable"]):
                    findings.append(_finding(adv, pkg["name"], pkg["version"],
                                             ", ".join(adv["patched"])))
    return sorted(findings, key=lambda f: (f["id"], f["package"]))
