"""Compiled agent-protocol rules and the judgement of one JSON-RPC message against them.

Built once per configuration load from :class:`~sidecar.agentproto.spec.AgentProtocolSpec` and then
only read. :func:`judge` is synchronous, does no I/O and never raises on hostile input: every way a
request can fail is a :class:`Refusal` (a stable reason code) with a short ``detail`` that never
quotes argument values.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sidecar.agentproto.digest import arguments_digest, recorded_arguments
from sidecar.agentproto.headers import NAME_PARAMS, HeaderError, check_headers, read_headers
from sidecar.agentproto.jsonrpc import AMBIGUOUS, BodyError, BodyProblem, MessageKind, RpcMessage, parse_message
from sidecar.agentproto.names import Glob, NameSet
from sidecar.agentproto.pointer import MISSING, resolve_pointer, split_pointer
from sidecar.agentproto.spec import AgentProtocolSpec, ArgumentConstraintSpec, compile_pattern

__all__ = [
    "Constraint",
    "ProtocolPolicy",
    "Refusal",
    "RpcVerdict",
    "ToolRule",
    "compile_protocol",
    "json_equal",
    "judge",
]


class Refusal(enum.StrEnum):
    """Why a JSON-RPC message is refused; each value is a decision reason code."""

    MCP_HEADER_MISMATCH = "mcp_header_mismatch"
    MCP_AMBIGUOUS_BODY = "mcp_ambiguous_body"
    MCP_INVALID_BODY = "mcp_invalid_body"
    MCP_BODY_TOO_LARGE = "mcp_body_too_large"
    MCP_BODY_UNAVAILABLE = "mcp_body_unavailable"
    TOOL_NOT_ALLOWED = "tool_not_allowed"
    ARGUMENT_NOT_ALLOWED = "argument_not_allowed"
    RESOURCE_NOT_ALLOWED = "resource_not_allowed"
    PROMPT_NOT_ALLOWED = "prompt_not_allowed"
    RPC_METHOD_NOT_ALLOWED = "rpc_method_not_allowed"


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values as JSON means it: numbers by value (``1`` is ``1.0``), booleans
    distinct from numbers, objects by their members, arrays in order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@dataclass(frozen=True, slots=True)
class Constraint:
    """One compiled argument constraint.

    Attributes:
        pointer: the JSON pointer as written.
        tokens: its reference tokens, unescaped.
        operator: ``equals``, ``in``, ``prefix`` or ``pattern``.
        values: ``(value,)`` for ``equals``, the list for ``in``, ``(prefix,)``, ``(pattern,)``.
        regex: the compiled RE2 pattern for ``pattern``.
    """

    pointer: str
    tokens: tuple[str, ...]
    operator: str
    values: tuple[Any, ...]
    regex: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def compile(cls, pointer: str, spec: ArgumentConstraintSpec) -> Constraint:
        """Compile one ``pointer: {operator: value}`` entry."""
        operator = spec.operator
        if operator == "equals":
            return cls(pointer, split_pointer(pointer), operator, (spec.equals,))
        if operator == "in":
            return cls(pointer, split_pointer(pointer), operator, tuple(spec.in_ or ()))
        if operator == "prefix":
            return cls(pointer, split_pointer(pointer), operator, (spec.prefix,))
        assert spec.pattern is not None
        return cls(pointer, split_pointer(pointer), operator, (spec.pattern,), compile_pattern(spec.pattern))

    def holds(self, arguments: Mapping[str, Any]) -> bool:
        """Whether the value at :attr:`pointer` satisfies the operator (a missing value never does)."""
        value = resolve_pointer(arguments, self.tokens)
        if value is MISSING:
            return False
        if self.operator == "equals":
            return json_equal(value, self.values[0])
        if self.operator == "in":
            return any(json_equal(value, v) for v in self.values)
        if not isinstance(value, str):
            return False
        if self.operator == "prefix":
            return value.startswith(self.values[0])
        return self.regex.fullmatch(value) is not None

    def implies(self, other: Constraint) -> bool:
        """Whether every value this constraint accepts, ``other`` accepts too (same pointer; sound,
        used by attenuation: ``equals``/``in`` values are checked against ``other`` one by one, a
        ``prefix`` implies a shorter ``prefix``, a ``pattern`` only the same ``pattern``)."""
        if self.tokens != other.tokens:
            return False
        if self.operator in ("equals", "in"):
            probe = {"v": None}
            for value in self.values:
                probe["v"] = value
                if not Constraint(other.pointer, ("v",), other.operator, other.values, other.regex).holds(probe):
                    return False
            return True
        if self.operator == "prefix":
            return other.operator == "prefix" and self.values[0].startswith(other.values[0])
        return other.operator == "pattern" and other.values == self.values


@dataclass(frozen=True, slots=True)
class ToolRule:
    """One compiled ``tools`` entry.

    Attributes:
        name: the tool name pattern.
        constraints: all must hold.
        max_calls: calls allowed through this entry over the task's life; ``None`` is unlimited.
        budget_key: the entry's counter key (the rule's key, the name and its occurrence).
        record: pointers whose values decision records carry.
    """

    name: Glob
    constraints: tuple[Constraint, ...]
    max_calls: int | None
    budget_key: str
    record: tuple[str, ...]

    def failing(self, arguments: Mapping[str, Any]) -> Constraint | None:
        """The first constraint that does not hold, or ``None``."""
        return next((c for c in self.constraints if not c.holds(arguments)), None)


@dataclass(frozen=True, slots=True)
class ProtocolPolicy:
    """The compiled agent-protocol part of one egress rule.

    Attributes:
        protocol: ``mcp`` or ``a2a``.
        tools: the ``tools`` entries in order (MCP).
        tool_names: their name patterns as one set (what ``tools/list`` shows).
        resources / prompts: what ``resources/read`` / ``prompts/get`` may name (MCP).
        methods: the other JSON-RPC methods allowed.
    """

    protocol: str
    tools: tuple[ToolRule, ...]
    tool_names: NameSet
    resources: NameSet
    prompts: NameSet
    methods: NameSet

    @property
    def needs_body(self) -> bool:
        """Whether some call can be judged only on the body (a tool with argument constraints, or A2A)."""
        return self.protocol == "a2a" or any(t.constraints for t in self.tools)


def compile_protocol(spec: AgentProtocolSpec, budget_key: str) -> ProtocolPolicy | None:
    """Compile the agent-protocol fields of a rule (``None`` for ``protocol: http``)."""
    if spec.protocol == "http":
        return None
    tools: list[ToolRule] = []
    seen: dict[str, int] = {}
    for entry in spec.tools or ():
        occurrence = seen[entry.name] = seen.get(entry.name, -1) + 1
        tools.append(
            ToolRule(
                name=Glob.compile(entry.name),
                constraints=tuple(Constraint.compile(p, c) for p, c in entry.arguments.items()),
                max_calls=entry.max_calls,
                budget_key=f"{budget_key}/tool:{entry.name}#{occurrence}",
                record=tuple(entry.record),
            )
        )
    return ProtocolPolicy(
        protocol=spec.protocol,
        tools=tuple(tools),
        tool_names=NameSet.compile(t.name.pattern for t in tools),
        resources=NameSet.compile(spec.resources or ()),
        prompts=NameSet.compile(spec.prompts or ()),
        methods=NameSet.compile(spec.effective_rpc_methods()),
    )


@dataclass(frozen=True, slots=True)
class RpcVerdict:
    """The judgement of one message against one rule.

    Attributes:
        refusal: why it is refused, or ``None``.
        detail: a short explanation (never an argument value).
        tools: the ``tools`` entries that allow this ``tools/call``, in order (the caller charges
            the first with budget left); empty for any other method.
        fields: what the decision record says about the message (``method``, ``tool`` /
            ``resource`` / ``prompt``, ``decided_from``, ``arguments_digest``).
        arguments: ``params.arguments`` of a ``tools/call`` read from the body, else ``None``.
        rpc_id: the JSON-RPC ``id`` read from the body (for an error answer), else ``None``.
    """

    refusal: Refusal | None
    detail: str = ""
    tools: tuple[ToolRule, ...] = ()
    fields: Mapping[str, Any] = field(default_factory=dict)
    arguments: Mapping[str, Any] | None = None
    rpc_id: str | int | None = None

    def record(self, chosen: ToolRule | None) -> dict[str, Any]:
        """The record fields, with the arguments ``chosen`` allow-lists."""
        out = dict(self.fields)
        if chosen is not None and chosen.record and self.arguments is not None:
            out["arguments"] = recorded_arguments(self.arguments, chosen.record)
        return out


_BODY_REFUSALS = {BodyProblem.TOO_LARGE: Refusal.MCP_BODY_TOO_LARGE}
_NO_RPC_METHODS = frozenset({"GET", "DELETE", "HEAD", "OPTIONS"})


def _body_refusal(problem: BodyProblem) -> Refusal:
    if problem in _BODY_REFUSALS:
        return _BODY_REFUSALS[problem]
    return Refusal.MCP_AMBIGUOUS_BODY if problem in AMBIGUOUS else Refusal.MCP_INVALID_BODY


def judge(
    policy: ProtocolPolicy,
    *,
    http_method: str,
    headers: Mapping[str, str],
    body: bytes | None,
    cap: int,
) -> RpcVerdict:
    """Judge one HTTP request to an MCP or A2A endpoint against one rule's protocol policy.

    Args:
        policy: the rule's compiled policy.
        http_method: the request's method. A ``GET``, ``DELETE``, ``HEAD`` or ``OPTIONS`` without
            a body carries no JSON-RPC (``GET`` opens a 2025-11-25 server stream or reads an agent
            card, ``DELETE`` ends a session): allowed here, the rule's ``methods`` decide them.
            Any other request - also one of these with a body - is judged as JSON-RPC, so a rule
            with ``methods: ["*"]`` cannot be passed with a ``PUT``.
        headers: lower-case request headers (``mcp-method``, ``mcp-name``, ``content-type``,
            ``content-encoding``).
        body: the body Envoy buffered, or ``None`` when the route sends none (then an MCP request
            is judged on ``Mcp-Method`` / ``Mcp-Name`` if it carries them).
        cap: the body cap in bytes.

    Returns:
        The verdict. Refusals: ``mcp_header_mismatch`` (SEP-2243 headers malformed or not the
        body's), ``mcp_ambiguous_body`` / ``mcp_invalid_body`` / ``mcp_body_too_large`` (see
        :mod:`sidecar.agentproto.jsonrpc`), ``mcp_body_unavailable`` (the judgement needs the body
        and the route sends none), ``tool_not_allowed``, ``argument_not_allowed``,
        ``resource_not_allowed``, ``prompt_not_allowed``, ``rpc_method_not_allowed``.
    """
    if http_method in _NO_RPC_METHODS and not body:
        return RpcVerdict(None)
    mcp = policy.protocol == "mcp"
    try:
        mirrored = read_headers(headers) if mcp else None
    except HeaderError as exc:
        return RpcVerdict(Refusal.MCP_HEADER_MISMATCH, str(exc))
    if body is None:
        if mirrored is None or mirrored.method is None:
            return RpcVerdict(Refusal.MCP_BODY_UNAVAILABLE, "no body reached the sidecar and no Mcp-Method header")
        name_key = NAME_PARAMS.get(mirrored.method)
        if name_key is not None and mirrored.name is None:
            return RpcVerdict(Refusal.MCP_HEADER_MISMATCH, f"{mirrored.method} without Mcp-Name")
        params = {name_key: mirrored.name} if name_key is not None else None
        message = RpcMessage(MessageKind.REQUEST, mirrored.method, None, params)
        return _judge_message(policy, message, decided_from="headers")
    try:
        message = parse_message(
            body, cap=cap, content_type=headers.get("content-type"), content_encoding=headers.get("content-encoding")
        )
    except BodyError as exc:
        return RpcVerdict(_body_refusal(exc.problem), str(exc))
    if mirrored is not None:
        try:
            check_headers(mirrored, message)
        except HeaderError as exc:
            return RpcVerdict(
                Refusal.MCP_HEADER_MISMATCH, str(exc), fields={"method": message.method[:128]}, rpc_id=message.id
            )
    return replace(_judge_message(policy, message, decided_from="body"), rpc_id=message.id)


def _judge_message(policy: ProtocolPolicy, message: RpcMessage, *, decided_from: str) -> RpcVerdict:
    method = message.method
    fields: dict[str, Any] = {"method": method[:128], "decided_from": decided_from}
    if message.kind is MessageKind.RESPONSE:
        fields["method"] = ""
        if policy.protocol == "mcp":  # the client's answer to a server request (sampling, elicitation, roots)
            return RpcVerdict(None, fields={**fields, "response": True})
        return RpcVerdict(Refusal.RPC_METHOD_NOT_ALLOWED, "a JSON-RPC response to an A2A agent", fields=fields)
    if policy.protocol == "mcp" and method in NAME_PARAMS:
        key = NAME_PARAMS[method]
        name = message.param_str(key)
        if name is None:
            return RpcVerdict(
                Refusal.MCP_INVALID_BODY, f"not_jsonrpc: {method} without a string params.{key}", fields=fields
            )
        if method == "tools/call":
            return _judge_tool(policy, message, name, fields, decided_from)
        if method == "resources/read":
            fields["resource"] = name[:512]
            if policy.resources.matches(name):
                return RpcVerdict(None, fields=fields)
            return RpcVerdict(
                Refusal.RESOURCE_NOT_ALLOWED, "no resources pattern of the rule names this URI", fields=fields
            )
        fields["prompt"] = name[:128]
        if policy.prompts.matches(name):
            return RpcVerdict(None, fields=fields)
        return RpcVerdict(Refusal.PROMPT_NOT_ALLOWED, "no prompts entry of the rule names this prompt", fields=fields)
    if policy.methods.matches(method):
        return RpcVerdict(None, fields=fields)
    return RpcVerdict(Refusal.RPC_METHOD_NOT_ALLOWED, "the rule's rpc_methods do not name this method", fields=fields)


def _judge_tool(
    policy: ProtocolPolicy, message: RpcMessage, name: str, fields: dict[str, Any], decided_from: str
) -> RpcVerdict:
    fields["tool"] = name[:128]
    entries = [t for t in policy.tools if t.name.matches(name)]
    if not entries:
        return RpcVerdict(Refusal.TOOL_NOT_ALLOWED, "no tools entry of the rule names this tool", fields=fields)
    if decided_from == "headers":
        free = tuple(t for t in entries if not t.constraints)
        if free:
            return RpcVerdict(None, tools=free, fields=fields)
        return RpcVerdict(
            Refusal.MCP_BODY_UNAVAILABLE,
            "the tool has argument constraints and this route sends no body",
            fields=fields,
        )
    assert message.params is not None  # a name was read from it
    arguments = message.params.get("arguments", {})
    if not isinstance(arguments, dict):
        return RpcVerdict(Refusal.MCP_INVALID_BODY, "not_jsonrpc: params.arguments is not an object", fields=fields)
    fields["arguments_digest"] = arguments_digest(arguments)
    allowing = tuple(t for t in entries if t.failing(arguments) is None)
    if allowing:
        return RpcVerdict(None, tools=allowing, fields=fields, arguments=arguments)
    failed = entries[0].failing(arguments)
    assert failed is not None
    return RpcVerdict(
        Refusal.ARGUMENT_NOT_ALLOWED,
        f"argument {failed.pointer[:64]} does not satisfy '{failed.operator}'",
        fields=fields,
        arguments=arguments,
    )
