"""The injection webhook as the API server meets it: rendered by the chart, served over real TLS.

:func:`install` renders the chart with ``helm template`` and lays out what the webhook pod would
mount: the settings ConfigMap (``injector.yaml``, ``sidecar.yaml``) and the TLS Secret the chart
generated (``genCA``/``genSignedCert``). :class:`Webhook` runs ``agent-authz webhook`` with them and
talks to it like the API server: HTTPS verified against the chart's CA bundle with the Service's
DNS name, real ``admission.k8s.io/v1`` AdmissionReview JSON.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch

from sidecar.harness import ManagedProcess, wait_until
from tests.support.k8s import find, helm_template, secret_data

__all__ = ["Installed", "Webhook", "admission_review", "install", "patched"]

RELEASE, NAMESPACE = "aa", "agent-authz"


@dataclass(frozen=True)
class Installed:
    """What the chart rendered, laid out as the webhook pod's volumes."""

    manifests: list[dict[str, Any]]
    settings_dir: Path
    tls_dir: Path
    server_name: str
    ca_pem: bytes


def install(base: Path, values: dict[str, Any]) -> Installed:
    """``helm template`` with ``values``; write the settings and TLS files under ``base``."""
    manifests = helm_template(values=values, namespace=NAMESPACE, release=RELEASE)
    (settings,) = find(manifests, "ConfigMap", "-webhook-settings")
    (tls,) = find(manifests, "Secret", "-webhook-tls")
    settings_dir, tls_dir = base / "settings", base / "tls"
    for directory in (settings_dir, tls_dir):
        directory.mkdir(parents=True)
    for name, text in settings["data"].items():
        (settings_dir / name).write_text(text)
    for key in ("tls.crt", "tls.key", "ca.crt"):
        (tls_dir / key).write_bytes(secret_data(tls, key))
    (service,) = find(manifests, "Service", "-webhook")
    (config,) = find(manifests, "MutatingWebhookConfiguration")
    ca_pem = base64.b64decode(config["webhooks"][0]["clientConfig"]["caBundle"])
    return Installed(manifests, settings_dir, tls_dir, f"{service['metadata']['name']}.{NAMESPACE}.svc", ca_pem)


class Webhook:
    """``agent-authz webhook`` on 127.0.0.1 (free port), spoken to as the API server does."""

    def __init__(
        self, installed: Installed, log_dir: Path, *, cert: Path | None = None, key: Path | None = None
    ) -> None:
        self.installed = installed
        self.ready = log_dir / "webhook.ready"
        tls = installed.tls_dir
        argv = [
            sys.executable,
            "-m",
            "sidecar",
            "webhook",
            "--settings",
            str(installed.settings_dir / "injector.yaml"),
            "--tls-cert",
            str(cert or tls / "tls.crt"),
            "--tls-key",
            str(key or tls / "tls.key"),
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            str(self.ready),
        ]
        self.proc = ManagedProcess("webhook", argv, log_dir=log_dir)
        self.port = 0
        self.context = ssl.create_default_context(cadata=installed.ca_pem.decode())

    def start(self) -> None:
        self.proc.start()

        def up() -> dict[str, Any] | None:
            self.proc.check_alive()
            return json.loads(self.ready.read_text()) if self.ready.exists() else None

        try:
            self.port = int(wait_until(up, timeout=20, what="webhook ready file")["listen"].rpartition(":")[2])
        except BaseException:
            self.proc.stop()
            raise

    def stop(self) -> None:
        self.proc.stop()

    def post(self, body: bytes, *, content_type: str = "application/json", path: str = "/inject") -> tuple[int, Any]:
        """POST over TLS, verifying the certificate for the Service name; returns ``(status, JSON body)``."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        conn = http.client.HTTPConnection(self.installed.server_name, self.port, timeout=10)
        conn.sock = self.context.wrap_socket(raw, server_hostname=self.installed.server_name)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": content_type})
            reply = conn.getresponse()
            return reply.status, json.loads(reply.read())
        finally:
            conn.close()

    def review(self, review: dict[str, Any]) -> dict[str, Any]:
        """Send an AdmissionReview; returns its ``response`` (checked: HTTP 200, uid echoed)."""
        status, body = self.post(json.dumps(review).encode())
        assert status == 200, body
        assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
        response: dict[str, Any] = body["response"]
        assert response["uid"] == review["request"]["uid"]
        return response


def admission_review(
    pod: dict[str, Any], *, operation: str = "CREATE", old: dict[str, Any] | None = None, namespace: str = "agents"
) -> dict[str, Any]:
    """An ``admission.k8s.io/v1`` AdmissionReview of ``pod`` as the API server sends it."""
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
            "userInfo": {
                "username": "system:serviceaccount:kube-system:job-controller",
                "groups": ["system:serviceaccounts"],
            },
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
