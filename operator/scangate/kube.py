"""The Kubernetes API as scangate uses it: plain dicts in, plain dicts out.

A thin adapter over the official client, called from asyncio through threads so
that kopf's event loop never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from scangate.api import GROUP, VERSION
from scangate.core.events import EventCorrelator
from scangate.core.scanstate import stamp

Obj = dict[str, Any]


def now() -> str:
    return stamp(datetime.now(UTC))


def load_config(connections: int = 32) -> None:
    """The API server's address and credentials, in a cluster or from a kubeconfig; with
    enough pooled connections for the calls in flight at once (urllib3's default of 10
    would open and discard connections under load)."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    settings = client.Configuration.get_default_copy()
    settings.connection_pool_maxsize = connections
    client.Configuration.set_default(settings)


def api_server_endpoints() -> list[tuple[str, int]]:
    """The API server's addresses and ports, as this process reaches it (and, inside a
    cluster, as its Service is named), so that no user-named URL can point there."""
    endpoints = []
    url = urlsplit(client.Configuration.get_default_copy().host)
    if url.hostname:
        endpoints.append((url.hostname, url.port or 443))
    service = os.environ.get("KUBERNETES_SERVICE_HOST")
    if service:
        endpoints.append((service, int(os.environ.get("KUBERNETES_SERVICE_PORT", "443"))))
    resolved = []
    for host, port in endpoints:
        with contextlib.suppress(OSError):
            resolved += [(str(info[4][0]), port) for info in socket.getaddrinfo(host, port)]
    return resolved


def _read_body(fn: Any, *args: Any, **kwargs: Any) -> bytes:
    """The body of one API call, read to its end (which returns its connection to the
    pool), without the client's model deserialisation."""
    data: bytes = fn(*args, _preload_content=False, **kwargs).data
    return data


class LogTooLarge(ValueError):
    """A pod log longer than scangate reads."""


class Kube:
    """The API calls of one part of the operator, on threads of its own.

    The kubernetes client blocks, so calls run on threads; each Kube has its own, never
    the event loop's default executor. The operator's admission webhooks answer the
    API server while it holds the operator's own writes: had they shared threads, a
    burst of writes would take every one and wait for webhooks that wait for a thread.
    """

    def __init__(self, threads: int = 16) -> None:
        api = client.ApiClient()
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.admission = client.AdmissionregistrationV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.extensions = client.ApiextensionsV1Api(api)
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="kube")
        self._events = EventCorrelator()

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> bytes:
        """Call `fn` on a thread of this Kube's own; the raw body of its answer.

        The body is read whatever the caller wants of it: an unread response never goes
        back to urllib3's pool, so every later call would open a new TLS connection."""
        return await asyncio.get_running_loop().run_in_executor(
            self._threads, partial(_read_body, fn, *args, **kwargs))

    async def _json(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call returning the JSON body as plain data (no model deserialisation)."""
        return json.loads(await self._call(fn, *args, **kwargs))

    async def _get(self, fn: Any, *args: Any) -> Obj | None:
        """Read one object; None if there is none."""
        try:
            obj: Obj = await self._json(fn, *args)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return obj

    # -- scangate resources --------------------------------------------------------

    async def get_custom(self, plural: str, namespace: str, name: str) -> Obj | None:
        return await self._get(self.custom.get_namespaced_custom_object, GROUP, VERSION,
                               namespace, plural, name)

    async def _create(self, fn: Any, *args: Any) -> Obj | None:
        """Create an object: the object as created, or None if the name is taken (a
        rerun, a restart, or someone else's)."""
        try:
            obj: Obj = await self._json(fn, *args)
        except ApiException as e:
            if e.status == 409:
                return None
            raise
        return obj

    async def _delete(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Delete an object; gone already is fine."""
        try:
            await self._call(fn, *args, **kwargs)
        except ApiException as e:
            if e.status != 404:
                raise

    async def create_custom(self, plural: str, namespace: str, body: Obj) -> bool:
        """Create one of scangate's objects; False if it exists already."""
        return await self._create(self.custom.create_namespaced_custom_object, GROUP,
                                  VERSION, namespace, plural, body) is not None

    async def delete_custom(self, plural: str, namespace: str, name: str) -> None:
        """Delete one of scangate's objects; gone already is fine."""
        await self._delete(self.custom.delete_namespaced_custom_object, GROUP, VERSION,
                           namespace, plural, name)

    async def patch_status(self, plural: str, namespace: str, name: str, status: Obj) -> Obj:
        """Merge-patch an object's status; the object as the API server now holds it."""
        obj: Obj = await self._json(
            self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace,
            plural, name, {"status": status}, _content_type="application/merge-patch+json")
        return obj

    async def patch_cluster_status(self, plural: str, name: str, status: Obj) -> Obj:
        """Merge-patch a cluster-scoped object's status (a ScanPolicy's)."""
        obj: Obj = await self._json(
            self.custom.patch_cluster_custom_object_status, GROUP, VERSION, plural, name,
            {"status": status}, _content_type="application/merge-patch+json")
        return obj

    # -- other projects' resources (PolicyReports) -----------------------------------

    async def crd_exists(self, name: str) -> bool:
        """Whether a CustomResourceDefinition of that name is installed."""
        return await self._get(self.extensions.read_custom_resource_definition,
                               name) is not None

    async def list_foreign(self, group: str, version: str, plural: str, selector: str
                           ) -> list[Obj]:
        """Every object of a namespaced kind, in all namespaces, with the labels given."""
        found: Obj = await self._json(self.custom.list_cluster_custom_object, group,
                                      version, plural, label_selector=selector)
        return list(found.get("items") or [])

    async def get_foreign(self, group: str, version: str, plural: str, namespace: str,
                          name: str) -> Obj | None:
        return await self._get(self.custom.get_namespaced_custom_object, group, version,
                               namespace, plural, name)

    async def create_foreign(self, group: str, version: str, plural: str, namespace: str,
                             body: Obj) -> Obj | None:
        """Create an object of another project's kind; None if the name is taken."""
        return await self._create(self.custom.create_namespaced_custom_object, group,
                                  version, namespace, plural, body)

    async def replace_foreign(self, group: str, version: str, plural: str, namespace: str,
                              name: str, body: Obj) -> Obj:
        """Replace one (its metadata.resourceVersion makes it conditional)."""
        obj: Obj = await self._json(self.custom.replace_namespaced_custom_object, group,
                                    version, namespace, plural, name, body)
        return obj

    async def delete_foreign(self, group: str, version: str, plural: str, namespace: str,
                             name: str) -> None:
        await self._delete(self.custom.delete_namespaced_custom_object, group, version,
                           namespace, plural, name)

    # -- core ----------------------------------------------------------------------

    async def get_secret(self, namespace: str, name: str) -> Obj | None:
        return await self._get(self.core.read_namespaced_secret, name, namespace)

    async def create_secret(self, namespace: str, body: Obj) -> bool:
        """Create a Secret; False if it exists already."""
        return await self._create(self.core.create_namespaced_secret, namespace,
                                  body) is not None

    async def get_lease(self, namespace: str, name: str) -> Obj | None:
        return await self._get(self.coordination.read_namespaced_lease, name, namespace)

    async def create_lease(self, namespace: str, body: Obj) -> bool:
        """Create a Lease; False if one exists already."""
        return await self._create(self.coordination.create_namespaced_lease, namespace,
                                  body) is not None

    async def replace_lease(self, namespace: str, name: str, body: Obj) -> None:
        """Replace a Lease (409 if its resourceVersion is no longer current)."""
        await self._call(self.coordination.replace_namespaced_lease, name, namespace, body)

    async def whoami(self) -> str:
        """The user name the API server knows this process by (SelfSubjectReview)."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        review = await self._json(
            client.AuthenticationV1Api(self.core.api_client).create_self_subject_review, body)
        return str(review["status"]["userInfo"]["username"])

    async def authenticate(self, token: str) -> Obj | None:
        """The user a bearer token belongs to (TokenReview), or None if it is no one's."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token}}
        review = await self._json(
            client.AuthenticationV1Api(self.core.api_client).create_token_review, body)
        status = review.get("status") or {}
        user: Obj | None = status.get("user") if status.get("authenticated") else None
        return user

    async def may(self, user: Obj, attributes: Obj, *, resource: bool = True
                  ) -> tuple[bool, str]:
        """Whether the API server's authorizers let `user` (an AdmissionReview's or a
        TokenReview's userInfo: username, uid, groups, extra) do what `attributes` (a
        SubjectAccessReview's resourceAttributes, or with resource=False its
        nonResourceAttributes) say, and the authorizer's reason (a SubjectAccessReview)."""
        kind = "resourceAttributes" if resource else "nonResourceAttributes"
        spec: Obj = {kind: attributes, "user": str(user.get("username") or "")}
        if user.get("uid"):
            spec["uid"] = str(user["uid"])
        if user.get("groups"):
            spec["groups"] = [str(g) for g in user["groups"]]
        if user.get("extra"):
            spec["extra"] = {str(k): [str(v) for v in values]
                             for k, values in dict(user["extra"]).items()}
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                "spec": spec}
        review = await self._json(
            client.AuthorizationV1Api(self.core.api_client).create_subject_access_review, body)
        status = review.get("status") or {}
        return status.get("allowed") is True and not status.get("denied"), str(
            status.get("reason") or status.get("evaluationError") or "")

    async def cluster_role_owner(self, name: str) -> Obj:
        """An ownerReference to the ClusterRole `name` (for cluster-scoped dependents)."""
        role = await self._json(self.rbac.read_cluster_role, name)
        return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "name": name, "uid": role["metadata"]["uid"]}

    async def get_webhook(self, kind: str, name: str) -> Obj | None:
        """A Validating- or MutatingWebhookConfiguration, or None."""
        read = (self.admission.read_validating_webhook_configuration
                if kind == "ValidatingWebhookConfiguration"
                else self.admission.read_mutating_webhook_configuration)
        return await self._get(read, name)

    async def put_webhook(self, body: Obj) -> None:
        """Create a Validating- or MutatingWebhookConfiguration, or patch the one there.
        A merge patch: the webhooks given replace those held (a strategic merge would
        keep a `url` beside a new `service`, which the API server refuses)."""
        name, kind = body["metadata"]["name"], body["kind"]
        create, patch = ((self.admission.create_validating_webhook_configuration,
                          self.admission.patch_validating_webhook_configuration)
                         if kind == "ValidatingWebhookConfiguration" else
                         (self.admission.create_mutating_webhook_configuration,
                          self.admission.patch_mutating_webhook_configuration))
        if await self._create(create, body) is None:
            await self._call(patch, name, body, _content_type="application/merge-patch+json")

    async def delete_webhook(self, body: Obj) -> None:
        """Delete the webhook configuration of that kind and name; gone already is fine."""
        delete = (self.admission.delete_validating_webhook_configuration
                  if body["kind"] == "ValidatingWebhookConfiguration"
                  else self.admission.delete_mutating_webhook_configuration)
        await self._delete(delete, body["metadata"]["name"])

    async def create_job(self, namespace: str, body: Obj) -> Obj | None:
        """Create a Job: the Job as created, or None if the name is taken."""
        return await self._create(self.batch.create_namespaced_job, namespace, body)

    async def get_job(self, namespace: str, name: str) -> Obj | None:
        return await self._get(self.batch.read_namespaced_job, name, namespace)

    async def resume_job(self, namespace: str, name: str) -> None:
        await self._call(self.batch.patch_namespaced_job, name, namespace,
                         {"spec": {"suspend": False}})

    async def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and (in the background) its pods; gone already is fine."""
        await self._delete(self.batch.delete_namespaced_job, name, namespace,
                           propagation_policy="Background")

    async def job_pod_log(self, namespace: str, job: str, job_uid: str, container: str,
                          limit_bytes: int) -> str:
        """The log of the (newest) pod controlled by the Job whose uid is `job_uid`: a pod
        is told by its owner reference, which only the Job controller sets, never by a
        label anyone may copy. LogTooLarge past `limit_bytes`."""
        pods = await self._json(self.core.list_namespaced_pod, namespace,
                                label_selector=f"batch.kubernetes.io/controller-uid={job_uid}")
        owned = [p for p in pods["items"] if any(
            o.get("uid") == job_uid and o.get("kind") == "Job" and o.get("controller")
            for o in p["metadata"].get("ownerReferences") or [])]
        if not job_uid or not owned:
            raise LookupError(f"no pod of Job {namespace}/{job}")
        pod = sorted(owned, key=lambda p: p["metadata"]["creationTimestamp"])[-1]
        data = await self._call(self.core.read_namespaced_pod_log, pod["metadata"]["name"],
                                namespace, container=container, limit_bytes=limit_bytes + 1)
        if len(data) > limit_bytes:
            raise LogTooLarge(f"the log of Job {namespace}/{job} exceeds {limit_bytes} bytes")
        return data.decode("utf-8", errors="replace")

    async def event(self, obj: Obj, type_: str, reason: str, message: str) -> None:
        """Record a Kubernetes Event on `obj`, for `kubectl describe` (one of a
        cluster-scoped object, a ScanPolicy, lives in `default`, as kubectl looks there).
        The same event again counts on the Event it made (core/events.py)."""
        meta = obj["metadata"]
        stamp = now()
        namespace = meta.get("namespace") or "default"
        message = message[:1024]
        key = (meta["uid"], type_, reason, message)
        if (seen := self._events.previous(key)) is not None:
            name, count = seen
            try:
                await self._call(self.core.patch_namespaced_event, name, namespace,
                                 {"count": count + 1, "lastTimestamp": stamp},
                                 _content_type="application/merge-patch+json")
                self._events.record(key, name, count + 1)
                return
            except ApiException:  # expired or deleted: a new Event
                self._events.forget(key)
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": namespace},
            "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"],
                               "name": meta["name"], "namespace": meta.get("namespace") or "",
                               "uid": meta["uid"]},
            "type": type_, "reason": reason, "message": message,
            "source": {"component": "scangate"},
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
            "reportingComponent": "scangate.dev/operator", "reportingInstance": "scangate",
        }
        with contextlib.suppress(ApiException):  # a courtesy: never fail the work for it
            created = await self._json(self.core.create_namespaced_event, namespace, body)
            self._events.record(key, created["metadata"]["name"], 1)
