"""Trust in the agent container without code changes: the bundle, its volume and the variables runtimes read.

The sidecar writes ``ca.pem`` (the pod CA alone) and ``ca-bundle.pem`` (the system CAs, then the pod
CA) into ``intercept.publish_dir`` (:func:`write_trust_files`). The agent container mounts that
directory read-only at :data:`AGENT_TRUST_DIR` and gets :func:`agent_trust_env`. The admission
webhook (``sidecar/inject/``) builds its patch from :func:`agent_trust_env`, :func:`agent_trust_mount`
and :func:`trust_volume`; nothing else needs to know these names.

What each variable reaches (see docs/concepts/interception.md, "Intercepting HTTPS", for what needs more):

======================================  ================  =============================================
variable                                value             read by
======================================  ================  =============================================
``SSL_CERT_FILE``                       bundle            OpenSSL's default paths: Python ``ssl`` (so
                                                          ``urllib``, ``aiohttp``; ``httpx`` checks it
                                                          first), Ruby, PHP, curl/OpenSSL, Go on Linux
``REQUESTS_CA_BUNDLE``                  bundle            Python ``requests`` (which ignores
                                                          ``SSL_CERT_FILE`` and uses certifi otherwise)
``CURL_CA_BUNDLE``                      bundle            the ``curl`` tool, ``requests`` too
``NODE_EXTRA_CA_CERTS``                 pod CA alone      Node.js (added to its built-in roots; read at
                                                          process start)
``GIT_SSL_CAINFO``                      bundle            git over HTTPS
``AWS_CA_BUNDLE``                       bundle            AWS SDKs and CLI (botocore uses certifi else)
``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``    bundle            gRPC C-core (Python/Ruby/PHP gRPC clients)
``PIP_CERT``                            bundle            pip (vendored certifi otherwise)
``DENO_CERT``                           bundle            Deno
======================================  ================  =============================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sidecar.tls_intercept.files import BUNDLE_FILE, CA_FILE, ensure_public_dir, write_atomic

__all__ = [
    "AGENT_TRUST_DIR",
    "BUNDLE_VARIABLES",
    "CA_VARIABLES",
    "TRUST_VOLUME",
    "agent_trust_env",
    "agent_trust_mount",
    "trust_volume",
    "write_trust_files",
]

AGENT_TRUST_DIR = "/etc/agent-authz/trust"
"""Where the agent container mounts ``intercept.publish_dir`` (read-only)."""
TRUST_VOLUME = "agent-authz-trust"
"""The shared volume: written by the sidecar, mounted read-only by the agent."""
BUNDLE_VARIABLES = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "AWS_CA_BUNDLE",
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    "PIP_CERT",
    "DENO_CERT",
)
"""Variables pointing at the whole bundle: these runtimes *replace* their roots with the file."""
CA_VARIABLES = ("NODE_EXTRA_CA_CERTS",)
"""Variables pointing at the pod CA alone: these runtimes *add* the file to their built-in roots."""


def agent_trust_env(trust_dir: str | Path = AGENT_TRUST_DIR) -> dict[str, str]:
    """The environment variables that make common runtimes trust the pod CA.

    Args:
        trust_dir: where the agent sees ``ca.pem`` and ``ca-bundle.pem``.

    Returns:
        Variable name -> absolute file path (the table in the module docstring).
    """
    bundle, ca = f"{trust_dir}/{BUNDLE_FILE}", f"{trust_dir}/{CA_FILE}"
    return {**dict.fromkeys(BUNDLE_VARIABLES, bundle), **dict.fromkeys(CA_VARIABLES, ca)}


def agent_trust_mount(trust_dir: str = AGENT_TRUST_DIR, volume: str = TRUST_VOLUME) -> dict[str, Any]:
    """The agent container's ``volumeMounts`` entry (Kubernetes ``VolumeMount``): read-only."""
    return {"name": volume, "mountPath": trust_dir, "readOnly": True}


def trust_volume(volume: str = TRUST_VOLUME) -> dict[str, Any]:
    """The pod's ``volumes`` entry: a small ``emptyDir`` (certificates only; the CA key is never here)."""
    return {"name": volume, "emptyDir": {"sizeLimit": "1Mi"}}


def write_trust_files(publish_dir: Path, ca_pem: bytes, system_bundle: bytes) -> tuple[Path, Path]:
    """Write ``ca.pem`` and ``ca-bundle.pem`` (``system_bundle`` then ``ca_pem``), world-readable.

    Returns:
        The paths of ``ca.pem`` and ``ca-bundle.pem``.

    Raises:
        ValueError: a private key is about to be published (never expected: a guard, not a feature).
        OSError: the directory cannot be written.
    """
    body = system_bundle if system_bundle.endswith(b"\n") or not system_bundle else system_bundle + b"\n"
    bundle = body + ca_pem
    if b"PRIVATE KEY" in bundle:
        raise ValueError("refusing to publish a private key")
    ensure_public_dir(publish_dir)
    ca_path, bundle_path = publish_dir / CA_FILE, publish_dir / BUNDLE_FILE
    write_atomic(ca_path, ca_pem, 0o644)
    write_atomic(bundle_path, bundle, 0o644)
    return ca_path, bundle_path
