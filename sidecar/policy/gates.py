"""What the egress decision asks of state kept outside the compiled policy: human approvals.

The decision is synchronous and owns no state; an approval rule (``approval`` of an egress rule)
hands the call, reduced to a :class:`CallBinding`, to an :class:`ApprovalGate`
(:class:`sidecar.control.approvals.ApprovalBook`), which says whether an approval for exactly that
call is waiting to be used, and consumes it - durably, before the allow is answered.

A binding is what an approval approves (the Envoy AI Gateway design discussion lists the same):
the agent, the task, the destination (host and port), the method, the path and query, the MCP tool,
a digest of the arguments (``tools/call``) or of the body, a digest of the request headers
(:func:`headers_digest`: what an upstream could act on - ``X-HTTP-Method-Override`` and the like - but
not what changes on every retry or what the proxy replaces), and the policy version (the task
declaration's fingerprint). Its :attr:`~CallBinding.digest` covers everything but the policy
version, which is compared on use: a changed declaration invalidates the approval instead of
making the call unknown.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import orjson

from sidecar.decision import Reason

__all__ = [
    "EMPTY_BODY",
    "UNBOUND_HEADERS",
    "ApprovalGate",
    "CallBinding",
    "GateVerdict",
    "body_digest",
    "headers_digest",
]

EMPTY_BODY = "none"
"""The content digest of a call without a body."""


def body_digest(body: bytes) -> str:
    """``sha256:<hex>`` of a request body as Envoy sent it."""
    return "sha256:" + hashlib.sha256(body).hexdigest()


UNBOUND_HEADERS = frozenset(
    {
        # the request line and framing (bound as host, port, method, path, query and content)
        "host",
        "content-length",
        "transfer-encoding",
        # hop by hop (RFC 9110 §7.6.1)
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        # credentials the sidecar strips and replaces (the minted token, the injected API key)
        "authorization",
        "proxy-authorization",
        # what a client, a tracer or a proxy changes on every retry
        "date",
        "x-request-id",
        "traceparent",
        "tracestate",
        "baggage",
        "b3",
        "sentry-trace",
        "uber-trace-id",
        "x-amzn-trace-id",
        "x-cloud-trace-context",
        "x-agent-task",
        "mcp-session-id",
    }
)
"""Request headers an approval does not bind: framing, hop-by-hop headers, the credentials the sidecar
replaces, and what changes on every retry (request ids and trace context); also every header whose name
starts with ``:``, ``x-envoy-``, ``x-forwarded-``, ``x-b3-`` or ``x-agent-authz-``. The task is bound
by its id, so ``x-agent-task`` is not bound again."""

_UNBOUND_PREFIXES = (":", "x-envoy-", "x-forwarded-", "x-b3-", "x-agent-authz-")


def headers_digest(headers: Mapping[str, str]) -> str:
    """``sha256:<hex>`` over the request headers an approval binds (names lower case, sorted; a
    repeated header's values as Envoy joined them), ``none`` when there are none.

    Args:
        headers: lower-case name -> value, as in :class:`~sidecar.decision.AuthzRequest`.
    """
    bound = {
        name: value
        for name, value in headers.items()
        if name not in UNBOUND_HEADERS and not name.startswith(_UNBOUND_PREFIXES)
    }
    if not bound:
        return EMPTY_BODY
    return "sha256:" + hashlib.sha256(orjson.dumps(bound, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class CallBinding:
    """One call, as an approval binds it.

    Attributes:
        agent / task_id: who calls, under which task.
        host / port / method / path: the normalized destination and request (path without query).
        query: the raw query string (part of the call: ``?id=1`` and ``?id=2`` are different calls).
        tool: the MCP tool of a ``tools/call``, else ``""``.
        content: ``arguments_digest`` of a ``tools/call``, the body's :func:`body_digest`, or
            :data:`EMPTY_BODY`.
        policy_version: the task declaration's fingerprint when the call was made.
        headers: :func:`headers_digest` of the request (``""`` in approvals stored before headers
            were bound: such an approval matches no call).
    """

    agent: str
    task_id: str
    host: str
    port: int
    method: str
    path: str
    query: str
    tool: str
    content: str
    policy_version: str
    headers: str = ""

    def _hash(self, fields: Mapping[str, object]) -> str:
        return "sha256:" + hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()

    @property
    def shape(self) -> Mapping[str, object]:
        """Everything but the content and query: a call "like" another one."""
        return {
            "agent": self.agent,
            "task_id": self.task_id,
            "host": self.host,
            "port": self.port,
            "method": self.method,
            "path": self.path,
            "tool": self.tool,
        }

    @property
    def digest(self) -> str:
        """``sha256:`` over the whole call but the policy version (canonical JSON, sorted keys)."""
        return self._hash({**self.shape, "query": self.query, "content": self.content, "headers": self.headers})

    @property
    def shape_digest(self) -> str:
        """``sha256:`` over :attr:`shape`."""
        return self._hash(self.shape)

    def as_record(self) -> dict[str, object]:
        """What records and the approval listing show of the call (the query, content and headers as
        digests)."""
        query = "" if not self.query else "sha256:" + hashlib.sha256(self.query.encode()).hexdigest()
        return {
            **self.shape,
            "query_digest": query,
            "content_digest": self.content,
            "headers_digest": self.headers,
            "policy_version": self.policy_version,
        }


@dataclass(frozen=True, slots=True)
class GateVerdict:
    """What the gate says about one call.

    Attributes:
        reason: ``allowed`` when an approval for exactly this call may be used now; otherwise the deny
            reason (``approval_required``, ``approval_mismatch``, ``approval_replayed``,
            ``approval_expired``, ``approval_policy_changed``).
        approval_id: the approval to use (``allowed``), or the one now waiting for a human.
        record: what the decision record says of it (``id``, ``status``, ``expires_at``, ...).
    """

    reason: Reason
    approval_id: str
    record: Mapping[str, object]


class ApprovalGate(Protocol):
    """Where approvals live (:class:`sidecar.control.approvals.ApprovalBook`)."""

    def check(self, call: CallBinding, *, now: float, task_expires_at: float) -> GateVerdict:
        """The verdict for ``call`` at ``now``; a call without a usable approval is put up for one
        (kept durably, its id in the verdict).

        Raises:
            StateError: a new waiting approval could not be stored.
        """
        ...

    def consume(self, approval_id: str, *, now: float, decision_id: str) -> Mapping[str, object]:
        """Use the approval (it allows no other call), durably, before the allow is answered.

        Returns:
            The record view of the consumed approval.

        Raises:
            StateError: the store could not be written (the call must not be allowed).
        """
        ...
