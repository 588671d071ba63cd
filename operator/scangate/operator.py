"""`scangate run`: configure kopf and run the handlers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

import kopf
import prometheus_client
from aiohttp import web

from scangate.admission import configuration
from scangate.admission.gate import Gate
from scangate.admission.server import AdmissionServer, read_review
from scangate.config import Settings
from scangate.kube import Kube, load_config
from scangate.leader import LeaderElector
from scangate.logs import setup_logging
from scangate.notify.notifier import Notifier
from scangate.scanning.push import PushReceiver
from scangate.scanning.reconciler import ScanReconciler
from scangate.scanning.rules import RuleController
from scangate.secure_metrics import SecureMetrics
from scangate.vexdocs import VexDocuments

log = logging.getLogger("scangate")
KOPF_CONFIGURATION = "scangate.dev"
"""The name of kopf's webhook configurations (scangate's own resources)."""


class CheckedWebhookServer(kopf.WebhookServer):
    """kopf's HTTPS server (the webhooks of scangate's own resources), refusing with 400
    what is no AdmissionReview, as the gate does: kopf reads some such bodies into a
    KeyError or a RecursionError, and answers 500 with a traceback in the log."""

    @staticmethod
    async def _serve(fn: kopf.WebhookFn, request: web.Request) -> web.Response:
        # kopf's private per-request method. Should a kopf release stop calling it, the
        # hostile-input tests see kopf's 500s again.
        await read_review(request, resource=True)  # kopf reads the body again, cached
        return await kopf.WebhookServer._serve(fn, request)


class ServiceWebhookServer(CheckedWebhookServer):
    """kopf's HTTPS server, advertised to the API server through a Service."""

    def __init__(self, service: str, namespace: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service, self.service_namespace = service, namespace

    async def __call__(self, fn: kopf.WebhookFn) -> AsyncIterator[kopf.WebhookClientConfig]:
        async for config in super().__call__(fn):
            config.pop("url", None)
            config["service"] = {"name": self.service, "namespace": self.service_namespace,
                                 "port": 443}
            yield config


def webhook_server(settings: Settings) -> kopf.WebhookServer:
    tls: dict[str, Any] = {
        "addr": settings.listen_address, "port": settings.webhook_port,
        "certfile": settings.webhook_cert_file, "pkeyfile": settings.webhook_key_file,
        "cafile": settings.webhook_ca_file,
    }
    if settings.webhook_host:
        return CheckedWebhookServer(host=settings.webhook_host, **tls)
    return ServiceWebhookServer(settings.webhook_service, settings.namespace, **tls)


def configure(config: Settings) -> None:
    @kopf.on.startup()
    def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.admission.server = webhook_server(config)
        if config.manage_webhook_configuration:
            settings.admission.managed = KOPF_CONFIGURATION
        settings.peering.standalone = True
        settings.posting.level = logging.INFO
        settings.persistence.finalizer = "scangate.dev/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix="scangate.dev")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="scangate.dev", key="last-handled-configuration")


async def main(settings: Settings) -> None:
    from scangate.handlers import validation  # registers the handlers

    # Work in flight, plus the watches and kopf's own calls.
    load_config(settings.api_concurrency + settings.registry_concurrency + 8)
    kube = Kube(settings.api_concurrency + settings.registry_concurrency)
    # The Lease on threads of its own: renewals must never wait behind a burst of work.
    leader = LeaderElector(Kube(2), settings.namespace)
    reconciler = ScanReconciler(kube, settings)
    rules = RuleController(kube, settings, reconciler.index, reconciler.destinations,
                           reconciler.rescan)
    notifier = Notifier(Kube(8), settings, reconciler.index, reconciler.destinations,
                        rules.covering)
    reconciler.active = rules.active = notifier.active = lambda: leader.is_leader
    reconciler.rule_scan_changed.append(rules.touch)
    reconciler.scan_changed.append(notifier.scan_changed)
    rules.seen.append(lambda r: notifier.rule_changed(r.namespace, r.name, r.uid, r.spec,
                                                      {"notifications": r.receivers}))
    rules.gone.append(lambda r: notifier.rule_deleted(r.namespace, r.name))
    validation.use_rules(rules.registry_of, settings.namespace)
    configure(settings)
    if settings.metrics_port and not settings.metrics_secure:
        prometheus_client.start_http_server(settings.metrics_port, settings.listen_address)
    liveness = (f"http://{settings.listen_address}:{settings.health_port}/healthz"
                if settings.health_port else None)
    owners = [await kube.cluster_role_owner(settings.cluster_role)] if settings.cluster_role \
        else []
    work: list[Coroutine[Any, Any, None]] = [
        # kopf would name itself after the login user, which a non-root uid with no passwd
        # entry (the image's 65532) does not have: it takes the elected identity (kopf does
        # not export its Identity type, a NewType of str).
        kopf.operator(clusterwide=True, liveness_endpoint=liveness, identity=leader.me),  # type: ignore[arg-type]
        leader.run(), reconciler.run(), rules.run()]
    vex = VexDocuments(Kube(8), settings)
    reconciler.vex_documents = vex.wanted
    work.append(vex.run())
    if settings.admission_port:
        gate = Gate(Kube(8), settings, reconciler.index, reconciler.destinations)
        gate.active = lambda: leader.is_leader
        gate.on_blocked = notifier.blocked
        gate.vex = vex.state
        vex.policies = lambda: [p.policy for p in gate.policies.values() if p.policy]
        notifier.policy_uid = gate.policy_uid
        server = AdmissionServer(gate, settings)
        work += [gate.run(), server.run()]
        if settings.manage_admission_configuration and settings.webhook_ca_file:
            work.append(configuration.keep_current(
                kube, settings, settings.webhook_ca_file.read_bytes(), gate.pinning,
                gate.policies_changed, server.listening, owners))
        elif settings.manage_admission_configuration:
            log.warning("no webhook CA file: the workload webhook configurations are not "
                        "managed (render them with the chart)")
    if owners and settings.manage_webhook_configuration:
        work.append(configuration.own_kopf_configurations(kube, KOPF_CONFIGURATION, owners))
    if settings.push_port:
        work.append(PushReceiver(kube, settings, rules.on_push).run())
    if settings.metrics_port and settings.metrics_secure:
        work.append(SecureMetrics(Kube(2), settings).run())
    tasks = [asyncio.create_task(w) for w in work]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled():  # kopf cancels what it started when it stops
                task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # the Lease is handed over


def run(argv: Sequence[str] | None = None) -> None:
    settings = Settings(_cli_parse_args=list(argv or []))  # type: ignore[call-arg]
    setup_logging(settings)
    log.info("starting scangate", extra={"namespace": settings.namespace})
    asyncio.run(main(settings))
