"""`scangate status --running` without a cluster: the workloads that run, their images'
verdicts now, worst first; what the gate leaves out is left out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from scangate.status import render_running, running_report

NOW = datetime(2026, 12, 3, 12, tzinfo=UTC)
CLEAN, VULN, NEW = ("sha256:" + c * 64 for c in "cab")


def pod(name: str, namespace: str, image: str, digest: str | None,
        owner: tuple[str, str] | None = None, phase: str = "Running",
        template: str = "") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace,
                         "labels": {"pod-template-hash": template} if template else {},
                         "ownerReferences": [{"kind": owner[0], "name": owner[1],
                                              "controller": True}] if owner else []},
            "spec": {"containers": [{"name": "app", "image": image}]},
            "status": {"phase": phase, "containerStatuses": [
                {"name": "app", "imageID": f"{image.split(':')[0]}@{digest}"}
                if digest else {"name": "app"}]}}


def scan(name: str, image: str, digest: str, critical: int) -> dict[str, Any]:
    return {"metadata": {"namespace": "ci", "name": name},
            "spec": {"image": image},
            "status": {"phase": "Completed", "digest": digest,
                       "scannedAt": "2026-12-03T11:00:00Z",
                       "summary": {"critical": critical, "high": 0, "medium": 0, "low": 0,
                                   "unknown": 0, "total": critical}}}


POLICY: dict[str, Any] = {"apiVersion": "scangate.dev/v1alpha1", "kind": "ScanPolicy",
          "metadata": {"name": "no-criticals"},
          "spec": {"action": "Enforce", "thresholds": {"critical": 0},
                   "match": {"namespaces": ["team-a"]}}}


def test_workloads_with_their_images_and_verdicts_worst_first() -> None:
    pods = [pod("web-5f7-a", "team-a", "reg.example/web:1", CLEAN, ("ReplicaSet", "web-5f7"),
                template="5f7"),
            pod("web-5f7-b", "team-a", "reg.example/web:1", CLEAN, ("ReplicaSet", "web-5f7"),
                template="5f7"),
            pod("db-0", "team-a", "reg.example/db:2", VULN, ("StatefulSet", "db")),
            pod("new", "team-a", "reg.example/new:1", NEW),
            pod("done", "team-a", "reg.example/db:2", VULN, phase="Succeeded"),
            pod("proxy", "kube-system", "reg.example/db:2", VULN),
            pod("quiet", "ignored", "reg.example/db:2", VULN)]
    scans = [scan("web", "reg.example/web:1", CLEAN, 0), scan("db", "reg.example/db:2", VULN, 2)]
    namespaces = {"team-a": {}, "kube-system": {}, "ignored": {"scangate.dev/ignore": "true"}}
    report = running_report(pods, scans, [POLICY], namespaces, NOW)
    assert [(w["verdict"], w["kind"], w["name"], w["pods"]) for w in report] == [
        ("Refused", "Pod", "new", 1), ("Refused", "StatefulSet", "db", 1),
        ("Admitted", "Deployment", "web", 2)]
    db = report[1]["images"][0]
    assert db["image"] == f"reg.example/db:2@{VULN}" and db["phase"] == "Completed"
    assert db["imageScan"] == "ci/db" and db["summary"]["critical"] == 2
    assert db["policies"][0]["name"] == "no-criticals" and not db["policies"][0]["admits"]
    assert report[0]["images"][0]["phase"] == "NotScanned"  # unscanned: Deny by default
    assert report[2]["images"][0]["policies"][0]["admits"]
    text = render_running(report)
    assert text.splitlines()[0].startswith("REFUSED") and "team-a/StatefulSet/db" in text
    assert text.index("team-a/StatefulSet/db") < text.index("team-a/Deployment/web")
    assert "policy no-criticals (Enforce) REFUSES" in text
    # without a policy nothing is refused; an unscanned image says so where one applies
    calm = running_report(pods, scans, [], namespaces, NOW)
    assert [w["verdict"] for w in calm] == ["Admitted"] * 3
    lenient = {**POLICY, "spec": {**POLICY["spec"], "unscanned": "Warn"}}
    assert [w["verdict"] for w in running_report(pods, scans, [lenient], namespaces, NOW)
            ] == ["Refused", "Unscanned", "Admitted"]
    assert render_running([]) == "nothing runs in the namespaces scangate covers"


def test_a_tag_without_a_reported_digest_is_judged_by_the_scan_of_the_tag() -> None:
    pods = [pod("x", "team-a", "reg.example/db:2", None)]
    report = running_report(pods, [scan("db", "reg.example/db:2", VULN, 1)], [POLICY],
                            {"team-a": {}}, NOW)
    assert report[0]["verdict"] == "Refused"
    assert report[0]["images"][0]["digest"] == VULN
