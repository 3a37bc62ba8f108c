"""The agent's trust files and variables, and the private files of ``intercept.state_dir``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sidecar.tls_intercept.files import ensure_private_dir, write_atomic
from sidecar.tls_intercept.trust import agent_trust_env, agent_trust_mount, trust_volume, write_trust_files


def test_agent_trust_env_and_volume() -> None:
    env = agent_trust_env("/etc/agent-authz/trust")
    bundle = "/etc/agent-authz/trust/ca-bundle.pem"
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO", "AWS_CA_BUNDLE"):
        assert env[name] == bundle
    assert env["NODE_EXTRA_CA_CERTS"] == "/etc/agent-authz/trust/ca.pem"  # Node adds it to its own roots
    assert agent_trust_mount() == {"name": "agent-authz-trust", "mountPath": "/etc/agent-authz/trust", "readOnly": True}
    assert trust_volume()["name"] == "agent-authz-trust" and "emptyDir" in trust_volume()


def test_trust_files_are_world_readable_and_hold_no_key(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        ca_path, bundle_path = write_trust_files(tmp_path / "trust", b"-----BEGIN CERTIFICATE-----\nCA\n", b"SYSTEM")
    finally:
        os.umask(old)
    assert bundle_path.read_bytes() == b"SYSTEM\n-----BEGIN CERTIFICATE-----\nCA\n"
    assert stat.S_IMODE(ca_path.stat().st_mode) == 0o644 == stat.S_IMODE(bundle_path.stat().st_mode)
    with pytest.raises(ValueError, match="private key"):
        write_trust_files(tmp_path / "t2", b"CA", b"-----BEGIN PRIVATE KEY-----")


def test_private_files_and_directories(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o755)
    ensure_private_dir(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    write_atomic(directory / "secret.json", b"{}", 0o600)
    assert stat.S_IMODE((directory / "secret.json").stat().st_mode) == 0o600
    assert [p.name for p in directory.iterdir()] == ["secret.json"]  # no temporary file left behind
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        os.chown(foreign, 4321, 4321)
        with pytest.raises(PermissionError, match="belongs to uid 4321"):
            ensure_private_dir(foreign)
