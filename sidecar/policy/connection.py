"""The connection decision: a TLS connection the agent opened itself, or other TCP.

Behind the transparent ``outbound`` listener Envoy cannot read what a TLS connection carries, and
nothing at all of a protocol it does not know. It asks once per connection (network ext_authz);
the answer is judged on the SNI and the original destination:

1. the original destination must be known and not loopback (a connection that reached the
   listener without being redirected has no destination of its own) - else ``unknown_destination``;
2. neither HTTP nor TLS: ``tcp_not_allowed``, always;
3. TLS without a server name: ``no_sni``; a server name that is not a DNS name (an IP literal,
   odd characters, RFC 6066 §3): ``bad_request``;
4. an active task with a rule for that host and ``tls: passthrough`` on that port (default 443)
   allows it, charging the rules' and task's ``max_calls`` per connection - **if the original
   destination is an address of that host**: its ``envoy.destinations`` pin, or an address the
   pod's DNS (the sidecar's DNS proxy) answered for the name, unexpired (``addresses_of``); else
   ``destination_mismatch``, nothing charged. Otherwise the deepest failure: ``host_not_allowed`` <
   ``tls_not_allowed`` (rules name the host, none with ``tls: passthrough``) < ``port_not_allowed``;
   ``budget_exhausted``; ``sensitivity_not_allowed`` when only rules labelled above the task's
   ``max_sensitivity`` allow it. A frozen task (the freeze ladder's ``blocks``) is
   ``task_quarantined``, a killed one ``task_revoked``.

The connection goes to the original destination, which step 4 bound to the name: an allowed SNI
sent to any other address is refused (see docs/concepts/interception.md, "The passthrough binding").
No token is injected: Envoy cannot change what the TLS connection carries.

A TLS connection to a server name and port that an active task intercepts (``tls: intercept``)
never gets here: Envoy terminates it in a filter chain of its own. Inside a proxy ``CONNECT``
tunnel (:attr:`~sidecar.decision.AuthzRequest.via_connect`) there is no original destination and
nothing is passed through: a connection that reaches this check there is denied after the SNI
checks - ``host_not_allowed``, or ``tls_not_allowed`` when rules name the host (none intercepting
it on port 443).

The ``CONNECT`` itself (:func:`decide_connect`, the proxy listener's ``CONNECT host:port``) is a
decision of its own: a tunnel carries only what Envoy can read, so it is allowed only to a
``host:port`` an active task of the local agent intercepts (``tls: intercept``, port 443: the
tunnels end in the ``intercept_connect`` listener, whose chains are those of port 443). Else the
deepest failure: ``host_not_allowed`` < ``tls_not_allowed`` (rules name the host, none with
``tls: intercept``; a ``tls: passthrough`` rule included: passthrough is for the transparent
listener) < ``port_not_allowed``; ``bad_request`` for an authority without a port or not a DNS name.
It charges no budget: the requests inside are the calls.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection
from dataclasses import replace

from sidecar.decision import AuthzRequest, Decision, Direction, Protocol, Reason, deny_status
from sidecar.errors import BadRequestError
from sidecar.http_norm import DEFAULT_PORTS, normalize_authority
from sidecar.policy.budget import BudgetLedger, budget_limits
from sidecar.policy.model import SENSITIVITY_NAMES, Blocks, EgressRule, PolicyIndex, Task, task_state

__all__ = ["decide_connect", "decide_connection", "parse_destination", "sni_host"]

_STAGES = (Reason.HOST_NOT_ALLOWED, Reason.TLS_NOT_ALLOWED, Reason.PORT_NOT_ALLOWED)


def parse_destination(destination: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    """``ip:port`` or ``[v6]:port`` to ``(address, port)``; ``None`` when unusable.

    Unusable: empty, malformed, port 0, or a loopback or unspecified address (a connection made to
    the listener itself, not redirected to it).
    """
    host, sep, port_text = destination.rpartition(":")
    if not sep or not port_text.isdigit() or not port_text.isascii():
        return None
    try:
        address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None
    port = int(port_text)
    if not 0 < port < 65536 or address.is_loopback or address.is_unspecified:
        return None
    return address, port


def sni_host(sni: str) -> str:
    """The canonical host of a TLS server name (lower case, no trailing dot).

    Raises:
        BadRequestError: not a DNS host name: a port, an IP literal (RFC 6066 §3 forbids them),
            odd characters, an overlong name or label.
    """
    if ":" in sni or "[" in sni:
        raise BadRequestError("SNI is not a DNS host name")
    host, _ = normalize_authority(sni, "https")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    raise BadRequestError("SNI is an IP literal (RFC 6066 §3)")


def _stage(task: Task, host: str, port: int) -> tuple[int, tuple[EgressRule, ...]]:
    candidates = task.rules_for_host(host)
    if not candidates:
        return 0, ()
    passthrough = [r for r in candidates if r.tls == "passthrough"]
    if not passthrough:
        return 1, ()
    matched = tuple(r for r in passthrough if (r.port or DEFAULT_PORTS["https"]) == port)
    return (3, matched) if matched else (2, ())


def decide_connection(
    policy: PolicyIndex,
    request: AuthzRequest,
    *,
    now: float,
    decision_id: str,
    budgets: BudgetLedger,
    addresses_of: Callable[[str], Collection[ipaddress.IPv4Address | ipaddress.IPv6Address]],
    blocks: Blocks | None = None,
    feed_stale: str | None = None,
) -> Decision:
    """Decide one egress connection (``request.protocol`` is ``tls`` or ``tcp``).

    Args:
        policy: the active compiled policy.
        request: the connection as Envoy saw it (``sni``, ``destination``).
        now: POSIX seconds.
        decision_id: id to put on the decision.
        budgets: the call counters (one connection = one call).
        addresses_of: the known addresses of a canonical host name (its pin and the DNS answers):
            a passthrough connection must go to one of them.
        blocks: tasks the freeze ladder blocks.
        feed_stale: while the revocation feed is stale, which tasks it denies (``delegated`` or
            ``all``, :func:`~sidecar.policy.model.task_state`); ``None`` otherwise.

    Returns:
        A :class:`Decision` (see the module docstring for the reasons).
    """
    destination = parse_destination(request.destination)
    base = Decision(
        False,
        Reason.TCP_NOT_ALLOWED,
        403,
        decision_id,
        "",
        Direction.EGRESS,
        agent=policy.agent,
        port=destination[1] if destination else 0,
        protocol=request.protocol,
        sni=request.sni[:256],
        destination=request.destination[:64],
    )

    def deny(reason: Reason, detail: str, task: Task | None = None) -> Decision:
        return replace(
            base,
            reason=reason,
            http_status=deny_status(reason),
            detail=detail,
            task_id=task.id if task else None,
            on_behalf_of=task.on_behalf_of if task else None,
            purpose=task.purpose if task else None,
        )

    via_connect = request.via_connect
    if destination is None and not via_connect:
        return deny(Reason.UNKNOWN_DESTINATION, "no usable original destination (not a redirected connection)")
    if request.protocol is not Protocol.TLS:
        return deny(Reason.TCP_NOT_ALLOWED, "neither HTTP nor TLS: only HTTP and TLS leave through Envoy")
    if not request.sni:
        return deny(Reason.NO_SNI, "the TLS ClientHello names no server (SNI)")
    try:
        host = sni_host(request.sni)
    except BadRequestError as exc:
        return deny(Reason.BAD_REQUEST, str(exc))
    base = replace(base, host=host)
    if via_connect or destination is None:
        named = policy.tasks_for_host(policy.agent, host)
        reason = Reason.TLS_NOT_ALLOWED if named else Reason.HOST_NOT_ALLOWED
        detail = "through the proxy (CONNECT) only hosts a task intercepts on port 443 ('tls: intercept') are reached"
        return deny(reason, detail, named[0] if named else None)

    tasks = policy.tasks_by_agent.get(policy.agent, ())
    if not tasks:
        return deny(Reason.NO_TASK, "no task is declared for this agent")
    active = [t for t in tasks if task_state(t, now, feed_stale, blocks=blocks) is None]
    if not active:
        state = task_state(tasks[0], now, feed_stale, blocks=blocks)
        assert state is not None
        block = blocks.get(tasks[0].id) if blocks else None
        detail = f"no active task: {block[1]}" if block is not None and block[0] is state else ""
        return deny(state, detail or f"no active task (first: {state.value})", tasks[0])
    deepest, deepest_task = -1, active[0]
    exhausted: Task | None = None
    bound: bool | None = None
    too_sensitive: tuple[Task, int] | None = None
    for task in active:  # declaration order: a connection cannot name its task
        stage, rules = _stage(task, host, destination[1])
        if stage > deepest:
            deepest, deepest_task = stage, task
        if rules and bound is None:
            bound = destination[0] in addresses_of(host)
        if rules and not bound:
            return deny(
                Reason.DESTINATION_MISMATCH,
                f"{destination[0]} is not an address of {host} (neither its envoy.destinations pin nor an answer of "
                "the pod's DNS): a passthrough connection goes only to its name's addresses",
                task,
            )
        for rule in rules:
            label = policy.label(host, rule)
            if task.max_sensitivity is not None and label > task.max_sensitivity:
                too_sensitive = too_sensitive or (task, label)
                continue
            limits = budget_limits(task, rule)
            if budgets.available(limits) and budgets.try_consume(limits):
                left = [limit - budgets.used(key) for key, limit in limits if limit is not None]
                return replace(
                    base,
                    allow=True,
                    reason=Reason.ALLOWED,
                    http_status=200,
                    task_id=task.id,
                    on_behalf_of=task.on_behalf_of,
                    purpose=task.purpose,
                    rule=rule.name,
                    sensitivity=SENSITIVITY_NAMES[label],
                    remaining=max(0, min(left)) if left else None,
                )
            exhausted = task
    if exhausted is not None:
        return replace(deny(Reason.BUDGET_EXHAUSTED, "the task's call budget is spent", exhausted), remaining=0)
    if too_sensitive is not None:
        task, label = too_sensitive
        assert task.max_sensitivity is not None
        detail = (
            f"the destination is {SENSITIVITY_NAMES[label]}, above the task's max_sensitivity "
            f"{SENSITIVITY_NAMES[task.max_sensitivity]}"
        )
        return replace(deny(Reason.SENSITIVITY_NOT_ALLOWED, detail, task), sensitivity=SENSITIVITY_NAMES[label])
    reason = _STAGES[deepest]
    return deny(reason, f"no egress rule allows a TLS connection to this host and port ({reason.value})", deepest_task)


_CONNECT_PORT = DEFAULT_PORTS["https"]
_CONNECT_STAGES = (Reason.HOST_NOT_ALLOWED, Reason.TLS_NOT_ALLOWED, Reason.PORT_NOT_ALLOWED)


def _connect_stage(task: Task, host: str, port: int) -> tuple[int, EgressRule | None]:
    candidates = task.rules_for_host(host)
    if not candidates:
        return 0, None
    intercepted = [r for r in candidates if r.tls == "intercept"]
    if not intercepted:
        return 1, None
    for rule in intercepted:
        if (rule.port or _CONNECT_PORT) == port == _CONNECT_PORT:
            return 3, rule
    return 2, None


def decide_connect(
    policy: PolicyIndex,
    request: AuthzRequest,
    *,
    now: float,
    decision_id: str,
    blocks: Blocks | None = None,
    feed_stale: str | None = None,
) -> Decision:
    """Decide a proxy ``CONNECT host:port`` (``request.method`` is ``CONNECT``, ``request.authority`` the
    ``host:port``; see the module docstring for the rule and the reasons).

    Args:
        policy: the active compiled policy.
        request: the ``CONNECT`` as Envoy saw it.
        now: POSIX seconds.
        decision_id: id to put on the decision.
        blocks / feed_stale: as for :func:`decide_connection` (a frozen task opens no tunnel).

    Returns:
        A :class:`Decision` (``method: CONNECT``, the host and port named); an allow tunnels to the
        intercepting listener, whose requests are each decided again.
    """
    base = Decision(
        False,
        Reason.BAD_REQUEST,
        400,
        decision_id,
        "",
        Direction.EGRESS,
        agent=policy.agent,
        method="CONNECT",
        destination=request.destination[:64],
    )

    def deny(reason: Reason, detail: str, task: Task | None = None) -> Decision:
        return replace(
            base,
            reason=reason,
            http_status=deny_status(reason),
            detail=detail,
            task_id=task.id if task else None,
            on_behalf_of=task.on_behalf_of if task else None,
        )

    authority = request.authority
    if ":" not in authority.rpartition("]")[2]:
        return deny(Reason.BAD_REQUEST, "CONNECT needs host:port (RFC 9110 §9.3.6)")
    try:
        host, port = normalize_authority(authority, "https")
        sni_host(host)  # a DNS name, as a tunnel's TLS must name one
    except BadRequestError as exc:
        return deny(Reason.BAD_REQUEST, f"CONNECT {exc}")
    base = replace(base, host=host, port=port)
    if not policy.tasks_by_agent.get(policy.agent, ()):
        return deny(Reason.NO_TASK, "no task is declared for this agent")
    named = policy.tasks_for_host(policy.agent, host)
    if not named:
        return deny(Reason.HOST_NOT_ALLOWED, "no task of this agent names this host")
    active = [t for t in named if task_state(t, now, feed_stale, blocks=blocks) is None]
    if not active:
        state = task_state(named[0], now, feed_stale, blocks=blocks)
        assert state is not None
        return deny(state, f"no active task names this host (first: {state.value})", named[0])
    deepest, deepest_task = -1, active[0]
    for task in active:  # declaration order: a tunnel cannot name its task
        stage, rule = _connect_stage(task, host, port)
        if rule is not None:
            return replace(
                base,
                allow=True,
                reason=Reason.ALLOWED,
                http_status=200,
                task_id=task.id,
                on_behalf_of=task.on_behalf_of,
                rule=rule.name,
            )
        if stage > deepest:
            deepest, deepest_task = stage, task
    reason = _CONNECT_STAGES[deepest]
    detail = {
        Reason.HOST_NOT_ALLOWED: "no task of this agent names this host",
        Reason.TLS_NOT_ALLOWED: "a CONNECT tunnel carries only HTTPS the sidecar reads: no rule gives this host "
        "'tls: intercept' (passthrough is for the transparent listener)",
        Reason.PORT_NOT_ALLOWED: "a CONNECT tunnel is allowed to port 443 of an intercepted host only",
    }[reason]
    return deny(reason, detail, deepest_task)
