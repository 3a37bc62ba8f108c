"""The admission review handler on in-memory values: AdmissionReview JSON in, AdmissionReview out.

The settings and the sidecar configuration are built in memory (no chart, no files); the webhook
tests (tests/e2e/test_webhook.py) drive the same handler over TLS with the chart's settings.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config.loader import LoadedConfig
from sidecar.config.schema import SidecarConfig
from sidecar.inject import layout, review
from sidecar.inject.podspec import AdmissionOutcome
from sidecar.inject.review import API_VERSION, MAX_REVIEW_BYTES, BadReview, decide
from sidecar.inject.server import make_webhook_app
from sidecar.inject.settings import InjectorConfig, InjectorSettings, build_injector
from tests.support.k8s import RESTRICTED

SIDECAR: dict[str, Any] = {
    "identity": {"source": "workload_api", "workload_api": {"socket": "unix:///spiffe-workload-api/spire-agent.sock"}},
    "issuer": {"url": "https://issuer.example", "signing_key": layout.SIGNING_KEY_FILE},
    "listen": {"authz": f"unix:{layout.AUTHZ_SOCKET}", "health": "0.0.0.0:15021"},
    "dns": {"listen": "127.0.0.1:15053"},
    "envoy": {"egress_port": 15080, "outbound_port": 15001},
    "decision_log": {"path": "/var/log/agent-authz/decisions.log"},
    "state": {"path": layout.STATE_FILE},
    "task_files": [{"path": layout.TASK_FILE, "revoked": layout.REVOKED_FILE}],
}
TASK = "id: q3\npurpose: report\nttl: 1h\negress: [{host: api.example.com, methods: [GET], paths: ['/v1/*']}]\n"


def injector(**settings: Any) -> InjectorConfig:
    loaded = LoadedConfig(SidecarConfig.model_validate(SIDECAR), Path("/mem/sidecar.yaml"), Path("/mem"), "0" * 64)
    validated = InjectorSettings.model_validate({"image": "img:1", "sidecar_config": "sidecar.yaml", **settings})
    return build_injector(validated, loaded, file="/mem/injector.yaml")


def pod(**annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent", "annotations": annotations},
        "spec": {"containers": [{"name": "agent", "image": "agent:1", "securityContext": dict(RESTRICTED)}]},
    }


def body(operation: str = "CREATE", obj: object = None, old: object = None, **request: Any) -> bytes:
    req: dict[str, Any] = {
        "uid": "u-1",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "agents",
        "operation": operation,
        "userInfo": {"username": "kubernetes-admin", "groups": ["system:masters", "system:authenticated"]},
        "object": pod() if obj is None else obj,
        **request,
    }
    if old is not None:
        req["oldObject"] = old
    return json.dumps({"apiVersion": API_VERSION, "kind": "AdmissionReview", "request": req}).encode()


def test_a_plain_pod_is_injected_with_a_json_patch() -> None:
    original = pod(**{layout.ANNOTATION_TASK: TASK})
    outcome = decide(body(obj=original), injector(), now=0)
    assert outcome.allowed and outcome.outcome is AdmissionOutcome.INJECTED
    response = outcome.review["response"]
    assert outcome.review["apiVersion"] == API_VERSION and response["uid"] == "u-1"
    assert response["patchType"] == "JSONPatch"
    patched = jsonpatch.apply_patch(original, json.loads(base64.b64decode(response["patch"])))
    names = [c["name"] for c in patched["spec"]["initContainers"]]
    assert names == [layout.CONTAINER_INIT, layout.CONTAINER_SIDECAR, layout.CONTAINER_ENVOY]
    assert patched["metadata"]["annotations"][layout.ANNOTATION_STATUS] == layout.STATUS_INJECTED
    assert not any("probe" in w for w in response.get("warnings", []))  # the pod declares no probes

    again = decide(body(obj=patched), injector(), now=0)  # a reinvoked webhook changes nothing
    assert (
        again.allowed and again.outcome is AdmissionOutcome.ALREADY_INJECTED and "patch" not in again.review["response"]
    )


@pytest.mark.parametrize(
    ("operation", "obj", "old", "outcome"),
    [
        ("DELETE", None, None, AdmissionOutcome.IGNORED),
        ("CONNECT", None, None, AdmissionOutcome.IGNORED),
        ("UPDATE", pod(), pod(), AdmissionOutcome.NOT_INJECTED),
    ],
)
def test_operations_that_change_nothing(operation: str, obj: Any, old: Any, outcome: AdmissionOutcome) -> None:
    answered = decide(body(operation, obj, old), injector(), now=0)
    assert answered.allowed and answered.outcome is outcome and "patch" not in answered.review["response"]


def test_an_injected_pods_task_annotation_change_is_validated() -> None:
    injected = pod(**{layout.ANNOTATION_STATUS: layout.STATUS_INJECTED, layout.ANNOTATION_TASK: TASK})
    assert decide(body("UPDATE", injected, injected), injector(), now=0).outcome is AdmissionOutcome.UNCHANGED
    changed = pod(**{layout.ANNOTATION_STATUS: layout.STATUS_INJECTED, layout.ANNOTATION_TASK: TASK + "max_calls: 3\n"})
    assert decide(body("UPDATE", changed, injected), injector(), now=0).outcome is AdmissionOutcome.VALIDATED
    broken = pod(**{layout.ANNOTATION_STATUS: layout.STATUS_INJECTED, layout.ANNOTATION_TASK: "id: [no"})
    refused = decide(body("UPDATE", broken, injected), injector(), now=0)
    assert not refused.allowed and refused.outcome is AdmissionOutcome.DENIED
    assert refused.review["response"]["status"]["code"] == 403 and layout.ANNOTATION_TASK in refused.message


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        ({"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}}, 400, "v1 Pods and batch/v1 Jobs only"),
        ({"subResource": "status"}, 400, "subresource status"),
        ({"operation": "PATCH"}, 400, "unknown operation"),
        ({"object": "not a pod"}, 403, "malformed pod"),
        ({"object": {"spec": {"hostNetwork": True, "containers": [{"name": "a"}]}}}, 403, "hostNetwork"),
    ],
)
def test_refusals_say_why(request_: dict[str, Any], code: int, message: str) -> None:
    answered = decide(body(**request_), injector(), now=0)
    assert not answered.allowed and answered.outcome is AdmissionOutcome.DENIED
    status = answered.review["response"]["status"]
    assert status["code"] == code and message in status["message"] and answered.review["response"]["uid"] == "u-1"


def test_a_bug_while_deciding_refuses_the_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(review, "plan_injection", broken)
    answered = decide(body(), injector(), now=0)
    assert not answered.allowed and answered.review["response"]["status"]["code"] == 500
    assert "internal error" in answered.message and "a bug" not in answered.message


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "JSON object"),
        (json.dumps({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1"}).encode(), "apiVersion"),
        (json.dumps({"kind": "AdmissionReview", "apiVersion": API_VERSION}).encode(), "no request object"),
        (json.dumps({"kind": "AdmissionReview", "apiVersion": API_VERSION, "request": {}}).encode(), "request.uid"),
        (b" " * (MAX_REVIEW_BYTES + 1), "larger than"),
    ],
)
def test_bodies_that_cannot_be_answered(raw: bytes, why: str) -> None:
    with pytest.raises(BadReview, match=why):
        decide(raw, injector(), now=0)


def test_the_webhook_counts_outcomes() -> None:
    async def run() -> str:
        client = TestClient(TestServer(make_webhook_app(injector())))
        await client.start_server()
        try:
            for raw in (body(), body("DELETE"), b"{garbage"):
                await client.post("/inject", data=raw, headers={"Content-Type": "application/json"})
            await client.post("/inject", data=b"{}", headers={"Content-Type": "text/plain"})
            reply = await client.get("/metrics")
            return await reply.text()
        finally:
            await client.close()

    samples = {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(asyncio.run(run()))
        for sample in family.samples
        if sample.name == "agent_authz_webhook_admissions_total"
    }
    assert samples == {
        o.value: {"injected": 1, "ignored": 1, "unanswerable": 2}.get(o.value, 0) for o in AdmissionOutcome
    }
