"""Hostile input: each piece gets a clean refusal (a 4xx, a well-formed denial, a one-line
error), never a 500 or a traceback, and scangate keeps answering good input afterwards.

Categories, with the number of inputs each tried printed as a table at the end of the
module: AdmissionReview bodies sent straight to the gate; a 200-container pod through the
API server; odd image references (parse_image, and through admission); Trivy reports
(parse_report/summarize, `scangate report summarize`, and a real scan Job); push payloads.

Covered elsewhere and not repeated here: Trivy output of wrong types, overlong fields and
an overlong failure log through the operator (tests/integration/test_scan_robustness.py);
50,000 findings with exact counts and bounded findings, NEGLIGIBLE, and unparseable reports
in parse_report/summarize (tests/unit/test_poison_pills.py); push bodies that are cut
short, a bare string, of a wrong action type, an invalid image, undecodable bytes, 2 MiB
of junk, or without the token (tests/integration/test_push.py, tests/unit/test_push_events.py).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Kubectl, wait_for
from scangate.core.images import InvalidReference, parse_image
from scangate.core.trivy import (
    DEFAULT_FINDINGS_BUDGET,
    INDEX_MAX_BYTES,
    ReportError,
    decode_index,
    parse_report,
    summarize,
)
from scans import (
    SCAN_LABEL,
    create_scan,
    https,
    log_since,
    metric,
    operator_log,
    push_variant,
    review,
    scans,
    wait_done,
)

pytestmark = pytest.mark.reliability
sandboxed = pytest.mark.sandbox
TRIED: Counter[str] = Counter()
"""Hostile inputs tried, by category: the table printed at the end of the module."""
DIGEST = "sha256:" + "ab" * 32
SCANGATE = Path(sys.executable).parent / "scangate"
SAMPLES = Path(__file__).resolve().parents[1] / "data" / "push"
SEVERITIES = ("critical", "high", "medium", "low", "unknown")


@pytest.fixture(scope="module", autouse=True)
def counts_table(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if not TRIED or reporter is None or capture is None:
        return
    lines = ["", "hostile inputs tried (tests/reliability/test_hostile_input.py):",
             *(f"  {category:<44} {count:>6}" for category, count in sorted(TRIED.items())),
             f"  {'total':<44} {sum(TRIED.values()):>6}"]
    with capture.global_and_fixture_disabled():  # shown even when output is captured
        for line in lines:
            reporter.write_line(line)


@pytest.fixture
def policed(kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str]) -> Iterator[str]:
    """The test's namespace under an Enforce ScanPolicy (no critical findings), once the
    gate holds it; the policy is deleted afterwards."""
    name = f"rel-{uuid.uuid4().hex[:8]}"
    kubectl.apply(json.dumps({
        "apiVersion": "scangate.dev/v1alpha1", "kind": "ScanPolicy", "metadata": {"name": name},
        "spec": {"action": "Enforce", "thresholds": {"critical": 0},
                 "match": {"namespaces": [namespace]}}}))
    with https(sandbox_env) as client:
        def judged() -> bool:
            answer = client.post(f"{sandbox_env['SCANGATE_ADMISSION']}/validate",
                                 json=review(namespace, [f"x/y@{DIGEST}"]))
            return answer.json()["response"]["allowed"] is False
        wait_for(judged, 30, "the gate to hold the ScanPolicy")
    yield namespace
    kubectl.run("delete", "scanpolicy", name, "--wait=false", check=False)


# -- AdmissionReview bodies straight to the gate -------------------------------------------

def _with(namespace: str, /, **request: Any) -> bytes:
    body = review(namespace, [f"x/y@{DIGEST}"])
    body["request"].update(request)
    return json.dumps(body).encode()


def _hostile_reviews(namespace: str) -> dict[str, tuple[bytes, int]]:
    """Name -> (body, the status it must get)."""
    good = review(namespace, [f"x/y@{DIGEST}"])
    v1beta1 = {**good, "apiVersion": "admission.k8s.io/v1beta1"}
    no_request = {k: v for k, v in good.items() if k != "request"}
    no_object = {**good, "request": {k: v for k, v in good["request"].items() if k != "object"}}
    many = review(namespace, ["x/y:1"] * 100_000)  # ~3.5 MiB: under the limit, over the cap
    return {
        "not JSON": (b"not json", 400),
        "empty body": (b"", 400),
        "undecodable bytes": (b"\xff\xfe\x00\x00garbage", 400),
        "single quotes": (b"{'request': {'uid': 'x'}}", 400),
        "truncated": (json.dumps(good).encode()[:200], 400),
        "a list": (b"[]", 400),
        "a string": (b'"AdmissionReview"', 400),
        "a number": (b"42", 400),
        "null": (b"null", 400),
        "an empty object": (b"{}", 400),
        "wrong apiVersion": (json.dumps(v1beta1).encode(), 400),
        "wrong kind": (json.dumps({**good, "kind": "Pod"}).encode(), 400),
        "no request": (json.dumps(no_request).encode(), 400),
        "request is a list": (json.dumps({**good, "request": []}).encode(), 400),
        "request is a string": (json.dumps({**good, "request": "x"}).encode(), 400),
        "no uid": (_with(namespace, uid=None), 400),
        "uid is a number": (_with(namespace, uid=7), 400),
        "uid is empty": (_with(namespace, uid=""), 400),
        "no object": (json.dumps(no_object).encode(), 400),
        "object is null": (_with(namespace, object=None), 400),
        "object is a list": (_with(namespace, object=[]), 400),
        "object is a string": (_with(namespace, object="pod"), 400),
        "kind is a string": (_with(namespace, kind="Pod"), 400),
        "userInfo is a string": (_with(namespace, userInfo="alice"), 400),
        "groups is a string": (_with(namespace, userInfo={"username": "a", "groups": "g"}), 400),
        "username is a number": (_with(namespace, userInfo={"username": 5}), 400),
        "namespace is a list": (_with(namespace, namespace=[namespace]), 400),
        "dryRun is a string": (_with(namespace, dryRun="false"), 400),
        "oldObject is a string": (_with(namespace, oldObject="pod"), 400),
        "nested 100k deep": (b"[" * 100_000 + b"]" * 100_000, 400),
        "object nested 50k deep": (b'{"request": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001,
                                   400),
        "9 MiB": (b'{"request": {"uid": "u", "x": "' + b"a" * (9 << 20) + b'"}}', 413),
        "100k containers": (json.dumps(many).encode(), 200),
    }


@sandboxed
def test_malformed_admission_reviews_get_a_clean_answer_and_the_gate_keeps_judging(
    policed: str, sandbox_env: dict[str, str],
) -> None:
    env, namespace = sandbox_env, policed
    bodies = _hostile_reviews(namespace)
    offset = operator_log(env).stat().st_size
    malformed_before = metric(env, "scangate_admission_duration_seconds_count",
                              'result="malformed"')
    refused = 0
    with https(env) as client:
        for path in ("/validate", "/mutate"):
            for name, (body, status) in bodies.items():
                TRIED["admission: malformed review bodies"] += 1
                began = time.monotonic()
                answer = client.post(f"{env['SCANGATE_ADMISSION']}{path}", content=body,
                                     headers={"Content-Type": "application/json"})
                took = time.monotonic() - began
                assert answer.status_code == status, (path, name, answer.text[:300])
                assert took < 5, (path, name, took)  # the webhook's timeout
                if status == 400:
                    refused += 1
                    error = answer.json()["error"]
                    assert error.startswith("not an AdmissionReview"), (path, name, error)
                    assert len(error) < 300 and "Traceback" not in error, (path, name)
                elif status == 200:  # a well-formed answer to its own uid
                    sent = json.loads(body)
                    got = answer.json()
                    assert (got["apiVersion"], got["kind"]) == ("admission.k8s.io/v1",
                                                                "AdmissionReview")
                    assert got["response"]["uid"] == sent["request"]["uid"]
                    if path == "/validate":
                        assert got["response"]["allowed"] is False, name
                        assert "at most 1000" in got["response"]["status"]["message"]
        # And good reviews are judged as ever: an unscanned image is refused, a namespace
        # under no policy admits.
        denied = client.post(f"{env['SCANGATE_ADMISSION']}/validate",
                             json=review(namespace, [f"{env['REGISTRY']}/x/y@{DIGEST}"]))
        answer = denied.json()["response"]
        assert denied.status_code == 200 and answer["allowed"] is False
        assert "has not been scanned yet" in answer["status"]["message"]
        free = client.post(f"{env['SCANGATE_ADMISSION']}/validate",
                           json=review(f"nobody-{uuid.uuid4().hex[:6]}", ["x/y:1"]))
        assert free.json()["response"]["allowed"] is True
    assert metric(env, "scangate_admission_duration_seconds_count",
                  'result="malformed"') - malformed_before == refused
    logged = log_since(env, offset)
    assert "Traceback" not in logged and "Error handling request" not in logged, logged[-3000:]


KOPF_MAX_BODY = 1 << 20
"""aiohttp's default, which kopf's server keeps (the objects it judges are small)."""


@sandboxed
def test_malformed_reviews_to_the_webhooks_of_scangates_own_resources_get_a_4xx(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
) -> None:
    """kopf serves the validation of ScanRules, ScanPolicies and ImageScans; the same
    bodies get a 4xx from it, never a 500, and it keeps refusing a bad ScanRule."""
    env = sandbox_env
    config = json.loads(kubectl("get", "validatingwebhookconfiguration", "scangate.dev",
                                "-o", "json"))
    urls = sorted({w["clientConfig"]["url"] for w in config["webhooks"]})
    offset = operator_log(env).stat().st_size
    with https(env) as client:
        for url in urls:
            for name, (body, gate_status) in _hostile_reviews(namespace).items():
                TRIED["admission: malformed reviews to kopf's webhooks"] += 1
                # A well-formed review of a pod: kopf serves no pods (404).
                status = 413 if len(body) > KOPF_MAX_BODY else {200: 404}.get(
                    gate_status, gate_status)
                answer = client.post(url, content=body,
                                     headers={"Content-Type": "application/json"})
                assert answer.status_code == status, (url, name, answer.text[:300])
    bad_rule = kubectl.run("apply", "-f", "-", check=False, input=json.dumps({
        "apiVersion": "scangate.dev/v1alpha1", "kind": "ScanRule",
        "metadata": {"name": "bad", "namespace": namespace},
        "spec": {"registry": {"url": "http://registry.invalid"},
                 "scope": {"namespaces": ["x"]}, "tagFilter": "("}}))
    assert bad_rule.returncode != 0 and "tagFilter" in bad_rule.stderr, bad_rule.stderr
    logged = log_since(env, offset)
    assert "Traceback" not in logged and "Error handling request" not in logged, logged[-3000:]


def _push_tags(env: dict[str, str], source: str, tags: list[str]) -> list[str]:
    """More tags of the image at `source` (its manifest put again): their references."""
    repository, tag = source.split("/", 1)[1].rsplit(":", 1)
    accept = "application/vnd.oci.image.manifest.v1+json"
    with httpx.Client(base_url=f"http://{env['REGISTRY']}", timeout=30) as registry:
        got = registry.get(f"/v2/{repository}/manifests/{tag}", headers={"Accept": accept})
        got.raise_for_status()
        for new in tags:
            registry.put(f"/v2/{repository}/manifests/{new}", content=got.content,
                         headers={"Content-Type": got.headers["Content-Type"]}
                         ).raise_for_status()
    return [f"{env['REGISTRY']}/{repository}:{new}" for new in tags]


def _pod(name: str, images: list[str]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                       "spec": {"containers": [{"name": f"c{i}", "image": image}
                                               for i, image in enumerate(images)]}})


def _dry_run(kubectl: Kubectl, namespace: str, manifest: str
             ) -> tuple[bool, str, float]:
    began = time.monotonic()
    out = kubectl.run("create", "--dry-run=server", "-n", namespace, "-f", "-",
                      input=manifest, check=False)
    return out.returncode == 0, out.stdout + out.stderr, time.monotonic() - began


@sandboxed
def test_a_pod_of_200_containers_is_judged_in_time_through_the_api_server(
    kubectl: Kubectl, policed: str, sandbox_env: dict[str, str],
) -> None:
    env, namespace = sandbox_env, policed
    clean, _ = push_variant(env, "clean")
    bad, _ = push_variant(env, "debian-critical")
    for name, image in (("clean", clean), ("bad", bad)):
        create_scan(kubectl, namespace, name, image)
    done = wait_done(kubectl, namespace, ["clean", "bad"])
    assert {s["status"]["phase"] for s in done.values()} == {"Completed"}
    # 200 new tags of the clean image: 200 registry lookups for one decision.
    run = uuid.uuid4().hex[:6]
    tags = _push_tags(env, clean, [f"{run}-{i:03d}" for i in range(200)])
    timeout = 5  # the gate's webhook timeout (admission_timeout_seconds)

    ok, said, took = _dry_run(kubectl, namespace, _pod("all-clean", tags))
    TRIED["admission: 200-container pods"] += 1
    assert ok, said
    assert took < timeout, took
    ok, said, took = _dry_run(kubectl, namespace, _pod("one-bad", [*tags[:199], bad]))
    TRIED["admission: 200-container pods"] += 1
    assert not ok and took < timeout, (took, said)
    assert "scangate denied" in said and bad in said and "critical" in said, said
    assert not any(tag in said for tag in tags[:199]), said
    invalid = [f"Team/App{i}:1" for i in range(200)]
    ok, said, took = _dry_run(kubectl, namespace, _pod("all-invalid", invalid))
    TRIED["admission: 200-container pods"] += 1
    assert not ok and took < timeout, (took, said)
    assert "is not a valid reference" in said and "more failures" in said, said


# -- Image references ------------------------------------------------------------------

VALID_REFERENCES = [
    # (written, registry, repository, tag, digest)
    ("registry.example.com:5000/team/app:1.0", "registry.example.com:5000", "team/app",
     "1.0", None),
    ("localhost:5000/app", "localhost:5000", "app", "latest", None),
    ("[::1]:5000/x:y", "[::1]:5000", "x", "y", None),
    ("[2001:db8::1]/team/app:v1", "[2001:db8::1]", "team/app", "v1", None),
    ("[::1]/x", "[::1]", "x", "latest", None),
    (f"app@{DIGEST}", "docker.io", "library/app", None, DIGEST),
    (f"ghcr.io/org/app:1.0@{DIGEST}", "ghcr.io", "org/app", "1.0", DIGEST),
    (f"127.0.0.1:5000/team-a/api@{DIGEST}", "127.0.0.1:5000", "team-a/api", None, DIGEST),
    # the host is canonical: lowercase, without the scheme's default port (containerd's)
    ("REGISTRY.Example.COM/team/app:v1", "registry.example.com", "team/app", "v1", None),
    ("registry.example.com:443/team/app:v1", "registry.example.com", "team/app", "v1", None),
    ("x:Release_1.0-RC.2", "docker.io", "library/x", "Release_1.0-RC.2", None),
    ("host:65535/x", "host:65535", "x", "latest", None),
    ("registry-1.docker.io/library/nginx:1", "docker.io", "library/nginx", "1", None),
    ("a.b/c/d/e/f/g/h:1", "a.b", "c/d/e/f/g/h", "1", None),
    ("x__y/z-z---z/a.b_c", "docker.io", "x__y/z-z---z/a.b_c", "latest", None),
    ("  nginx  ", "docker.io", "library/nginx", "latest", None),
    ("r.io/" + "a" * 1000 + ":" + "t" * 18, "r.io", "a" * 1000, "t" * 18, None),  # 1024
]

INVALID_REFERENCES = [
    # (written, what the message says)
    ("UPPER/case:1", "invalid repository"),
    ("Nginx", "invalid repository"),
    ("é/x:1", "invalid repository"),
    ("[::1/x:y", "invalid registry"),
    ("[fe80::1%eth0]:5000/x", "invalid registry"),
    ("[::ffff:127.0.0.1]:5000/x", "invalid registry"),
    ("127.0.0.1:99999/x:1", "invalid port"),
    ("[::1]:99999/x:y", "invalid port"),
    ("host:0/x", "invalid port"),
    ("host:" + "9" * 900 + "/x", "invalid port"),
    ("x" * 4000, "4000 characters"),
    ("r.io/" + "a" * 1000 + ":" + "t" * 19, "1025 characters"),
    ("a/b:" + "t" * 129, "invalid tag"),
    ("x:täg", "invalid tag"),
    ("x:\u0661", "invalid tag"),  # an Arabic-Indic digit: \w in Python, not in the grammar
    ("x\n:1", "invalid repository"),
    ("h.st\n/x:1", "invalid registry"),
    (f"x:v1\n@{DIGEST}", "invalid tag"),
    ("x:1\t2", "invalid tag"),
    ("x y:1", "invalid repository"),
    ("a/b\x00c", "invalid repository"),
    (f"@{DIGEST}", "invalid repository"),
    (":tag", "invalid repository"),
    ("x@", "invalid digest"),
    ("x:1@", "invalid digest"),
    ("x@sha256:abc", "invalid digest"),
    (f"x@{DIGEST}@{DIGEST}", "invalid digest"),
    (f"x@{DIGEST.upper()}", "invalid digest"),
    ("x/y:", "invalid tag"),
    ("a//b", "invalid repository"),
    ("/a", "invalid repository"),
    ("a/", "invalid repository"),
    ("-a/b", "invalid repository"),
    ("", "empty"),
    ("   ", "empty"),
]


@pytest.mark.parametrize(("written", "registry", "repository", "tag", "digest"),
                         VALID_REFERENCES, ids=lambda v: repr(v)[:40] if isinstance(v, str)
                         else None)
def test_odd_but_valid_references_parse(written: str, registry: str, repository: str,
                                        tag: str | None, digest: str | None) -> None:
    TRIED["image references: parse_image"] += 1
    ref = parse_image(written)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry, repository, tag, digest)
    assert parse_image(str(ref)) == ref  # the normalised form reads back as itself


@pytest.mark.parametrize(("written", "says"), INVALID_REFERENCES,
                         ids=[repr(w)[:40] for w, _ in INVALID_REFERENCES])
def test_invalid_references_are_refused_in_one_clear_line(written: str, says: str) -> None:
    TRIED["image references: parse_image"] += 1
    with pytest.raises(InvalidReference) as caught:
        parse_image(written)
    message = str(caught.value)
    assert says in message, message
    # One line (a newline in the input is quoted, never reproduced: no log injection),
    # and short whatever the input's length.
    assert "\n" not in message and "\x00" not in message
    assert len(message) <= 2 * 1100 + 100


@sandboxed
def test_odd_references_through_admission_get_a_clear_decision(
    kubectl: Kubectl, policed: str, sandbox_env: dict[str, str],
) -> None:
    env, namespace = sandbox_env, policed
    invalid = {written: says for written, says in INVALID_REFERENCES
               if written.strip() and written != "x" * 4000}
    invalid["x" * 4000] = "4000 characters"
    with https(env) as client:
        for written, says in invalid.items():
            TRIED["image references: through the gate"] += 1
            answer = client.post(f"{env['SCANGATE_ADMISSION']}/validate",
                                 json=review(namespace, [written]))
            assert answer.status_code == 200, (written, answer.text[:300])
            response = answer.json()["response"]
            assert response["allowed"] is False, written
            message = response["status"]["message"]
            assert "is not a valid reference" in message or "longer than" in message, message
            assert says in message, (written, message)
            assert len(message) <= 4096
        # Valid odd forms are judged as images: unscanned, so refused saying so.
        for written in ("[::1]:9/x:y", f"{env['REGISTRY']}/x/y@{DIGEST}",
                        "LOCALHOST:9/team/app:v1"):
            TRIED["image references: through the gate"] += 1
            response = client.post(f"{env['SCANGATE_ADMISSION']}/validate",
                                   json=review(namespace, [written])).json()["response"]
            assert response["allowed"] is False
            assert "has not been scanned yet" in response["status"]["message"], written
    # Through the API server, as kubectl users meet it (it lets all of these through to
    # the gate: it checks only that an image is not empty nor padded with blanks).
    for written, says in (("UPPER/case:1", "invalid repository"),
                          ("127.0.0.1:99999/x:1", "invalid port"),
                          ("x\n:1", "invalid repository"), ("x" * 4000, "4000 characters"),
                          ("[fe80::1%eth0]:5000/x", "invalid registry")):
        TRIED["image references: through kubectl"] += 1
        ok, said, took = _dry_run(kubectl, namespace, _pod("odd", [written]))
        assert not ok and took < 5, said
        assert "scangate denied" in said and says in said, (written, said)
    assert scans(kubectl, namespace) == {}  # dry runs: nothing was started


# -- Trivy reports -----------------------------------------------------------------------

def vuln(i: int, severity: str = "HIGH", fixed: bool = True) -> dict[str, Any]:
    v = {"VulnerabilityID": f"CVE-2024-{i:05d}", "PkgName": f"pkg{i % 300}",
         "InstalledVersion": "1.0", "Severity": severity, "Title": "t" * 40}
    if fixed:
        v["FixedVersion"] = "2.0"
    return v


def trivy_report(vulnerabilities: list[dict[str, Any]]) -> dict[str, Any]:
    return {"SchemaVersion": 2, "ArtifactName": "x", "Results": [
        {"Target": "x (debian 12)", "Class": "os-pkgs", "Type": "debian",
         "Vulnerabilities": vulnerabilities}]}


@functools.cache
def fifty_thousand() -> str:
    """A report of 50,000 findings, a fifth of each severity (NEGLIGIBLE for unknown), half
    of them fixable."""
    return json.dumps(trivy_report([
        vuln(i, ("CRITICAL", "HIGH", "MEDIUM", "LOW", "NEGLIGIBLE")[i % 5], fixed=i % 2 == 1)
        for i in range(50_000)]))


FIFTY_THOUSAND_SUMMARY = {"critical": 10_000, "high": 10_000, "medium": 10_000, "low": 10_000,
                          "unknown": 10_000, "total": 50_000}
ODD_SEVERITIES = ["NEGLIGIBLE", "negligible", "", "MODERATE", "IMPORTANT", " HIGH", "HIGH ",
                  "crItIcal", "Unknown", "高", "NONE", "0"]


def assert_bounded(stored: dict[str, Any], budget: int = DEFAULT_FINDINGS_BUDGET) -> None:
    """What an ImageScan stores of a report stays within its byte budgets."""
    findings = json.dumps(stored["findings"], separators=(",", ":")).encode()
    assert len(findings) <= budget
    assert len(stored["vulnerabilityIndex"]) <= INDEX_MAX_BYTES
    index = decode_index(stored["vulnerabilityIndex"])
    assert index is not None


def test_fifty_thousand_distinct_findings_keep_exact_counts_and_a_bounded_index() -> None:
    # The findings' bound is tests/unit/test_poison_pills.py's; this one is the per-ID
    # index beside it, and the whole stored form.
    TRIED["Trivy reports: parse_report/summarize"] += 1
    began = time.monotonic()
    stored = summarize(parse_report(fifty_thousand()))
    assert time.monotonic() - began < 10
    assert stored["summary"] == FIFTY_THOUSAND_SUMMARY
    assert stored["fixable"]["total"] == 25_000
    assert stored["findingsTruncated"] is True
    assert_bounded(stored)
    index = decode_index(stored["vulnerabilityIndex"])
    assert index is not None and 0 < len(index) <= 50_000
    # Every ID the index kept has its exact counts; the most severe were kept first.
    for vid, by_severity in index.items():
        i = int(vid.rsplit("-", 1)[1])
        severity = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN")[i % 5]
        assert by_severity == {severity: (1, i % 2)}, vid
    if stored["vulnerabilityIndexTruncated"]:
        assert all("CRITICAL" in s for s in index.values()) or len(index) > 10_000
    assert len(json.dumps(stored).encode()) <= DEFAULT_FINDINGS_BUDGET + INDEX_MAX_BYTES + 4096


@pytest.mark.parametrize("severity", ODD_SEVERITIES)
def test_severities_trivy_does_not_define_count_as_unknown(severity: str) -> None:
    TRIED["Trivy reports: parse_report/summarize"] += 1
    stored = summarize(parse_report(json.dumps(trivy_report(
        [vuln(1, severity), vuln(2, "LOW", fixed=False)]))))
    expected = "critical" if severity.upper() == "CRITICAL" else "unknown"
    assert stored["summary"] == {s: int(s == expected) + int(s == "low") for s in SEVERITIES
                                 } | {"total": 2}
    assert stored["fixable"]["total"] == 1 and stored["fixable"][expected] == 1


def _cuts(data: str, count: int) -> list[str]:
    return [data[:len(data) * k // count] for k in range(count)]


def test_truncated_reports_are_refused_in_one_line() -> None:
    data = json.dumps(trivy_report([vuln(i) for i in range(50)]))
    for cut in _cuts(data, 40):
        TRIED["Trivy reports: parse_report/summarize"] += 1
        with pytest.raises(ReportError, match="not JSON") as caught:
            parse_report(cut)
        assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


def summarize_cli(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCANGATE), "report", "summarize", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_the_cli_summarizes_fifty_thousand_findings_in_seconds(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text(fifty_thousand())
    TRIED["Trivy reports: scangate report summarize"] += 1
    began = time.monotonic()
    done = summarize_cli(path)
    took = time.monotonic() - began
    assert done.returncode == 0, done.stderr
    assert took < 10, took
    stored = json.loads(done.stdout)
    assert stored["summary"] == FIFTY_THOUSAND_SUMMARY and stored["findingsTruncated"] is True
    assert_bounded(stored)
    assert len(done.stdout) < 2 * (DEFAULT_FINDINGS_BUDGET + INDEX_MAX_BYTES)


def _bad_report_files(tmp_path: Path) -> dict[str, Path]:
    data = fifty_thousand()
    contents: dict[str, bytes] = {
        "truncated in half": data[: len(data) // 2].encode(),
        "truncated by a byte": data[:-1].encode(),
        "empty": b"",
        "undecodable": b"\xff\xfe\x00garbage",
        "nested 100k deep": b"[" * 100_000,
        "a list": b"[]",
        "SchemaVersion 1": b'{"SchemaVersion": 1}',
        "wrong types": json.dumps(trivy_report([{"VulnerabilityID": 5}])).encode(),
        "a 5000-digit number": b'{"SchemaVersion": 2, "x": ' + b"9" * 5000 + b"}",
    }
    paths: dict[str, Path] = {}
    for name, content in contents.items():
        paths[name] = tmp_path / f"{len(paths)}.json"
        paths[name].write_bytes(content)
    return paths | {"missing file": tmp_path / "nope.json", "a directory": tmp_path}


def test_the_cli_refuses_bad_reports_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    for name, path in _bad_report_files(tmp_path).items():
        TRIED["Trivy reports: scangate report summarize"] += 1
        done = summarize_cli(path)
        assert done.returncode == 2, (name, done.returncode, done.stderr[-500:])
        assert done.stdout == "", name
        assert "Traceback" not in done.stderr, (name, done.stderr[-2000:])
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("scangate: "), (name, done.stderr)
        assert len(lines[0]) < 300, name


def inject_command(env: dict[str, str], scan: str, command: list[str]) -> None:
    """The node agent runs `command` instead of Trivy in the next scan pod of `scan`
    (sandbox/nodeagent.py, the faults file's replaceCommand)."""
    path = Path(env["SANDBOX_DIR"]) / "faults.json"
    faults = json.loads(path.read_text() or "{}") if path.exists() else {}
    faults.setdefault("replaceCommand", []).append(
        {"labels": {SCAN_LABEL: scan}, "command": command, "times": 1})
    path.write_text(json.dumps(faults))


def printing_report(report: str) -> list[str]:
    """A scan container that prints `report` (text, built in the pod) framed as the scan
    Job frames Trivy's: its Python builds it, so that no argument nears ARG_MAX."""
    script = (f"import sys; from scangate.core.framing import encode\n{report}\n"
              "sys.stdout.write(encode('report', body.encode()))")
    return [sys.executable, "-c", script]


@sandboxed
def test_hostile_trivy_output_through_a_real_scan_job(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
) -> None:
    env = sandbox_env
    severities = json.dumps(ODD_SEVERITIES)
    programs = {
        # An intact frame around a report that is not JSON (cut short before framing).
        "truncated": "import json\nbody = json.dumps({'SchemaVersion': 2, 'Results': "
                     "[{'Vulnerabilities': [{'VulnerabilityID': 'CVE-1'}]}]})[:-9]",
        "huge": "import json\nsev = ('CRITICAL', 'HIGH', 'MEDIUM', 'LOW', 'NEGLIGIBLE')\n"
                "body = json.dumps({'SchemaVersion': 2, 'Results': [{'Target': 't', "
                "'Class': 'os-pkgs', 'Vulnerabilities': [{'VulnerabilityID': "
                "f'CVE-2024-{i:05d}', 'PkgName': f'pkg{i % 300}', 'InstalledVersion': '1', "
                "'Severity': sev[i % 5], **({'FixedVersion': '2'} if i % 2 else {})} "
                "for i in range(50000)]}]})",
        "severities": f"import json\nsev = {severities}\n"
                      "body = json.dumps({'SchemaVersion': 2, 'Results': [{'Target': 't', "
                      "'Vulnerabilities': [{'VulnerabilityID': f'CVE-2024-{i:05d}', "
                      "'Severity': s} for i, s in enumerate(sev)]}]})",
    }
    for name, program in programs.items():
        TRIED["Trivy reports: through a scan Job"] += 1
        image, _ = push_variant(env, "clean")
        inject_command(env, name, printing_report(program))
        create_scan(kubectl, namespace, name, image)
    done = {n: s["status"] for n, s in wait_done(kubectl, namespace, list(programs)).items()}

    assert (done["truncated"]["phase"], done["truncated"]["reason"]) == ("Failed",
                                                                         "InvalidReport")
    assert "not JSON" in done["truncated"]["message"]
    assert done["truncated"]["attempts"] == 1  # a report that lies is not retried
    huge = done["huge"]
    assert huge["phase"] == "Completed", huge.get("message")
    assert huge["summary"] == FIFTY_THOUSAND_SUMMARY
    assert huge["fixable"]["total"] == 25_000
    assert huge["findingsTruncated"] is True
    assert_bounded(huge)
    stored = kubectl("get", "imagescan", "huge", "-n", namespace, "-o", "json")
    assert len(stored.encode()) < 512 * 1024  # far from etcd's 1.5 MiB object limit
    odd = done["severities"]
    assert odd["phase"] == "Completed", odd.get("message")
    unknown = sum(1 for s in ODD_SEVERITIES if s.upper() != "CRITICAL")
    assert odd["summary"] == {"critical": len(ODD_SEVERITIES) - unknown, "high": 0,
                              "medium": 0, "low": 0, "unknown": unknown,
                              "total": len(ODD_SEVERITIES)}
    assert {f["severity"] for f in odd["findings"]} == {"CRITICAL", "UNKNOWN"}


# -- Push payloads -----------------------------------------------------------------------

def push(env: dict[str, str], body: bytes, content_type: str = "application/json"
         ) -> httpx.Response:
    with https(env) as client:
        return client.post(f"https://127.0.0.1:{env['PUSH_PORT']}/push", content=body,
                           headers={"Content-Type": content_type,
                                    "Authorization": f"Bearer {env['PUSH_TOKEN']}"})


def _event(registry: str, repository: Any, **target: Any) -> dict[str, Any]:
    return {"action": "push", "request": {"host": registry}, "target": {
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "repository": repository,
        "tag": "v1.0.0", "digest": DIGEST, **target}}


def _hostile_pushes(registry: str, repository: str) -> dict[str, tuple[bytes, int]]:
    """Name -> (body, status): each names the test's repository, so that any scan it
    wrongly started would show."""
    image = f"{registry}/{repository}:v1.0.0"
    event = _event(registry, repository)

    def doc(value: Any) -> bytes:
        return json.dumps(value).encode()

    bodies: dict[str, tuple[bytes, int]] = {
        # A list where an object belongs.
        "a list of plain images": (doc([{"image": image}]), 400),
        "a list of lists": (doc([[event]]), 400),
        "a list of numbers": (doc([1, 2, 3]), 400),
        "events is an object": (doc({"events": {"0": event}}), 400),
        "target is a list": (doc({"events": [{**event, "target": [event["target"]]}]}), 400),
        "request is a list": (doc({"events": [{**event, "request": [registry]}]}), 400),
        # Numbers (and other non-strings) for strings.
        "repository is a number": (doc({"events": [_event(registry, 5)]}), 400),
        "tag is a number": (doc({"events": [_event(registry, repository, tag=1.5)]}), 400),
        "tag is a boolean": (doc({"events": [_event(registry, repository, tag=True)]}), 400),
        "digest is an object": (doc({"events": [_event(registry, repository,
                                                       digest={"sha256": "a"})]}), 400),
        "host is a number": (doc({"events": [{**event, "request": {"host": 5000}}]}), 400),
        "image is a number": (doc({"image": 12345}), 400),
        "image is a list": (doc({"image": [image]}), 400),
        "Harbor type is a number": (doc({"type": 1, "occur_at": 1, "event_data": {}}), 400),
        # Nested nulls.
        "events is null": (doc({"events": None}), 400),
        "an event is null": (doc({"events": [None]}), 400),
        "target is null": (doc({"events": [{**event, "target": None}]}), 400),
        "repository is null": (doc({"events": [_event(registry, None)]}), 400),
        "image is null": (doc({"image": None}), 400),
        "Harbor event_data is null": (doc({"type": "PUSH_ARTIFACT", "occur_at": 1,
                                           "event_data": None}), 400),
        "Harbor resource is null": (doc({"type": "PUSH_ARTIFACT", "occur_at": 1, "event_data": {
            "repository": {"repo_full_name": repository}, "resources": [None]}}), 400),
        "CloudEvent data is null": (doc({"specversion": "1.0", "type": "harbor.artifact.pushed",
                                         "data": None}), 400),
        "Event Grid data is null": (doc([{"eventType": "Microsoft.ContainerRegistry.ImagePushed",
                                          "data": None}]), 400),
        # Values no registry could have sent.
        "host with port 99999": (doc({"events": [{**event, "request": {
            "host": "127.0.0.1:99999"}}]}), 400),
        "newline in the image": (doc({"image": f"{registry}/{repository}\n:v1.0.0"}), 400),
        "uppercase repository": (doc({"events": [_event(registry, repository.upper())]}), 400),
        "NUL in the tag": (doc({"events": [_event(registry, repository, tag="v1\x00")]}), 400),
        # Huge, and deep.
        "a 900 kB repository": (doc({"events": [_event(registry, "a" * 900_000)]}), 400),
        "1001 events": (doc({"events": [_event(registry, repository, tag=f"t{i}")
                                        for i in range(1001)]}), 400),
        "1.5 MiB of valid JSON": (doc({"image": image, "pad": "x" * (3 << 19)}), 413),
        "nested 200k deep": (b"[" * 200_000, 400),
        "a 5000-digit number": (b'{"image": ' + b"9" * 5000 + b"}", 400),
    }
    # Each recorded format, cut short at a quarter, a half and three quarters.
    for sample in sorted(SAMPLES.glob("*.json")):
        text = sample.read_text().replace("127.0.0.1:5000", registry).replace(
            "team-a/api", repository).encode()
        for k in (1, 2, 3):
            bodies[f"{sample.stem} cut at {k}/4"] = (text[: len(text) * k // 4], 400)
    return bodies


@sandboxed
def test_hostile_push_payloads_are_refused_create_nothing_and_the_receiver_keeps_working(
    kubectl: Kubectl, namespace: str, sandbox_env: dict[str, str],
) -> None:
    env, team = sandbox_env, f"r{uuid.uuid4().hex[:8]}"
    registry = env["REGISTRY"]
    kubectl.apply(json.dumps({
        "apiVersion": "scangate.dev/v1alpha1", "kind": "ScanRule", "metadata": {"name": "pushed"},
        "spec": {"registry": {"url": f"http://{registry}"},
                 "scope": {"namespaces": [f"{team}-a"]}, "tagFilter": ".*"}}), namespace)
    wait_for(lambda: json.loads(kubectl("get", "scanrule", "pushed", "-n", namespace, "-o",
                                        "json")).get("status", {}).get("lastRun"),
             60, "the rule's first run")
    offset = operator_log(env).stat().st_size
    malformed_before = metric(env, "scangate_push_notifications_total", 'result="malformed"')
    bodies = _hostile_pushes(registry, f"{team}-a/api")
    for name, (body, status) in bodies.items():
        TRIED["push payloads"] += 1
        answer = push(env, body)
        assert answer.status_code == status, (name, answer.status_code, answer.text[:300])
        error = answer.json()["error"]
        assert len(error) < 300 and "\n" not in error, (name, error)
        assert "a" * 100 not in error, name  # the body is not quoted back
    assert metric(env, "scangate_push_notifications_total",
                  'result="malformed"') - malformed_before == len(bodies)
    assert scans(kubectl, namespace) == {}
    # The receiver still works: a good notification starts its scan.
    answer = push(env, json.dumps({"image": f"{registry}/{team}-a/api:v1.0.0"}).encode())
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["scans"]) == 1
    assert len(scans(kubectl, namespace)) == 1
    logged = log_since(env, offset)
    assert "Traceback" not in logged and "Error handling request" not in logged, logged[-3000:]


def test_the_hostile_push_payloads_are_refused_by_the_parser_alone() -> None:
    """The same bodies, without a sandbox: each is a PushEventError (or over the size the
    receiver reads), so that `make unit` catches a regression too."""
    from scangate.registry.events import PushEventError, parse_push_events
    from scangate.scanning.push import MAX_BODY

    for name, (body, status) in _hostile_pushes("127.0.0.1:5000", "team-a/api").items():
        TRIED["push payloads: parser only"] += 1
        if status == 413:
            assert len(body) > MAX_BODY, name
            continue
        with pytest.raises(PushEventError):
            parse_push_events(body, "application/json")
