"""The network-namespace pod of the namespace tests: its lifecycle, and what the agent sees in it.

:func:`pod_sandbox` is the one fixture behind every namespace test (``tests/e2e/test_interception.py``:
plain HTTP, passthrough, originate, iptables; ``test_intercept_netns.py``: TLS interception;
``test_injected_pod.py``: the webhook's patched pod run as the kubelet would): a pod and an upstream
namespace, a base directory, the processes started in them - and, whatever happens, every process
stopped and reaped, the namespaces and their hosts file deleted (asserted), the directory removed.

:class:`Pod` is the running pod of the first two: the test thread sits in the pod namespace
(:meth:`sidecar.simulation.netns.PodNetwork.inside`), so commands run there; with a hosts file
(:meth:`sidecar.simulation.netns.PodNetwork.write_hosts`) agent commands go through ``ip netns exec``, which
bind-mounts it over ``/etc/hosts`` for that command only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import jwt

from sidecar.harness import AuthzStack, ManagedProcess, http_get, wait_until
from sidecar.simulation.netns import AGENT_UID, PodNetwork, as_user, missing_tools

__all__ = ["REPO", "Curl", "Pod", "Sandbox", "jwks", "pod_sandbox", "start_servers", "token_claims"]

REPO = Path(__file__).resolve().parents[2]


class Stoppable(Protocol):
    def stop(self) -> Any: ...


S = TypeVar("S", bound=Stoppable)


@dataclass
class Sandbox:
    """A pod namespace (and its upstream), a base directory, and what runs in them (stopped last-first)."""

    net: PodNetwork
    base: Path
    running: list[Stoppable] = field(default_factory=list)

    def dir(self, name: str, mode: int = 0o755) -> Path:
        """A directory below :attr:`base` (world-readable by default: the proxy and agent UIDs read it)."""
        path = self.base / name
        path.mkdir(parents=True)
        path.chmod(mode)
        return path

    def keep(self, thing: S) -> S:
        """Stop ``thing`` when the sandbox closes (after everything kept later)."""
        self.running.append(thing)
        return thing


@contextlib.contextmanager
def pod_sandbox(prefix: str, *, tools: Sequence[str] = (), hosts: Mapping[str, str] | None = None) -> Iterator[Sandbox]:
    """The namespaces of one pod test, created, and always torn down.

    Args:
        prefix: of the base directory's name (in ``/tmp``: unix socket paths stay short).
        tools: commands needed besides :func:`~sidecar.simulation.netns.missing_tools`'.
        hosts: the pod's name resolution (``name -> address``), if any.
    """
    missing = missing_tools() + [tool for tool in tools if shutil.which(tool) is None]
    assert not missing, f"missing tools: {missing} (.ci/run installs them)"
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)
    sandbox = Sandbox(PodNetwork(), base)
    try:
        sandbox.net.create()
        if hosts:
            sandbox.net.write_hosts(dict(hosts))
        yield sandbox
    finally:
        try:
            for thing in reversed(sandbox.running):
                thing.stop()
        finally:
            sandbox.net.close()
            assert not sandbox.net.exists() and not sandbox.net.hosts_file.exists()
            shutil.rmtree(base, ignore_errors=True)


@dataclass
class Curl:
    """What the agent's curl saw."""

    exit_code: int
    status: int | None
    headers: dict[str, str]
    stderr: str


@dataclass
class Pod:
    net: PodNetwork
    state: Path
    public: Path
    stack: AuthzStack
    upstream_log: Path
    app_log: Path | None = None
    planner: tuple[Path, Path] | None = None
    outbound_port: int = 15001
    agent_env: dict[str, str] = field(default_factory=dict)
    """Variables the agent gets besides ``PATH`` (the injected trust variables, for instance)."""

    def as_agent(self, argv: list[str], uid: int = AGENT_UID) -> list[str]:
        """``argv`` as ``uid`` in the pod (through ``ip netns exec`` when the pod has a hosts file)."""
        command = [*as_user(uid), *argv]
        return self.net.exec_in(self.net.pod, command) if self.net.hosts_file.exists() else command

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {"PATH": os.environ["PATH"], **self.agent_env, **(extra or {})}

    def curl(self, *args: str, uid: int = AGENT_UID) -> Curl:
        """``curl`` as ``uid`` inside the pod: no proxy variables, only :attr:`agent_env`."""
        argv = self.as_agent(["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-D", "-", *args], uid)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=20, env=self.env(), check=False)
        lines = result.stdout.splitlines()
        status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else None
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:]) if v}
        return Curl(result.returncode, status, headers, result.stderr)

    def python(self, code: str, *args: str, uid: int = AGENT_UID, timeout: float = 20) -> str:
        """Run ``code`` with the agent's UID and environment; returns its stdout."""
        argv = self.as_agent([sys.executable, "-c", code, *args], uid)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env(), check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def from_upstream(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.net.exec_in(self.net.upstream, argv), capture_output=True, text=True, timeout=20, check=False
        )

    def records(self) -> list[dict[str, Any]]:
        path = self.state / "decisions.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def record(self, **match: Any) -> dict[str, Any]:
        """The one decision record whose fields equal ``match`` (waits for it)."""

        def find() -> dict[str, Any] | None:
            found = [r for r in self.records() if all(r.get(k) == v for k, v in match.items())]
            assert len(found) <= 1, found
            return found[0] if found else None

        return wait_until(find, timeout=10, what=f"decision record {match}")

    def access_log(self, decision_id: str) -> dict[str, Any]:
        """Envoy's access-log line (stdout) carrying ``decision_id`` (waits for it)."""

        def find() -> dict[str, Any] | None:
            for line in self.stack.envoy.stdout_path.read_text().splitlines():
                if line.startswith("{") and json.loads(line).get("decision_id") == decision_id:
                    return dict(json.loads(line))
            return None

        return wait_until(find, timeout=10, what=f"Envoy access log line for {decision_id}")

    @staticmethod
    def _lines(path: Path | None) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines()] if path and path.exists() else []

    def upstream(self, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self._lines(self.upstream_log) if all(e.get(k) == v for k, v in match.items())]

    def app(self, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self._lines(self.app_log) if all(e.get(k) == v for k, v in match.items())]

    def outbound_connections(self) -> int:
        return self.stack.envoy.stat(f"listener.127.0.0.1_{self.outbound_port}.downstream_cx_total")

    def iptables_save(self) -> str:
        return "".join(
            subprocess.run([tool], capture_output=True, text=True, check=True, timeout=10).stdout
            for tool in ("iptables-save", "ip6tables-save")
        )


def start_servers(name: str, log_dir: Path, prefix: list[str], *args: str) -> ManagedProcess:
    """:mod:`tests.support.netns_servers` under ``prefix`` (e.g. ``ip netns exec upstream``), once listening."""
    ready = log_dir / f"{name}.ready"
    argv = [
        sys.executable,
        "-m",
        "tests.support.netns_servers",
        "--log",
        str(log_dir / f"{name}.log"),
        "--ready",
        str(ready),
    ]
    proc = ManagedProcess(name, [*argv, *args], log_dir=log_dir, cwd=REPO, prefix=prefix)
    proc.start()

    def up() -> bool:
        proc.check_alive()
        return ready.exists()

    wait_until(up, timeout=15, what=f"{name} servers")
    return proc


def jwks(pod: Pod) -> jwt.PyJWKSet:
    status, body = http_get(pod.stack.sidecar.admin_url + "/.well-known/jwks.json")
    assert status == 200
    return jwt.PyJWKSet.from_dict(json.loads(body))


def token_claims(pod: Pod, authorization: str, audience: str) -> dict[str, Any]:
    """Verify a bearer token against the sidecar's JWKS; returns its claims."""
    token = authorization.removeprefix("Bearer ")
    key = jwks(pod)[jwt.get_unverified_header(token)["kid"]]
    return jwt.decode(token, key.key, algorithms=["ES256"], audience=audience)
