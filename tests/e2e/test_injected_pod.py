"""The injected pod spec actually works: the webhook's patched pod, run as the kubelet would.

The chart is rendered (``helm template``), the webhook answers a real AdmissionReview for an agent
pod, the patch is applied (``jsonpatch``), and :class:`sidecar.simulation.kubelet.Kubelet` runs the result: the
``agent-authz-init`` step in the pod's network namespace (root, only NET_ADMIN and NET_RAW), then
the authz sidecar and Envoy as native sidecars (UID 1337, read-only root filesystem) until their
startup probes pass, then the agent's own container (UID 1000). Volumes are laid out as the
kubelet would: the chart's ConfigMap and signing-key Secret, the task annotation through the
downward API, emptyDirs, and the SPIFFE CSI driver's directory holding the SPIRE agent socket -
here a test server speaking the real SPIFFE Workload API and Envoy's SDS (``sidecar/simulation/workload_api.py``),
so both the sidecar and Envoy get the pod's X.509-SVID the way they would from SPIRE.

The agent's traffic then goes through it: an allowed call arrives upstream with a task-scoped
token, a disallowed one gets 403; an inbound mTLS call from another workload is allowed by the
ingress rules; and a changed task annotation (``kubectl annotate``, validated by the webhook as an
UPDATE, written by the "kubelet" with an atomic ``..data`` swap) is enforced without a restart.
Needs root (namespaces, mounts, iptables); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from sidecar.harness import http_get, wait_until
from sidecar.identity.devca import DevCA
from sidecar.inject import layout
from sidecar.simulation.kubelet import Kubelet
from sidecar.simulation.netns import AGENT_UID, POD_IP, PROXY_UID, UPSTREAM_IP, PodNetwork, as_user
from sidecar.simulation.workload_api import WorkloadApiServer, serve_sds
from tests.support.certs import make_leaf, write_pair
from tests.support.k8s import RESTRICTED, find, kubectl_annotate, secret_data, validate
from tests.support.netns_pod import pod_sandbox, start_servers
from tests.support.webhook_env import Webhook, admission_review, install, patched

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="the pod simulation needs root (namespaces, mounts, iptables)"),
]

REPO = Path(__file__).resolve().parents[2]
TD = "test.example"
AGENT = f"spiffe://{TD}/ns/agents/sa/worker"
PLANNER = f"spiffe://{TD}/ns/orchestration/sa/planner"
API = "api.example.com"
SENTIMENT = "sentiment.example.com"
KEYS = (b"sk-first-0f3a9c", b"sk-rotated-7d41e2")
APP_PORT, API_PORT, HOOK_PORT = 8080, 9000, 9090
TASK = {
    "id": "q3-report",
    "purpose": "Quarterly report",
    "on_behalf_of": "user:jane@example.com",
    "ttl": "1h",
    "egress": [
        {"name": "items", "host": API, "methods": ["GET"], "paths": ["/v1/items/*"], "scope": "items:read"},
        {
            "name": "sentiment",
            "host": SENTIMENT,
            "methods": ["POST"],
            "paths": ["/v1/analyze"],
            "token": False,
            "credential": "sentiment",
        },
    ],
}
VALUES = {
    "agentNamespaces": ["agents"],
    "identity": {"trustDomain": TD},
    "sidecar": {
        "issuerUrl": "https://agent-authz.test.example",
        "credentials": {"sentiment": {"secretName": "sentiment-api", "key": "api-key", "header": "x-api-key"}},
        "extraConfig": {
            "envoy": {"destinations": {API: f"{UPSTREAM_IP}:80", SENTIMENT: f"{UPSTREAM_IP}:80"}},
            "ingress": {
                "rules": [
                    {"name": "planner", "callers": [{"id": PLANNER}], "methods": ["GET"], "paths": ["/v1/status"]}
                ]
            },
        },
    },
}


def agent_pod() -> dict[str, Any]:
    """The agent's pod as its author writes it: a plain app (UID 1000) with its task annotation."""
    servers = [
        "python",
        "-m",
        "tests.support.netns_servers",
        "--log",
        "/app-logs/app.log",
        "--ready",
        "/app-logs/ready",
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "agent",
            "namespace": "agents",
            "annotations": {layout.ANNOTATION_TASK: yaml.safe_dump(TASK)},
        },
        "spec": {
            "serviceAccountName": "worker",
            "containers": [
                {
                    "name": "agent",
                    "image": "registry.example/agent:1.0",
                    "command": [
                        *servers,
                        *("--http", f"0.0.0.0:{APP_PORT}", "--http", f"0.0.0.0:{API_PORT}"),
                        *("--http", f"0.0.0.0:{HOOK_PORT}"),
                    ],
                    "workingDir": str(REPO),
                    "ports": [
                        {"name": "http", "containerPort": APP_PORT},
                        {"name": "api", "containerPort": API_PORT},
                        {"name": "hooks", "containerPort": HOOK_PORT},
                    ],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                    "lifecycle": {  # called by the kubelet on the pod IP, without an SVID
                        "postStart": {"httpGet": {"path": "/lifecycle/post-start", "port": "hooks"}},
                        "preStop": {"httpGet": {"path": "/lifecycle/pre-stop", "port": HOOK_PORT}},
                    },
                    "securityContext": {
                        **RESTRICTED,
                        "runAsUser": AGENT_UID,
                        "runAsGroup": AGENT_UID,
                    },
                    "volumeMounts": [{"name": "app-logs", "mountPath": "/app-logs"}],
                }
            ],
            "volumes": [{"name": "app-logs", "emptyDir": {}}],
        },
    }


@dataclass
class RunningPod:
    net: PodNetwork
    kubelet: Kubelet
    webhook: Webhook
    ca: DevCA
    base: Path
    upstream_log: Path
    warnings: list[str]

    def curl(self, url: str, *args: str) -> tuple[int | None, dict[str, str]]:
        """``curl`` as the agent (UID 1000) in the pod: no proxy settings, no token."""
        argv = [*as_user(AGENT_UID), "curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-D", "-", *args, url]
        out = subprocess.run(
            self.net.exec_in(self.net.pod, argv), capture_output=True, text=True, timeout=20, check=False
        ).stdout
        lines = out.splitlines()
        status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else None
        return status, {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:]) if v}

    def call_api(self, path: str) -> tuple[int | None, dict[str, str]]:
        return self.curl(f"http://{API}{path}", "--resolve", f"{API}:80:{UPSTREAM_IP}")

    def call_sentiment(self, marker: str) -> tuple[int | None, dict[str, str]]:
        url = f"http://{SENTIMENT}/v1/analyze"
        return self.curl(url, "--resolve", f"{SENTIMENT}:80:{UPSTREAM_IP}", "-X", "POST", "-d", marker)

    def upstream(self, path: str) -> list[dict[str, Any]]:
        lines = self.upstream_log.read_text().splitlines() if self.upstream_log.exists() else []
        return [e for e in map(json.loads, lines) if e.get("path") == path]

    def decision_file(self) -> list[dict[str, Any]]:
        path = self.kubelet.volumes[layout.VOLUME_LOGS] / "decisions.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def readyz(self) -> dict[str, Any]:
        """The sidecar's admin ``/readyz`` (127.0.0.1 in the pod; ``kubectl port-forward`` in a cluster)."""
        with self.net.inside():
            status, body = http_get("http://127.0.0.1:9902/readyz")
        assert status == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    def jwks(self) -> jwt.PyJWKSet:
        with self.net.inside():
            status, body = http_get("http://127.0.0.1:9902/.well-known/jwks.json")
        assert status == 200
        return jwt.PyJWKSet.from_dict(json.loads(body))


@pytest.fixture(scope="module")
def pod() -> Iterator[RunningPod]:
    with pod_sandbox("aa-pod-", tools=["nsenter", "unshare", "mount"]) as sandbox:
        net, base = sandbox.net, sandbox.base
        installed = install(base / "chart", VALUES)
        webhook = sandbox.keep(Webhook(installed, base / "chart"))
        webhook.start()
        pod_spec = agent_pod()
        response = webhook.review(admission_review(pod_spec))
        admitted = patched(pod_spec, response)
        validate(admitted)

        logs = sandbox.dir("upstream")
        sandbox.keep(start_servers("upstream", logs, net.exec_in(net.upstream, []), "--http", f"{UPSTREAM_IP}:80"))
        csi = sandbox.dir("csi")
        ca = DevCA.create(TD)
        spire = sandbox.keep(WorkloadApiServer(csi / "spire-agent.sock", ca, AGENT))
        serve_sds(spire)
        spire.start()
        (csi / "spire-agent.sock").chmod(0o777)  # as the SPIRE agent's socket: any UID may connect

        objects = [m for m in installed.manifests if m["metadata"].get("namespace") == "agents"]
        config_maps = {m["metadata"]["name"]: m["data"] for m in find(objects, "ConfigMap")}
        secrets = {m["metadata"]["name"]: {k: secret_data(m, k) for k in m["data"]} for m in find(objects, "Secret")}
        secrets["sentiment-api"] = {"api-key": KEYS[0] + b"\n"}  # the operator's: kubectl create secret generic
        path = f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        kubelet = sandbox.keep(
            Kubelet(
                admitted,
                net,
                base / "node",
                config_maps=config_maps,
                secrets=secrets,
                csi={"csi.spiffe.io": csi},
                path=path,
                hide=(base,),
            )
        )
        kubelet.start_pod()
        yield RunningPod(net, kubelet, webhook, ca, base, logs / "upstream.log", response.get("warnings", []))


def test_the_init_step_installed_the_interception_rules(pod: RunningPod) -> None:
    rules = subprocess.run(
        pod.net.exec_in(pod.net.pod, ["iptables-save", "-t", "nat"]), capture_output=True, text=True, timeout=10
    )
    assert "-A AGENT_AUTHZ_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in rules.stdout
    assert f"--uid-owner {PROXY_UID}" in rules.stdout
    assert "--dport 15021 -j RETURN" in rules.stdout and f"--dport {APP_PORT} -j RETURN" in rules.stdout
    assert f"--dport {HOOK_PORT} -j RETURN" in rules.stdout and f"--dport {API_PORT} -j RETURN" not in rules.stdout
    init_log = (pod.kubelet.logs / "agent-authz-init.err").read_text()
    assert (
        "agent-authz iptables: installed (outbound -> 15001, inbound -> 15006, dns -> 15053, proxy uid 1337 gid 1337"
        in init_log
    )
    assert "-A AGENT_AUTHZ_DNS -p udp -j REDIRECT --to-ports 15053" in rules.stdout  # the chart's DNS control


def test_the_kubelets_lifecycle_hooks_reach_the_app_without_an_svid(pod: RunningPod) -> None:
    """The webhook excluded the hook port from inbound interception, as it does for probe ports: the
    kubelet's plain HTTP calls from the node reach the app (through Envoy's mTLS listener they would fail,
    and a failing postStart kills the container), while the app's other ports still need an SVID."""
    assert ("agent", "postStart", True) in pod.kubelet.hooks
    app_log = pod.kubelet.volumes["app-logs"] / "app.log"
    entries = [json.loads(line) for line in app_log.read_text().splitlines()]
    hits = [e for e in entries if e.get("path") == "/lifecycle/post-start"]
    assert hits and hits[0]["listener"] == f"http 0.0.0.0:{HOOK_PORT}" and hits[0]["peer"] == UPSTREAM_IP
    assert "x-agent-authz-caller" not in hits[0]["headers"]  # straight to the app, not through Envoy
    assert any(f"lifecycle hook port(s) {HOOK_PORT} bypass inbound mTLS" in w for w in pod.warnings)
    agent = next(c for c in pod.kubelet.pod["spec"]["containers"] if c["name"] == "agent")
    assert pod.kubelet.hook(agent, "preStop")  # what the kubelet sends before stopping the container
    assert pod.kubelet.hooks[-1] == ("agent", "preStop", True)
    refused = subprocess.run(  # the API port is still intercepted: plain HTTP meets the mTLS listener
        pod.net.exec_in(pod.net.upstream, ["curl", "-s", "--max-time", "5", f"http://{POD_IP}:{API_PORT}/v1/status"]),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert refused.returncode != 0


def test_the_sidecars_run_as_the_proxy_user_on_a_read_only_root(pod: RunningPod) -> None:
    for name in (layout.CONTAINER_SIDECAR, layout.CONTAINER_ENVOY):
        pid = pod.kubelet.container_pid(name)
        status = Path(f"/proc/{pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(PROXY_UID)] * 4
        assert "CapEff:\t0000000000000000" in status
        root = next(line for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines() if line.split()[4] == "/")
        assert " ro," in f" {root.split()[5]}," or root.split()[5].startswith("ro")
    envoy_pid = pod.kubelet.container_pid(layout.CONTAINER_ENVOY)
    assert os.path.basename(os.readlink(f"/proc/{envoy_pid}/exe")) == "envoy"  # agent-authz envoy exec'd Envoy


def test_the_sidecar_has_the_pods_svid_from_the_workload_api(pod: RunningPod) -> None:
    ready = pod.readyz()
    assert ready["identity"]["source"] == "workload_api" and ready["identity"]["spiffe_id"] == AGENT
    assert ready["tasks"] == 1 and ready["decision_log"]["path"] == "/var/log/agent-authz/decisions.log"


def test_the_durable_state_is_the_proxy_users_alone(pod: RunningPod) -> None:
    directory = pod.kubelet.volumes[layout.VOLUME_STATE] / "state"
    database = directory / "state.db"
    for path, mode in ((directory, 0o700), (database, 0o600)):
        info = path.stat()
        assert (info.st_uid, info.st_mode & 0o777) == (PROXY_UID, mode), path
    # the agent's UID cannot read it even where the node keeps the volume (its container does not mount it)
    read = subprocess.run([*as_user(AGENT_UID), "cat", str(database)], capture_output=True, timeout=10)
    assert read.returncode != 0 and b"Permission denied" in read.stderr
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'agent'").fetchone() == (AGENT,)
    db.close()


def test_an_allowed_call_arrives_with_a_task_scoped_token(pod: RunningPod) -> None:
    status, headers = pod.call_api("/v1/items/1")
    assert status == 200, headers
    (received,) = pod.upstream("/v1/items/1")
    token = received["headers"]["authorization"].removeprefix("Bearer ")
    key = pod.jwks()[jwt.get_unverified_header(token)["kid"]]
    claims = jwt.decode(token, key.key, algorithms=["ES256"], audience=f"http://{API}")
    # the chart's authority is the namespace's issuer (sidecar.issuerUrl is for installs without it)
    assert (
        claims["iss"] == "https://aa-agent-authz-authority.agent-authz.svc/ns/agents" and claims["txn"] == "q3-report"
    )
    assert (
        claims["act"] == {"sub": AGENT} and claims["sub"] == "user:jane@example.com" and claims["scope"] == "items:read"
    )
    decision_id = headers["x-agent-authz-decision-id"]
    record = wait_until(
        lambda: next((r for r in pod.decision_file() if r["decision_id"] == decision_id), None),
        timeout=10,
        what="record",
    )
    assert (record["decision"], record["task_id"], record["agent"]) == ("allow", "q3-report", AGENT)
    # the same record on the sidecar's stdout: what `kubectl logs POD -c agent-authz` shows
    stdout = (pod.kubelet.logs / f"{layout.CONTAINER_SIDECAR}.out").read_text().splitlines()
    assert any(json.loads(line)["decision_id"] == decision_id for line in stdout)


def test_a_disallowed_call_gets_403(pod: RunningPod) -> None:
    status, headers = pod.call_api("/v1/admin")
    assert (status, headers["x-agent-authz-reason"]) == (403, "path_not_allowed")
    assert pod.upstream("/v1/admin") == []


def test_an_inbound_call_needs_an_allowed_svid(pod: RunningPod, tmp_path: Path) -> None:
    cert, key = write_pair(tmp_path, "planner", *make_leaf(pod.ca, [PLANNER]))
    base = ["curl", "-sS", "-k", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}"]
    url = f"https://{POD_IP}:{API_PORT}/v1/status"
    allowed = subprocess.run(
        pod.net.exec_in(pod.net.upstream, [*base, "--cert", str(cert), "--key", str(key), url]),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert allowed.stdout == "200", allowed.stderr
    app_log = pod.kubelet.volumes["app-logs"] / "app.log"
    hits = [e for e in map(json.loads, app_log.read_text().splitlines()) if e["path"] == "/v1/status"]
    assert (
        hits
        and hits[-1]["headers"]["x-agent-authz-caller"] == PLANNER
        and hits[-1]["listener"] == f"http 0.0.0.0:{API_PORT}"
    )
    refused = subprocess.run(
        pod.net.exec_in(pod.net.upstream, [*base, url]), capture_output=True, text=True, timeout=20
    )
    assert refused.returncode != 0  # no client certificate: the handshake fails


def test_a_secret_mounted_key_is_injected_and_a_rotation_is_used_without_a_restart(pod: RunningPod) -> None:
    """``sidecar.credentials`` names a Secret: the webhook mounts it into the sidecar container only,
    the sidecar sets it on the paid API's calls, and a rotated Secret (the kubelet's ``..data`` swap)
    is used from the next call on - no restart, and the agent never holds either key."""
    sidecar = pod.kubelet.container(layout.CONTAINER_SIDECAR)
    assert {
        "name": "agent-authz-credential-0",
        "mountPath": "/etc/agent-authz/credentials/sentiment",
        "readOnly": True,
    } in sidecar["volumeMounts"]
    pids = {name: proc.proc.pid for name, proc in pod.kubelet.running.items()}  # type: ignore[union-attr]

    def upstream_key() -> str | None:
        hits = [e for e in pod.upstream("/v1/analyze")]
        return hits[-1]["headers"].get("x-api-key") if hits else None

    status, headers = pod.call_sentiment("first")
    assert status == 200, headers
    assert upstream_key() == KEYS[0].decode()
    assert all(KEYS[0].decode() not in value for value in headers.values())  # nothing of it comes back to the agent
    digest = pod.readyz()["config_digest"]
    pod.kubelet.update_secret("sentiment-api", {"api-key": KEYS[1] + b"\n"})
    wait_until(lambda: pod.readyz()["config_digest"] != digest, timeout=10, what="the sidecar re-read the key")
    status, _ = pod.call_sentiment("second")
    assert status == 200 and upstream_key() == KEYS[1].decode()  # the very next call carries the new key
    assert {name: proc.proc.pid for name, proc in pod.kubelet.running.items()} == pids  # type: ignore[union-attr]
    # the agent's container has neither key: not mounted, not in its environment, not in any file it sees
    probe = (
        "import os, sys\n"
        "keys = [k.encode() for k in sys.argv[1:]]\n"
        "assert not os.path.exists('/etc/agent-authz/credentials'), 'mounted'\n"
        "assert not any(k.decode() in v for k in keys for v in os.environ.values()), 'environment'\n"
        "for root in ('/etc', '/run', '/var', '/tmp', '/app-logs'):\n"
        "    for d, _, files in os.walk(root):\n"
        "        for f in files:\n"
        "            try:\n"
        "                data = open(os.path.join(d, f), 'rb').read(1 << 20)\n"
        "            except OSError:\n"
        "                continue\n"
        "            assert not any(k in data for k in keys), os.path.join(d, f)\n"
        "print('clean')\n"
    )
    for uid in (AGENT_UID, 0):  # the agent's user, and root in its container
        result = pod.kubelet.exec("agent", ["python", "-c", probe, *(k.decode() for k in KEYS)], uid=uid)
        assert result.returncode == 0 and result.stdout.strip() == "clean", result.stderr


def test_a_changed_task_annotation_is_enforced_without_a_restart(pod: RunningPod) -> None:
    pids = {name: proc.proc.pid for name, proc in pod.kubelet.running.items()}  # type: ignore[union-attr]
    running = pod.kubelet.pod
    wider = {
        **TASK,
        "egress": [*TASK["egress"], {"name": "admin", "host": API, "methods": ["GET"], "paths": ["/v1/admin"]}],
    }
    changed = kubectl_annotate(running, f"{layout.ANNOTATION_TASK}={yaml.safe_dump(wider)}")
    assert pod.webhook.review(admission_review(changed, operation="UPDATE", old=running))["allowed"] is True
    pod.kubelet.update_annotations(changed)
    wait_until(lambda: pod.call_api("/v1/admin")[0] == 200, timeout=10, what="the wider task in force")
    assert len(pod.upstream("/v1/admin")) >= 1

    revoked = kubectl_annotate(changed, f"{layout.ANNOTATION_REVOKED}=true")
    assert pod.webhook.review(admission_review(revoked, operation="UPDATE", old=changed))["allowed"] is True
    pod.kubelet.update_annotations(revoked)
    wait_until(
        lambda: pod.call_api("/v1/items/2")[1].get("x-agent-authz-reason") == "task_revoked",
        timeout=10,
        what="revocation",
    )
    status, headers = pod.call_api("/v1/items/after-revocation")
    assert (status, headers["x-agent-authz-reason"]) == (403, "task_revoked")
    assert pod.upstream("/v1/items/after-revocation") == []
    assert {name: proc.proc.pid for name, proc in pod.kubelet.running.items()} == pids  # type: ignore[union-attr]
    assert all(proc.alive() for proc in pod.kubelet.running.values())
    assert pod.readyz()["last_reload_error"] is None
