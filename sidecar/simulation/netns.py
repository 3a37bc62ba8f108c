"""Network namespaces for the interception tests: a "pod" and an "upstream" joined by a veth pair.

Namespaces get unique names and are always deleted (with their veth) by :meth:`PodNetwork.close`,
also when setup fails half-way. The test process enters the pod namespace with ``setns(2)`` for
the duration of a module (:meth:`PodNetwork.inside`), so its subprocesses (sidecar, Envoy, the
agent) start there and the readiness probes of :mod:`sidecar.harness` reach ``127.0.0.1`` of the pod.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["AGENT_UID", "PROXY_UID", "PodNetwork", "as_user", "chown_tree", "missing_tools"]

PROXY_UID = 1337
AGENT_UID = 1000
_CLONE_NEWNET = 0x40000000
POD_IP = "10.77.0.1"
UPSTREAM_IP = "10.77.0.2"
ATTACKER_IP = "10.77.0.3"
POD_IP6 = "fd77::1"
UPSTREAM_IP6 = "fd77::2"


def missing_tools() -> list[str]:
    """The commands the namespace tests need that are not installed."""
    tools = ("ip", "iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore", "setpriv", "curl")
    return [tool for tool in tools if shutil.which(tool) is None]


def as_user(uid: int) -> list[str]:
    """Command prefix running as ``uid`` (gid = uid, no supplementary groups, no capabilities)."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class PodNetwork:
    """``pod`` (``10.77.0.1``) and ``upstream`` (``10.77.0.2`` and ``10.77.0.3``) namespaces."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.pod = f"aa-pod-{tag}"
        self.upstream = f"aa-up-{tag}"
        self.veth_pod = f"aap{tag}"
        self.veth_up = f"aau{tag}"
        self.created: list[str] = []

    def create(self) -> None:
        """Create both namespaces and the link; on failure everything made so far is removed."""
        try:
            for ns in (self.pod, self.upstream):
                _ip("netns", "add", ns)
                self.created.append(ns)
            _ip("link", "add", self.veth_pod, "type", "veth", "peer", "name", self.veth_up)
            _ip("link", "set", self.veth_pod, "netns", self.pod)
            _ip("link", "set", self.veth_up, "netns", self.upstream)
            for ns, dev, addresses in (
                (self.pod, self.veth_pod, [f"{POD_IP}/24", f"{POD_IP6}/64"]),
                (self.upstream, self.veth_up, [f"{UPSTREAM_IP}/24", f"{ATTACKER_IP}/24", f"{UPSTREAM_IP6}/64"]),
            ):
                for address in addresses:
                    extra = ["nodad"] if ":" in address else []
                    _ip("-n", ns, "addr", "add", address, "dev", dev, *extra)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @property
    def hosts_file(self) -> Path:
        """``/etc/netns/<pod>/hosts``: ``ip netns exec <pod>`` bind-mounts it over ``/etc/hosts``."""
        return Path("/etc/netns") / self.pod / "hosts"

    def write_hosts(self, names: dict[str, str]) -> None:
        """Name resolution inside the pod (there is no DNS): ``name -> address``; removed by :meth:`close`."""
        self.hosts_file.parent.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", *(f"{address} {name}" for name, address in sorted(names.items()))]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        self.hosts_file.chmod(0o644)

    def exec_in(self, ns: str, argv: Sequence[str]) -> list[str]:
        """``ip netns exec ns argv...``."""
        return ["ip", "netns", "exec", ns, *argv]

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Run the calling thread in the pod namespace; always return to the original one."""
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        pod = os.open(f"/run/netns/{self.pod}", os.O_RDONLY)
        try:
            _setns(pod)
            try:
                yield
            finally:
                _setns(original)
        finally:
            os.close(pod)
            os.close(original)

    def close(self) -> None:
        """Delete the namespaces (their veth ends go with them); never raises."""
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)
        self.created.clear()
        shutil.rmtree(self.hosts_file.parent, ignore_errors=True)
        # a veth that never reached a namespace would stay in the root namespace
        subprocess.run(["ip", "link", "del", self.veth_pod], capture_output=True, timeout=10, check=False)

    def exists(self) -> bool:
        """Whether any of our namespaces is still listed."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=False).stdout
        return any(ns in listed for ns in (self.pod, self.upstream))


def chown_tree(path: Path, uid: int) -> None:
    """Give ``path`` and everything below it to ``uid:uid`` (the proxy user writes logs there)."""
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.chown(os.path.join(root, name), uid, uid)
    os.chown(path, uid, uid)
