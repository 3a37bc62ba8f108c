"""Delegation trees for the viewer: who delegated which task to whom, budgets, and each grant's state.

One tree per transaction (the root grant's id, the ``txn`` of every token minted under it). A node
is a task (a grant); its parent is the task it was delegated from. What one sidecar can know, and
where each node's facts come from (``sources`` in the output):

* ``enforced_here`` - a task this sidecar holds: its state (``allowed``, ``pending``, ``expired``,
  ``revoked``, ``frozen`` - the freeze ladder's: a quarantine or a signed freeze; a kill is
  ``revoked``), budget (``max_calls``), ``used`` (calls it spent, from the budget ledger) and
  ``reserved`` (the part of its budget given to the sub-grants this sidecar issued) are exact.
* ``grant_chain`` - an ancestor of such a task: a verified grant embeds its parent, so agent,
  purpose, budget and validity are known; it counts as ``revoked`` when a revocation list loaded
  here revokes it with authority.
* ``delegated_here`` - a sub-grant this sidecar issued: agent, budget and validity are known, and
  that it is ``revoked`` if this sidecar revoked it or an ancestor of it is revoked here. What the
  sub-agent spent is enforced by the sub-agent's sidecar, so ``used`` is only known from its records.
* ``records`` - decision records (this sidecar's log and the ``viewer.logs`` of others): egress
  calls allowed and denied per task, ``used`` (allowed calls) where the ledger is not here, and
  ``revoked`` / ``expired`` when a record was denied for that reason; ``frozen`` after a
  ``task_quarantined`` deny or a ``task_frozen`` control record, until a ``task_unfrozen`` one. Delegated task ids are
  ``<parent id>/<name>`` (:func:`sidecar.grants.issue.delegate`), which places a node known only
  from records under its parent.

Records are untrusted input (another sidecar's log may be anything): only string fields are used,
and the number of trees and nodes is bounded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sidecar.decision import Reason
from sidecar.grants.model import Grant
from sidecar.grants.revocations import revoked_by
from sidecar.runtime.tasks import TaskService

__all__ = ["MAX_NODES", "MAX_TREES", "delegation_trees"]

MAX_TREES = 50
"""Trees returned; the rest are counted in ``more_trees``."""
MAX_NODES = 300
"""Nodes per tree; the rest are counted in ``more_nodes``."""
_STATE_FROM_REASON = {"task_revoked": "revoked", "task_expired": "expired", "task_quarantined": "frozen"}
_FINAL = ("revoked", "expired")
_LADDER_STATES = {Reason.TASK_QUARANTINED: "frozen", Reason.TASK_REVOKED: "revoked"}


@dataclass
class _Node:
    task_id: str
    txn: str
    parent: str | None
    agent: str | None = None
    purpose: str | None = None
    on_behalf_of: str | None = None
    max_calls: int | None = None
    reserved: int = 0
    ledger_used: int | None = None
    allowed: int = 0
    denied: int = 0
    not_before: float | None = None
    expires_at: float | None = None
    state: str | None = None
    record_state: str | None = None
    sources: list[str] = field(default_factory=list)

    def learn(self, source: str) -> None:
        if source not in self.sources:
            self.sources.append(source)


def _time_state(now: float, not_before: float | None, expires_at: float | None) -> str:
    if expires_at is not None and now >= expires_at:
        return "expired"
    if not_before is not None and now < not_before:
        return "pending"
    return "allowed"


def _parent_of(task_id: str, txn: str) -> str | None:
    if task_id == txn or "/" not in task_id:
        return None
    return task_id.rsplit("/", 1)[0]


def delegation_trees(tasks: TaskService, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The delegation trees this sidecar can see.

    Args:
        tasks: this sidecar's task service: its runtime (tasks, budget ledger, revocation lists) and
            the sub-grants it issued.
        records: decision records, any order (only ``event: decision`` egress records count).

    Returns:
        ``{"trees": [{"txn", "nodes": [node, ...], "more_nodes"}], "more_trees", "now"}``; nodes in
        depth-first order, each ``{"task_id", "parent", "depth", "children", "agent", "purpose",
        "on_behalf_of", "state", "budget": {"max_calls", "used", "reserved"}, "calls": {"allowed",
        "denied"}, "not_before", "expires_at", "sources"}``. ``used`` is ``None`` where nothing here
        knows it; times are POSIX seconds.
    """
    runtime = tasks.runtime
    snapshot = runtime.snapshot
    now = runtime.clock()
    lists = snapshot.grants.revocations
    nodes: dict[str, _Node] = {}

    def node(task_id: str, txn: str, parent: str | None) -> _Node:
        found = nodes.get(task_id)
        if found is None:
            found = nodes[task_id] = _Node(task_id, txn, parent)
        return found

    def from_grant(grant: Grant, source: str) -> _Node:
        item = node(grant.id, grant.txn, grant.ancestors[-1] if grant.ancestors else None)
        if item.agent is None:
            item.agent, item.purpose = grant.subject, grant.spec.purpose
            item.on_behalf_of, item.max_calls = grant.spec.on_behalf_of, grant.spec.max_calls
            item.not_before, item.expires_at = grant.not_before, grant.expires_at
        item.learn(source)
        return item

    for task in snapshot.policy.tasks_by_id.values():
        if task.grant is not None:
            item = from_grant(task.grant, "enforced_here")
            for ancestor in task.grant.chain[1:]:
                above = from_grant(ancestor, "grant_chain")
                if above.state is None:
                    revoked = revoked_by(ancestor, lists) is not None
                    above.state = "revoked" if revoked else _time_state(now, ancestor.not_before, ancestor.expires_at)
        else:
            item = node(task.id, task.txn, None)
            item.learn("enforced_here")
        item.agent, item.purpose, item.on_behalf_of = task.agent, task.purpose, task.on_behalf_of
        item.max_calls, item.not_before, item.expires_at = task.max_calls, task.not_before, task.expires_at
        item.ledger_used = runtime.budgets.used((task.id, ""))
        item.state = "revoked" if task.revoked else _time_state(now, task.not_before, task.expires_at)
        block = runtime.blocks.get(task.id)
        if block is not None and item.state != "expired":
            item.state = _LADDER_STATES[block[0]]

    revoked_here = tasks.revoked_here()
    for issued in tasks.delegations():
        child = issued.spec
        item = node(child.id, issued.txn, issued.parent)
        item.learn("delegated_here")
        if item.agent is None:
            item.agent, item.purpose, item.on_behalf_of = child.agent, child.purpose, child.on_behalf_of
            item.max_calls = child.max_calls
            item.not_before = child.not_before.timestamp() if child.not_before is not None else None
            item.expires_at = child.expires_at.timestamp() if child.expires_at is not None else None
        parent = nodes.get(issued.parent)
        if parent is not None and parent.max_calls is not None and child.max_calls is not None:
            parent.reserved += child.max_calls
        ancestors = [nodes.get(a) for a in issued.ancestors]
        parent_task = snapshot.policy.tasks_by_id.get(issued.parent)
        lineage = (
            (child.id, child.agent, runtime.snapshot.policy.agent),
            *(parent_task.lineage if parent_task else ()),
        )
        laddered = runtime.ladder.verdict(lineage)
        if child.id in revoked_here or any(a is not None and a.state == "revoked" for a in ancestors):
            item.state = "revoked"
        elif laddered is not None:
            item.state = _LADDER_STATES[laddered[0]]
        elif item.state is None:
            item.state = _time_state(now, item.not_before, item.expires_at)

    for record in records:
        task_id, txn = record.get("task_id"), record.get("txn")
        if record.get("direction") == "control":
            _control_record(nodes, record)
            continue
        if record.get("direction") == "ingress" or not isinstance(task_id, str) or not isinstance(txn, str):
            continue
        if not task_id or not txn or len(task_id) > 1024:
            continue
        item = node(task_id, txn, _parent_of(task_id, txn))
        item.learn("records")
        agent = record.get("agent")
        if item.agent is None and isinstance(agent, str):
            item.agent = agent
        if record.get("decision") == "allow":
            item.allowed += 1
        else:
            item.denied += 1
        seen = _STATE_FROM_REASON.get(str(record.get("reason")))
        if item.record_state not in _FINAL:
            item.record_state = seen or ("allowed" if record.get("decision") == "allow" else item.record_state)

    for known in list(nodes.values()):  # parents known only by id (a record of a grandchild)
        below = known
        while below.parent is not None and below.parent not in nodes:
            below = node(below.parent, below.txn, _parent_of(below.parent, below.txn))
            below.learn("inferred")

    return _assemble(nodes)


def _control_record(nodes: dict[str, _Node], record: dict[str, Any]) -> None:
    """A ``task_frozen`` / ``task_unfrozen`` control record: the state of a node already known from
    elsewhere (a control record names a target, not a transaction, so it adds no node)."""
    task_id = record.get("task_id")
    item = nodes.get(task_id) if isinstance(task_id, str) else None
    if item is None or item.record_state in _FINAL:
        return
    if record.get("reason") == "task_frozen":
        item.record_state = "frozen"
    elif record.get("reason") == "task_unfrozen" and item.record_state == "frozen":
        item.record_state = "allowed"


def _state(item: _Node) -> str:
    if item.state in _FINAL or item.record_state in _FINAL:
        return "revoked" if "revoked" in (item.state, item.record_state) else "expired"
    if item.state == "frozen" or (item.record_state == "frozen" and "enforced_here" not in item.sources):
        return "frozen"
    return item.state or item.record_state or "unknown"


def _assemble(nodes: dict[str, _Node]) -> dict[str, Any]:
    children: dict[str, list[str]] = {}
    roots: dict[str, list[str]] = {}
    for item in nodes.values():
        parent = nodes.get(item.parent) if item.parent is not None else None
        if parent is not None and parent.txn == item.txn:
            children.setdefault(parent.task_id, []).append(item.task_id)
        else:
            roots.setdefault(item.txn, []).append(item.task_id)
    trees = []
    for txn in sorted(roots, key=lambda t: ("enforced_here" not in nodes[roots[t][0]].sources, t)):
        out: list[dict[str, Any]] = []
        stack = [(task_id, 0) for task_id in sorted(roots[txn], reverse=True)]
        total = 0
        while stack:
            task_id, depth = stack.pop()
            total += 1
            kids = sorted(children.get(task_id, []))
            if len(out) < MAX_NODES:
                out.append(_node_json(nodes[task_id], depth, kids))
            stack.extend((kid, depth + 1) for kid in reversed(kids))
        trees.append({"txn": txn, "nodes": out, "more_nodes": total - len(out)})
    return {"trees": trees[:MAX_TREES], "more_trees": max(0, len(trees) - MAX_TREES)}


def _node_json(item: _Node, depth: int, kids: list[str]) -> dict[str, Any]:
    if item.ledger_used is not None:
        used: int | None = max(0, item.ledger_used - item.reserved)  # the ledger counts reservations too
    elif "records" in item.sources:
        used = item.allowed
    else:
        used = None
    return {
        "task_id": item.task_id,
        "parent": item.parent,
        "depth": depth,
        "children": kids,
        "agent": item.agent,
        "purpose": item.purpose,
        "on_behalf_of": item.on_behalf_of,
        "state": _state(item),
        "budget": {"max_calls": item.max_calls, "used": used, "reserved": item.reserved},
        "calls": {"allowed": item.allowed, "denied": item.denied},
        "not_before": item.not_before,
        "expires_at": item.expires_at,
        "sources": item.sources,
    }
