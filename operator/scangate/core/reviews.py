"""What an AdmissionReview must hold before anything reads it.

The API server sends nothing else, so a body of another shape is a caller's mistake or
an attack: it is refused (400, and the API server applies the webhook's failurePolicy),
never half-read into a decision or a traceback. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

_OBJECTS = ("kind", "resource", "userInfo", "object", "oldObject")
"""Request fields that are an object when present (null: absent)."""


def admission_request(review: object, *, resource: bool = False) -> tuple[dict[str, Any], str]:
    """The request of an AdmissionReview v1 and its uid; raises TypeError for a body of
    another shape (never quoting it: the body is the sender's).

    Without `resource` (scangate's gate, which judges new objects), `request.object` is
    required; with it (kopf's webhooks, which also see deletions), `request.resource`
    and `request.operation` are, and either `object` or `oldObject`."""
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
    for key in _OBJECTS:
        if body.get(key) is not None and not isinstance(body[key], dict):
            raise TypeError(f"request.{key} is not an object")
    for key in ("object", "oldObject"):
        if (body.get(key) or {}).get("metadata") is not None and not isinstance(
                body[key]["metadata"], dict):
            raise TypeError(f"request.{key}.metadata is not an object")
    if resource:
        if body.get("object") is None and body.get("oldObject") is None:
            raise TypeError("no request.object or request.oldObject")
        if not isinstance(body.get("userInfo"), dict):
            raise TypeError("no request.userInfo")
        if not all(isinstance((body.get("resource") or {}).get(key), str)
                   for key in ("group", "version", "resource")):
            raise TypeError("no request.resource group, version and resource")
        if not isinstance(body.get("operation"), str):
            raise TypeError("no request.operation")
    elif body.get("object") is None:
        raise TypeError("no request.object")
    user = body.get("userInfo") or {}
    for where, value, kind in (("namespace", body.get("namespace"), str),
                               ("subResource", body.get("subResource"), str),
                               ("dryRun", body.get("dryRun"), bool),
                               ("userInfo.username", user.get("username"), str),
                               ("userInfo.groups", user.get("groups"), list)):
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"request.{where} has the wrong type")
    return body, uid
