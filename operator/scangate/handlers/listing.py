"""What kopf does not tell its handlers about a listing, learnt from its watch stream.

kopf lists each resource, hands every object to its handlers as an event of type None,
then watches. It does not say when the listing is over (client-go's HasSynced), and
after a relist (the watch's resourceVersion expired while the API server was away) it
sends no DELETED for objects deleted meanwhile. This wraps kopf's own list-then-watch
(`kopf._cogs.clients.watching.continuous_watch`, a private function of kopf 1.45; if a
kopf release renames it, `follow` raises at start-up and tests/unit/test_handlers.py
fails) and tells the Store of each watched resource what the listing held. It also trims each
body (Store.trim) before kopf queues it: kopf holds a body in its object's worker until
the worker idles out, so at a cold start with 10,000 ImageScans every body at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

from kopf._cogs.clients import watching

from scangate.cache import Key, Store, key_of

_stores: dict[tuple[str, str, bool | None], Store[Any]] = {}
_kopf_continuous_watch = watching.continuous_watch


def follow(group: str, plural: str, store: Store[Any], cluster_wide: bool | None = None
           ) -> None:
    """Tell `store` about each listing of group/plural: the resource must have one
    list-then-watch in the process, the one of the handlers that feed the store (kopf's
    own observation of namespaces is off where it would make a second one), or one
    cluster-wide and one of the operator's namespace (`cluster_wide` says which: pods are
    watched both ways, the running ones for the inventory and scan pods for the
    reconciler)."""
    if watching.continuous_watch is not _listing_watch:
        if not callable(getattr(watching, "continuous_watch", None)) or not hasattr(
                watching.Bookmark, "LISTED"):
            raise RuntimeError("this kopf has no continuous_watch/Bookmark.LISTED: the "
                               "listing hook (scangate.handlers.listing) needs updating")
        watching.continuous_watch = _listing_watch  # type: ignore[assignment]
    _stores[(group, plural, cluster_wide)] = store


async def _listing_watch(*, resource: Any, **kwargs: Any) -> AsyncIterator[Any]:
    store = (_stores.get((resource.group, resource.plural, kwargs.get("namespace") is None))
             or _stores.get((resource.group, resource.plural, None)))
    events = _kopf_continuous_watch(resource=resource, **kwargs)
    if store is None:
        async for event in events:
            yield event
        return
    store.listing_started()
    listed: set[Key] | None = set()
    async for event in events:
        if isinstance(event, dict) and isinstance(event.get("object"), dict):
            store.trim(cast(dict[str, Any], event["object"]))
        if event is watching.Bookmark.LISTED and listed is not None:
            store.listed(listed)
            listed = None
        elif listed is not None and isinstance(event, dict) and event.get("type") is None:
            listed.add(key_of(dict(event.get("object") or {})))
        yield event
