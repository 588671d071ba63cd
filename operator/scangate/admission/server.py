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
from scangate.serving import serve

log = logging.getLogger("scangate.admission")
MAX_BODY = 8 << 20
"""Larger than any object the API server stores (etcd's limit is 1.5 MiB)."""
BODY_TIMEOUT = 10.0


_OBJECTS = ("kind", "userInfo", "oldObject")
"""Request fields that are an object when present (null: absent)."""


def _request(review: object) -> tuple[dict[str, Any], str]:
    """The request of an AdmissionReview v1 and its uid; raises TypeError for a body of
    another shape (never quoting it: the body is the sender's). The API server sends
    nothing else, so the gate never judges a review it would misread."""
    if not isinstance(review, dict):
        raise TypeError("the body is not a JSON object")
    if (review.get("apiVersion"), review.get("kind")) != ("admission.k8s.io/v1",
                                                          "AdmissionReview"):
        raise TypeError("want apiVersion admission.k8s.io/v1 and kind AdmissionReview")
    body = review.get("request")
    if not isinstance(body, dict):
        raise TypeError("no request")
    uid = body.get("uid")
    if not isinstance(uid, str) or not uid:
        raise TypeError("no request.uid")
    if not isinstance(body.get("object"), dict):
        raise TypeError("no request.object")
    for key in _OBJECTS:
        if body.get(key) is not None and not isinstance(body[key], dict):
            raise TypeError(f"request.{key} is not an object")
    user = body.get("userInfo") or {}
    for where, value, kind in (("namespace", body.get("namespace"), str),
                               ("dryRun", body.get("dryRun"), bool),
                               ("userInfo.username", user.get("username"), str),
                               ("userInfo.groups", user.get("groups"), list)):
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"request.{where} has the wrong type")
    return body, uid


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
                    self.listening)

    async def readyz(self, _: web.Request) -> web.Response:
        """Ready when the gate holds the policies and namespaces it decides with."""
        return web.Response(status=200 if self.gate.ready else 503)

    @staticmethod
    async def _review(request: web.Request) -> tuple[dict[str, Any], str]:
        """The AdmissionReview's request and uid; raises web.HTTPException (400, 413)."""
        try:
            review = json.loads(await asyncio.wait_for(request.read(), BODY_TIMEOUT))
            body, uid = _request(review)
        # RecursionError: nesting deeper than the parser (a few kB of brackets).
        except (ValueError, KeyError, TypeError, TimeoutError, RecursionError) as e:
            metrics.ADMISSION_LATENCY.labels("malformed").observe(0)
            raise web.HTTPBadRequest(text=json.dumps({"error": f"not an AdmissionReview: {e}"}),
                                     content_type="application/json") from None
        return body, uid

    @staticmethod
    def _answer(answer: dict[str, Any]) -> web.Response:
        return web.json_response({"apiVersion": "admission.k8s.io/v1",
                                  "kind": "AdmissionReview", "response": answer})

    async def mutate(self, request: web.Request) -> web.Response:
        body, uid = await self._review(request)
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
        body, uid = await self._review(request)
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
