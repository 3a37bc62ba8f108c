"""Reading the pod of an AdmissionReview: an untrusted object, checked field by field.

The shared vocabulary of :mod:`sidecar.inject.pod` (pod-level decisions) and
:mod:`sidecar.inject.containers` (what is checked on and added to containers): the refusal
(:class:`InjectionDenied`), the outcome (:class:`Injection`, :class:`AdmissionOutcome`) and readers
that refuse a malformed pod instead of crashing on it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.errors import AgentAuthzError, ErrorCode

__all__ = [
    "AdmissionOutcome",
    "Injection",
    "InjectionDenied",
    "Json",
    "annotations_of",
    "containers_of",
    "mapping",
    "object_list",
    "pod_name",
    "pointer",
]

Json = dict[str, Any]


class AdmissionOutcome(enum.StrEnum):
    """What the webhook did with one review (the ``outcome`` of the ``admission`` log event and the
    label of ``agent_authz_webhook_admissions_total``). Never rename a value."""

    INJECTED = "injected"
    """A pod created: the containers, volumes and status annotation added."""
    ALREADY_INJECTED = "already_injected"
    """A pod created that carries exactly what this injector builds (a reinvoked webhook)."""
    OPTED_OUT = "opted_out"
    """``agent-authz.io/inject: "false"`` where the installation allows opting out."""
    VALIDATED = "validated"
    """An injected pod's task annotations changed, and the new ones are valid."""
    UNCHANGED = "unchanged"
    """An update of an injected pod that leaves its task annotations alone."""
    NOT_INJECTED = "not_injected"
    """An update of a pod that was never injected."""
    IGNORED = "ignored"
    """``DELETE`` and ``CONNECT``."""
    DENIED = "denied"
    """Refused (``allowed: false``) with a message."""
    UNANSWERABLE = "unanswerable"
    """Not an AdmissionReview that can be answered (HTTP 400, no review sent back)."""


class InjectionDenied(AgentAuthzError):
    """The pod must not be admitted; ``str(exc)`` is the message the API server shows the user."""

    code = ErrorCode.INJECTION_DENIED


@dataclass(frozen=True, slots=True)
class Injection:
    """The outcome for one pod.

    Attributes:
        patch: RFC 6902 operations (empty: admit unchanged).
        outcome: what was done (for logs and the ``agent_authz_webhook_admissions_total`` metric).
        warnings: short texts for AdmissionResponse ``warnings`` (shown by kubectl).
        task_id: the task the annotation declares, if any.
    """

    patch: list[Json]
    outcome: AdmissionOutcome
    warnings: list[str] = field(default_factory=list)
    task_id: str | None = None


def pointer(token: str) -> str:
    """RFC 6901 §3: escape ``~`` and ``/`` in a JSON Pointer reference token."""
    return token.replace("~", "~0").replace("/", "~1")


def mapping(value: object, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InjectionDenied(f"malformed pod: {where} must be an object")
    return value


def object_list(value: object, where: str) -> list[Json]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise InjectionDenied(f"malformed pod: {where} must be a list of objects")
    return value


def annotations_of(pod: Mapping[str, Any]) -> dict[str, str]:
    metadata = mapping(pod.get("metadata"), "metadata")
    annotations = mapping(metadata.get("annotations"), "metadata.annotations")
    if not all(isinstance(v, str) for v in annotations.values()):
        raise InjectionDenied("malformed pod: annotation values must be strings")
    return dict(annotations)


def containers_of(spec: Mapping[str, Any]) -> Iterator[tuple[str, Json]]:
    """``(kind, container)`` for every container of the pod spec (ephemeral ones included)."""
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for container in object_list(spec.get(kind), f"spec.{kind}"):
            yield kind, container


def pod_name(pod: Mapping[str, Any]) -> str:
    metadata = mapping(pod.get("metadata"), "metadata")
    return str(metadata.get("name") or metadata.get("generateName") or "<unnamed>")
