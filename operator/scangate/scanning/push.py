"""The push receiver: registries' push notifications, over HTTPS, with a shared token.

Docker distribution and Harbor both send a fixed header with each notification, so
the token travels as `Authorization: Bearer <token>` (or the bare token, as Harbor's
"auth header" sends what it is given, or `X-Scangate-Token`). The token is the `token`
key of a Secret in the operator's namespace, read when needed and held briefly, so a
rotated token takes effect without a restart.

Answers: 200 with the ImageScans created or rescanned; 401 without the token; 400 for
a body that is no push notification scangate knows (nothing changes); 408 for a body
that does not arrive in time and 413 for one too large (a slow or huge sender never
holds the receiver); 503 when the token or the API is unavailable, so that the
registry sends the event again rather than it being lost.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from kubernetes.client.exceptions import ApiException

from scangate import metrics
from scangate.config import Settings
from scangate.core.scanstate import Ref
from scangate.kube import Kube
from scangate.registry.auth import CredentialsError, secret_field
from scangate.registry.events import PushedImage, PushEventError, parse_push_events
from scangate.serving import serve

log = logging.getLogger("scangate.push")
PATH = "/push"
MAX_BODY = 1 << 20
BODY_TIMEOUT = 10.0
TOKEN_TTL = 30.0

OnPush = Callable[[list[PushedImage]], Awaitable[list[Ref]]]


class PushReceiver:
    def __init__(self, kube: Kube, settings: Settings, on_push: OnPush) -> None:
        self.kube, self.settings, self.on_push = kube, settings, on_push
        self._token: tuple[float, str | None] | None = None

    async def run(self) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post(PATH, self.handle)
        await serve(app, self.settings, self.settings.push_port, "push receiver")

    async def _expected_token(self) -> str | None:
        held = self._token
        if held is None or time.monotonic() - held[0] > TOKEN_TTL:
            name = self.settings.push_token_secret
            secret = await self.kube.get_secret(self.settings.namespace, name)
            try:
                token = secret_field(secret, name, "token") if secret else None
            except CredentialsError:
                token = None
            held = self._token = (time.monotonic(), token)
        return held[1]

    @staticmethod
    def _given_token(request: web.Request) -> str:
        given = (request.headers.get("X-Scangate-Token")
                 or request.headers.get("Authorization") or "")
        scheme, _, rest = given.partition(" ")
        return rest.strip() if scheme.lower() == "bearer" and rest else given.strip()

    async def handle(self, request: web.Request) -> web.Response:
        try:
            expected = await self._expected_token()
        except ApiException as e:
            return _answer(503, "unavailable",
                           f"cannot read the push token: HTTP {e.status}")
        if not expected:
            return _answer(503, "unavailable",
                           f"the push token Secret {self.settings.push_token_secret} "
                           f"has no token")
        try:
            # aiohttp keeps a header's bytes that are not UTF-8 as lone surrogates, which
            # do not encode: such a token is simply not the token.
            given = self._given_token(request).encode()
        except UnicodeEncodeError:
            given = b""
        if not given or not hmac.compare_digest(given, expected.encode()):
            return _answer(401, "unauthorized", "a valid push token is required")
        try:
            body = await asyncio.wait_for(request.read(), BODY_TIMEOUT)
        except TimeoutError:
            return _answer(408, "malformed", "the body did not arrive in time")
        except web.HTTPRequestEntityTooLarge:
            return _answer(413, "malformed", f"the body exceeds {MAX_BODY} bytes")
        try:
            images = parse_push_events(body, request.content_type)
        except PushEventError as e:
            return _answer(400, "malformed", str(e))
        try:
            scans = await self.on_push(images)
        except ApiException as e:
            log.warning("push not handled: API error %s", e.status)
            return _answer(503, "failed", f"the API server answered {e.status}")
        # Every push notifies, blobs and other repositories too: only what acted is news.
        (log.info if scans else log.debug)(
            "push received", extra={"images": len(images), "scans": len(scans)})
        metrics.PUSH_EVENTS.labels("accepted").inc()
        return web.json_response({"images": len(images),
                                   "scans": [f"{ns}/{name}" for ns, name in scans]})


def _answer(status: int, result: str, message: str) -> web.Response:
    metrics.PUSH_EVENTS.labels(result).inc()
    return web.json_response({"error": message}, status=status)
