"""The real ``agent-authz serve`` process under hostile CheckRequests over gRPC: deny, log, never crash."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2

from sidecar.harness import SidecarProcess
from tests.support.config import base_config, task, write_config, write_keys
from tests.support.envoy_authz import check_request

pytestmark = pytest.mark.e2e


@pytest.fixture
def sidecar(tmp_path: Path, short_dir: Path) -> Iterator[tuple[SidecarProcess, grpc.Channel]]:
    write_keys(tmp_path)
    config = write_config(tmp_path, base_config(short_dir, [task()]))
    proc = SidecarProcess(config, log_dir=tmp_path)
    proc.start()
    try:
        proc.wait_ready()
        with grpc.insecure_channel(f"unix:{short_dir / 'authz.sock'}") as channel:
            yield proc, channel
    finally:
        proc.stop()


HOSTILE = [
    b"\xff" * 64,
    b"\x0a\x05hello",  # truncated length-delimited field
    b"",
    check_request(http=False),
    check_request(direction=None),
    check_request(host=""),
    check_request(host="x" * 10_000),
    check_request(path="relative"),
    check_request(path="/a\r\nInjected: 1"),
    check_request(headers={f"h{i}": "v" * 1000 for i in range(200)}),
    check_request(headers={"x-agent-task": "t" * 5000}),
    check_request(method="G\x00ET"),
]


def test_hostile_requests_are_denied_and_logged(sidecar: tuple[SidecarProcess, grpc.Channel], tmp_path: Path) -> None:
    proc, channel = sidecar
    check = channel.unary_unary(
        "/envoy.service.auth.v3.Authorization/Check",
        request_serializer=None,
        response_deserializer=external_auth_pb2.CheckResponse.FromString,
    )
    for raw in HOSTILE:
        response = check(raw, timeout=5)
        assert response.status.code == code_pb2.PERMISSION_DENIED, raw[:40]
        assert response.HasField("denied_response")
    assert proc.alive()
    records = [json.loads(line) for line in (tmp_path / "decisions.log").read_text().splitlines()]
    assert len(records) == len(HOSTILE)
    assert all(r["decision"] == "deny" for r in records)
    assert {r["reason"] for r in records} <= {"bad_request", "unknown_task"}
    # a good request still works afterwards
    response = check(check_request(), timeout=5)
    assert response.status.code == code_pb2.OK
