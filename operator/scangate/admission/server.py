"""The gate's HTTPS endpoint: AdmissionReview v1 in, the gate's answer out.

A body that is no AdmissionReview gets 400 (the API server then applies the
webhook's failurePolicy); the answer to a review is always 200 with `allowed`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

from aiohttp import web

from scangate import metrics
from scangate.admission.configuration import PATH, PIN_PATH
from scangate.admission.gate import Gate
from scangate.config import Settings
from scangate.core.reviews import admission_request
from scangate.serving import client_verified, serve

log = logging.getLogger("scangate.admission")
MAX_BODY = 8 << 20
"""Larger than any object the API server stores (etcd's limit is 1.5 MiB)."""
BODY_TIMEOUT = 10.0


async def read_review(request: web.Request, *, resource: bool = False
                      ) -> tuple[dict[str, Any], str]:
    """The AdmissionReview's request and uid (see admission_request); raises
    web.HTTPException: 400 saying why in one line, 413 for a body too large."""
    try:
        review = json.loads(await asyncio.wait_for(request.read(), BODY_TIMEOUT))
        return admission_request(review, resource=resource)
    # RecursionError: nesting deeper than the parser (a few kB of brackets).
    except (ValueError, KeyError, TypeError, TimeoutError, RecursionError) as e:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"not an AdmissionReview: {e}"}),
                                 content_type="application/json") from None


class AdmissionServer:
    def __init__(self, gate: Gate, settings: Settings) -> None:
        self.gate, self.settings = gate, settings
        self.listening = asyncio.Event()
        """Set once the server accepts connections: only then may the API server be
        told to send reviews here."""

    async def run(self) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post(PATH, self.validate)
        app.router.add_post(PIN_PATH, self.mutate)
        app.router.add_get("/readyz", self.readyz)
        await serve(app, self.settings, self.settings.admission_port, "admission gate",
                    self.listening, self.settings.admission_client_ca_file)

    async def readyz(self, _: web.Request) -> web.Response:
        """Ready when the gate holds the policies and namespaces it decides with."""
        return web.Response(status=200 if self.gate.ready else 503)

    async def _read(self, request: web.Request) -> tuple[dict[str, Any], str]:
        if self.settings.admission_client_ca_file and not client_verified(request):
            # Only the API server holds a certificate of that CA (its AdmissionConfiguration
            # names it): anyone else who reaches the port is no reviewer.
            metrics.ADMISSION_LATENCY.labels("unauthenticated").observe(0)
            raise web.HTTPUnauthorized(
                text=json.dumps({"error": "a client certificate of the configured CA is "
                                          "required"}), content_type="application/json")
        try:
            return await read_review(request)
        except web.HTTPBadRequest:
            metrics.ADMISSION_LATENCY.labels("malformed").observe(0)
            raise

    @staticmethod
    def _answer(answer: dict[str, Any]) -> web.Response:
        return web.json_response({"apiVersion": "admission.k8s.io/v1",
                                  "kind": "AdmissionReview", "response": answer})

    async def mutate(self, request: web.Request) -> web.Response:
        body, uid = await self._read(request)
        answer: dict[str, Any] = {"uid": uid, "allowed": True}
        try:
            patches = await self.gate.pins(body)
        except Exception:  # the validating webhook still judges what is not pinned
            log.exception("pinning digests failed")
            patches = []
        if patches:
            answer.update(patchType="JSONPatch",
                          patch=base64.b64encode(json.dumps(patches).encode()).decode())
        return self._answer(answer)

    async def validate(self, request: web.Request) -> web.Response:
        began = time.perf_counter()
        body, uid = await self._read(request)
        answer: dict[str, Any] = {"uid": uid, "allowed": True}
        try:
            decision = (await self.gate.review(body)).decision
        except Exception:
            # Fail closed as the configured policy says would be wrong here: an error of
            # ours is not the image's fault, but admitting unjudged is not safe either.
            log.exception("admission review failed")
            answer.update(allowed=False, status={
                "code": 500, "message": "scangate could not judge this workload (an "
                                        "internal error; see the operator's log)"})
            result = "error"
        else:
            answer["allowed"] = decision.allowed
            if not decision.allowed:
                answer["status"] = {"code": 403, "reason": "Forbidden",
                                    "message": decision.message}
            if decision.warnings:
                answer["warnings"] = list(decision.warnings)
            result = "allowed" if decision.allowed else "denied"
        metrics.ADMISSION_LATENCY.labels(result).observe(time.perf_counter() - began)
        return self._answer(answer)
