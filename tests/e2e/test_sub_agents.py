"""Sub-agent Jobs through the Kubernetes API: the orchestrator's ServiceAccount creates them, the API
server calls the real webhook (for the Job, then for the pod the job controller creates), and only
what the rules of ``sidecar/inject/authors.py`` allow is admitted.

No API server runs here: ``sidecar/simulation/kube_api.py`` is a double speaking the REST protocol
over HTTPS, and it does what the API server does on a write of a pod or a Job - the ServiceAccount
admission plugin's token volume, then every matching webhook of the chart's
``MutatingWebhookConfiguration`` called with an ``admission.k8s.io/v1`` AdmissionReview over TLS
(verified for the webhook Service's name), the JSON Patch applied, a denial returned as the API
server words it - and it runs the job controller (a Job's pod created as
``system:serviceaccount:kube-system:job-controller``). The orchestrator's rights are the Role of
``docs/guides/sub-agents.md``, and nothing more.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.harness import wait_until
from sidecar.identity.devca import DevCA
from sidecar.inject import layout
from sidecar.simulation.kube_api import SERVICE_ACCOUNT_MOUNT, AdmissionWebhook, KubeApiDouble, rules_from_role
from tests.support.authority_env import https_json
from tests.support.grant_chain import Chain, root_task
from tests.support.k8s import find, validate
from tests.support.webhook_env import Webhook, install
from tests.support.webhook_pods import TD, VALUES, agent_pod

pytestmark = pytest.mark.e2e

ORCH = f"spiffe://{TD}/ns/agents/sa/orchestrator"
WORKER = f"spiffe://{TD}/ns/agents/sa/worker"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "guides" / "sub-agents.md"


def orchestrator_role() -> dict[str, Any]:
    """The Role the guide gives the orchestrator's ServiceAccount (the YAML block under its heading)."""
    blocks = [b.split("```")[0] for b in DOCS.read_text().split("```yaml\n")[1:]]
    (block,) = [b for b in blocks if b.startswith("# the orchestrator's Role")]
    docs = [d for d in yaml.safe_load_all(block) if d]
    (role,) = [d for d in docs if d["kind"] == "Role"]
    return role


@dataclasses.dataclass
class Cluster:
    kube: KubeApiDouble
    webhook: Webhook
    chain: Chain
    token: str

    def api(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> tuple[int, Any]:
        status, answer, _ = https_json(
            self.kube.url + path,
            ca_file=self.kube.ca_file,
            method=method,
            body=body,
            headers={"Authorization": f"Bearer {token or self.token}"},
        )
        return status, answer


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("sub-agents")
    values = copy.deepcopy(VALUES)
    values["injection"] = {"taskAuthors": {"serviceAccounts": ["ci/deployer"]}}
    installed = install(base / "chart", values)
    chain = Chain(DevCA.create(TD))
    chain.ca.save(base / "trust")
    (base / "trust" / "issuers.jwks.json").write_text(json.dumps({"keys": [chain.issuer.public_jwk]}))
    settings = yaml.safe_load((installed.settings_dir / "injector.yaml").read_text())
    settings["grant_trust"] = {
        "bundle": str(base / "trust" / "bundle.pem"),
        "root_issuers": str(base / "trust" / "issuers.jwks.json"),
    }
    (installed.settings_dir / "injector.yaml").write_text(yaml.safe_dump(settings))
    (base / "webhook").mkdir()
    (base / "kube").mkdir()
    rules = rules_from_role(orchestrator_role())
    webhook = Webhook(installed, base / "webhook")
    kube = KubeApiDouble(base / "kube")
    webhook.start()
    try:
        (configuration,) = find(installed.manifests, "MutatingWebhookConfiguration")
        ca = base / "webhook-ca.pem"
        ca.write_bytes(installed.ca_pem)
        kube.webhooks = [
            AdmissionWebhook.from_configuration(
                configuration,
                url=f"https://127.0.0.1:{webhook.port}/inject",
                ca_file=ca,
                namespaces=frozenset({"agents"}),
            )
        ]
        kube.bind("agents", "orchestrator", rules)
        kube.start()
        yield Cluster(kube, webhook, chain, kube.service_account_token("agents", "orchestrator"))
    finally:
        kube.stop()
        webhook.stop()


def job(task: str, name: str = "market-data") -> dict[str, Any]:
    pod = agent_pod(**{layout.ANNOTATION_TASK: task})
    pod["metadata"].pop("name")
    pod["spec"]["restartPolicy"] = "Never"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": "agents"},
        "spec": {"backoffLimit": 0, "template": {"metadata": pod["metadata"], "spec": pod["spec"]}},
    }


def test_the_orchestrator_creates_a_sub_agent_job_the_webhook_admits_and_injects(cluster: Cluster) -> None:
    root = cluster.chain.root(root_task("q3", ORCH))
    grant = cluster.chain.delegate(root, WORKER, "worker")
    status, created = cluster.api("POST", "/apis/batch/v1/namespaces/agents/jobs", job(grant))
    assert status == 201, created

    def pod() -> dict[str, Any] | None:
        pods = cluster.kube.objects("", "pods", "agents")
        return next((p for p in pods if p["metadata"]["labels"].get("job-name") == "market-data"), None)

    created_pod = wait_until(pod, timeout=15, what="the job controller's pod")
    validate(created_pod)  # a Pod the API server would store
    init = [c["name"] for c in created_pod["spec"]["initContainers"]]
    assert init[:3] == [layout.CONTAINER_INIT, layout.CONTAINER_SIDECAR, layout.CONTAINER_ENVOY]
    assert created_pod["metadata"]["annotations"][layout.ANNOTATION_STATUS] == layout.STATUS_INJECTED
    assert created_pod["metadata"]["ownerReferences"][0]["kind"] == "Job"
    # the ServiceAccount admission plugin ran before the webhook: the agent's container has the token,
    # the injected ones (added by the webhook afterwards) do not
    mounts = {
        c["name"]: [m["mountPath"] for m in c.get("volumeMounts", [])]
        for c in created_pod["spec"]["initContainers"] + created_pod["spec"]["containers"]
    }
    assert SERVICE_ACCOUNT_MOUNT in mounts["agent"] and SERVICE_ACCOUNT_MOUNT not in mounts[layout.CONTAINER_SIDECAR]
    assert {e["reason"] for e in cluster.kube.events if e["object"] == "job/market-data"} == {"SuccessfulCreate"}
    # the kubelet reports the pod done; the job controller completes the Job; the orchestrator reads it
    cluster.kube.set_pod_phase("agents", created_pod["metadata"]["name"], "Succeeded")
    status, read = cluster.api("GET", "/apis/batch/v1/namespaces/agents/jobs/market-data")
    assert status == 200 and read["status"]["succeeded"] == 1
    assert {c["type"] for c in read["status"]["conditions"]} >= {"Complete"}


def test_an_orchestrator_declaring_its_own_task_is_refused_by_the_api_server(cluster: Cluster) -> None:
    wide = yaml.safe_dump(
        {
            "id": "anything",
            "purpose": "x",
            "ttl": "1h",
            "egress": [{"host": "*.internal", "methods": ["GET"], "paths": ["/*"]}],
        }
    )
    status, answer = cluster.api("POST", "/apis/batch/v1/namespaces/agents/jobs", job(wide, "wide"))
    assert status == 403 and answer["kind"] == "Status"
    assert answer["message"].startswith('admission webhook "inject.agent-authz.io" denied the request: agent-authz: ')
    assert "an unsigned task is accepted only from a task author" in answer["message"]
    assert cluster.kube.object("batch", "jobs", "agents", "wide") is None
    # nor as a bare pod, nor by changing a running Job's pod's task afterwards (no right to pods at all)
    status, answer = cluster.api("POST", "/api/v1/namespaces/agents/pods", agent_pod(**{layout.ANNOTATION_TASK: wide}))
    assert status == 403 and 'cannot create resource "pods"' in answer["message"]
    # the deploy pipeline (a task author) may
    pipeline = cluster.kube.service_account_token("ci", "deployer")
    cluster.kube.bind("ci", "deployer", [])
    status, _ = cluster.api("POST", "/apis/batch/v1/namespaces/agents/jobs", job(wide, "wide"), token=pipeline)
    assert status == 403  # ...once it may create Jobs in agents: RBAC first
    cluster.kube.subjects[pipeline].rules = {"agents": rules_from_role(orchestrator_role())}
    status, created = cluster.api("POST", "/apis/batch/v1/namespaces/agents/jobs", job(wide, "wide"), token=pipeline)
    assert status == 201, created


def test_the_orchestrators_role_is_create_and_get_of_jobs_and_nothing_more(cluster: Cluster) -> None:
    role = orchestrator_role()
    assert role["rules"] == [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get"]}]
    validate(role)
    for method, path in (
        ("GET", "/apis/batch/v1/namespaces/agents/jobs"),  # list
        ("DELETE", "/apis/batch/v1/namespaces/agents/jobs/market-data"),
        ("GET", "/api/v1/namespaces/agents/secrets/sentiment-api"),
        ("GET", "/api/v1/namespaces/agents/pods"),
        ("POST", "/apis/batch/v1/namespaces/research/jobs"),
    ):
        status, answer = cluster.api(method, path, job("x") if method == "POST" else None)
        assert status == 403, (method, path, answer)
