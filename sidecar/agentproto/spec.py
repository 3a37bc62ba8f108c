"""The ``sidecar.yaml`` / grant syntax of agent-protocol rules (``protocol: mcp`` and ``protocol: a2a``).

An egress rule with ``protocol: mcp`` judges each JSON-RPC message the agent sends to an MCP
server; ``protocol: a2a`` judges the JSON-RPC methods of an A2A agent::

    - name: warehouse
      host: mcp.internal
      protocol: mcp
      paths: [/mcp]
      tools:
        - name: query
          arguments:
            /table: {in: [prices_q3, prices_q2]}
            /limit: {equals: 100}
          max_calls: 20
          record: [/table]
        - list_tables                  # a bare name: any arguments
      resources: ["table://prices_*"]
      prompts: [summarize]
    - host: risk-agent.internal
      protocol: a2a
      paths: [/]
      rpc_methods: [SendMessage, GetTask]

Names are exact or ``*`` globs (:mod:`sidecar.agentproto.names`). ``arguments`` maps RFC 6901 JSON
pointers into ``params.arguments`` to one operator each; all must hold. ``pattern`` is an RE2
regular expression (linear-time matching, no backtracking: :mod:`sidecar.agentproto.rules`)
matched against the whole string value.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    field_validator,
    model_serializer,
    model_validator,
)

__all__ = [
    "A2A_DEFAULT_METHODS",
    "MCP_DEFAULT_METHODS",
    "MCP_NAMED_METHODS",
    "AgentProtocolSpec",
    "ArgumentConstraintSpec",
    "Pointer",
    "ToolSpec",
    "compile_pattern",
]

MCP_NAMED_METHODS = ("tools/call", "resources/read", "prompts/get")
"""Methods judged by ``tools``, ``resources`` and ``prompts``; they cannot appear in ``rpc_methods``."""
MCP_DEFAULT_METHODS = (
    "initialize",
    "ping",
    "server/discover",
    "notifications/*",
    "tools/list",
    "resources/list",
    "resources/templates/list",
    "prompts/list",
)
"""The non-call methods an MCP rule allows when it sets no ``rpc_methods``: the 2025-11-25
handshake (``initialize``, ``notifications/initialized``) and the 2026-07-28 ``server/discover``,
``ping``, the client's notifications (``cancelled``, ``progress``, ``roots/list_changed``) and the
list methods (``tools/list`` is filtered to the allowed tools)."""
A2A_DEFAULT_METHODS: tuple[str, ...] = ()
"""An A2A rule allows no method unless ``rpc_methods`` names it."""

MAX_PATTERN_LENGTH = 256
"""Longest ``pattern`` accepted, in characters."""
_NAME = re.compile(r"^[\x21-\x7e]{1,128}$")
_URI = re.compile(r"^[^\x00-\x20\x7f]{1,2048}$")
_POINTER = re.compile(r"^(/([^~/]|~[01])*)+$")
_OPERATORS = ("equals", "in", "prefix", "pattern")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, use_attribute_docstrings=True)


def compile_pattern(pattern: str) -> Any:
    """Compile an RE2 pattern for full matches (``re2`` from the ``google-re2`` wheel).

    RE2 guarantees time linear in the input and refuses what needs backtracking (back-references,
    look-around), so a pattern in a grant cannot make a decision slow. Memory is capped at 1 MiB.

    Raises:
        ValueError: longer than :data:`MAX_PATTERN_LENGTH`, or not RE2 syntax.
    """
    import re2  # the google-re2 wheel

    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"pattern longer than {MAX_PATTERN_LENGTH} characters")
    options = re2.Options()
    options.log_errors = False
    options.max_mem = 1 << 20
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        raise ValueError(f"not an RE2 pattern: {exc}") from None


class ArgumentConstraintSpec(_Model):
    """One operator on the value at a JSON pointer: ``equals`` (any JSON value, compared as JSON:
    ``1`` equals ``1.0``, ``true`` is not ``1``), ``in`` (a list of JSON values), ``prefix`` (the
    value is a string starting with it) or ``pattern`` (the value is a string RE2 fully matches)."""

    equals: JsonValue = None
    """The value equals this JSON value."""
    in_: list[JsonValue] | None = Field(default=None, alias="in", min_length=1)
    """The value equals one of these JSON values."""
    prefix: str | None = Field(default=None, min_length=1)
    """The value is a string starting with this."""
    pattern: str | None = None
    """The value is a string this RE2 pattern matches in full (at most 256 characters)."""

    @model_validator(mode="after")
    def _one_operator(self) -> ArgumentConstraintSpec:
        given = [op for op in _OPERATORS if (op if op != "in" else "in_") in self.model_fields_set]
        if len(given) != 1:
            raise ValueError(f"set exactly one of {', '.join(_OPERATORS)}")
        if self.pattern is not None:
            compile_pattern(self.pattern)
        return self

    @property
    def operator(self) -> str:
        """``equals``, ``in``, ``prefix`` or ``pattern``."""
        return next(op for op in _OPERATORS if (op if op != "in" else "in_") in self.model_fields_set)

    @model_serializer(mode="plain")
    def _as_written(self) -> dict[str, Any]:
        """``{operator: value}``: the one operator set, so a grant carries exactly what was written
        (``equals: null`` included)."""
        operator = self.operator
        return {operator: getattr(self, "in_" if operator == "in" else operator)}


def _pointer(value: str) -> str:
    if not _POINTER.match(value):
        raise ValueError(f"{value!r} is not a JSON pointer into the arguments (RFC 6901, e.g. '/table')")
    return value


Pointer = Annotated[str, BeforeValidator(_pointer)]
"""An RFC 6901 JSON pointer into ``params.arguments`` (e.g. ``/table``)."""


class ToolSpec(_Model):
    """One allowed tool: a name (exact or glob), optional argument constraints, an optional call
    budget (counted together with the rule's and the task's), and the argument pointers whose values
    the decision record may carry (``record``; all other arguments appear only as a digest)."""

    name: str
    """The tool's name, or a ``*`` glob (``list_*``); a bare string in ``tools`` is this name alone."""
    arguments: dict[Pointer, ArgumentConstraintSpec] = Field(default_factory=dict)
    """JSON pointer into ``params.arguments`` -> one operator; all must hold."""
    max_calls: int | None = Field(default=None, ge=0)
    """Calls of this tool through this entry over the task's life (also counted in the rule's and
    the task's budget)."""
    record: list[Pointer] = Field(default_factory=list)
    """Argument pointers whose values decision records carry; every other argument appears only in
    ``arguments_digest``."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("a tool name or glob: 1-128 visible ASCII characters")
        return value


def _names(value: list[str], what: str, pattern: re.Pattern[str]) -> list[str]:
    for name in value:
        if not pattern.match(name):
            raise ValueError(f"{name!r} is not a {what} name or glob")
    return value


class AgentProtocolSpec(_Model):
    """The agent-protocol fields of an egress rule (mixed into ``EgressRuleSpec``).

    ``protocol``: ``http`` (default: the rule judges HTTP only), ``mcp`` or ``a2a``. ``tools``,
    ``resources`` and ``prompts`` (MCP only) list what ``tools/call``, ``resources/read`` and
    ``prompts/get`` may name; unset means none. ``rpc_methods``: the other JSON-RPC methods allowed
    (default :data:`MCP_DEFAULT_METHODS` for MCP; for A2A required).
    """

    protocol: Literal["http", "mcp", "a2a"] = "http"
    """``http``: the rule judges HTTP only; ``mcp`` / ``a2a``: also the JSON-RPC message of each POST."""
    tools: list[ToolSpec] | None = None
    """MCP: the tools ``tools/call`` may name, each with optional ``arguments``, ``max_calls`` and
    ``record``; unset: none (``tools/list`` responses show only these)."""
    resources: list[str] | None = None
    """MCP: the URIs (or ``*`` globs) ``resources/read`` may name; unset: none."""
    prompts: list[str] | None = None
    """MCP: the prompts (or ``*`` globs) ``prompts/get`` may name; unset: none."""
    rpc_methods: list[str] | None = None
    """The other JSON-RPC methods allowed (names or globs). MCP default: ``initialize``, ``ping``,
    ``server/discover``, ``notifications/*``, ``tools/list``, ``resources/list``,
    ``resources/templates/list``, ``prompts/list``; A2A: required (e.g. ``SendMessage``, ``GetTask``)."""

    @field_validator("tools", mode="before")
    @classmethod
    def _tool_shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": entry} if isinstance(entry, str) else entry for entry in value]
        return value

    @field_validator("resources")
    @classmethod
    def _resources(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _names(value, "resource URI", _URI)

    @field_validator("prompts", "rpc_methods")
    @classmethod
    def _plain_names(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _names(value, "prompt or method", _NAME)

    @model_validator(mode="after")
    def _fields_fit_protocol(self) -> AgentProtocolSpec:
        mcp_only = [k for k in ("tools", "resources", "prompts") if getattr(self, k) is not None]
        if self.protocol == "http" and (mcp_only or self.rpc_methods is not None):
            raise ValueError("tools, resources, prompts and rpc_methods need 'protocol: mcp' or 'protocol: a2a'")
        if self.protocol == "a2a":
            if mcp_only:
                raise ValueError(f"'protocol: a2a' has no {', '.join(mcp_only)} (MCP only); list rpc_methods")
            if not self.rpc_methods:
                raise ValueError("'protocol: a2a' needs rpc_methods (the JSON-RPC methods allowed)")
        named = [m for m in self.rpc_methods or () if any(_covers_named(m, n) for n in MCP_NAMED_METHODS)]
        if self.protocol == "mcp" and named:
            raise ValueError(
                f"rpc_methods {named!r}: tools/call, resources/read and prompts/get are judged by "
                "tools, resources and prompts"
            )
        return self

    def effective_rpc_methods(self) -> tuple[str, ...]:
        """``rpc_methods``, else the protocol's default set."""
        if self.rpc_methods is not None:
            return tuple(self.rpc_methods)
        return MCP_DEFAULT_METHODS if self.protocol == "mcp" else A2A_DEFAULT_METHODS


def _covers_named(pattern: str, method: str) -> bool:
    from sidecar.agentproto.names import Glob

    return Glob.compile(pattern).matches(method)
