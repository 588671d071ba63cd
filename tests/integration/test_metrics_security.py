"""/metrics served securely (config.metricsSecure, on in the chart): HTTPS, and only to
bearer tokens the API server authenticates and authorises for GET /metrics."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from conftest import Kubectl, wait_for

pytestmark = pytest.mark.sandbox


def test_secure_metrics_answer_only_tokens_allowed_to_read_them(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
    operator: Callable[..., None],
) -> None:
    operator("--metrics-secure")
    url = sandbox_env["SCANGATE_METRICS"].replace("http://", "https://", 1) + "/metrics"
    for account in ("reader", "outsider"):
        kubectl("create", "serviceaccount", account, "-n", namespace)
    # The chart's ClusterRole for scrapers (as Prometheus's account would be bound).
    kubectl("create", "clusterrolebinding", f"{namespace}-reader",
            "--clusterrole=scangate-metrics-reader", f"--serviceaccount={namespace}:reader")
    token = {a: kubectl("create", "token", a, "-n", namespace).strip()
             for a in ("reader", "outsider")}

    def get(**headers: str) -> httpx.Response:
        return httpx.get(url, headers=headers, verify=sandbox_env["SANDBOX_CA"], timeout=10)

    try:
        wait_for(lambda: get().status_code == 401, 30, "the metrics server")
        with pytest.raises(httpx.HTTPError):  # never in the clear
            httpx.get(url.replace("https://", "http://", 1), timeout=10)
        assert get(Authorization="Bearer not-a-token").status_code == 403
        assert get(Authorization=f"Bearer {token['outsider']}").status_code == 403
        allowed = get(Authorization=f"Bearer {token['reader']}")
        assert allowed.status_code == 200 and "scangate_scans_total" in allowed.text
    finally:
        kubectl.run("delete", "clusterrolebinding", f"{namespace}-reader", check=False)
