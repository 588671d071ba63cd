from __future__ import annotations

import copy
from typing import Any

import pytest

from scangate.core.workloads import (
    MAX_CONTAINERS,
    MAX_IMAGE_LENGTH,
    ContainerImage,
    container_images,
    new_images,
    normalise,
    owned_by_controller_request,
    pod_spec,
    reference,
)

DIGEST = "sha256:" + "ab" * 32
SPEC: dict[str, Any] = {
    "initContainers": [{"name": "setup", "image": "busybox:1.36"}],
    "containers": [{"name": "app", "image": "nginx"}, {"name": "side", "image": "reg:5000/t/s:1"}],
    "ephemeralContainers": [{"name": "debug", "image": "alpine"}],
}
EXPECTED = [
    ContainerImage("setup", "initContainer", "busybox:1.36"),
    ContainerImage("app", "container", "nginx"),
    ContainerImage("side", "container", "reg:5000/t/s:1"),
    ContainerImage("debug", "ephemeralContainer", "alpine"),
]


def workload(kind: str, spec: Any = SPEC) -> dict[str, Any]:
    """An object of `kind` with `spec` as its pod spec where that kind keeps it."""
    template = {"metadata": {"labels": {"app": "x"}}, "spec": spec}
    body: dict[str, Any] = {"template": template, "replicas": 2}
    if kind == "Pod":
        body = spec
    elif kind == "CronJob":
        body = {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": template}}}
    return {"apiVersion": "v1", "kind": kind, "metadata": {"name": "w"}, "spec": body}


KINDS = ["Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet",
         "ReplicationController", "Job", "CronJob"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_yields_its_pod_spec(kind: str) -> None:
    obj = workload(kind)
    assert pod_spec(kind, obj) is SPEC
    assert container_images(pod_spec(kind, obj)) == EXPECTED


@pytest.mark.parametrize(("kind", "at"), [
    ("Pod", "/spec"), ("Deployment", "/spec/template/spec"),
    ("CronJob", "/spec/jobTemplate/spec/template/spec")])
def test_each_image_knows_its_json_pointer(kind: str, at: str) -> None:
    paths = [i.path for i in new_images(kind, workload(kind), None)]
    assert paths == [f"{at}/initContainers/0/image", f"{at}/containers/0/image",
                     f"{at}/containers/1/image", f"{at}/ephemeralContainers/0/image"]


def test_cronjob_spec_is_not_read_at_the_job_level() -> None:
    # A CronJob with a Job-shaped spec (template directly under spec) has no pod spec.
    assert pod_spec("CronJob", workload("Job")) is None
    assert pod_spec("Job", workload("CronJob")) is None


@pytest.mark.parametrize("kind", ["Service", "ConfigMap", "pod", ""])
def test_other_kinds_have_no_pod_spec(kind: str) -> None:
    assert pod_spec(kind, workload("Pod")) is None


def test_order_is_init_regular_ephemeral() -> None:
    # Keys written in reverse order must not change the order of the result.
    spec = dict(reversed(list(SPEC.items())))
    assert [i.kind for i in container_images(spec)] == [
        "initContainer", "container", "container", "ephemeralContainer"]


def test_ephemeralcontainers_subresource_is_the_whole_pod() -> None:
    old = workload("Pod", {"containers": [{"name": "app", "image": "nginx"}]})
    new = copy.deepcopy(old)
    new["spec"]["ephemeralContainers"] = [{"name": "debugger", "image": "busybox", "tty": True}]
    assert new_images("Pod", new, old) == [
        ContainerImage("debugger", "ephemeralContainer", "busybox")]


@pytest.mark.parametrize("obj", [
    {"spec": ["containers"]},
    {"spec": {"template": "x"}},
    {"spec": {"template": {"spec": None}}},
    {"spec": None},
    {},
    [],
    "junk",
])
def test_malformed_objects_have_no_pod_spec(obj: Any) -> None:
    assert pod_spec("Deployment", obj) is None
    assert new_images("Deployment", obj, None) == []


def test_junk_containers_are_skipped() -> None:
    spec = {
        "initContainers": {"name": "setup", "image": "busybox"},  # a dict, not a list
        "containers": [
            {"name": "num", "image": 42},
            {"name": "none"},
            "nginx",
            None,
            {"name": 7, "image": "ok"},  # a name of the wrong type still yields the image
            {"name": "good", "image": "nginx"},
        ],
        "ephemeralContainers": "alpine",
    }
    assert container_images(spec) == [ContainerImage("", "container", "ok"),
                                      ContainerImage("good", "container", "nginx")]
    assert container_images(None) == []
    assert container_images(["x"]) == []  # type: ignore[arg-type]


def test_create_judges_everything() -> None:
    assert new_images("Deployment", workload("Deployment"), None) == EXPECTED


def test_update_that_only_scales_judges_nothing() -> None:
    old = workload("Deployment")
    new = copy.deepcopy(old)
    new["spec"]["replicas"] = 10
    new["metadata"]["labels"] = {"tier": "web"}
    assert new_images("Deployment", new, old) == []


def test_update_that_changes_an_image_judges_just_that_one() -> None:
    old = workload("CronJob")
    new = copy.deepcopy(old)
    new["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"] = "nginx:2"
    assert new_images("CronJob", new, old) == [ContainerImage("app", "container", "nginx:2")]


def test_an_image_moved_between_containers_is_not_new() -> None:
    old = workload("StatefulSet", {"initContainers": [{"name": "a", "image": "busybox"}],
                                   "containers": [{"name": "b", "image": "nginx"}]})
    new = workload("StatefulSet", {"containers": [{"name": "b", "image": "nginx"},
                                                  {"name": "c", "image": "busybox"}]})
    assert new_images("StatefulSet", new, old) == []


def test_update_from_a_malformed_old_object_judges_everything() -> None:
    assert new_images("Deployment", workload("Deployment"), {"spec": []}) == EXPECTED


def test_normalise_docker_hub_and_digests() -> None:
    images = [ContainerImage("app", "container", "nginx"),
              ContainerImage("db", "container", "index.docker.io/library/postgres:16"),
              ContainerImage("side", "container", f"reg:5000/team/app:1.0@{DIGEST}")]
    result = normalise(images)
    assert list(result.references) == ["docker.io/library/nginx:latest",
                                       "docker.io/library/postgres:16",
                                       f"reg:5000/team/app:1.0@{DIGEST}"]
    assert result.errors == []


def test_normalise_dedupes_and_says_who_uses_each() -> None:
    a = ContainerImage("a", "initContainer", "nginx")
    b = ContainerImage("b", "container", "docker.io/library/nginx:latest")
    c = ContainerImage("c", "container", "redis:7")
    d = ContainerImage("d", "ephemeralContainer", "nginx:latest")
    result = normalise([a, b, c, d])
    assert result.references == {"docker.io/library/nginx:latest": [a, b, d],
                                 "docker.io/library/redis:7": [c]}


def test_parse_errors_name_the_container() -> None:
    good = ContainerImage("ok", "container", "nginx")
    bad = ContainerImage("app", "container", "UPPER/x")
    init = ContainerImage("setup", "initContainer", "a/b:bad tag")
    result = normalise([good, bad, init])
    assert list(result.references) == ["docker.io/library/nginx:latest"]
    assert len(result.errors) == 2
    assert result.errors[0].startswith(
        'container "app": image "UPPER/x" is not a valid reference: ')
    assert result.errors[1].startswith(
        'initContainer "setup": image "a/b:bad tag" is not a valid reference: invalid tag')


def test_reference_keeps_the_written_image() -> None:
    ref = reference(ContainerImage("app", "container", "nginx"))
    assert (ref.written, ref.normalised, ref.error) == (
        "nginx", "docker.io/library/nginx:latest", None)


def test_image_over_the_length_bound_is_refused_unparsed() -> None:
    long = "a" * (MAX_IMAGE_LENGTH + 1)
    result = normalise([ContainerImage("app", "container", long)])
    assert result.references == {}
    assert result.errors == [f'container "app": image of {MAX_IMAGE_LENGTH + 1} characters is '
                             f"longer than {MAX_IMAGE_LENGTH}"]
    # At the bound, the image is parsed (and fails as the grammar says, not as too long).
    at_bound = normalise([ContainerImage("app", "container", "a" * MAX_IMAGE_LENGTH)])
    assert "is not a valid reference" in at_bound.errors[0]


def test_too_many_containers_are_refused_unparsed() -> None:
    images = [ContainerImage(f"c{i}", "container", "nginx") for i in range(MAX_CONTAINERS + 1)]
    result = normalise(images)
    assert result.references == {}
    assert result.errors == [f"{MAX_CONTAINERS + 1} container images to judge: "
                             f"at most {MAX_CONTAINERS} in one object"]
    assert list(normalise(images[:MAX_CONTAINERS]).references) == [
        "docker.io/library/nginx:latest"]


def test_two_hundred_containers_are_fine() -> None:
    spec = {"containers": [{"name": f"c{i}", "image": f"team/app{i}:1"} for i in range(200)]}
    result = normalise(new_images("Pod", workload("Pod", spec), None))
    assert result.errors == []
    assert len(result.references) == 200
    assert result.references["docker.io/team/app199:1"] == [
        ContainerImage("c199", "container", "team/app199:1")]


CONTROLLED = {"metadata": {"ownerReferences": [
    {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "u1"},
    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "u2",
     "controller": True},
]}}
SA_GROUPS = ["system:serviceaccounts", "system:serviceaccounts:kube-system",
             "system:authenticated"]


@pytest.mark.parametrize(("user", "groups"), [
    ("system:kube-controller-manager", ["system:authenticated"]),
    ("system:serviceaccount:kube-system:replicaset-controller", SA_GROUPS),
    ("system:serviceaccount:kube-system:cronjob-controller", SA_GROUPS),
])
def test_controller_writing_its_object_is_skipped(user: str, groups: list[str]) -> None:
    assert owned_by_controller_request(CONTROLLED, user, groups) is True


@pytest.mark.parametrize(("user", "groups"), [
    ("alice", ["system:authenticated"]),  # a user who wrote a fake ownerReference
    ("system:serviceaccount:team-a:deployer", ["system:serviceaccounts:team-a"]),
    ("system:serviceaccount:kube-system:", SA_GROUPS),
    ("system:serviceaccount:kube-system:x:y", SA_GROUPS),
    ("system:serviceaccount:kube-system:replicaset-controller", ["system:authenticated"]),
    ("system:kube-scheduler", ["system:authenticated"]),
    ("system:node:worker-1", ["system:nodes"]),
])
def test_anyone_else_is_judged_despite_an_owner_reference(user: str, groups: list[str]) -> None:
    assert owned_by_controller_request(CONTROLLED, user, groups) is False


@pytest.mark.parametrize("obj", [
    {"metadata": {"ownerReferences": [{"kind": "ReplicaSet", "name": "web-1"}]}},
    {"metadata": {"ownerReferences": [{"kind": "ReplicaSet", "controller": False}]}},
    {"metadata": {"ownerReferences": [{"kind": "ReplicaSet", "controller": "true"}]}},
    {"metadata": {"ownerReferences": {"kind": "ReplicaSet", "controller": True}}},
    {"metadata": {"ownerReferences": ["controller"]}},
    {"metadata": []},
    {},
])
def test_controller_writing_an_uncontrolled_object_is_judged(obj: dict[str, Any]) -> None:
    assert owned_by_controller_request(obj, "system:kube-controller-manager", []) is False
