"""The agent is the adversary: nothing in the injected pod that enforces its task is reachable,
squattable or forgettable by it.

One injected pod for the whole module, built as the pod simulation builds it: the chart rendered
(``helm template``, with ``sidecar.intercept.enabled`` so SDS is served), the webhook's patch for an
agent pod applied, and :class:`sidecar.simulation.kubelet.Kubelet` running the result - the init step's
real iptables rules, the real sidecar and Envoy as the proxy UID, the agent's container and a second
container of the pod ("peer", another UID), each in its own mount and PID namespaces, the node's
directories out of their sight. The agent's container is the most permissive spec the webhook
admits: UID 1000, ``allowPrivilegeEscalation`` left on, and only ``NET_RAW``, ``SETUID`` and
``SETGID`` dropped - so "root in the agent's container" (:meth:`Kubelet.exec` as UID 0) has every
other capability of the runtime's default set.

1. **Census.** Every socket listening in the pod's network namespace (``/proc/net``, not a list)
   must be a row of ``docs/security/socket-census.md``; as the agent's UID and as root in its
   container, each one answers as its row says (refused, not mounted, decided, read-only).
2. **Attacks** of issue 12's "Why", each with its outcome asserted: the agent's own ``Check`` and
   SDS stream; Envoy's admin (``/logging``, ``/quitquitquit``, ``/healthcheck/fail``,
   ``/reset_counters``); root becoming the proxy UID, raw frames, mounts, the proxy's processes;
   the task API (other agents' tasks listed, revoked, delegated); the proxy's ports taken while it
   lives; and, last, the squatting of the authz socket and of every port once the sidecar and then
   Envoy are SIGKILLed under traffic - another container's request, an outside caller and the
   agent's own traffic never reach the squatter, and nothing is allowed.

Needs root (namespaces, mounts, iptables); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.harness import ManagedProcess, unix_http, wait_until
from sidecar.identity.devca import DevCA
from sidecar.inject import layout
from sidecar.simulation.kubelet import Kubelet
from sidecar.simulation.netns import AGENT_UID, POD_IP, PROXY_UID, UPSTREAM_IP, PodNetwork, as_user
from sidecar.simulation.workload_api import WorkloadApiServer, serve_sds
from tests.support.census import OWN_ROW, CensusRow, Listener, census_rows, listeners, socket_owners
from tests.support.k8s import RESTRICTED, find, secret_data, validate
from tests.support.netns_pod import Sandbox, pod_sandbox, start_servers
from tests.support.webhook_env import Webhook, admission_review, install, patched

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="the pod simulation needs root (namespaces, mounts, iptables)"),
]

REPO = Path(__file__).resolve().parents[2]
CENSUS = REPO / "docs" / "security" / "socket-census.md"
TD = "test.example"
AGENT = f"spiffe://{TD}/ns/agents/sa/worker"
OTHER = f"spiffe://{TD}/ns/agents/sa/other"
API = "api.example.com"
APP_PORT, PEER_UID = 8080, 1001
TASK = {
    "id": "q3-report",
    "purpose": "Quarterly report",
    "on_behalf_of": "user:jane@example.com",
    "ttl": "1h",
    "egress": [{"name": "items", "host": API, "methods": ["GET"], "paths": ["/v1/items/*"]}],
}
OTHERS_TASK = {  # another agent's task in the namespace's shared configuration
    "id": "other-agents-task",
    "agent": OTHER,
    "purpose": "someone else's work",
    "on_behalf_of": "user:not-for-your-eyes@example.com",
    "ttl": "1h",
    "egress": [{"host": "payroll.internal", "methods": ["GET"], "paths": ["/*"]}],
}
VALUES = {
    "agentNamespaces": ["agents"],
    "identity": {"trustDomain": TD},
    "sidecar": {
        "issuerUrl": "https://agent-authz.test.example",
        "intercept": {"enabled": True},
        "extraConfig": {"envoy": {"destinations": {API: f"{UPSTREAM_IP}:80"}}, "tasks": [OTHERS_TASK]},
    },
}
AGENT_CONTEXT = {
    "runAsUser": AGENT_UID,
    "runAsGroup": AGENT_UID,
    "capabilities": {"drop": ["NET_RAW", "SETUID", "SETGID"]},
}
"""The most the webhook admits: whatever a root process in this container gets, it cannot use against us."""
DELEGATION = {
    "subject": AGENT,
    "ttl": "5m",
    "egress": [{"host": "payroll.internal", "methods": ["GET"], "paths": ["/x"]}],
}
PROBE = [sys.executable, "-m", "tests.support.boundary_probe"]
SLEEPER = "import signal, sys; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); signal.pause()"


def agent_pod() -> dict[str, Any]:
    app = ["python", "-m", "tests.support.netns_servers", "--log", "/app-logs/app.log", "--ready", "/app-logs/ready"]
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
                    "command": [*app, "--http", f"0.0.0.0:{APP_PORT}"],
                    "workingDir": str(REPO),
                    "ports": [{"name": "http", "containerPort": APP_PORT}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                    "securityContext": AGENT_CONTEXT,
                    "volumeMounts": [{"name": "app-logs", "mountPath": "/app-logs"}],
                },
                {
                    "name": "peer",
                    "image": "registry.example/peer:1.0",
                    "command": ["python", "-c", SLEEPER],
                    "workingDir": str(REPO),
                    "securityContext": {**RESTRICTED, "runAsUser": PEER_UID, "runAsGroup": PEER_UID},
                },
            ],
            "volumes": [{"name": "app-logs", "emptyDir": {}}],
        },
    }


@dataclass
class BoundaryPod:
    net: PodNetwork
    kubelet: Kubelet
    sandbox: Sandbox
    upstream_log: Path

    # -- the agent's side --------------------------------------------------------------------------
    def probe(self, action: str, args: dict[str, Any], *, uid: int | None = None, container: str = "agent") -> Any:
        """``tests.support.boundary_probe`` in ``container`` (as its user, or ``uid``); its JSON answer."""
        result = self.kubelet.exec(container, [*PROBE, action, json.dumps(args)], uid=uid, timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)

    def both(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        """The same probe as the agent's UID and as root in the agent's container."""
        return {"agent": self.probe(action, args), "root": self.probe(action, args, uid=0)}

    def background(self, label: str, action: str, args: dict[str, Any], *, uid: int | None = None) -> ManagedProcess:
        proc = self.kubelet.exec_background("agent", [*PROBE, action, json.dumps(args)], uid=uid, label=label)
        return self.sandbox.keep(proc)

    def outside_the_container(self, action: str, args: dict[str, Any]) -> Any:
        """The probe as the agent's UID on the node's filesystem - where the proxy's paths are visible."""
        argv = [*as_user(AGENT_UID), *PROBE, action, json.dumps(args)]
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)

    # -- what the test sees ------------------------------------------------------------------------
    @property
    def app_logs(self) -> Path:
        return self.kubelet.volumes["app-logs"]

    @property
    def ctl_dir(self) -> Path:
        """The proxy's control-socket directory, as the node sees it."""
        return self.kubelet.volumes[layout.VOLUME_RUN] / "ctl"

    def records(self) -> list[dict[str, Any]]:
        path = self.kubelet.volumes[layout.VOLUME_LOGS] / "decisions.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def upstream(self, path: str) -> list[dict[str, Any]]:
        lines = self.upstream_log.read_text().splitlines() if self.upstream_log.exists() else []
        return [e for e in map(json.loads, lines) if e.get("path") == path]

    def envoy_admin(self, target: str, method: str = "GET") -> tuple[int, bytes]:
        """Envoy's admin over its socket, as the proxy's side (root on the node) reaches it."""
        return unix_http(str(self.ctl_dir / "envoy-admin.sock"), method, target)

    def from_outside(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.net.exec_in(self.net.upstream, argv), capture_output=True, text=True, timeout=30)

    def owners(self, found: list[Listener]) -> dict[str, str]:
        """``listener key -> container`` (by the PID namespace of the process holding it)."""
        namespaces = {os.readlink(f"/proc/{self.kubelet.container_pid(n)}/ns/pid"): n for n in self.kubelet.running}
        pids = socket_owners({s.inode for s in found})
        owners = {}
        for listener in found:
            pid = pids.get(listener.inode)
            namespace = os.readlink(f"/proc/{pid}/ns/pid") if pid is not None else "?"
            owners[listener.key] = namespaces.get(namespace, f"pid {pid}")
        return owners


@pytest.fixture(scope="module")
def pod() -> Iterator[BoundaryPod]:
    with pod_sandbox("aa-boundary-", tools=["nsenter", "unshare", "mount"]) as sandbox:
        net, base = sandbox.net, sandbox.base
        installed = install(base / "chart", VALUES)
        webhook = sandbox.keep(Webhook(installed, base / "chart"))
        webhook.start()
        spec = agent_pod()
        response = webhook.review(admission_review(spec))
        admitted = patched(spec, response)
        validate(admitted)
        assert admitted["spec"]["containers"][0]["securityContext"] == AGENT_CONTEXT  # admitted as written

        logs = sandbox.dir("upstream")
        sandbox.keep(start_servers("upstream", logs, net.exec_in(net.upstream, []), "--http", f"{UPSTREAM_IP}:80"))
        csi = sandbox.dir("csi")
        spire = sandbox.keep(WorkloadApiServer(csi / "spire-agent.sock", DevCA.create(TD), AGENT))
        serve_sds(spire)
        spire.start()
        (csi / "spire-agent.sock").chmod(0o777)  # as the SPIRE agent's socket: any UID may connect

        objects = [m for m in installed.manifests if m["metadata"].get("namespace") == "agents"]
        config_maps = {m["metadata"]["name"]: m["data"] for m in find(objects, "ConfigMap")}
        secrets = {m["metadata"]["name"]: {k: secret_data(m, k) for k in m["data"]} for m in find(objects, "Secret")}
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
        yield BoundaryPod(net, kubelet, sandbox, logs / "upstream.log")


def _targets(listener: Listener) -> list[list[Any]]:
    """How the agent would reach ``listener``: its own address, loopback and the pod IP for a wildcard."""
    if listener.proto == "unix":
        return [["unix", listener.address]]
    host = listener.host
    if host == "0.0.0.0":
        return [["tcp", "127.0.0.1", listener.port], ["tcp", POD_IP, listener.port]]
    if host == "::":
        return [["tcp", "::1", listener.port]]
    return [["tcp", host, listener.port]]


EXPECTED = {"refused": "ECONNREFUSED", "not mounted": "ENOENT", "decided": "connected", "read-only": "connected"}


def _census(pod: BoundaryPod) -> tuple[list[Listener], dict[str, str], dict[str, CensusRow]]:
    found = listeners(pod.net.pod)
    return found, pod.owners(found), census_rows(CENSUS)


# -- 1. the census ------------------------------------------------------------------------------------
def test_every_listening_socket_is_a_row_of_the_census(pod: BoundaryPod) -> None:
    found, owners, rows = _census(pod)
    own = {c["name"] for c in pod.kubelet.pod["spec"]["containers"]}
    unnamed, misplaced = [], []
    for listener in found:
        owner = owners[listener.key]
        row = rows.get(listener.key) or (rows[OWN_ROW] if owner in own else None)
        if row is None:
            unnamed.append(f"{listener.key} (container {owner}, uid {listener.uid})")
        elif row.key != OWN_ROW and row.container != owner:
            misplaced.append(f"{listener.key}: the census says {row.container}, it is {owner}")
    assert not unnamed, f"listening, but not in {CENSUS.name}: {unnamed}"
    assert not misplaced
    # the pod is the one the table describes: every row of the chart's defaults is listening
    defaults = {key for key, row in rows.items() if key != OWN_ROW and "(with " not in row.label}
    listening = {listener.key for listener in found}
    assert defaults <= listening, sorted(defaults - listening)
    assert not any(listener.address.startswith("@") for listener in found)  # no abstract sockets (any netns peer)


def test_each_socket_answers_the_agent_and_root_in_its_container_as_the_census_says(pod: BoundaryPod) -> None:
    found, owners, rows = _census(pod)
    own = {c["name"] for c in pod.kubelet.pod["spec"]["containers"]}
    unnamed = [s.key for s in found if owners[s.key] not in own and s.key not in rows]
    assert not unnamed, f"listening, but not in {CENSUS.name}: {unnamed}"
    checked = [(s, rows[s.key]) for s in found if owners[s.key] not in own]
    targets = [t for s, _ in checked for t in _targets(s)]
    expected = [EXPECTED[row.verdict] for s, row in checked for _ in _targets(s)]
    results = pod.both("connect", {"targets": targets, "timeout": 3})
    for who, outcome in results.items():
        wrong = [(t, e, o) for t, e, o in zip(targets, expected, outcome, strict=True) if e != o]
        assert not wrong, f"as {who}: (target, census, outcome) {wrong}"
    assert {row.verdict for _, row in checked} == set(EXPECTED)  # every kind of row was tried


def test_the_decided_listeners_decide(pod: BoundaryPod) -> None:
    """``egress_http`` (the HTTP_PROXY target) and the redirected ``outbound``: a decision and a record."""
    requests = [
        ["GET", "http://127.0.0.1:15080", f"http://{API}/v1/admin", None, {}],  # as a proxy client
        ["GET", f"http://{UPSTREAM_IP}:80", "/v1/admin", None, {"Host": API}],  # transparent: REDIRECT
    ]
    for who, replies in pod.both("http", {"requests": requests}).items():
        for reply in replies:
            assert reply["status"] == 403 and reply["headers"]["x-agent-authz-reason"] == "path_not_allowed", who
            decision_id = reply["headers"]["x-agent-authz-decision-id"]
            record = wait_until(
                lambda d=decision_id: next((r for r in pod.records() if r["decision_id"] == d), None),
                timeout=10,
                what="record",
            )
            assert (record["decision"], record["agent"], record["path"]) == ("deny", AGENT, "/v1/admin")
    assert pod.upstream("/v1/admin") == []


def test_the_read_only_listeners_hold_no_secret(pod: BoundaryPod) -> None:
    admin, health = "http://127.0.0.1:9902", "http://127.0.0.1:15021"
    gets = ["/.well-known/jwks.json", "/readyz", "/metrics", "/ca.pem", "/decisions/api/records", "/v1/tasks"]
    requests = [["GET", admin, path, None, {}] for path in gets]
    probes = ("/healthz", "/readyz", "/envoy/ready", "/proxy/ready", "/metrics")
    requests += [["GET", health, path, None, {}] for path in probes]
    requests += [["POST", health, "/readyz", "", {}], ["POST", admin, "/readyz", "", {}]]
    replies = pod.probe("http", {"requests": requests})
    by_path = dict(zip([f"{r[0]} :{r[1].rpartition(':')[2]}{r[2]}" for r in requests], replies, strict=True))
    for name, reply in by_path.items():
        assert isinstance(reply, dict), (name, reply)
        assert "PRIVATE KEY" not in reply["body"] and "Bearer " not in reply["body"], name
        assert "not-for-your-eyes" not in reply["body"], name  # nothing of the other agent's task anywhere
    jwks = json.loads(by_path["GET :9902/.well-known/jwks.json"]["body"])
    assert jwks["keys"] and all("d" not in key for key in jwks["keys"])  # public keys only
    assert by_path["GET :9902/ca.pem"]["body"].startswith("-----BEGIN CERTIFICATE-----")
    assert [t["id"] for t in json.loads(by_path["GET :9902/v1/tasks"]["body"])["tasks"]] == ["q3-report"]
    assert "other-agents-task" not in by_path["GET :9902/v1/tasks"]["body"] + by_path["GET :9902/readyz"]["body"]
    for path in ("/healthz", "/readyz", "/envoy/ready", "/proxy/ready"):
        reply = by_path[f"GET :15021{path}"]
        assert reply["status"] == 200 and len(reply["body"]) < 80, reply  # one status word
    assert by_path["GET :15021/metrics"]["status"] == 404
    assert by_path["POST :15021/readyz"]["status"] == by_path["POST :9902/readyz"]["status"] == 405


# -- 2. the attacks -----------------------------------------------------------------------------------
def test_the_agent_cannot_send_its_own_check_or_stream_sds(pod: BoundaryPod) -> None:
    for who, outcome in pod.both("grpc", {"path": layout.AUTHZ_SOCKET}).items():
        assert outcome == {"check": "UNAVAILABLE", "sds": "UNAVAILABLE"}, who  # no such socket in its container
    # where the path is visible (a shared filesystem outside Kubernetes): the directory is the proxy's, 0700
    ctl = pod.ctl_dir
    assert (ctl.stat().st_uid, ctl.stat().st_mode & 0o777) == (PROXY_UID, 0o700)
    assert ((ctl / "authz.sock").stat().st_mode & 0o777) == 0o600
    visible = pod.outside_the_container(
        "connect", {"targets": [["unix", str(ctl / "authz.sock")], ["unix", str(ctl / "envoy-admin.sock")]]}
    )
    assert visible == ["EACCES", "EACCES"]
    assert pod.outside_the_container("grpc", {"path": str(ctl / "authz.sock")}) == {
        "check": "UNAVAILABLE",
        "sds": "UNAVAILABLE",
    }


def test_the_agent_cannot_send_its_own_http_check(pod: BoundaryPod) -> None:
    """The HTTP checks service (Envoy's HTTP ext_authz transport) sits beside authz.sock: the same
    directory, the same 0600, so nobody but the proxy user reaches it."""
    ctl = pod.ctl_dir
    http_sock = ctl / "authz-http.sock"
    assert (http_sock.stat().st_uid, http_sock.stat().st_mode & 0o777) == (PROXY_UID, 0o600)
    assert pod.outside_the_container("connect", {"targets": [["unix", str(http_sock)]]}) == ["EACCES"]
    in_container = pod.both(
        "connect", {"targets": [["unix", str(Path(layout.AUTHZ_SOCKET).parent / "authz-http.sock")]]}
    )
    for who, outcome in in_container.items():
        assert outcome == ["ENOENT"], who  # not mounted in the agent's container


def _counter(pod: BoundaryPod, name: str) -> int:
    stats = json.loads(pod.envoy_admin(f"/stats?filter=^{name}$&format=json")[1])["stats"]
    return int(stats[0]["value"])


def test_the_agent_cannot_reach_envoys_admin(pod: BoundaryPod) -> None:
    paths = ["/reset_counters", "/logging?level=debug", "/healthcheck/fail", "/quitquitquit"]
    requests = [["POST", f"unix:{layout.ENVOY_ADMIN_SOCKET}", p, "", {}] for p in paths]
    requests += [["POST", "http://127.0.0.1:15000", p, "", {}] for p in paths]  # the old TCP admin port
    for who, replies in pod.both("http", {"requests": requests}).items():
        assert replies == ["ENOENT"] * len(paths) + ["ECONNREFUSED"] * len(paths), who
    # Envoy is untouched: still live, ready through the probe port, counters not reset, log level as it was
    assert pod.envoy_admin("/ready")[1].strip() == b"LIVE"
    assert _counter(pod, "listener_manager.listener_added") >= 1  # /reset_counters would have zeroed it
    levels = pod.envoy_admin("/logging", "POST")[1].decode()
    assert "debug" not in {line.rpartition(": ")[2] for line in levels.splitlines()}
    probe = pod.from_outside(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{POD_IP}:15021/envoy/ready"
    )
    assert probe.stdout == "200"


def test_root_in_the_agent_container_cannot_become_the_proxy_or_see_it(pod: BoundaryPod) -> None:
    proxy_pids = [pod.kubelet.container_pid(n) for n in (layout.CONTAINER_SIDECAR, layout.CONTAINER_ENVOY)]
    args = {
        "uid": PROXY_UID,
        "gid": PROXY_UID,
        "pids": proxy_pids,
        "paths": [layout.RUN_DIR, str(pod.sandbox.base), str(pod.kubelet.base), "/spiffe-workload-api"],
    }
    outcome = pod.probe("privileges", args, uid=0)
    assert outcome["whoami"] == [0, 0, 0]
    assert outcome["setuid"] == outcome["setgid"] == outcome["setresuid"] == "EPERM"  # no CAP_SETUID/SETGID
    assert outcome["af_packet"] == outcome["raw_ip"] == "EPERM"  # no CAP_NET_RAW: nothing goes around netfilter
    assert outcome["mount"] == "EPERM"
    assert set(outcome["kill"].values()) == {"ESRCH"}  # the proxy's processes are not in its PID namespace
    assert max(outcome["proc"]) < 100  # it sees its own few processes only
    listed = outcome["listdir"]
    assert listed[layout.RUN_DIR] == listed["/spiffe-workload-api"] == listed[str(pod.kubelet.base)] == "ENOENT"
    assert listed[str(pod.sandbox.base)] == []  # the node's directories are out of sight
    # and the iptables rules stay: NET_ADMIN is not in its set either
    flush = pod.kubelet.exec("agent", ["iptables", "-t", "nat", "-F"], uid=0)
    assert flush.returncode != 0
    rules = subprocess.run(pod.net.exec_in(pod.net.pod, ["iptables-save"]), capture_output=True, text=True, timeout=10)
    assert "AGENT_AUTHZ_REDIRECT" in rules.stdout and "AGENT_AUTHZ_GUARD" in rules.stdout
    # as the agent's UID: no setuid binary can give it what the bounding set lacks
    assert pod.probe("privileges", args)["setuid"] == "EPERM"


def test_the_task_api_shows_and_changes_only_the_local_agents_tasks(pod: BoundaryPod) -> None:
    admin = "http://127.0.0.1:9902"
    requests = [
        ["GET", admin, "/v1/tasks", None, {}],
        ["POST", admin, "/v1/tasks/other-agents-task/revoke", "", {}],
        ["POST", admin, "/v1/tasks/q3-report/revoke", "", {}],  # the pod annotation's: its operator revokes it
        ["POST", admin, "/v1/tasks/other-agents-task/delegate", json.dumps(DELEGATION), {}],
        ["POST", admin, "/v1/tasks/q3-report/delegate", "[" * 50_000 + "]" * 50_000, {}],
    ]
    listed, revoke_other, revoke_own, delegate_other, deep = pod.probe("http", {"requests": requests})
    body = json.loads(listed["body"])
    assert (body["agent"], [t["id"] for t in body["tasks"]]) == (AGENT, ["q3-report"])
    for reply in (revoke_other, revoke_own, delegate_other):
        answer = json.loads(reply["body"])
        assert (reply["status"], answer["error"]) == (403, "not_authorized"), answer
        record = next(r for r in pod.records() if r["decision_id"] == answer["decision_id"])
        assert (record["direction"], record["reason"], record["agent"]) == ("local", "not_authorized", AGENT)
    assert (deep["status"], json.loads(deep["body"])["error"]) == (400, "bad_request")
    # naming the other agent's task on a call: denied, and its record (the viewer's) says nothing of it
    headers = {"Host": API, "x-agent-task": "other-agents-task"}
    (named,) = pod.probe("http", {"requests": [["GET", f"http://{UPSTREAM_IP}:80", "/v1/items/2", None, headers]]})
    assert (named["status"], named["headers"]["x-agent-authz-reason"]) == (403, "task_not_for_agent")
    decision_id = named["headers"]["x-agent-authz-decision-id"]
    (viewed,) = pod.probe("http", {"requests": [["GET", admin, f"/decisions/api/records/{decision_id}", None, {}]]})
    assert viewed["status"] == 200 and "not-for-your-eyes" not in viewed["body"], viewed
    # nothing was revoked: the agent's task still allows, the other agent's was never touched
    allowed = pod.probe("http", {"requests": [["GET", f"http://{UPSTREAM_IP}:80", "/v1/items/1", None, {"Host": API}]]})
    assert allowed[0]["status"] == 200


def test_the_agent_cannot_freeze_unfreeze_kill_or_approve(pod: BoundaryPod) -> None:
    """The control API is on the admin port the agent reaches; every body must be signed by a key the
    agent does not hold (tests/e2e/test_continuous.py also tries self-signed and replayed ones)."""
    admin = "http://127.0.0.1:9902"
    requests = [
        ["POST", admin, "/v1/control/actions", "unfreeze subtree:q3-report", {}],
        ["POST", admin, "/v1/control/actions", "e30.e30.e30", {}],  # a JWS shape with no signature
        ["POST", admin, "/v1/approvals/0123456789abcdef", "e30.e30.e30", {}],
        ["POST", admin, "/decisions/api/approvals/0123456789abcdef", "{}", {}],
        ["POST", admin, "/decisions/api/approvals/0123456789abcdef", "{}", {"Authorization": "Bearer e30.e30.e30"}],
        ["GET", admin, "/v1/control/actions", None, {}],
    ]
    *refused, listing = pod.probe("http", {"requests": requests})
    assert [(r["status"], json.loads(r["body"])["error"]) for r in refused] == [
        (400, "control_malformed"),
        (400, "control_malformed"),
        (400, "control_malformed"),
        (403, "control_not_authorized"),
        (400, "control_malformed"),
    ], refused
    assert json.loads(listing["body"]) == {"targets": [], "blocked": []}  # nothing changed
    records = [r for r in pod.records() if r["direction"] == "control"]
    # the probe sends its requests concurrently: the records are the five refusals, in any order
    assert sorted(r["reason"] for r in records[-5:]) == ["bad_request"] * 4 + ["not_authorized"]
    assert sorted(r["path"] for r in records[-5:]) == sorted(target for _, _, target, _, _ in requests[:5])
    allowed = pod.probe("http", {"requests": [["GET", f"http://{UPSTREAM_IP}:80", "/v1/items/1", None, {"Host": API}]]})
    assert allowed[0]["status"] == 200


def _ready(path: Path) -> Any:
    """The JSON a background probe writes once it is set up (waits for it)."""
    return json.loads(wait_until(lambda: path.exists() and path.read_text(), timeout=20, what=path.name))


def test_the_agent_cannot_take_the_proxys_ports_while_it_lives(pod: BoundaryPod) -> None:
    log = "/app-logs/early-squat.log"
    addresses = [["0.0.0.0", 15001], ["127.0.0.1", 15001], ["0.0.0.0", 15006], ["127.0.0.1", 15080]]
    addresses += [["127.0.0.1", 9902], ["0.0.0.0", 15021]]
    for uid, label in ((None, "squat-agent"), (0, "squat-root")):
        proc = pod.kubelet.exec_background(
            "agent",
            [*PROBE, "bind", json.dumps({"addresses": addresses, "log": f"{log}.{label}"})],
            uid=uid,
            label=label,
        )
        try:
            outcome = _ready(pod.app_logs / f"early-squat.log.{label}.ready")
        finally:
            proc.stop()
        assert set(outcome.values()) == {"EADDRINUSE"}, (label, outcome)  # SO_REUSEPORT needs the same UID


def test_squatting_after_the_proxy_dies_reaches_nobody_and_allows_nothing(pod: BoundaryPod) -> None:
    """Last in the module: it SIGKILLs the sidecar, then Envoy, under the agent's traffic."""
    traffic = pod.app_logs / "traffic.log"
    pod.background(
        "traffic",
        "traffic",
        {
            "url": f"http://{UPSTREAM_IP}/v1/items/traffic",
            "host": API,
            "log": "/app-logs/traffic.log",
            "interval": 0.05,
        },
    )

    def outcomes() -> list[dict[str, Any]]:
        return [json.loads(line) for line in traffic.read_text().splitlines()] if traffic.exists() else []

    wait_until(lambda: any(o.get("status") == 200 for o in outcomes()), timeout=20, what="allowed traffic")

    # -- the sidecar dies: Envoy fails closed; its socket and ports give a squatter nothing ---------------
    os.kill(pod.kubelet.container_pid(layout.CONTAINER_SIDECAR), signal.SIGKILL)
    mark = wait_until(
        lambda: next((i for i, o in enumerate(outcomes()) if o.get("status") == 503), None),
        timeout=20,
        what="503 once the sidecar is gone",
    )
    reached = len(pod.upstream("/v1/items/traffic"))
    # root in the agent's container serves an "authz" at the socket's path - in its own filesystem, the only one
    # it can write: Envoy's path is in Envoy's mount namespace
    fake_args = {"path": layout.AUTHZ_SOCKET, "log": "/app-logs/fake-authz.log"}
    fake = pod.background("fake-authz", "unix_server", fake_args, uid=0)
    assert _ready(pod.app_logs / "fake-authz.log.ready") == "listening"
    # and where the path is visible, it cannot even create a name in the proxy's directory
    visible = pod.outside_the_container("connect", {"targets": [["unix", str(pod.ctl_dir / "authz.sock")]]})
    assert visible == ["EACCES"]
    squat = pod.background(
        "squat-sidecar",
        "bind",
        {"addresses": [["127.0.0.1", 9902], ["0.0.0.0", 15021]], "log": "/app-logs/squat-sidecar.log"},
    )
    assert _ready(pod.app_logs / "squat-sidecar.log.ready") == {
        "127.0.0.1:9902": "listening",
        "0.0.0.0:15021": "listening",
    }
    kubelet_probe = pod.from_outside("curl", "-s", "--max-time", "3", f"http://{POD_IP}:15021/readyz")
    peer = pod.probe("connect", {"targets": [["tcp", "127.0.0.1", 9902]], "timeout": 3}, container="peer")
    assert kubelet_probe.returncode == 28 and peer == ["timeout"]  # the SYN-ACK of a non-proxy socket never leaves
    wait_until(lambda: len(outcomes()) > mark + 20, timeout=20, what="more traffic")
    after_sidecar = outcomes()[mark:]
    assert after_sidecar and all(o.get("status") != 200 for o in after_sidecar), after_sidecar[:5]
    assert len(pod.upstream("/v1/items/traffic")) == reached  # nothing allowed without the sidecar
    assert not (pod.app_logs / "fake-authz.log").exists() and not (pod.app_logs / "squat-sidecar.log").exists()
    fake.stop()
    squat.stop()

    # -- Envoy dies: the agent takes the outbound, inbound and egress ports; nothing reaches it ---------
    os.kill(pod.kubelet.container_pid(layout.CONTAINER_ENVOY), signal.SIGKILL)
    mark = len(outcomes())
    ports = [["0.0.0.0", 15001], ["0.0.0.0", 15006], ["127.0.0.1", 15080]]
    pod.background("squat-envoy", "bind", {"addresses": ports, "log": "/app-logs/squat-envoy.log"})
    outcome = _ready(pod.app_logs / "squat-envoy.log.ready")
    assert set(outcome.values()) == {"listening"}, outcome
    curl = ["curl", "-s", "-o", "/dev/null", "--max-time", "3"]
    other_container = pod.kubelet.exec("peer", [*curl, "-H", f"Host: {API}", f"http://{UPSTREAM_IP}/v1/items/peer"])
    other_proxied = pod.kubelet.exec("peer", [*curl, "-x", "http://127.0.0.1:15080", f"http://{API}/v1/items/peer"])
    outside = pod.from_outside(*curl, "-k", f"https://{POD_IP}:9000/v1/status")  # redirected to the inbound port
    assert (other_container.returncode, other_proxied.returncode, outside.returncode) == (28, 28, 28)
    wait_until(lambda: len(outcomes()) > mark + 5, timeout=30, what="more traffic")
    after_envoy = outcomes()[mark:]
    assert all("error" in o for o in after_envoy), after_envoy[:5]  # the agent's own traffic: no answer at all
    assert not (pod.app_logs / "squat-envoy.log").exists()  # the squatter accepted nothing
    assert len(pod.upstream("/v1/items/traffic")) == reached and pod.upstream("/v1/items/peer") == []
