"""One container of a simulated pod, run as root in a fresh mount namespace (the harness of
:mod:`sidecar.simulation.kubelet` starts it with ``nsenter --net=POD_NETNS unshare --mount``).

    python -m sidecar.simulation.container_exec SPEC.json

It does what a container runtime does with the kubelet's instructions, using this machine's own
filesystem as the image: an overlay root (lower: ``/``; upper: a tmpfs, so nothing is written to
the host) with the mount points of the container's volumes created in it; the root made
read-only when ``readOnlyRootFilesystem`` is set; the node's directories (``hide``: the kubelet's
pod directories, the CSI driver's socket directory - what a real image does not contain) covered
by empty read-only tmpfs; a minimal ``/dev`` (``null``, ``zero``, ``full``, ``random``,
``urandom``, ``tty``, a ``shm`` tmpfs) and a read-only ``/sys``, as runtimes give; the "image
layers" the test's Python lives in bound in; each volume bind-mounted at its ``mountPath``
(read-only when asked); then, in a PID namespace of its own (the container sees only its own
processes, as without ``shareProcessNamespace``) with a fresh ``/proc``, ``chroot`` and ``setpriv``
to the container's UID/GID with only its capabilities (``--bounding-set``; ``--no-new-privs`` for
``allowPrivilegeEscalation: false``), and ``exec`` of its command with its environment.

The process started by the harness stays outside the PID namespace: it forwards ``SIGTERM`` and
``SIGINT`` to the container's PID 1, ``SIGKILL``s it (and so the whole namespace) if it has not
exited 3 s later, and exits with its status.

SPEC: ``{"scratch", "mounts": [{"source", "target", "readOnly"}], "layers": [paths], "hide": [paths],
"readOnlyRootFilesystem", "uid", "gid", "capabilities": [names] | null, "noNewPrivs", "command",
"env": {..}, "workingDir"}``; optional ``"lower"``: a real image's root filesystem as the overlay's
lower layer instead of ``/`` (tests/e2e/test_image.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

_CLONE_NEWPID = 0x20000000
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}
"""The symlinks a container runtime puts in ``/dev`` (runc's defaults): ``/dev/fd/N`` is how a
process opens its own descriptors (OpenSSL reading a pipe, for one)."""
_GRACE = 3.0


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=10)


def _unshare_pid() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWPID) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWPID): {os.strerror(err)}")


def _in_root(root: Path, target: str) -> Path:
    """``target`` inside ``root`` with its symlinks resolved as the container sees them (an absolute
    link, like ``/var/run -> /run``, points into ``root``, never at the node's directory)."""
    parts = list(Path(target.lstrip("/")).parts)
    current = root
    links = 0
    while parts:
        candidate = current / parts.pop(0)
        if candidate.is_symlink():
            links += 1
            if links > 40:  # ELOOP, as the kernel counts
                raise OSError(f"too many symbolic links in {target}")
            link = os.readlink(candidate)
            here = "/" + str(current.relative_to(root))
            joined = os.path.normpath(os.path.join(here, link, *parts))  # an absolute link restarts; ".." stops at /
            parts = list(Path(joined).parts[1:])
            current = root
            continue
        current = candidate
    return current


def _prepare(spec: dict[str, object]) -> Path:
    """Every mount of the container but ``/proc``; returns its root."""
    scratch = Path(str(spec["scratch"]))
    _mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(scratch))
    upper, work, root = scratch / "upper", scratch / "work", scratch / "root"
    for directory in (upper, work, root):
        directory.mkdir()
    lower = spec.get("lower", "/")
    _mount("-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", str(root))
    mounts = spec["mounts"]
    assert isinstance(mounts, list)
    binds = [(str(m["source"]), str(m["target"]), bool(m.get("readOnly"))) for m in mounts]
    # the "image layers" last: a volume over a parent directory (an emptyDir at /tmp, with the
    # repository under /tmp) must not hide the test's Python
    layers = [(str(layer), str(layer), True) for layer in spec["layers"]]  # type: ignore[attr-defined]
    hidden = [str(path) for path in spec.get("hide", [])]  # type: ignore[attr-defined]
    files = {t for s, t, _ in binds if Path(s).is_file()}  # e.g. the kubelet's /etc/hosts
    for target in ["/proc", "/dev", "/sys", *hidden, *(t for _, t, _ in binds + layers if t not in files)]:
        _in_root(root, target).mkdir(parents=True, exist_ok=True)
    for target in files:
        where = _in_root(root, target)
        where.parent.mkdir(parents=True, exist_ok=True)
        where.touch(exist_ok=True)
    if spec["readOnlyRootFilesystem"]:
        _mount("--bind", str(root), str(root))
        _mount("-o", "remount,bind,ro", str(root))
    for path in hidden:  # the node's directories: not in a real image
        _mount("-t", "tmpfs", "-o", "ro,mode=0755,size=4k", "tmpfs", str(_in_root(root, path)))
    dev = root / "dev"
    _mount("-t", "tmpfs", "-o", "mode=0755,nosuid", "tmpfs", str(dev))
    for name in _DEVICES:
        (dev / name).touch()
        _mount("--bind", f"/dev/{name}", str(dev / name))
    for name, target in _DEV_LINKS.items():  # what runc creates in every container's /dev
        (dev / name).symlink_to(target)
    (dev / "shm").mkdir()
    _mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", str(dev / "shm"))
    _mount("--rbind", "/sys", str(root / "sys"))
    _mount("-o", "remount,bind,ro", str(root / "sys"))
    for source, target, read_only in binds + layers:
        where = _in_root(root, target)
        if target not in files:
            where.mkdir(parents=True, exist_ok=True)  # a layer below a volume: its mount point is in the volume
        _mount("--rbind", source, str(where))
        if read_only:
            _mount("-o", "remount,bind,ro", str(where))
    return root


def _run(spec: dict[str, object], root: Path) -> None:
    """PID 1 of the container's PID namespace: ``/proc``, ``chroot``, ``setpriv``, ``exec``."""
    _mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", str(root / "proc"))
    os.chroot(root)
    os.chdir(str(spec.get("workingDir") or "/"))
    setpriv = ["setpriv", f"--reuid={spec['uid']}", f"--regid={spec['gid']}", "--clear-groups"]
    caps = spec["capabilities"]
    bounding = "-all" + "".join(f",+{c.lower()}" for c in caps or [])  # type: ignore[attr-defined]
    setpriv += [f"--bounding-set={bounding}", f"--inh-caps={bounding}"]
    if spec["noNewPrivs"]:
        setpriv.append("--no-new-privs")
    env = {str(k): str(v) for k, v in spec["env"].items()}  # type: ignore[attr-defined]
    command = [str(c) for c in spec["command"]]  # type: ignore[attr-defined]
    os.execvpe("setpriv", [*setpriv, *command], env)  # noqa: S606 - exec, as a runtime does


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    root = _prepare(spec)
    _unshare_pid()
    child = os.fork()
    if child == 0:
        try:
            _run(spec, root)
        finally:
            os._exit(127)

    def kill(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    def forward(signum: int, _frame: object) -> None:
        kill(signum)
        # no thread here: after unshare(CLONE_NEWPID) this process cannot create one (EINVAL)
        signal.setitimer(signal.ITIMER_REAL, _GRACE)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    signal.signal(signal.SIGALRM, lambda *_: kill(signal.SIGKILL))  # PID 1 gone: the whole namespace goes
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)  # killed by a signal: 128 + its number, as a shell reports


if __name__ == "__main__":
    main()
