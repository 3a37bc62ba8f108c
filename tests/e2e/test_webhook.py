"""The injection webhook over real TLS with real AdmissionReview JSON.

The webhook runs as ``agent-authz webhook`` with the settings and the TLS certificate the chart
rendered (``helm template``); the client verifies the certificate against the chart's CA bundle
for the Service's DNS name, as the API server does. Patched pods are built with the ``jsonpatch``
library and validated against the Kubernetes 1.29 and 1.35 Pod schemas. No API server runs here:
the test plays its part with the JSON it would send.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config.schema import TaskSpec
from sidecar.grants.issue import sign_root_grant
from sidecar.harness import http_get
from sidecar.identity.devca import DevCA
from sidecar.inject import layout
from sidecar.tls_intercept.trust import agent_trust_env
from sidecar.tokens.keys import generate_private_key_pem, load_signing_key
from tests.support.certs import make_leaf, write_pair
from tests.support.grant_chain import Chain, root_task
from tests.support.k8s import RESTRICTED, kubectl_annotate, validate
from tests.support.webhook_env import Installed, Webhook, admission_review, install, patched, user_info
from tests.support.webhook_pods import AGENT, TASK, TD, VALUES, agent_pod

pytestmark = pytest.mark.e2e


def job_pod() -> dict[str, Any]:
    """A pod as the Job controller creates it: generateName, no namespace in metadata, owner, finalizer,
    its own init container and volume."""
    uid = "9a0e7a5e-3f8e-4a77-8a53-2b1f0c9d6e21"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "report-",
            "labels": {"batch.kubernetes.io/job-name": "report", "job-name": "report", "controller-uid": uid},
            "annotations": {layout.ANNOTATION_TASK: json.dumps(TASK)},
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": "report",
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "finalizers": ["batch.kubernetes.io/job-tracking"],
        },
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": "worker",
            "initContainers": [
                {
                    "name": "fetch-input",
                    "image": "busybox:1.36",
                    "command": ["true"],
                    "volumeMounts": [{"name": "work", "mountPath": "/work"}],
                    "securityContext": copy.deepcopy(RESTRICTED),
                }
            ],
            "containers": [
                {
                    "name": "report",
                    "image": "registry.example/report:1.0",
                    "volumeMounts": [{"name": "work", "mountPath": "/work"}],
                    "securityContext": copy.deepcopy(RESTRICTED),
                }
            ],
            "volumes": [{"name": "work", "emptyDir": {}}],
        },
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return install(tmp_path_factory.mktemp("chart"), VALUES)


@pytest.fixture(scope="module")
def webhook(installed: Installed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    server = Webhook(installed, tmp_path_factory.mktemp("webhook"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _names(containers: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in containers]


def test_a_plain_pod_is_injected(webhook: Webhook) -> None:
    pod = agent_pod()
    response = webhook.review(admission_review(pod))
    result = patched(pod, response)
    validate(result)
    spec = result["spec"]
    assert _names(spec["initContainers"]) == ["agent-authz-init", "agent-authz", "agent-authz-envoy"]
    assert _names(spec["containers"]) == ["agent"] and spec["containers"] == pod["spec"]["containers"]
    init, sidecar, envoy = spec["initContainers"]
    assert "restartPolicy" not in init and sidecar["restartPolicy"] == envoy["restartPolicy"] == "Always"
    # root only in the init step, with only NET_ADMIN and NET_RAW
    assert init["securityContext"]["runAsUser"] == 0
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert init["securityContext"]["readOnlyRootFilesystem"] is True and init["securityContext"]["privileged"] is False
    args = init["command"]
    assert args[:2] == ["agent-authz", "iptables"]
    flags = dict(zip(args[2::2], args[3::2], strict=False))
    assert (
        flags["--outbound-port"] == "15001" and flags["--inbound-port"] == "15006" and flags["--inbound-ports"] == "*"
    )
    assert flags["--proxy-uid"] == flags["--proxy-gid"] == "1337"
    assert flags["--proxy-ports"] == "9902,15021,15080"  # the sidecar's admin and probe ports, Envoy's egress
    assert flags["--exclude-inbound-ports"] == "8080,15021"  # the readiness probe's named port, and the health port
    assert flags["--exclude-outbound-cidrs"] == "10.96.0.0/12" and flags["--ipv6"] == "block"
    for container in (sidecar, envoy):
        ctx = container["securityContext"]
        assert (ctx["runAsUser"], ctx["runAsGroup"], ctx["runAsNonRoot"]) == (1337, 1337, True)
        assert ctx["readOnlyRootFilesystem"] is True and ctx["capabilities"] == {"drop": ["ALL"]}
        assert ctx["allowPrivilegeEscalation"] is False
    assert sidecar["command"][:4] == ["agent-authz", "serve", "--config", layout.CONFIG_FILE]
    assert envoy["command"][:2] == ["agent-authz", "envoy"]
    assert sidecar["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
    assert init["resources"] == {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}
    # the two native sidecars start side by side; the pod's containers wait for both (/proxy/ready)
    assert "startupProbe" not in sidecar and sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 15021}
    assert envoy["startupProbe"]["httpGet"] == {"path": "/proxy/ready", "port": 15021}
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/envoy/ready", "port": 15021}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["agent-authz-workload-api"]["csi"] == {"driver": "csi.spiffe.io", "readOnly": True}
    assert volumes["agent-authz-config"]["configMap"]["name"] == "aa-agent-authz-sidecar"
    assert volumes["agent-authz-signing-key"]["secret"]["secretName"] == "aa-agent-authz-signing-key"
    items = volumes["agent-authz-pod"]["downwardAPI"]["items"]
    assert items == [
        {"path": "task", "fieldRef": {"fieldPath": "metadata.annotations['agent-authz.io/task']"}},
        {"path": "revoked", "fieldRef": {"fieldPath": "metadata.annotations['agent-authz.io/revoked']"}},
    ]
    # the durable state: a disk emptyDir (kept across container restarts) that only the sidecar mounts
    assert volumes["agent-authz-state"] == {"name": "agent-authz-state", "emptyDir": {"sizeLimit": "64Mi"}}
    assert {"name": "agent-authz-state", "mountPath": "/var/lib/agent-authz"} in sidecar["volumeMounts"]
    for container in (init, envoy, *spec["containers"]):
        assert all(m["name"] != "agent-authz-state" for m in container.get("volumeMounts", [])), container["name"]
    assert result["metadata"]["annotations"][layout.ANNOTATION_STATUS] == "injected"
    assert any("8080" in w and "mTLS" in w for w in response["warnings"])


def test_a_jobs_pod_is_injected_before_its_own_init_containers(webhook: Webhook) -> None:
    pod = job_pod()
    review = admission_review(pod, namespace="agents", user=user_info("kube-system/job-controller"))
    response = webhook.review(review)  # the job controller relays the Job's template (judged at the Job)
    result = patched(pod, response)
    validate(result)
    assert _names(result["spec"]["initContainers"]) == [
        "agent-authz-init",
        "agent-authz",
        "agent-authz-envoy",
        "fetch-input",
    ]
    assert result["spec"]["volumes"][0]["name"] == "work"
    assert result["metadata"]["finalizers"] == pod["metadata"]["finalizers"]
    assert result["spec"]["restartPolicy"] == "Never"  # native sidecars do not keep the Job's pod running


def test_an_injected_pod_is_not_patched_twice(webhook: Webhook) -> None:
    pod = agent_pod()
    once = patched(pod, webhook.review(admission_review(pod)))
    again = webhook.review(admission_review(once))
    assert again["allowed"] is True and "patch" not in again


def test_a_pod_faking_the_injected_status_is_refused(webhook: Webhook) -> None:
    injected = patched(agent_pod(), webhook.review(admission_review(agent_pod())))
    fake = copy.deepcopy(injected)
    fake["spec"]["initContainers"][0]["command"] = ["true"]  # an init step that installs nothing
    response = webhook.review(admission_review(fake))
    assert response["allowed"] is False
    assert "differs from what this injector builds" in response["status"]["message"]
    bare = agent_pod(**{layout.ANNOTATION_STATUS: "injected"})
    response = webhook.review(admission_review(bare))
    assert response["allowed"] is False and "agent-authz-init" in response["status"]["message"]


def test_an_opted_out_pod_is_left_alone(webhook: Webhook) -> None:
    response = webhook.review(admission_review(agent_pod(**{layout.ANNOTATION_INJECT: "false"})))
    assert response == {"uid": response["uid"], "allowed": True}
    refused = webhook.review(admission_review(agent_pod(**{layout.ANNOTATION_INJECT: "nope"})))
    assert refused["allowed"] is False and 'expected "true" or "false"' in refused["status"]["message"]


def test_a_pod_without_a_task_is_injected_with_a_warning(webhook: Webhook) -> None:
    pod = agent_pod()
    del pod["metadata"]["annotations"]
    response = webhook.review(admission_review(pod))
    validate(patched(pod, response))
    assert any("no agent-authz.io/task annotation" in w and "no_task" in w for w in response["warnings"])


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({layout.ANNOTATION_TASK: "id: [unclosed"}, "annotation agent-authz.io/task: invalid YAML"),
        ({layout.ANNOTATION_TASK: "just text"}, "holds one task (a mapping) or a grant"),
        ({layout.ANNOTATION_TASK: "id: x\nttl: 1h\n"}, "annotation agent-authz.io/task: purpose: Field required"),
        (
            {
                layout.ANNOTATION_TASK: yaml.safe_dump(
                    {**TASK, "egress": [{"host": "a.b", "methods": ["GET"], "paths": ["/v1/../x"]}]}
                )
            },
            "egress[0].paths: '/v1/../x' is not in canonical form (expected '/x')",
        ),
        (
            {layout.ANNOTATION_TASK: yaml.safe_dump({**TASK, "agent": f"spiffe://{TD}/ns/agents/sa/other"})},
            f"the task is for spiffe://{TD}/ns/agents/sa/other, but this pod's SPIFFE ID is {AGENT}",
        ),
        (
            {
                layout.ANNOTATION_TASK: yaml.safe_dump(
                    {**TASK, "egress": [{**TASK["egress"][1], "credential": "unknown"}]}
                )
            },  # type: ignore[dict-item]
            "egress[0]: name a credential from 'credentials'",
        ),
        ({layout.ANNOTATION_TASK: "a.b.c"}, "not a valid grant: grant_malformed"),
        ({layout.ANNOTATION_REVOKED: "yes"}, 'annotation agent-authz.io/revoked: expected "true" or "false"'),
    ],
)
def test_an_invalid_task_annotation_is_refused(webhook: Webhook, annotations: dict[str, str], message: str) -> None:
    response = webhook.review(admission_review(agent_pod(**annotations)))
    assert response["allowed"] is False and response["status"]["code"] == 403
    assert message in response["status"]["message"], response["status"]["message"]
    assert response["status"]["message"].startswith("agent-authz: ")


def _grant(agent: str = AGENT, *, now: float | None = None, credential: str | None = None) -> str:
    key = load_signing_key(generate_private_key_pem("ES256"), "ES256", file="t", field="k")
    body: dict[str, Any] = {
        "id": "granted",
        "agent": agent,
        "purpose": "p",
        "ttl": "10m",
        "egress": [TASK["egress"][0]],
    }
    if credential:
        body["egress"] = [{**TASK["egress"][1], "credential": credential}]  # type: ignore[dict-item]
    return sign_root_grant(
        TaskSpec.model_validate(body), key.private_key, kid=key.kid, issuer="admin", now=now or time.time()
    )


def test_grant_annotations_are_checked_for_structure(webhook: Webhook) -> None:
    good = webhook.review(admission_review(agent_pod(**{layout.ANNOTATION_TASK: _grant()})))
    assert good["allowed"] is True and good["patchType"] == "JSONPatch"
    cases = {
        _grant(f"spiffe://{TD}/ns/agents/sa/other"): "the grant is for spiffe://test.example/ns/agents/sa/other",
        _grant(now=time.time() - 3600): "the grant expired at",
        _grant(credential="not-configured"): "names credential 'not-configured'",
        "eyJhbGciOiJub25lIn0.eyJ9.x": "not a valid grant",
    }
    for token, message in cases.items():
        response = webhook.review(admission_review(agent_pod(**{layout.ANNOTATION_TASK: token})))
        assert response["allowed"] is False and message in response["status"]["message"], response


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda s: (s.update(securityContext={"runAsUser": 1337}), s["containers"][0].pop("securityContext")),
            "container 'agent' runs as UID 1337, the proxy UID",
        ),
        (lambda s: s["containers"][0]["securityContext"].update(runAsUser=1337), "runs as UID 1337"),
        (lambda s: s["containers"][0]["securityContext"].update(runAsGroup=1337), "runs with GID 1337, the proxy GID"),
        (
            lambda s: s.update(
                initContainers=[{"name": "setup", "image": "x", "securityContext": {"runAsUser": 1337}}]
            ),
            "container 'setup' runs as UID 1337",
        ),
        (lambda s: s.update(hostNetwork=True), "hostNetwork: true"),
        (lambda s: s["containers"][0]["securityContext"].update(privileged=True), "is privileged"),
        (
            lambda s: s["containers"][0]["securityContext"].update(capabilities={"add": ["NET_ADMIN"]}),
            "adds capabilities ['NET_ADMIN']",
        ),
        (
            lambda s: s["containers"].append({"name": "agent-authz", "image": "x"}),
            "names starting with 'agent-authz' are reserved",
        ),
        (lambda s: s.update(shareProcessNamespace=True), "shareProcessNamespace: true"),
        (lambda s: s.update(hostPID=True), "hostPID: true"),
        (
            lambda s: s["containers"][0].update(securityContext={"runAsUser": 0}),
            "runs as root (runAsUser: 0) and keeps CAP_NET_RAW, CAP_SETGID, CAP_SETUID",
        ),
        (
            lambda s: s["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True, capabilities={}),
            "may become root through a setuid binary",
        ),
        (
            lambda s: s["containers"][0]["securityContext"].update(capabilities={"add": ["SYS_PTRACE"]}),
            "adds capabilities ['SYS_PTRACE']",
        ),
        (
            lambda s: s.update(volumes=[{"name": "node", "hostPath": {"path": "/var/lib/kubelet/pods"}}]),
            "is a hostPath (/var/lib/kubelet/pods)",
        ),
        (
            lambda s: s["containers"][0].update(volumeMounts=[{"name": "agent-authz-run", "mountPath": "/x"}]),
            "mounts volume 'agent-authz-run'",
        ),
    ],
)
def test_pods_that_could_bypass_interception_are_refused(webhook: Webhook, mutate: Any, message: str) -> None:
    pod = agent_pod()
    mutate(pod["spec"])
    response = webhook.review(admission_review(pod))
    assert response["allowed"] is False and message in response["status"]["message"], response["status"]


def test_a_namespace_the_chart_did_not_provision_is_refused(webhook: Webhook) -> None:
    pod = agent_pod()
    pod["metadata"]["namespace"] = "elsewhere"
    response = webhook.review(admission_review(pod, namespace="elsewhere"))
    assert response["allowed"] is False
    assert (
        "namespace 'elsewhere'" in response["status"]["message"] and "agentNamespaces" in response["status"]["message"]
    )


def test_annotation_updates_of_an_injected_pod_are_validated(webhook: Webhook) -> None:
    running = patched(agent_pod(), webhook.review(admission_review(agent_pod())))
    revoked = kubectl_annotate(running, f"{layout.ANNOTATION_REVOKED}=true")
    response = webhook.review(admission_review(revoked, operation="UPDATE", old=running))
    assert response["allowed"] is True and "patch" not in response
    typo = kubectl_annotate(running, f"{layout.ANNOTATION_REVOKED}=maybe")
    response = webhook.review(admission_review(typo, operation="UPDATE", old=running))
    assert response["allowed"] is False and layout.ANNOTATION_REVOKED in response["status"]["message"]
    broken = kubectl_annotate(running, f"{layout.ANNOTATION_TASK}=id: [")
    response = webhook.review(admission_review(broken, operation="UPDATE", old=running))
    assert response["allowed"] is False and "invalid YAML" in response["status"]["message"]
    new_task = kubectl_annotate(running, f"{layout.ANNOTATION_TASK}={json.dumps({**TASK, 'id': 'next-task'})}")
    assert webhook.review(admission_review(new_task, operation="UPDATE", old=running))["allowed"] is True
    labels_only = copy.deepcopy(running)
    labels_only["metadata"]["labels"] = {"x": "y"}
    assert webhook.review(admission_review(labels_only, operation="UPDATE", old=running))["allowed"] is True


def _raw(**request: Any) -> bytes:
    review: dict[str, Any] = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}
    review["request"] = request
    return json.dumps(review).encode()


@pytest.mark.parametrize(
    ("body", "content_type", "error"),
    [
        (b"{not json", "application/json", "the body is not JSON"),
        (b"[1, 2]", "application/json", "must be a JSON object"),
        (b'{"apiVersion": "v1", "kind": "Pod"}', "application/json", "expected kind AdmissionReview, got 'Pod'"),
        (
            b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "u"}}',
            "application/json",
            "expected apiVersion admission.k8s.io/v1",
        ),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', "application/json", "no request object"),
        (_raw(kind={"kind": "Pod"}), "application/json", "request.uid must be a non-empty string"),
        (_raw(uid=""), "application/json", "request.uid must be a non-empty string"),
        (b"[" * 100000 + b"]" * 100000, "application/json", "the body is not JSON"),
        (_raw(uid="u"), "text/plain", "expected Content-Type application/json"),
        (b"x" * (4 * 1024 * 1024 + 1), "application/json", "larger than 4194304 bytes"),
    ],
)
def test_malformed_reviews_get_http_400_with_a_message(
    webhook: Webhook, body: bytes, content_type: str, error: str
) -> None:
    status, answer = webhook.post(body, content_type=content_type)
    assert status == 400 and error in answer["error"], answer
    assert webhook.proc.alive()


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        (
            {
                "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
                "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
            },
            "handles v1 Pods and batch/v1 Jobs only, got apps/v1 Deployment",
        ),
        ({"subResource": "status"}, "(subresource status)"),
        ({"object": None}, "malformed pod: the object must be a Pod"),
        ({"object": {"kind": "Pod", "spec": {}}}, "spec.containers is missing or empty"),
        ({"object": {"kind": "Pod", "spec": {"containers": "agent"}}}, "spec.containers must be a list of objects"),
        (
            {"object": {"kind": "Pod", "metadata": {"annotations": {"a": 1}}, "spec": {"containers": [{"name": "a"}]}}},
            "annotation values must be strings",
        ),
        ({"operation": "PATCH"}, "unknown operation 'PATCH'"),
    ],
)
def test_reviews_with_a_uid_are_answered_with_a_clear_denial(
    webhook: Webhook, request_fields: dict[str, Any], message: str
) -> None:
    review = admission_review(agent_pod())
    review["request"].update(request_fields)
    response = webhook.review(review)
    assert response["allowed"] is False and message in response["status"]["message"], response


def test_health_endpoints(webhook: Webhook) -> None:
    import http.client
    import socket

    raw = socket.create_connection(("127.0.0.1", webhook.port), timeout=5)
    conn = http.client.HTTPConnection("x", timeout=5)
    conn.sock = webhook.context.wrap_socket(raw, server_hostname=webhook.installed.server_name)
    conn.request("GET", "/readyz")
    assert conn.getresponse().status == 200
    conn.close()
    with pytest.raises(OSError):  # plain HTTP is not served
        http_get(f"http://127.0.0.1:{webhook.port}/healthz", timeout=2)


def test_webhook_check_cli_passes_against_the_webhook_and_fails_against_the_wrong_ca(
    installed: Installed, tmp_path: Path
) -> None:
    """The helm test's command, against a webhook whose certificate names localhost."""
    ca = DevCA.create("webhook.test")
    cert, key = write_pair(tmp_path, "localhost", *make_leaf(ca, [], dns=["localhost"]))
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(
        ca.ca_cert.public_bytes(
            __import__("cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.PEM
        )
    )
    server = Webhook(installed, tmp_path, cert=cert, key=key)
    server.start()
    try:
        url = f"https://localhost:{server.port}/inject"
        check = [sys.executable, "-m", "sidecar", "webhook-check", "--url", url, "--namespace", "agents"]
        ok = subprocess.run([*check, "--ca-file", str(ca_file)], capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        assert "ok: plain pod: allowed, patch adds agent-authz-init, agent-authz, agent-authz-envoy" in ok.stdout
        assert "ok: invalid task annotation: denied" in ok.stdout
        wrong = subprocess.run(
            [*check, "--ca-file", str(installed.tls_dir / "ca.crt")], capture_output=True, text=True, timeout=30
        )
        assert wrong.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in wrong.stderr
    finally:
        server.stop()


def test_the_webhook_refuses_to_start_with_a_config_that_does_not_fit_the_pod(
    installed: Installed, tmp_path: Path
) -> None:
    settings = tmp_path / "settings"
    settings.mkdir()
    config = yaml.safe_load((installed.settings_dir / "sidecar.yaml").read_text())
    config["issuer"]["signing_key"] = "/elsewhere/key.pem"
    del config["listen"]["health"]
    (settings / "sidecar.yaml").write_text(yaml.safe_dump(config))
    (settings / "injector.yaml").write_text((installed.settings_dir / "injector.yaml").read_text())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "webhook",
            "--settings",
            str(settings / "injector.yaml"),
            "--tls-cert",
            "x",
            "--tls-key",
            "y",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "does not fit the injected pod" in result.stderr
    assert "issuer.signing_key must be /etc/agent-authz/keys/signing.pem" in result.stderr
    assert "listen.health must be set" in result.stderr


def test_grant_expiry_uses_now(webhook: Webhook) -> None:
    """A grant that expires in the future is admitted (the expiry check is against the current time)."""
    soon = _grant(now=time.time() - 590)  # 10 min ttl, 10 s left
    response = webhook.review(admission_review(agent_pod(**{layout.ANNOTATION_TASK: soon})))
    assert response["allowed"] is True


def test_the_install_guide_job_example_is_admitted_and_injected(webhook: Webhook) -> None:
    guide = (Path(__file__).resolve().parents[2] / "docs" / "guides" / "install-in-a-cluster.md").read_text()
    section = guide.split("\n## Give an agent its task\n", 1)[1]
    job = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert job["kind"] == "Job"
    template = job["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {**template["metadata"], "generateName": "q3-report-"}}
    pod["spec"] = template["spec"]
    response = webhook.review(admission_review(pod, namespace=job["metadata"]["namespace"]))
    validate(patched(pod, response))


# -- HTTPS interception (sidecar.intercept.enabled): the trust volume and variables --------------------
INTERCEPT_VALUES = {**VALUES, "sidecar": {**VALUES["sidecar"], "intercept": {"enabled": True, "leafTtl": "30m"}}}


@pytest.fixture(scope="module")
def intercepting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    installed = install(tmp_path_factory.mktemp("chart-intercept"), INTERCEPT_VALUES)
    config = yaml.safe_load((installed.settings_dir / "sidecar.yaml").read_text())
    assert config["intercept"] == {
        "state_dir": layout.INTERCEPT_STATE_DIR,
        "publish_dir": layout.TRUST_DIR,
        "ca_ttl": "24h",
        "leaf_ttl": "30m",
    }
    server = Webhook(installed, tmp_path_factory.mktemp("webhook-intercept"))
    server.start()  # it starts: the chart's intercept section fits the pod layout
    try:
        yield server
    finally:
        server.stop()


def _trust_env() -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in agent_trust_env(layout.TRUST_DIR).items()]


def test_with_intercept_the_pods_containers_trust_the_pod_ca(intercepting: Webhook) -> None:
    pod = job_pod()
    pod["spec"]["containers"][0]["env"] = [{"name": "MODE", "value": "report"}]
    response = intercepting.review(admission_review(pod))
    result = patched(pod, response)
    validate(result)
    spec = result["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["agent-authz-trust"] == {"name": "agent-authz-trust", "emptyDir": {"sizeLimit": "1Mi"}}
    trust_ro = {"name": "agent-authz-trust", "mountPath": "/etc/agent-authz/trust", "readOnly": True}
    _, sidecar, envoy, fetch = spec["initContainers"]
    # the sidecar writes the CA there; Envoy does not need it
    assert {"name": "agent-authz-trust", "mountPath": "/etc/agent-authz/trust"} in sidecar["volumeMounts"]
    assert all(m["name"] != "agent-authz-trust" for m in envoy["volumeMounts"])
    assert {"name": "agent-authz-run", "mountPath": layout.RUN_DIR} in envoy["volumeMounts"]  # the LDS/CDS files
    (report,) = spec["containers"]
    for container, own_mount in ((report, "work"), (fetch, "work")):
        assert container["volumeMounts"] == [{"name": own_mount, "mountPath": "/work"}, trust_ro]
    assert report["env"] == [{"name": "MODE", "value": "report"}, *_trust_env()]
    assert fetch["env"] == _trust_env()
    env = {e["name"]: e["value"] for e in report["env"]}
    assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == "/etc/agent-authz/trust/ca-bundle.pem"
    assert env["NODE_EXTRA_CA_CERTS"] == "/etc/agent-authz/trust/ca.pem"
    again = intercepting.review(admission_review(result))  # idempotent: an injected pod is left as it is
    assert again["allowed"] is True and "patch" not in again


def test_with_intercept_a_containers_own_trust_variable_is_kept_with_a_warning(intercepting: Webhook) -> None:
    pod = agent_pod()
    pod["spec"]["containers"][0]["env"] = [{"name": "SSL_CERT_FILE", "value": "/etc/corp/ca.pem"}]
    response = intercepting.review(admission_review(pod))
    (agent,) = patched(pod, response)["spec"]["containers"]
    assert agent["env"][0] == {"name": "SSL_CERT_FILE", "value": "/etc/corp/ca.pem"}
    assert [e["name"] for e in agent["env"]].count("SSL_CERT_FILE") == 1
    assert any("sets SSL_CERT_FILE: kept" in w for w in response["warnings"])


def test_with_intercept_a_container_mounting_the_trust_directory_is_refused(intercepting: Webhook) -> None:
    pod = agent_pod()
    pod["spec"]["volumes"] = [{"name": "corp-ca", "configMap": {"name": "corp-ca"}}]
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "corp-ca", "mountPath": "/etc/agent-authz/trust/"}]
    response = intercepting.review(admission_review(pod))
    assert response["allowed"] is False
    assert "mounts /etc/agent-authz/trust, where agent-authz puts the pod CA" in response["status"]["message"]


def test_the_webhook_refuses_intercept_paths_outside_the_pod_layout(installed: Installed, tmp_path: Path) -> None:
    settings = tmp_path / "settings"
    settings.mkdir()
    config = yaml.safe_load((installed.settings_dir / "sidecar.yaml").read_text())
    config["intercept"] = {"state_dir": "/var/lib/ca", "publish_dir": "/tmp/trust"}
    (settings / "sidecar.yaml").write_text(yaml.safe_dump(config))
    (settings / "injector.yaml").write_text((installed.settings_dir / "injector.yaml").read_text())
    argv = [sys.executable, "-m", "sidecar", "webhook", "--settings", str(settings / "injector.yaml")]
    result = subprocess.run([*argv, "--tls-cert", "x", "--tls-key", "y"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "intercept.state_dir must be /run/agent-authz/intercept" in result.stderr
    assert "intercept.publish_dir must be /etc/agent-authz/trust" in result.stderr


def test_who_may_declare_a_task_is_judged_from_the_requester(installed: Installed, tmp_path: Path) -> None:
    """AdmissionReviews from a task author (the deploy pipeline's ServiceAccount) and from an
    orchestrator agent's ServiceAccount, for Pods and Jobs, CREATE and UPDATE, over TLS to the webhook
    the chart configured - with the trust bundle and root issuers mounted where the chart mounts them."""
    chain = Chain(DevCA.create(TD))
    trust = tmp_path / "etc"
    chain.ca.save(trust / "ca")
    (trust / "issuers.jwks.json").write_text(json.dumps({"keys": [chain.issuer.public_jwk]}))
    settings_dir = tmp_path / "settings"
    settings_dir.mkdir()
    (settings_dir / "sidecar.yaml").write_text((installed.settings_dir / "sidecar.yaml").read_text())
    settings = yaml.safe_load((installed.settings_dir / "injector.yaml").read_text())
    assert settings["grant_trust"] == {"bundle": "/etc/agent-authz-webhook/trust/bundle.pem"}  # the chart's mount
    assert settings["task_authors"] == {"users": [], "groups": ["system:masters"], "service_accounts": []}
    settings["grant_trust"] = {
        "bundle": str(trust / "ca" / "bundle.pem"),
        "root_issuers": str(trust / "issuers.jwks.json"),
    }
    settings["task_authors"]["service_accounts"] = ["ci/deployer"]
    (settings_dir / "injector.yaml").write_text(yaml.safe_dump(settings))
    (tmp_path / "log").mkdir()
    server = Webhook(dataclasses.replace(installed, settings_dir=settings_dir), tmp_path / "log")
    server.start()
    try:
        pipeline, orchestrator = user_info("ci/deployer"), user_info("agents/orchestrator")
        root = chain.root(root_task("q3", f"spiffe://{TD}/ns/agents/sa/orchestrator"))
        grant = chain.delegate(root, AGENT, "worker")
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "sub", "namespace": "agents"},
            "spec": {"template": {k: v for k, v in agent_pod().items() if k in ("metadata", "spec")}},
        }
        job["spec"]["template"]["spec"]["restartPolicy"] = "Never"
        refused = server.review(admission_review(job, user=orchestrator))
        assert refused["allowed"] is False and refused["status"]["code"] == 403
        assert "an unsigned task is accepted only from a task author" in refused["status"]["message"]
        assert server.review(admission_review(job, user=pipeline))["allowed"] is True
        signed = copy.deepcopy(job)
        signed["spec"]["template"]["metadata"]["annotations"][layout.ANNOTATION_TASK] = grant
        assert server.review(admission_review(signed, user=orchestrator))["allowed"] is True
        # the job controller's pod of that Job is injected; the orchestrator's own pod with a task is not
        created = copy.deepcopy(job_pod())
        created["metadata"]["annotations"][layout.ANNOTATION_TASK] = grant
        response = server.review(admission_review(created, user=user_info("kube-system/job-controller")))
        validate(patched(created, response))
        refused = server.review(admission_review(agent_pod(), user=orchestrator))
        assert refused["allowed"] is False and "task author" in refused["status"]["message"]
        pod = agent_pod(**{layout.ANNOTATION_TASK: grant})
        running = patched(pod, server.review(admission_review(pod, user=orchestrator)))
        # kubectl annotate of the running pod's task: an UPDATE judged by who annotates
        widened = kubectl_annotate(running, f"{layout.ANNOTATION_TASK}={json.dumps(TASK)}")
        refused = server.review(admission_review(widened, operation="UPDATE", old=running, user=orchestrator))
        assert refused["allowed"] is False and "task author" in refused["status"]["message"]
        assert server.review(admission_review(widened, operation="UPDATE", old=running, user=pipeline))["allowed"]
        tampered = grant.rsplit(".", 1)[0] + ".AAAA"
        forged = kubectl_annotate(running, f"{layout.ANNOTATION_TASK}={tampered}")
        refused = server.review(admission_review(forged, operation="UPDATE", old=running, user=orchestrator))
        assert refused["allowed"] is False and "the grant does not verify" in refused["status"]["message"]
    finally:
        server.stop()
    events = [json.loads(line) for line in server.proc.stdout_path.read_text().splitlines() if line.startswith("{")]
    events += [json.loads(line) for line in server.proc.stderr_path.read_text().splitlines() if line.startswith("{")]
    denied = [e for e in events if e.get("event") == "admission" and e.get("allowed") is False]
    assert {e["user"] for e in denied} == {"system:serviceaccount:agents:orchestrator"}
    assert {e["kind"] for e in denied} == {"Job", "Pod"} and all("task" in e["message"] for e in denied)
