"""What the sidecar writes for Envoy and for the agent, and how (atomically, with tight modes).

``intercept.state_dir`` (``0700``, the proxy user's; Envoy runs as the same user)::

    ca/ca.key, ca/ca.pem      the pod CA (0600), so that a restarted sidecar keeps the CA the agent trusts
    xds/listeners.json        file-based LDS: the ``outbound`` and ``intercept_connect`` listeners
    xds/clusters.json         file-based CDS: one verifying TLS cluster per intercepted host and port

(The layout is :class:`~sidecar.bootstrap.names.XdsPaths`: the bootstrap names these files. The
leaves' keys are not here: Envoy gets them over gRPC SDS, :mod:`sidecar.tls_intercept.sds`.)

``intercept.publish_dir`` (for the agent container; only certificates)::

    ca.pem                    the pod CA certificate
    ca-bundle.pem             the system bundle followed by the pod CA

Every file is written to a temporary name in its directory and renamed over the target, so Envoy
(which watches each directory for renames: ``watched_directory``) and the agent never read half a
file. Envoy's xDS file format is a ``DiscoveryResponse`` in JSON (``{"version_info", "resources"}``).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any

__all__ = [
    "BUNDLE_FILE",
    "CA_FILE",
    "CLUSTER_TYPE",
    "LISTENER_TYPE",
    "ensure_private_dir",
    "ensure_public_dir",
    "write_atomic",
    "write_resources",
]

CA_FILE = "ca.pem"
BUNDLE_FILE = "ca-bundle.pem"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) owned by this user with mode ``0700``; tighten an existing one.

    Raises:
        PermissionError: ``path`` exists and belongs to another user (its mode cannot be trusted),
            or is not a directory.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{path} is not a directory")
    if info.st_uid != os.geteuid():
        raise PermissionError(f"{path} belongs to uid {info.st_uid}, not to this process (uid {os.geteuid()})")
    if stat.S_IMODE(info.st_mode) != 0o700:
        path.chmod(0o700)


def ensure_public_dir(path: Path) -> None:
    """Create ``path`` (and parents) readable by everyone (``0755``), for the agent's certificates."""
    path.mkdir(mode=0o755, parents=True, exist_ok=True)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode``: a temporary file in the same directory, then a rename.

    The file is created with ``mode`` (``O_EXCL``; the umask can only narrow it) and then set to
    exactly ``mode``, so a secret is never readable by others, not even for an instant.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_resources(path: Path, type_url: str, resources: list[dict[str, Any]], version: str, mode: int) -> None:
    """Write an xDS file: a ``DiscoveryResponse`` holding ``resources`` (proto3 JSON dicts) of ``type_url``."""
    body = {"version_info": version, "resources": [{"@type": type_url, **resource} for resource in resources]}
    write_atomic(path, (json.dumps(body, indent=1) + "\n").encode(), mode)
