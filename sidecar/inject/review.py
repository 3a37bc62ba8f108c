"""AdmissionReview in, AdmissionReview out (Kubernetes ``admission.k8s.io/v1``).

The API server POSTs an ``AdmissionReview`` whose ``request`` carries a ``uid``, the ``kind`` and
``resource`` of the object, the ``operation`` and the ``object`` (and ``oldObject`` on UPDATE);
the webhook answers an ``AdmissionReview`` whose ``response`` echoes the ``uid`` and says
``allowed``, with an optional ``patchType: JSONPatch`` and base64 ``patch`` (RFC 6902), or a
``status`` (a ``metav1.Status``: ``code``, ``reason``, ``message``) when denied, and ``warnings``.

Bad input never crashes the server and never admits a pod unexamined:

* a body that is not an ``admission.k8s.io/v1`` ``AdmissionReview`` with a ``request.uid`` cannot
  be answered (there is no uid to echo): :class:`BadReview`, which the server turns into HTTP 400
  with a JSON ``{"error": …}``;
* a review for something other than a Pod or a ``batch/v1`` Job (whose pod template is judged:
  :func:`sidecar.inject.pod.check_job`), or with a malformed object, is answered ``allowed: false``
  with a message saying what is wrong;
* an unexpected exception while deciding is answered ``allowed: false`` (``internal error``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from sidecar.errors import AgentAuthzError, ErrorCode
from sidecar.inject.authors import Requester
from sidecar.inject.pod import check_job, check_update, plan_injection
from sidecar.inject.podspec import AdmissionOutcome, Injection, InjectionDenied
from sidecar.inject.settings import InjectorConfig

__all__ = ["API_VERSION", "MAX_REVIEW_BYTES", "AdmissionOutcome", "BadReview", "Outcome", "decide"]

API_VERSION = "admission.k8s.io/v1"
MAX_REVIEW_BYTES = 4 * 1024 * 1024
"""Larger than any Pod the API server accepts (etcd's default request limit is 1.5 MiB)."""
_POD_KIND = {"group": "", "version": "v1", "kind": "Pod"}
_POD_RESOURCE = {"group": "", "version": "v1", "resource": "pods"}
_JOB_KIND = {"group": "batch", "version": "v1", "kind": "Job"}
_JOB_RESOURCE = {"group": "batch", "version": "v1", "resource": "jobs"}
_MAX_UID = 256
_log = structlog.get_logger("agent_authz.webhook")


class BadReview(AgentAuthzError):
    """The body is not an AdmissionReview that can be answered; ``str(exc)`` says why (HTTP 400)."""

    code = ErrorCode.BAD_REVIEW


@dataclass(frozen=True, slots=True)
class Outcome:
    """One answered review.

    Attributes:
        review: the ``AdmissionReview`` to send back (JSON-ready).
        allowed: the verdict.
        outcome: what was done (:class:`AdmissionOutcome`; for logs, the metric and tests).
        message: the denial message, if denied.
    """

    review: dict[str, Any]
    allowed: bool
    outcome: AdmissionOutcome
    message: str = ""


def _parse(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_REVIEW_BYTES:
        raise BadReview(f"request body larger than {MAX_REVIEW_BYTES} bytes")
    try:
        review = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadReview(f"the body is not JSON: {exc}") from None
    if not isinstance(review, dict):
        raise BadReview("the body must be a JSON object (an AdmissionReview)")
    if review.get("kind") != "AdmissionReview":
        raise BadReview(f"expected kind AdmissionReview, got {review.get('kind')!r}")
    if review.get("apiVersion") != API_VERSION:
        raise BadReview(f"expected apiVersion {API_VERSION}, got {review.get('apiVersion')!r}")
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("the AdmissionReview has no request object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid or len(uid) > _MAX_UID:
        raise BadReview("request.uid must be a non-empty string")
    return request


def _response(uid: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": {"uid": uid, **body}}


def _deny(uid: str, message: str, *, code: int = 403) -> Outcome:
    reason = "Forbidden" if code == 403 else ("BadRequest" if code == 400 else "InternalError")
    text = f"agent-authz: {message}"
    status = {"code": code, "reason": reason, "message": text}
    return Outcome(_response(uid, {"allowed": False, "status": status}), False, AdmissionOutcome.DENIED, text)


def _allow(uid: str, injection: Injection) -> Outcome:
    body: dict[str, Any] = {"allowed": True}
    if injection.patch:
        body["patchType"] = "JSONPatch"
        body["patch"] = base64.b64encode(json.dumps(injection.patch, separators=(",", ":")).encode()).decode()
    if injection.warnings:
        body["warnings"] = list(injection.warnings)
    return Outcome(_response(uid, body), True, injection.outcome)


def _namespace(request: Mapping[str, Any]) -> str:
    namespace = request.get("namespace")
    if isinstance(namespace, str) and namespace:
        return namespace
    obj = request.get("object")
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    from_object = metadata.get("namespace") if isinstance(metadata, dict) else None
    return from_object if isinstance(from_object, str) and from_object else "default"


def decide(body: bytes, config: InjectorConfig, *, now: float) -> Outcome:
    """Answer one AdmissionReview.

    Args:
        body: the raw request body.
        config: the injector settings and the sidecar configuration.
        now: POSIX seconds.

    Returns:
        The :class:`Outcome` (its ``review`` is the response body).

    Raises:
        BadReview: the body cannot be answered at all (HTTP 400).
    """
    request = _parse(body)
    uid = request["uid"]
    job = request.get("kind") == _JOB_KIND and request.get("resource") == _JOB_RESOURCE
    pod = request.get("kind") == _POD_KIND and request.get("resource") == _POD_RESOURCE
    if not (pod or job) or request.get("subResource"):
        kind = request.get("kind")
        what = (
            f"{kind.get('group') or 'core'}/{kind.get('version')} {kind.get('kind')}"
            if isinstance(kind, dict)
            else kind
        )
        sub = f" (subresource {request.get('subResource')})" if request.get("subResource") else ""
        return _deny(
            uid,
            f"the injector handles v1 Pods and batch/v1 Jobs only, got {what}{sub}: check the webhook's rules",
            code=400,
        )
    operation = request.get("operation")
    namespace = _namespace(request)
    requester = Requester.from_user_info(request.get("userInfo"))
    try:
        if job and operation in ("CREATE", "UPDATE"):
            old = request.get("oldObject") if operation == "UPDATE" else None
            injection = check_job(request.get("object"), old, namespace, config, now=now, requester=requester)
        elif operation == "CREATE":
            injection = plan_injection(request.get("object"), namespace, config, now=now, requester=requester)
        elif operation == "UPDATE":
            injection = check_update(
                request.get("object"),
                request.get("oldObject"),
                namespace,
                config,
                now=now,
                requester=requester,
            )
        elif operation in ("DELETE", "CONNECT"):
            injection = Injection([], AdmissionOutcome.IGNORED)
        else:
            return _deny(uid, f"unknown operation {operation!r}", code=400)
    except InjectionDenied as exc:
        return _deny(uid, str(exc))
    except Exception:  # fail closed: a bug must not admit an unexamined pod
        _log.exception("review_failed", uid=uid, namespace=namespace)
        return _deny(uid, "internal error while examining the pod (see the webhook's log)", code=500)
    return _allow(uid, injection)
