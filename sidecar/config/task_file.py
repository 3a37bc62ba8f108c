"""A task declared in a file of its own (``task_files``): a signed grant or one task in YAML/JSON.

In Kubernetes the file is the pod annotation ``agent-authz.io/task`` mounted through a downward-API
volume. The sidecar (:mod:`sidecar.runtime`) and the injection webhook (:mod:`sidecar.inject`) parse
it with these same functions, so an annotation the webhook admits is one the sidecar loads.
"""

from __future__ import annotations

from collections.abc import Container

import yaml
from pydantic import ValidationError

from sidecar.config.loader import format_loc
from sidecar.config.schema import TaskSpec
from sidecar.errors import ConfigError

__all__ = ["check_task_credentials", "looks_like_jws", "parse_task_document"]


def looks_like_jws(text: str) -> bool:
    """Whether ``text`` has the shape of a compact JWS (RFC 7515 §7.1): three dot-separated parts, no spaces.

    A YAML task never has that shape: it holds at least one ``key: value`` pair with a space.
    """
    return text.count(".") == 2 and not any(c.isspace() for c in text)


def parse_task_document(text: str, agent: str, *, file: str, field: str, revoked: bool = False) -> TaskSpec:
    """Validate one task written in YAML or JSON (the shape of a ``tasks[]`` entry).

    Args:
        text: the document (already stripped; not empty).
        agent: the SPIFFE ID that ``agent`` defaults to (this agent's).
        file: named in errors (the config file, or the annotation).
        field: named in errors (``task_files[0].path``, or the annotation key).
        revoked: force ``revoked: true`` (the ``revoked`` flag file says so).

    Returns:
        The validated :class:`TaskSpec`.

    Raises:
        ConfigError: not YAML, not a mapping, or invalid against the task schema (the message
            names the field, e.g. ``egress[0].paths[0]``).
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(file, field, f"invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(file, field, "a task file holds one task (a mapping) or a grant (a compact JWS)")
    data.setdefault("agent", agent)
    if revoked:
        data["revoked"] = True
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ConfigError(file, f"{field}: {format_loc(first['loc'])}", first["msg"]) from None


def check_task_credentials(task: TaskSpec, credentials: Container[str], *, file: str, field: str) -> None:
    """A task from a file names credentials from the config's ``credentials`` by name; it never carries one.

    Raises:
        ConfigError: a rule carries an inline credential or names one that is not configured.
    """
    for index, rule in enumerate(task.egress):
        if rule.credential is None:
            continue
        if not isinstance(rule.credential, str) or rule.credential not in credentials:
            raise ConfigError(file, field, f"egress[{index}]: name a credential from 'credentials'")
