"""The container image as built by ``scripts/build-image.sh``: what it holds, and the demo run inside it.

Needs a built image: ``.ci/run`` builds it (``scripts/build-image.sh --info FILE``, root, podman) and
runs the suite with ``AGENT_AUTHZ_IMAGE_INFO=FILE``; without that variable these tests are skipped.

The demo runs with ``podman run`` where that works. Where it does not (in this sandbox crun cannot
set rlimits: ``setrlimit RLIMIT_NOFILE: Operation not permitted``), it runs the way a runtime would:
the image's root filesystem (``podman image mount``) as the lower layer of an overlay with a tmpfs
upper, read-only root, in private mount and network namespaces, chrooted, as the image's default
user with no capabilities and ``no_new_privs`` (:mod:`sidecar.simulation.container_exec`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.image]

REPO = Path(__file__).resolve().parents[2]
INFO = os.environ.get("AGENT_AUTHZ_IMAGE_INFO")
VENV_BUDGET = 190_000_000
"""Bytes the virtual environment may take in the image (178 MB today: Envoy alone is 107 MB)."""
COMPILERS = ("cc", "c++", "gcc", "g++", "cpp", "clang", "ld", "as", "strip", "make", "x86_64-linux-gnu-gcc")
BUILD_PACKAGES = ("gcc", "g++", "cpp", "binutils", "make", "build-essential", "libc6-dev", "python3-pip")


@dataclass
class Image:
    tag: str
    size: int
    base: str
    podman_args: list[str]
    rootfs: Path
    config: dict[str, Any]

    def podman(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *self.podman_args, *args], capture_output=True, text=True, timeout=timeout, check=False
        )


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    if not INFO:
        pytest.skip("no built image: scripts/build-image.sh --info FILE, then AGENT_AUTHZ_IMAGE_INFO=FILE (.ci/run)")
    if os.geteuid() != 0:
        pytest.fail("AGENT_AUTHZ_IMAGE_INFO is set, but reading the image's root filesystem needs root")
    info = json.loads(Path(INFO).read_text())
    args = [str(a) for a in info["podman_args"]]
    inspect = subprocess.run(
        ["podman", *args, "image", "inspect", info["tag"]], capture_output=True, text=True, timeout=60, check=True
    )
    config = json.loads(inspect.stdout)[0]["Config"]
    mount = subprocess.run(
        ["podman", *args, "image", "mount", info["tag"]], capture_output=True, text=True, timeout=60, check=True
    )
    print(f"\nimage {info['tag']}: {info['size'] / 1e6:.0f} MB uncompressed, on {info['base']}")
    try:
        yield Image(info["tag"], info["size"], info["base"], args, Path(mount.stdout.strip()), config)
    finally:
        subprocess.run(["podman", *args, "image", "unmount", info["tag"]], capture_output=True, timeout=60, check=False)


def _run_chroot(image: Image, argv: list[str], scratch: Path, state: Path, timeout: float) -> tuple[int, str]:
    user, _, group = str(image.config.get("User") or "0").partition(":")
    env = dict(item.split("=", 1) for item in image.config.get("Env") or [])
    env.setdefault("HOME", "/")  # as runtimes set it for a user without a passwd entry
    (scratch / "root").mkdir()
    tmp = scratch / "tmp"
    tmp.mkdir(mode=0o1777)
    tmp.chmod(0o1777)
    spec = {
        "scratch": str(scratch / "root"),
        "lower": str(image.rootfs),
        "mounts": [
            {"source": str(tmp), "target": "/tmp", "readOnly": False},
            {"source": str(state), "target": "/state", "readOnly": False},
        ],
        "layers": [],
        "readOnlyRootFilesystem": True,
        "uid": int(user),
        "gid": int(group or user),
        "capabilities": [],
        "noNewPrivs": True,
        "command": argv,
        "env": env,
        "workingDir": image.config.get("WorkingDir") or "/",
    }
    spec_path = scratch / "spec.json"
    spec_path.write_text(json.dumps(spec))
    # A fresh network namespace (loopback only, as `podman run --network none`) and mount namespace.
    namespaces = ["unshare", "--net", "--mount", "--propagation", "private", "--"]
    runtime = [sys.executable, "-m", "sidecar.simulation.container_exec", str(spec_path)]
    result = subprocess.run(
        [*namespaces, "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *runtime],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def _podman_run(image: Image, argv: list[str], state: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return image.podman(
        "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "all",
        "--security-opt", "no-new-privileges", "-v", f"{state}:/state", image.tag, *argv,
        timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def run_in_image(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``run(argv, timeout) -> (exit code, output)`` inside the image, as its default user."""
    state = tmp_path_factory.mktemp("image-state")
    probe = _podman_run(image, ["agent-authz", "--version"], state, 60)
    method = "podman run" if probe.returncode == 0 else "chroot"
    print(f"running the image with {method}" + ("" if probe.returncode == 0 else f" ({probe.stderr.strip()})"))
    if probe.returncode not in (0, 125, 126, 127):  # podman's own errors; anything else is the image's
        pytest.fail(f"agent-authz --version failed in the image: {probe.stdout}{probe.stderr}")
    uid = int(str(image.config.get("User") or "0").split(":")[0])
    os.chown(state, uid, uid)
    counter = iter(range(1000))

    def run(argv: list[str], timeout: float = 60) -> tuple[int, str]:
        if method == "podman run":
            result = _podman_run(image, argv, state, timeout)
            return result.returncode, result.stdout + result.stderr
        scratch = tmp_path_factory.mktemp(f"run{next(counter)}")
        return _run_chroot(image, argv, scratch, state, timeout)

    run.state = state  # type: ignore[attr-defined]
    return run


def _executables(rootfs: Path) -> dict[str, Path]:
    found = {}
    for directory in ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin", "opt/agent-authz/bin"):
        where = rootfs / directory
        if where.is_dir() and not where.is_symlink():
            found.update({p.name: p for p in where.iterdir()})
    return found


def _installed_packages(rootfs: Path) -> set[str]:
    status = (rootfs / "var/lib/dpkg/status").read_text()
    packages = set()
    for stanza in status.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Status): (.*)$", stanza, re.M))
        if fields.get("Status", "").endswith(" installed"):
            packages.add(fields["Package"])
    return packages


def test_default_user_is_non_root(image: Image) -> None:
    user, _, group = image.config["User"].partition(":")
    assert (user, group) == ("65532", "65532")
    assert image.config["Cmd"] == ["agent-authz", "--help"]
    assert image.config["Env"][0].startswith("PATH=/opt/agent-authz/bin:")


def test_no_compiler_no_pip_no_build_leftovers(image: Image) -> None:
    rootfs = image.rootfs
    executables = _executables(rootfs)
    assert "agent-authz" in executables and "iptables-restore" in executables and "python3" in executables
    compilers = sorted(n for n in executables if n in COMPILERS or re.match(r"(gcc|g\+\+|clang|cc)-\d", n))
    assert not compilers, compilers
    assert not [n for n in executables if n.startswith(("pip", "easy_install"))]
    packages = _installed_packages(rootfs)
    assert "iptables" in packages and "ca-certificates" in packages
    assert not packages & set(BUILD_PACKAGES) and not [p for p in packages if re.match(r"(gcc|cpp|g\+\+)-\d+$", p)]
    # no pip or setuptools anywhere the image's interpreters look, nor a wheel to install them from
    leftovers = [
        str(p.relative_to(rootfs))
        for pattern in ("pip", "pip-*", "setuptools", "setuptools-*", "wheel-*.dist-info", "*.pyi")
        for top in ("usr/lib", "usr/local/lib", "usr/share", "opt/agent-authz")
        for p in (rootfs / top).rglob(pattern)
    ]
    assert not leftovers, leftovers[:20]
    # the mounts of the build (pip configuration, local indexes) left nothing behind
    assert not (rootfs / "etc/pip.conf").exists() and not (rootfs / "etc/xdg/pip").exists()


def test_envoy_is_stripped_and_the_environment_within_budget(image: Image) -> None:
    venv = image.rootfs / "opt/agent-authz"
    envoy = venv / "lib/python3.11/site-packages/envoy/_bin/envoy"
    described = subprocess.run(["file", "-b", str(envoy)], capture_output=True, text=True, check=True).stdout
    assert "ELF 64-bit" in described and "stripped" in described and "not stripped" not in described, described
    unstripped = [
        str(p.relative_to(venv))
        for p in venv.rglob("*.so")
        if "not stripped" in subprocess.run(["file", "-b", str(p)], capture_output=True, text=True).stdout
    ]
    assert not unstripped, unstripped
    static = venv / "lib/python3.11/site-packages/sidecar/admin/static"
    assert {"viewer.html", "viewer.js", "viewer.css"} <= {p.name for p in static.iterdir()}  # the /decisions page
    size = sum(p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink())
    print(f"/opt/agent-authz: {size / 1e6:.0f} MB (Envoy {envoy.stat().st_size / 1e6:.0f} MB)")
    assert size <= VENV_BUDGET, f"the environment grew to {size / 1e6:.0f} MB (budget {VENV_BUDGET / 1e6:.0f} MB)"


def test_the_demo_runs_inside_the_image(image: Image, run_in_image: Any) -> None:
    code, out = run_in_image(["python", "-m", "pip", "--version"])
    assert code != 0 and "No module named pip" in out, out
    code, out = run_in_image(["agent-authz", "iptables", "--dry-run"])
    assert code == 0 and "-A AGENT_AUTHZ_OUTPUT" in out, out
    # the MCP/A2A SDKs are the test extra, not in the image: that demo says so (nothing else needs them)
    code, out = run_in_image(["agent-authz", "demo", "--scenario", "mcp"])
    assert code == 2 and "needs the official SDKs (mcp, a2a, uvicorn missing)" in out, out

    code, out = run_in_image(["agent-authz", "demo", "--state-dir", "/state/demo"], timeout=180)
    assert code == 0, out
    assert "All 15 outcomes match the task and the ingress policy" in out, out
    rows = [line for line in out.splitlines() if re.match(r"^\d+\s", line)]
    assert len(rows) == 15 and all(line.rstrip().endswith(" ok") for line in rows), rows
    assert "MISMATCH" not in out
    # the decision log it wrote (as 65532, on the mounted volume) verifies with the host's CLI
    log = run_in_image.state / "demo" / "decisions.log"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    # 14 decisions and the 3 CONNECT tunnels urllib opens for the HTTPS calls (each a decision, as in test_demo)
    assert len(records) == 17 and log.stat().st_uid == 65532
    assert [r["host"] for r in records if r["method"] == "CONNECT"] == ["sentiment.example.com"] * 3
    verified = subprocess.run(
        [sys.executable, "-m", "sidecar", "logs", "verify", str(log)], capture_output=True, text=True, timeout=60
    )
    assert verified.returncode == 0 and "intact: 17 records" in verified.stdout, verified.stdout
