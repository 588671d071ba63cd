"""Which namespaces' reviews the API server sends to the gate: only those may cause its
side effects (scans, Events, Blocked notifications)."""

from __future__ import annotations

from scangate.admission.configuration import covers, webhook_configuration
from scangate.config import Settings

SETTINGS = Settings(namespace="scangate-system")


def test_the_gate_covers_what_its_configuration_sends_it() -> None:
    assert covers(SETTINGS, "team-a", {"kubernetes.io/metadata.name": "team-a"})
    assert covers(SETTINGS, "team-a", {})  # the name label is the API server's: implied
    assert covers(SETTINGS, "team-a", {"scangate.dev/ignore": "false"})


def test_excluded_unknown_and_cluster_scoped_are_not_covered() -> None:
    # A review POSTed straight to the gate naming kube-system made the operator create
    # ImageScans there; none of these can come from the API server.
    assert not covers(SETTINGS, "kube-system", {})
    assert not covers(SETTINGS, "scangate-system", {})
    assert not covers(SETTINGS, "team-b", {"scangate.dev/ignore": "true"})
    assert not covers(SETTINGS, "no-such-namespace", None)
    assert not covers(SETTINGS, "", {})
    # A label cannot pretend to be another namespace.
    assert not covers(SETTINGS, "kube-system", {"kubernetes.io/metadata.name": "team-a"})


def test_the_check_and_the_configuration_share_one_selector() -> None:
    webhook = webhook_configuration(SETTINGS, b"ca")["webhooks"][0]
    values = {e["key"]: e["values"] for e in webhook["namespaceSelector"]["matchExpressions"]}
    assert values == {"scangate.dev/ignore": ["true"],
                      "kubernetes.io/metadata.name": ["kube-system", "scangate-system"]}
