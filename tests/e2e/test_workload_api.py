"""The sidecar's own identity from the SPIFFE Workload API (a test server speaking workload.proto)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from sidecar.harness import SidecarProcess, http_get, wait_until
from sidecar.identity.devca import DevCA
from sidecar.simulation.workload_api import WorkloadApiServer
from tests.support.certs import make_leaf, url_pem
from tests.support.config import AGENT, PLANNER, base_config, task, write_config, write_keys
from tests.support.envoy_authz import check_request

pytestmark = pytest.mark.e2e


@pytest.fixture
def cas() -> dict[str, DevCA]:
    return {"test.example": DevCA.create("test.example"), "partner.example": DevCA.create("partner.example")}


@pytest.fixture
def workload_api(short_dir: Path, cas: dict[str, DevCA]) -> Iterator[WorkloadApiServer]:
    server = WorkloadApiServer(
        short_dir / "agent.sock", cas["test.example"], AGENT, federated={"partner.example": cas["partner.example"]}
    )
    server.start()
    yield server
    server.stop()


def _config(tmp_path: Path, short_dir: Path, socket: str, **issuer: Any) -> Path:
    write_keys(tmp_path)
    config = base_config(short_dir, [task()])
    del config["agent"]
    config["identity"] = {"source": "workload_api", "workload_api": {"socket": socket, "timeout": "5s"}}
    config["issuer"].update(issuer)
    config["ingress"] = {"rules": [{"callers": [{"id": PLANNER}], "methods": ["GET"], "paths": ["*"]}]}
    return write_config(tmp_path, config)


@pytest.fixture
def sidecar(tmp_path: Path, short_dir: Path, workload_api: WorkloadApiServer) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(_config(tmp_path, short_dir, workload_api.address, bind_to_svid=True), log_dir=tmp_path)
    proc.start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _identity(proc: SidecarProcess) -> dict[str, Any]:
    return json.loads(http_get(proc.admin_url + "/readyz")[1])["identity"]


def _check(short_dir: Path, raw: bytes) -> Any:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2

    with grpc.insecure_channel(f"unix:{short_dir / 'authz.sock'}") as channel:
        call = channel.unary_unary(
            "/envoy.service.auth.v3.Authorization/Check",
            request_serializer=None,
            response_deserializer=external_auth_pb2.CheckResponse.FromString,
        )
        return call(raw, timeout=5)


def _token_cnf(response: Any) -> str:
    headers = {h.header.key: h.header.value for h in response.ok_response.headers}
    claims = jwt.decode(headers["authorization"].removeprefix("Bearer "), options={"verify_signature": False})
    return str(claims["cnf"]["x5t#S256"])


def test_identity_and_rotation_from_the_workload_api(
    sidecar: SidecarProcess, workload_api: WorkloadApiServer, short_dir: Path
) -> None:
    identity = _identity(sidecar)
    assert identity["source"] == "workload_api" and identity["spiffe_id"] == AGENT
    assert identity["serial"] == workload_api.serial
    assert identity["trust_domains"] == ["partner.example", "test.example"]
    first_cnf = _token_cnf(_check(short_dir, check_request()))

    new_serial = workload_api.rotate()
    wait_until(lambda: _identity(sidecar)["serial"] == new_serial, timeout=10, what="rotated SVID in /readyz")
    metrics = http_get(sidecar.admin_url + "/metrics")[1].decode()
    expiry = [line for line in metrics.splitlines() if line.startswith("agent_authz_svid_expiry_timestamp_seconds{")]
    assert len(expiry) == 1 and f'serial="{new_serial}"' in expiry[0] and f'spiffe_id="{AGENT}"' in expiry[0]
    second_cnf = _token_cnf(_check(short_dir, check_request()))
    assert second_cnf != first_cnf  # tokens are re-bound to the new SVID (RFC 8705 §3.1)
    assert workload_api.rejected_without_header == 0


def test_ingress_uses_bundles_from_the_workload_api(
    sidecar: SidecarProcess, cas: dict[str, DevCA], short_dir: Path
) -> None:
    request = check_request(direction="ingress")
    from envoy.service.auth.v3 import external_auth_pb2

    message = external_auth_pb2.CheckRequest.FromString(request)
    cert, _ = make_leaf(cas["test.example"], [PLANNER])
    message.attributes.source.certificate = url_pem(cert)
    response = _check(short_dir, message.SerializeToString())
    assert response.status.code == 0
    caller = {h.header.key: h.header.value for h in response.ok_response.headers}["x-agent-authz-caller"]
    assert caller == PLANNER


def test_a_rotation_to_another_spiffe_id_is_refused(
    sidecar: SidecarProcess, workload_api: WorkloadApiServer, short_dir: Path
) -> None:
    before = _identity(sidecar)["serial"]
    workload_api.spiffe_id = "spiffe://test.example/ns/agents/sa/impostor"
    workload_api.rotate()
    wait_until(lambda: _identity(sidecar)["last_error"], timeout=10, what="identity error reported")
    assert _identity(sidecar)["serial"] == before
    assert "identity_rejected" in sidecar.stderr_path.read_text()


def test_no_workload_api_is_a_clear_startup_error(tmp_path: Path, short_dir: Path) -> None:
    config = _config(tmp_path, short_dir, f"unix://{short_dir}/missing.sock")
    config_text = Path(config).read_text().replace("timeout: 5s", "timeout: 1s")
    Path(config).write_text(config_text)
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "no X.509-SVID" in result.stderr


HOSTILE_CERTS = [
    "garbage",
    "%ff%fe%fd",
    "-----BEGIN CERTIFICATE-----%0Atruncated",
    "A" * 80_000,
    "%E2%82%AC" * 100,
]


def test_hostile_peer_certificates_are_denied_not_crashed(
    sidecar: SidecarProcess, short_dir: Path, cas: dict[str, DevCA]
) -> None:
    from envoy.service.auth.v3 import external_auth_pb2

    long_id = "spiffe://test.example/" + "a" * 2100
    long_td = "spiffe://" + "a" * 256 + "/x"
    certs = [
        *HOSTILE_CERTS,
        url_pem(make_leaf(cas["test.example"], [long_id])[0]),
        url_pem(make_leaf(cas["test.example"], [long_td])[0]),
    ]
    for cert in certs:
        message = external_auth_pb2.CheckRequest.FromString(check_request(direction="ingress"))
        message.attributes.source.certificate = cert
        response = _check(short_dir, message.SerializeToString())
        assert response.status.code == 7 and response.denied_response.status.code in (400, 403), cert[:40]
    assert sidecar.alive()
    records = [json.loads(line) for line in (Path(sidecar.log_dir) / "decisions.log").read_text().splitlines()]
    assert [r["reason"] for r in records] == ["untrusted_identity"] * len(certs)
    assert all(r["detail"].startswith("svid_") for r in records)
