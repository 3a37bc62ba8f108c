"""A stand-in for the kubelet: run a (patched) pod's containers on this machine, as the kubelet would.

No kubelet or container runtime runs here, so this does their part with the pod spec the webhook
produced, and nothing else:

* **volumes** are laid out under a base directory: ``configMap`` and ``secret`` volumes from the
  manifests the chart rendered, ``downwardAPI`` from the pod's annotations, ``projected`` ones (the
  ServiceAccount token volume the API server adds: a token, ``ca.crt``, the namespace), ``emptyDir`` as empty
  world-writable directories, ``csi`` as a directory the test fills (the SPIFFE CSI driver's socket
  directory). Like the kubelet's AtomicWriter, each of the first three is a timestamped directory
  behind a ``..data`` symlink, and an update swaps the symlink atomically (:meth:`update_annotations`,
  :meth:`update_secret`);
* **containers** run in the pod's network namespace, each in its own mount and PID namespaces with
  its volumes bind-mounted at their ``mountPath``, a read-only root when
  ``readOnlyRootFilesystem``, the node's directories (``hide``) out of sight, and its
  ``runAsUser``/``runAsGroup``, capabilities (computed as containerd does:
  :func:`sidecar.inject.escapes.capability_set`) and ``allowPrivilegeEscalation``
  (:mod:`sidecar.simulation.container_exec`); the image is this machine's filesystem. :meth:`Kubelet.exec`
  runs another process in a container's place (its mounts and capabilities), optionally as another
  UID - ``kubectl exec``, or what a hijacked agent that got root in its container would have;
* **/etc/hosts** is the kubelet's own file for the pod (``localhost``, the pod's address and name,
  and its ``hostAliases``), bind-mounted into every container as a real kubelet does;
* **order**: init containers one by one; a regular one must exit 0, a native sidecar
  (``restartPolicy: Always``) is started and its ``startupProbe`` must pass before the next; then
  the regular containers, whose ``readinessProbe`` must pass;
* **probes** (``httpGet``) are sent from the "node": the upstream namespace, through the pod's
  interface, so they cross the pod's inbound iptables rules as a real kubelet probe does;
* **lifecycle hooks** (``postStart`` / ``preStop`` ``httpGet``) are sent the same way: ``postStart``
  right after the container starts and before its probes (retried until it passes or times out: a
  failed ``postStart`` kills the container and its restart runs the hook again), ``preStop`` once
  before the container is stopped (its outcome is kept in :attr:`Kubelet.hooks`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sidecar
from sidecar.harness import ManagedProcess, wait_until
from sidecar.inject.escapes import capability_set
from sidecar.simulation.netns import PodLink, PodNetwork

__all__ = ["Kubelet", "atomic_write"]

REPO = Path(sidecar.__file__).resolve().parent.parent
"""The directory holding the ``sidecar`` package (the repository, or site-packages): an "image layer"."""


def atomic_write(directory: Path, files: Mapping[str, bytes], mode: int) -> None:
    """Write ``files`` into ``directory`` the way the kubelet's AtomicWriter does.

    A new ``..<timestamp>`` directory holds the files; ``..data`` is switched to it with one
    ``rename(2)``; each visible name is a symlink through ``..data``; the old directory is removed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    stamp = dt.datetime.now(dt.UTC).strftime("..%Y_%m_%d_%H_%M_%S.%f")
    payload = directory / stamp
    payload.mkdir()
    payload.chmod(0o755)
    for name, content in files.items():
        target = payload / name
        target.write_bytes(content)
        target.chmod(mode)
    data = directory / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    tmp = directory / "..data_tmp"
    tmp.symlink_to(stamp)
    tmp.rename(data)
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    if old is not None and old != stamp:
        shutil.rmtree(directory / old)


class Kubelet:
    """Runs ``pod`` in ``net`` (its ``pod`` namespace), with volumes and scratch space under ``base``.

    Args:
        pod: the Pod object as admitted (the webhook's patch applied).
        net: the pod and upstream namespaces.
        base: volumes, per-container scratch and logs go here.
        config_maps / secrets: ``name -> {key: content}``, the objects in the pod's namespace.
        csi: ``driver -> directory`` the CSI driver would mount.
        path: the image's ``PATH``.
        hide: the node's directories no container may see (default: ``base``); the CSI driver's
            directory belongs here too.
        service_account_token: the token a ``serviceAccountToken`` projection gets (the API
            server's, for the pod's ServiceAccount).
    """

    def __init__(
        self,
        pod: dict[str, Any],
        net: PodNetwork | PodLink,
        base: Path,
        *,
        config_maps: Mapping[str, Mapping[str, str]],
        secrets: Mapping[str, Mapping[str, bytes]],
        csi: Mapping[str, Path],
        path: str,
        hide: tuple[Path, ...] = (),
        service_account_token: str | None = None,
    ) -> None:
        self.pod = pod
        self.service_account_token = service_account_token
        self.hide = hide or (base,)
        self._execs = 0
        self.net = net
        self.base = base
        self.config_maps = config_maps
        self.secrets = secrets
        self.csi = csi
        self.path = path
        self.volumes: dict[str, Path] = {}
        self.running: dict[str, ManagedProcess] = {}
        self.hooks: list[tuple[str, str, bool]] = []  # (container, hook, passed), in the order run
        self.logs = base / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    # -- volumes ---------------------------------------------------------------------------------
    def _downward(self, volume: Mapping[str, Any], annotations: Mapping[str, str]) -> dict[str, bytes]:
        files = {}
        for item in volume["downwardAPI"]["items"]:
            field = item["fieldRef"]["fieldPath"]
            assert field.startswith("metadata.annotations['") and field.endswith("']"), field
            files[item["path"]] = annotations.get(field[len("metadata.annotations['") : -2], "").encode()
        return files

    def lay_out_volumes(self) -> None:
        """Create every volume of the pod spec (an unknown volume type is an error)."""
        annotations = self.pod["metadata"].get("annotations", {})
        for volume in self.pod["spec"].get("volumes", []):
            path = self.base / "volumes" / volume["name"]
            self.volumes[volume["name"]] = path
            if "configMap" in volume:
                text = self.config_maps[volume["configMap"]["name"]]
                atomic_write(
                    path, {k: v.encode() for k, v in text.items()}, volume["configMap"].get("defaultMode", 0o644)
                )
            elif "secret" in volume:
                data = self.secrets[volume["secret"]["secretName"]]
                items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
                atomic_write(
                    path, {i["path"]: data[i["key"]] for i in items}, volume["secret"].get("defaultMode", 0o644)
                )
            elif "downwardAPI" in volume:
                atomic_write(path, self._downward(volume, annotations), volume["downwardAPI"].get("defaultMode", 0o644))
            elif "projected" in volume:
                atomic_write(path, self._projected(volume, annotations), volume["projected"].get("defaultMode", 0o644))
            elif "emptyDir" in volume:
                path.mkdir(parents=True)
                path.chmod(0o777)
            elif "csi" in volume:
                self.volumes[volume["name"]] = self.csi[volume["csi"]["driver"]]
            else:
                raise AssertionError(f"volume type not simulated: {volume}")

    def _projected(self, volume: Mapping[str, Any], annotations: Mapping[str, str]) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        namespace = str(self.pod["metadata"].get("namespace", "default"))
        for source in volume["projected"]["sources"]:
            if "serviceAccountToken" in source:
                assert self.service_account_token is not None, "a serviceAccountToken projection needs a token"
                files[source["serviceAccountToken"]["path"]] = self.service_account_token.encode()
            elif "configMap" in source:
                data = self.config_maps[source["configMap"]["name"]]
                for item in source["configMap"].get("items") or [{"key": k, "path": k} for k in data]:
                    files[item["path"]] = data[item["key"]].encode()
            elif "downwardAPI" in source:
                for item in source["downwardAPI"]["items"]:
                    field = item["fieldRef"]["fieldPath"]
                    if field == "metadata.namespace":
                        files[item["path"]] = namespace.encode()
                    else:
                        files.update(self._downward({"downwardAPI": {"items": [item]}}, annotations))
            else:
                raise AssertionError(f"projected source not simulated: {source}")
        return files

    def _hosts(self) -> Path:
        """The pod's ``/etc/hosts``, as the kubelet writes it (``hostAliases`` appended)."""
        path = self.base / "etc-hosts"
        if not path.exists():
            name = str(self.pod["metadata"].get("name", "pod"))
            lines = [
                "# Kubernetes-managed hosts file.",
                "127.0.0.1\tlocalhost",
                "::1\tlocalhost",
                f"{self.net.pod_ip}\t{name}",
            ]
            for alias in self.pod["spec"].get("hostAliases", []):
                lines.append(f"# Entries added by HostAliases.\n{alias['ip']}\t" + "\t".join(alias["hostnames"]))
            path.write_text("\n".join(lines) + "\n")
            path.chmod(0o644)
        return path

    def update_annotations(self, pod: dict[str, Any]) -> None:
        """The pod's annotations changed (``kubectl annotate``): rewrite its downwardAPI volumes atomically."""
        self.pod = pod
        annotations = pod["metadata"].get("annotations", {})
        for volume in pod["spec"].get("volumes", []):
            if "downwardAPI" in volume:
                files = self._downward(volume, annotations)
                atomic_write(self.volumes[volume["name"]], files, volume["downwardAPI"].get("defaultMode", 0o644))

    def update_secret(self, name: str, data: Mapping[str, bytes]) -> None:
        """The Secret ``name`` changed (``kubectl create secret ... | kubectl apply``, a rotation): rewrite
        every secret volume of it atomically (a new ``..<timestamp>`` directory, then the ``..data``
        symlink swap), as the kubelet's next sync of the pod does."""
        self.secrets = {**self.secrets, name: data}
        for volume in self.pod["spec"].get("volumes", []):
            if volume.get("secret", {}).get("secretName") == name:
                items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
                files = {i["path"]: data[i["key"]] for i in items}
                atomic_write(self.volumes[volume["name"]], files, volume["secret"].get("defaultMode", 0o644))

    # -- containers ------------------------------------------------------------------------------
    def container(self, name: str) -> dict[str, Any]:
        """The container (or init container) ``name`` of the pod spec."""
        spec = self.pod["spec"]
        found: dict[str, Any] = next(
            c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == name
        )
        return found

    def _spec(
        self,
        container: Mapping[str, Any],
        *,
        command: list[str] | None = None,
        uid: int | None = None,
        tag: str = "",
    ) -> Path:
        pod_ctx = self.pod["spec"].get("securityContext", {})
        ctx = container.get("securityContext", {})
        gid = uid if uid is not None else ctx.get("runAsGroup", pod_ctx.get("runAsGroup", 0))
        if uid is None:
            uid = ctx.get("runAsUser", pod_ctx.get("runAsUser", 0))
        caps = sorted(capability_set(ctx.get("capabilities", {}), container["name"]))
        scratch = self.base / "scratch" / f"{container['name']}{tag}"
        scratch.mkdir(parents=True, exist_ok=True)
        env = {"PATH": self.path, "HOME": "/"}
        env.update({e["name"]: e["value"] for e in container.get("env", [])})
        python = Path(sys.executable).resolve()
        spec = {
            "scratch": str(scratch),
            "mounts": [
                {"source": str(self.volumes[m["name"]]), "target": m["mountPath"], "readOnly": m.get("readOnly", False)}
                for m in container.get("volumeMounts", [])
            ]
            + [{"source": str(self._hosts()), "target": "/etc/hosts", "readOnly": False}],
            "layers": sorted({str(REPO), sys.prefix, sys.base_prefix, str(python.parents[1])}),
            "hide": [str(p) for p in self.hide],
            "readOnlyRootFilesystem": bool(ctx.get("readOnlyRootFilesystem")),
            "uid": uid,
            "gid": gid,
            "capabilities": caps,
            "noNewPrivs": ctx.get("allowPrivilegeEscalation") is False,
            "command": command or [*container.get("command", []), *container.get("args", [])],
            "env": env,
            "workingDir": container.get("workingDir"),
        }
        path = self.base / f"{container['name']}{tag}.spec.json"
        path.write_text(json.dumps(spec))
        return path

    def _argv(self, spec: Path) -> list[str]:
        return [
            "nsenter",
            f"--net=/run/netns/{self.net.pod}",
            "--",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            sys.executable,
            "-m",
            "sidecar.simulation.container_exec",
            str(spec),
        ]

    def _exec_spec(self, name: str, argv: list[str], uid: int | None) -> Path:
        self._execs += 1
        return self._spec(self.container(name), command=argv, uid=uid, tag=f"-exec{self._execs}")

    def exec(
        self, name: str, argv: list[str], *, uid: int | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in container ``name``'s place - its volumes, capabilities and no-new-privs, a
        PID namespace of its own - as its user, or as ``uid`` (GID the same); waits for it."""
        return subprocess.run(
            self._argv(self._exec_spec(name, argv, uid)),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def exec_background(self, name: str, argv: list[str], *, uid: int | None = None, label: str) -> ManagedProcess:
        """Like :meth:`exec`, left running (logs: ``logs/LABEL.out`` / ``.err``); the caller stops it."""
        proc = ManagedProcess(label, self._argv(self._exec_spec(name, argv, uid)), log_dir=self.logs, cwd=REPO)
        proc.start()
        return proc

    def container_pid(self, name: str) -> int:
        """The host PID of container ``name``'s PID 1 (its command, below the runtime's process)."""
        proc = self.running[name].proc
        assert proc is not None
        runtime = proc.pid
        children = Path(f"/proc/{runtime}/task/{runtime}/children")
        found = wait_until(lambda: children.read_text().split() or None, timeout=10, what=f"{name}'s PID 1")
        return int(found[0])

    def run_to_completion(self, container: Mapping[str, Any], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a regular init container; raises with its output unless it exits 0."""
        result = subprocess.run(
            self._argv(self._spec(container)), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
        )
        (self.logs / f"{container['name']}.out").write_text(result.stdout)
        (self.logs / f"{container['name']}.err").write_text(result.stderr)
        assert result.returncode == 0, f"init container {container['name']} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def start(self, container: Mapping[str, Any]) -> ManagedProcess:
        """Start a long-running container (logs: ``logs/NAME.out`` / ``.err``, as ``kubectl logs -c NAME``)."""
        proc = ManagedProcess(container["name"], self._argv(self._spec(container)), log_dir=self.logs, cwd=REPO)
        proc.start()
        self.running[container["name"]] = proc
        return proc

    def _url(self, container: Mapping[str, Any], action: Mapping[str, Any]) -> str:
        port = action["port"]
        if isinstance(port, str) and not port.isdigit():
            port = next(p["containerPort"] for p in container.get("ports", []) if p.get("name") == port)
        return f"http://{self.net.pod_ip}:{port}{action.get('path', '/')}"

    def _node_get(self, url: str) -> bool:
        """One plain HTTP GET from the node side; ``True`` on a 2xx/3xx answer, as the kubelet counts it."""
        argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", url]
        out = subprocess.run(
            self.net.exec_in(self.net.upstream, argv), capture_output=True, text=True, timeout=10, check=False
        )
        return 200 <= int(out.stdout or 0) < 400

    def probe(self, container: Mapping[str, Any], kind: str, timeout: float = 30) -> None:
        """Wait until the container's ``kind`` probe (httpGet) passes, sent from the node side."""
        url = self._url(container, container[kind]["httpGet"])
        proc = self.running.get(container["name"])

        def passes() -> bool:
            if proc is not None:
                proc.check_alive()
            return self._node_get(url)

        wait_until(passes, timeout=timeout, what=f"{container['name']} {kind} {url}", interval=0.1)

    def hook(self, container: Mapping[str, Any], kind: str, timeout: float = 30) -> bool:
        """Run the container's ``lifecycle.<kind>`` ``httpGet`` hook from the node side (``False``: none).

        ``postStart`` is retried until it passes (raises on timeout); ``preStop`` is sent once and
        its outcome recorded in :attr:`hooks` (the kubelet logs a failed one and stops the container).
        """
        action = container.get("lifecycle", {}).get(kind, {}).get("httpGet")
        if action is None:
            return False
        url = self._url(container, action)
        if kind == "preStop":
            self.hooks.append((container["name"], kind, self._node_get(url)))
            return True
        wait_until(lambda: self._node_get(url), timeout=timeout, what=f"{container['name']} {kind} {url}", interval=0.1)
        self.hooks.append((container["name"], kind, True))
        return True

    def start_pod(self, timeout: float = 60) -> None:
        """Init containers in order (native sidecars until their startupProbe passes), then the containers."""
        self.lay_out_volumes()
        for container in self.pod["spec"].get("initContainers", []):
            if container.get("restartPolicy") == "Always":
                self.start(container)
                if "startupProbe" in container:
                    self.probe(container, "startupProbe", timeout)
            else:
                self.run_to_completion(container, timeout)
        for container in self.pod["spec"]["containers"]:
            self.start(container)
            self.hook(container, "postStart", timeout)
            if "readinessProbe" in container:
                self.probe(container, "readinessProbe", timeout)

    def exited(self) -> dict[str, int] | None:
        """The exit codes of the pod's regular containers once all have exited (``None`` before)."""
        codes: dict[str, int] = {}
        for container in self.pod["spec"]["containers"]:
            proc = self.running.get(container["name"])
            if proc is None or proc.proc is None:
                return None
            code = proc.proc.poll()
            if code is None:
                return None
            codes[container["name"]] = code
        return codes

    def stop(self) -> None:
        """Stop the containers, then the native sidecars, in reverse start order (as on pod termination);
        each container's ``preStop`` hook runs first."""
        containers = {c["name"]: c for c in self.pod["spec"].get("initContainers", []) + self.pod["spec"]["containers"]}
        for name, proc in reversed(list(self.running.items())):
            if name in containers and proc.alive():
                self.hook(containers[name], "preStop")
            proc.stop()
        self.running.clear()
