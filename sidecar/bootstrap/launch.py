"""``agent-authz envoy``: render the bootstrap, then become Envoy (``execv``).

The injected Envoy container runs one command on a read-only root filesystem: the bootstrap is
rendered from ``sidecar.yaml`` into a writable directory (the pod's ``/run/agent-authz`` emptyDir)
and the process is replaced by Envoy, so Envoy is PID 1 of its container and gets SIGTERM directly.
"""

from __future__ import annotations

import os
from pathlib import Path

from sidecar.bootstrap.render import write_envoy
from sidecar.config.loader import load_config
from sidecar.envoy_bin import find_envoy

__all__ = ["envoy_argv", "exec_envoy"]


def envoy_argv(envoy: Path, bootstrap: Path, *, concurrency: int, log_level: str, extra: list[str]) -> list[str]:
    """Envoy's command line: ``-c bootstrap``, no hot restart (no shared memory), workers, log level."""
    return [
        str(envoy),
        "-c",
        str(bootstrap),
        "--disable-hot-restart",
        "--concurrency",
        str(concurrency),
        "--log-level",
        log_level,
        *extra,
    ]


def exec_envoy(
    config: Path,
    out: Path,
    *,
    envoy_bin: str | None = None,
    concurrency: int = 2,
    log_level: str = "warning",
    extra: list[str] | None = None,
) -> None:
    """Render ``config``'s bootstrap to ``out`` (file-based SDS beside it) and exec Envoy; never returns.

    Raises:
        ConfigError: the configuration is invalid.
        EnvoyNotFoundError: no Envoy binary.
        OSError: ``out`` cannot be written or Envoy cannot be executed.
    """
    envoy = find_envoy(envoy_bin)
    write_envoy(load_config(config), out)
    argv = envoy_argv(envoy, out, concurrency=concurrency, log_level=log_level, extra=extra or [])
    os.execv(argv[0], argv)  # noqa: S606 - the located Envoy binary, with our arguments
