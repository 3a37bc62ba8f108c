"""HTTP lifecycle hooks (``postStart`` / ``preStop`` ``httpGet``) through the injection webhook.

The kubelet calls such a hook on the pod IP, like a probe and just as without an SVID, so the
webhook excludes the hook's port from inbound interception (with a warning), exactly as it does for
probe ports; otherwise the call would meet Envoy's mTLS listener and fail (a failing ``postStart``
gets the container killed). Real AdmissionReview JSON over TLS, patched pods validated against the
Kubernetes Pod schemas, as in ``test_webhook.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.k8s import RESTRICTED, validate
from tests.support.webhook_env import Installed, Webhook, admission_review, install, patched
from tests.support.webhook_pods import VALUES, agent_pod

pytestmark = pytest.mark.e2e

HEALTH_PORT = 15021


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    installed: Installed = install(tmp_path_factory.mktemp("chart"), VALUES)
    server = Webhook(installed, tmp_path_factory.mktemp("webhook"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _with_hooks(**lifecycle: Any) -> dict[str, Any]:
    pod = agent_pod()
    container = pod["spec"]["containers"][0]
    container["ports"].append({"name": "admin", "containerPort": 9090})
    container["lifecycle"] = lifecycle
    return pod


def _excluded(pod: dict[str, Any]) -> list[int]:
    init = pod["spec"]["initContainers"][0]
    args = init["command"]
    flags = dict(zip(args[2::2], args[3::2], strict=False))
    return [int(p) for p in flags["--exclude-inbound-ports"].split(",")]


def _inject(webhook: Webhook, pod: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    response = webhook.review(admission_review(pod))
    result = patched(pod, response)
    validate(result)
    return result, response.get("warnings", [])


def test_named_and_numbered_hook_ports_bypass_inbound_interception(webhook: Webhook) -> None:
    pod = _with_hooks(
        postStart={"httpGet": {"path": "/warm-up", "port": "admin"}},  # a named port
        preStop={"httpGet": {"path": "/drain", "port": 9191, "scheme": "HTTP"}},  # a number
    )
    result, warnings = _inject(webhook, pod)
    # 8080: the readiness probe's named port; 9090 and 9191: the hooks; 15021: the health port
    assert _excluded(result) == [8080, 9090, 9191, HEALTH_PORT]
    assert result["spec"]["containers"] == pod["spec"]["containers"]  # hooks are left as written
    hook_warnings = [w for w in warnings if "lifecycle hook" in w]
    assert hook_warnings == ["agent-authz: lifecycle hook port(s) 9090,9191 bypass inbound mTLS (kubelet has no SVID)"]
    assert any(w.startswith("agent-authz: probe port(s) 8080 ") for w in warnings)


def test_a_hook_port_given_as_a_digit_string_is_excluded(webhook: Webhook) -> None:
    result, _ = _inject(webhook, _with_hooks(preStop={"httpGet": {"path": "/drain", "port": "9292"}}))
    assert 9292 in _excluded(result)


def test_a_hook_on_the_probe_port_is_excluded_once(webhook: Webhook) -> None:
    result, warnings = _inject(webhook, _with_hooks(postStart={"httpGet": {"path": "/x", "port": "http"}}))
    assert _excluded(result) == [8080, HEALTH_PORT]
    assert any("lifecycle hook port(s) 8080 " in w for w in warnings)


def test_hooks_without_a_port_on_this_pod_exclude_nothing(webhook: Webhook) -> None:
    pod = _with_hooks(
        postStart={"exec": {"command": ["/bin/true"]}},
        preStop={"httpGet": {"host": "drain.example.internal", "path": "/drain", "port": 9393}},  # another host
    )
    result, warnings = _inject(webhook, pod)
    assert _excluded(result) == [8080, HEALTH_PORT]
    assert not [w for w in warnings if "lifecycle hook" in w]
    sleeping, _ = _inject(webhook, _with_hooks(preStop={"sleep": {"seconds": 5}}))
    assert _excluded(sleeping) == [8080, HEALTH_PORT]


def test_a_hook_naming_an_undeclared_port_is_refused(webhook: Webhook) -> None:
    response = webhook.review(admission_review(_with_hooks(postStart={"httpGet": {"path": "/", "port": "nope"}})))
    assert response["allowed"] is False
    assert response["status"]["message"] == (
        "agent-authz: container 'agent': lifecycle.postStart names port 'nope', which the container does not declare"
    )


def test_hooks_of_a_native_sidecar_and_of_another_container_count(webhook: Webhook) -> None:
    pod = agent_pod()
    pod["spec"]["containers"].append(
        {
            "name": "helper",
            "image": "registry.example/helper:1.0",
            "ports": [{"name": "ctl", "containerPort": 7070}],
            "lifecycle": {"preStop": {"httpGet": {"path": "/stop", "port": "ctl"}}},
            "securityContext": copy.deepcopy(RESTRICTED),
        }
    )
    pod["spec"]["initContainers"] = [
        {
            "name": "log-shipper",
            "image": "registry.example/shipper:1.0",
            "restartPolicy": "Always",
            "lifecycle": {"postStart": {"httpGet": {"path": "/", "port": 7171}}},
            "securityContext": copy.deepcopy(RESTRICTED),
        }
    ]
    result, _ = _inject(webhook, pod)
    assert _excluded(result) == [7070, 7171, 8080, HEALTH_PORT]


def test_an_injected_pod_with_hooks_is_recognised_not_refused(webhook: Webhook) -> None:
    """The already-injected check rebuilds the init step with the same ports: hooks included."""
    pod = _with_hooks(postStart={"httpGet": {"path": "/warm-up", "port": "admin"}})
    once, _ = _inject(webhook, pod)
    again = webhook.review(admission_review(once))
    assert again["allowed"] is True and "patch" not in again
    tampered = copy.deepcopy(once)
    command = tampered["spec"]["initContainers"][0]["command"]
    index = command.index("--exclude-inbound-ports") + 1
    command[index] = command[index].replace("9090,", "9090,22,")  # sneak another port out of interception
    refused = webhook.review(admission_review(tampered))
    assert refused["allowed"] is False
    assert "differs from what this injector builds" in refused["status"]["message"]


@pytest.mark.parametrize(
    ("lifecycle", "message"),
    [
        ({"postStart": "curl"}, "malformed pod: agent.lifecycle.postStart must be an object"),
        ({"preStop": {"httpGet": ["port", 80]}}, "malformed pod: agent.lifecycle.preStop.httpGet must be an object"),
        ("hooks", "malformed pod: agent.lifecycle must be an object"),
    ],
)
def test_malformed_hooks_are_refused_with_a_message(webhook: Webhook, lifecycle: Any, message: str) -> None:
    pod = agent_pod()
    pod["spec"]["containers"][0]["lifecycle"] = lifecycle
    response = webhook.review(admission_review(pod))
    assert response["allowed"] is False and response["status"]["message"] == f"agent-authz: {message}"
