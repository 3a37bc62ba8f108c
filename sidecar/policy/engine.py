"""The egress decision: select the task, match the call, spend the budget, attach obligations.

The function is synchronous: between the budget check and the budget spend nothing yields to the
event loop, so budgets are exact under concurrency. Its only I/O is the spend's commit to the durable
state, when there is one (:class:`~sidecar.policy.budget.CounterJournal`), done inside the spend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sidecar.agentproto.rules import ProtocolPolicy, RpcVerdict, ToolRule, judge
from sidecar.decision import AuthzRequest, Decision, Direction, Reason, deny_status
from sidecar.errors import BadRequestError
from sidecar.http_norm import DEFAULT_PORTS, Target, normalize_authority, normalize_target
from sidecar.policy.budget import BudgetLedger, budget_limits
from sidecar.policy.gates import EMPTY_BODY, ApprovalGate, CallBinding, body_digest, headers_digest
from sidecar.policy.headers import forged_reserved, over_envoy_limits
from sidecar.policy.model import SENSITIVITY_NAMES, Blocks, EgressRule, PolicyIndex, Task, task_state
from sidecar.tokens.minter import TokenMinter
from sidecar.wire import DECISION_ID_HEADER, LIST_FILTER_HEADER, TASK_HEADER

__all__ = ["decide_egress", "dry_run"]

_ALWAYS_REMOVE = ("proxy-authorization", TASK_HEADER, LIST_FILTER_HEADER)
_ALWAYS_REMOVE_WITH_AUTHORIZATION = (*_ALWAYS_REMOVE, "authorization")
_AGENT_CREDENTIALS = ("authorization", *_ALWAYS_REMOVE)

# How far a rule got before it failed; the deepest failure explains a deny best. After the path come
# the JSON-RPC checks of MCP/A2A rules, and last the problems of the body itself (the same for every rule).
_STAGES = (
    Reason.HOST_NOT_ALLOWED,
    Reason.PORT_NOT_ALLOWED,
    Reason.METHOD_NOT_ALLOWED,
    Reason.PATH_NOT_ALLOWED,
    Reason.RPC_METHOD_NOT_ALLOWED,
    Reason.RESOURCE_NOT_ALLOWED,
    Reason.PROMPT_NOT_ALLOWED,
    Reason.TOOL_NOT_ALLOWED,
    Reason.ARGUMENT_NOT_ALLOWED,
    Reason.MCP_BODY_UNAVAILABLE,
    Reason.MCP_INVALID_BODY,
    Reason.MCP_BODY_TOO_LARGE,
    Reason.MCP_AMBIGUOUS_BODY,
    Reason.MCP_HEADER_MISMATCH,
)
_RpcJudge = Callable[[ProtocolPolicy], RpcVerdict]


@dataclass(frozen=True, slots=True)
class _Match:
    rules: tuple[EgressRule, ...]  # rules that match host, port, method and path (and the JSON-RPC message)
    reason: Reason  # deepest failure when ``rules`` is empty
    verdicts: Mapping[int, RpcVerdict] = field(default_factory=dict)  # id(rule) -> verdict, MCP/A2A rules
    detail: str = ""


_HTTP_PORT = DEFAULT_PORTS["http"]
_HTTPS_PORT = DEFAULT_PORTS["https"]
_NO_HOST = _Match((), Reason.HOST_NOT_ALLOWED)


def _fits(rule: EgressRule, port: int, intercepted: bool) -> bool:
    """Whether ``rule`` can judge an HTTP request on ``port``: a passthrough rule never can (Envoy
    sees no request); an ``intercept`` rule judges only intercepted requests, and only those."""
    if rule.tls == "intercept":
        return intercepted and (rule.port or _HTTPS_PORT) == port
    return not intercepted and rule.tls != "passthrough" and (rule.port or _HTTP_PORT) == port


def _judge_rpc(matched: tuple[EgressRule, ...], rpc: _RpcJudge) -> _Match:
    """Judge the JSON-RPC message against the MCP/A2A rules among ``matched`` (plain rules pass)."""
    verdicts = {id(rule): rpc(rule.rpc) for rule in matched if rule.rpc is not None}
    allowed = tuple(r for r in matched if r.rpc is None or verdicts[id(r)].refusal is None)
    if allowed:
        return _Match(allowed, Reason.ALLOWED, verdicts)
    deepest = max(verdicts.values(), key=lambda v: _STAGES.index(Reason(v.refusal or Reason.ALLOWED)))
    assert deepest.refusal is not None
    return _Match((), Reason(deepest.refusal), verdicts, deepest.detail)


def _match(task: Task, target: Target, method: str, intercepted: bool = False, rpc: _RpcJudge | None = None) -> _Match:
    candidates = task.rules_for_host(target.host)
    if not candidates:
        return _NO_HOST
    port, path = target.port, target.path
    matched = tuple(
        rule
        for rule in candidates
        if _fits(rule, port, intercepted)
        and (rule.methods is None or method in rule.methods)
        and rule.paths.matches(path)
    )
    if matched and rpc is not None and any(rule.rpc is not None for rule in matched):
        return _judge_rpc(matched, rpc)
    if matched:
        return _Match(matched, Reason.ALLOWED)
    deepest = 0  # nothing allows it: find the check that failed last, to explain the deny
    for rule in candidates:
        if not _fits(rule, port, intercepted):
            continue
        deepest = max(deepest, 1)
        if rule.methods is None or method in rule.methods:
            deepest = 2
            break
    return _Match((), _STAGES[deepest + 1])


def _charge(
    task: Task, rules: tuple[EgressRule, ...], match: _Match, budgets: BudgetLedger
) -> tuple[EgressRule, ToolRule | None] | None:
    """The first (rule, tools entry) with budget left, charged; ``None`` when all are spent. A
    ``tools/call`` is charged to the task, the rule and the tools entry at once."""
    for rule in rules:
        verdict = match.verdicts.get(id(rule))
        for tool in verdict.tools if verdict is not None and verdict.tools else (None,):
            limits = budget_limits(task, rule, tool)
            if budgets.available(limits):
                return (rule, tool) if budgets.try_consume(limits) else None
    return None


def _remaining(task: Task, rule: EgressRule, tool: ToolRule | None, budgets: BudgetLedger) -> int | None:
    """Calls left under the tightest limited counter of ``(rule, tool)`` (``None``: no limit)."""
    left = [limit - budgets.used(key) for key, limit in budget_limits(task, rule, tool) if limit is not None]
    return max(0, min(left)) if left else None


def _gated(rule: EgressRule, method: str, match: _Match) -> bool:
    """Whether a call under ``rule`` waits for a human approval (the rule's ``approval`` conditions)."""
    approval = rule.approval
    if approval is None:
        return False
    verdict = match.verdicts.get(id(rule))
    tool = verdict.fields.get("tool") if verdict is not None and verdict.fields.get("method") == "tools/call" else None
    return approval.applies(method, tool if isinstance(tool, str) else None, verdict.arguments if verdict else None)


_NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


def _content(request: AuthzRequest, method: str, match: _Match, rules: tuple[EgressRule, ...]) -> str | None:
    """What an approval binds of the call's content: a ``tools/call``'s arguments digest, the body's
    digest, :data:`EMPTY_BODY` - or ``None`` when the call has a body the sidecar did not see."""
    for rule in rules:
        verdict = match.verdicts.get(id(rule))
        if verdict is not None and "arguments_digest" in verdict.fields:
            return str(verdict.fields["arguments_digest"])
    if request.body is not None:
        cap = request.rpc.body_cap if request.rpc is not None else request.body_cap
        if cap and len(request.body) > cap:  # Envoy sent the first cap + 1 bytes: the rest is unseen
            return None
        return body_digest(request.body)
    headers = request.headers
    length = headers.get("content-length", "")
    if "transfer-encoding" in headers or (length and length != "0"):
        return None
    if method not in _NO_BODY_METHODS and not length:  # a body is possible and its length unknown
        return None
    return EMPTY_BODY


def _binding(
    agent: str,
    task: Task,
    target: Target,
    method: str,
    content: str,
    headers: Mapping[str, str],
    match: _Match,
    rules: tuple[EgressRule, ...],
) -> CallBinding:
    tool = ""
    for rule in rules:
        verdict = match.verdicts.get(id(rule))
        if verdict is not None and verdict.fields.get("method") == "tools/call":
            tool = str(verdict.fields.get("tool", ""))
            break
    return CallBinding(
        agent,
        task.id,
        target.host,
        target.port,
        method,
        target.path,
        target.query,
        tool,
        content,
        task.fingerprint,
        headers_digest(headers),
    )


def _through_approval(
    approvals: ApprovalGate | None,
    agent: str,
    task: Task,
    target: Target,
    method: str,
    request: AuthzRequest,
    match: _Match,
    gated: tuple[EgressRule, ...],
    budgets: BudgetLedger,
    now: float,
    decision_id: str,
    seen: dict[str, Any],
) -> tuple[_Match | Reason, str, tuple[EgressRule, ToolRule | None] | None]:
    """The approval flow of a call only approval-gated rules allow: ``(outcome, detail, charged)``.

    A usable approval for exactly this call charges the budget first (a spent budget keeps the
    approval for later), then is consumed durably; otherwise the gate's deny reason, with the id of
    the approval now waiting in ``seen["approval"]``.
    """
    content = _content(request, method, match, gated)
    if content is None:
        detail = (
            "the call has a body this Envoy route does not send to the sidecar whole: an approval could not bind it"
        )
        return Reason.APPROVAL_BODY_UNAVAILABLE, detail, None
    if approvals is None:
        return Reason.APPROVAL_REQUIRED, "the rule requires a human approval (no approval book here)", None
    call = _binding(agent, task, target, method, content, request.headers, match, gated)
    verdict = approvals.check(call, now=now, task_expires_at=task.expires_at)
    seen["approval"] = verdict.record
    if verdict.reason is not Reason.ALLOWED:
        return verdict.reason, f"approval {verdict.approval_id}: {_APPROVAL_DETAIL[verdict.reason]}", None
    charged = _charge(task, gated, match, budgets)
    if charged is None:
        seen["remaining"] = 0
        return Reason.BUDGET_EXHAUSTED, "the task's call budget is spent (the approval is kept)", None
    seen["approval"] = approvals.consume(verdict.approval_id, now=now, decision_id=decision_id)
    return match, "", charged


_APPROVAL_DETAIL = {
    Reason.APPROVAL_REQUIRED: "waiting for a human approval (agent-authz approve ID)",
    Reason.APPROVAL_MISMATCH: "an approval exists for this call with other arguments, body or query",
    Reason.APPROVAL_REPLAYED: "the approval of this call was already used (one call per approval)",
    Reason.APPROVAL_EXPIRED: "the approval of this call expired",
    Reason.APPROVAL_POLICY_CHANGED: "the task's declaration changed since the call was put up for approval",
}


def _default_audience(scheme: str, target: Target) -> str:
    default = DEFAULT_PORTS.get(scheme)
    return f"{scheme}://{target.host}" if target.port == default else f"{scheme}://{target.host}:{target.port}"


def decide_egress(
    policy: PolicyIndex,
    request: AuthzRequest,
    *,
    now: float,
    decision_id: str,
    budgets: BudgetLedger,
    minter: TokenMinter,
    cnf: str | None = None,
    blocks: Blocks | None = None,
    approvals: ApprovalGate | None = None,
    feed_stale: str | None = None,
) -> Decision:
    """Decide one egress call of the local agent.

    After the rules match: rules labelled above the task's ``max_sensitivity`` drop out
    (``sensitivity_not_allowed`` when none is left); a rule whose ``approval`` covers the call is used
    only through an approval for exactly this call (:class:`~sidecar.policy.gates.ApprovalGate`),
    charged first and consumed before the allow; rules without approval are preferred.

    Args:
        policy: the active compiled policy.
        request: the call as Envoy saw it.
        now: POSIX seconds.
        decision_id: id to put on the decision.
        budgets: the call counters (spent here on allow).
        minter: mints or reuses the task-scoped token.
        cnf: bind tokens to this SVID thumbprint (RFC 8705 §3.1), or ``None``.
        blocks: tasks the freeze ladder blocks (frozen: ``task_quarantined``; killed: ``task_revoked``).
        approvals: the approval book; without one an approval-gated call is denied ``approval_required``
            with no ``approval_id``.
        feed_stale: while the revocation feed is stale, which tasks it denies (``delegated`` or
            ``all``); ``None`` otherwise.

    Returns:
        A :class:`Decision`. Deny reasons: ``bad_request``, ``no_task``, ``unknown_task``,
        ``task_not_for_agent``, ``task_ambiguous``, ``task_not_yet_valid``, ``task_expired``,
        ``task_revoked``, ``task_quarantined``, ``host_not_allowed``, ``port_not_allowed``,
        ``method_not_allowed``, ``path_not_allowed``, ``sensitivity_not_allowed``, ``approval_*``,
        ``budget_exhausted``, ``tls_origination_unavailable``, ``misdirected_request`` (an intercepted
        connection's request for another host or port than the one its SNI named: RFC 9110 §7.4, 421;
        or a ``CONNECT`` tunnel's TLS naming another host than the ``CONNECT``), ``headers_too_large``
        (the token or API key would push the request over Envoy's header limits; the budget is given
        back), ``revocation_feed_stale`` (503). An allow removes every ``x-agent-authz-*`` header the
        agent sent itself.

    Raises:
        StateError: an approval could not be stored or consumed (the runtime denies the call).
    """
    agent = policy.agent
    method = request.method.upper()
    intercept = request.interception
    # what every record of this call carries, allowed or not
    seen: dict[str, Any] = {
        "agent": agent,
        "method": method,
        "destination": request.destination,
        "sni": intercept.host if intercept else "",
        "tls": "intercept" if intercept else "",
        "upstream_verify": intercept.upstream_verify if intercept else "",
    }
    if intercept is not None and request.connect:
        seen["connect"] = request.connect
    rpc_protocol = request.rpc.protocol if request.rpc is not None else ""
    judged: list[tuple[str, RpcVerdict]] = []
    rpc = _rpc_judge(request, method, judged)
    if rpc_protocol:
        seen["rpc_protocol"] = rpc_protocol
    try:
        if method == "CONNECT":
            raise BadRequestError("CONNECT is accepted only to port 443 (the proxy intercepts HTTPS there)")
        target = normalize_target(request.authority, request.path, "https" if intercept else request.scheme or "http")
    except BadRequestError as exc:
        return Decision(
            False, Reason.BAD_REQUEST, 400, decision_id, str(exc), Direction.EGRESS, path=request.path[:256], **seen
        )
    seen.update(host=target.host, port=target.port, path=target.path)
    if intercept is not None and (target.host != intercept.host or target.port != intercept.port):
        return Decision(
            False,
            Reason.MISDIRECTED_REQUEST,
            421,
            decision_id,
            f"the TLS connection was opened for {intercept.target}, the request names {target.host}:{target.port}",
            Direction.EGRESS,
            **seen,
        )
    tunnel = _tunnel_target(request.connect) if intercept is not None and request.connect else None
    if intercept is not None and tunnel is not None and tunnel != (intercept.host, intercept.port):
        return Decision(
            False,
            Reason.MISDIRECTED_REQUEST,
            421,
            decision_id,
            f"the CONNECT tunnel was opened to {request.connect[:260]}, its TLS names {intercept.target}",
            Direction.EGRESS,
            **seen,
        )
    task, outcome, detail = _select(
        policy,
        request.headers.get(TASK_HEADER),
        agent,
        target,
        method,
        now,
        intercept is not None,
        rpc,
        blocks,
        feed_stale,
    )
    if task is not None and task.agent == agent:
        seen.update(
            task_id=task.id,
            on_behalf_of=task.on_behalf_of,
            txn=task.txn,
            act_chain=task.act_chain,
            purpose=task.purpose,
            sensitivity=SENSITIVITY_NAMES[policy.label(target.host, None)],
        )
    elif task is not None:  # another agent's task, named in x-agent-task: its id (the agent's words), nothing else
        seen.update(task_id=task.id)
    rule: EgressRule | None = None
    tool: ToolRule | None = None
    match = outcome if isinstance(outcome, _Match) else None
    if match is not None:
        rules = match.rules
        if not request.upstream_tls:
            rules = tuple(r for r in rules if r.tls != "originate")
        if not rules:
            outcome = Reason.TLS_ORIGINATION_UNAVAILABLE
            detail = "the rule needs 'tls: originate' and this Envoy route sends plain HTTP (re-render the bootstrap)"
        else:
            assert task is not None
            host = target.host
            if task.max_sensitivity is not None:
                labels = {id(r): policy.label(host, r) for r in rules}
                seen["sensitivity"] = SENSITIVITY_NAMES[min(labels.values())]
                within = tuple(r for r in rules if labels[id(r)] <= task.max_sensitivity)
                if not within:
                    outcome = Reason.SENSITIVITY_NOT_ALLOWED
                    detail = (
                        f"the destination is {seen['sensitivity']}, above the task's max_sensitivity "
                        f"{SENSITIVITY_NAMES[task.max_sensitivity]}"
                    )
                rules = within
            if rules:
                if any(r.approval is not None for r in rules):
                    free = tuple(r for r in rules if not _gated(r, method, match))
                    gated = tuple(r for r in rules if _gated(r, method, match))
                else:
                    free, gated = rules, ()
                charged = _charge(task, free, match, budgets) if free else None
                if charged is None and gated:
                    outcome, detail, charged = _through_approval(
                        approvals, agent, task, target, method, request, match, gated, budgets, now, decision_id, seen
                    )
                elif charged is None:
                    outcome, detail = Reason.BUDGET_EXHAUSTED, "the task's call budget is spent"
                    seen["remaining"] = 0
                if charged is not None:
                    rule, tool = charged
                    seen["remaining"] = _remaining(task, rule, tool, budgets)
                seen["sensitivity"] = SENSITIVITY_NAMES[policy.label(host, rule or rules[0])]
    verdict = None if rule is None or match is None else match.verdicts.get(id(rule))
    if verdict is None and judged:
        verdict = judged[0][1]
    if verdict is not None:
        protocol = rule.rpc.protocol if rule is not None and rule.rpc is not None else judged[0][0]
        seen.update(rpc=verdict.record(tool) or None, rpc_id=verdict.rpc_id, rpc_protocol=rpc_protocol or protocol)
    if rule is None:
        reason = outcome if isinstance(outcome, Reason) else Reason.INTERNAL_ERROR
        return Decision(False, reason, deny_status(reason), decision_id, detail, Direction.EGRESS, **seen)
    assert task is not None
    to_set: list[tuple[str, str]] = [(DECISION_ID_HEADER, decision_id)]
    to_remove: tuple[str, ...] = _ALWAYS_REMOVE
    token_info = None
    if rule.token:
        if rule.tls == "originate":
            upstream = Target(target.host, rule.upstream_port or DEFAULT_PORTS["https"], target.path, "")
            audience = rule.audience or _default_audience("https", upstream)
        elif rule.tls == "intercept":
            audience = rule.audience or _default_audience("https", target)
        else:
            audience = rule.audience or _default_audience(request.scheme or "http", target)
        minted = minter.token_for(
            task_id=task.id,
            txn=task.txn,
            task_fingerprint=task.fingerprint,
            task_expires_at=task.expires_at,
            subject=task.token_subject,
            actor=task.token_actor,
            client_id=agent,
            audience=audience,
            scope=rule.scope,
            now=now,
            cnf=cnf,
            sensitivity=seen.get("sensitivity"),
        )
        to_set.append(("authorization", "Bearer " + minted.token))
        token_info = minted.info
    elif rule.credential is None or rule.credential.header != "authorization":
        to_remove = _ALWAYS_REMOVE_WITH_AUTHORIZATION
    if rule.credential is not None:
        to_set.append((rule.credential.header, rule.credential.value))
    list_filter = None
    if verdict is not None and rule.rpc is not None and rule.rpc.protocol == "mcp":
        if verdict.fields.get("method") == "tools/list":
            assert match is not None
            list_filter = _visible_tools(match)
            to_set.append(("accept-encoding", "identity"))  # the filter reads the response as sent
            to_set.append((LIST_FILTER_HEADER, "1"))  # Envoy runs ext_proc on this response only
            to_remove = tuple(h for h in to_remove if h != LIST_FILTER_HEADER)
        seen["list_filter"] = list_filter
    to_remove = tuple(dict.fromkeys((*to_remove, *forged_reserved(request.headers, (k for k, _ in to_set)))))
    too_large = over_envoy_limits(request.headers, to_set, to_remove)
    if too_large is not None:
        budgets.refund(budget_limits(task, rule, tool))
        seen["remaining"] = _remaining(task, rule, tool, budgets)
        reason = Reason.HEADERS_TOO_LARGE
        return Decision(False, reason, deny_status(reason), decision_id, too_large, Direction.EGRESS, **seen)
    return Decision(
        True,
        Reason.ALLOWED,
        200,
        decision_id,
        "",
        Direction.EGRESS,
        rule=rule.name,
        headers_to_set=tuple(to_set),
        headers_to_remove=to_remove,
        token=token_info,
        **seen,
    )


def _tunnel_target(authority: str) -> tuple[str, int]:
    """The ``(host, port)`` a ``CONNECT`` named (Envoy's copy; an unreadable one matches nothing)."""
    try:
        return normalize_authority(authority, "https")
    except BadRequestError:
        return ("", 0)


def _rpc_judge(request: AuthzRequest, method: str, judged: list[tuple[str, RpcVerdict]]) -> _RpcJudge:
    """The judge of this request's JSON-RPC message, once per protocol policy (``(protocol,
    verdict)`` pairs kept in ``judged`` for the record of a deny)."""
    cache: dict[int, RpcVerdict] = {}
    cap = request.rpc.body_cap if request.rpc is not None else 0
    body = request.body if cap else None

    def rpc(policy: ProtocolPolicy) -> RpcVerdict:
        verdict = cache.get(id(policy))
        if verdict is None:
            verdict = judge(policy, http_method=method, headers=request.headers, body=body, cap=cap)
            cache[id(policy)] = verdict
            judged.append((policy.protocol, verdict))
        return verdict

    return rpc


def _visible_tools(match: _Match) -> tuple[str, ...]:
    """The tool name patterns of every MCP rule that allowed a ``tools/list``: what it may show."""
    patterns: dict[str, None] = {}
    for rule in match.rules:
        if rule.rpc is not None and rule.rpc.protocol == "mcp":
            patterns.update(dict.fromkeys(rule.rpc.tool_names.patterns))
    return tuple(patterns)


def _select(
    policy: PolicyIndex,
    chosen: str | None,
    agent: str,
    target: Target,
    method: str,
    now: float,
    intercepted: bool,
    rpc: _RpcJudge | None = None,
    blocks: Blocks | None = None,
    feed_stale: str | None = None,
) -> tuple[Task | None, _Match | Reason, str]:
    """Pick the task and match the call: ``(task, match or deny reason, detail)``."""
    if chosen is not None:
        task = policy.tasks_by_id.get(chosen)
        if task is None:
            return None, Reason.UNKNOWN_TASK, "no task with the id named in x-agent-task"
        if task.agent != agent:
            return task, Reason.TASK_NOT_FOR_AGENT, "the task named in x-agent-task belongs to another agent"
        state = task_state(task, now, feed_stale, blocks=blocks)
        if state is not None:
            return task, state, _state_detail(task, state, blocks)
        return _explained(task, _match(task, target, method, intercepted, rpc))
    tasks = policy.tasks_by_agent.get(agent, ())
    if not tasks:
        return None, Reason.NO_TASK, "no task is declared for this agent"
    if len(tasks) > 1:  # only the tasks that name this host can allow the call
        tasks = policy.tasks_for_host(agent, target.host)
        if not tasks:
            return None, Reason.HOST_NOT_ALLOWED, "no task of this agent names this host"
    active = [t for t in tasks if task_state(t, now, feed_stale, blocks=blocks) is None]
    if not active:
        state = task_state(tasks[0], now, feed_stale, blocks=blocks)
        assert state is not None
        block = blocks.get(tasks[0].id) if blocks else None
        if block is not None and block[0] is state:
            return tasks[0], state, f"no active task: {block[1]}"
        return tasks[0], state, f"no active task (first: {state.value})"
    if len(active) == 1:
        return _explained(active[0], _match(active[0], target, method, intercepted, rpc))
    results = [(t, _match(t, target, method, intercepted, rpc)) for t in active]
    allowed = [(t, m) for t, m in results if m.rules]
    if len(allowed) > 1:
        return None, Reason.TASK_AMBIGUOUS, "several active tasks allow this call; name one in x-agent-task"
    if allowed:
        return allowed[0][0], allowed[0][1], ""
    return _explained(*max(results, key=lambda tm: _STAGES.index(tm[1].reason)))


def _state_detail(task: Task, state: Reason, blocks: Blocks | None) -> str:
    """Why the task cannot allow: the ladder's words for a freeze or kill, else its state."""
    block = blocks.get(task.id) if blocks else None
    if block is not None and block[0] is state and not task.revoked:
        return block[1]
    return f"task is {state.value.removeprefix('task_').replace('_', ' ')}"


def _explained(task: Task, match: _Match) -> tuple[Task, _Match | Reason, str]:
    if match.rules:
        return task, match, ""
    if match.detail:
        return task, match.reason, match.detail
    return task, match.reason, f"no egress rule of the task allows this call ({match.reason.value})"


def dry_run(decision: Decision, headers: Mapping[str, str] | None = None) -> Decision:
    """The dry-run form of ``decision``: the call is let through, the policy's verdict is kept aside.

    A call the policy allows keeps its obligations (token, API key, header removal) and is marked
    ``dry_run``. A call the policy denies becomes an allow with reason ``dry_run``, ``would_reason`` set
    to the deny reason, no token or API key, and the agent's credential headers (``authorization``,
    ``proxy-authorization``, ``x-agent-task``), the list-filter marker (``x-agent-authz-list-filter``)
    and every other ``x-agent-authz-*`` header of ``headers`` (the request's) still removed, so a
    credential the task would not have granted never leaves the pod.
    """
    if decision.allow:
        return replace(decision, dry_run=True, would_reason=decision.reason)
    forged = forged_reserved(headers or {}, (DECISION_ID_HEADER,))
    return replace(
        decision,
        allow=True,
        reason=Reason.DRY_RUN,
        http_status=200,
        dry_run=True,
        would_reason=decision.reason,
        headers_to_set=((DECISION_ID_HEADER, decision.decision_id),),
        headers_to_remove=tuple(dict.fromkeys((*_AGENT_CREDENTIALS, *forged))),
        token=None,
    )
