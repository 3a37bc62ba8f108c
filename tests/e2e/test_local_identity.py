"""The sidecar's own identity is validated like a peer's, at start and on every rotation.

Both sources, with the real ``agent-authz serve`` process: the Workload API (the test server speaking
``workload.proto`` pushes a bad rotation) and ``identity.files`` (a bad file swap). A bad update keeps
the previous identity, counts in ``agent_authz_identity_updates_rejected_total{source,detail}`` and
shows in ``/readyz`` (``identity.last_error``, ``identity.rejected_updates``) until a good one comes;
a bad identity at start is a startup error (exit 2) naming the rule.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from sidecar.harness import SidecarProcess, http_get, wait_until
from sidecar.identity.devca import DevCA
from sidecar.simulation.kubelet import atomic_write
from sidecar.simulation.workload_api import WorkloadApiServer
from tests.support import spiffe_testdata as fx
from tests.support.certs import key_usage, make_leaf
from tests.support.config import AGENT, PLANNER, add_file_identity, base_config, task, write_config, write_keys

pytestmark = pytest.mark.e2e

TD = "test.example"
NOW = dt.datetime.now(dt.UTC)


def _identity(proc: SidecarProcess) -> dict[str, Any]:
    status, body = http_get(proc.admin_url + "/readyz")
    assert status == 200, body  # the previous identity is still good: still ready
    identity: dict[str, Any] = json.loads(body)["identity"]
    return identity


def _rejected(proc: SidecarProcess, source: str) -> dict[str, float]:
    """``detail -> count`` of ``agent_authz_identity_updates_rejected_total`` for ``source``."""
    out: dict[str, float] = {}
    for line in http_get(proc.admin_url + "/metrics")[1].decode().splitlines():
        if line.startswith("agent_authz_identity_updates_rejected_total{") and f'source="{source}"' in line:
            detail = line.split('detail="', 1)[1].split('"', 1)[0]
            out[detail] = float(line.rsplit(" ", 1)[1])
    return out


def _intermediate(dev_ca: DevCA, **broken: Any) -> fx.Authority:
    return fx.make_ca(TD, signer=fx.Authority(dev_ca.ca_cert, dev_ca.ca_key), **broken)


BadSvid = Callable[[DevCA], tuple[list[Any], Any]]


def _leaf(**kw: Any) -> BadSvid:
    def build(ca: DevCA) -> tuple[list[Any], Any]:
        cert, key = make_leaf(ca, [AGENT], **kw)
        return [cert], key

    return build


def _mismatched_key(ca: DevCA) -> tuple[list[Any], Any]:
    cert, _ = make_leaf(ca, [AGENT])
    return [cert], fx.new_key("ec-p256")


def _bad_signer(**broken: Any) -> BadSvid:
    def build(ca: DevCA) -> tuple[list[Any], Any]:
        signer = _intermediate(ca, **broken)
        cert, key = fx.make_leaf(signer, [AGENT])
        return [cert, signer.cert], key

    return build


def _foreign(ca: DevCA) -> tuple[list[Any], Any]:
    cert, key = make_leaf(DevCA.create(TD), [AGENT])  # same trust domain name, another CA
    return [cert], key


BAD_SVIDS: list[tuple[str, BadSvid]] = [
    ("svid_leaf_is_ca", _leaf(ca_flag=True)),
    ("svid_bad_key_usage", _leaf(usage=key_usage(cert_sign=True))),
    ("svid_expired", _leaf(not_before=NOW - dt.timedelta(hours=2), not_after=NOW - dt.timedelta(minutes=1))),
    ("svid_key_mismatch", _mismatched_key),
    ("svid_signer_not_ca", _bad_signer(ca=False)),
    ("svid_signer_bad_key_usage", _bad_signer(usage=fx.key_usage(crl_sign=True))),
    ("svid_chain_invalid", _foreign),
]


# -- Workload API -------------------------------------------------------------------------------------
@pytest.fixture
def ca() -> DevCA:
    return DevCA.create(TD)


@pytest.fixture
def workload_api(short_dir: Path, ca: DevCA) -> Iterator[WorkloadApiServer]:
    server = WorkloadApiServer(short_dir / "agent.sock", ca, AGENT)
    server.start()
    yield server
    server.stop()


def _workload_config(tmp_path: Path, short_dir: Path, socket: str) -> Path:
    write_keys(tmp_path)
    config = base_config(short_dir, [task()])
    del config["agent"]
    config["identity"] = {"source": "workload_api", "workload_api": {"socket": socket, "timeout": "5s"}}
    config["ingress"] = {"rules": [{"callers": [{"id": PLANNER}], "methods": ["GET"], "paths": ["*"]}]}
    return write_config(tmp_path, config)


@pytest.fixture
def sidecar(tmp_path: Path, short_dir: Path, workload_api: WorkloadApiServer) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(_workload_config(tmp_path, short_dir, workload_api.address), log_dir=tmp_path)
    proc.start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize(("detail", "build"), BAD_SVIDS, ids=[d for d, _ in BAD_SVIDS])
def test_a_bad_workload_api_rotation_keeps_the_previous_svid(
    sidecar: SidecarProcess, workload_api: WorkloadApiServer, ca: DevCA, detail: str, build: BadSvid
) -> None:
    good = workload_api.serial
    chain, key = build(ca)
    workload_api.push(chain, key)
    wait_until(lambda: _identity(sidecar)["rejected_updates"] == 1, timeout=10, what="the rejection in /readyz")
    identity = _identity(sidecar)
    assert identity["serial"] == good and identity["last_error"].startswith(f"{detail}: ")
    assert _rejected(sidecar, "workload_api") == {detail: 1.0}
    assert "identity_update_rejected" in sidecar.stderr_path.read_text()
    # the stream is still alive: the next good rotation is taken, and clears the error
    new_serial = workload_api.rotate()
    wait_until(lambda: _identity(sidecar)["serial"] == new_serial, timeout=10, what="the good rotation")
    assert _identity(sidecar)["last_error"] is None and _identity(sidecar)["rejected_updates"] == 1


def test_a_bad_jwt_bundle_update_keeps_the_previous_bundles(
    tmp_path: Path, short_dir: Path, workload_api: WorkloadApiServer, ca: DevCA
) -> None:
    config = _workload_config(tmp_path, short_dir, workload_api.address)
    proc = SidecarProcess(config, log_dir=tmp_path)
    proc.start()
    try:
        proc.wait_ready()
        broken = fx.document([fx.public_jwk(fx.new_key("ec-p256"), use="jwt-svid")])  # no kid
        workload_api.push_jwt_bundles({TD: broken})
        wait_until(lambda: _identity(proc)["rejected_updates"] >= 1, timeout=10, what="the rejection in /readyz")
        assert _identity(proc)["last_error"].startswith("bundle_missing_kid: ")
        assert _rejected(proc, "workload_api").keys() == {"bundle_missing_kid"}
    finally:
        proc.stop()


def test_an_invalid_svid_at_start_refuses_to_start(
    tmp_path: Path, short_dir: Path, workload_api: WorkloadApiServer, ca: DevCA
) -> None:
    chain, key = _leaf(ca_flag=True)(ca)
    workload_api.push(chain, key)
    config = _workload_config(tmp_path, short_dir, workload_api.address)
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert f"invalid identity from {workload_api.address}: X.509-SVID: svid_leaf_is_ca:" in result.stderr


# -- identity.files ------------------------------------------------------------------------------------
def _write_svid(directory: Path, chain: list[Any], key: Any) -> None:
    """Swap the certificate and key in together, as the kubelet updates a Secret volume (``..data``)."""
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    for name in ("agent.pem", "agent.key"):  # the dev CA wrote plain files: become a Secret volume
        if (directory / name).exists() and not (directory / name).is_symlink():
            (directory / name).unlink()
    atomic_write(directory, {"agent.pem": b"".join(c.public_bytes(pem) for c in chain), "agent.key": key_pem}, 0o600)


def _files_sidecar(tmp_path: Path, short_dir: Path) -> tuple[SidecarProcess, dict[str, DevCA]]:
    write_keys(tmp_path)
    config = base_config(short_dir, [task()])
    cas = add_file_identity(tmp_path, config)
    chain, key = cas["test.example"].issue_x509(AGENT)
    _write_svid(tmp_path / "svid", chain, key)
    proc = SidecarProcess(write_config(tmp_path, config), log_dir=tmp_path)
    return proc, cas


@pytest.mark.parametrize(("detail", "build"), BAD_SVIDS, ids=[d for d, _ in BAD_SVIDS])
def test_a_bad_file_swap_keeps_the_previous_svid(tmp_path: Path, short_dir: Path, detail: str, build: BadSvid) -> None:
    proc, cas = _files_sidecar(tmp_path, short_dir)
    proc.start()
    try:
        proc.wait_ready()
        good = _identity(proc)["serial"]
        chain, key = build(cas["test.example"])
        _write_svid(tmp_path / "svid", chain, key)
        wait_until(lambda: _identity(proc)["rejected_updates"] >= 1, timeout=10, what="the rejection in /readyz")
        identity = _identity(proc)
        assert identity["serial"] == good and identity["last_error"].startswith(f"{detail}: ")
        field = "identity.files.key" if detail == "svid_key_mismatch" else "identity.files.svid"
        assert identity["last_error"].endswith(f"({field})")
        assert set(_rejected(proc, "files")) == {detail}
        new_chain, new_key = cas["test.example"].issue_x509(AGENT)
        _write_svid(tmp_path / "svid", new_chain, new_key)
        new_serial = format(new_chain[0].serial_number, "x")
        wait_until(lambda: _identity(proc)["serial"] == new_serial, timeout=10, what="the good swap")
        assert _identity(proc)["last_error"] is None
    finally:
        proc.stop()


def test_an_expired_svid_file_at_start_refuses_to_start(tmp_path: Path, short_dir: Path) -> None:
    _, cas = _files_sidecar(tmp_path, short_dir)
    chain, key = _leaf(not_before=NOW - dt.timedelta(hours=2), not_after=NOW - dt.timedelta(minutes=1))(
        cas["test.example"]
    )
    _write_svid(tmp_path / "svid", chain, key)
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(tmp_path / "sidecar.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "identity.files.svid: svid_expired: the certificate has expired" in result.stderr


def test_the_workload_api_stream_reconnects_after_the_agent_restarts(
    tmp_path: Path, short_dir: Path, workload_api: WorkloadApiServer, ca: DevCA
) -> None:
    """A SPIRE agent restart ends the streams; the sidecar keeps its SVID, reconnects, and takes the new one."""
    proc = SidecarProcess(_workload_config(tmp_path, short_dir, workload_api.address), log_dir=tmp_path)
    proc.start()
    restarted: WorkloadApiServer | None = None
    try:
        proc.wait_ready()
        first = _identity(proc)["serial"]
        workload_api.stop()
        (short_dir / "agent.sock").unlink(missing_ok=True)
        assert _identity(proc)["serial"] == first  # still serving on the SVID it has
        restarted = WorkloadApiServer(short_dir / "agent.sock", ca, AGENT)
        restarted.start()
        wait_until(lambda: _identity(proc)["serial"] == restarted.serial, timeout=20, what="the restarted agent's SVID")
        assert _identity(proc)["rejected_updates"] == 0 and restarted.rejected_without_header == 0
    finally:
        proc.stop()
        if restarted is not None:
            restarted.stop()
