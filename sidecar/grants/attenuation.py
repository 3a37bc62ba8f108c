"""Attenuation: a delegated task is never wider than its parent.

Every child rule must lie within one parent rule, dimension by dimension:

* host - equal, or inside the parent's ``*.suffix`` (``a.x.com`` or ``*.a.x.com`` within ``*.x.com``);
* tls (``none``/``passthrough``/``originate``) and its upstream port - the same;
* port - equal (after defaults);
* methods - a subset (``*`` only under ``*``);
* paths - each child pattern within a parent pattern (``/a/b`` within ``/a/*``; ``/a/b/*`` within
  ``/a/*``; anything within ``*``);
* token, audience - the same;
* scope - a subset of the parent's scope tokens (no scope only under no scope);
* credential - only a credential the parent rule already injects;
* max_calls - required when the parent rule is limited, and no more than its limit (at issuance:
  no more than what is left, and then reserved);
* sensitivity - the same or higher (a label says how sensitive the data is: a child cannot call it
  less sensitive); approval - the parent's, or ``required`` (a child cannot skip a human's approval);
* protocol, tools (names, argument constraints, per-tool max_calls, record), resources, prompts,
  rpc_methods - narrower or equal (:mod:`sidecar.agentproto.attenuation`; per-tool budgets are
  bounded by the parent entry's limit, not reserved from it).

Task-wide: the same ``on_behalf_of``; not valid before the parent nor after it; ``max_calls``
within the parent's; ``max_sensitivity`` at most the parent's; a ``quarantine`` rule at least as
strict as the parent's (a threshold no higher, a window no shorter). :func:`check_attenuation`
returns which parent rule holds each child rule, or raises :class:`AttenuationError` naming the
first widening child rule and dimension.
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.agentproto.attenuation import protocol_within
from sidecar.config.schema import SENSITIVITY_LEVELS, EgressRuleSpec, TaskSpec
from sidecar.grants.model import GrantCode, GrantError

__all__ = ["AttenuationError", "check_attenuation", "host_within", "inherit", "path_within", "rule_within"]

_INHERITED = ("audience", "scope", "token", "sensitivity", "approval")
_PROTOCOL_FIELDS = ("protocol", "tools", "resources", "prompts", "rpc_methods")


def inherit(child: EgressRuleSpec, parent: EgressRuleSpec) -> EgressRuleSpec:
    """``child`` with the ``audience``, ``scope``, ``token``, ``sensitivity`` and ``approval`` it did
    not set taken from ``parent``,
    and - when it names no ``protocol`` - the parent's protocol, tools, resources, prompts and
    rpc_methods.

    Used when issuing: a delegation request may leave these out and get the parent rule's values.
    """
    update = {name: getattr(parent, name) for name in _INHERITED if name not in child.model_fields_set}
    if "protocol" not in child.model_fields_set and parent.protocol != "http":
        update.update({name: getattr(parent, name) for name in _PROTOCOL_FIELDS})
    return child.model_copy(update=update) if update else child


_DEFAULT_PORT = 80


class AttenuationError(GrantError):
    """A child grant would be wider than its parent. ``field`` names the widening part."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(GrantCode.WIDENING, f"{field}: {message}")


def host_within(child: str, parent: str) -> bool:
    """Whether every host ``child`` matches is matched by ``parent`` (both exact or ``*.suffix``)."""
    if child == parent:
        return True
    return parent.startswith("*.") and child.endswith(parent[1:])


def path_within(child: str, parent: str) -> bool:
    """Whether every path ``child`` matches is matched by ``parent`` (patterns as in egress rules)."""
    if parent == "*":
        return True
    if child == "*":
        return False
    if parent.endswith("/*"):
        prefix = parent[:-1]  # "/a/"
        if child.endswith("/*"):
            return child[:-1].startswith(prefix)
        return child.startswith(prefix) and len(child) > len(prefix)
    return child == parent


def _port(rule: EgressRuleSpec) -> int:
    return rule.port or (443 if rule.tls == "passthrough" else _DEFAULT_PORT)


def _scopes(scope: str | None) -> frozenset[str]:
    return frozenset(scope.split()) if scope else frozenset()


def rule_within(child: EgressRuleSpec, parent: EgressRuleSpec) -> tuple[str, str] | None:
    """``None`` if ``child`` lies within ``parent``, else ``(dimension, explanation)``."""
    if not host_within(child.host, parent.host):
        return "host", f"{child.host!r} is not within {parent.host!r}"
    if child.tls != parent.tls or child.upstream_port != parent.upstream_port:
        return "tls", f"tls {child.tls!r} (upstream port {child.upstream_port}) is not the parent's {parent.tls!r}"
    if _port(child) != _port(parent):
        return "port", f"{_port(child)} is not {_port(parent)}"
    if "*" not in parent.methods and ("*" in child.methods or not set(child.methods) <= set(parent.methods)):
        return "methods", f"{child.methods} is not within {parent.methods}"
    for pattern in child.paths:
        if not any(path_within(pattern, p) for p in parent.paths):
            return "paths", f"{pattern!r} is not within {parent.paths}"
    if child.token != parent.token:
        return "token", "a delegated rule keeps the parent's token setting"
    if child.audience != parent.audience:
        return "audience", f"{child.audience!r} is not the parent's audience {parent.audience!r}"
    if (child.scope is None) != (parent.scope is None) or not _scopes(child.scope) <= _scopes(parent.scope):
        return "scope", f"{child.scope!r} is not within {parent.scope!r}"
    if child.credential is not None and child.credential != parent.credential:
        return "credential", "only a credential the parent rule injects can be delegated"
    if parent.max_calls is not None and (child.max_calls is None or child.max_calls > parent.max_calls):
        return "max_calls", f"{child.max_calls} is not within the parent's {parent.max_calls}"
    if _level(child.sensitivity) < _level(parent.sensitivity):
        return "sensitivity", f"{child.sensitivity!r} is lower than the parent's {parent.sensitivity!r}"
    if parent.approval is not None and child.approval not in (parent.approval, "required"):
        return "approval", "a delegated rule keeps the parent's approval (or requires approval for every call)"
    return protocol_within(child, parent)


def _level(label: str | None) -> int:
    """A rule's label as a number (no label: below ``public``, it takes the host's or the default)."""
    return -1 if label is None else SENSITIVITY_LEVELS.index(label)


def check_attenuation(
    parent: TaskSpec,
    child: TaskSpec,
    *,
    parent_window: tuple[float, float],
    child_window: tuple[float, float],
    remaining: Callable[[int | None], int | None] | None = None,
) -> dict[int, int]:
    """Check that ``child`` is no wider than ``parent``.

    Args:
        parent / child: the task declarations.
        parent_window / child_window: ``(not_before, expires_at)`` in POSIX seconds.
        remaining: at issuance, calls left in the parent's budget: ``remaining(rule_index)`` for a
            rule, ``remaining(None)`` for the task; ``None`` means unlimited. At verification (no
            ledger) the static limits are used.

    Returns:
        child rule index -> index of the parent rule that holds it.

    Raises:
        AttenuationError: naming the first widening field, e.g. ``egress[1].methods``.
    """
    if child.on_behalf_of != parent.on_behalf_of:
        raise AttenuationError("on_behalf_of", "a delegated task serves the same principal as its parent")
    if child_window[1] > parent_window[1]:
        raise AttenuationError("expires_at", "the delegated task outlives its parent")
    if child_window[0] < parent_window[0]:
        raise AttenuationError("not_before", "the delegated task starts before its parent")
    if parent.max_sensitivity is not None and (
        child.max_sensitivity is None or _level(child.max_sensitivity) > _level(parent.max_sensitivity)
    ):
        raise AttenuationError(
            "max_sensitivity", f"{child.max_sensitivity!r} is not within the parent's {parent.max_sensitivity!r}"
        )
    if parent.quarantine is not None and (
        child.quarantine is None
        or child.quarantine.threshold > parent.quarantine.threshold
        or child.quarantine.window < parent.quarantine.window
    ):
        raise AttenuationError("quarantine", "a delegated task's anomaly rule is at least as strict as its parent's")
    task_left = remaining(None) if remaining is not None else parent.max_calls
    if task_left is not None and (child.max_calls is None or child.max_calls > task_left):
        raise AttenuationError("max_calls", f"{child.max_calls} is more than the parent's {task_left} left")
    holders: dict[int, int] = {}
    for c_index, rule in enumerate(child.egress):
        failures: list[tuple[int, str, str]] = []
        for p_index, candidate in enumerate(parent.egress):
            failure = rule_within(rule, candidate)
            if failure is None and remaining is not None:
                left = remaining(p_index)
                if left is not None and (rule.max_calls is None or rule.max_calls > left):
                    failure = ("max_calls", f"{rule.max_calls} is more than the {left} calls left")
            if failure is None:
                holders[c_index] = p_index
                break
            failures.append((p_index, *failure))
        else:
            name = f" ({rule.name})" if rule.name else ""
            if not failures:
                raise AttenuationError(f"egress[{c_index}]{name}", "the parent task has no egress rules")
            order = (
                *("host", "tls", "port", "methods", "paths", "token", "audience", "scope", "credential", "max_calls"),
                *("sensitivity", "approval", "protocol", "tools", "resources", "prompts", "rpc_methods"),
            )
            p_index, dimension, why = max(failures, key=lambda f: order.index(f[1]))
            parent_name = parent.egress[p_index].name or f"egress[{p_index}]"
            raise AttenuationError(
                f"egress[{c_index}]{name}.{dimension}", f"{why} (closest parent rule: {parent_name})"
            )
    return holders
