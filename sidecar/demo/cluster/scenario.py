"""``agent-authz demo --scenario cluster``: the quarterly-report workflow across the pods of a simulated cluster.

Everything the chart installs runs, rendered by ``helm template`` (:mod:`sidecar.simulation.chart`),
on one machine (root: network namespaces, mounts, iptables):

* a node network namespace with a bridge (:class:`~sidecar.simulation.netns.ClusterNetwork`); each
  Service has its address on it, each pod its own network namespace with a veth into it;
* the Kubernetes API server double (:mod:`sidecar.simulation.kube_api`, HTTPS at
  ``kubernetes.default.svc``) with the RBAC the docs give the orchestrator, calling the chart's
  real admission webhook (``agent-authz webhook``) for pods and Jobs and running the job controller;
* two authority replicas (``agent-authz authority``) with the chart's Role, ConfigMaps, config and
  serving certificate: the issuer upstreams verify and the revocation feed;
* the orchestrator pod and three sub-agent pods, run by the pod simulation
  (:class:`~sidecar.simulation.kubelet.Kubelet`): the injected init step's iptables rules, Envoy and
  the sidecar as native sidecars (the proxy UID), and the agent's own container
  (:mod:`sidecar.demo.cluster.agent`, UID 1000), each pod with its SVID from a SPIFFE Workload API
  (:mod:`sidecar.simulation.workload_api`);
* the internal APIs behind a stock Envoy that verifies the minted tokens with ``jwt_authn``
  against the authority's JWKS (:mod:`sidecar.simulation.jwt_upstream`), and the paid sentiment API,
  whose key is a Kubernetes Secret only the sidecar container mounts.

The scenario plays the model (it tells each agent what to do next through its work queue); every
call, grant, Job and revocation goes through the real components. There is no cluster DNS:
``hostAliases`` in each pod spec name the Services (the orchestrator's pod uses one authority
replica, the sub-agents the other, so a revocation crosses replicas through the API double).

It acts out the workflow, revokes one sub-agent mid-way, cuts the feed to one pod (its delegated
task is then denied ``revocation_feed_stale``, and works again when the feed is back), revokes the
root task with ``agent-authz task revoke --authority``, prints the measured propagation time to each
pod (the first deny after the revocation, measured in the pod), and exits 0 only if every outcome
matches.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidecar.config.schema import TaskSpec
from sidecar.demo.common import GREEN, RED, color, write_secret
from sidecar.demo.upstream import ApiKeyCheck, SampleUpstream
from sidecar.demo.world import World, print_steps
from sidecar.grants.issue import sign_root_grant
from sidecar.harness import AuthorityProcess, EnvoyProcess, ManagedProcess, wait_until
from sidecar.identity.devca import DevCA
from sidecar.inject import layout
from sidecar.simulation.chart import ChartError, find, helm_template, secret_data
from sidecar.simulation.jwt_upstream import jwt_authn_bootstrap
from sidecar.simulation.kube_api import SERVICE_ACCOUNT_MOUNT, AdmissionWebhook, KubeApiDouble, Subject, rules_from_role
from sidecar.simulation.kubelet import REPO, Kubelet
from sidecar.simulation.netns import AGENT_UID, CLUSTER_PREFIX, ClusterNetwork, PodLink, enter_netns, missing_tools
from sidecar.simulation.webhook import Webhook, lay_out
from sidecar.simulation.workload_api import WorkloadApiServer, serve_sds
from sidecar.tokens.keys import generate_private_key_pem, load_signing_key

__all__ = ["ORCHESTRATOR_ROLE", "run_cluster"]

TD = "cluster.demo.local"
RELEASE, RELEASE_NS, NS = "aa", "agent-authz", "agents"
AUTHORITY = f"{RELEASE}-agent-authz-authority"
AUTHORITY_HOST = f"{AUTHORITY}.{RELEASE_NS}.svc"
ISSUER = f"https://{AUTHORITY_HOST}/ns/{NS}"
KUBE_HOST = "kubernetes.default.svc"
USER = "user:jane.doe@example.com"
ROOT_ID = "q3-risk-report"
SUB_AGENTS = ("market-data", "sales-data", "filings")
INTERNAL = {
    "market-data.internal": "https://market-data.internal",
    "sales.internal": "https://sales.internal",
    "filings.internal": "https://filings.internal",
}
SENTIMENT = "sentiment.example.com"
MAX_STALENESS = 3.0
"""``sidecar.revocationFeed.maxStaleness`` here (the chart's default is 30 s): the demo waits it out."""

# the Services' addresses on the node's bridge
ADDRESS = {
    "kube": f"{CLUSTER_PREFIX}.2",
    "webhook": f"{CLUSTER_PREFIX}.3",
    "authority-0": f"{CLUSTER_PREFIX}.4",
    "authority-1": f"{CLUSTER_PREFIX}.5",
    "internal": f"{CLUSTER_PREFIX}.20",
    "sentiment": f"{CLUSTER_PREFIX}.21",
}

ORCHESTRATOR_ROLE: dict[str, Any] = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "Role",
    "metadata": {"name": "orchestrator", "namespace": NS},
    "rules": [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get"]}],
}
"""The orchestrator's Role (``docs/guides/sub-agents.md``): create and read its Jobs, nothing more."""

ROOT_TASK: dict[str, Any] = {
    "id": ROOT_ID,
    "agent": f"spiffe://{TD}/ns/{NS}/sa/orchestrator",
    "on_behalf_of": USER,
    "purpose": "Generate the Q3 quarterly risk assessment report",
    "ttl": "30m",
    "max_calls": 200,
    "egress": [
        {
            "name": "market-data",
            "host": "market-data.internal",
            "methods": ["GET"],
            "paths": ["/v1/tables/*"],
            "audience": INTERNAL["market-data.internal"],
            "scope": "tables:read",
        },
        {
            "name": "sales",
            "host": "sales.internal",
            "methods": ["GET"],
            "paths": ["/v1/sales/*"],
            "audience": INTERNAL["sales.internal"],
            "scope": "sales:read",
        },
        {
            "name": "filings",
            "host": "filings.internal",
            "methods": ["GET"],
            "paths": ["/v1/filings/*"],
            "audience": INTERNAL["filings.internal"],
            "scope": "filings:read",
        },
        {
            "name": "sentiment",
            "host": SENTIMENT,
            "methods": ["POST"],
            "paths": ["/v1/analyze"],
            "token": False,
            "credential": "sentiment",
            "max_calls": 4,
        },
    ],
}
DELEGATIONS: dict[str, dict[str, Any]] = {
    "market-data": {
        "ttl": "10m",
        "max_calls": 40,
        "purpose": "Pull Q3 price tables",
        "egress": [{"host": "market-data.internal", "methods": ["GET"], "paths": ["/v1/tables/prices_q3/*"]}],
    },
    "sales-data": {
        "ttl": "10m",
        "max_calls": 40,
        "purpose": "Pull Q3 sales figures",
        "egress": [{"host": "sales.internal", "methods": ["GET"], "paths": ["/v1/sales/q3/*"]}],
    },
    "filings": {
        "ttl": "10m",
        "max_calls": 40,
        "purpose": "Read competitor filings, score sentiment",
        "egress": [
            {"host": "filings.internal", "methods": ["GET"], "paths": ["/v1/filings/*"]},
            {
                "host": SENTIMENT,
                "methods": ["POST"],
                "paths": ["/v1/analyze"],
                "credential": "sentiment",
                "max_calls": 2,
            },
        ],
    },
}
PROBE_URL = {
    "orchestrator": "http://market-data.internal/v1/admin/users",
    "market-data": "http://market-data.internal/v1/tables/customers/rows",
    "sales-data": "http://sales.internal/v1/sales/q2/summary",
    "filings": "http://filings.internal/v2/filings",
}
"""What each pod's probe calls: a path outside its task (``path_not_allowed`` while the task holds), so
probing spends none of the task's call budget; a revocation turns the answer into ``task_revoked``,
a stale feed into ``revocation_feed_stale``."""


def spiffe_id(service_account: str) -> str:
    """The SPIFFE ID of a ServiceAccount of the agent namespace (SPIRE's default template)."""
    return f"spiffe://{TD}/ns/{NS}/sa/{service_account}"


def values(root_issuers_jwks: str) -> dict[str, Any]:
    """The chart values of the demo's install."""
    destinations = {host: f"{ADDRESS['internal']}:80" for host in INTERNAL}
    destinations[SENTIMENT] = f"{ADDRESS['sentiment']}:80"
    return {
        "agentNamespaces": [NS],
        "identity": {"trustDomain": TD},
        # the agents' own calls to the API server are not the sidecar's to judge (the chart's advice)
        "interception": {"excludeOutboundCIDRs": [f"{ADDRESS['kube']}/32"]},
        "injection": {"taskAuthors": {"serviceAccounts": ["ci/deployer"]}},
        "sidecar": {
            "rootIssuers": root_issuers_jwks,
            "revocationFeed": {"maxStaleness": f"{MAX_STALENESS:g}s"},
            "credentials": {"sentiment": {"secretName": "sentiment-api", "key": "api-key", "header": "x-api-key"}},
            "extraConfig": {"envoy": {"destinations": destinations}},
        },
    }


def host_aliases(replica: int) -> list[dict[str, Any]]:
    """``hostAliases`` of a pod (no cluster DNS here): the Services, the authority by one replica."""
    internal = list(INTERNAL)
    return [
        {"ip": ADDRESS["kube"], "hostnames": [KUBE_HOST]},
        {"ip": ADDRESS[f"authority-{replica}"], "hostnames": [AUTHORITY_HOST]},
        {"ip": ADDRESS["internal"], "hostnames": internal},
        {"ip": ADDRESS["sentiment"], "hostnames": [SENTIMENT]},
    ]


def agent_spec(service_account: str, replica: int, annotation: str) -> dict[str, Any]:
    """An agent pod's ``metadata`` and ``spec`` as its author writes them (the agent's container only)."""
    return {
        "metadata": {"labels": {"app": service_account}, "annotations": {layout.ANNOTATION_TASK: annotation}},
        "spec": {
            "serviceAccountName": service_account,
            "hostAliases": host_aliases(replica),
            "containers": [
                {
                    "name": "agent",
                    "image": "registry.example/agent:1.0",
                    "command": ["python", "-m", "sidecar.demo.cluster.agent", "--work", "/work"],
                    "workingDir": str(REPO),
                    "securityContext": {
                        "runAsUser": AGENT_UID,
                        "runAsGroup": AGENT_UID,
                        "runAsNonRoot": True,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [{"name": "work", "mountPath": "/work"}],
                }
            ],
            "volumes": [{"name": "work", "emptyDir": {}}],
        },
    }


def job(name: str, grant: str) -> dict[str, Any]:
    """A sub-agent's Job as the orchestrator writes it: the child grant as its pod's task."""
    template = agent_spec(name, 1, grant)
    template["spec"]["restartPolicy"] = "Never"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"backoffLimit": 0, "template": template},
    }


@dataclass
class RunningPod:
    """An agent pod the kubelet runs, and its agent's work queue."""

    name: str
    kubelet: Kubelet
    link: PodLink
    spire: WorkloadApiServer
    sent: int = 0

    @property
    def work(self) -> Path:
        """The ``work`` emptyDir as the node holds it."""
        return self.kubelet.volumes["work"]

    def send(self, command: dict[str, Any]) -> int:
        """Queue ``command``; returns its number."""
        self.sent += 1
        number = self.sent
        tmp = self.work / "in" / f".{number:04d}.json"
        tmp.write_text(json.dumps(command))
        tmp.chmod(0o644)
        tmp.replace(self.work / "in" / f"{number:04d}.json")
        return number

    def result(self, number: int, timeout: float = 30) -> Any:
        """The answer to command ``number``.

        Raises:
            RuntimeError: the agent reported an error.
        """
        path = self.work / "out" / f"{number:04d}.json"
        answer = wait_until(
            lambda: json.loads(path.read_text()) if path.exists() else None,
            timeout=timeout,
            what=f"{self.name}'s agent, command {number}",
            interval=0.01,
        )
        if not answer.get("ok", True):
            raise RuntimeError(f"{self.name}'s agent: {answer['error']}")
        return answer.get("result")

    def do(self, command: dict[str, Any], timeout: float = 30) -> Any:
        """Send ``command`` and wait for its answer."""
        return self.result(self.send(command), timeout)


@dataclass
class Cluster:
    """What the demo started (stopped in reverse order)."""

    base: Path
    net: ClusterNetwork
    ca: DevCA
    kube: KubeApiDouble
    manifests: list[dict[str, Any]] = field(default_factory=list)
    processes: list[ManagedProcess] = field(default_factory=list)
    pods: dict[str, RunningPod] = field(default_factory=dict)
    spires: list[WorkloadApiServer] = field(default_factory=list)
    upstreams: list[SampleUpstream] = field(default_factory=list)
    webhook: Webhook | None = None
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)
    secrets: dict[str, dict[str, bytes]] = field(default_factory=dict)
    authority_ca: Path | None = None
    env_path: str = ""

    def stop(self) -> None:
        """Stop the pods, then the node's processes, the API double; never raises."""
        for pod in reversed(list(self.pods.values())):
            with contextlib.suppress(Exception):
                pod.kubelet.stop()
        for spire in self.spires:
            with contextlib.suppress(Exception):
                spire.stop()
        for proc in reversed(self.processes):
            with contextlib.suppress(Exception):
                proc.stop()
        if self.webhook is not None:
            with contextlib.suppress(Exception):
                self.webhook.stop()
        for upstream in self.upstreams:
            with contextlib.suppress(Exception):
                upstream.stop()
        with contextlib.suppress(Exception):
            self.kube.stop()


def _authority_config(cluster: Cluster, index: int, issuer_jwks: Path) -> Path:
    """Replica ``index``'s ``authority.yaml``: the chart's, with the node's files and addresses."""
    (config_map,) = find(cluster.manifests, "ConfigMap", "-authority-config")
    config = yaml.safe_load(config_map["data"]["authority.yaml"])
    (secret,) = find(cluster.manifests, "Secret", "-authority-tls")
    tls = cluster.base / "authority-tls"
    tls.mkdir(exist_ok=True)
    for key in ("tls.crt", "tls.key", "ca.crt"):
        write_secret(tls / key, secret_data(secret, key))
    address = ADDRESS[f"authority-{index}"]
    config["listen"] = {"public": f"{address}:443", "feed": f"{address}:8444"}
    config["tls"] = {"cert": str(tls / "tls.crt"), "key": str(tls / "tls.key")}
    config["trust"]["bundles"] = {TD: str(cluster.base / "ca" / "bundle.pem")}
    config["kubernetes"].update(
        api_server=f"https://{KUBE_HOST}",
        token_file=str(cluster.base / "authority-sa-token"),
        ca_file=str(cluster.kube.ca_file),
        namespace=RELEASE_NS,
    )
    config["grants"] = {"root_issuers": [{"jwks": str(issuer_jwks)}]}
    config["feed"] = {"heartbeat": 0.5}
    config["decision_log"] = {"path": str(cluster.base / f"authority-{index}.records.log"), "stdout": False}
    path = cluster.base / f"authority-{index}.yaml"
    path.write_text(yaml.safe_dump(config))
    cluster.authority_ca = tls / "ca.crt"
    return path


def _start_node(cluster: Cluster, issuer_jwks: Path) -> None:
    """The API double, the webhook, the authority replicas and the upstream APIs, in the node."""
    net, base = cluster.net, cluster.base
    node_prefix = ["ip", "netns", "exec", net.node]
    for address in ADDRESS.values():
        net.add_address(address)
    net.write_hosts({KUBE_HOST: ADDRESS["kube"], AUTHORITY_HOST: ADDRESS["authority-1"]})
    manifests = cluster.manifests
    # the API server
    (role,) = find(manifests, "Role", "-authority")
    authority_token = "authority-" + os.urandom(12).hex()
    cluster.kube.subjects[authority_token] = Subject(
        f"system:serviceaccount:{RELEASE_NS}:{AUTHORITY}", {RELEASE_NS: rules_from_role(role)}
    )
    write_secret(base / "authority-sa-token", authority_token.encode())
    for config_map in find(manifests, "ConfigMap"):
        if config_map["metadata"]["name"].endswith(("-revocations", "-keys")):
            cluster.kube.seed(copy.deepcopy(config_map))
    cluster.kube.bind(NS, "orchestrator", rules_from_role(ORCHESTRATOR_ROLE))
    pipeline_rules = rules_from_role({"rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]}]})
    cluster.kube.service_account_token("ci", "deployer")
    cluster.kube.bind("ci", "deployer", pipeline_rules)
    cluster.kube.subjects[cluster.kube.service_account_token("ci", "deployer")].rules = {NS: pipeline_rules}
    # the webhook (its trust bundle: the trust domain's CA; the root issuers: the chart's value)
    installed = lay_out(base / "webhook", manifests, RELEASE_NS)
    settings = yaml.safe_load((installed.settings_dir / "injector.yaml").read_text())
    settings["grant_trust"]["bundle"] = str(base / "ca" / "bundle.pem")
    (installed.settings_dir / "injector.yaml").write_text(yaml.safe_dump(settings))
    cluster.webhook = Webhook(installed, base / "webhook", listen=f"{ADDRESS['webhook']}:8443", prefix=node_prefix)
    cluster.webhook.start()
    (configuration,) = find(manifests, "MutatingWebhookConfiguration")
    webhook_ca = base / "webhook" / "ca-bundle.pem"
    webhook_ca.write_bytes(installed.ca_pem)
    cluster.kube.webhooks = [
        AdmissionWebhook.from_configuration(
            configuration,
            url=f"https://{ADDRESS['webhook']}:8443/inject",
            ca_file=webhook_ca,
            namespaces=frozenset({NS}),
        )
    ]
    with enter_netns(net.node):
        cluster.kube.start(ADDRESS["kube"], 443)
    # the authority replicas
    replicas = []
    for index in (0, 1):
        config = _authority_config(cluster, index, issuer_jwks)
        replica = AuthorityProcess(
            config,
            ca_file=base / "authority-tls" / "ca.crt",
            log_dir=base,
            name=f"authority-{index}",
            env={**os.environ, "HOSTNAME": f"{AUTHORITY}-{index}"},
            prefix=node_prefix,
        )
        cluster.processes.append(replica)
        replica.start()
        replicas.append(replica)
    with enter_netns(net.node):
        for replica in replicas:
            replica.wait_ready(timeout=30, server_name=AUTHORITY_HOST)


def _start_upstreams(cluster: Cluster, api_key: str) -> tuple[SampleUpstream, SampleUpstream]:
    """The internal APIs (behind a stock Envoy with ``jwt_authn``) and the paid sentiment API."""
    net, base = cluster.net, cluster.base
    internal = SampleUpstream({})
    sentiment = SampleUpstream({SENTIMENT: ApiKeyCheck("x-api-key", api_key)})
    cluster.upstreams += [internal, sentiment]
    with enter_netns(net.node):
        port = internal.start(host="127.0.0.1")
        sentiment.start(host=ADDRESS["sentiment"], port=80)
    assert cluster.authority_ca is not None
    bootstrap = jwt_authn_bootstrap(
        issuer=ISSUER,
        audience="",
        jwks_host=AUTHORITY_HOST,
        jwks_address=ADDRESS["authority-0"],
        jwks_port=443,
        ca_file=cluster.authority_ca,
        listen=(ADDRESS["internal"], 80),
        upstream=("127.0.0.1", port),
        hosts=INTERNAL,
    )
    path = base / "internal-apis-envoy.json"
    path.write_text(json.dumps(bootstrap))
    envoy = EnvoyProcess(path, log_dir=base, name="internal-apis-envoy", prefix=["ip", "netns", "exec", net.node])
    cluster.processes.append(envoy)
    envoy.start()
    with enter_netns(net.node):
        envoy.wait_ready(timeout=30)
    return internal, sentiment


def _run_pod(cluster: Cluster, pod: dict[str, Any], name: str) -> RunningPod:
    """Run an admitted pod as the kubelet would, with its SVID from a Workload API of its own."""
    service_account = pod["spec"]["serviceAccountName"]
    csi = cluster.base / "csi" / name
    csi.mkdir(parents=True)
    csi.chmod(0o755)
    spire = WorkloadApiServer(csi / "spire-agent.sock", cluster.ca, spiffe_id(service_account))
    serve_sds(spire)
    spire.start()
    cluster.spires.append(spire)
    (csi / "spire-agent.sock").chmod(0o777)  # as the SPIRE agent's socket: any UID may connect
    link = cluster.net.add_pod()
    kubelet = Kubelet(
        pod,
        link,
        cluster.base / "pods" / name,
        config_maps=cluster.config_maps,
        secrets=cluster.secrets,
        csi={"csi.spiffe.io": csi},
        path=cluster.env_path,
        hide=(cluster.base,),
        service_account_token=cluster.kube.service_account_token(NS, service_account),
    )
    running = RunningPod(name, kubelet, link, spire)
    cluster.pods[name] = running
    kubelet.start_pod(timeout=60)
    wait_until((running.work / "ready").exists, timeout=30, what=f"{name}'s agent")
    return running


def _job_pod(cluster: Cluster, name: str) -> dict[str, Any] | None:
    for pod in cluster.kube.objects("", "pods", NS):
        if pod["metadata"].get("labels", {}).get("job-name") == name:
            return pod
    return None


def _call_outcome(result: dict[str, Any]) -> str:
    reason = result["reason"] or ("allowed" if result["status"] == 200 else f"upstream {result['body'][:60]}")
    return f"{result['status']} {reason}"


def _calls(world: World, phase: str, pod: RunningPod, calls: list[tuple[str, str, str, str]]) -> list[dict[str, Any]]:
    """Have ``pod``'s agent make ``calls`` = [(method, url, expected "status reason", note)]."""
    body = '{"text": "ACME beats Q3 estimates"}'
    results: list[dict[str, Any]] = pod.do(
        {
            "op": "calls",
            "calls": [{"method": m, "url": u, "body": body if m == "POST" else None} for m, u, _, _ in calls],
        }
    )
    for (method, url, expected, note), result in zip(calls, results, strict=True):
        world.record(
            phase, pod.name, f"{method} {url.removeprefix('http://')}  ({note})", expected, _call_outcome(result)
        )
    return results


def _propagation(pods: list[RunningPod], act: Any, until: str, timeout: float = 10) -> dict[str, float]:
    """Start a probe in each pod (its agent calls :data:`PROBE_URL` until the reason is ``until``),
    then ``act()``; returns each pod's seconds from the act to its first such answer (``inf``: none).

    The act starts just before ``act()`` is called, unless ``act()`` returns the POSIX time it took
    effect (the authority's record of accepting a revocation, say)."""
    numbers = {}
    for pod in pods:
        numbers[pod.name] = pod.send(
            {
                "op": "probe",
                "url": PROBE_URL[pod.name],
                "until": until,
                "timeout": timeout,
                "started": f"/work/out/probe-{pod.sent + 1}.started",
            }
        )
    for pod in pods:
        marker = pod.work / "out" / f"probe-{numbers[pod.name]}.started"
        wait_until(marker.exists, timeout=15, what=f"{pod.name}'s probe")
    started = time.time()
    effective = act()
    if isinstance(effective, float):
        started = effective
    out: dict[str, float] = {}
    for pod in pods:
        result = pod.result(numbers[pod.name], timeout=timeout + 15)
        out[pod.name] = float("inf") if result["first"] is None else result["first"] - started
    return out


def _revoke_root(cluster: Cluster, issuer_key: Path) -> subprocess.CompletedProcess[str]:
    """``agent-authz task revoke ROOT --key ... --authority https://<Service>`` from the node (the
    operator's shell, where the Service name resolves to one replica)."""
    assert cluster.authority_ca is not None
    argv = [
        *("ip", "netns", "exec", cluster.net.node),
        *(sys.executable, "-m", "sidecar", "task", "revoke", ROOT_ID),
        *("--key", str(issuer_key), "--authority", f"https://{AUTHORITY_HOST}", "--ca", str(cluster.authority_ca)),
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def _untokened(cluster: Cluster) -> int:
    """A call to the internal APIs' Envoy from the node, without a token: ``jwt_authn`` refuses it."""
    import http.client

    with enter_netns(cluster.net.node):
        conn = http.client.HTTPConnection(ADDRESS["internal"], 80, timeout=10)
        try:
            conn.request("GET", "/v1/tables/prices_q3/rows", headers={"Host": "market-data.internal"})
            return int(conn.getresponse().status)
        finally:
            conn.close()


def _accepted_at(cluster: Cluster, task_id: str) -> float | None:
    """When an authority replica recorded accepting a revocation of ``task_id`` (POSIX seconds)."""
    times = []
    for index in (0, 1):
        path = cluster.base / f"authority-{index}.records.log"
        for line in path.read_text().splitlines() if path.exists() else []:
            record = json.loads(line)
            if (
                record.get("kind") == "revocation"
                and record.get("task_id") == task_id
                and record.get("outcome") == "accepted"
            ):
                times.append(float(record["time"]))
    return min(times) if times else None


def _ms(seconds: float) -> str:
    return "never" if seconds == float("inf") else f"{seconds * 1000:.0f} ms"


def check_environment() -> str | None:
    """Why the cluster scenario cannot run here (``None``: it can)."""
    if os.geteuid() != 0:
        return "the cluster scenario needs root (network namespaces, mounts, iptables): run it with sudo"
    missing = missing_tools() + [t for t in ("nsenter", "unshare", "mount") if shutil.which(t) is None]
    if missing:
        return f"the cluster scenario needs {', '.join(missing)} (.ci/run installs them)"
    return None


@contextlib.contextmanager
def _cluster(base: Path) -> Iterator[Cluster]:
    net = ClusterNetwork()
    net.create()
    cluster: Cluster | None = None
    try:
        ca = DevCA.create(TD)
        ca.save(base / "ca")
        kube_dir = base / "kube"
        kube_dir.mkdir()
        cluster = Cluster(base, net, ca, KubeApiDouble(kube_dir, bookmark_interval=2.0))
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        net.close()


def run_cluster(*, state_dir: Path | None = None) -> int:
    """Run the cluster scenario; 0 when every outcome matches, 1 otherwise, 2 when it cannot run here.

    Args:
        state_dir: keep every file (configs, logs, volumes) here, and ``outcomes.json`` (each
            step, the problems, the propagation figures in seconds); a temporary directory under
            ``/tmp`` (removed afterwards) when ``None``. Keep its path short: it holds Unix sockets.
    """
    why = check_environment()
    if why is not None:
        print(f"agent-authz demo --scenario cluster: {why}", file=sys.stderr)
        return 2
    began = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="aa-cluster-", dir="/tmp")) if state_dir is None else state_dir.absolute()
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    world = World(base)
    figures: dict[str, dict[str, float]] = {}
    code = 0
    try:
        with _cluster(base) as cluster:
            code = _scenario(cluster, world, figures)
    except ChartError as exc:
        print(f"agent-authz demo --scenario cluster: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a component failed: reported with the steps so far, never a pass
        world.problems.append(f"the scenario stopped: {type(exc).__name__}: {exc}")
        code = 1
    finally:
        if state_dir is None:
            shutil.rmtree(base, ignore_errors=True)
        else:  # for a test or a dashboard: every step and figure
            outcome = {
                "steps": [dataclasses.asdict(step) for step in world.steps],
                "problems": world.problems,
                "figures": {
                    what: {p: (None if t == float("inf") else t) for p, t in v.items()} for what, v in figures.items()
                },
            }
            (base / "outcomes.json").write_text(json.dumps(outcome, indent=1))
    print_steps(world)
    print("\nRevocation propagation (first deny in each pod after the revocation, measured in the pod):")
    for what, per_pod in figures.items():
        print(f"  {what}: " + ", ".join(f"{name} {_ms(seconds)}" for name, seconds in per_pod.items()))
    print(f"\nfigures {json.dumps({k: {p: round(s, 4) for p, s in v.items()} for k, v in figures.items()})}")
    elapsed = time.monotonic() - began
    if world.problems or code:
        print(color(f"\n{len(world.problems)} outcome(s) did not match ({elapsed:.1f}s):", RED))
        for problem in world.problems:
            print(f"  - {problem}")
        return 1
    print(color(f"\nAll {len(world.steps)} outcomes match ({elapsed:.1f}s).", GREEN))
    return 0


def _scenario(cluster: Cluster, world: World, figures: dict[str, dict[str, float]]) -> int:
    base = cluster.base
    issuer_pem = generate_private_key_pem()
    write_secret(base / "issuer" / "issuer.key", issuer_pem)
    issuer = load_signing_key(issuer_pem, "ES256", file="issuer.key", field="")
    issuer_jwks = base / "issuer" / "issuer.jwks.json"
    issuer_jwks.write_text(json.dumps({"keys": [issuer.public_jwk]}))
    api_key = "sk-demo-" + os.urandom(8).hex()
    cluster.manifests = helm_template(values=values(issuer_jwks.read_text()), namespace=RELEASE_NS, release=RELEASE)
    objects = [m for m in cluster.manifests if m["metadata"].get("namespace") == NS]
    cluster.config_maps = {m["metadata"]["name"]: m["data"] for m in find(objects, "ConfigMap")}
    cluster.config_maps["kube-root-ca.crt"] = {"ca.crt": cluster.kube.ca_file.read_text()}
    cluster.secrets = {
        m["metadata"]["name"]: {k: secret_data(m, k) for k in m["data"]} for m in find(objects, "Secret")
    }
    cluster.secrets["sentiment-api"] = {"api-key": api_key.encode() + b"\n"}  # kubectl create secret generic
    cluster.env_path = f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    print(f"agent-authz demo --scenario cluster: task {ROOT_ID!r} on behalf of {USER}")
    _start_node(cluster, issuer_jwks)
    internal, sentiment = _start_upstreams(cluster, api_key)
    print(f"  node {cluster.net.node}: API server double {ADDRESS['kube']}, webhook {ADDRESS['webhook']},")
    print(f"  authority replicas {ADDRESS['authority-0']} and {ADDRESS['authority-1']} ({AUTHORITY_HOST}),")
    print(f"  internal APIs behind jwt_authn {ADDRESS['internal']}, paid API {ADDRESS['sentiment']}")

    phase = "1. The deploy pipeline starts the orchestrator (its task: a root grant)"
    root = sign_root_grant(
        TaskSpec.model_validate(ROOT_TASK), issuer.private_key, kid=issuer.kid, issuer="demo-admin", now=time.time()
    )
    spec = agent_spec("orchestrator", 0, root)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "orchestrator", "namespace": NS, **spec["metadata"]}}
    pod["spec"] = spec["spec"]
    pipeline = cluster.kube.service_account_token("ci", "deployer")
    status, created = _api(cluster, "POST", f"/api/v1/namespaces/{NS}/pods", pod, token=pipeline)
    world.record(
        phase, "pipeline", "create pod orchestrator (admitted and injected)", "201 injected", _admitted(status, created)
    )
    if status != 201:
        return 1
    orchestrator = _run_pod(cluster, created, "orchestrator")
    seen = orchestrator.do(
        {"op": "look", "paths": [f"{SERVICE_ACCOUNT_MOUNT}/token", "/etc/agent-authz/keys/signing.pem"]}
    )
    world.record(
        phase,
        "orchestrator",
        "its agent runs as UID 1000 with its ServiceAccount token, no signing key",
        "1000 readable absent",
        f"{seen['uid']} " + " ".join(seen["paths"].values()),
    )

    phase = "2. The orchestrator delegates and creates one Job per sub-agent (through the API server)"
    for name in SUB_AGENTS:
        answer = orchestrator.do(
            {
                "op": "task_api",
                "method": "POST",
                "path": f"/v1/tasks/{ROOT_ID}/delegate",
                "body": {"name": name, "subject": spiffe_id(name), **DELEGATIONS[name]},
            }
        )
        world.record(phase, "orchestrator", f"delegate {ROOT_ID}/{name}", "201", str(answer["status"]))
        grant = json.loads(answer["body"]).get("grant", "") if answer["status"] == 201 else ""
        reply = orchestrator.do(
            {"op": "kube", "method": "POST", "path": f"/apis/batch/v1/namespaces/{NS}/jobs", "body": job(name, grant)}
        )
        world.record(phase, "orchestrator", f"create Job {name} with the child grant", "201", str(reply["status"]))
    wide = yaml.safe_dump(
        {
            "id": "anything",
            "purpose": "x",
            "ttl": "1h",
            "egress": [{"host": "*.internal", "methods": ["GET"], "paths": ["/*"]}],
        }
    )
    reply = orchestrator.do(
        {"op": "kube", "method": "POST", "path": f"/apis/batch/v1/namespaces/{NS}/jobs", "body": job("wide", wide)}
    )
    refused = (
        "403 not a task author"
        if reply["status"] == 403 and "only from a task author" in json.dumps(reply["body"])
        else f"{reply['status']}"
    )
    world.record(
        phase, "orchestrator", "create a Job with an unsigned task of its own", "403 not a task author", refused
    )
    reply = orchestrator.do({"op": "kube", "method": "GET", "path": f"/api/v1/namespaces/{NS}/secrets/sentiment-api"})
    world.record(phase, "orchestrator", "read the sentiment API key's Secret", "403", str(reply["status"]))
    pods = {
        name: wait_until(functools.partial(_job_pod, cluster, name), timeout=20, what=f"{name}'s pod")
        for name in SUB_AGENTS
    }
    failures: list[BaseException] = []

    def start(name: str) -> None:
        try:
            _run_pod(cluster, pods[name], name)
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=start, args=(name,)) for name in SUB_AGENTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if failures:
        raise failures[0]
    for name in SUB_AGENTS:
        injected = pods[name]["metadata"]["annotations"].get(layout.ANNOTATION_STATUS)
        world.record(phase, name, "the job controller's pod, injected, running", "injected", str(injected))

    phase = "3. The sub-agents work, each through its own Envoy and sidecar"
    market, sales, filings = (cluster.pods[n] for n in SUB_AGENTS)
    _calls(world, phase, market, [
        ("GET", "http://market-data.internal/v1/tables/prices_q3/rows?limit=100", "200 allowed", "jwt_authn ok"),
        ("GET", "http://market-data.internal/v1/tables/customers/rows", "403 path_not_allowed", "another table"),
        ("GET", "http://sales.internal/v1/sales/q3/summary", "403 host_not_allowed", "not its data"),
    ])  # fmt: skip
    _calls(world, phase, sales, [("GET", "http://sales.internal/v1/sales/q3/summary", "200 allowed", "Q3 sales")])
    _calls(world, phase, filings, [
        ("GET", "http://filings.internal/v1/filings/GLOBEX/10-Q", "200 allowed", "competitor filing"),
        ("POST", f"http://{SENTIMENT}/v1/analyze", "200 allowed", "paid API, key injected"),
    ])  # fmt: skip
    received = [r for r in internal.requests() if r.host == "market-data.internal"]
    issuers = {_claims(r.headers.get("authorization", "")).get("iss") for r in received}
    world.record(phase, "market-data", "the token the API got: iss", ISSUER, ",".join(sorted(map(str, issuers))))
    world.record(
        phase, "node", "GET market-data.internal without a token (around the sidecar)", "401", str(_untokened(cluster))
    )
    keys = {r.headers.get("x-api-key") == api_key for r in sentiment.requests()}
    world.record(
        phase, "filings", "the paid API got the Secret's key", "injected", "injected" if keys == {True} else "MISSING"
    )
    seen = filings.do(
        {"op": "look", "paths": ["/etc/agent-authz/credentials/sentiment/api-key", "/etc/agent-authz/keys/signing.pem"]}
    )
    world.record(
        phase,
        "filings",
        "the agent's container sees the key or the signing key",
        "absent absent",
        " ".join(seen["paths"].values()),
    )

    phase = "4. Mid-way, the orchestrator revokes the sales sub-agent (its local task API)"
    answers: list[Any] = []
    child = _propagation(
        [sales],
        lambda: answers.append(
            orchestrator.do({"op": "task_api", "method": "POST", "path": f"/v1/tasks/{ROOT_ID}/sales-data/revoke"})
        ),
        "task_revoked",
    )
    figures["sub-agent revoke"] = child
    world.record(
        phase, "orchestrator", f"revoke {ROOT_ID}/sales-data", "200", str(answers[0]["status"]) if answers else "none"
    )
    for name, seconds in child.items():
        world.record(
            phase,
            name,
            f"first deny {_ms(seconds)} after the revoke (another replica)",
            "under 1 s",
            "under 1 s" if seconds < 1 else _ms(seconds),
        )
    _calls(
        world,
        phase,
        market,
        [("GET", "http://market-data.internal/v1/tables/prices_q3/rows", "200 allowed", "the others keep working")],
    )

    phase = f"5. The feed to market-data's pod is cut: its delegated task fails closed after {MAX_STALENESS:g} s"
    authority_1 = ADDRESS["authority-1"]
    stale = _propagation(
        [market],
        lambda: cluster.net.partition(market.link.pod_ip, authority_1, 8444, cut=True),
        "revocation_feed_stale",
        timeout=MAX_STALENESS + 15,
    )["market-data"]
    figures["stale after the cut"] = {"market-data": stale}
    # staleness counts from the last event received (a heartbeat every 0.5 s), not from the cut
    window = MAX_STALENESS - 1.0 <= stale <= MAX_STALENESS + 5.0
    expected = f"{MAX_STALENESS - 1:g}-{MAX_STALENESS + 5:g} s"
    world.record(
        phase,
        "market-data",
        f"denied revocation_feed_stale {_ms(stale)} after the cut",
        expected,
        expected if window else _ms(stale),
    )
    _calls(
        world,
        phase,
        filings,
        [("GET", "http://filings.internal/v1/filings/GLOBEX/10-K", "200 allowed", "a pod with its feed")],
    )
    back = _propagation(
        [market],
        lambda: cluster.net.partition(market.link.pod_ip, authority_1, 8444, cut=False),
        "path_not_allowed",
        timeout=30,
    )["market-data"]
    figures["feed reconnect"] = {"market-data": back}
    world.record(
        phase,
        "market-data",
        f"the feed is back: judged again after {_ms(back)}",
        "reconnected",
        "reconnected" if back != float("inf") else "never",
    )
    _calls(
        world,
        phase,
        market,
        [("GET", "http://market-data.internal/v1/tables/prices_q3/rows", "200 allowed", "its task works again")],
    )

    phase = "6. Done: the admin revokes the root task at the authority (agent-authz task revoke --authority)"
    results: list[subprocess.CompletedProcess[str]] = []

    def revoke_root() -> float | None:
        results.append(_revoke_root(cluster, base / "issuer" / "issuer.key"))
        return _accepted_at(cluster, ROOT_ID)

    targets = [orchestrator, market, filings]
    root_times = _propagation(targets, revoke_root, "task_revoked")
    figures["root revoke"] = root_times
    world.record(
        phase,
        "admin",
        f"task revoke {ROOT_ID} --authority",
        "exit 0",
        f"exit {results[0].returncode}" if results else "none",
    )
    if results and results[0].returncode:
        world.problems.append(f"agent-authz task revoke: {results[0].stderr.strip()}")
    for name, seconds in root_times.items():
        world.record(
            phase,
            name,
            f"first deny {_ms(seconds)} after the authority accepted it",
            "under 1 s",
            "under 1 s" if seconds < 1 else _ms(seconds),
        )
    reply = orchestrator.do(
        {
            "op": "task_api",
            "method": "POST",
            "path": f"/v1/tasks/{ROOT_ID}/delegate",
            "body": {"name": "late", "subject": spiffe_id("market-data"), **DELEGATIONS["market-data"]},
        }
    )
    world.record(
        phase,
        "orchestrator",
        "delegate again under the revoked task",
        "refused",
        "refused" if reply["status"] >= 400 else str(reply["status"]),
    )

    phase = "7. The sub-agents exit; the job controller completes their Jobs"
    for name in SUB_AGENTS:
        cluster.pods[name].send({"op": "exit", "code": 0})
    for name in SUB_AGENTS:
        kubelet = cluster.pods[name].kubelet
        codes = wait_until(kubelet.exited, timeout=20, what=f"{name}'s containers")
        cluster.kube.set_pod_phase(
            NS, pods[name]["metadata"]["name"], "Succeeded" if codes.get("agent") == 0 else "Failed"
        )
        reply = orchestrator.do({"op": "kube", "method": "GET", "path": f"/apis/batch/v1/namespaces/{NS}/jobs/{name}"})
        succeeded = reply["body"].get("status", {}).get("succeeded") if reply["status"] == 200 else None
        world.record(phase, "orchestrator", f"GET Job {name}: succeeded", "1", str(succeeded))
    return 0


def _admitted(status: int, created: Any) -> str:
    if status != 201:
        return f"{status} {created.get('message', '') if isinstance(created, dict) else created}"[:80]
    return f"201 {created['metadata'].get('annotations', {}).get(layout.ANNOTATION_STATUS)}"


def _claims(authorization: str) -> dict[str, Any]:
    """The (already verified by ``jwt_authn``) claims of a forwarded bearer token."""
    import jwt

    token = authorization.removeprefix("Bearer ")
    try:
        return dict(jwt.decode(token, options={"verify_signature": False}))
    except jwt.InvalidTokenError:
        return {}


def _api(cluster: Cluster, method: str, path: str, body: Any, *, token: str) -> tuple[int, Any]:
    """A request to the API double from the node (the deploy pipeline's ``kubectl``): by address,
    its certificate verified for ``kubernetes.default.svc``."""
    import http.client
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(cluster.kube.ca_file))
    with enter_netns(cluster.net.node):
        raw = socket.create_connection((ADDRESS["kube"], 443), timeout=30)
    conn = http.client.HTTPConnection(KUBE_HOST, 443, timeout=30)
    conn.sock = context.wrap_socket(raw, server_hostname=KUBE_HOST)
    try:
        conn.request(
            method,
            path,
            body=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        reply = conn.getresponse()
        return int(reply.status), json.loads(reply.read() or b"null")
    finally:
        conn.close()
