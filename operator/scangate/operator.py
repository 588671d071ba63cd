"""`scangate run`: configure kopf and run the handlers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine, Iterable, Sequence
from typing import Any

import kopf
import prometheus_client
from aiohttp import web

from scangate import metrics
from scangate.admission import configuration
from scangate.admission.gate import Gate
from scangate.admission.server import AdmissionServer, read_review
from scangate.cache import Cache
from scangate.config import Settings
from scangate.core.destinations import Destinations
from scangate.core.durations import parse_duration
from scangate.core.scanstate import ScanIndex
from scangate.inventory.inventory import Inventory
from scangate.kube import Kube, api_server_endpoints, load_config
from scangate.leader import LeaderElector
from scangate.logs import setup_logging
from scangate.notify.notifier import Notifier
from scangate.policyreports.writer import PolicyReports
from scangate.scanning.dbwatch import DBWatch
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


class ChangeHandledDiffBase(kopf.StatusDiffBaseStorage):
    """kopf's record of what the change handlers last handled, built for the kinds that
    have change handlers only. kopf builds every object's essence (a deep copy of its body,
    copied twice more) on every event of every resource, to compare it with the record,
    whether or not anything compares it: in a drain of 1,000 new scans that was 8% of the
    operator's kopf time, for ImageScans, Jobs and pods that only feed the cache. The
    others get one empty essence (kopf then sees no change, which no handler asks about)."""

    def __init__(self, kinds: frozenset[str], field: str) -> None:
        super().__init__(field=field)
        self.kinds = kinds

    def build(self, *, body: kopf.Body,
              extra_fields: Iterable[kopf.FieldSpec] | None = None) -> kopf.BodyEssence:
        if body.get("kind") not in self.kinds:
            return kopf.BodyEssence()
        return super().build(body=body, extra_fields=extra_fields)

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        if body.get("kind") not in self.kinds:
            return kopf.BodyEssence()
        return super().fetch(body=body)


CHANGE_HANDLED_KINDS = frozenset({"ScanRule"})
"""The kinds with kopf change handlers (handlers.scanrules); a test pins it."""


def kopf_settings() -> kopf.OperatorSettings:
    """What both kopf operators share."""
    settings = kopf.OperatorSettings()
    settings.peering.standalone = True  # leadership is scangate.leader's
    # Events for what goes wrong in a handler only: a successful handler is no news to
    # whoever reads `kubectl describe`.
    settings.posting.level = logging.WARNING
    # Listed in pages (an ImageScan may hold 64 KiB of findings: 10,000 in one answer
    # would be 640 MB), and a watch the API server forgets is closed once it has
    # outlived its own timeout (it may otherwise send nothing, or only bookmarks, for
    # ever: seen when a CRD changes).
    settings.watching.chunk_size = 100
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 10
    # kopf's record of what its change handlers handled, in the status (which the
    # operator may write), never in a tenant's metadata.
    settings.persistence.finalizer = "scangate.dev/finalizer"
    settings.persistence.progress_storage = kopf.StatusProgressStorage(
        field="status.kopf.progress")
    settings.persistence.diffbase_storage = ChangeHandledDiffBase(
        CHANGE_HANDLED_KINDS, field="status.kopf.lastHandledConfiguration")
    return settings


def namespaced_settings() -> kopf.OperatorSettings:
    """The kopf operator of the operator's own namespace: it needs no observation of the
    cluster's namespaces (one, named) and must not make one: a second list-then-watch of
    Namespaces would be taken for the one that feeds the cache (handlers.listing)."""
    settings = kopf_settings()
    settings.scanning.disabled = True
    return settings


def main_settings(config: Settings) -> kopf.OperatorSettings:
    settings = kopf_settings()
    settings.admission.server = webhook_server(config)
    if config.manage_webhook_configuration:
        settings.admission.managed = KOPF_CONFIGURATION
    return settings


async def main(settings: Settings) -> None:
    # Importing the handler modules registers their kopf handlers.
    from scangate.handlers import scanrules, validation, watches  # noqa: F401

    # Work in flight, plus kopf's own calls.
    load_config(settings.api_concurrency + settings.registry_concurrency + 8)
    kube = Kube(settings.api_concurrency + settings.registry_concurrency)
    # The shared cache first: every component reads it, and kopf's handlers feed it.
    cache = Cache(ScanIndex(parse_duration(settings.rescan_interval)))
    watches.follow_listings(cache)
    destinations = Destinations.of(settings.allowed_networks, api_server_endpoints())
    # The Lease on threads of its own: renewals must never wait behind a burst of work.
    leader = LeaderElector(Kube(2), settings.namespace)
    metrics.LEADER.set_function(lambda: float(leader.is_leader))
    reconciler = ScanReconciler(kube, settings, cache, destinations)
    rules = RuleController(kube, settings, cache, destinations)
    notifier = Notifier(Kube(8), settings, cache, destinations)
    inventory = Inventory(Kube(8), settings, cache)
    reports = PolicyReports(Kube(4), settings, cache)
    dbwatch = DBWatch(settings, cache, destinations)
    reconciler.active = rules.active = notifier.active = inventory.active = \
        reports.active = dbwatch.active = lambda: leader.is_leader
    memo = kopf.Memo(cache=cache, rules=rules,
                     reviewer=validation.Reviewer(cache, settings.namespace))
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
        kopf.operator(clusterwide=True, liveness_endpoint=liveness, identity=leader.me,  # type: ignore[arg-type]
                      settings=main_settings(settings), memo=memo),
        # Scan Jobs and their pods: in the operator's namespace only (see handlers.watches).
        kopf.operator(registry=watches.SCAN_JOBS, namespaces=[settings.namespace],
                      identity=leader.me, settings=namespaced_settings(), memo=memo),  # type: ignore[arg-type]
        leader.run(), reconciler.run(), rules.run(), inventory.run(), reports.run(),
        dbwatch.run()]
    vex = VexDocuments(cache, settings)
    reconciler.vex_documents = vex.wanted
    inventory.vex = reports.vex = vex.state
    if settings.admission_port:
        gate = Gate(Kube(8), settings, cache, destinations)
        gate.active = lambda: leader.is_leader
        gate.vex = vex.state
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
