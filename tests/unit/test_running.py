"""The inventory's pure parts: a running Pod's projection (images by the digest the node
reports, the top controller from the names controllers write) and the index of which
images run where."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from scangate.core.policy import ImageResult, decide, parse_policy
from scangate.core.running import (
    MAX_POD_IMAGES,
    RunningImage,
    RunningIndex,
    RunningPod,
    Settled,
    Workload,
    digest_of,
    is_running,
    newly_refused,
    project_running_pod,
    verdict_of,
    workload_of,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def pod(name: str = "web-6d4cf56db6-x7k2p", namespace: str = "team-a", phase: str = "Running",
        owner: tuple[str, str] | None = ("ReplicaSet", "web-6d4cf56db6"),
        labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    statuses = spec.pop("statuses", {})
    return {"metadata": {"name": name, "namespace": namespace,
                         "labels": labels if labels is not None
                         else {"pod-template-hash": "6d4cf56db6"},
                         "ownerReferences": [{"kind": owner[0], "name": owner[1],
                                              "controller": True}] if owner else []},
            "spec": spec, "status": {"phase": phase, **statuses}}


def test_images_of_every_container_kind_by_the_digest_the_node_reports() -> None:
    obj = pod(initContainers=[{"name": "init", "image": "busybox:1.36"}],
              containers=[{"name": "app", "image": "registry.example.com/web:1.0"},
                          {"name": "side", "image": f"nginx@{D3}"}],
              ephemeralContainers=[{"name": "debug", "image": "alpine"}],
              statuses={
                  "initContainerStatuses": [{"name": "init",
                                             "imageID": f"docker.io/library/busybox@{D1}"}],
                  "containerStatuses": [
                      {"name": "app", "imageID": f"docker-pullable://registry.example.com/"
                                                 f"web@{D2}"},
                      {"name": "side", "imageID": "sha256:" + "9" * 64}]})
    state = project_running_pod(obj)
    assert state.images == (
        RunningImage("docker.io/library/busybox:1.36", D1),
        RunningImage("registry.example.com/web:1.0", D2),
        # a bare image ID is the runtime's, no manifest: the spec's digest stands
        RunningImage("docker.io/library/nginx", D3),
        # no status yet: the spec's reference, resolved by the scan
        RunningImage("docker.io/library/alpine:latest", None))
    assert state.images[1].reference == f"registry.example.com/web:1.0@{D2}"
    assert state.images[3].reference == "docker.io/library/alpine:latest"
    assert state.images[2].key == D3 and state.images[3].key == "docker.io/library/alpine:latest"


def test_digest_of_reads_only_manifest_digests() -> None:
    assert digest_of(f"repo@{D1}") == D1
    assert digest_of(f"docker-pullable://repo@{D1}") == D1
    assert digest_of("sha256:" + "1" * 64) is None
    assert digest_of("sandbox://registry/x:1") is None
    assert digest_of(f"repo@{D1}x") is None
    assert digest_of(None) is None and digest_of(42) is None


def test_a_hostile_pod_is_read_without_raising_and_stays_bounded() -> None:
    obj = pod(containers=[{"name": str(i), "image": f"r.example/x{i}:1"} for i in range(500)]
              + [{"name": "bad", "image": "UPPER/Case"}, "junk", {"image": 7}],
              statuses={"containerStatuses": "junk"})
    assert len(project_running_pod(obj).images) == MAX_POD_IMAGES
    weird = {"metadata": {"name": "p", "labels": "x", "ownerReferences": "y"},
             "spec": "z", "status": {"phase": "Running"}}
    assert project_running_pod(weird) == RunningPod("", "p", "Running", Workload("Pod", "p"), ())
    assert project_running_pod(pod(containers=[{"name": "a", "image": "Bad Ref"}])).images == ()


def test_the_top_controller_from_the_names_controllers_write() -> None:
    owner = [{"kind": "ReplicaSet", "name": "web-6d4cf56db6", "controller": True}]
    assert workload_of("p", {"pod-template-hash": "6d4cf56db6"}, owner) == Workload(
        "Deployment", "web")
    # a ReplicaSet no Deployment made (no hash, or another one) is itself the workload
    assert workload_of("p", {}, owner) == Workload("ReplicaSet", "web-6d4cf56db6")
    assert workload_of("p", {"pod-template-hash": "zzz"}, owner) == Workload(
        "ReplicaSet", "web-6d4cf56db6")
    job = [{"kind": "Job", "name": "backup-29513160", "controller": True}]
    assert workload_of("p", {}, job) == Workload("CronJob", "backup")
    assert workload_of("p", {}, [{"kind": "Job", "name": "migrate", "controller": True}]) \
        == Workload("Job", "migrate")
    for kind in ("StatefulSet", "DaemonSet", "ReplicationController"):
        assert workload_of("p", {}, [{"kind": kind, "name": "db", "controller": True}]) \
            == Workload(kind, "db")
    # bare, static (the mirror pod's owner is the Node), or owned but not controlled
    assert workload_of("p", {}, []) == Workload("Pod", "p")
    assert workload_of("p", {}, [{"kind": "Node", "name": "n1", "controller": True}]) \
        == Workload("Pod", "p")
    assert workload_of("p", {}, [{"kind": "ReplicaSet", "name": "x"}]) == Workload("Pod", "p")


def test_only_running_pods_are_kept() -> None:
    assert is_running(pod())
    assert not is_running(pod(phase="Pending")) and not is_running(pod(phase="Succeeded"))
    assert not is_running({"status": "Running"})


def _pod(name: str, namespace: str, *images: RunningImage) -> RunningPod:
    return RunningPod(namespace, name, "Running", Workload("Pod", name), images)


def test_the_index_says_when_an_image_starts_running_in_a_namespace_once() -> None:
    index = RunningIndex()
    a, b = RunningImage("r/a:1", D1), RunningImage("r/b:1", D2)
    assert index.update(_pod("p1", "ns", a), False) == [("ns", a)]
    assert index.update(_pod("p2", "ns", a, b), False) == [("ns", b)]  # a runs already
    assert index.update(_pod("p3", "other", a), False) == [("other", a)]
    assert sorted(index.where(D1)) == [("ns", a), ("other", a)]
    assert sorted(index.in_namespace("ns")) == [a, b] and index.in_namespace("x") == []
    assert len(index) == 3
    # an update of the same pod with the same images is no news
    assert index.update(_pod("p2", "ns", a, b), False) == []
    assert index.update(_pod("p1", "ns", a), True) == []
    assert index.running("ns", D1)  # p2 still runs it
    assert index.update(_pod("p2", "ns", a, b), True) == []
    assert not index.running("ns", D1) and not index.running("ns", D2)
    assert index.where(D1) == [("other", a)] and index.where(D2) == []
    assert index.in_namespace("ns") == []
    # a pod whose image changed (an ephemeral container, a digest reported)
    index.update(_pod("p3", "other", b), False)
    assert index.where(D1) == [] and sorted(index.images()) == [("other", b)]
    assert index.update(_pod("p3", "other", b), True) == [] and len(index) == 0
    assert index.in_namespace("other") == [] and index._by_namespace == index._by_key == {}


def test_a_decision_in_one_word_worst_first() -> None:
    from scangate.core.policy import Decision
    from scangate.core.running import VERDICTS, verdict_of

    assert verdict_of(Decision(allowed=False, action="Enforce",
                               needs_scan=("x",))) == VERDICTS[0] == "Refused"
    assert verdict_of(Decision(allowed=True, action="Allow", needs_scan=("x",))) == "Unscanned"
    assert verdict_of(Decision(allowed=True, action="Warn", violations=(
        object(),))) == "Warned"  # type: ignore[arg-type]
    assert verdict_of(Decision(allowed=True, action="Allow")) == "Admitted"


def test_a_scan_is_asked_for_only_where_covered_and_no_scan_of_the_digest_exists() -> None:
    from datetime import timedelta

    from scangate.core.running import needs_scan
    from scangate.core.scanstate import ScanIndex, ScanState

    scans = ScanIndex(timedelta(hours=24))
    running = RunningImage("r/a:1", D1)
    assert needs_scan(running, True, scans)
    assert not needs_scan(running, False, scans)  # an ignored namespace
    assert needs_scan(RunningImage("r/a:1"), True, scans)  # by tag: asked once, resolved
    # any ImageScan of the digest, wherever it lives and whatever its phase, speaks for it
    for phase in ("Queued", "Completed", "Failed"):
        scans = ScanIndex(timedelta(hours=24))
        scans.upsert_scan(ScanState("ci", f"rule-{phase.lower()}", image="r/a:1",
                                    phase=phase, digest=D1))
        assert not needs_scan(running, True, scans), phase
        assert needs_scan(RunningImage("r/b:1", D2), True, scans)


def test_an_image_by_tag_is_not_asked_for_when_a_scan_names_the_tag() -> None:
    """A node that reports no digest: the gate's scan of the tag (pinned to the digest it
    resolved) speaks for it, and removing that scan lets the inventory ask again."""
    from datetime import timedelta

    from scangate.core.running import needs_scan
    from scangate.core.scanstate import ScanIndex, ScanState

    scans = ScanIndex(timedelta(hours=24))
    by_tag = RunningImage("reg.example/team/app:1")
    scans.upsert_scan(ScanState("ns", "gate", image=f"REG.example:443/team/app:1@{D1}",
                                phase="Completed", digest=D1))
    assert not needs_scan(by_tag, True, scans)
    assert [s.name for s in scans.by_tag("reg.example/team/app:1")] == ["gate"]
    assert needs_scan(RunningImage("reg.example/team/app:2"), True, scans)  # another tag
    scans.delete_scan(("ns", "gate"))
    assert needs_scan(by_tag, True, scans) and scans.by_tag("reg.example/team/app:1") == []


# -- Newly vulnerable --------------------------------------------------------------------

OLD_DB, NEW_DB = "2026-11-01T00:00:00Z", "2026-11-02T00:00:00Z"
POLICY: dict[str, Any] = {"apiVersion": "scangate.dev/v1alpha1", "kind": "ScanPolicy",
                          "metadata": {"name": "gate"},
                          "spec": {"action": "Enforce", "thresholds": {"medium": 1}}}


def result(db: str | None, *ids: str) -> ImageResult:
    findings = [{"id": i, "severity": "MEDIUM", "package": "urllib3",
                 "installedVersion": "1.26.12", "fixedVersion": "1.26.18" if i != "X" else ""}
                for i in ids]
    return ImageResult.from_status({
        "phase": "Completed", "digest": D1, "findings": findings,
        "summary": {"medium": len(ids), "total": len(ids)},
        "scannedWith": {"scanners": ["vuln"], **({"dbUpdatedAt": db} if db else {})}})


def judged(r: ImageResult, policy: dict[str, Any] = POLICY) -> tuple[str, Any]:
    decision = decide([parse_policy(policy)], {"r/app:1": r}, "team-a", {}, {},
                      datetime(2026, 11, 3, tzinfo=UTC))
    return verdict_of(decision), decision


def test_an_image_admitted_then_refused_under_a_newer_db_is_news_naming_the_new_findings(
) -> None:
    before_result = result(OLD_DB, "CVE-1")
    verdict, _ = judged(before_result)
    before = Settled.of(verdict, before_result)
    assert before.verdict == "Admitted"
    after = result(NEW_DB, "CVE-1", "CVE-2")
    _, decision = judged(after)
    assert newly_refused(before, decision, after) == (("gate",), ({
        "id": "CVE-2", "severity": "MEDIUM", "package": "urllib3",
        "installedVersion": "1.26.12", "fixedVersion": "1.26.18"},))


def test_a_refusal_that_no_newer_db_made_is_not_this_news() -> None:
    admitted = Settled.of("Admitted", result(OLD_DB, "CVE-1"))
    refused_now = result(OLD_DB, "CVE-1", "CVE-2")  # a rescan of the same DB (a rebuilt tag)
    assert newly_refused(admitted, judged(refused_now)[1], refused_now) is None
    unsaid = result(None, "CVE-1", "CVE-2")
    assert newly_refused(admitted, judged(unsaid)[1], unsaid) is None
    newer = result(NEW_DB, "CVE-1", "CVE-2")
    assert newly_refused(None, judged(newer)[1], newer) is None  # a first verdict
    refused_before = Settled.of("Refused", result(OLD_DB, "CVE-1", "CVE-3"))
    assert newly_refused(refused_before, judged(newer)[1], newer) is None
    still_admitted = result(NEW_DB, "CVE-1")
    assert newly_refused(admitted, judged(still_admitted)[1], still_admitted) is None
    audit = {**POLICY, "spec": {**POLICY["spec"], "action": "Audit"}}
    assert newly_refused(admitted, judged(newer, audit)[1], newer) is None  # not refused
