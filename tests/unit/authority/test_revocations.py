"""Who may revoke what at the authority (the sidecars' rules, on the presented grants), and how entries persist."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from sidecar.authority.kube import KubeClient
from sidecar.authority.protocol import OPERATOR_SIGNER, AuthorityCode, AuthorityError, RevocationEntry
from sidecar.authority.revocations import DATA_KEY, RevocationJudge, RevocationStore, entries_of
from sidecar.identity.bundles import TrustBundles
from sidecar.identity.devca import DevCA
from sidecar.identity.x509svid import X509SvidVerifier
from sidecar.simulation.kube_api import KubeApiDouble
from tests.support.grant_chain import Chain, root_task

TD = "unit.example"
ORCH = f"spiffe://{TD}/ns/agents/sa/orchestrator"
SUB = f"spiffe://{TD}/ns/agents/sa/sub"
OTHER = f"spiffe://{TD}/ns/agents/sa/other"


@pytest.fixture(scope="module")
def chain() -> Chain:
    return Chain(DevCA.create(TD))


def judge_for(chain: Chain) -> RevocationJudge:
    return RevocationJudge(
        root_keys={chain.issuer.kid: chain.issuer.private_key.public_key()},
        root_ids=frozenset(),
        svids=X509SvidVerifier(TrustBundles({TD: (chain.ca.ca_cert,)})),
        max_depth=3,
    )


def test_a_root_issuer_revokes_anything_even_without_grants(chain: Chain) -> None:
    judgement = judge_for(chain).judge(chain.root_revocation("q3", "unknown/x"), [], peer=None, now=time.time())
    assert [e.id for e in judgement.accepted] == ["q3", "unknown/x"] and not judgement.refused
    assert all(e.root and e.signer == f"key:{chain.issuer.kid}" and e.expires_at is None for e in judgement.accepted)


def test_an_agent_revokes_its_own_grant_and_what_it_delegated(chain: Chain) -> None:
    root = chain.root(root_task("q3", ORCH))
    child = chain.delegate(root, SUB, "market")
    judge, now = judge_for(chain), time.time()
    own = judge.judge(chain.revocation_by(ORCH, "q3"), [root], peer=ORCH, now=now)
    assert [(e.id, e.signer, e.root) for e in own.accepted] == [("q3", ORCH, False)]
    assert own.accepted[0].expires_at == int(chain.grant(root).expires_at)
    delegated = judge.judge(chain.revocation_by(ORCH, "q3/market"), [child], peer=ORCH, now=now)
    assert [e.id for e in delegated.accepted] == ["q3/market"]
    # the sub-agent gives up its own grant
    gives_up = judge.judge(chain.revocation_by(SUB, "q3/market"), [child], peer=SUB, now=now)
    assert [e.id for e in gives_up.accepted] == ["q3/market"]


def test_an_agent_cannot_revoke_above_itself_or_another_agents_task(chain: Chain) -> None:
    root = chain.root(root_task("q3", ORCH))
    child = chain.delegate(root, SUB, "market")
    other_root = chain.root(root_task("other-task", OTHER))
    judge, now = judge_for(chain), time.time()
    upward = judge.judge(chain.revocation_by(SUB, "q3"), [child], peer=SUB, now=now)
    assert not upward.accepted
    assert [(r.id, r.error) for r in upward.refused] == [("q3", AuthorityCode.NOT_AUTHORIZED)]
    assert "no authority" in upward.refused[0].detail
    foreign = judge.judge(chain.revocation_by(SUB, "other-task"), [other_root], peer=SUB, now=now)
    assert [(r.id, r.error) for r in foreign.refused] == [("other-task", AuthorityCode.NOT_AUTHORIZED)]
    without_grant = judge.judge(chain.revocation_by(ORCH, "q3"), [], peer=ORCH, now=now)
    assert [r.id for r in without_grant.refused] == ["q3"] and "no verified grant" in without_grant.refused[0].detail


def test_lists_signed_by_someone_else_or_not_by_a_root_on_the_public_listener_are_refused(chain: Chain) -> None:
    root = chain.root(root_task("q3", ORCH))
    judge, now = judge_for(chain), time.time()
    with pytest.raises(AuthorityError) as replayed:
        judge.judge(chain.revocation_by(ORCH, "q3"), [root], peer=SUB, now=now)
    assert replayed.value.detail == AuthorityCode.SIGNER_NOT_PEER and replayed.value.status == 403
    with pytest.raises(AuthorityError) as public:
        judge.judge(chain.revocation_by(ORCH, "q3"), [root], peer=None, now=now)
    assert public.value.detail == AuthorityCode.NOT_ROOT
    stranger = Chain(DevCA.create(TD))  # another CA claiming the same trust domain
    with pytest.raises(AuthorityError) as untrusted:
        judge.judge(stranger.revocation_by(ORCH, "q3"), [], peer=ORCH, now=now)
    assert untrusted.value.detail == "grant_untrusted_signer"
    with pytest.raises(AuthorityError) as junk:
        judge.judge("not.a.jws", [], peer=ORCH, now=now)
    assert junk.value.detail in ("grant_malformed", "grant_bad_header")


def test_the_configmap_document_reads_entries_and_operator_lines() -> None:
    entry = RevocationEntry("q3", ORCH, False, 100, 200)
    data = {
        DATA_KEY: json.dumps({"entries": [entry.to_json()]}),
        "operator": "# revoked by the on-call\nq3/sales\n\n  not a task id!\nrunaway-job  # 2026-12-01\n",
    }
    assert entries_of(data) == {
        entry,
        RevocationEntry("q3/sales", OPERATOR_SIGNER, True, 0),
        RevocationEntry("runaway-job", OPERATOR_SIGNER, True, 0),
    }
    with pytest.raises(ValueError, match="entry root"):
        entries_of({DATA_KEY: json.dumps({"entries": [{"id": "x", "signer": "s", "root": "yes", "revoked_at": 1}]})})


def _configmap(name: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "authz"}}


def test_two_writers_never_drop_each_others_entries(tmp_path: Path) -> None:
    """A write that conflicts (409) is merged into the newer version: the API double lets another
    replica's write land between this replica's read and its PUT."""
    double = KubeApiDouble(tmp_path / "kube")
    double.seed(_configmap("revocations"))
    double.start()
    raced: list[int] = []

    def other_replica_writes_first(_group: str, _resource: str, _namespace: str, name: str) -> None:
        if raced or name != "revocations":
            return
        current = double.object("", "configmaps", "authz", "revocations")
        assert current is not None
        entries = json.loads(current.get("data", {}).get(DATA_KEY, '{"entries": []}'))["entries"]
        entries.append(RevocationEntry("from-b", OTHER, False, 2).to_json())
        current["data"] = {**current.get("data", {}), DATA_KEY: json.dumps({"entries": entries})}
        raced.append(int(double.seed(current)["metadata"]["resourceVersion"]))

    try:
        (tmp_path / "token").write_text(double.admin_token)

        async def scenario() -> RevocationStore:
            client = KubeClient(double.url, token_file=tmp_path / "token", ca_file=double.ca_file, namespace="authz")
            store = RevocationStore(client, "revocations")
            await store.document.load()
            double.before_write = other_replica_writes_first
            await store.add([RevocationEntry("from-a", ORCH, False, 3)])
            await client.aclose()
            return store

        store = asyncio.run(scenario())
        assert raced and store.document.conflicts == 1 and store.document.writes == 1
        assert {e.id for e in store.entries} == {"from-a", "from-b"}
        stored = double.object("", "configmaps", "authz", "revocations")
        assert stored is not None and int(stored["metadata"]["resourceVersion"]) > raced[0]
        assert {e["id"] for e in json.loads(stored["data"][DATA_KEY])["entries"]} == {"from-a", "from-b"}
    finally:
        double.stop()


def test_expired_entries_are_pruned_on_the_next_write(tmp_path: Path) -> None:
    double = KubeApiDouble(tmp_path / "kube")
    double.seed(_configmap("revocations"))
    double.start()
    try:
        (tmp_path / "token").write_text(double.admin_token)

        async def scenario() -> RevocationStore:
            clock = [1000.0]
            client = KubeClient(double.url, token_file=tmp_path / "token", ca_file=double.ca_file, namespace="authz")
            store = RevocationStore(client, "revocations", prune_after=60, clock=lambda: clock[0])
            await store.document.load()
            await store.add([RevocationEntry("old", ORCH, False, 900, 950), RevocationEntry("kept", ORCH, False, 900)])
            clock[0] = 1011.0  # 61 s after old's grant expired
            await store.add([RevocationEntry("new", ORCH, False, 1011, 5000)])
            await client.aclose()
            return store

        store = asyncio.run(scenario())
        assert {e.id for e in store.entries} == {"kept", "new"}
    finally:
        double.stop()
