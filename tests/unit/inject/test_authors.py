"""Who may declare a task: AdmissionReviews (CREATE and UPDATE, Pods and Jobs) from task authors and
from everyone else, as the API server sends them (``userInfo`` filled from the authenticated requester).

The attacker is an orchestrator agent whose ServiceAccount may create Jobs (or pods) in its
namespace: whatever it writes into a task annotation is its own input, so an unsigned task from it is
refused, and a grant from it must verify here - signature, chain to the root issuer, attenuation.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config.loader import LoadedConfig
from sidecar.config.schema import SidecarConfig
from sidecar.grants import codec
from sidecar.grants.model import GRANT_TYP
from sidecar.identity.devca import DevCA
from sidecar.inject import layout
from sidecar.inject.authors import Requester, relayed_by_job_controller
from sidecar.inject.podspec import AdmissionOutcome
from sidecar.inject.review import Outcome, decide
from sidecar.inject.settings import InjectorConfig, InjectorSettings, build_injector
from tests.support.grant_chain import Chain, root_task
from tests.support.k8s import RESTRICTED
from tests.support.webhook_env import ADMIN, admission_review, user_info

TD = "unit.example"
ORCH = f"spiffe://{TD}/ns/agents/sa/orchestrator"
SUB = f"spiffe://{TD}/ns/agents/sa/market"
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
UNSIGNED = yaml.safe_dump(
    {
        "id": "wide",
        "purpose": "anything",
        "ttl": "1h",
        "egress": [{"host": "*.internal", "methods": ["GET", "POST"], "paths": ["/*"]}],
    }
)
ORCHESTRATOR = user_info("agents/orchestrator")
JOB_CONTROLLER = user_info("kube-system/job-controller")
PIPELINE = user_info("ci/deployer")


@pytest.fixture(scope="module")
def chain() -> Chain:
    return Chain(DevCA.create(TD))


@pytest.fixture(scope="module")
def trust(chain: Chain, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The webhook's trust material as the chart mounts it: the bundle and the root issuers' JWKS."""
    directory = tmp_path_factory.mktemp("trust")
    chain.ca.save(directory / "ca")
    (directory / "issuers.jwks.json").write_text(json.dumps({"keys": [chain.issuer.public_jwk]}))
    return directory


def injector(trust: Path | None, **settings: Any) -> InjectorConfig:
    loaded = LoadedConfig(SidecarConfig.model_validate(SIDECAR), Path("/mem/sidecar.yaml"), Path("/mem"), "0" * 64)
    files = (
        {} if trust is None else {"bundle": trust / "ca" / "bundle.pem", "root_issuers": trust / "issuers.jwks.json"}
    )
    validated = InjectorSettings.model_validate(
        {"image": "img:1", "sidecar_config": "sidecar.yaml", "trust_domain": TD, "grant_trust": files, **settings}
    )
    return build_injector(validated, loaded, file="/mem/injector.yaml")


def pod(task: str | None, *, sa: str = "market", **annotations: str) -> dict[str, Any]:
    if task is not None:
        annotations[layout.ANNOTATION_TASK] = task
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sub", "namespace": "agents", "annotations": annotations},
        "spec": {
            "serviceAccountName": sa,
            "containers": [{"name": "agent", "image": "agent:1", "securityContext": copy.deepcopy(RESTRICTED)}],
        },
    }


def job(task: str | None, **annotations: str) -> dict[str, Any]:
    template = pod(task, **annotations)
    del template["apiVersion"], template["kind"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "sub", "namespace": "agents"},
        "spec": {"suspend": False, "template": {**template, "spec": {**template["spec"], "restartPolicy": "Never"}}},
    }


def review(config: InjectorConfig, obj: dict[str, Any], user: dict[str, Any] | None, **kw: Any) -> Outcome:
    body = admission_review(obj, user=user, **kw)
    if user is None:
        del body["request"]["userInfo"]
    return decide(json.dumps(body).encode(), config, now=time.time())


def delegated(chain: Chain, **request: Any) -> str:
    root = chain.root(root_task("q3", ORCH))
    return chain.delegate(root, SUB, "market", **request)


def test_an_unsigned_task_is_accepted_from_task_authors_only(trust: Path) -> None:
    config = injector(trust, task_authors={"users": ["jane@example.com"], "service_accounts": ["ci/deployer"]})
    for author in (ADMIN, PIPELINE, {"username": "jane@example.com", "groups": ["system:authenticated"]}):
        answered = review(config, pod(UNSIGNED), author)
        assert answered.allowed and answered.outcome is AdmissionOutcome.INJECTED, author
    for other in (ORCHESTRATOR, user_info("ci/other"), {"username": "bob@example.com"}, None):
        refused = review(config, pod(UNSIGNED), other)
        assert not refused.allowed and refused.outcome is AdmissionOutcome.DENIED
        assert "an unsigned task is accepted only from a task author" in refused.message, other
        assert "injection.taskAuthors" in refused.message
    assert (
        "'system:serviceaccount:agents:orchestrator' is not one" in review(config, pod(UNSIGNED), ORCHESTRATOR).message
    )
    # a pod without a task, or opting out, needs no author
    assert review(config, pod(None), ORCHESTRATOR).allowed


def test_a_grant_from_a_non_author_must_verify_and_narrow(chain: Chain, trust: Path) -> None:
    config = injector(trust)
    good = review(config, pod(delegated(chain)), ORCHESTRATOR)
    assert good.allowed and good.outcome is AdmissionOutcome.INJECTED
    root = chain.root(root_task("own", SUB))  # a root grant signed by the root issuer verifies too
    assert review(config, pod(root), ORCHESTRATOR).allowed

    # the orchestrator signs a "root" grant for its sub-agent itself: not a root issuer
    spec_claims = codec.unverified(root, typ=GRANT_TYP)[1]
    orch_svid = chain.svid(ORCH)
    self_made = codec.sign(spec_claims, orch_svid.private_key, typ=GRANT_TYP, x5c=list(orch_svid.chain))
    refused = review(config, pod(self_made), ORCHESTRATOR)
    assert not refused.allowed and "does not verify: grant_not_root_issuer" in refused.message

    # a sub-grant that widens its parent (methods the root never had), re-signed by the orchestrator
    token = delegated(chain)
    claims = codec.unverified(token, typ=GRANT_TYP)[1]
    claims["task"]["egress"][0]["methods"] = ["GET", "DELETE"]
    widened = codec.sign(claims, orch_svid.private_key, typ=GRANT_TYP, x5c=list(orch_svid.chain))
    refused = review(config, pod(widened), ORCHESTRATOR)
    assert not refused.allowed and "grant_widening" in refused.message and "egress[0].methods" in refused.message

    # signed by an SVID of another trust domain
    outsider = Chain(DevCA.create("other.example"), chain.issuer).svid("spiffe://other.example/ns/agents/sa/orch")
    foreign = codec.sign(claims, outsider.private_key, typ=GRANT_TYP, x5c=list(outsider.chain))
    refused = review(config, pod(foreign), ORCHESTRATOR)
    assert not refused.allowed and "does not verify" in refused.message

    # a good grant, but for another ServiceAccount than the pod's
    refused = review(config, pod(delegated(chain), sa="sales"), ORCHESTRATOR)
    assert not refused.allowed and "but this pod's SPIFFE ID is" in refused.message


def test_without_trust_material_a_non_authors_grant_is_refused_with_a_message(chain: Chain) -> None:
    config = injector(None)
    refused = review(config, pod(delegated(chain)), ORCHESTRATOR)
    assert not refused.allowed and "cannot verify grants" in refused.message
    assert review(config, pod(delegated(chain)), ADMIN).allowed  # an author's grant: the sidecar verifies it


def test_kubectl_annotate_of_a_running_pod_is_judged_by_who_annotates(chain: Chain, trust: Path) -> None:
    config = injector(trust)
    injected = {layout.ANNOTATION_STATUS: layout.STATUS_INJECTED}
    running = pod(delegated(chain), **injected)
    widened = pod(UNSIGNED, **injected)
    refused = review(config, widened, ORCHESTRATOR, operation="UPDATE", old=running)
    assert not refused.allowed and "an unsigned task is accepted only from a task author" in refused.message
    assert review(config, widened, ADMIN, operation="UPDATE", old=running).outcome is AdmissionOutcome.VALIDATED
    # a new verified grant from a non-author is fine; a label change leaves the task alone
    regranted = pod(delegated(chain, ttl="5m"), **injected)
    assert review(config, regranted, ORCHESTRATOR, operation="UPDATE", old=running).allowed
    relabeled = copy.deepcopy(widened)
    relabeled["metadata"]["labels"] = {"x": "y"}
    unchanged = review(config, relabeled, ORCHESTRATOR, operation="UPDATE", old=widened)
    assert unchanged.allowed and unchanged.outcome is AdmissionOutcome.UNCHANGED
    # revoking takes away: anyone who may update the pod; clearing a revocation restores: authors only
    revoked = pod(delegated(chain), **injected, **{layout.ANNOTATION_REVOKED: "true"})
    assert review(config, revoked, ORCHESTRATOR, operation="UPDATE", old=running).allowed
    restored = review(config, running, ORCHESTRATOR, operation="UPDATE", old=revoked)
    assert not restored.allowed and "only a task author may clear a revocation" in restored.message
    assert review(config, running, ADMIN, operation="UPDATE", old=revoked).allowed


def test_a_job_template_is_judged_with_the_jobs_requester(chain: Chain, trust: Path) -> None:
    config = injector(trust)
    refused = review(config, job(UNSIGNED), ORCHESTRATOR)
    assert not refused.allowed and "an unsigned task is accepted only from a task author" in refused.message
    for user, task in ((ADMIN, UNSIGNED), (ORCHESTRATOR, delegated(chain))):
        answered = review(config, job(task), user)
        assert (
            answered.allowed
            and answered.outcome is AdmissionOutcome.VALIDATED
            and "patch" not in answered.review["response"]
        )
    # a suspended Job's template annotations are mutable: an UPDATE is judged too
    suspended = job(None)
    suspended["spec"]["suspend"] = True
    changed = copy.deepcopy(suspended)
    changed["spec"]["template"]["metadata"]["annotations"][layout.ANNOTATION_TASK] = UNSIGNED
    refused = review(config, changed, ORCHESTRATOR, operation="UPDATE", old=suspended)
    assert not refused.allowed and "task author" in refused.message
    assert review(config, changed, ADMIN, operation="UPDATE", old=suspended).allowed
    assert review(config, suspended, ORCHESTRATOR, operation="UPDATE", old=suspended).outcome is (
        AdmissionOutcome.UNCHANGED
    )
    broken = job("id: [no")
    assert "annotation agent-authz.io/task" in review(config, broken, ADMIN).message


def test_the_job_controllers_pods_are_judged_as_their_job_was(trust: Path) -> None:
    """The job controller relays a template that was judged when the Job was admitted; a pod that
    only claims a Job owner, or a pod of another controller, is judged by its own requester."""
    config = injector(trust)
    owned = pod(UNSIGNED)
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "sub", "uid": "u", "controller": True}
    owned["metadata"]["ownerReferences"] = [owner]
    relayed = review(config, owned, JOB_CONTROLLER)
    assert relayed.allowed and relayed.outcome is AdmissionOutcome.INJECTED
    assert not review(config, owned, ORCHESTRATOR).allowed  # claims a Job owner, created by the agent itself
    assert not review(config, pod(UNSIGNED), JOB_CONTROLLER).allowed  # the job controller, but no Job behind it
    replica_set = copy.deepcopy(owned)
    replica_set["metadata"]["ownerReferences"] = [{**owner, "apiVersion": "apps/v1", "kind": "ReplicaSet"}]
    assert not review(config, replica_set, user_info("kube-system/replicaset-controller")).allowed
    assert not review(config, replica_set, JOB_CONTROLLER).allowed
    not_controller = copy.deepcopy(owned)
    not_controller["metadata"]["ownerReferences"] = [{**owner, "controller": False}]
    assert not relayed_by_job_controller(not_controller, Requester.from_user_info(JOB_CONTROLLER))
    # the relay skips only who-may-declare: the task is still validated
    invalid = pod("id: [no")
    invalid["metadata"]["ownerReferences"] = [owner]
    assert not review(config, invalid, JOB_CONTROLLER).allowed


def test_requesters_are_read_from_untrusted_user_info() -> None:
    assert Requester.from_user_info(None) == Requester("")
    assert Requester.from_user_info({"username": 7, "groups": "system:masters"}) == Requester("")
    sa = Requester.from_user_info(ORCHESTRATOR)
    assert sa.service_account == "agents/orchestrator" and "system:serviceaccounts:agents" in sa.groups
    assert Requester("system:serviceaccount:broken").service_account is None
    with pytest.raises(ValueError, match="namespace/name"):
        InjectorSettings.model_validate(
            {"image": "i", "sidecar_config": "s.yaml", "task_authors": {"service_accounts": ["deployer"]}}
        )
    default = InjectorSettings.model_validate({"image": "i", "sidecar_config": "s.yaml"}).task_authors
    assert default.includes(Requester.from_user_info(ADMIN)) and not default.includes(Requester(""))
    assert not default.includes(Requester.from_user_info(ORCHESTRATOR))
