"""Pods whose spec would let the agent reach the proxy or escape interception, as AdmissionReviews.

Every row of :mod:`sidecar.inject.escapes` is sent to :func:`sidecar.inject.review.decide` as the
API server would send it, and the answer is read as the API server would: refused with the reason,
or admitted with the JSON Patch (applied with ``jsonpatch``). ``tests/e2e/test_pod_boundary.py``
runs an admitted pod and tries, as root in the agent's container with the capabilities the spec
leaves it, what the refused specs would allow.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from sidecar.config.loader import LoadedConfig
from sidecar.config.schema import SidecarConfig
from sidecar.errors import ConfigError
from sidecar.inject import layout
from sidecar.inject.escapes import RUNTIME_DEFAULT_CAPABILITIES, capability_set
from sidecar.inject.review import API_VERSION, decide
from sidecar.inject.settings import InjectorConfig, InjectorSettings, build_injector
from tests.support.k8s import RESTRICTED

SIDECAR: dict[str, Any] = {
    "identity": {"source": "workload_api", "workload_api": {"socket": "unix:///spiffe-workload-api/spire-agent.sock"}},
    "issuer": {"url": "https://issuer.example", "signing_key": layout.SIGNING_KEY_FILE},
    "listen": {"authz": f"unix:{layout.AUTHZ_SOCKET}", "health": "0.0.0.0:15021"},
    "dns": {"listen": "127.0.0.1:15053"},
    "envoy": {"egress_port": 15080, "outbound_port": 15001},
    "task_files": [{"path": layout.TASK_FILE, "revoked": layout.REVOKED_FILE}],
    "state": {"path": layout.STATE_FILE},
}
Mutation = Callable[[dict[str, Any]], None]


def injector(**settings: Any) -> InjectorConfig:
    loaded = LoadedConfig(SidecarConfig.model_validate(SIDECAR), Path("/mem/sidecar.yaml"), Path("/mem"), "0" * 64)
    validated = InjectorSettings.model_validate({"image": "img:1", "sidecar_config": "sidecar.yaml", **settings})
    return build_injector(validated, loaded, file="/mem/injector.yaml")


def pod(context: dict[str, Any] | None = None) -> dict[str, Any]:
    """An agent pod whose container has ``context`` (default: the restricted profile)."""
    container: dict[str, Any] = {"name": "agent", "image": "agent:1"}
    if context is not None:
        container["securityContext"] = copy.deepcopy(context)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent"}, "spec": {"containers": [container]}}


def review(obj: dict[str, Any], config: InjectorConfig | None = None) -> dict[str, Any]:
    request = {
        "uid": "u-1",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "agents",
        "operation": "CREATE",
        "object": obj,
    }
    raw = json.dumps({"apiVersion": API_VERSION, "kind": "AdmissionReview", "request": request}).encode()
    response: dict[str, Any] = decide(raw, config or injector(), now=0).review["response"]
    return response


def admitted(obj: dict[str, Any], config: InjectorConfig | None = None) -> tuple[dict[str, Any], list[str]]:
    response = review(obj, config)
    assert response["allowed"] is True, response.get("status")
    patch = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(obj, patch), response.get("warnings", [])


def _container(p: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = p["spec"]["containers"][0]
    return container


REFUSED: dict[str, tuple[dict[str, Any] | None, Mutation, str]] = {
    "hostPID": (RESTRICTED, lambda p: p["spec"].update(hostPID=True), "hostPID: true"),
    "hostIPC": (RESTRICTED, lambda p: p["spec"].update(hostIPC=True), "hostIPC: true"),
    "shareProcessNamespace": (
        RESTRICTED,
        lambda p: p["spec"].update(shareProcessNamespace=True),
        "shareProcessNamespace: true would show the agent the proxy's processes",
    ),
    "fsGroup": (RESTRICTED, lambda p: p["spec"].update(securityContext={"fsGroup": 1337}), "the proxy GID"),
    "supplementalGroups": (
        RESTRICTED,
        lambda p: p["spec"].update(securityContext={"supplementalGroups": [5, 1337]}),
        "supplementalGroups include GID 1337",
    ),
    "root, runtime default capabilities": (
        {"runAsUser": 0},
        lambda p: None,
        "runs as root (runAsUser: 0) and keeps CAP_NET_RAW, CAP_SETGID, CAP_SETUID",
    ),
    "no runAsUser (the image's USER)": (None, lambda p: None, "may run as root (no runAsUser"),
    "non-root but setuid binaries": (
        {"runAsUser": 1000},
        lambda p: None,
        "may become root through a setuid binary (allowPrivilegeEscalation is not false)",
    ),
    "root dropping SETUID only": (
        {"runAsUser": 0, "capabilities": {"drop": ["SETUID"]}},
        lambda p: None,
        "keeps CAP_NET_RAW, CAP_SETGID:",
    ),
    "root adding SETUID back after drop ALL": (
        {"runAsUser": 0, "capabilities": {"drop": ["ALL"], "add": ["SETUID"]}},
        lambda p: None,
        "keeps CAP_SETUID:",
    ),
    "adds SYS_PTRACE": (
        {**RESTRICTED, "capabilities": {"drop": ["ALL"], "add": ["SYS_PTRACE"]}},
        lambda p: None,
        "adds capabilities ['SYS_PTRACE']: it could SYS_PTRACE: read other processes' memory",
    ),
    "adds DAC_READ_SEARCH": (
        {**RESTRICTED, "capabilities": {"add": ["CAP_DAC_READ_SEARCH"]}},
        lambda p: None,
        "adds capabilities ['DAC_READ_SEARCH']",
    ),
    "adds NET_RAW": ({**RESTRICTED, "capabilities": {"add": ["net_raw"]}}, lambda p: None, "['NET_RAW']"),
    "hostPath": (
        RESTRICTED,
        lambda p: p["spec"].update(volumes=[{"name": "node", "hostPath": {"path": "/var/lib/kubelet"}}]),
        "volume 'node' is a hostPath (/var/lib/kubelet)",
    ),
    "Workload API": (
        RESTRICTED,
        lambda p: p["spec"].update(volumes=[{"name": "spire", "csi": {"driver": "csi.spiffe.io", "readOnly": True}}]),
        "mounts the SPIFFE Workload API (csi.spiffe.io): the agent would get the pod's SVID",
    ),
    "a mount of the proxy's run volume": (
        RESTRICTED,
        lambda p: _container(p).update(volumeMounts=[{"name": layout.VOLUME_RUN, "mountPath": "/proxy"}]),
        "mounts volume 'agent-authz-run'",
    ),
    "a root init container": (
        RESTRICTED,
        lambda p: p["spec"].update(
            initContainers=[{"name": "setup", "image": "x", "securityContext": {"runAsUser": 0}}]
        ),
        "container 'setup' runs as root",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_spec_that_lets_the_agent_reach_the_proxy_is_refused(case: str) -> None:
    context, mutate, message = REFUSED[case]
    obj = pod(context)
    mutate(obj)
    response = review(obj)
    assert response["allowed"] is False and response["status"]["code"] == 403
    assert message in response["status"]["message"], response["status"]["message"]


@pytest.mark.parametrize(
    "context",
    [
        RESTRICTED,
        {"runAsUser": 0, "capabilities": {"drop": ["NET_RAW", "SETUID", "SETGID"]}},  # root, but harmless to us
        {"runAsUser": 0, "capabilities": {"drop": ["ALL"]}},
        {"runAsNonRoot": True, "allowPrivilegeEscalation": False},  # non-root, default capabilities unreachable
        {"runAsUser": 0, "capabilities": {"add": ["SETUID"], "drop": ["SETUID", "SETGID", "NET_RAW"]}},  # drop wins
    ],
    ids=["restricted", "root-dropping-the-three", "root-drop-all", "non-root-no-escalation", "drop-wins-over-add"],
)
def test_a_spec_that_cannot_is_admitted(context: dict[str, Any]) -> None:
    obj = pod(context)
    obj["spec"]["volumes"] = [{"name": "other-csi", "csi": {"driver": "secrets-store.csi.k8s.io"}}]
    result, _ = admitted(obj)
    assert result["spec"]["initContainers"][0]["name"] == layout.CONTAINER_INIT
    assert _container(result)["securityContext"] == context  # left as the author wrote it


def test_capabilities_are_computed_as_containerd_does() -> None:
    assert capability_set({}, "c") == RUNTIME_DEFAULT_CAPABILITIES
    assert capability_set({"drop": ["ALL"], "add": ["CHOWN"]}, "c") == {"CHOWN"}
    assert capability_set({"add": ["SETUID"], "drop": ["SETUID"]}, "c") == RUNTIME_DEFAULT_CAPABILITIES - {"SETUID"}
    assert "SYS_PTRACE" in capability_set({"add": ["ALL"]}, "c")


@pytest.mark.parametrize(
    ("context", "drop"),
    [
        (None, ["NET_RAW", "SETGID", "SETUID"]),
        ({"runAsUser": 0}, ["NET_RAW", "SETGID", "SETUID"]),
        ({"runAsUser": 0, "capabilities": {"add": ["CHOWN"]}}, ["NET_RAW", "SETGID", "SETUID"]),
        ({"runAsUser": 1000, "capabilities": {"drop": ["MKNOD", "SETUID"]}}, ["MKNOD", "SETUID", "NET_RAW", "SETGID"]),
    ],
    ids=["no-context", "no-capabilities", "no-drop", "some-drops"],
)
def test_with_hardening_the_webhook_drops_them_instead(context: dict[str, Any] | None, drop: list[str]) -> None:
    config = injector(harden_containers=True)
    result, warnings = admitted(pod(context), config)
    assert _container(result)["securityContext"]["capabilities"]["drop"] == drop
    assert any("container 'agent'" in w and "added capabilities.drop" in w for w in warnings), warnings
    caps = capability_set(_container(result)["securityContext"]["capabilities"], "c")
    assert not caps & {"NET_RAW", "SETGID", "SETUID"}
    # a reinvoked webhook admits the hardened pod unchanged; an injected pod is never hardened later
    again = review(result, config)
    assert again["allowed"] is True and "patch" not in again
    _container(result)["securityContext"]["capabilities"]["drop"] = []
    refused = review(result, config)
    assert refused["allowed"] is False and "keeps CAP_NET_RAW" in refused["status"]["message"]


def test_hardening_never_admits_a_dangerous_capability() -> None:
    response = review(pod({"runAsUser": 0, "capabilities": {"add": ["SYS_PTRACE"]}}), injector(harden_containers=True))
    assert response["allowed"] is False and "['SYS_PTRACE']" in response["status"]["message"]


def test_an_injected_pod_keeps_its_trust_mount_but_nothing_else_of_ours() -> None:
    obj = pod(RESTRICTED)
    result, _ = admitted(obj)
    trust = {"name": layout.VOLUME_TRUST, "mountPath": layout.TRUST_DIR, "readOnly": True}
    _container(result)["volumeMounts"] = [trust]
    assert review(result)["allowed"] is True  # what the injector itself adds with intercept
    _container(result)["volumeMounts"] = [{**trust, "readOnly": False}]
    assert "mounts volume 'agent-authz-trust'" in review(result)["status"]["message"]


CREDENTIAL_SIDECAR = {
    **SIDECAR,
    "credentials": {"sentiment": {"header": "x-api-key", "file": "/etc/agent-authz/credentials/sentiment/api-key"}},
}


def credential_injector() -> InjectorConfig:
    loaded = LoadedConfig(
        SidecarConfig.model_validate(CREDENTIAL_SIDECAR), Path("/mem/sidecar.yaml"), Path("/mem"), "0" * 64
    )
    validated = InjectorSettings.model_validate(
        {
            "image": "img:1",
            "sidecar_config": "sidecar.yaml",
            "credentials": [{"name": "sentiment", "secret_name": "sentiment-api", "key": "api-key"}],
        }
    )
    return build_injector(validated, loaded, file="/mem/injector.yaml")


def _secret_volume(spec: dict[str, Any]) -> None:
    spec["volumes"] = [{"name": "keys", "secret": {"secretName": "sentiment-api"}}]
    spec["containers"][0]["volumeMounts"] = [{"name": "keys", "mountPath": "/keys"}]


def _projected(spec: dict[str, Any]) -> None:
    sources = [
        {"configMap": {"name": "x"}},
        {"secret": {"name": "sentiment-api", "items": [{"key": "api-key", "path": "k"}]}},
    ]
    spec["volumes"] = [{"name": "all", "projected": {"sources": sources}}]


def _env(spec: dict[str, Any]) -> None:
    ref = {"secretKeyRef": {"name": "sentiment-api", "key": "api-key"}}
    spec["containers"][0]["env"] = [{"name": "API_KEY", "valueFrom": ref}]


def _env_from_init(spec: dict[str, Any]) -> None:
    spec["initContainers"] = [
        {
            "name": "setup",
            "image": "x",
            "securityContext": copy.deepcopy(RESTRICTED),
            "envFrom": [{"secretRef": {"name": "sentiment-api"}}],
        }
    ]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_secret_volume, "volume 'keys' mounts the Secret 'sentiment-api'"),
        (_projected, "volume 'all' mounts the Secret 'sentiment-api'"),
        (_env, "container 'agent' reads the Secret 'sentiment-api' into its environment"),
        (_env_from_init, "container 'setup' reads the Secret 'sentiment-api' into its environment"),
    ],
)
def test_a_pod_whose_own_containers_reach_a_credential_secret_is_refused(mutate: Mutation, message: str) -> None:
    """The API keys the sidecar injects come from Secrets the agent's pod could mount itself: the
    webhook refuses that (any pod creator may mount any Secret of its namespace)."""
    spec = pod(RESTRICTED)
    mutate(spec["spec"])
    answer = review(spec, credential_injector())
    assert answer["allowed"] is False and message in answer["status"]["message"]
    other = pod(RESTRICTED)  # another Secret is the pod's business
    other["spec"]["volumes"] = [{"name": "mine", "secret": {"secretName": "my-own"}}]
    assert review(other, credential_injector())["allowed"] is True


def test_a_credential_secret_is_mounted_into_the_sidecar_container_only() -> None:
    original = pod(RESTRICTED)
    answer = review(original, credential_injector())
    assert answer["allowed"] is True
    patched = jsonpatch.apply_patch(original, json.loads(base64.b64decode(answer["patch"])))
    volume = next(v for v in patched["spec"]["volumes"] if v.get("secret", {}).get("secretName") == "sentiment-api")
    assert volume["secret"]["items"] == [{"key": "api-key", "path": "api-key"}]
    mounts = {
        c["name"]: [m for m in c.get("volumeMounts", []) if m["name"] == volume["name"]]
        for c in patched["spec"]["initContainers"] + patched["spec"]["containers"]
    }
    assert mounts.pop(layout.CONTAINER_SIDECAR) == [
        {"name": volume["name"], "mountPath": "/etc/agent-authz/credentials/sentiment", "readOnly": True}
    ]
    assert all(not found for found in mounts.values()), mounts  # not Envoy, not the init step, not the agent
    again = review(patched, credential_injector())  # the injected pod, reinvoked: its own volume is ours
    assert again["allowed"] is True and "patch" not in again


def test_the_webhook_refuses_a_credential_the_sidecar_reads_elsewhere() -> None:
    loaded = LoadedConfig(SidecarConfig.model_validate(CREDENTIAL_SIDECAR), Path("/mem/s.yaml"), Path("/mem"), "0" * 64)
    settings = InjectorSettings.model_validate(
        {
            "image": "img:1",
            "sidecar_config": "s.yaml",
            "credentials": [{"name": "sentiment", "secret_name": "sentiment-api", "key": "other-key"}],
        }
    )
    with pytest.raises(
        ConfigError,
        match=re.escape("credentials.sentiment.file must be /etc/agent-authz/credentials/sentiment/other-key"),
    ):
        build_injector(settings, loaded, file="/mem/injector.yaml")
