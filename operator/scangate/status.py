"""`scangate status IMAGE`: an image's scan status in the cluster, the counterpart of
ACR's GetRepoTagScanStatus: phase, digest, counts, scan time, and which ScanPolicies
would admit it. Reads with the user's kubeconfig; one LIST of ImageScans (a command,
not the operator).

`scangate status --running`: every workload that runs, with its images and what each
ScanPolicy would do with them now (the pods' images read as the operator's inventory
reads them, core.running). One LIST each of Pods, ImageScans, ScanPolicies, Namespaces.
VEX documents are not read here: a finding a VEX statement suppressed at scan time
counts (the gate, which reads them, may admit what this calls refused)."""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from scangate.api import GROUP, VERSION
from scangate.api.imagescan import Phase
from scangate.core.coverage import covers
from scangate.core.images import ImageRef, InvalidReference, parse_image
from scangate.core.policy import (
    ImageResult,
    PolicyError,
    applies,
    decide,
    judge,
    parse_policy,
)
from scangate.core.running import (
    VERDICTS,
    Workload,
    is_running,
    project_running_pod,
    verdict_of,
)
from scangate.core.scanstate import SEVERITY_KEYS

IN_PROGRESS = (Phase.PENDING, Phase.QUEUED, Phase.SCANNING, None)
Obj = dict[str, Any]


class StatusError(Exception):
    """The cluster cannot be asked (no kubeconfig, no access)."""


def _same_image(ref: ImageRef, written: str) -> bool:
    try:
        other = parse_image(written)
    except InvalidReference:
        return False
    if ref.digest:
        return other.name == ref.name and ref.digest == other.digest
    return other.name == ref.name and other.tag == ref.tag


def choose(scans: list[Obj], ref: ImageRef) -> Obj | None:
    """The ImageScan that speaks for the image: the newest completed result of it (by
    its tag, or its digest: a result is the digest's, whoever scanned it), else the
    newest one in progress, else the newest failed one."""
    mine = [s for s in scans if _same_image(ref, str((s.get("spec") or {}).get("image", "")))
            or (ref.digest and (s.get("status") or {}).get("digest") == ref.digest)]

    def newest(phase_ok: Callable[[str | None], bool]) -> Obj | None:
        chosen = [s for s in mine if phase_ok((s.get("status") or {}).get("phase"))]
        return max(chosen, default=None, key=lambda s: str(
            (s.get("status") or {}).get("scannedAt")
            or (s.get("metadata") or {}).get("creationTimestamp") or ""))

    return (newest(lambda p: p == Phase.COMPLETED) or newest(lambda p: p in IN_PROGRESS)
            or newest(lambda p: p == Phase.FAILED))


def report(ref: ImageRef, scan: Obj | None, policies: list[Obj], now: datetime) -> Obj:
    """The status as JSON: the scan, and each applicable policy's verdict."""
    status = (scan or {}).get("status") or {}
    meta = (scan or {}).get("metadata") or {}
    namespace = str(meta.get("namespace", ""))
    result = ImageResult.from_status(status) if scan else None
    image = str(ref)
    verdicts = []
    for raw in policies:
        try:
            policy = parse_policy(raw)
        except PolicyError:
            continue
        if not applies(policy, namespace, {}, image):
            continue
        verdict = judge(policy, result, image, now, scans_namespace=namespace or None)
        verdicts.append({"name": policy.name, "action": policy.spec.action.value,
                         "admits": not verdict.failed or policy.effect.label != "Enforce",
                         "result": verdict.kind.value, "why": verdict.summary or None})
    return {
        "image": image, "imageScan": f"{namespace}/{meta.get('name')}" if scan else None,
        "phase": status.get("phase") if scan else "NotScanned",
        "digest": status.get("digest"), "summary": status.get("summary"),
        "fixable": status.get("fixable"), "scannedAt": status.get("scannedAt"),
        "reason": status.get("reason"), "message": status.get("message"),
        **({"malware": status["malware"]} if scan and status.get("malware") else {}),
        "policies": verdicts}


def render(status: Obj) -> str:
    """The status as a few readable lines."""
    lines = [f"image:      {status['image']}",
             f"imagescan:  {status['imageScan'] or '-'}",
             f"phase:      {status['phase']}"]
    if status.get("digest"):
        lines.append(f"digest:     {status['digest']}")
    if status.get("summary"):
        counts = status["summary"]
        lines.append("findings:   " + "  ".join(f"{k.upper()} {counts.get(k, 0)}"
                                              for k in SEVERITY_KEYS)
                     + f"  (total {counts.get('total', 0)})")
    malware = status.get("malware")
    if isinstance(malware, dict):
        found = [f"{d.get('signature')} in {d.get('path') or 'the layer blob'}"
                 for d in (malware.get("detections") or [])[:5] if isinstance(d, dict)]
        lines.append(f"malware:    {malware.get('count', 0)} detections"
                     + (f": {'; '.join(found)}" if found else ""))
    if status.get("scannedAt"):
        lines.append(f"scanned at: {status['scannedAt']}")
    if status.get("reason"):
        lines.append(f"reason:     {status['reason']}: {status.get('message') or ''}")
    for p in status["policies"]:
        word = "admits" if p["admits"] else "REFUSES"
        lines.append(f"policy:     {p['name']} ({p['action']}) {word}"
                     + (f": {p['why']}" if p["why"] else ""))
    if not status["policies"]:
        lines.append("policy:     no ScanPolicy applies")
    return "\n".join(lines)


def _cluster() -> tuple[Callable[[str | None], list[Obj]], Callable[[], list[Obj]]]:
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    try:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError) as e:
        raise StatusError(f"no cluster to ask: {e}") from None
    api = client.CustomObjectsApi()

    def scans(namespace: str | None) -> list[Obj]:
        try:
            body: Any = (api.list_namespaced_custom_object(GROUP, VERSION, namespace,
                                                           "imagescans") if namespace
                         else api.list_cluster_custom_object(GROUP, VERSION, "imagescans"))
        except ApiException as e:
            raise StatusError(f"cannot list ImageScans: {e.status} {e.reason}") from None
        return list(body.get("items") or [])

    def policies() -> list[Obj]:
        try:
            body: Any = api.list_cluster_custom_object(GROUP, VERSION, "scanpolicies")
        except ApiException:
            return []  # not allowed to read them: the status without verdicts
        return list(body.get("items") or [])

    return scans, policies


def run(image: str, namespace: str | None, wait: bool, output: str,
        timeout: float = 1800.0) -> int:
    try:
        ref = parse_image(image)
    except InvalidReference as e:
        print(f"scangate status: {e}", file=sys.stderr)
        return 2
    try:
        scans, policies = _cluster()
        spinner = itertools.cycle("|/-\\")
        deadline = time.monotonic() + timeout
        while True:
            scan = choose(scans(namespace), ref)
            phase = ((scan or {}).get("status") or {}).get("phase")
            if not wait or scan is None or phase not in IN_PROGRESS:
                break
            if time.monotonic() > deadline:
                print("scangate status: still not done; giving up", file=sys.stderr)
                break
            if sys.stderr.isatty():
                print(f"\r{next(spinner)} {phase or Phase.PENDING}…", end="", file=sys.stderr)
            time.sleep(2)
        if wait and sys.stderr.isatty():
            print("\r", end="", file=sys.stderr)
        status = report(ref, scan, policies(), datetime.now(UTC))
    except StatusError as e:
        print(f"scangate status: {e}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2) if output == "json" else render(status))
    return 0 if scan is not None else 1



# -- `scangate status --running`: what runs, judged now ----------------------------------

def _result_of(scan: Obj | None) -> ImageResult | None:
    """What a policy judges the image by: the scan's result, or (in progress) unscanned."""
    if scan is None:
        return None
    status = scan.get("status") or {}
    if status.get("phase") in IN_PROGRESS:
        return ImageResult(phase=status.get("phase") or Phase.PENDING,
                           digest=status.get("digest"))
    return ImageResult.from_status(status)


def running_report(pods: list[Obj], scans: list[Obj], policies: list[Obj],
                   namespaces: dict[str, dict[str, str]], now: datetime,
                   operator_namespace: str = "scangate-system") -> list[Obj]:
    """Each workload that runs (its Pods' top controller) in a namespace the gate covers
    (`namespaces`: the labels of those known), with its images, their counts and each
    applicable ScanPolicy's verdict now, worst first."""
    usable = []
    for raw in policies:
        try:
            usable.append(parse_policy(raw))
        except PolicyError:
            continue
    workloads: dict[tuple[str, Workload], dict[str, Any]] = {}
    for obj in pods:
        if not is_running(obj):
            continue
        pod = project_running_pod(obj)
        labels = namespaces.get(pod.namespace, {})
        if not covers(operator_namespace, pod.namespace, labels):
            continue
        held = workloads.setdefault((pod.namespace, pod.workload), {"pods": 0, "images": {}})
        held["pods"] += 1
        for image in pod.images:
            held["images"][image.reference] = image
    report_: list[Obj] = []
    for (namespace, workload), held in workloads.items():
        labels = namespaces.get(namespace, {})
        images = []
        for reference, image in sorted(held["images"].items()):
            scan = choose(scans, parse_image(reference))
            result = _result_of(scan)
            decision = decide(usable, {reference: result}, namespace, labels, {}, now,
                              scans_namespace=namespace)
            status = (scan or {}).get("status") or {}
            meta = (scan or {}).get("metadata") or {}
            verdicts = []
            for policy in sorted(usable, key=lambda p: p.name):
                if not applies(policy, namespace, labels, reference):
                    continue
                verdict = judge(policy, result, reference, now, scans_namespace=namespace)
                verdicts.append({"name": policy.name, "action": policy.spec.action.value,
                                 "admits": not verdict.failed
                                 or policy.effect.label != "Enforce",
                                 "result": verdict.kind.value,
                                 "why": verdict.summary or None})
            images.append({
                "image": reference, "digest": image.digest or status.get("digest"),
                "verdict": verdict_of(decision),
                "imageScan": f"{meta.get('namespace')}/{meta.get('name')}" if scan else None,
                "phase": status.get("phase") if scan else "NotScanned",
                "summary": status.get("summary"), "fixable": status.get("fixable"),
                "scannedAt": status.get("scannedAt"), "policies": verdicts})
        images.sort(key=lambda i: (VERDICTS.index(i["verdict"]), i["image"]))
        report_.append({"namespace": namespace, "kind": workload.kind, "name": workload.name,
                        "pods": held["pods"],
                        "verdict": images[0]["verdict"] if images else VERDICTS[-1],
                        "images": images})
    report_.sort(key=lambda w: (VERDICTS.index(w["verdict"]), w["namespace"], w["kind"],
                                w["name"]))
    return report_


def render_running(workloads: list[Obj]) -> str:
    if not workloads:
        return "nothing runs in the namespaces scangate covers"
    lines = []
    for w in workloads:
        lines.append(f"{w['verdict'].upper():<10} {w['namespace']}/{w['kind']}/{w['name']}"
                     f"  ({w['pods']} pod{'s' if w['pods'] != 1 else ''})")
        for image in w["images"]:
            counts = image["summary"] or {}
            found = ("  ".join(f"{k.upper()} {counts.get(k, 0)}" for k in SEVERITY_KEYS)
                     if counts else "")
            lines.append(f"  {image['verdict']:<10} {image['image']}  {image['phase']}"
                         + (f"  {found}" if found else ""))
            for p in image["policies"]:
                word = "admits" if p["admits"] else "REFUSES"
                lines.append(f"      policy {p['name']} ({p['action']}) {word}"
                             + (f": {p['why']}" if p["why"] and not p["admits"] else ""))
    return "\n".join(lines)


def _running_cluster(namespace: str | None) -> tuple[list[Obj], list[Obj],
                                                     dict[str, dict[str, str]]]:
    """Pods (in pages), ImageScans (cluster-wide when allowed: a result is the digest's,
    wherever it lives; else the namespace's) and namespaces' labels."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    scans, _ = _cluster()
    core = client.CoreV1Api()

    def pages(call: Callable[..., Any], *args: Any) -> list[Obj]:
        items: list[Obj] = []
        token = None
        while True:
            answer = call(*args, limit=500, _continue=token, _preload_content=False)
            body = json.loads(answer.data)
            items += body.get("items") or []
            token = (body.get("metadata") or {}).get("continue")
            if not token:
                return items

    try:
        pods = (pages(core.list_namespaced_pod, namespace) if namespace
                else pages(core.list_pod_for_all_namespaces))
    except ApiException as e:
        raise StatusError(f"cannot list pods: {e.status} {e.reason}") from None
    try:
        every = scans(None)
    except StatusError:
        every = scans(namespace) if namespace else []
    labels: dict[str, dict[str, str]] = {}
    try:
        for ns in pages(core.list_namespace):
            meta = ns.get("metadata") or {}
            labels[str(meta.get("name"))] = dict(meta.get("labels") or {})
    except ApiException:  # not allowed: only the named namespace, by its name label
        labels = {namespace: {}} if namespace else {}
    return pods, every, labels


def run_running(namespace: str | None, output: str, operator_namespace: str) -> int:
    """`scangate status --running`: exit status 1 when something running would be
    refused today, 2 when the cluster cannot be asked."""
    try:
        pods, scans, labels = _running_cluster(namespace)
        _, policies = _cluster()
        workloads = running_report(pods, scans, policies(), labels, datetime.now(UTC),
                                   operator_namespace)
    except StatusError as e:
        print(f"scangate status: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"workloads": workloads}, indent=2) if output == "json"
          else render_running(workloads))
    return 1 if any(w["verdict"] == VERDICTS[0] for w in workloads) else 0
