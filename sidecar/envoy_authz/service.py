"""The ``envoy.service.auth.v3.Authorization/Check`` gRPC service on grpcio asyncio.

The handler receives the raw request bytes (no generated deserializer), so a garbage protobuf
becomes a logged deny with reason ``bad_request`` instead of a gRPC error. Any unexpected
exception becomes a logged deny with reason ``internal_error``. Nothing here ever allows on error.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import structlog

from sidecar.audit.log import DecisionLog, decision_record
from sidecar.decision import AuthzRequest, Decision, Reason
from sidecar.envoy_authz.translate import build_check_response, parse_check_request
from sidecar.errors import BadRequestError

__all__ = ["SERVICE_NAME", "AuthorizationService"]

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
_log = structlog.get_logger("agent_authz.authz")


class AuthorizationService:
    """Decides CheckRequests and records every decision.

    Args:
        decide: the decision function (``Runtime.decide``).
        decision_log: where records go; a failed write turns the answer into a deny.
        clock: POSIX seconds.
    """

    def __init__(
        self,
        decide: Callable[[AuthzRequest, str], Decision],
        decision_log: DecisionLog,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._decide = decide
        self._log = decision_log
        self._clock = clock
        self.decisions = 0

    def check_bytes(self, raw: bytes, metadata: Mapping[str, str] | None = None) -> bytes:
        """Decide one serialized CheckRequest and return the serialized CheckResponse.

        ``metadata`` is the call's gRPC metadata (network checks carry their context there).
        """
        started = time.perf_counter_ns()
        decision_id = uuid.uuid4().hex
        request_id = ""
        try:
            request = parse_check_request(raw, metadata)
            request_id = request.request_id
            decision = self._decide(request, decision_id)
        except BadRequestError as exc:
            decision = Decision(False, Reason.BAD_REQUEST, 400, decision_id, detail=str(exc))
        except Exception:
            _log.exception("decision_failed", decision_id=decision_id)
            decision = Decision(False, Reason.INTERNAL_ERROR, 403, decision_id, detail="internal error")
        latency_us = (time.perf_counter_ns() - started) // 1000
        record = decision_record(decision, request_id=request_id, latency_us=latency_us, now=self._clock())
        try:
            self._log.write(record)
        except OSError as exc:
            _log.error("decision_log_write_failed", error=str(exc), decision_id=decision_id)
            if decision.allow:
                decision = Decision(False, Reason.INTERNAL_ERROR, 403, decision_id, detail="decision log unavailable")
        self.decisions += 1
        return build_check_response(decision)

    async def _check(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        metadata = context.invocation_metadata() or ()
        return self.check_bytes(raw, {k: v for k, v in metadata if isinstance(v, str)})

    def handler(self) -> grpc.GenericRpcHandler:
        """A generic handler for ``Check`` taking and returning raw bytes."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME, {"Check": grpc.unary_unary_rpc_method_handler(self._check)}
        )
