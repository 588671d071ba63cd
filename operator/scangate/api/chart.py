"""The chart's values.schema.json: its `config` block generated from the operator's
settings (scangate.config), the rest written here, so that `helm install` refuses a
value the operator would refuse, naming it. `scangate values-schema` prints it."""

from __future__ import annotations

from typing import Any

from pydantic.alias_generators import to_camel

from scangate.config import Settings

DERIVED = frozenset({
    "namespace", "listen_address", "webhook_host", "webhook_service", "webhook_cert_file",
    "webhook_key_file", "webhook_ca_file", "trivy_server_url", "trivy_token_secret",
    "push_token_secret", "cluster_role", "admission_client_ca_file"})
"""Settings the chart's templates set from the release, not from values."""
_KEEP = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "pattern", "maxLength",
         "items", "description")

Schema = dict[str, Any]


def _setting(field: Schema) -> Schema:
    options = field.get("anyOf")
    if options:  # optional: the chart writes "" for unset
        field = {**next(o for o in options if o.get("type") != "null"),
                 "description": field.get("description")}
        field.pop("format", None)
        if field.get("type") == "string":
            field.pop("pattern", None)
    out = {k: v for k, v in field.items() if k in _KEEP and v is not None}
    if "description" in out:
        out["description"] = " ".join(str(out["description"]).split())
    return out


def _object(properties: Schema, description: str) -> Schema:
    return {"type": "object", "description": description, "additionalProperties": False,
            "properties": properties}


def values_schema() -> Schema:
    fields = Settings.model_json_schema()["properties"]
    config = {to_camel(name): _setting(field) for name, field in fields.items()
              if name not in DERIVED}
    resources = {"type": "object", "description": "Kubernetes resource requests and limits."}
    return {
        "$schema": "https://json-schema.org/draft-07/schema#",
        "title": "scangate chart values",
        "type": "object", "additionalProperties": False,
        "properties": {
            "image": _object({
                "repository": {"type": "string", "minLength": 1},
                "tag": {"type": "string", "description": "Empty: the chart's appVersion."},
                "pullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]},
            }, "The operator image."),
            "replicas": {"type": "integer", "minimum": 1,
                         "description": "Replicas; one leads (Lease scangate-leader)."},
            "listenOnPodIP": {"type": "boolean", "description": "Listen on the pod's IP "
                              "only, where pods share one network namespace."},
            "podDisruptionBudget": _object({
                "enabled": {"type": "boolean"},
                "minAvailable": {"type": ["integer", "string"]},
            }, "Kept available through drains (with more than one replica)."),
            "config": _object(config, "The operator's settings (SCANGATE_* variables)."),
            "trivyServer": _object({
                "enabled": {"type": "boolean"},
                "url": {"type": "string", "description": "With enabled false: an existing "
                        "Trivy server."},
                "tokenSecret": {"type": "string", "description": "With enabled false: the "
                                "Secret (key token) holding its token."},
                "image": {"type": "string", "minLength": 1},
                "dbRepository": {"type": "string"},
                "persistence": _object({"size": {"type": "string"},
                                        "storageClass": {"type": "string"}},
                                       "The DB cache volume."),
                "resources": resources,
            }, "The Trivy server of ClientServer mode."),
            "malwareMirror": _object({
                "enabled": {"type": "boolean"},
                "databaseMirror": {"type": "string", "minLength": 1,
                                   "description": "freshclam's DatabaseMirror."},
                "privateMirror": {"type": "string", "description": "Instead: an upstream "
                                  "private mirror (freshclam's PrivateMirror)."},
                "checks": {"type": "integer", "minimum": 1, "maximum": 50},
                "persistence": _object({"size": {"type": "string"},
                                        "storageClass": {"type": "string"}},
                                       "The databases' volume."),
                "resources": resources,
            }, "ClamAV's signature databases kept by freshclam and served to the scan Jobs "
               "(config.malwareDbUrl defaults to it)."),
            "webhook": _object({
                "existingSecret": {
                    "type": "string", "description": "A kubernetes.io/tls Secret with "
                    "ca.crt; empty: issued by cert-manager or generated by the chart."},
                "certManager": _object({
                    "enabled": {"type": "boolean"},
                    "issuerRef": {"type": "object", "description": "Empty: a self-signed "
                                  "Issuer of the chart's own."},
                }, "The certificate from cert-manager."),
                "clientAuth": _object({
                    "enabled": {"type": "boolean"},
                    "caSecret": {"type": "string", "description": "A Secret in the "
                                 "release's namespace whose ca.crt issued the API server's "
                                 "client certificate for the gate."},
                }, "The gate answers only callers with a client certificate of that CA "
                   "(the API server's AdmissionConfiguration gives it one)."),
            }, "The serving certificate of the webhooks, and who may call the gate."),
            "networkPolicy": _object({
                "enabled": {"type": "boolean"},
                "metricsFrom": {"type": "array", "items": {"type": "object"},
                                "description": "NetworkPolicy peers that may scrape "
                                "/metrics; empty: any."},
            }, "A NetworkPolicy on the operator's pods: their own ports only."),
            "serviceMonitor": _object({
                "enabled": {"type": "boolean"},
                "interval": {"type": "string"},
                "labels": {"type": "object"},
            }, "A Prometheus Operator ServiceMonitor for /metrics."),
            "prometheusRule": _object({
                "enabled": {"type": "boolean"},
                "labels": {"type": "object"},
                "selector": {"type": "string", "description": "Label matchers of "
                             "scangate's series; empty: the ServiceMonitor's job."},
                "runbookBaseUrl": {"type": "string", "minLength": 1,
                                   "description": "Where README.md is read: each alert's "
                                   "runbook_url is a section of it."},
            }, "Alert rules (a Prometheus Operator PrometheusRule)."),
            "grafanaDashboard": _object({
                "enabled": {"type": "boolean"},
                "labels": {"type": "object"},
                "annotations": {"type": "object"},
            }, "A Grafana dashboard in a ConfigMap for Grafana's dashboard sidecar."),
            "resources": resources,
            "nodeSelector": {"type": "object"},
            "tolerations": {"type": "array"},
            "affinity": {"type": "object"},
        },
    }
