"""Attenuation of agent-protocol rules: a delegated rule can only narrow tools, arguments and methods.

A child rule lies within its parent rule when:

* ``protocol`` - the same, or the parent is plain ``http`` (a parent that allows any body to the
  endpoint holds a child that judges the JSON-RPC inside); never ``http`` under ``mcp``/``a2a``;
* ``tools`` - each child entry lies within one parent entry: its name pattern within the parent's
  (:meth:`~sidecar.agentproto.names.Glob.covers`), every constraint of the parent entry implied by
  a constraint of the child on the same pointer (:meth:`~sidecar.agentproto.rules.Constraint.implies`:
  ``equals``/``in`` values the parent accepts; a longer ``prefix``; the same ``pattern``), a
  ``max_calls`` no more than the parent entry's when it has one, and at least the parent's
  ``record`` pointers (a delegation cannot hide arguments the parent records);
* ``resources``, ``prompts`` and ``rpc_methods`` (after defaults) - each child pattern within a
  parent pattern.
"""

from __future__ import annotations

from sidecar.agentproto.names import NameSet
from sidecar.agentproto.rules import ToolRule, compile_protocol
from sidecar.agentproto.spec import AgentProtocolSpec

__all__ = ["protocol_within"]


def _tool_within(child: ToolRule, parent: ToolRule) -> str | None:
    if not parent.name.covers(child.name):
        return f"tool {child.name.pattern!r} is not within {parent.name.pattern!r}"
    for needed in parent.constraints:
        if not any(c.implies(needed) for c in child.constraints):
            kept = f"the parent's constraint on {needed.pointer} ({needed.operator}) is not kept"
            return f"tool {child.name.pattern!r}: {kept}"
    if parent.max_calls is not None and (child.max_calls is None or child.max_calls > parent.max_calls):
        return f"tool {child.name.pattern!r}: max_calls {child.max_calls} is not within {parent.max_calls}"
    if not set(parent.record) <= set(child.record):
        return f"tool {child.name.pattern!r}: record must keep {list(parent.record)}"
    return None


def _names_within(child: NameSet, parent: NameSet) -> bool:
    return parent.covers(child)


def protocol_within(child: AgentProtocolSpec, parent: AgentProtocolSpec) -> tuple[str, str] | None:
    """``None`` if the child rule's agent-protocol fields lie within the parent's, else
    ``(field, explanation)`` with ``field`` one of ``protocol``, ``tools``, ``resources``,
    ``prompts``, ``rpc_methods``."""
    if parent.protocol == "http":
        return None
    if child.protocol != parent.protocol:
        return "protocol", f"{child.protocol!r} is not the parent's {parent.protocol!r}"
    mine, theirs = compile_protocol(child, ""), compile_protocol(parent, "")
    assert mine is not None and theirs is not None
    for entry in mine.tools:
        problems = [_tool_within(entry, p) for p in theirs.tools]
        if not problems:
            return "tools", f"tool {entry.name.pattern!r}: the parent allows no tools"
        if all(problems):
            return "tools", next(p for p in problems if p)
    if not _names_within(mine.resources, theirs.resources):
        return "resources", f"{list(mine.resources.patterns)} is not within {list(theirs.resources.patterns)}"
    if not _names_within(mine.prompts, theirs.prompts):
        return "prompts", f"{list(mine.prompts.patterns)} is not within {list(theirs.prompts.patterns)}"
    if not _names_within(mine.methods, theirs.methods):
        return "rpc_methods", f"{list(mine.methods.patterns)} is not within {list(theirs.methods.patterns)}"
    return None
