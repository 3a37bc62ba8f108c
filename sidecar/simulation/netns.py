"""Network namespaces: a "pod" and an "upstream" joined by a veth pair (the interception tests), or a
node with a bridge that several pods join (:class:`ClusterNetwork`, the cluster scenario).

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

__all__ = [
    "AGENT_UID",
    "PROXY_UID",
    "ClusterNetwork",
    "PodLink",
    "PodNetwork",
    "as_user",
    "chown_tree",
    "enter_netns",
    "missing_tools",
]

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
    def pod_ip(self) -> str:
        """The pod's address."""
        return POD_IP

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


CLUSTER_PREFIX = "10.78.0"
"""The simulated cluster's network: ``10.78.0.0/24``, the node at ``.1``, services from ``.10``, pods from ``.100``."""


class PodLink:
    """One pod of a :class:`ClusterNetwork`: its network namespace, joined to the node's bridge.

    Shaped like :class:`PodNetwork` for :class:`~sidecar.simulation.kubelet.Kubelet`: ``pod`` is
    the pod's namespace and ``upstream`` the node's (where the kubelet's probes come from).

    Attributes:
        pod: the pod's namespace name.
        upstream: the node's namespace name.
        pod_ip: the pod's address.
    """

    def __init__(self, pod: str, upstream: str, pod_ip: str) -> None:
        self.pod = pod
        self.upstream = upstream
        self.pod_ip = pod_ip

    def exec_in(self, ns: str, argv: Sequence[str]) -> list[str]:
        """``ip netns exec ns argv...``."""
        return ["ip", "netns", "exec", ns, *argv]

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Run the calling thread in the pod's namespace; always return to the original one."""
        with enter_netns(self.pod):
            yield


@contextlib.contextmanager
def enter_netns(name: str) -> Iterator[None]:
    """Run the calling thread (and the threads and processes it starts) in namespace ``name``."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(original)
    finally:
        os.close(target)
        os.close(original)


class ClusterNetwork:
    """A node namespace with a bridge (``10.78.0.1/24``) that pods join with veth pairs.

    Services get addresses of their own on the bridge (:meth:`add_address`), so every process of
    the node - authority replicas, the API server double, upstream APIs - listens on the address
    its Service name resolves to in the pods (``hostAliases``). Everything is removed by
    :meth:`close`, also after a failed setup.

    Attributes:
        node: the node namespace's name.
        bridge: the bridge device in it.
    """

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.node = f"aa-node-{self.tag}"
        self.bridge = "aabr0"
        self.pods: list[PodLink] = []
        self.created: list[str] = []
        self._next_pod = 100

    def create(self) -> None:
        """Create the node namespace and its bridge."""
        try:
            _ip("netns", "add", self.node)
            self.created.append(self.node)
            _ip("-n", self.node, "link", "set", "lo", "up")
            _ip("-n", self.node, "link", "add", self.bridge, "type", "bridge")
            _ip("-n", self.node, "addr", "add", f"{CLUSTER_PREFIX}.1/24", "dev", self.bridge)
            _ip("-n", self.node, "link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    @property
    def hosts_file(self) -> Path:
        """``/etc/netns/<node>/hosts``: ``ip netns exec <node>`` bind-mounts it over ``/etc/hosts``."""
        return Path("/etc/netns") / self.node / "hosts"

    def write_hosts(self, names: dict[str, str]) -> None:
        """Name resolution for commands run in the node (``name -> address``); removed by :meth:`close`."""
        self.hosts_file.parent.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", *(f"{address} {name}" for name, address in sorted(names.items()))]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        self.hosts_file.chmod(0o644)

    def add_address(self, address: str) -> str:
        """Give the node another address on the bridge (a Service's); returns it."""
        _ip("-n", self.node, "addr", "add", f"{address}/32", "dev", self.bridge)
        return address

    def add_pod(self) -> PodLink:
        """A new pod namespace with a veth to the bridge, its address and a default route."""
        index = self._next_pod
        self._next_pod += 1
        name = f"aa-pod-{self.tag}-{index}"
        pod_ip = f"{CLUSTER_PREFIX}.{index}"
        inner, outer = f"aac{self.tag}{index}", f"aan{self.tag}{index}"
        _ip("netns", "add", name)
        self.created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
        _ip("link", "set", inner, "netns", name)
        _ip("link", "set", outer, "netns", self.node)
        _ip("-n", name, "link", "set", inner, "name", "eth0")
        _ip("-n", name, "addr", "add", f"{pod_ip}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "route", "add", "default", "via", f"{CLUSTER_PREFIX}.1")
        _ip("-n", self.node, "link", "set", outer, "master", self.bridge)
        _ip("-n", self.node, "link", "set", outer, "up")
        link = PodLink(name, self.node, pod_ip)
        self.pods.append(link)
        return link

    def partition(self, pod_ip: str, address: str, port: int, *, cut: bool) -> None:
        """Drop (``cut``) or restore the traffic between a pod and ``address:port`` of the node, both ways."""
        action = "-I" if cut else "-D"
        rules = [
            ["INPUT", "-s", pod_ip, "-d", address, "-p", "tcp", "--dport", str(port), "-j", "DROP"],
            ["OUTPUT", "-s", address, "-d", pod_ip, "-p", "tcp", "--sport", str(port), "-j", "DROP"],
        ]
        for rule in rules:
            subprocess.run(
                ["ip", "netns", "exec", self.node, "iptables", "-w", action, *rule],
                check=True,
                capture_output=True,
                timeout=10,
            )

    def close(self) -> None:
        """Delete every namespace (their veth ends and the bridge go with them); never raises."""
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)
        self.created.clear()
        shutil.rmtree(self.hosts_file.parent, ignore_errors=True)

    def exists(self) -> bool:
        """Whether any of its namespaces is still listed."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=False).stdout
        return self.tag in listed
