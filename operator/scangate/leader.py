"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does.

Every replica keeps the watch-fed state and serves the webhooks and the push receiver;
only the leader dispatches scans, runs ScanRules and delivers notifications. The Lease
is taken when it is free or expired (its holder has not renewed it for its duration),
with the object's resourceVersion making a take-over atomic; the leader renews it
every RENEW seconds and stops acting as soon as a renewal fails for longer than the
lease, so two replicas never both believe they lead for longer than the clock skew.
A leader that dies is replaced within DURATION + RETRY seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from scangate.core.scanstate import parse_time
from scangate.kube import Kube, Obj

log = logging.getLogger("scangate.leader")
NAME = "scangate-leader"
DURATION = 10
"""Seconds a Lease holds without renewal."""
RENEW = 3.0
RETRY = 2.0


def identity() -> str:
    """This replica: its pod (HOSTNAME in a cluster) and a suffix of its own (two
    processes on one host, as in the sandbox, must differ)."""
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}-{uuid.uuid4().hex[:6]}"


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, me: str | None = None) -> None:
        self.kube, self.namespace = kube, namespace
        self.me = me or identity()
        self.leading = asyncio.Event()
        """Set while this replica leads."""
        self._renewed = 0.0

    @property
    def is_leader(self) -> bool:
        # A leader that could not renew for a whole lease duration may have been replaced.
        return self.leading.is_set() and time.monotonic() - self._renewed < DURATION

    async def run(self) -> None:
        try:
            await self._loop()
        finally:
            if self.leading.is_set():  # hand over at once rather than after DURATION
                self.leading.clear()
                await asyncio.shield(self._release())

    async def _release(self) -> None:
        try:
            lease = await self.kube.get_lease(self.namespace, NAME)
            if lease is not None and (lease.get("spec") or {}).get("holderIdentity") == self.me:
                lease["spec"].update(holderIdentity="", renewTime=None)
                await self.kube.replace_lease(self.namespace, NAME, lease)
                log.info("released the lead")
        except (ApiException, OSError, HTTPError) as e:
            log.warning("could not release the lead (%s); it expires by itself",
                        type(e).__name__)

    async def _loop(self) -> None:
        while True:
            try:
                held = await self._try()
            except ApiException as e:
                log.warning("leader election: the API server answered %s", e.status)
                held = False
            except (OSError, HTTPError) as e:
                log.warning("leader election: %s", type(e).__name__)
                held = False
            if held:
                self._renewed = time.monotonic()
                if not self.leading.is_set():
                    log.info("leading as %s", self.me)
                    self.leading.set()
            elif self.leading.is_set() and not self.is_leader:
                log.warning("lost the lead")
                self.leading.clear()
            await asyncio.sleep(RENEW if self.leading.is_set() else RETRY)

    async def _try(self) -> bool:
        """Take or renew the Lease; whether this replica holds it now."""
        current = datetime.now(UTC)
        lease = await self.kube.get_lease(self.namespace, NAME)
        spec: dict[str, Any] = (lease or {}).get("spec") or {}
        holder = spec.get("holderIdentity")
        renewed = parse_time(spec.get("renewTime"))
        expired = renewed is None or renewed + timedelta(
            seconds=int(spec.get("leaseDurationSeconds") or DURATION)) < current
        if lease is not None and holder not in (None, "", self.me) and not expired:
            return False
        body: Obj = {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": NAME, "namespace": self.namespace},
            "spec": {"holderIdentity": self.me, "leaseDurationSeconds": DURATION,
                     "renewTime": _stamp(current),
                     "acquireTime": spec.get("acquireTime") if holder == self.me
                     else _stamp(current),
                     "leaseTransitions": int(spec.get("leaseTransitions") or 0)
                     + (0 if holder == self.me else 1)}}
        try:
            if lease is None:
                return await self.kube.create_lease(self.namespace, body)
            body["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
            await self.kube.replace_lease(self.namespace, NAME, body)
        except ApiException as e:
            if e.status == 409:  # another replica was quicker
                return False
            raise
        return True
