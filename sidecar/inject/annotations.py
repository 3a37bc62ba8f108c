"""The pod annotations the injector reads, validated with the sidecar's own code.

``agent-authz.io/task`` holds a signed grant (compact JWS, ``typ: agent-task+jwt``) or one task in
YAML/JSON (the shape of a ``tasks[]`` entry; ``agent`` defaults to the pod's SPIFFE ID). It reaches
the sidecar as a file through a downward-API volume, where :mod:`sidecar.config.task_file` parses
it; the webhook parses it with the same functions at admission, so a pod is never admitted with a
task its sidecar would refuse to load.

What the webhook cannot check: a grant's signature and delegation chain (that needs the trust
bundles and root issuer keys, which only the sidecar holds). It checks the grant's structure - the
header (``typ``, ``alg``, ``kid``/``x5c``), the claims and the task they declare (validated like a
task in ``sidecar.yaml``), the subject against the pod's SPIFFE ID, that it has not expired and that
the credentials it names are configured. A forged grant therefore passes admission and is refused
by the sidecar (``grant_bad_signature``, ``grant_untrusted_signer``...), which then enforces no task.
"""

from __future__ import annotations

import re
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Literal

from sidecar.config.task_file import check_task_credentials, looks_like_jws, parse_task_document
from sidecar.errors import AgentAuthzError, ConfigError, ErrorCode
from sidecar.grants import codec
from sidecar.grants.model import GRANT_TYP, GrantError
from sidecar.grants.verify import task_spec_from_claims
from sidecar.inject import layout

__all__ = ["AnnotationError", "TaskAnnotation", "check_revoked_annotation", "check_task_annotation", "inject_choice"]

MAX_ANNOTATION_BYTES = 256 * 1024
"""Kubernetes limits all annotations of an object to 256 KiB together."""
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,255}$")


class AnnotationError(AgentAuthzError):
    """A pod annotation is invalid; the message names the annotation and the reason."""

    code = ErrorCode.ANNOTATION_INVALID


@dataclass(frozen=True, slots=True)
class TaskAnnotation:
    """What ``agent-authz.io/task`` declares.

    Attributes:
        kind: ``none`` (missing or empty), ``task`` (YAML/JSON) or ``grant`` (compact JWS).
        task_id: the task's (or grant's) id.
        agent: the SPIFFE ID the task belongs to.
    """

    kind: Literal["none", "task", "grant"]
    task_id: str | None = None
    agent: str | None = None


def inject_choice(annotations: Mapping[str, str]) -> bool:
    """``False`` when the pod opts out (``agent-authz.io/inject: "false"``), else ``True``.

    Raises:
        AnnotationError: a value other than ``true`` or ``false`` (case-insensitive).
    """
    value = annotations.get(layout.ANNOTATION_INJECT)
    if value is None:
        return True
    lowered = value.strip().lower()
    if lowered not in ("true", "false"):
        raise AnnotationError(f'annotation {layout.ANNOTATION_INJECT}: expected "true" or "false", got {value!r}')
    return lowered == "true"


def check_revoked_annotation(annotations: Mapping[str, str]) -> bool:
    """Whether ``agent-authz.io/revoked`` revokes the task.

    The sidecar revokes only on ``true``; anything else but ``false`` or empty is refused here, so a
    typo (``yes``, ``revoked``) cannot leave a task in force that someone meant to revoke.

    Raises:
        AnnotationError: a value other than ``true``, ``false`` or empty.
    """
    value = annotations.get(layout.ANNOTATION_REVOKED, "")
    lowered = value.strip().lower()
    if lowered not in ("", "true", "false"):
        raise AnnotationError(f'annotation {layout.ANNOTATION_REVOKED}: expected "true" or "false", got {value[:40]!r}')
    return lowered == "true"


def check_task_annotation(
    text: str | None, *, agent: str | None, credentials: Container[str], now: float
) -> TaskAnnotation:
    """Validate ``agent-authz.io/task``.

    Args:
        text: the annotation value (``None`` when absent).
        agent: the pod's expected SPIFFE ID; a YAML task's ``agent`` defaults to it and must equal
            it, and so must a grant's ``sub``. ``None``: not checked (the sidecar's SVID decides).
        credentials: credential names the sidecar configuration declares.
        now: POSIX seconds, for a grant's expiry.

    Returns:
        What the annotation declares.

    Raises:
        AnnotationError: the message names the annotation and the field, e.g.
            ``annotation agent-authz.io/task: egress[0].paths[0]: '/v1/../x' is not in canonical form``.
    """
    where = f"annotation {layout.ANNOTATION_TASK}"
    stripped = (text or "").strip()
    if not stripped:
        return TaskAnnotation("none")
    if len(stripped.encode()) > MAX_ANNOTATION_BYTES:
        raise AnnotationError(f"{where}: larger than {MAX_ANNOTATION_BYTES} bytes")
    if looks_like_jws(stripped):
        return _check_grant(stripped, agent=agent, credentials=credentials, now=now, where=where)
    placeholder = agent or "spiffe://agent-authz.invalid/unchecked"
    try:
        task = parse_task_document(stripped, placeholder, file="annotation", field=layout.ANNOTATION_TASK)
        check_task_credentials(task, credentials, file="annotation", field=layout.ANNOTATION_TASK)
    except ConfigError as exc:
        loc = exc.field.removeprefix(layout.ANNOTATION_TASK).removeprefix(": ")
        reason = " ".join(exc.reason.removeprefix("Value error, ").split())
        raise AnnotationError(f"{where}: {loc + ': ' if loc else ''}{reason}") from None
    if agent is not None and task.agent != agent:
        raise AnnotationError(f"{where}: the task is for {task.agent}, but this pod's SPIFFE ID is {agent}")
    return TaskAnnotation("task", task.id, task.agent)


def _check_grant(
    token: str, *, agent: str | None, credentials: Container[str], now: float, where: str
) -> TaskAnnotation:
    try:
        _, payload = codec.unverified(token, typ=GRANT_TYP)
        spec = task_spec_from_claims(payload)
    except GrantError as exc:
        raise AnnotationError(f"{where}: not a valid grant: {exc}") from None
    txn = payload.get("txn")
    if not isinstance(txn, str) or not _ID.match(txn):
        raise AnnotationError(f"{where}: not a valid grant: grant_malformed: txn must be a task id")
    parent = payload.get("parent")
    if parent is not None and not (isinstance(parent, str) and looks_like_jws(parent)):
        raise AnnotationError(f"{where}: not a valid grant: grant_malformed: parent must be a compact JWS")
    if agent is not None and spec.agent != agent:
        raise AnnotationError(f"{where}: the grant is for {spec.agent}, but this pod's SPIFFE ID is {agent}")
    assert spec.expires_at is not None  # a grant always carries exp
    if spec.expires_at.timestamp() <= now:
        raise AnnotationError(f"{where}: the grant expired at {spec.expires_at.isoformat()}")
    for index, rule in enumerate(spec.egress):
        if isinstance(rule.credential, str) and rule.credential not in credentials:
            raise AnnotationError(
                f"{where}: egress[{index}] names credential {rule.credential!r}, which the sidecar configuration "
                "does not declare"
            )
    return TaskAnnotation("grant", spec.id, spec.agent)
