"""The process harness of the demo and the end-to-end tests: start children, wait until ready, always reap.

Not used by ``agent-authz serve``: it ships in the package only because ``agent-authz demo`` starts
a real sidecar and Envoy with it.

Readiness is observed, never assumed: Envoy's admin ``/ready``, the sidecar's ready file and
``/readyz``. Every wait has a deadline and reports the child's log tail when it expires.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sidecar.envoy_bin import find_envoy

__all__ = [
    "AuthorityProcess",
    "EnvoyProcess",
    "ManagedProcess",
    "SidecarProcess",
    "http_get",
    "unix_http",
    "wait_until",
]

T = TypeVar("T")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 2.0, *, ca_file: Path | None = None) -> tuple[int, bytes]:
    """GET ``url`` directly (never through a proxy); returns ``(status, body)``.

    Args:
        url: ``http://`` or ``https://`` (verified against ``ca_file``, else the system CAs).
        timeout: seconds.
        ca_file: the CA bundle of an ``https://`` server.

    Raises:
        OSError: connection failed (a TLS verification failure included).
    """
    opener = _NO_PROXY
    if ca_file is not None:
        import ssl

        context = ssl.create_default_context(cafile=str(ca_file))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
    try:
        with opener.open(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as err:
        return int(err.code), bytes(err.read())


def https_named_get(url: str, server_name: str, path: str, ca_file: Path, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``path`` from the ``https://host:port`` of ``url``, verifying its certificate for
    ``server_name`` (also the SNI and ``Host``): a server reached by address whose certificate names
    a Service. Returns ``(status, body)``; ``(0, b"")`` when the connection or handshake fails."""
    import ssl

    parsed = urllib.parse.urlsplit(url)
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        raw = socket.create_connection((parsed.hostname or "", parsed.port or 443), timeout=timeout)
        conn = http.client.HTTPConnection(server_name, parsed.port or 443, timeout=timeout)
        conn.sock = context.wrap_socket(raw, server_hostname=server_name)
        try:
            conn.request("GET", path)
            reply = conn.getresponse()
            return int(reply.status), reply.read()
        finally:
            conn.close()
    except OSError:
        return 0, b""


class _UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix socket (Envoy's admin pipe)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def unix_http(path: str, method: str, target: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """One HTTP request over the Unix socket ``path`` (e.g. ``GET /ready`` on Envoy's admin socket).

    Returns:
        ``(status, body)``.

    Raises:
        OSError: the socket cannot be reached (``ENOENT``, ``EACCES``, ``ECONNREFUSED``).
    """
    conn = _UnixConnection(path, timeout)
    try:
        conn.request(method, target)
        response = conn.getresponse()
        return response.status, response.read()
    except http.client.HTTPException as exc:
        raise OSError(f"bad HTTP answer on {path}: {exc!r}") from None
    finally:
        conn.close()


def wait_until(probe: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``probe`` until it returns a value other than ``None``/``False``.

    Raises:
        TimeoutError: not ready within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = probe()
            if value is not None and value is not False:
                return value
        except OSError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.1f}s (last error: {last_error})")
        time.sleep(interval)


class ManagedProcess:
    """A child process whose stdout/stderr go to files in ``log_dir``.

    Args:
        name: short name used for log files.
        argv: the command.
        log_dir: where ``NAME.out`` and ``NAME.err`` are written.
        env: environment (default: inherit).
        cwd: working directory.
        prefix: prepended to ``argv``, e.g. ``["setpriv", "--reuid", "1337", ...]`` to run as the
            proxy user (the interception tests).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.argv = [*prefix, *argv]
        self.log_dir = log_dir
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"

    def start(self) -> None:
        """Start the process in its own session (so a stray Ctrl-C does not reach it first)."""
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=err, env=self.env, cwd=self.cwd, start_new_session=True
            )

    def alive(self) -> bool:
        """Whether the process is running."""
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Raise ``RuntimeError`` with the log tail if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of stderr and stdout."""
        out = []
        for path in (self.stderr_path, self.stdout_path):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; always reaps. Returns the exit code.

        The signals go to the process's whole group (its session, :meth:`start`), and whatever of the
        group outlives the process is killed: a command run through wrappers (``setpriv``, ``nsenter``,
        a container's PID namespace, where the command is PID 1 and ignores SIGTERM) leaves nothing
        behind.
        """
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                proc.wait(timeout)
        self._signal_group(signal.SIGKILL)  # the rest of the group, if any
        return proc.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        proc = self.proc
        assert proc is not None
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # no member left
            pass
        except PermissionError:  # a group we may not signal (started by another user): the process only
            if proc.poll() is None:
                proc.send_signal(sig)


class SidecarProcess(ManagedProcess):
    """``agent-authz serve`` with a ready file."""

    def __init__(
        self,
        config: Path,
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        name: str = "sidecar",
        prefix: Sequence[str] = (),
        log_level: str | None = None,
    ) -> None:
        self.ready_file = log_dir / f"{name}.ready.json"
        argv = [sys.executable, "-m", "sidecar", "serve", "--config", str(config), "--ready-file", str(self.ready_file)]
        if log_level is not None:
            argv += ["--log-level", log_level]
        super().__init__(name, argv, log_dir=log_dir, env=env, prefix=prefix)
        self.addresses: dict[str, Any] = {}

    def start(self) -> None:
        """Start the sidecar; :meth:`wait_ready` waits for it."""
        self.ready_file.unlink(missing_ok=True)
        super().start()

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        """Wait for the ready file and ``/readyz``; returns the bound addresses."""

        def probe() -> dict[str, Any] | None:
            self.check_alive()
            if not self.ready_file.exists():
                return None
            data: dict[str, Any] = json.loads(self.ready_file.read_text())
            return data

        self.addresses = wait_until(probe, timeout=timeout, what=f"{self.name} ready file")
        wait_until(lambda: http_get(self.admin_url + "/readyz")[0] == 200, timeout=timeout, what=f"{self.name} /readyz")
        return self.addresses

    @property
    def admin_url(self) -> str:
        """``http://host:port`` of the admin server."""
        return f"http://{self.addresses['admin']}"


class AuthorityProcess(ManagedProcess):
    """``agent-authz authority`` (one replica) with a ready file.

    Args:
        config: ``authority.yaml``.
        ca_file: the CA of its serving certificate (to probe ``/readyz``).
        log_dir: logs and the ready file.
        env: environment (e.g. ``HOSTNAME`` to name the replica in its records).
        name: log file stem; distinct per replica.
        prefix: prepended to the command (e.g. ``ip netns exec NODE``).
    """

    def __init__(
        self,
        config: Path,
        *,
        ca_file: Path,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        name: str = "authority",
        prefix: Sequence[str] = (),
    ) -> None:
        self.ready_file = log_dir / f"{name}.ready.json"
        self.ca_file = ca_file
        argv = [
            sys.executable,
            "-m",
            "sidecar",
            "authority",
            "--config",
            str(config),
            "--ready-file",
            str(self.ready_file),
        ]
        super().__init__(name, argv, log_dir=log_dir, env=env, prefix=prefix)
        self.addresses: dict[str, Any] = {}

    def start(self) -> None:
        """Start the replica; :meth:`wait_ready` waits for it."""
        self.ready_file.unlink(missing_ok=True)
        super().start()

    def wait_ready(self, timeout: float = 20.0, *, server_name: str | None = None) -> dict[str, Any]:
        """Wait for the ready file and ``/readyz`` (both ConfigMaps read); returns the bound addresses.

        Args:
            timeout: seconds for each of the two waits.
            server_name: verify the certificate for this name instead of the listener's address
                (a certificate naming only the Service), sent as SNI.
        """

        def probe() -> dict[str, Any] | None:
            self.check_alive()
            if not self.ready_file.exists():
                return None
            data: dict[str, Any] = json.loads(self.ready_file.read_text())
            return data

        self.addresses = wait_until(probe, timeout=timeout, what=f"{self.name} ready file")

        def ready() -> bool:
            if server_name is None:
                return http_get(self.public_url + "/readyz", ca_file=self.ca_file)[0] == 200
            return https_named_get(self.public_url, server_name, "/readyz", self.ca_file)[0] == 200

        wait_until(ready, timeout=timeout, what=f"{self.name} /readyz")
        return self.addresses

    @property
    def public_url(self) -> str:
        """``https://127.0.0.1:PORT`` of the public listener."""
        return "https://" + str(self.addresses["public"]).replace("0.0.0.0", "127.0.0.1")

    @property
    def feed_url(self) -> str:
        """``https://127.0.0.1:PORT`` of the feed listener."""
        return "https://" + str(self.addresses["feed"]).replace("0.0.0.0", "127.0.0.1")


class EnvoyProcess(ManagedProcess):
    """Envoy with a bootstrap file; ports may be 0 and are discovered through the admin API.

    The admin interface is wherever the bootstrap puts it - a Unix socket (``envoy.admin_socket``)
    or a TCP port - as Envoy reports it (``--admin-address-path``); :meth:`admin` reaches either.
    """

    def __init__(
        self,
        bootstrap: Path,
        *,
        log_dir: Path,
        envoy_bin: str | None = None,
        name: str = "envoy",
        concurrency: int = 1,
        log_level: str = "warning",
        prefix: Sequence[str] = (),
    ) -> None:
        self.admin_path = log_dir / f"{name}.admin"
        argv = [
            str(find_envoy(envoy_bin)),
            "-c",
            str(bootstrap),
            "--concurrency",
            str(concurrency),
            "--disable-hot-restart",
            "--admin-address-path",
            str(self.admin_path),
            "--log-level",
            log_level,
            "--file-flush-interval-msec",  # access log lines reach NAME.out within 250 ms (default 10 s)
            "250",
        ]
        super().__init__(name, argv, log_dir=log_dir, prefix=prefix)

    def start(self) -> None:
        """Start Envoy; :meth:`wait_ready` waits for it."""
        self.admin_path.unlink(missing_ok=True)
        super().start()

    @property
    def admin_address(self) -> str:
        """Where Envoy's admin listens: a socket path (``/…``) or ``host:port``."""
        return self.admin_path.read_text().strip()

    def admin(self, target: str, method: str = "GET") -> tuple[int, bytes]:
        """One request to Envoy's admin interface, e.g. ``admin("/stats?format=json")``.

        Raises:
            OSError: the admin interface cannot be reached.
        """
        address = self.admin_address
        if address.startswith("/"):
            return unix_http(address, method, target)
        if method != "GET":
            raise ValueError("only GET over TCP")
        return http_get(f"http://{address}{target}")

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until Envoy's admin answers ``/ready`` with 200 (all listeners initialised)."""

        def probe() -> bool:
            self.check_alive()
            if not self.admin_path.exists() or not self.admin_address:
                return False
            return self.admin("/ready")[0] == 200

        wait_until(probe, timeout=timeout, what="envoy /ready")

    def listener_port(self, name: str) -> int:
        """The bound port of listener ``name`` (works with port 0 in the bootstrap)."""
        status, body = self.admin("/listeners?format=json")
        if status != 200:
            raise RuntimeError(f"envoy admin /listeners answered {status}")
        for listener in json.loads(body).get("listener_statuses", []):  # ``{}`` while none is active
            if listener["name"] == name:
                return int(listener["local_address"]["socket_address"]["port_value"])
        raise KeyError(f"no listener named {name!r}")

    def stat(self, name: str) -> int:
        """The value of counter or gauge ``name`` (0 when absent)."""
        _, body = self.admin(f"/stats?filter=^{name}$&format=json")
        for item in json.loads(body).get("stats", []):
            if item.get("name") == name:
                return int(item.get("value", 0))
        return 0


class AuthzStack:
    """The sidecar and Envoy for one ``sidecar.yaml``: what a pod runs, as local processes.

    Args:
        config: the sidecar config (its ``envoy`` ports may be 0).
        work_dir: logs, ready files and the rendered ``envoy.json`` go here.
        envoy_bin: Envoy binary override.
        name: prefix for log file names.
        run_as: command prefix for both processes (e.g. ``setpriv`` to the proxy UID).
        envoy_log_level / sidecar_log_level: the processes' log levels (default: Envoy ``warning``,
            the sidecar's own default).
    """

    def __init__(
        self,
        config: Path,
        work_dir: Path,
        *,
        envoy_bin: str | None = None,
        name: str = "",
        run_as: Sequence[str] = (),
        envoy_log_level: str = "warning",
        sidecar_log_level: str | None = None,
    ) -> None:
        self.config = config
        self.work_dir = work_dir
        prefix = f"{name}-" if name else ""
        self.bootstrap = work_dir / f"{prefix}envoy.json"
        self.sidecar = SidecarProcess(
            config, log_dir=work_dir, name=f"{prefix}sidecar", prefix=run_as, log_level=sidecar_log_level
        )
        self.envoy = EnvoyProcess(
            self.bootstrap,
            log_dir=work_dir,
            envoy_bin=envoy_bin,
            name=f"{prefix}envoy",
            prefix=run_as,
            log_level=envoy_log_level,
        )
        self.egress_port = 0

    def start(self, timeout: float = 20.0) -> None:
        """Start the sidecar, render the bootstrap, start Envoy; wait for both to be ready."""
        from sidecar.bootstrap.render import write_envoy
        from sidecar.config.loader import load_config

        try:
            self.sidecar.start()
            write_envoy(load_config(self.config), self.bootstrap)
            self.sidecar.wait_ready(timeout)
            self.envoy.start()
            self.envoy.wait_ready(timeout)
            self.egress_port = self.envoy.listener_port("egress_http")
        except BaseException:
            self.stop()
            raise

    @property
    def egress_proxy(self) -> str:
        """``http://127.0.0.1:PORT``: use as ``HTTP_PROXY``."""
        return f"http://127.0.0.1:{self.egress_port}"

    def stop(self) -> None:
        """Stop Envoy, then the sidecar; always reaps both."""
        try:
            self.envoy.stop()
        finally:
            self.sidecar.stop()
