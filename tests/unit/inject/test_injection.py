"""The injector's pure parts: settings validation, the layout check, and patch details that the
webhook tests (tests/e2e/test_webhook.py) do not vary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config.schema import SidecarConfig
from sidecar.errors import ConfigError
from sidecar.inject import layout
from sidecar.inject.authors import Requester
from sidecar.inject.pod import plan_injection
from sidecar.inject.podspec import InjectionDenied
from sidecar.inject.settings import check_layout, load_injector
from tests.support.k8s import RESTRICTED

ADMIN = Requester("kubernetes-admin", frozenset({"system:masters", "system:authenticated"}))

SIDECAR: dict[str, Any] = {
    "identity": {"source": "workload_api", "workload_api": {"socket": "unix:///spiffe-workload-api/spire-agent.sock"}},
    "issuer": {"url": "https://issuer.example", "signing_key": layout.SIGNING_KEY_FILE},
    "listen": {"authz": f"unix:{layout.AUTHZ_SOCKET}", "health": "0.0.0.0:15021"},
    "dns": {"listen": "127.0.0.1:15053"},
    "envoy": {"egress_port": 15080, "outbound_port": 15001, "inbound_redirect": False, "ipv6": True},
    "decision_log": {"path": "/var/log/agent-authz/decisions.log"},
    "state": {"path": layout.STATE_FILE},
    "task_files": [{"path": layout.TASK_FILE, "revoked": layout.REVOKED_FILE}],
}


def _write(tmp_path: Path, injector: dict[str, Any], sidecar: dict[str, Any] | None = None) -> Path:
    (tmp_path / "sidecar.yaml").write_text(yaml.safe_dump(sidecar or SIDECAR))
    path = tmp_path / "injector.yaml"
    path.write_text(yaml.safe_dump({"image": "img:1", "sidecar_config": "sidecar.yaml", **injector}))
    return path


def test_check_layout_lists_every_disagreement() -> None:
    assert check_layout(SidecarConfig.model_validate(SIDECAR)) == []
    bad = SidecarConfig.model_validate(
        {
            "agent": "spiffe://td/ns/a/sa/b",
            "issuer": {"url": "u", "signing_key": "k.pem"},
            "listen": {"authz": "unix:/tmp/a.sock"},
        }
    )
    problems = check_layout(bad)
    assert len(problems) == 7, problems
    assert any("identity.source must be workload_api" in p for p in problems)
    assert any("state.path must be /var/lib/agent-authz/state/state.db" in p for p in problems)
    assert any(f"listen.authz must be unix:{layout.AUTHZ_SOCKET}" in p for p in problems)
    assert any("task_files must be" in p for p in problems)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"listen": {**SIDECAR["listen"], "authz": "127.0.0.1:9191"}}, "listen.authz must be unix:"),
        ({"envoy": {**SIDECAR["envoy"], "admin_socket": None}}, "envoy.admin_socket must be"),
        ({"envoy": {**SIDECAR["envoy"], "admin_socket": "/run/agent-authz/admin.sock"}}, "envoy.admin_socket must be"),
    ],
)
def test_check_layout_refuses_control_endpoints_the_agent_could_reach(change: dict[str, Any], problem: str) -> None:
    problems = check_layout(SidecarConfig.model_validate({**SIDECAR, **change}))
    assert len(problems) == 1 and problem in problems[0], problems


@pytest.mark.parametrize(
    ("injector", "field", "reason"),
    [
        ({"exclude_outbound_cidrs": ["10.1.2.3/8"]}, "exclude_outbound_cidrs", "10.0.0.0/8"),
        (
            {"sidecar": {"resources": {"requests": {"cpu": "lots"}}}},
            "sidecar.resources.requests",
            "not a Kubernetes quantity",
        ),
        ({"sidecar": {"resources": {"requests": {"gpu": "1"}}}}, "sidecar.resources.requests", "expected cpu, memory"),
        ({"spiffe_id_template": "spiffe://{trust_domain}/{pod}"}, "spiffe_id_template", "placeholders are"),
        ({"proxy_uid": 0}, "proxy_uid", "greater than or equal to 1"),
        ({"namespaces": ["Bad"]}, "namespaces", "not a namespace name"),
        ({"image": "has space:1"}, "image", "no whitespace"),
        ({"surprise": 1}, "surprise", "Extra inputs are not permitted"),
    ],
)
def test_bad_injector_settings_name_the_field(
    tmp_path: Path, injector: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_injector(_write(tmp_path, injector))
    assert caught.value.field == field and reason in caught.value.reason, str(caught.value)


def test_flags_follow_the_sidecar_config(tmp_path: Path) -> None:
    config = load_injector(
        _write(
            tmp_path, {"workload_api": {"mode": "hostPath", "host_path": "/run/spire/sockets"}, "allow_non_tcp": True}
        )
    )
    assert (config.inbound, config.ipv6, config.health_port, config.outbound_port) == (False, True, 15021, 15001)
    pod = {
        "metadata": {},
        "spec": {
            "containers": [
                {
                    "name": "a",
                    "image": "x",
                    "livenessProbe": {"tcpSocket": {"port": 7000}},
                    "startupProbe": {"grpc": {"port": 7001}},
                    "securityContext": RESTRICTED,
                }
            ]
        },
    }
    injection = plan_injection(pod, "ns", config, now=time.time(), requester=ADMIN)
    ops = {op["path"]: op["value"] for op in injection.patch}
    assert ops["/metadata/annotations"] == {layout.ANNOTATION_STATUS: layout.STATUS_INJECTED}
    init = ops["/spec/initContainers"][0]["command"]
    flags = dict(zip(init[2::2], init[3::2], strict=False))
    assert flags["--inbound-ports"] == "" and flags["--ipv6"] == "same" and init[-1] == "--allow-non-tcp"
    assert flags["--exclude-inbound-ports"] == "7000,7001,15021"
    volumes = {v["name"]: v for v in ops["/spec/volumes"]}
    assert volumes[layout.VOLUME_WORKLOAD_API]["hostPath"] == {"path": "/run/spire/sockets", "type": "Directory"}


def test_opt_out_and_run_as_user_policies(tmp_path: Path) -> None:
    strict = load_injector(_write(tmp_path, {"allow_opt_out": False, "require_run_as_user": True}))
    pod: dict[str, Any] = {
        "metadata": {"annotations": {layout.ANNOTATION_INJECT: "false"}},
        "spec": {"containers": [{"name": "a"}]},
    }
    with pytest.raises(InjectionDenied, match="is not allowed by this installation"):
        plan_injection(pod, "ns", strict, now=time.time(), requester=ADMIN)
    pod["metadata"]["annotations"] = {}
    with pytest.raises(InjectionDenied, match="sets no runAsUser"):
        plan_injection(pod, "ns", strict, now=time.time(), requester=ADMIN)
    pod["spec"]["securityContext"] = {"runAsUser": 1000}
    pod["spec"]["containers"][0]["securityContext"] = {"allowPrivilegeEscalation": False}
    assert plan_injection(pod, "ns", strict, now=time.time(), requester=ADMIN).outcome == "injected"
    named = {"name": "a", "readinessProbe": {"httpGet": {"port": "web"}}, "securityContext": RESTRICTED}
    with pytest.raises(InjectionDenied, match="names port 'web', which the container does not declare"):
        plan_injection(
            {"spec": {"securityContext": {"runAsUser": 1}, "containers": [named]}}, "ns", strict, now=0, requester=ADMIN
        )
