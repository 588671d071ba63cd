"""The Trivy scan Job of one ImageScan.

Scan Jobs run in the operator's own namespace, never in the ImageScan's: whoever can
create pods where a Job runs could print a result into a pod log of their own. The
pod is hardened (non-root, read-only root filesystem, no capabilities, no
service-account token, resource limits, a deadline from the scan timeout) and
gets registry credentials only through Secret-backed env or a mounted docker
config, never through arguments. Its result is printed as checksummed frames
(see scangate.core.framing) that the operator reads from the pod log.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from typing import Any

from scangate.core.framing import BEGIN, END
from scangate.core.scanstate import (
    SCAN_ANNOTATION,
    SCAN_LABEL,
    SCAN_NAMESPACE_LABEL,
    SCAN_UID_LABEL,
    scan_key,
)
from scangate.core.vex import MOUNT as VEX_MOUNT

ATTEMPT_ANNOTATION = "scangate.dev/attempt"
WORK = "/var/run/scangate"

# POSIX sh and the tools of the Trivy image's busybox: gzip, base64, sha256sum, wc.
_EMIT = f"""emit() {{
  gzip -n -c "$2" > "$2.gz"
  size=$(wc -c < "$2.gz" | tr -d ' ')
  sum=$(sha256sum "$2.gz" | cut -d' ' -f1)
  echo "{BEGIN} name=$1 size=$size sha256=$sum"
  base64 "$2.gz"
  echo "{END} name=$1"
}}"""


# What of Trivy's report may hold a secret's value leaves the pod blanked: the lines of
# code around a secret's match (Trivy masks the match, not its neighbours), the build
# commands of layers, the messages of checks (they quote build commands), and the image's
# config (its Env, its history). Of a match's line only the masked assignment is kept
# ("ENV NAME=****"), for the name of the variable. The report is pretty-printed one field
# to a line (Go's MarshalIndent), so a field's value is the rest of its line, and
# ImageConfig's object ends at the first line indented as its key.
SCRUB = r"""awk '
skip { if (index($0, ind "}") == 1) {
    print ind "\"ImageConfig\": {}" substr($0, length(ind) + 2); skip = 0 }
  next }
/^ *"ImageConfig": \{$/ { ind = substr($0, 1, index($0, "\"") - 1); skip = 1; next }
/^ *"Match": "/ { v = ""
  if (match($0, /(ENV +)?[A-Za-z_][A-Za-z0-9_.-]* *[=:] *\*\*\*\*/)) v = substr($0, RSTART, RLENGTH)
  sub(/": ".*"/, "\": \"" v "\"") }
/^ *"(Content|Highlighted|Message|CreatedBy|created_by)": "/ { sub(/": ".*"/, "\": \"\"") }
{ print }
END { if (skip) exit 1 }'"""
IMAGE_CONFIG_SCANNERS = ("misconfig", "secret")
"""The scanners Trivy also runs over the image's config (its Env, its history rebuilt as a
Dockerfile): the baseline check, and secrets set in ENV."""


@dataclass(frozen=True)
class ScanJobSpec:
    """Everything that decides the Job of one scan attempt."""

    scan_name: str
    scan_namespace: str
    """The ImageScan's namespace (the Job runs in the operator's)."""
    scan_uid: str
    image: str
    """The reference Trivy pulls: repository@digest, so that a moved tag cannot race us."""
    queued_at: str
    attempt: int
    timeout_seconds: int
    scanners: tuple[str, ...] = ("vuln",)
    ignore_unfixed: bool = False
    platform: str = "linux/amd64"
    insecure_registry: bool = False
    credentials_type: str | None = None
    """The type of the ScanRule's credentials Secret: kubernetes.io/basic-auth (env) or
    kubernetes.io/dockerconfigjson (a mounted config). The Job reads a copy in its own
    namespace (credentials_secret_name), owned by the Job."""
    ca_bundle: str | None = None
    """The ScanRule's registry CA (PEM), trusted by Trivy beside the system's roots."""
    vex: tuple[str, ...] = ()
    """OpenVEX documents (configmap/key, ConfigMaps of the Job's namespace) Trivy applies:
    those of every ScanPolicy and of the vexConfigMap setting (scangate.core.vex)."""
    registry_url: str = ""
    """Where the image's registry is spoken to (the malware step fetches the layers)."""
    insecure_skip_verify: bool = False
    """The ScanRule's insecureSkipTLSVerify (its own registry only)."""

    @property
    def trivy_scanners(self) -> list[str]:
        """The scanners Trivy runs: all but malware (ClamAV's); vuln when malware is alone
        (the result's vulnerability summary is never left empty)."""
        return [s for s in self.scanners if s != "malware"] or ["vuln"]

    @property
    def name(self) -> str:
        return job_name(self.scan_namespace, self.scan_name, self.scan_uid, self.queued_at,
                        self.attempt, self.key)

    @property
    def key(self) -> str:
        """The scan key this Job produces a result of (its digest and options)."""
        return scan_key(self.image.rsplit("@", 1)[-1], self.scanners, self.ignore_unfixed)


@dataclass(frozen=True)
class TrivySettings:
    """Operator-wide Trivy settings (from scangate.config.Settings)."""

    image: str = "aquasec/trivy:0.76.0"
    mode: str = "ClientServer"
    server_url: str = "http://trivy.scangate-system:4954"
    db_repository: str | None = None
    insecure_db_repository: bool = False
    run_as_user: int = 65532
    token_secret: str | None = None
    """The Secret (key `token`) holding the token the Trivy server requires, in the
    operator's namespace, where the Jobs run: it never leaves it."""
    ttl_seconds_after_finished: int = 3600
    memory_limit: str = "1Gi"
    """The scan pod's memory limit (a scan pod that exceeds it ends its scan OOMKilled)."""

    @property
    def resources(self) -> dict[str, dict[str, str]]:
        # A request above the limit is refused by the API server: a small limit lowers it.
        request = ("256Mi" if quantity_bytes(self.memory_limit) >= quantity_bytes("256Mi")
                   else self.memory_limit)
        return {"requests": {"cpu": "100m", "memory": request},
                "limits": {"cpu": "1", "memory": self.memory_limit, "ephemeral-storage": "2Gi"}}


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_bytes(quantity: str) -> float:
    """A Kubernetes memory quantity (as config.scanMemoryLimit admits: 1Gi, 300Mi, 5e8 no)."""
    number = quantity.rstrip("KMGTik")
    return float(number) * _UNITS[quantity[len(number):]]


def scan_label(scan_name: str) -> str:
    """The scan's name as a label value (at most 63 characters): the Job is tied to its
    scan by its owner reference; the label is for people and selectors."""
    if len(scan_name) <= 63:
        return scan_name
    return f"{scan_name[:54].rstrip('-.')}-{hashlib.sha256(scan_name.encode()).hexdigest()[:8]}"


def credentials_secret_name(job: str) -> str:
    """The copy of a ScanRule's credentials that one Job reads (owned by it)."""
    return f"{job}-registry"


def job_name(scan_namespace: str, scan_name: str, scan_uid: str, queued_at: str,
             attempt: int, key: str) -> str:
    """Deterministic for one attempt of one queueing of one scan key (digest and
    options), so that a restarted operator finds the Job instead of duplicating it; a
    rescan gets a new one. queuedAt has whole seconds only: without the key, a rescan of
    a moved tag within the second of the last queueing would find the last Job, and
    take its result, of the old digest, for the new one. The namespace and name are for
    people reading `kubectl get jobs` in the operator's namespace; the uid makes it unique."""
    suffix = hashlib.sha256(f"{scan_uid}/{queued_at}/{attempt}/{key}".encode()
                            ).hexdigest()[:8]
    readable = f"{scan_namespace[:16].rstrip('-.')}-{scan_name[:24].rstrip('-.')}"
    return f"scan-{readable}-{suffix}"


@dataclass(frozen=True)
class MalwareSettings:
    """Operator-wide settings of the malware step (scanner malware)."""

    image: str = "scangate/scangate-clamav:0.1.0"
    db_url: str | None = None
    db_files: tuple[str, ...] = ("main.cvd", "daily.cvd", "bytecode.cvd")
    db_claim: str | None = None
    db_max_age: str = "7d"
    max_layer_bytes: int = 1 << 30
    allowed_networks: tuple[str, ...] = ()
    memory_limit: str = "2Gi"
    """ClamAV holds its whole signature database in memory: about 1 GiB for ClamAV's own
    main, daily and bytecode databases (more than Trivy's default 1Gi leaves)."""


MALWARE_REPORT = f"{WORK}/malware.json"
MALWARE_DB_MOUNT = "/var/lib/scangate/clamav"


def malware_resources(trivy: TrivySettings, malware: MalwareSettings
                      ) -> dict[str, dict[str, str]]:
    """Trivy's, with room on disk for what the step holds at once: one layer blob, what
    clamscan unpacks of it (its --max-scansize, twice the layer) and, for a layer with a
    detection, its files (the layer again), and the signature databases."""
    resources = {k: dict(v) for k, v in trivy.resources.items()}
    resources["limits"]["memory"] = malware.memory_limit
    if quantity_bytes(resources["requests"]["memory"]) > quantity_bytes(malware.memory_limit):
        resources["requests"]["memory"] = malware.memory_limit
    resources["limits"]["ephemeral-storage"] = f"{(malware.max_layer_bytes * 4 >> 20) + 1024}Mi"
    return resources


def malware_container(spec: ScanJobSpec, malware: MalwareSettings, trivy: TrivySettings,
                      mounts: list[dict[str, Any]], env: list[dict[str, Any]]
                      ) -> dict[str, Any]:
    """The init container that scans every layer with ClamAV and leaves its report for
    Trivy's script to print (scangate.scanning.malware). An init container, in the same
    pod: the layers are fetched with the Job's own copy of the credentials, and the result
    travels in the one log the operator reads."""
    command = ["scangate", "malware-scan", "--image", spec.image,
               "--registry-url", spec.registry_url, "--platform", spec.platform,
               "--work", f"{WORK}/malware", "--output", MALWARE_REPORT,
               "--timeout", str(spec.timeout_seconds),
               "--db-max-age", malware.db_max_age,
               "--max-layer-bytes", str(malware.max_layer_bytes),
               "--allowed-networks", json.dumps(list(malware.allowed_networks))]
    if malware.db_claim:
        command += ["--db-dir", MALWARE_DB_MOUNT]
    elif malware.db_url:
        command += ["--db-url", malware.db_url, "--db-files", ",".join(malware.db_files)]
    return {
        "name": "malware", "image": malware.image, "command": command,
        "env": env, "volumeMounts": mounts, "resources": malware_resources(trivy, malware),
        "securityContext": {"allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }


def _trivy_args(spec: ScanJobSpec, scanners: list[str], output: str, cache: str
                ) -> list[str]:
    args = ["trivy", "image", "--format", "json", "--output", output,
            "--scanners", ",".join(scanners), "--platform", spec.platform,
            "--timeout", f"{spec.timeout_seconds}s", "--cache-dir", cache,
            "--skip-version-check", "--no-progress"]
    if spec.ignore_unfixed and "vuln" in scanners:
        args.append("--ignore-unfixed")
    config_scanners = [s for s in IMAGE_CONFIG_SCANNERS if s in scanners]
    if config_scanners:
        args += ["--image-config-scanners", ",".join(config_scanners)]
    if "misconfig" in scanners:
        # The checks embedded in the binary: offline, and the same for every scan of a
        # Trivy release (a bundle pulled from ghcr.io would be neither).
        args.append("--skip-check-update")
    return args


def trivy_command(spec: ScanJobSpec, trivy: TrivySettings) -> str:
    scanners = spec.trivy_scanners
    # A Trivy 0.76 client drops the misconfigurations of the image's config on their way
    # through its server (the secrets of the config come back; measured on the sandbox):
    # in ClientServer mode the checks run in a second, local Trivy, which needs no
    # vulnerability DB, and its report travels in a frame of its own ("checks").
    local_checks = trivy.mode == "ClientServer" and "misconfig" in scanners and len(
        scanners) > 1
    if local_checks:
        scanners.remove("misconfig")
    args = _trivy_args(spec, scanners, f"{WORK}/report.json", f"{WORK}/cache")
    if trivy.mode == "ClientServer" and scanners != ["misconfig"]:
        args += ["--server", trivy.server_url]
    elif trivy.mode != "ClientServer":
        args += ["--skip-java-db-update"]
        if trivy.db_repository:
            args += ["--db-repository", trivy.db_repository]
    vex = ""
    if spec.vex and "vuln" in scanners:
        # Each document that exists when the Job runs (a ConfigMap or key may be gone: the
        # volume is optional); its suppressed findings are reported, to be counted apart.
        paths = " ".join(shlex.quote(vex_path(d)) for d in spec.vex)
        vex = (f'vex=""; for f in {paths}; do if [ -f "$f" ]; then vex="$vex --vex $f"; fi; '
               f"done")
        args += ["--show-suppressed"]
    checks = []
    if local_checks:
        checks = [shlex.join([*_trivy_args(spec, ["misconfig"], f"{WORK}/checks.json",
                                           f"{WORK}/cache-checks"), spec.image]),
                  f"{SCRUB} {WORK}/checks.json > {WORK}/checks.clean.json",
                  f"emit checks {WORK}/checks.clean.json"]
    version = ["trivy", "version", "--format", "json", "--cache-dir", f"{WORK}/cache"]
    # Standalone: which DB this Job downloaded is told by `trivy version` only. A
    # server's report says its own version and DB, so a client spares the second run.
    versioned = [] if trivy.mode == "ClientServer" else [
        f"{shlex.join(version)} > {WORK}/version.json", f"emit version {WORK}/version.json"]
    trust = []
    if spec.ca_bundle:
        # Go reads one file of roots: the system's, then the registry's own CA. (A CA is
        # public; it travels in the Job's env, not in a Secret.)
        trust = [f"{{ cat /etc/ssl/certs/ca-certificates.crt 2>/dev/null || true; "
                 f"printf '%s\\n' \"$SCANGATE_REGISTRY_CA\"; }} > {WORK}/ca.crt",
                 f"export SSL_CERT_FILE={WORK}/ca.crt"]
    return "\n".join([
        "set -eu", _EMIT,
        f"mkdir -p {WORK}/tmp {WORK}/cache", *trust,
        *([vex] if vex else []),
        shlex.join(args) + (" $vex " if vex else " ") + shlex.quote(spec.image),
        *versioned, *checks,
        f"{SCRUB} {WORK}/report.json > {WORK}/result.json",
        f"emit report {WORK}/result.json",
        # The malware step's report, as it left it (none: the operator fails the scan).
        *([f"if [ -f {MALWARE_REPORT} ]; then emit malware {MALWARE_REPORT}; fi"]
          if "malware" in spec.scanners else []),
    ])


def vex_path(document: str) -> str:
    """Where a document (configmap/key) is in the scan pod."""
    return f"{VEX_MOUNT}/{document}"


def build_job(spec: ScanJobSpec, trivy: TrivySettings, namespace: str,
              malware: MalwareSettings | None = None) -> dict[str, Any]:
    """The Job of one attempt, in the operator's `namespace`. With registry credentials
    it is created suspended: its pod may start only once their copy, owned by the Job
    (and so deleted with it), exists (see credentials_secret)."""
    name = spec.name
    env: list[dict[str, Any]] = [{"name": "HOME", "value": WORK},
                                 {"name": "TMPDIR", "value": f"{WORK}/tmp"}]
    volumes: list[dict[str, Any]] = [{"name": "work", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "work", "mountPath": WORK}]
    if spec.insecure_registry or trivy.insecure_db_repository:
        env.append({"name": "TRIVY_INSECURE", "value": "true"})
    if trivy.mode == "ClientServer" and trivy.token_secret:
        env.append({"name": "TRIVY_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": trivy.token_secret, "key": "token"}}})
    credentials = credentials_secret_name(name)
    if spec.credentials_type == "kubernetes.io/basic-auth":
        for var, key in (("TRIVY_USERNAME", "username"), ("TRIVY_PASSWORD", "password")):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {
                "name": credentials, "key": key}}})
    elif spec.credentials_type:
        env.append({"name": "DOCKER_CONFIG", "value": "/etc/scangate/docker"})
        volumes.append({"name": "docker-config", "secret": {
            "secretName": credentials,
            "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}})
        mounts.append({"name": "docker-config", "mountPath": "/etc/scangate/docker",
                       "readOnly": True})
    if spec.ca_bundle:
        env.append({"name": "SCANGATE_REGISTRY_CA", "value": spec.ca_bundle})
    for i, configmap in enumerate(dict.fromkeys(d.split("/", 1)[0] for d in spec.vex)):
        # In the operator's namespace, as the Job: a tenant's ConfigMap is never mounted.
        volumes.append({"name": f"vex-{i}", "configMap": {"name": configmap,
                                                          "optional": True}})
        mounts.append({"name": f"vex-{i}", "mountPath": f"{VEX_MOUNT}/{configmap}",
                       "readOnly": True})
    init: list[dict[str, Any]] = []
    deadline = spec.timeout_seconds + min(spec.timeout_seconds, 120)
    if "malware" in spec.scanners:
        malware = malware or MalwareSettings()
        step_env = [e for e in env if not e["name"].startswith("TRIVY_")]
        if spec.credentials_type == "kubernetes.io/basic-auth":
            for var, key in (("SCANGATE_REGISTRY_USERNAME", "username"),
                             ("SCANGATE_REGISTRY_PASSWORD", "password")):
                step_env.append({"name": var, "valueFrom": {"secretKeyRef": {
                    "name": credentials, "key": key}}})
        if spec.insecure_skip_verify:
            step_env.append({"name": "SCANGATE_REGISTRY_INSECURE_SKIP_VERIFY", "value": "true"})
        step_mounts = [m for m in mounts if not m["name"].startswith("vex-")]
        if malware.db_claim:
            volumes.append({"name": "clamav-db", "persistentVolumeClaim": {
                "claimName": malware.db_claim, "readOnly": True}})
            step_mounts.append({"name": "clamav-db", "mountPath": MALWARE_DB_MOUNT,
                                "readOnly": True})
        init.append(malware_container(spec, malware, trivy, step_mounts, step_env))
        # The malware step has the scan's timeout of its own, before Trivy's.
        deadline += spec.timeout_seconds
    labels = {SCAN_LABEL: scan_label(spec.scan_name), SCAN_NAMESPACE_LABEL: spec.scan_namespace,
              SCAN_UID_LABEL: spec.scan_uid, "app.kubernetes.io/managed-by": "scangate"}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            # No owner reference: an ImageScan in another namespace cannot own it. The
            # operator deletes the Jobs of a deleted ImageScan (ScanIndex.orphan_jobs).
            "name": name, "namespace": namespace, "labels": labels,
            "annotations": {ATTEMPT_ANNOTATION: str(spec.attempt),
                            SCAN_ANNOTATION: f"{spec.scan_namespace}/{spec.scan_name}"},
        },
        "spec": {
            "suspend": bool(spec.credentials_type),
            "backoffLimit": 0,
            # The scan's own timeout plus time to pull the DB and print the result (as
            # much again for a short scan, at most two minutes).
            "activeDeadlineSeconds": deadline,
            "ttlSecondsAfterFinished": trivy.ttl_seconds_after_finished,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {
                        "runAsNonRoot": True, "runAsUser": trivy.run_as_user,
                        "runAsGroup": trivy.run_as_user, "fsGroup": trivy.run_as_user,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    **({"initContainers": init} if init else {}),
                    "containers": [{
                        "name": "trivy",
                        "image": trivy.image,
                        "command": ["sh", "-c", trivy_command(spec, trivy)],
                        "env": env,
                        "volumeMounts": mounts,
                        "resources": trivy.resources,
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }],
                    "volumes": volumes,
                },
            },
        },
    }


def credentials_secret(job: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """The copy, beside `job` and owned by it, of the keys of the ScanRule's credentials
    Secret `source` that Trivy reads (nothing else of it)."""
    meta = job["metadata"]
    keys = (("username", "password") if source.get("type") == "kubernetes.io/basic-auth"
            else (".dockerconfigjson",))
    data = source.get("data") or {}
    return {
        "apiVersion": "v1", "kind": "Secret", "type": source.get("type", "Opaque"),
        "metadata": {
            "name": credentials_secret_name(meta["name"]), "namespace": meta["namespace"],
            "labels": {k: v for k, v in meta["labels"].items()},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                 "uid": meta["uid"], "controller": True,
                                 "blockOwnerDeletion": False}],
        },
        "data": {k: data[k] for k in keys if k in data},
    }
