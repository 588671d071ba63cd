"""The operator's one configuration object: environment (SCANGATE_*) and flags.

Every field is documented in the README and mirrored in the chart's values.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from scangate.api.common import Duration
from scangate.api.scanpolicy import CONFIGMAP_NAME_PATTERN


class Settings(BaseSettings):
    """scangate's configuration; `scangate run --help` lists the flags."""

    model_config = SettingsConfigDict(
        env_prefix="SCANGATE_", cli_prog_name="scangate run", cli_kebab_case=True,
        cli_implicit_flags=True, use_attribute_docstrings=True, extra="ignore",
    )

    namespace: str = "scangate-system"
    """The operator's own namespace (never sent to the workload webhook)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level."""
    log_format: Literal["json", "text"] = "json"
    """Structured JSON logs, or plain text for a terminal."""

    webhook_port: int = Field(default=9443, ge=1, le=65535)
    """Port of the HTTPS admission webhook server."""
    listen_address: str = "0.0.0.0"
    """Address every server of the operator listens on (webhook, gate, push receiver,
    metrics, health)."""
    webhook_host: str | None = None
    """Host name or IP the API server uses to reach the webhook by URL (outside a cluster,
    e.g. 127.0.0.1); unset inside a cluster, where webhook_service is used."""
    webhook_service: str = "scangate-webhook"
    """The Service in front of the webhook inside a cluster."""
    webhook_cert_file: Path | None = None
    """TLS certificate of the webhook server (PEM)."""
    webhook_key_file: Path | None = None
    """Private key of the webhook server (PEM)."""
    webhook_ca_file: Path | None = None
    """CA bundle the API server uses to verify the webhook (PEM)."""
    manage_webhook_configuration: bool = True
    """Create and keep up to date the ValidatingWebhookConfiguration for scangate's own
    resources."""

    admission_port: int = Field(default=9445, ge=0, le=65535)
    """Port of the HTTPS workload admission webhook (POST /validate), served with the
    webhook's certificate (0 disables the gate)."""
    admission_failure_policy: Literal["Fail", "Ignore"] = "Fail"
    """What the API server does when the gate cannot answer: Fail refuses workloads in
    policed namespaces, Ignore admits them unjudged."""
    admission_timeout_seconds: int = Field(default=5, ge=1, le=30)
    """How long the API server waits for the gate's answer."""
    admission_digest_ttl: Duration = "1m"
    """How long a tag's digest, resolved at admission, is reused before asking the
    registry again (a thousand pods of one image cause one lookup)."""
    admission_failed_lookup_ttl: Duration = "30s"
    """How long a tag lookup that failed (registry unreachable, refused, too slow, an
    answer scangate cannot use) is remembered: an image on a hostile or broken registry
    costs one lookup per this time, not one per review; meanwhile it is unscanned."""
    admission_scan_rate: float = Field(default=2.0, gt=0)
    """ImageScans a second the gate may create for unscanned images (a token bucket per
    replica); what exceeds it is shed, counted, and asked for again by the next review."""
    admission_scan_burst: int = Field(default=100, ge=1)
    """ImageScans the gate may create at once after a quiet spell (the bucket's size)."""
    inventory_scan_rate: float = Field(default=1.0, gt=0)
    """ImageScans a second the inventory may create for running images no ImageScan speaks
    for (a token bucket, the leader's): at install on a 10,000-pod cluster, what already
    runs is scanned at this pace, not all at once; the images over it wait their turn."""
    inventory_scan_burst: int = Field(default=20, ge=1)
    """ImageScans the inventory may create at once after a quiet spell."""
    policy_reports: Literal["", "openreports.io/v1alpha1", "wgpolicyk8s.io/v1alpha2"] = \
        "openreports.io/v1alpha1"
    """The API of the PolicyReports the leader writes, one per namespace, of what runs there
    against each ScanPolicy; empty: none. Its CRD is installed by its own project (Open
    Reports, or the wg-policy prototypes that Kyverno ships); while it is missing the
    feature stays off, said once in the log."""
    policy_report_interval: float = Field(default=10.0, ge=0.5, le=3600)
    """Seconds between rewrites of the PolicyReports (at most; a report is written only
    when its content changed)."""
    admission_client_ca_file: Path | None = None
    """CA bundle (PEM) that the API server's client certificate must chain to: when set,
    the gate answers /validate and /mutate only to callers presenting such a certificate
    (the API server, given one in its AdmissionConfiguration); /readyz stays open."""
    cluster_role: str | None = None
    """The chart's ClusterRole (set by the chart). It owns the webhook configurations the
    operator and kopf write, so that garbage collection removes them with the release:
    left behind, a configuration naming a deleted Service would refuse every workload."""
    manage_admission_configuration: bool = True
    """Create and keep up to date the ValidatingWebhookConfiguration scangate-workloads
    that sends workloads to the gate (off when the chart renders it)."""

    push_port: int = Field(default=9444, ge=0, le=65535)
    """Port of the HTTPS push receiver (POST /push), served with the webhook's certificate
    (0 disables)."""
    push_token_secret: str = "scangate-push-token"
    """A Secret in the operator's namespace whose `token` a push notification must carry
    (Authorization: Bearer <token>, the bare token, or X-Scangate-Token)."""

    metrics_port: int = Field(default=8080, ge=0, le=65535)
    """Port of the Prometheus /metrics endpoint (0 disables)."""
    metrics_secure: bool = True
    """Serve /metrics over HTTPS (the webhook's certificate) to callers whose bearer token
    the API server authenticates (TokenReview) and authorises for GET on the non-resource
    URL /metrics (SubjectAccessReview), as controller-runtime's secure metrics do. Off:
    plain HTTP on listen_address, for a scraper on the same host only."""
    health_port: int = Field(default=8081, ge=0, le=65535)
    """Port of the /healthz liveness endpoint (0 disables)."""

    max_running_scans: int = Field(default=5, ge=1)
    """Global limit of running scan Jobs; queued scans start in order as slots free up."""
    rescan_interval: Duration = "24h"
    """A digest's result is reused for this long, then scanned again (the DB changes daily)."""
    scan_timeout: Duration = "10m"
    """Default timeout of one scan (ScanRule and ImageScan can override it)."""
    max_scan_attempts: int = Field(default=3, ge=1)
    """Attempts per scan before it ends Failed (corrupted logs, crashes and lost pods retry)."""
    retry_backoff: Duration = "10s"
    """First retry delay; it doubles with each attempt."""
    max_result_log_bytes: int = Field(default=16 * 1024 * 1024, ge=1024 * 1024)
    """Largest scan-Job log read (the compressed result travels in it); a longer one fails
    the scan as ResultTooLarge rather than exhaust the operator's memory."""
    max_result_bytes: int = Field(default=8 * 1024 * 1024, ge=1024 * 1024)
    """Largest scan result after decompression (Trivy's JSON report); a larger one fails
    the scan as ResultTooLarge: a few hundred KiB of log can inflate to gigabytes."""
    findings_budget_bytes: int = Field(default=65536, ge=1024, le=512 * 1024)
    """Size bound of .status.findings of one ImageScan (the counts always cover everything)."""
    reconcile_interval: float = Field(default=2.0, gt=0)
    """Seconds between passes of the scan queue (events wake it sooner)."""
    max_resolve_attempts: int = Field(default=10, ge=1)
    """Attempts to resolve a tag to its digest while the registry answers with a transient
    error (unreachable, 429, 5xx), with the doubling backoff capped at 5 minutes."""
    registry_concurrency: int = Field(default=8, ge=1)
    """Registry lookups in flight at once."""
    api_concurrency: int = Field(default=16, ge=1)
    """Pieces of scan work (status writes, Job creation, log reads) in flight at once."""
    per_image_metrics: bool = False
    """Export scangate_image_vulnerabilities per image and digest (one series per image and
    severity: keep off in large clusters); the per-namespace totals are always exported."""

    trivy_image: str = "aquasec/trivy:0.76.0"
    """Image of the scan Jobs."""
    trivy_mode: Literal["ClientServer", "Standalone"] = "ClientServer"
    """ClientServer: Jobs ask a Trivy server; Standalone: each Job downloads the DB."""
    trivy_server_url: str = "http://scangate-trivy.scangate-system:4954"
    """The Trivy server of ClientServer mode."""
    trivy_db_check_interval: Duration = "5m"
    """How often the operator looks at which vulnerability DB scans use (0s: never): the
    Trivy server's `GET /version` in ClientServer mode; in Standalone mode the DB
    repository's manifest digest, and the new DB's metadata.json when it changes. When
    its UpdatedAt is another, every result made with an older DB is scanned again through
    the queue, those of running images first (in ClientServer mode the server's layer
    cache spares pulling the layers again)."""
    trivy_token_secret: str | None = None
    """A Secret in the operator's namespace whose `token` the Trivy server requires
    (ClientServer). Scan Jobs run in that namespace and read it there: it never leaves."""
    vex_config_map: str | None = Field(default=None, max_length=253,
                                       pattern=CONFIGMAP_NAME_PATTERN)
    """A ConfigMap in the operator's namespace whose every key is an OpenVEX document
    applied under every ScanPolicy (beside each policy's own spec.vex)."""
    trivy_db_repository: str | None = None
    """OCI repository of the vulnerability DB in Standalone mode (an air-gapped mirror)."""
    trivy_insecure_db_repository: bool = False
    """The DB repository is plain HTTP or has an untrusted certificate."""
    scan_run_as_user: int = Field(default=65532, ge=1)
    """Non-root user of the scan pods."""
    scan_memory_limit: str = Field(default="1Gi",
                                   pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
    """Memory limit of a scan pod (a Kubernetes quantity, e.g. 1Gi). A scan pod killed at
    it ends its ImageScan Failed with reason OOMKilled: raise it for very large images."""

    malware_image: str = "scangate/scangate-clamav:0.1.0"
    """Image of the scan Jobs' malware step (scanner malware): scangate with Debian's ClamAV
    (hack/image builds it). It runs as an init container before Trivy."""
    malware_db_url: str | None = Field(default=None, max_length=2048,
                                       pattern=r"^https?://[^\s]+$")
    """Where the malware step fetches ClamAV's signature databases: a freshclam private
    mirror (a plain HTTP(S) server of the .cvd files), e.g. http://clamav-mirror.internal/.
    Fetched by every malware scan; a failure ends it MalwareDBUnavailable."""
    malware_db_files: list[str] = Field(
        default_factory=lambda: ["main.cvd", "daily.cvd", "bytecode.cvd"], min_length=1,
        max_length=32, json_schema_extra={"items": {"type": "string",
                                                    "pattern": r"^[A-Za-z0-9_-]+\.c[vlu]d$"}})
    """The database files fetched from MALWARE_DB_URL (.cvd, .cld or .cud), all required."""
    malware_db_claim: str | None = Field(default=None, max_length=253,
                                         pattern=CONFIGMAP_NAME_PATTERN)
    """Instead of a mirror: a PersistentVolumeClaim in the operator's namespace holding the
    databases (kept current by freshclam), mounted read-only into the malware step."""
    malware_db_max_age: Duration = "7d"
    """Databases whose newest file was built longer ago are stale: the scan fails
    MalwareDBUnavailable rather than pass images against old signatures."""
    malware_memory_limit: str = Field(default="2Gi",
                                      pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
    """Memory limit of the malware step: ClamAV holds its signature databases in memory
    (about 1 GiB for ClamAV's own main, daily and bytecode). Killed at it, the scan Job
    fails OOMKilled."""
    malware_max_layer_bytes: int = Field(default=1 << 30, ge=1 << 20, le=16 << 30)
    """The largest layer blob the malware step fetches; a larger one fails the scan
    (MalwareScanFailed). It also bounds what ClamAV unpacks (twice as much) and the malware
    step's ephemeral-storage limit (four times as much, plus 1 GiB)."""

    insecure_registries: list[str] = Field(default_factory=list)
    """Registries (host:port) spoken to over plain HTTP, like Docker's insecure-registries."""
    registry_timeout: Duration = "10s"
    """Deadline of one whole registry request (connecting, headers and body together,
    redirects included): a registry trickling its answer cannot hold a lookup longer."""
    max_tags_per_repository: int = Field(default=2000, ge=1)
    """Tags of one repository a ScanRule keeps scanned; past it the rule keeps the last
    ones in lexical order and says so (condition TooLarge, Event RuleTooLarge)."""
    max_tags_per_rule: int = Field(default=10000, ge=1)
    """Tags a ScanRule keeps scanned in all (its ImageScans); past it the rule keeps the
    first repositories in lexical order and says so (condition TooLarge)."""
    allowed_networks: list[str] = Field(default_factory=list)
    """Networks (CIDR, JSON list) that registries and token services may be reached at
    although they are loopback, link-local or cloud-metadata addresses, which are refused
    by default (a user must not make the operator probe its own pod or the metadata
    service). The API server's own address and port are refused even then."""
