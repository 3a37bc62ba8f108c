"""Control sockets: the Unix sockets only the proxy user may reach (the authz gRPC/SDS server, the
HTTP checks service, Envoy's admin).

The agent shares the pod's network namespace, so every TCP port on loopback is open to it. A
filesystem Unix socket is not: connecting needs search permission on every directory of its path and
write permission on the socket itself (unix(7)), and creating a name needs write permission on its
directory. So a control socket lives in a directory of its own (the chart's
``/run/agent-authz/ctl/``, in the ``run`` emptyDir the agent container does not mount), created
``0700`` by the proxy user, and is made ``0600`` once bound:

* :func:`prepare_socket_dir` creates the directory when it is missing and refuses to use one that
  is a symlink, belongs to another user, or lets group or others write in it - a process that can
  write there could replace the socket, or take its name once the owner has died (squatting);
* :func:`restrict_socket` makes the bound socket ``0600``;
* :func:`tcp_control_endpoints` names the control endpoints a configuration puts on TCP instead
  (``listen.authz`` as ``host:port``, ``envoy.admin_socket: null``), which every process of the pod
  can reach: ``serve`` and ``envoy`` log a warning for each.

Abstract sockets (``unix:@name``) are never used: they have no permissions and are shared by every
process of a network namespace, the agent included (the schema asks for an absolute path).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sidecar.config.loader import LoadedConfig
from sidecar.errors import ConfigError

__all__ = ["SOCKET_MODE", "prepare_socket_dir", "restrict_socket", "tcp_control_endpoints"]

SOCKET_MODE = 0o600
"""Mode of a bound control socket: only its owner may connect."""
DIR_MODE = 0o700
"""Mode a missing control-socket directory is created with."""
_MAX_PATH = 107  # sun_path holds 108 bytes with the terminating NUL


def prepare_socket_dir(socket_path: Path, *, file: str, field: str) -> None:
    """Make sure ``socket_path``'s directory exists and only this process's user may change it.

    A missing directory is created ``0700`` (its missing parents with the default mode). An existing
    one must be a real directory (not a symlink), owned by the effective UID, and not writable by
    group or others. A stale socket at ``socket_path`` (an earlier run) is left for the server to
    replace.

    Args:
        socket_path: the absolute path the socket will be bound to.
        file / field: the configuration file and key, for the error message.

    Raises:
        ConfigError: the path is too long for ``sun_path`` (107 bytes), the directory cannot be
            created, or it fails the checks above.
    """
    if len(os.fsencode(socket_path)) > _MAX_PATH:
        raise ConfigError(file, field, f"{socket_path} is longer than {_MAX_PATH} bytes (the Unix socket limit)")
    directory = socket_path.parent
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
        info = directory.lstat()
    except OSError as exc:
        raise ConfigError(file, field, f"cannot create the socket directory {directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(file, field, f"{directory} is not a directory (a symlink?): refused for a control socket")
    if info.st_uid != os.geteuid():
        raise ConfigError(
            file,
            field,
            f"{directory} belongs to UID {info.st_uid}, not to this process (UID {os.geteuid()}): another user "
            "could replace the socket",
        )
    if info.st_mode & 0o022:
        raise ConfigError(
            file,
            field,
            f"{directory} is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o}): they could take "
            "the socket's name; use a directory only this user can write (0700)",
        )


def restrict_socket(socket_path: Path) -> None:
    """Make the bound socket at ``socket_path`` connectable by its owner only (``0600``).

    Raises:
        OSError: the socket is not there.
    """
    os.chmod(socket_path, SOCKET_MODE)


def tcp_control_endpoints(loaded: LoadedConfig) -> list[tuple[str, str]]:
    """The control endpoints of ``loaded`` on TCP, where every process of the pod can reach them.

    Returns:
        ``(config key, address)`` pairs: ``listen.authz`` when it is ``host:port`` (its ``Check``
        answers carry injected keys and tokens, its SDS streams the intercept keys),
        ``listen.authz_http`` when the HTTP checks service is on ``host:port`` (its answers carry
        them too), and
        ``envoy.admin_port`` when ``envoy.admin_socket`` is null (Envoy's admin can change the log
        level, stop Envoy and flip readiness).
    """
    settings = loaded.settings
    found = []
    if not settings.listen.authz.startswith("unix:"):
        found.append(("listen.authz", settings.listen.authz))
    http_checks = settings.http_checks()
    if http_checks is not None and not http_checks.startswith("unix:"):
        found.append(("listen.authz_http", http_checks))
    if settings.envoy.admin_socket is None:
        found.append(("envoy.admin_port", f"127.0.0.1:{settings.envoy.admin_port}"))
    return found
