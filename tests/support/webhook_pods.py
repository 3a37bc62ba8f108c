"""A webhook pod builder: the chart values and the plain agent pod the injection webhook tests admit.

:data:`VALUES` installs the chart for agents in the ``agents`` namespace of :data:`TD` with one
credential; :func:`agent_pod` is a pod as a user writes it (one container, a named port, a readiness
probe on it, an explicit ``runAsUser``) carrying the :data:`TASK` annotation.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from sidecar.inject import layout
from tests.support.k8s import RESTRICTED

__all__ = ["AGENT", "TASK", "TD", "VALUES", "agent_pod"]

TD = "test.example"
AGENT = f"spiffe://{TD}/ns/agents/sa/worker"
TASK = {
    "id": "q3-report",
    "purpose": "Quarterly report",
    "ttl": "1h",
    "egress": [
        {"host": "api.internal", "methods": ["GET"], "paths": ["/v1/items/*"]},
        {
            "host": "sentiment.example.com",
            "methods": ["POST"],
            "paths": ["/v1/analyze"],
            "token": False,
            "credential": "sentiment",
        },
    ],
}
VALUES = {
    "agentNamespaces": ["agents"],
    "identity": {"trustDomain": TD},
    "interception": {"excludeOutboundCIDRs": ["10.96.0.0/12"]},
    "sidecar": {
        "extraConfig": {
            "credentials": {"sentiment": {"header": "x-api-key", "file": "/etc/agent-authz/keys/sentiment"}}
        }
    },
}


def agent_pod(**annotations: str) -> dict[str, Any]:
    """A plain agent pod, as a user would write it (plus what the API server defaults)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "agent",
            "namespace": "agents",
            "annotations": {layout.ANNOTATION_TASK: yaml.safe_dump(TASK), **annotations},
        },
        "spec": {
            "serviceAccountName": "worker",
            "containers": [
                {
                    "name": "agent",
                    "image": "registry.example/agent:1.0",
                    "command": ["python", "-m", "agent"],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                    "securityContext": copy.deepcopy(RESTRICTED),
                }
            ],
        },
    }
