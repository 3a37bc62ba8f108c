"""The refusals Envoy reports over gRPC access logging, decoded (envoy.service.accesslog.v3)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from envoy.service.accesslog.v3 import als_pb2

from sidecar.decision import Direction, Protocol, ProxyRefusal
from sidecar.envoy_authz.access_log import RefusalLogService, parse_refusals


def _message(log_name: str | None = "refused|egress|outbound_http") -> als_pb2.StreamAccessLogsMessage:
    message = als_pb2.StreamAccessLogsMessage()
    if log_name is not None:
        message.identifier.log_name = log_name
    http = message.http_logs.log_entry.add()
    http.request.request_method = 1  # GET
    http.request.authority = "api.example.com"
    http.request.path = "/v1/items?api_key=SECRET"
    http.response.response_code.value = 400
    http.response.response_code_details = "http1.codec_error"
    http.common_properties.response_flags.downstream_protocol_error = True
    local = http.common_properties.downstream_local_address.socket_address
    local.address, local.port_value = "10.77.0.2", 80
    periodic = message.http_logs.log_entry.add()
    periodic.common_properties.intermediate_log_entry = True
    return message


def _tcp_message() -> als_pb2.StreamAccessLogsMessage:
    message = als_pb2.StreamAccessLogsMessage()  # http_logs and tcp_logs are a oneof
    tcp = message.tcp_logs.log_entry.add()
    tcp.connection_properties.received_bytes = 0
    tcp.common_properties.response_flags.duration_timeout = True
    tcp.common_properties.downstream_local_address.socket_address.address = "fd77::2"
    tcp.common_properties.downstream_local_address.socket_address.port_value = 25
    return message


def test_entries_become_refusals_without_their_query() -> None:
    (http,) = parse_refusals(_message(), Direction.EGRESS)
    (tcp,) = parse_refusals(_tcp_message(), Direction.EGRESS)
    assert http == ProxyRefusal(
        Direction.EGRESS,
        Protocol.HTTP,
        "GET",
        "api.example.com",
        "/v1/items",
        "10.77.0.2:80",
        "",
        400,
        "http1.codec_error; downstream_protocol_error",
    )
    assert (tcp.protocol, tcp.destination, tcp.status) == (Protocol.TCP, "[fd77::2]:25", 0)
    assert "duration_timeout" in tcp.detail and "0 bytes received" in tcp.detail


async def _feed(messages: list[bytes]) -> AsyncIterator[bytes]:
    for raw in messages:
        yield raw


def test_the_stream_names_its_side_once_and_junk_is_skipped() -> None:
    seen: list[ProxyRefusal] = []
    service = RefusalLogService(seen.append)
    second = _message(None)
    messages = [
        _message("refused|ingress|ingress_http").SerializeToString(),
        b"\xff\xfejunk",
        second.SerializeToString(),
        _tcp_message().SerializeToString(),
    ]
    answer = asyncio.run(service._stream(_feed(messages), None))  # type: ignore[arg-type]
    assert answer == b"" and len(seen) == 3 and {r.direction for r in seen} == {Direction.INGRESS}


def test_another_loggers_stream_is_ignored() -> None:
    seen: list[ProxyRefusal] = []
    asyncio.run(RefusalLogService(seen.append)._stream(_feed([_message("other").SerializeToString()]), None))  # type: ignore[arg-type]
    assert seen == []


def test_a_failing_record_does_not_end_the_stream() -> None:
    calls: list[ProxyRefusal] = []

    def record(refusal: ProxyRefusal) -> None:
        calls.append(refusal)
        raise RuntimeError("disk full")

    service = RefusalLogService(record)
    asyncio.run(service._stream(_feed([_message().SerializeToString()] * 2), None))  # type: ignore[arg-type]
    assert len(calls) == 2 and service.refusals == 2


def test_an_entry_of_a_decided_stream_is_no_refusal() -> None:
    """Envoy's filter drops them; if one arrives anyway, its own record exists: no second one."""
    message = _tcp_message()
    entry = message.tcp_logs.log_entry[0]
    entry.common_properties.metadata.filter_metadata["envoy.filters.network.ext_authz"].fields[
        "decision_id"
    ].string_value = "d1"
    assert parse_refusals(message, Direction.EGRESS) == []
