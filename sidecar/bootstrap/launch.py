"""``agent-authz envoy``: render the bootstrap, then become Envoy (``execv``).

The injected Envoy container runs one command on a read-only root filesystem: the bootstrap is
rendered from ``sidecar.yaml`` into a writable directory (the pod's ``/run/agent-authz`` emptyDir)
and the process is replaced by Envoy, so Envoy is PID 1 of its container and gets SIGTERM directly.
Envoy's admin socket (``envoy.admin_socket``) goes into a directory only the proxy user may enter,
created here if missing (:func:`sidecar.control_socket.prepare_socket_dir`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from sidecar import STARTED
from sidecar.bootstrap.names import XdsPaths
from sidecar.bootstrap.render import write_envoy
from sidecar.config.loader import LoadedConfig, load_config
from sidecar.control_socket import prepare_socket_dir, tcp_control_endpoints
from sidecar.envoy_bin import find_envoy
from sidecar.errors import ConfigError

__all__ = ["ENVOY_LOG_LEVELS", "envoy_argv", "exec_envoy", "wait_for_intercept_files"]

ENVOY_LOG_LEVELS = ("info", "warning", "error", "critical", "off")
"""The Envoy log levels the sidecar starts Envoy with. Not ``debug`` nor ``trace``: at those levels
Envoy prints request headers - the minted token, the injected API key - and ext_authz mutations to
its log (docs/concepts/logs.md, the ``drop-query`` log policy)."""
_LEVEL_FLAGS = ("-l", "--log-level", "--component-log-level")


def wait_for_intercept_files(loaded: LoadedConfig, timeout: float = 60.0) -> None:
    """With ``intercept``: wait until the sidecar has written Envoy's LDS and CDS files.

    The bootstrap names them and Envoy refuses to start without them; the sidecar writes them
    before it reports ready, but the containers start side by side (polled every 10 ms).

    Raises:
        ConfigError: they did not appear within ``timeout`` seconds.
    """
    intercept = loaded.settings.intercept
    if intercept is None:
        return
    paths = XdsPaths(loaded.resolve(intercept.state_dir).absolute())
    deadline = time.monotonic() + timeout
    while not (paths.listeners.exists() and paths.clusters.exists()):
        if time.monotonic() >= deadline:
            raise ConfigError(
                str(loaded.source),
                "intercept.state_dir",
                f"the sidecar has not written {paths.listeners} within {timeout:.0f}s (is it running?)",
            )
        time.sleep(0.01)


def envoy_argv(envoy: Path, bootstrap: Path, *, concurrency: int, log_level: str, extra: list[str]) -> list[str]:
    """Envoy's command line: ``-c bootstrap``, no hot restart (no shared memory), workers, log level.

    Raises:
        ValueError: ``log_level`` is not one of :data:`ENVOY_LOG_LEVELS`, or ``extra`` sets a log level.
    """
    if log_level not in ENVOY_LOG_LEVELS:
        raise ValueError(
            f"Envoy log level {log_level!r}: one of {', '.join(ENVOY_LOG_LEVELS)} (debug and trace print tokens)"
        )
    if any(arg.split("=", 1)[0] in _LEVEL_FLAGS for arg in extra):
        raise ValueError("extra Envoy arguments may not set a log level (use --log-level)")
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

    With ``intercept``, Envoy starts once the sidecar has written its dynamic listeners and clusters.

    Raises:
        ConfigError: the configuration is invalid, or the intercept files did not appear in 60 s.
        ValueError: a log level that prints credentials (see :func:`envoy_argv`).
        EnvoyNotFoundError: no Envoy binary.
        OSError: ``out`` cannot be written or Envoy cannot be executed.
    """
    envoy_argv(Path("envoy"), out, concurrency=concurrency, log_level=log_level, extra=extra or [])  # refuse early
    envoy = find_envoy(envoy_bin)
    loaded = load_config(config)
    admin_socket = loaded.settings.envoy.admin_socket
    if admin_socket is not None:
        prepare_socket_dir(loaded.resolve(admin_socket).absolute(), file=str(loaded.source), field="envoy.admin_socket")
    for key, address in tcp_control_endpoints(loaded):
        if key == "envoy.admin_port":  # stderr: Envoy's stdout is its access log
            print(
                f"agent-authz envoy: warning: Envoy's admin is on TCP {address} ({key}), where every process of "
                "the pod, the agent included, can reach it: set envoy.admin_socket",
                file=sys.stderr,
            )
    rendering = time.monotonic()
    write_envoy(loaded, out)
    rendered = time.monotonic()
    wait_for_intercept_files(loaded)
    stamps = {"started": STARTED, "render": rendering, "rendered": rendered, "exec": time.monotonic()}
    print(  # stderr: the startup breakdown of the Envoy container (monotonic clock)
        json.dumps(
            {
                "event": "envoy_exec",
                "startup_s": {k: round(v - STARTED, 4) for k, v in stamps.items()},
                "started_monotonic": STARTED,
            }
        ),
        file=sys.stderr,
        flush=True,
    )
    argv = envoy_argv(envoy, out, concurrency=concurrency, log_level=log_level, extra=extra or [])
    os.execv(argv[0], argv)  # noqa: S606 - the located Envoy binary, with our arguments
