"""Delegation trees as one sidecar sees them: its tasks, the sub-grants it issued, records (untrusted)."""

from __future__ import annotations

import time
from typing import Any

from sidecar.admin.delegation_tree import MAX_NODES, delegation_trees
from sidecar.decision import AuthzRequest, Direction
from sidecar.grants.issue import DelegationRequest
from sidecar.grants.revocations import sign_revocations
from sidecar.runtime import Runtime, TaskService
from tests.support.grants_env import ORCH, OTHER, SUB, Scenario


def delegation(name: str, subject: str, max_calls: int, path: str) -> DelegationRequest:
    return DelegationRequest.model_validate(
        {
            "subject": subject,
            "ttl": "10m",
            "name": name,
            "max_calls": max_calls,
            "egress": [{"host": "market.internal", "methods": ["GET"], "paths": [path], "max_calls": max_calls}],
        }
    )


def get(path: str) -> AuthzRequest:
    return AuthzRequest(Direction.EGRESS, "GET", "http", "market.internal", path, {})


def record(task_id: Any, txn: Any, decision: str = "allow", reason: str = "allowed", **extra: Any) -> dict[str, Any]:
    return {"event": "decision", "direction": "egress", "task_id": task_id, "txn": txn, "agent": SUB,
            "decision": decision, "reason": reason, **extra}  # fmt: skip


def nodes(body: dict[str, Any], txn: str) -> dict[str, dict[str, Any]]:
    (tree,) = [t for t in body["trees"] if t["txn"] == txn]
    return {n["task_id"]: n for n in tree["nodes"]}


def test_the_orchestrator_sees_its_task_the_sub_grants_it_issued_and_their_records(tmp_path: Any) -> None:
    sc = Scenario(tmp_path)
    orch = TaskService(Runtime(sc.agent_config("orch", ORCH, sc.root, grants=[sc.root_grant()], publish=True)))
    orch.delegate("q3", delegation("market", SUB, 5, "/v1/prices/ACME/*"))
    orch.delegate("q3", delegation("sales", OTHER, 3, "/v1/prices/GLOBEX/*"))
    own = orch.runtime.decide(get("/v1/prices/X"), "d1")
    assert own.allow
    seen = [
        record("q3/market", "q3"),
        record("q3/market", "q3"),
        record("q3/market", "q3", "deny", "path_not_allowed"),
        record("q3/market", "q3", direction="ingress"),  # a call *to* the sub-agent: not spent from its budget
    ]

    tree = nodes(delegation_trees(orch, seen), "q3")
    assert list(tree) == ["q3", "q3/market", "q3/sales"]  # depth first, children sorted
    root = tree["q3"]
    assert root["parent"] is None and root["children"] == ["q3/market", "q3/sales"] and root["agent"] == ORCH
    assert root["state"] == "allowed" and root["sources"] == ["enforced_here"]
    assert root["budget"] == {"max_calls": 100, "used": 1, "reserved": 8}  # its own call; 5 + 3 delegated
    market = tree["q3/market"]
    assert market["depth"] == 1 and market["agent"] == SUB and market["state"] == "allowed"
    assert market["budget"] == {"max_calls": 5, "used": 2, "reserved": 0}  # from the sub-agent's records
    assert market["calls"] == {"allowed": 2, "denied": 1} and market["sources"] == ["delegated_here", "records"]
    assert tree["q3/sales"]["budget"]["used"] is None  # nothing here knows what it spent

    orch.revoke("q3/sales")
    tree = nodes(delegation_trees(orch, seen), "q3")
    assert [tree[t]["state"] for t in tree] == ["allowed", "allowed", "revoked"]

    # the admin revokes the root: every grant below it is revoked too
    issuer = sc.issuer
    token = sign_revocations(["q3"], issuer.private_key, issuer="admin", issued_at=int(time.time()), kid=issuer.kid)
    (sc.root / "issuer" / "revocations.jwt").write_text(token)
    config = sc.agent_config(
        "orch2", ORCH, sc.root, grants=[sc.root_grant()], revocations=[sc.root / "issuer" / "revocations.jwt"]
    )
    revoked_root = TaskService(Runtime(config))
    assert nodes(delegation_trees(revoked_root, []), "q3")["q3"]["state"] == "revoked"


def test_a_sub_agent_sees_its_grant_and_the_verified_chain_above_it(tmp_path: Any) -> None:
    sc = Scenario(tmp_path)
    orch = TaskService(Runtime(sc.agent_config("orch", ORCH, sc.root, grants=[sc.root_grant()], publish=True)))
    token, _ = orch.delegate("q3", delegation("market", SUB, 5, "/v1/prices/ACME/*"))
    sub = TaskService(Runtime(sc.agent_config("sub", SUB, sc.root, revocations=[sc.root / "orch" / "revocations.jwt"])))
    sub.accept(token)
    assert sub.runtime.decide(get("/v1/prices/ACME/1"), "d").allow

    tree = nodes(delegation_trees(sub, []), "q3")
    assert tree["q3"]["sources"] == ["grant_chain"] and tree["q3"]["agent"] == ORCH
    assert tree["q3"]["budget"] == {"max_calls": 100, "used": None, "reserved": 0}
    assert tree["q3"]["state"] == "allowed"
    assert tree["q3/market"]["sources"] == ["enforced_here"]
    assert tree["q3/market"]["budget"] == {"max_calls": 5, "used": 1, "reserved": 0}


def test_records_are_untrusted_input(tmp_path: Any) -> None:
    sc = Scenario(tmp_path)
    orch = TaskService(Runtime(sc.agent_config("orch", ORCH, sc.root, grants=[sc.root_grant()], publish=True)))
    hostile = "<img src=x onerror=alert(1)>"
    seen = [
        record(7, "q3"),
        record({"id": "x"}, "q3"),
        record("q3/a", None),
        record("", "q3"),
        {"task_id": "q3/b", "txn": "q3"},  # no decision: counted as a deny, nothing more
        record(f"q3/{hostile}", "q3", agent=hostile),
        record("q3/a/b/c", "q3", "deny", "task_revoked"),  # its parents are known only by id
        record("q3/a/b/c", "q3"),  # revoked stays revoked
        record("other-txn/x", "other-txn", "deny", "task_expired"),
    ]
    body = delegation_trees(orch, seen)
    tree = nodes(body, "q3")
    assert set(tree) == {"q3", "q3/b", f"q3/{hostile}", "q3/a", "q3/a/b", "q3/a/b/c"}
    assert tree[f"q3/{hostile}"]["agent"] == hostile  # kept as text: the page never parses it as HTML
    assert tree["q3/a"]["sources"] == ["inferred"] and tree["q3/a"]["state"] == "unknown"
    assert tree["q3/a/b/c"]["state"] == "revoked" and tree["q3/a/b/c"]["depth"] == 3
    assert tree["q3/b"]["calls"] == {"allowed": 0, "denied": 1}
    assert nodes(body, "other-txn")["other-txn/x"]["state"] == "expired"
    assert body["trees"][0]["txn"] == "q3"  # trees enforced here first

    many = [record(f"q3/n{i}", "q3") for i in range(MAX_NODES + 50)]
    (tree_body,) = [t for t in delegation_trees(orch, many)["trees"] if t["txn"] == "q3"]
    assert len(tree_body["nodes"]) == MAX_NODES and tree_body["more_nodes"] == 51
