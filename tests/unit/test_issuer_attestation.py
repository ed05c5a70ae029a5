"""Kubernetes node attestation's decisions (agent/issuer/kubernetes_attestation.py), fed the JSON the API
server answers: what a TokenReview must say, what the bound pod must be; and the config checks."""

from __future__ import annotations

import copy

import pytest

from agent.config import config_from_mapping, validate
from agent.errors import ConfigError
from agent.issuer.config import issuer_config_from_mapping
from agent.issuer.kubernetes_attestation import (AttestationPolicy, AttestationRefused, BoundPod, attested_node,
                                                 bound_pod, token_review)

POLICY = AttestationPolicy("tcpmesh-issuer", "tcpmesh-system", "tcpmesh-agent")
UID = "a9e1c0de-0001-4000-8000-000000000001"
REVIEW = {
    "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {"creationTimestamp": None},
    "spec": {"token": "opaque", "audiences": ["tcpmesh-issuer"]},
    "status": {"authenticated": True, "audiences": ["tcpmesh-issuer"],
               "user": {"username": "system:serviceaccount:tcpmesh-system:tcpmesh-agent", "uid": "sa-uid",
                        "groups": ["system:serviceaccounts", "system:serviceaccounts:tcpmesh-system",
                                   "system:authenticated"],
                        "extra": {"authentication.kubernetes.io/pod-name": ["tcpmesh-agent-1x7q2"],
                                  "authentication.kubernetes.io/pod-uid": [UID],
                                  "authentication.kubernetes.io/node-name": ["worker-1"],
                                  "authentication.kubernetes.io/credential-id": ["JTI=abc"]}}}}
POD = {"kind": "Pod", "apiVersion": "v1",
       "metadata": {"name": "tcpmesh-agent-1x7q2", "namespace": "tcpmesh-system", "uid": UID},
       "spec": {"serviceAccountName": "tcpmesh-agent", "nodeName": "worker-1", "hostNetwork": True},
       "status": {"phase": "Running"}}


def changed(doc: dict, path: str, value) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    target = doc
    for key in parents:
        target = target[key]
    if value is None:
        target.pop(last, None)
    else:
        target[last] = value
    return doc


def test_the_review_asks_for_the_issuers_audience():
    assert token_review("t", POLICY) == {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                         "spec": {"token": "t", "audiences": ["tcpmesh-issuer"]}}


def test_a_good_review_and_pod_name_the_pods_node():
    bound = bound_pod(REVIEW, POLICY)
    assert bound == BoundPod("tcpmesh-system", "tcpmesh-agent-1x7q2", UID, "worker-1")
    assert attested_node(POD, bound, POLICY) == "worker-1"
    # API servers before 1.30 send no node-name extra: the pod alone says where it runs
    older = changed(REVIEW, "status.user.extra", {k: v for k, v in REVIEW["status"]["user"]["extra"].items()
                                                   if "node-name" not in k})
    assert attested_node(POD, bound_pod(older, POLICY), POLICY) == "worker-1"


@pytest.mark.parametrize("path,value,reason", [
    ("status.authenticated", False, "bad_sa_token"),
    ("status.authenticated", None, "bad_sa_token"),
    ("status.authenticated", "true", "bad_sa_token"),           # only JSON true counts
    ("status.audiences", [], "wrong_audience"),                 # an authenticator that ignored spec.audiences
    ("status.audiences", ["https://kubernetes.default.svc"], "wrong_audience"),
    ("status.user.username", "system:serviceaccount:shop:web", "wrong_service_account"),
    ("status.user.username", "system:serviceaccount:other:tcpmesh-agent", "wrong_service_account"),
    ("status.user.username", "system:node:worker-1", "wrong_service_account"),
    ("status.user.extra", {}, "bad_sa_token"),                  # a legacy Secret token: bound to no pod
    ("status.user.extra", {"authentication.kubernetes.io/pod-name": ["a", "b"],
                           "authentication.kubernetes.io/pod-uid": [UID]}, "bad_sa_token"),
])
def test_a_review_that_does_not_vouch_for_the_agents_pod_is_refused(path, value, reason):
    with pytest.raises(AttestationRefused) as refused:
        bound_pod(changed(REVIEW, path, value), POLICY)
    assert refused.value.reason == reason


@pytest.mark.parametrize("path,value,reason", [
    ("metadata.uid", "another-uid", "pod_gone"),                 # deleted and recreated under the same name
    ("status.phase", "Succeeded", "pod_gone"),
    ("status.phase", "Failed", "pod_gone"),
    ("spec.nodeName", None, "pod_gone"),
    ("spec.serviceAccountName", "default", "wrong_service_account"),
    ("spec.nodeName", "worker-2", "wrong_node"),                 # the review's node-name says worker-1
])
def test_a_pod_that_is_not_the_tokens_live_agent_pod_is_refused(path, value, reason):
    with pytest.raises(AttestationRefused) as refused:
        attested_node(changed(POD, path, value), bound_pod(REVIEW, POLICY), POLICY)
    assert refused.value.reason == reason


BASE = {"trust_domain": "cluster.local", "ca_dir": "/x", "registry": {"source": "kubernetes"}}


@pytest.mark.parametrize("change,field", [
    ({"registry": {"source": "file"}}, "attestation.kubernetes.enabled"),
    ({"attestation": {"kubernetes": {"enabled": True, "audience": ""}}}, "attestation.kubernetes.audience"),
    ({"attestation": {"kubernetes": {"enabled": True, "namespace": "Bad_NS"}}}, "attestation.kubernetes"),
    ({"attestation": {"kubernetes": {"enabled": True, "timeout_seconds": 0}}}, "attestation.kubernetes.timeout_seconds"),
])
def test_issuer_attestation_config_errors_name_the_field(change, field):
    doc = {**BASE, "attestation": {"kubernetes": {"enabled": True}}, **change}
    with pytest.raises(ConfigError) as error:
        issuer_config_from_mapping(doc)
    assert field in str(error.value)


def test_issuer_attestation_defaults():
    k8s = issuer_config_from_mapping({**BASE, "attestation": {"kubernetes": {"enabled": True}}}).attestation.kubernetes
    assert (k8s.audience, k8s.namespace, k8s.service_account, k8s.exclusive) == (
        "tcpmesh-issuer", "tcpmesh-system", "tcpmesh-agent", True)
    assert issuer_config_from_mapping(BASE).attestation.kubernetes.enabled is False


def test_the_agent_takes_one_way_to_join():
    identity = {"mode": "issuer", "issuer": {"addresses": ["issuer:15012"], "bootstrap_token_file": "/a",
                                             "service_account_token_file": "/b"}}
    with pytest.raises(ConfigError, match="identity.issuer.service_account_token_file"):
        validate(config_from_mapping({"node": {"name": "n1", "address": "10.0.0.1"}, "identity": identity,
                                      "capture": {"redirect_address": "169.254.1.1"}}))
