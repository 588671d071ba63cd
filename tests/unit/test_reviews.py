"""The shape an AdmissionReview must have before the gate or kopf reads it."""

from __future__ import annotations

from typing import Any

import pytest

from scangate.core.reviews import admission_request

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns"}}


def review(**request: Any) -> dict[str, Any]:
    base = {"uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE", "namespace": "ns", "object": POD,
            "userInfo": {"username": "alice", "groups": ["dev"]}}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {k: v for k, v in {**base, **request}.items() if v is not ...}}


def test_a_good_review_gives_its_request_and_uid_in_both_modes() -> None:
    for resource in (False, True):
        body, uid = admission_request(review(), resource=resource)
        assert uid == "u1" and body["object"] == POD


def test_a_deletion_has_only_its_old_object_which_kopf_may_see_but_the_gate_not() -> None:
    deletion = review(operation="DELETE", object=None, oldObject=POD)
    assert admission_request(deletion, resource=True)[1] == "u1"
    with pytest.raises(TypeError, match=r"no request\.object$"):
        admission_request(deletion)


@pytest.mark.parametrize(("body", "says"), [
    ([], "not a JSON object"),
    ({**review(), "apiVersion": "admission.k8s.io/v1beta1"}, "want apiVersion"),
    ({**review(), "request": "x"}, "no request"),
    (review(uid=""), "no request.uid"),
    (review(object="pod"), "request.object is not an object"),
    (review(object={"metadata": "m"}), "request.object.metadata is not an object"),
    (review(oldObject={"metadata": []}), "request.oldObject.metadata is not an object"),
    (review(resource="pods"), "request.resource is not an object"),
    (review(userInfo="alice"), "request.userInfo is not an object"),
    (review(dryRun="no"), "request.dryRun has the wrong type"),
    (review(subResource=1), "request.subResource has the wrong type"),
    (review(userInfo={"username": "a", "groups": "g"}), "request.userInfo.groups"),
])
def test_bodies_of_another_shape_are_refused_in_both_modes(body: object, says: str) -> None:
    for resource in (False, True):
        with pytest.raises(TypeError, match=says.replace(".", r"\.")):
            admission_request(body, resource=resource)


@pytest.mark.parametrize(("request_", "says"), [
    ({"object": None}, "no request.object or request.oldObject"),
    ({"userInfo": ...}, "no request.userInfo"),
    ({"resource": ...}, "no request.resource"),
    ({"resource": {"group": "", "version": "v1"}}, "no request.resource"),
    ({"operation": ...}, "no request.operation"),
])
def test_what_kopf_reads_is_required_for_kopf_only(request_: dict[str, Any], says: str
                                                    ) -> None:
    with pytest.raises(TypeError, match=says.replace(".", r"\.")):
        admission_request(review(**request_), resource=True)
    if request_ != {"object": None}:
        assert admission_request(review(**request_))[1] == "u1"
