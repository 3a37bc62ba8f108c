"""The Helm chart: ``helm lint`` and ``helm template`` with several value sets, every manifest
validated offline against the Kubernetes 1.29 and 1.35 JSON schemas (strict), and the values
schema rejecting bad values. Real helm and kubectl binaries (``scripts/install-k8s-tools.sh``)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.authority.config import load_authority_config
from sidecar.bootstrap.names import SPIRE_CLUSTER
from sidecar.bootstrap.render import render_envoy
from sidecar.config.loader import load_config
from sidecar.inject.annotations import check_task_annotation
from sidecar.inject.settings import load_injector
from sidecar.tokens.keys import generate_private_key_pem, load_signing_key
from tests.support.commands import parses
from tests.support.k8s import CHART, find, helm, helm_template, kubectl, secret_data, validate

pytestmark = pytest.mark.e2e

NS = "agent-authz"
WEBHOOK = "aa-agent-authz-webhook"
AUTHORITY = "aa-agent-authz-authority"
CA_BUNDLE = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").decode()

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "agents": {
        "agentNamespaces": ["agents", "research"],
        "identity": {"trustDomain": "prod.example", "workloadApi": {"mode": "hostPath", "socketName": "agent.sock"}},
        "interception": {
            "inbound": False,
            "ipv6": "same",
            "excludeInboundPorts": [9090],
            "excludeOutboundCIDRs": ["10.96.0.0/12", "fd00::/8"],
            "excludeOutboundPorts": [5432],
        },
        "image": {"digest": "sha256:" + "ab" * 32},
        "webhook": {"networkPolicy": {"enabled": True, "ingressFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}},
        "sidecar": {
            "dryRun": True,
            "decisionLog": {"file": False},
            "state": {"sizeLimit": "32Mi", "synchronous": "full"},
            "extraConfig": {
                "ingress": {
                    "rules": [{"callers": [{"trust_domain": "prod.example"}], "methods": ["GET"], "paths": ["*"]}]
                },
                "envoy": {"destinations": {"api.internal": "10.1.2.3:8080"}},
                # continuous verification (issue 15) is configured through extraConfig too
                "quarantine": {"threshold": 4, "window": "5m"},
                "approvals": {"approvers": ["spiffe://prod.example/ns/ops/sa/approver"], "default_ttl": "5m"},
                "sensitivity": {"default": "internal", "hosts": {"*.finance.internal": "restricted"}},
            },
            "credentials": {
                "sentiment": {"secretName": "sentiment-api", "key": "api-key", "header": "x-api-key"},
                "filings.v2": {"secretName": "filings", "key": "token", "header": "authorization", "prefix": "Token "},
            },
        },
        "injection": {
            "taskAuthors": {"users": ["ci@example.com"], "groups": [], "serviceAccounts": ["ci/deployer"]},
        },
        "authority": {"rootIssuers": {"configMap": "root-issuers"}},
    },
    "existing-secrets": {
        "agentNamespaces": ["agents"],
        "signingKey": {"existingSecret": "my-signing-key"},
        "webhook": {"tls": {"mode": "secret", "existingSecret": "my-webhook-tls", "caBundle": CA_BUNDLE}},
        "authority": {"tls": {"mode": "secret", "existingSecret": "my-authority-tls", "caBundle": CA_BUNDLE}},
    },
    "cert-manager": {
        "agentNamespaces": ["agents"],
        "webhook": {"tls": {"mode": "certManager"}},
        "authority": {"tls": {"mode": "certManager", "caBundle": CA_BUNDLE}},
    },
    "cert-manager-issuer": {
        "webhook": {
            "tls": {"mode": "certManager", "certManager": {"issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}}
        }
    },
    "minimal": {
        "webhook": {
            "replicas": 1,
            "failurePolicy": "Ignore",
            "validateUpdates": False,
            "podDisruptionBudget": {"enabled": False},
        },
        "tests": {"enabled": False},
        "injection": {"allowOptOut": False, "requireRunAsUser": True, "hardenContainers": True},
    },
}
CERT_MANAGER_KINDS = {"Issuer", "Certificate"}


def _render(name: str) -> list[dict[str, Any]]:
    return helm_template(values=VALUE_SETS[name], namespace=NS)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: _render(name) for name in VALUE_SETS}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint(name: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(VALUE_SETS[name]))
    result = helm("lint", str(CHART), "--strict", "-f", str(values), "--namespace", NS, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_manifest_validates_against_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    manifests = rendered[name]
    kinds = sorted(m["kind"] for m in manifests)
    assert {"Deployment", "Service", "MutatingWebhookConfiguration", "ServiceAccount", "ConfigMap"} <= set(kinds)
    for manifest in manifests:
        if manifest["apiVersion"].startswith("cert-manager.io/"):
            assert manifest["kind"] in CERT_MANAGER_KINDS  # a CRD: no schema in kubernetes-validate
            continue
        validate(manifest)


def test_default_install(rendered: dict[str, list[dict[str, Any]]]) -> None:
    manifests = rendered["defaults"]
    (config,) = find(manifests, "MutatingWebhookConfiguration")
    (hook,) = config["webhooks"]
    assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"] and hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["clientConfig"]["service"] == {"name": WEBHOOK, "namespace": NS, "path": "/inject", "port": 443}
    assert hook["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "operations": ["CREATE", "UPDATE"],
            "scope": "Namespaced",
        },
        {  # who may declare a task is judged on the Job (its pods come from the job controller)
            "apiGroups": ["batch"],
            "apiVersions": ["v1"],
            "resources": ["jobs"],
            "operations": ["CREATE", "UPDATE"],
            "scope": "Namespaced",
        },
    ]
    selector = hook["namespaceSelector"]
    assert selector["matchLabels"] == {"agent-authz.io/inject": "enabled"}
    assert selector["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [NS, "kube-system"]}
    ]
    # the label the install guide tells users to set matches the selector (kubectl, offline)
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "agents"}}
    labeled = json.loads(
        kubectl(
            "label", "--local", "-f", "-", "agent-authz.io/inject=enabled", "-o", "json", stdin=json.dumps(namespace)
        ).stdout
    )
    assert selector["matchLabels"].items() <= labeled["metadata"]["labels"].items()
    (pdb,) = find(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert find(manifests, "NetworkPolicy") == []
    # no agent namespace: nothing provisioned, the webhook does not check namespaces
    assert [m["metadata"]["name"] for m in find(manifests, "ConfigMap")] == [f"{WEBHOOK}-settings"]


def test_generated_tls_serves_the_service_name_and_matches_the_ca_bundle(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    manifests = rendered["defaults"]
    (secret,) = find(manifests, "Secret", "-tls")
    assert secret["type"] == "kubernetes.io/tls"
    (config,) = find(manifests, "MutatingWebhookConfiguration")
    ca_pem = base64.b64decode(config["webhooks"][0]["clientConfig"]["caBundle"])
    assert ca_pem == secret_data(secret, "ca.crt")
    ca = x509.load_pem_x509_certificate(ca_pem)
    leaf = x509.load_pem_x509_certificate(secret_data(secret, "tls.crt"))
    leaf.verify_directly_issued_by(ca)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert f"{WEBHOOK}.{NS}.svc" in names and f"{WEBHOOK}.{NS}.svc.cluster.local" in names
    key = serialization.load_pem_private_key(secret_data(secret, "tls.key"), None)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()  # type: ignore[union-attr]


def test_webhook_has_no_api_access_and_runs_locked_down(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for manifests in rendered.values():
        assert not [m for m in manifests if m["kind"] in ("ClusterRole", "ClusterRoleBinding")]
        bound = [s["name"] for m in find(manifests, "RoleBinding") for s in m["subjects"]]
        assert WEBHOOK not in bound  # only the authority has a Role (test_the_authority_may_touch_only_its_configmaps)
        (account,) = find(manifests, "ServiceAccount", "-webhook")
        assert account["automountServiceAccountToken"] is False
        (deployment,) = find(manifests, "Deployment", "-webhook")
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == account["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert container["command"][:2] == ["agent-authz", "webhook"]
        assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_agent_namespaces_get_their_config_and_a_signing_key_each(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    manifests = rendered["agents"]
    configs = find(manifests, "ConfigMap", "-sidecar")
    keys = find(manifests, "Secret", "-signing-key")
    assert sorted(m["metadata"]["namespace"] for m in configs) == ["agents", "research"]
    assert sorted(m["metadata"]["namespace"] for m in keys) == ["agents", "research"]
    # one signing-key scope per namespace: a token of one namespace never verifies as another's
    kids = set()
    for key in keys:
        pem = secret_data(key, "signing.pem")
        assert isinstance(serialization.load_pem_private_key(pem, None), ec.EllipticCurvePrivateKey)
        kids.add(load_signing_key(pem, "ES256", file="chart", field="signing.pem").kid)
    assert len(kids) == 2
    (settings,) = find(manifests, "ConfigMap", "-settings")
    # the webhook's copy is the namespaces' own, rendered for "{namespace}": only issuer.url differs
    for config in configs:
        namespace = config["metadata"]["namespace"]
        own = yaml.safe_load(config["data"]["sidecar.yaml"])
        assert own["issuer"]["url"] == f"https://{AUTHORITY}.{NS}.svc/ns/{namespace}"
        template = yaml.safe_load(settings["data"]["sidecar.yaml"].replace("{namespace}", namespace))
        assert own == template
    for name, text in settings["data"].items():
        (tmp_path / name).write_text(text)
    injector = load_injector(tmp_path / "injector.yaml")  # validates sidecar.yaml against the pod layout
    assert injector.settings.namespaces == ["agents", "research"]
    assert injector.settings.image == "ghcr.io/agent-authz/agent-authz@sha256:" + "ab" * 32
    assert injector.settings.workload_api.mode == "hostPath" and not injector.inbound and injector.ipv6
    sidecar = injector.sidecar.settings
    assert sidecar.dry_run and sidecar.decision_log.path is None and sidecar.ingress.rules
    assert str(sidecar.state.path) == "/var/lib/agent-authz/state/state.db" and sidecar.state.synchronous == "full"
    assert injector.settings.state_size_limit == "32Mi"
    assert (
        sidecar.identity is not None
        and sidecar.identity.workload_api.socket == "unix:///spiffe-workload-api/agent.sock"
    )
    (policy,) = find(manifests, "NetworkPolicy")
    assert policy["spec"]["egress"] == [] and policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": 8443, "protocol": "TCP"}]


def test_the_injected_sidecar_config_renders_envoy_with_spire_sds(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    (settings,) = find(rendered["defaults"], "ConfigMap", "-settings")
    path = tmp_path / "sidecar.yaml"
    path.write_text(settings["data"]["sidecar.yaml"])
    loaded = load_config(path)
    bootstrap = render_envoy(loaded).bootstrap
    listeners = {item["name"]: item for item in bootstrap["staticResources"]["listeners"]}
    assert {"egress_http", "outbound", "ingress_https"} <= set(listeners)
    assert listeners["outbound"]["address"]["socketAddress"]["portValue"] == 15001
    assert listeners["ingress_https"]["address"]["socketAddress"]["portValue"] == 15006
    clusters = {c["name"]: c for c in bootstrap["staticResources"]["clusters"]}
    pipe = clusters[SPIRE_CLUSTER]["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["pipe"]
    assert pipe["path"] == "/spiffe-workload-api/spire-agent.sock"


def test_secret_and_cert_manager_modes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    existing = rendered["existing-secrets"]
    assert find(existing, "Secret") == []  # both supplied by the operator
    (config,) = find(existing, "MutatingWebhookConfiguration")
    assert config["webhooks"][0]["clientConfig"]["caBundle"] == CA_BUNDLE
    (deployment,) = find(existing, "Deployment", "-webhook")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "my-webhook-tls"
    (authority,) = find(existing, "Deployment", "-authority")
    volumes = {v["name"]: v for v in authority["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "my-authority-tls"
    (sidecar_config,) = find(existing, "ConfigMap", "-sidecar")
    assert sidecar_config["data"]["authority-ca.pem"].strip() == base64.b64decode(CA_BUNDLE).decode().strip()
    (settings,) = find(existing, "ConfigMap", "-settings")
    assert yaml.safe_load(settings["data"]["injector.yaml"])["signing_key_secret"] == "my-signing-key"

    managed = rendered["cert-manager"]
    (config,) = find(managed, "MutatingWebhookConfiguration")
    assert "caBundle" not in config["webhooks"][0]["clientConfig"]
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{NS}/{WEBHOOK}"
    certificates = {m["metadata"]["name"]: m for m in find(managed, "Certificate")}
    assert certificates[WEBHOOK]["spec"]["secretName"] == f"{WEBHOOK}-tls"
    assert f"{WEBHOOK}.{NS}.svc" in certificates[WEBHOOK]["spec"]["dnsNames"]
    assert certificates[f"{WEBHOOK}-ca"]["spec"]["isCA"] is True
    assert find(managed, "Secret", "-tls") == []
    assert certificates[AUTHORITY]["spec"]["secretName"] == f"{AUTHORITY}-tls"
    assert f"{AUTHORITY}.{NS}.svc" in certificates[AUTHORITY]["spec"]["dnsNames"]
    (own,) = find(rendered["cert-manager-issuer"], "Certificate")
    assert own["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer"}
    assert find(rendered["cert-manager-issuer"], "Issuer") == []


def test_minimal_values(rendered: dict[str, list[dict[str, Any]]]) -> None:
    manifests = rendered["minimal"]
    (config,) = find(manifests, "MutatingWebhookConfiguration")
    assert config["webhooks"][0]["failurePolicy"] == "Ignore"
    assert config["webhooks"][0]["rules"][0]["operations"] == ["CREATE"]
    assert find(manifests, "PodDisruptionBudget") == [] and find(manifests, "Pod") == []
    (settings,) = find(manifests, "ConfigMap", "-settings")
    injector = yaml.safe_load(settings["data"]["injector.yaml"])
    assert injector["allow_opt_out"] is False and injector["require_run_as_user"] is True
    assert injector["harden_containers"] is True


def test_helm_test_pod_checks_the_service_with_its_ca(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (pod,) = find(rendered["agents"], "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert container["command"] == [
        "agent-authz",
        "webhook-check",
        "--url",
        f"https://{WEBHOOK}.{NS}.svc:443/inject",
        "--ca-file",
        "/etc/agent-authz-webhook/tls/ca.crt",
        "--namespace",
        "agents",
    ]
    assert pod["spec"]["volumes"][0]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    (policy,) = find(rendered["agents"], "NetworkPolicy")
    peers = policy["spec"]["ingress"][0]["from"]
    assert peers[-1]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("proxy.uid=0", "/proxy/uid"),
        ("webhook.failurePolicy=Sometimes", "/webhook/failurePolicy"),
        ("webhook.port=443", "/webhook/port"),
        ("webhook.timeoutSeconds=60", "/webhook/timeoutSeconds"),
        ("interception.outboundPort=70000", "/interception/outboundPort"),
        ("interception.ipv6=maybe", "/interception/ipv6"),
        ("interception.excludeOutboundCIDRs={not-a-cidr}", "/interception/excludeOutboundCIDRs/0"),
        ("identity.workloadApi.mode=socket", "/identity/workloadApi/mode"),
        ("identity.trustDomain=Bad Domain", "/identity/trustDomain"),
        ("agentNamespaces={Bad_NS}", "/agentNamespaces/0"),
        ("sidecar.maxTokenTtl=forever", "/sidecar/maxTokenTtl"),
        ("sidecar.issuerUrl=not-a-url", "/sidecar/issuerUrl"),
        ("sidecar.resources.requests.cpu=lots", "/sidecar/resources/requests/cpu"),
        ("image.digest=sha256:short", "/image/digest"),
        ("webhook.tls.mode=secret", "/webhook/tls"),
        ("webhook.tls.mode=selfsigned", "/webhook/tls/mode"),
        ("authority.tls.mode=certManager", "/authority/tls"),
        ("authority.tls.mode=secret", "/authority/tls"),
        ("authority.issuerBaseUrl=http://insecure.example", "/authority/issuerBaseUrl"),
        ("authority.feedPort=80", "/authority/feedPort"),
        ("authority.replicas=0", "/authority/replicas"),
        ("sidecar.revocationFeed.staleAppliesTo=some", "/sidecar/revocationFeed/staleAppliesTo"),
        ("sidecar.revocationFeed.maxStaleness=soon", "/sidecar/revocationFeed/maxStaleness"),
        ("injection.taskAuthors.serviceAccounts={deployer}", "/injection/taskAuthors/serviceAccounts/0"),
        ("sidecar.credentials.sentiment.key=k", "/sidecar/credentials/sentiment"),
        ("sidecar.credentials.Bad.secretName=s", "/sidecar/credentials"),
        ("typo=1", "additional properties 'typo'"),
        ("webhook.replica=3", "additional properties 'replica'"),
    ],
)
def test_bad_values_are_rejected_by_the_schema(setting: str, field: str) -> None:
    result = helm("template", "aa", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0
    assert "don't meet the specifications of the schema" in result.stderr and field in result.stderr, result.stderr


def test_port_collisions_are_rejected() -> None:
    result = helm("template", "aa", str(CHART), "--set", "sidecar.healthPort=15006", check=False)
    assert result.returncode != 0
    assert "interception.inboundPort and sidecar.healthPort are both 15006" in result.stderr, result.stderr


def test_every_command_in_the_rendered_chart_exists(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The webhook Deployment's and the helm test's commands parse with the CLI the image installs."""
    commands = [
        container["command"]
        for manifest in rendered["agents"]
        if manifest["kind"] in ("Deployment", "Pod")
        for container in (manifest["spec"].get("template", manifest)["spec"]["containers"])
    ]
    assert len(commands) == 3  # webhook, authority, helm test
    for argv in commands:
        parses(argv)


def _notes(*set_values: str) -> str:
    args = ["install", "aa", str(CHART), "--dry-run=client", "--namespace", NS]
    for item in set_values:
        args += ["--set", item]
    out = helm(*args).stdout
    assert "NOTES:" in out
    return out.split("NOTES:", 1)[1]


def test_notes_say_what_to_label_and_show_a_valid_task() -> None:
    notes = _notes("agentNamespaces={agents,research}")
    assert "kubectl label namespace agents agent-authz.io/inject=enabled --overwrite" in notes
    assert "kubectl label namespace research agent-authz.io/inject=enabled --overwrite" in notes
    assert "kubectl annotate pod POD agent-authz.io/revoked=true --overwrite" in notes
    assert "kubectl logs POD -c agent-authz | agent-authz logs" in notes and "helm test aa -n agent-authz" in notes
    block = notes.split("agent-authz.io/task: |\n", 1)[1].split("\n\n", 1)[0]
    example = "\n".join(line.removeprefix("        ") for line in block.splitlines())
    checked = check_task_annotation(example, agent="spiffe://example.org/ns/agents/sa/a", credentials=set(), now=0)
    assert (checked.kind, checked.task_id) == ("task", "q3-risk-report")
    assert "WARNING: agentNamespaces is empty" in _notes()
    # with the authority: the operator's revocation and the issuer upstreams verify
    line = next(x for x in notes.splitlines() if "kubectl patch configmap aa-agent-authz-revocations" in x)
    patch = json.loads(line.split("-p '", 1)[1].rstrip("'"))
    assert patch == {"data": {"operator": "q3-risk-report\n"}}
    assert f"https://{AUTHORITY}.{NS}.svc/ns/NS" in notes


def test_with_the_charts_defaults_a_pod_resolves_cluster_services_and_its_tasks_hosts_only(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """DNS control is on by default: the init step redirects DNS to the sidecar's proxy, which resolves
    the cluster's names and the hosts of the pod's active tasks - nothing else."""
    from sidecar.config.schema import TaskSpec
    from sidecar.inject.containers import build_containers
    from sidecar.policy.compile import TaskSource, compile_policy
    from sidecar.policy.names import NameList, decide_name

    (settings,) = find(rendered["defaults"], "ConfigMap", "-settings")
    for name, text in settings["data"].items():
        (tmp_path / name).write_text(text)
    injector = load_injector(tmp_path / "injector.yaml")
    dns = injector.sidecar.settings.dns
    assert dns is not None and (dns.listen, dns.allow, dns.refuse_with) == (
        "127.0.0.1:15053",
        ["*.cluster.local"],
        "nxdomain",
    )
    init = build_containers(injector, [])[0]["command"]
    assert init[init.index("--dns-port") + 1] == "15053" and "53" not in init[
        init.index("--exclude-outbound-ports") + 1
    ].split(",")
    agent = "spiffe://example.org/ns/agents/sa/worker"
    spec = TaskSpec.model_validate(
        {
            "id": "t",
            "agent": agent,
            "purpose": "p",
            "ttl": "1h",
            "egress": [{"host": "api.openai.com", "methods": ["POST"], "paths": ["*"]}],
        }
    )
    policy = compile_policy([TaskSource(spec)], lambda _: 1_800_000_000.0, agent)
    names = NameList.compile(dns.allow)

    def resolves(name: str) -> bool:
        return decide_name(policy, names, name, "A", now=1_800_000_000.0, decision_id="d").allow

    assert resolves("kubernetes.default.svc.cluster.local") and resolves("my-svc.agents.svc.cluster.local")
    assert resolves("api.openai.com")
    assert not resolves("example.com") and not resolves("api.openai.com.attacker.test")


def test_the_dns_port_may_not_collide() -> None:
    result = helm("template", "aa", str(CHART), "--set", "dns.port=15080", check=False)
    assert result.returncode != 0 and "dns.port and sidecar.egressPort are both 15080" in result.stderr, result.stderr


# -- the cluster authority -------------------------------------------------------------------------------


def _by_component(manifests: list[dict[str, Any]], component: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]


def test_the_authority_runs_two_locked_down_replicas_behind_a_service_and_a_pdb(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    manifests = rendered["agents"]
    (deployment,) = find(manifests, "Deployment", "-authority")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec = pod["spec"]
    assert spec["serviceAccountName"] == AUTHORITY and spec["automountServiceAccountToken"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True
    (container,) = spec["containers"]
    assert container["command"][:4] == [
        "agent-authz",
        "authority",
        "--config",
        "/etc/agent-authz-authority/config/authority.yaml",
    ]
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert container["readinessProbe"]["httpGet"] == {"scheme": "HTTPS", "path": "/readyz", "port": "https"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"https": 8443, "feed": 8444}
    (pdb,) = find(manifests, "PodDisruptionBudget", "-authority")
    assert pdb["spec"]["maxUnavailable"] == 1 and pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (service,) = find(manifests, "Service", "-authority")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "https": (443, "https"),
        "feed": (8444, "feed"),
    }
    (secret,) = find(manifests, "Secret", "-authority-tls")
    ca = x509.load_pem_x509_certificate(secret_data(secret, "ca.crt"))
    leaf = x509.load_pem_x509_certificate(secret_data(secret, "tls.crt"))
    leaf.verify_directly_issued_by(ca)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert f"{AUTHORITY}.{NS}.svc" in names
    mounted = {v["name"]: v for v in spec["volumes"]}
    assert mounted["tls"]["secret"]["items"] == [
        {"key": "tls.crt", "path": "tls.crt"},
        {"key": "tls.key", "path": "tls.key"},
    ]
    assert mounted["bundle"]["configMap"] == {
        "name": "spire-bundle",
        "items": [{"key": "bundle.crt", "path": "bundle.pem"}],
    }


def test_the_authority_may_touch_only_its_two_configmaps(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """get, watch and update of its own two ConfigMaps by name - the exact requests of
    sidecar/authority/kube.py (the e2e authority tests run against the API double with this very Role)."""
    for name, manifests in rendered.items():
        deployments = find(manifests, "Deployment", "-authority")
        if not deployments:
            assert not find(manifests, "Role") and not find(manifests, "RoleBinding"), name
            continue
        (role,) = find(manifests, "Role")
        assert role["metadata"]["namespace"] == NS
        assert role["rules"] == [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": ["aa-agent-authz-revocations", "aa-agent-authz-keys"],
                "verbs": ["get", "watch", "update"],
            }
        ]
        (binding,) = find(manifests, "RoleBinding")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": AUTHORITY}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": AUTHORITY, "namespace": NS}]
        state = {
            m["metadata"]["name"]: m
            for m in find(manifests, "ConfigMap")
            if m["metadata"]["name"] in role["rules"][0]["resourceNames"]
        }
        assert set(state) == set(role["rules"][0]["resourceNames"])
        for configmap in state.values():  # no data: Helm's merge keeps what the authority wrote
            assert "data" not in configmap and configmap["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_the_authority_config_validates_and_names_what_the_chart_made(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    manifests = rendered["agents"]
    (config_map,) = find(manifests, "ConfigMap", "-authority-config")
    path = tmp_path / "authority.yaml"
    path.write_text(config_map["data"]["authority.yaml"])
    config = load_authority_config(path)
    assert config.namespaces == ["agents", "research"]
    assert config.issuer_base_url == f"https://{AUTHORITY}.{NS}.svc"
    assert config.trust.trust_domain == "prod.example"
    (role,) = find(manifests, "Role")
    assert [config.kubernetes.revocations_configmap, config.kubernetes.keys_configmap] == role["rules"][0][
        "resourceNames"
    ]
    (deployment,) = find(manifests, "Deployment", "-authority")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for file in (config.tls.cert, config.tls.key, *config.trust.bundles.values()):
        assert str(file.parent) in mounts, file
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.listen.public == f"0.0.0.0:{ports['https']}" and config.listen.feed == f"0.0.0.0:{ports['feed']}"


def test_the_sidecars_point_at_the_authority(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    manifests = rendered["agents"]
    (secret,) = find(manifests, "Secret", "-authority-tls")
    (service,) = find(manifests, "Service", "-authority")
    feed_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "feed")
    for config_map in find(manifests, "ConfigMap", "-sidecar"):
        namespace = config_map["metadata"]["namespace"]
        directory = tmp_path / namespace
        directory.mkdir()
        for name, text in config_map["data"].items():
            (directory / name).write_text(text)
        settings = load_config(directory / "sidecar.yaml").settings
        feed = settings.grants.revocation_feed
        assert feed is not None
        assert feed.url == f"https://{AUTHORITY}.{NS}.svc:{feed_port}"
        assert feed.max_staleness == 30 and feed.stale_applies_to == "delegated"
        # the CA the sidecar verifies the authority with is in its own ConfigMap (mounted at /etc/agent-authz/config)
        assert str(feed.ca) == "/etc/agent-authz/config/authority-ca.pem"
        assert (directory / "authority-ca.pem").read_bytes().strip() == secret_data(secret, "ca.crt").strip()
        assert settings.issuer.url == f"https://{AUTHORITY}.{NS}.svc/ns/{namespace}"
        # sidecar.extraConfig carries the anomaly rule, the approvers and the sensitivity labels
        assert (settings.quarantine.threshold, settings.quarantine.window) == (4, 300)
        assert settings.approvals.approvers == ["spiffe://prod.example/ns/ops/sa/approver"]
        assert settings.sensitivity.hosts == {"*.finance.internal": "restricted"}


def test_without_the_authority_nothing_of_it_is_rendered() -> None:
    for manifests in (
        helm_template("agentNamespaces={agents}", "authority.enabled=false", namespace=NS),
        helm_template(namespace=NS),  # no agent namespace: nothing to serve
    ):
        assert not _by_component(manifests, "authority")
        for config_map in find(manifests, "ConfigMap", "-sidecar"):
            sidecar = yaml.safe_load(config_map["data"]["sidecar.yaml"])
            assert "grants" not in sidecar and sidecar["issuer"]["url"] == "https://agent-authz.example.org"
            assert "authority-ca.pem" not in config_map["data"]


def test_credentials_come_from_secrets_mounted_into_the_sidecar_only(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """``sidecar.credentials`` names Secrets: the sidecar config reads each key from the directory
    the webhook mounts the Secret at (the sidecar container only), and the webhook knows the Secrets
    (its pods' own containers may not reach them)."""
    manifests = rendered["agents"]
    (settings,) = find(manifests, "ConfigMap", "-webhook-settings")
    injector = yaml.safe_load(settings["data"]["injector.yaml"])
    assert injector["credentials"] == [
        {"name": "filings.v2", "secret_name": "filings", "key": "token"},
        {"name": "sentiment", "secret_name": "sentiment-api", "key": "api-key"},
    ]
    assert injector["task_authors"] == {"users": ["ci@example.com"], "groups": [], "service_accounts": ["ci/deployer"]}
    assert injector["grant_trust"] == {
        "bundle": "/etc/agent-authz-webhook/trust/bundle.pem",
        "root_issuers": "/etc/agent-authz-webhook/root-issuers/issuers.jwks.json",
    }
    for cm in find(manifests, "ConfigMap", "-sidecar"):
        credentials = yaml.safe_load(cm["data"]["sidecar.yaml"])["credentials"]
        assert credentials == {
            "sentiment": {
                "header": "x-api-key",
                "file": "/etc/agent-authz/credentials/sentiment/api-key",
                "prefix": "",
            },
            "filings.v2": {
                "header": "authorization",
                "file": "/etc/agent-authz/credentials/filings.v2/token",
                "prefix": "Token ",
            },
        }
    for name, text in settings["data"].items():
        (tmp_path / name).write_text(text)
    config = load_injector(tmp_path / "injector.yaml")  # the webhook starts with them
    assert config.settings.credential_secrets == {"filings", "sentiment-api"}
    (deployment,) = find(manifests, "Deployment", "-webhook")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["trust-bundle"]["configMap"] == {
        "name": "spire-bundle",
        "optional": True,
        "items": [{"key": "bundle.crt", "path": "bundle.pem"}],
    }
    assert volumes["root-issuers"]["configMap"]["name"] == "root-issuers"
    assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False  # still no API access


def test_root_issuers_reach_the_sidecars_and_the_webhook(tmp_path: Path) -> None:
    """``sidecar.rootIssuers`` (a JWKS) is written into each agent namespace's sidecar ConfigMap,
    which the sidecar config names as its root issuers, and into the webhook's settings, which verify
    the grants of requesters who are not task authors with it (unless ``authority.rootIssuers`` names
    a ConfigMap, which the webhook then reads instead)."""
    issuer = load_signing_key(generate_private_key_pem(), "ES256", file="issuer", field="")
    public = {"keys": [issuer.public_jwk]}
    jwks = json.dumps(public)
    manifests = helm_template(values={"agentNamespaces": ["agents"], "sidecar": {"rootIssuers": jwks}}, namespace=NS)
    (config_map,) = find(manifests, "ConfigMap", "-sidecar")
    assert json.loads(config_map["data"]["root-issuers.jwks.json"]) == public
    for name, text in config_map["data"].items():
        (tmp_path / name).write_text(text)
    settings = load_config(tmp_path / "sidecar.yaml").settings
    assert [str(r.jwks) for r in settings.grants.root_issuers] == ["/etc/agent-authz/config/root-issuers.jwks.json"]
    (webhook_settings,) = find(manifests, "ConfigMap", "-webhook-settings")
    injector = yaml.safe_load(webhook_settings["data"]["injector.yaml"])
    assert injector["grant_trust"]["root_issuers"] == "root-issuers.jwks.json"
    webhook_dir = tmp_path / "webhook"
    webhook_dir.mkdir()
    for name, text in webhook_settings["data"].items():
        (webhook_dir / name).write_text(text)
    loaded = load_injector(webhook_dir / "injector.yaml")
    assert loaded.settings.grant_trust.root_issuers == webhook_dir / "root-issuers.jwks.json"
    # authority.rootIssuers wins for the webhook
    both = helm_template(
        values={
            "agentNamespaces": ["agents"],
            "sidecar": {"rootIssuers": jwks},
            "authority": {"rootIssuers": {"configMap": "root-issuers"}},
        },
        namespace=NS,
    )
    (webhook_settings,) = find(both, "ConfigMap", "-webhook-settings")
    injector = yaml.safe_load(webhook_settings["data"]["injector.yaml"])
    assert injector["grant_trust"]["root_issuers"] == "/etc/agent-authz-webhook/root-issuers/issuers.jwks.json"
