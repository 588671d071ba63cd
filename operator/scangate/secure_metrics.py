"""/metrics over HTTPS for callers the API server vouches for.

As controller-runtime's secure metrics serving does: the caller's bearer token is
authenticated by a TokenReview and the user it names authorised by a
SubjectAccessReview for GET on the non-resource URL /metrics (grant it with a
ClusterRole rule `nonResourceURLs: [/metrics], verbs: [get]`, as the chart's
`<release>-metrics-reader` does). Answers are remembered for a minute per token, so a
scrape every 15 s costs the API server two reviews a minute per scraper, not per scrape.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict

import prometheus_client
from aiohttp import web

from scangate.config import Settings
from scangate.kube import Kube
from scangate.serving import serve

log = logging.getLogger("scangate.metrics")
REMEMBERED = 256
"""Tokens whose answer is remembered: scrapers are few."""
TTL = 60.0


class SecureMetrics:
    def __init__(self, kube: Kube, settings: Settings) -> None:
        self.kube, self.settings = kube, settings
        self._answers: OrderedDict[str, tuple[float, bool]] = OrderedDict()

    async def run(self) -> None:
        app = web.Application(client_max_size=1024)
        app.router.add_get("/metrics", self.metrics)
        await serve(app, self.settings, self.settings.metrics_port, "metrics (HTTPS)")

    async def metrics(self, request: web.Request) -> web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip() or not token.isascii():
            return web.Response(status=401, text="a bearer token is required\n")
        if not await self._allowed(token.strip()):
            return web.Response(status=403, text="forbidden: get on /metrics\n")
        return web.Response(body=prometheus_client.generate_latest(),
                            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def _allowed(self, token: str) -> bool:
        key = hashlib.sha256(token.encode()).hexdigest()  # never the token itself
        held = self._answers.get(key)
        if held is not None and held[0] > time.monotonic():
            return held[1]
        try:
            user = await self.kube.authenticate(token)
            allowed = user is not None and (await self.kube.may(
                user, {"path": "/metrics", "verb": "get"}, resource=False))[0]
        except Exception as e:  # the API server down: no answer is no permission
            log.warning("could not review a metrics caller: %s", type(e).__name__)
            return False
        self._answers[key] = (time.monotonic() + TTL, allowed)
        while len(self._answers) > REMEMBERED:
            self._answers.popitem(last=False)
        return allowed
