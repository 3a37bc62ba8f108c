"""The injection webhook as the API server meets it: rendered by the chart, served over real TLS.

:func:`install` renders the chart with ``helm template`` and lays it out as the webhook pod would
mount it (:func:`sidecar.simulation.webhook.lay_out`); :class:`~sidecar.simulation.webhook.Webhook`
runs ``agent-authz webhook`` with it. The AdmissionReview builders below talk to it like the API
server: real ``admission.k8s.io/v1`` AdmissionReview JSON.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import jsonpatch

from sidecar.simulation.webhook import Installed, Webhook, lay_out
from tests.support.k8s import helm_template

__all__ = ["ADMIN", "Installed", "Webhook", "admission_review", "install", "patched", "user_info"]

RELEASE, NAMESPACE = "aa", "agent-authz"


def install(base: Path, values: dict[str, Any]) -> Installed:
    """``helm template`` with ``values``; write the settings and TLS files under ``base``."""
    return lay_out(base, helm_template(values=values, namespace=NAMESPACE, release=RELEASE), NAMESPACE)


ADMIN = {"username": "kubernetes-admin", "groups": ["system:masters", "system:authenticated"]}
"""``userInfo`` of a cluster administrator (``kubectl`` with the admin kubeconfig): a task author by
the chart's default (``injection.taskAuthors.groups: [system:masters]``)."""


def user_info(service_account: str) -> dict[str, Any]:
    """``userInfo`` of the ServiceAccount ``namespace/name``, as the API server fills it."""
    namespace, _, name = service_account.partition("/")
    return {
        "username": f"system:serviceaccount:{namespace}:{name}",
        "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, service_account)),
        "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
    }


def admission_review(
    obj: dict[str, Any],
    *,
    operation: str = "CREATE",
    old: dict[str, Any] | None = None,
    namespace: str = "agents",
    user: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An ``admission.k8s.io/v1`` AdmissionReview of ``obj`` (a Pod, or a ``batch/v1`` Job) as the API
    server sends it, from ``user`` (``userInfo``; default :data:`ADMIN`)."""
    pod = obj
    if obj.get("kind") == "Job":
        gvk = {"group": "batch", "version": "v1", "kind": "Job"}
        gvr = {"group": "batch", "version": "v1", "resource": "jobs"}
    else:
        gvk = {"group": "", "version": "v1", "kind": "Pod"}
        gvr = {"group": "", "version": "v1", "resource": "pods"}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "name": pod.get("metadata", {}).get("name", ""),
            "namespace": namespace,
            "operation": operation,
            "userInfo": user or ADMIN,
            "object": pod,
            "oldObject": old,
            "dryRun": False,
            "options": {
                "apiVersion": "meta.k8s.io/v1",
                "kind": "CreateOptions" if operation == "CREATE" else "UpdateOptions",
            },
        },
    }


def patched(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    """``pod`` with the response's RFC 6902 patch applied (the ``jsonpatch`` library, as the API server would)."""
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    result: dict[str, Any] = jsonpatch.apply_patch(pod, patch)
    return result
