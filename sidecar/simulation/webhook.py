"""The injection webhook as the API server meets it: rendered by the chart, served over real TLS.

:func:`lay_out` writes what the webhook pod would mount from the rendered chart: the settings
ConfigMap (``injector.yaml``, ``sidecar.yaml``, the root issuers' JWKS) and the TLS Secret the chart
generated (``genCA``/``genSignedCert``). :class:`Webhook` runs ``agent-authz webhook`` with them; the
API server double (:mod:`sidecar.simulation.kube_api`) and the tests talk to it like the API server:
HTTPS verified against the chart's CA bundle with the Service's DNS name, real
``admission.k8s.io/v1`` AdmissionReview JSON.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.harness import ManagedProcess, wait_until
from sidecar.simulation.chart import find, secret_data

__all__ = ["Installed", "Webhook", "lay_out"]


@dataclass(frozen=True)
class Installed:
    """What the chart rendered, laid out as the webhook pod's volumes.

    Attributes:
        manifests: every rendered manifest.
        settings_dir: the settings ConfigMap's files.
        tls_dir: ``tls.crt``, ``tls.key``, ``ca.crt`` of the webhook's Secret.
        server_name: the webhook Service's DNS name (``<svc>.<ns>.svc``), its certificate's name.
        ca_pem: the ``caBundle`` of the MutatingWebhookConfiguration.
    """

    manifests: list[dict[str, Any]]
    settings_dir: Path
    tls_dir: Path
    server_name: str
    ca_pem: bytes


def lay_out(base: Path, manifests: list[dict[str, Any]], namespace: str) -> Installed:
    """Write the webhook's settings and TLS files of the rendered chart under ``base``.

    Args:
        base: an empty directory.
        manifests: ``helm template`` output.
        namespace: the release namespace.
    """
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
    return Installed(manifests, settings_dir, tls_dir, f"{service['metadata']['name']}.{namespace}.svc", ca_pem)


class Webhook:
    """``agent-authz webhook`` (default ``127.0.0.1``, a free port), spoken to as the API server does.

    Args:
        installed: the laid-out chart.
        log_dir: logs and the ready file.
        cert / key: another serving pair (default: the chart's).
        listen: ``host:port`` to bind.
        prefix: prepended to the command (e.g. ``ip netns exec NODE``).
    """

    def __init__(
        self,
        installed: Installed,
        log_dir: Path,
        *,
        cert: Path | None = None,
        key: Path | None = None,
        listen: str = "127.0.0.1:0",
        prefix: Sequence[str] = (),
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
            listen,
            "--ready-file",
            str(self.ready),
        ]
        self.proc = ManagedProcess("webhook", argv, log_dir=log_dir, prefix=prefix)
        self.port = 0
        self.context = ssl.create_default_context(cadata=installed.ca_pem.decode())

    def start(self) -> None:
        """Start it and wait for its ready file (the bound port)."""
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
        """Stop it (and reap it)."""
        self.proc.stop()

    def post(self, body: bytes, *, content_type: str = "application/json", path: str = "/inject") -> tuple[int, Any]:
        """POST over TLS to ``127.0.0.1``, verifying the certificate for the Service name; returns
        ``(status, JSON body)``."""
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
        """Send an AdmissionReview; returns its ``response`` (checked: HTTP 200, uid echoed).

        Raises:
            AssertionError: not HTTP 200, not an AdmissionReview, or another uid.
        """
        status, body = self.post(json.dumps(review).encode())
        assert status == 200, body
        assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
        response: dict[str, Any] = body["response"]
        assert response["uid"] == review["request"]["uid"]
        return response
