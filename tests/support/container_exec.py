"""One container of a simulated pod, run as root in a fresh mount namespace (the harness of
:mod:`tests.support.kubelet` starts it with ``nsenter --net=POD_NETNS unshare --mount``).

    python -m tests.support.container_exec SPEC.json

It does what a container runtime does with the kubelet's instructions, using this machine's own
filesystem as the image: an overlay root (lower: ``/``; upper: a tmpfs, so nothing is written to
the host) with the mount points of the container's volumes created in it; the root made
read-only when ``readOnlyRootFilesystem`` is set; ``/proc``, ``/dev``, ``/sys`` and the "image
layers" the test's Python lives in bound in; each volume bind-mounted at its ``mountPath``
(read-only when asked); then ``chroot`` and ``setpriv`` to the container's UID/GID with only its
capabilities (``--bounding-set``; ``--no-new-privs`` for ``allowPrivilegeEscalation: false``), and
``exec`` of its command with its environment.

SPEC: ``{"scratch", "mounts": [{"source", "target", "readOnly"}], "layers": [paths],
"readOnlyRootFilesystem", "uid", "gid", "capabilities": [names] | null, "noNewPrivs", "command",
"env": {..}, "workingDir"}``; optional ``"lower"``: a real image's root filesystem as the overlay's
lower layer instead of ``/`` (tests/e2e/test_image.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=10)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    scratch = Path(spec["scratch"])
    _mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(scratch))
    upper, work, root = scratch / "upper", scratch / "work", scratch / "root"
    for directory in (upper, work, root):
        directory.mkdir()
    lower = spec.get("lower", "/")
    _mount("-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", str(root))
    binds = [(p, p, True) for p in ("/proc", "/dev", "/sys")]
    binds += [(m["source"], m["target"], bool(m.get("readOnly"))) for m in spec["mounts"]]
    # the "image layers" last: a volume over a parent directory (an emptyDir at /tmp, with the
    # repository under /tmp) must not hide the test's Python
    layers = [(layer, layer, True) for layer in spec["layers"]]
    for _, target, _ in binds + layers:
        (root / target.lstrip("/")).mkdir(parents=True, exist_ok=True)
    if spec["readOnlyRootFilesystem"]:
        _mount("--bind", str(root), str(root))
        _mount("-o", "remount,bind,ro", str(root))
    for source, target, read_only in binds + layers:
        where = root / target.lstrip("/")
        where.mkdir(parents=True, exist_ok=True)  # a layer below a volume: its mount point is in the volume
        _mount("--rbind", source, str(where))
        if read_only and source not in ("/proc", "/dev", "/sys"):
            _mount("-o", "remount,bind,ro", str(where))
    os.chroot(root)
    os.chdir(spec.get("workingDir") or "/")
    setpriv = ["setpriv", f"--reuid={spec['uid']}", f"--regid={spec['gid']}", "--clear-groups"]
    caps = spec["capabilities"]
    bounding = "-all" + "".join(f",+{c.lower()}" for c in caps or [])
    setpriv += [f"--bounding-set={bounding}", f"--inh-caps={bounding}"]
    if spec["noNewPrivs"]:
        setpriv.append("--no-new-privs")
    env = dict(spec["env"])
    os.execvpe("setpriv", [*setpriv, *spec["command"]], env)  # noqa: S606 - exec, as a runtime does


if __name__ == "__main__":
    main()
