"""The operator's one configuration object: environment (SCANGATE_*) and flags.

Every field is documented in the README and mirrored in the chart's values.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    webhook_address: str = "0.0.0.0"
    """Address the webhook server listens on."""
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

    metrics_port: int = Field(default=8080, ge=0, le=65535)
    """Port of /metrics and /healthz (0 disables)."""
