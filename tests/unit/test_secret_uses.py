"""Which Secrets an object has scangate use, and which of them an UPDATE must check again:
the confused-deputy check of the validating webhook decides from these."""

from __future__ import annotations

from typing import Any

from scangate.core.validation import SecretUse, secret_uses, secrets_to_check

OPERATOR_NS = "scangate-system"


def rule(url: str = "https://r.example.com", creds: str | None = "creds",
         receivers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    registry: dict[str, Any] = {"url": url}
    if creds:
        registry["credentialsSecretRef"] = {"name": creds}
    return {"registry": registry, "scope": {"namespaces": ["a"]},
            "notifications": receivers or []}


HOOK = {"name": "hook", "type": "webhook", "urlSecretRef": {"name": "hook", "key": "url"},
        "signingSecretRef": {"name": "hmac", "key": "key"}}


def named(uses: list[SecretUse]) -> list[tuple[str, str, str]]:
    return [(u.path, u.namespace, u.name) for u in uses]


def test_a_rule_names_its_credentials_and_its_receivers_secrets() -> None:
    uses = secret_uses("ScanRule", rule(receivers=[HOOK]), "team-a", OPERATOR_NS)
    assert named(uses) == [
        ("spec.registry.credentialsSecretRef", "team-a", "creds"),
        ("spec.notifications[0].urlSecretRef", "team-a", "hook"),
        ("spec.notifications[0].signingSecretRef", "team-a", "hmac")]
    assert secret_uses("ScanRule", rule(creds=None), "team-a", OPERATOR_NS) == []


def test_a_policys_receivers_secrets_live_in_the_operators_namespace() -> None:
    uses = secret_uses("ScanPolicy", {"notifications": [HOOK]}, "", OPERATOR_NS)
    assert named(uses) == [("spec.notifications[0].urlSecretRef", OPERATOR_NS, "hook"),
                           ("spec.notifications[0].signingSecretRef", OPERATOR_NS, "hmac")]


def test_an_imagescan_names_its_rules_credentials() -> None:
    registry = {"url": "https://r.example.com", "credentialsSecretRef": {"name": "creds"}}
    uses = secret_uses("ImageScan", {"image": "r.example.com/a/b:1", "ruleRef": {"name": "r"}},
                       "team-a", OPERATOR_NS, rule_registry=registry)
    assert named(uses) == [("spec.ruleRef", "team-a", "creds")]
    assert secret_uses("ImageScan", {"image": "x/y:1"}, "team-a", OPERATOR_NS) == []


def test_an_update_checks_a_secret_only_where_it_is_named_or_sent_anew() -> None:
    old = secret_uses("ScanRule", rule(receivers=[HOOK]), "team-a", OPERATOR_NS)

    def check(new_spec: dict[str, Any]) -> list[tuple[str, str, str]]:
        new = secret_uses("ScanRule", new_spec, "team-a", OPERATOR_NS)
        return named(secrets_to_check(new, old))

    # Unchanged references (a relabel, a scan-now, a new tag filter, receivers reordered):
    # nothing to ask, so whoever may edit the rule may keep them.
    assert check(rule(receivers=[HOOK])) == []
    assert check({**rule(receivers=[{**HOOK, "name": "renamed"}]), "tagFilter": "v.*"}) == []
    # Another Secret named: asked.
    assert check(rule(creds="other", receivers=[HOOK])) == [
        ("spec.registry.credentialsSecretRef", "team-a", "other")]
    # The same credentials sent to another registry: asked again.
    assert check(rule(url="https://evil.example.com", receivers=[HOOK])) == [
        ("spec.registry.credentialsSecretRef", "team-a", "creds")]
    # A receiver's URL Secret swapped for the editor's own: the signing key would now sign
    # bodies sent there, so both are asked.
    swapped = {**HOOK, "urlSecretRef": {"name": "mine", "key": "url"}}
    assert check(rule(receivers=[swapped])) == [
        ("spec.notifications[0].urlSecretRef", "team-a", "mine"),
        ("spec.notifications[0].signingSecretRef", "team-a", "hmac")]
    # Another key of the same Secret is the same Secret to RBAC, but another value: asked.
    rekeyed = {**HOOK, "signingSecretRef": {"name": "hmac", "key": "other"}}
    assert check(rule(receivers=[rekeyed])) == [
        ("spec.notifications[0].urlSecretRef", "team-a", "hook"),
        ("spec.notifications[0].signingSecretRef", "team-a", "hmac")]
