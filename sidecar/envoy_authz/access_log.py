"""What Envoy refused without a decision: the gRPC access log service (``envoy.service.accesslog.v3``).

The bootstrap gives every HTTP connection manager and every ``tcp_proxy`` a gRPC access logger that
sends only the entries carrying no ``decision_id`` in the ext_authz filter's dynamic metadata
(:func:`~sidecar.bootstrap.filters.refused_log`): a request Envoy could not parse (a codec error, a
first line or headers over its limits), a Check that failed or timed out, a connection that never
sent what a check needs. Each entry becomes a :class:`~sidecar.decision.ProxyRefusal`, which the
sidecar records as ``refused_by_proxy`` - so every refused connection leaves a decision record.

Envoy facts relied on (``envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs``, a client
stream): the ``identifier`` (with the logger's ``log_name``) comes in the first message of each
stream only; ``http_logs`` and ``tcp_logs`` batch entries; ``request.path`` includes the query
string (dropped here); ``common_properties.downstream_local_address`` is the original destination
behind ``original_dst``. Entries of allowed or denied Checks never arrive (the filter drops them),
nor do the logger's own periodic entries (``intermediate_log_entry``, skipped).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf.message import DecodeError

from sidecar import wire
from sidecar.decision import Direction, Protocol, ProxyRefusal

__all__ = ["SERVICE_NAME", "RefusalLogService", "parse_refusals"]

SERVICE_NAME = "envoy.service.accesslog.v3.AccessLogService"
_log = structlog.get_logger("agent_authz.access_log")
_MAX_MESSAGE = 4 * 1024 * 1024
_DIRECTIONS = {d.value: d for d in Direction}
_EMPTY_RESPONSE: bytes = als_pb2.StreamAccessLogsResponse().SerializeToString()


def _address(address: Any) -> str:
    if not address.HasField("socket_address"):
        return ""
    socket = address.socket_address
    host = f"[{socket.address}]" if ":" in socket.address else socket.address
    return f"{host}:{socket.port_value}"


def _flags(common: accesslog_pb2.AccessLogCommon) -> list[str]:
    return [field.name for field, value in common.response_flags.ListFields() if value is True]


def _direction(log_name: str) -> Direction | None:
    """``refused|<direction>|<stat prefix>`` -> the direction; ``None`` for another logger's name."""
    prefix, _, rest = log_name.partition("|")
    return _DIRECTIONS.get(rest.partition("|")[0]) if prefix == wire.REFUSED_LOG_PREFIX else None


def _detail(parts: list[str], common: accesslog_pb2.AccessLogCommon) -> str:
    flags = _flags(common)
    termination = common.connection_termination_details
    text = "; ".join(p for p in (*parts, termination, ",".join(flags)) if p)
    return text[:300] or "closed by Envoy without a decision"


def _decided(common: accesslog_pb2.AccessLogCommon) -> bool:
    """Whether the entry's stream has a decision (``decision_id`` in an ext_authz filter's metadata):
    Envoy's access-log filter should have dropped it, but a record of its own exists either way."""
    filters = common.metadata.filter_metadata
    return any(
        ns in filters and wire.METADATA_DECISION_ID in filters[ns].fields
        for ns in (wire.HTTP_FILTER, wire.NETWORK_FILTER)
    )


def parse_refusals(message: als_pb2.StreamAccessLogsMessage, direction: Direction) -> list[ProxyRefusal]:
    """The refusals one ``StreamAccessLogsMessage`` carries (periodic entries, and entries of decided
    streams, skipped).

    Args:
        message: a decoded message of the stream.
        direction: the side of the logger that sent the stream (from its ``log_name``).
    """
    refusals = []
    for http in message.http_logs.log_entry:
        common = http.common_properties
        if common.intermediate_log_entry or _decided(common):
            continue
        request, response = http.request, http.response
        method = base_pb2.RequestMethod.Name(request.request_method) if request.request_method else ""
        refusals.append(
            ProxyRefusal(
                direction=direction,
                protocol=Protocol.HTTP,
                method="" if method == "METHOD_UNSPECIFIED" else method,
                authority=request.authority[:300],
                path=request.path.partition("?")[0][:256],  # never the query string
                destination=_address(common.downstream_local_address),
                sni=common.tls_properties.tls_sni_hostname[:256],
                status=response.response_code.value if response.HasField("response_code") else 0,
                detail=_detail([response.response_code_details], common),
            )
        )
    for tcp in message.tcp_logs.log_entry:
        common = tcp.common_properties
        if common.intermediate_log_entry or _decided(common):
            continue
        refusals.append(
            ProxyRefusal(
                direction=direction,
                protocol=Protocol.TLS if common.tls_properties.tls_sni_hostname else Protocol.TCP,
                method="",
                authority="",
                path="",
                destination=_address(common.downstream_local_address),
                sni=common.tls_properties.tls_sni_hostname[:256],
                status=0,
                detail=_detail([f"{tcp.connection_properties.received_bytes} bytes received"], common),
            )
        )
    return refusals


class RefusalLogService:
    """``StreamAccessLogs``: each refusal Envoy reports is handed to ``record``.

    Args:
        record: called once per refusal, on the event loop (it writes the decision record).
    """

    def __init__(self, record: Callable[[ProxyRefusal], object]) -> None:
        self._record = record
        self.refusals = 0

    async def _stream(self, messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        direction: Direction | None = None
        async for raw in messages:
            if len(raw) > _MAX_MESSAGE:
                continue
            try:
                message = als_pb2.StreamAccessLogsMessage.FromString(raw)
            except (DecodeError, ValueError, RuntimeError):
                _log.warning("access_log_message_undecodable", bytes=len(raw))
                continue
            if message.HasField("identifier"):
                direction = _direction(message.identifier.log_name)
            if direction is None:
                continue
            for refusal in parse_refusals(message, direction):
                self.refusals += 1
                try:
                    self._record(refusal)
                except Exception:  # one bad entry must not end the stream
                    _log.exception("refusal_record_failed")
        return _EMPTY_RESPONSE

    def handler(self) -> grpc.GenericRpcHandler:
        """A generic handler for ``StreamAccessLogs`` taking and returning raw bytes."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME, {"StreamAccessLogs": grpc.stream_unary_rpc_method_handler(self._stream)}
        )
