"""``agent-authz webhook-check``: ask a running injector about two sample pods (the chart's ``helm test``).

It sends real ``admission.k8s.io/v1`` AdmissionReviews over TLS, verifying the server certificate
against ``--ca-file`` and the URL's host name:

1. a plain pod: must be allowed with a JSON Patch that adds the three injected init containers;
2. the same pod with an invalid ``agent-authz.io/task`` annotation: must be denied with a message.

Exit 0 when both answers are right, 1 otherwise (the reason on stderr).
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
import uuid
from typing import Any

from sidecar.errors import AgentAuthzError, ErrorCode
from sidecar.inject import layout
from sidecar.inject.review import API_VERSION

__all__ = ["CheckFailed", "check_webhook", "sample_review"]


class CheckFailed(AgentAuthzError):
    """The webhook's answer was wrong or missing; ``str(exc)`` says how."""

    code = ErrorCode.WEBHOOK_CHECK_FAILED


def sample_review(namespace: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """An AdmissionReview (CREATE) of a minimal agent pod in ``namespace``."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "agent-authz-check-", "namespace": namespace, "annotations": annotations or {}},
        "spec": {
            "containers": [
                {
                    "name": "agent",
                    "image": "registry.invalid/agent:1",
                    "command": ["true"],
                    "securityContext": {  # what the webhook admits: no way to become root or the proxy
                        "runAsNonRoot": True,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ]
        },
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:agent-authz:helm-test"},
            "object": pod,
            "oldObject": None,
            "dryRun": True,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def _post(url: str, review: dict[str, Any], context: ssl.SSLContext, timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(  # noqa: S310 - https only, checked by the caller
        url, data=json.dumps(review).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(request, timeout=timeout) as reply:
            answer: dict[str, Any] = json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        raise CheckFailed(f"HTTP {exc.code}: {exc.read()[:300]!r}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CheckFailed(f"no answer from {url}: {exc}") from None
    response = answer.get("response")
    if answer.get("apiVersion") != API_VERSION or not isinstance(response, dict):
        raise CheckFailed(f"not an {API_VERSION} AdmissionReview: {str(answer)[:300]}")
    if response.get("uid") != review["request"]["uid"]:
        raise CheckFailed("the response does not echo the request uid")
    return response


def check_webhook(url: str, *, ca_file: str, namespace: str, timeout: float = 10.0) -> list[str]:
    """Run both checks against ``url`` (``https://…/inject``).

    Returns:
        One line per passed check.

    Raises:
        CheckFailed: an answer was wrong, or the server could not be reached or verified.
    """
    if not url.startswith("https://"):
        raise CheckFailed("the webhook URL must be https://")
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise CheckFailed(f"cannot load the CA bundle {ca_file}: {exc}") from None
    passed = []
    response = _post(url, sample_review(namespace), context, timeout)
    if response.get("allowed") is not True or response.get("patchType") != "JSONPatch":
        raise CheckFailed(f"a plain pod was not allowed with a JSON Patch: {response.get('status')}")
    patch = json.loads(base64.b64decode(response["patch"]))
    added = [
        c.get("name")
        for op in patch
        if op.get("op") == "add" and str(op.get("path", "")).startswith("/spec/initContainers")
        for c in (op["value"] if isinstance(op.get("value"), list) else [op.get("value")])
        if isinstance(c, dict)
    ]
    wanted = [layout.CONTAINER_INIT, layout.CONTAINER_SIDECAR, layout.CONTAINER_ENVOY]
    if added != wanted:
        raise CheckFailed(f"the patch adds init containers {added}, expected {wanted}")
    passed.append(f"plain pod: allowed, patch adds {', '.join(wanted)}")
    bad = _post(url, sample_review(namespace, {layout.ANNOTATION_TASK: "id: [unclosed"}), context, timeout)
    message = (bad.get("status") or {}).get("message", "")
    if bad.get("allowed") is not False or layout.ANNOTATION_TASK not in message:
        raise CheckFailed(f"a pod with an invalid task annotation was not refused: {bad}")
    passed.append(f"invalid task annotation: denied ({message[:80]})")
    return passed
