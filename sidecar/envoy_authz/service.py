"""The ``envoy.service.auth.v3.Authorization/Check`` gRPC service on grpcio asyncio.

The handler receives the raw request bytes (no generated deserializer), so a garbage protobuf
becomes a logged deny with reason ``bad_request`` instead of a gRPC error. Any unexpected
exception becomes a logged deny with reason ``internal_error``. Nothing here ever allows on error.

Every decision is written to the decision log before the answer is returned (and, with
``decision_log.fsync``, synced), followed by the control records it brought about
(``Decision.followups``: a quarantine the call tripped). If the record cannot be written, ``on_log_failure: deny`` (the
default) turns an allow into an ``internal_error`` deny; ``allow`` keeps the decision. Either way the
record goes to stderr in a ``decision_log_write_failed`` event, so nothing is dropped silently.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, Literal

import grpc
import structlog

from sidecar.audit.log import DecisionLog, decision_record
from sidecar.decision import AuthzRequest, Decision, ProxyRefusal, Reason
from sidecar.envoy_authz.translate import build_check_response, parse_check_request
from sidecar.errors import BadRequestError, DecisionLogError
from sidecar.http_norm import normalize_authority
from sidecar.metrics import Metrics

__all__ = ["SERVICE_NAME", "AuthorizationService"]

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
_log = structlog.get_logger("agent_authz.authz")


class AuthorizationService:
    """Decides CheckRequests and records every decision.

    Args:
        decide: the decision function (``Runtime.decide``).
        decision_log: where records go.
        clock: POSIX seconds.
        metrics: counts each answered decision and its handling time.
        on_log_failure: ``"deny"`` turns an allow whose record cannot be written into a deny;
            ``"allow"`` answers the decision anyway.
    """

    def __init__(
        self,
        decide: Callable[[AuthzRequest, str], Decision],
        decision_log: DecisionLog,
        clock: Callable[[], float] = time.time,
        *,
        metrics: Metrics | None = None,
        on_log_failure: Literal["deny", "allow"] = "deny",
    ) -> None:
        self._decide = decide
        self._log = decision_log
        self._clock = clock
        self._metrics = metrics
        self._fail_closed = on_log_failure == "deny"
        self.decisions = 0
        # Decision ids: 20 random hex digits per process, then a counter - unique across restarts
        # without a random draw per request (uuid4 costs a getrandom syscall each time).
        self._id_prefix = secrets.token_hex(10)
        self._ids = itertools.count()

    def _decide_and_record(
        self, parse: Callable[[], AuthzRequest], build: Callable[[Decision], bytes], started: int
    ) -> tuple[Decision, bytes, dict[str, Any]]:
        decision_id = f"{self._id_prefix}{next(self._ids):012x}"
        request_id = ""
        try:
            request = parse()
            request_id = request.request_id
            decision = self._decide(request, decision_id)
        except BadRequestError as exc:
            decision = Decision(False, Reason.BAD_REQUEST, 400, decision_id, detail=str(exc))
        except Exception:
            _log.exception("decision_failed", decision_id=decision_id)
            decision = Decision(False, Reason.INTERNAL_ERROR, 403, decision_id, detail="internal error")
        try:
            answer = build(decision)
        except ValueError as exc:  # e.g. a header the HTTP answer cannot carry: never sent half-built
            _log.error("answer_unsendable", decision_id=decision_id, error=str(exc))
            decision = _denied(decision, "the answer cannot carry a header of this decision")
            answer = build(decision)
        latency_us = (time.perf_counter_ns() - started) // 1000
        record = decision_record(decision, request_id=request_id, latency_us=latency_us, now=self._clock())
        try:
            self._log.append(record)
        except DecisionLogError as exc:
            failed = self._log_failed(decision, exc, record)
            if failed is not decision:
                decision, answer = failed, build(failed)
        self._record_followups(decision, request_id)
        return decision, answer, record

    def _record_followups(self, decision: Decision, request_id: str) -> None:
        for followup in decision.followups:
            follow = decision_record(followup, request_id=request_id, latency_us=0, now=self._clock())
            try:
                self._log.append(follow)
            except DecisionLogError as exc:  # the step is taken (a freeze): say so on stderr
                self._log_failed(followup, exc, follow)
            if self._metrics is not None:
                self._metrics.observe_control(followup)

    def _log_failed(self, decision: Decision, exc: DecisionLogError, record: dict[str, Any]) -> Decision:
        unchained = {k: v for k, v in record.items() if k not in ("seq", "prev_hash", "hash")}
        _log.error(
            "decision_log_write_failed",
            error=str(exc),
            sink=exc.sink,
            decision_id=decision.decision_id,
            on_log_failure="deny" if self._fail_closed else "allow",
            record=unchained,
        )
        if decision.allow and self._fail_closed:
            return _denied(decision, "decision log unavailable")
        return decision

    def new_id(self) -> str:
        """A fresh decision id (for decisions made outside ``Check``: DNS queries, Envoy's refusals)."""
        return f"{self._id_prefix}{next(self._ids):012x}"

    def record(self, decision: Decision) -> None:
        """Write the record of a decision made outside ``Check`` (a DNS query); a failed write is logged
        (``decision_log_write_failed``) like any other, the decision itself stands (it was answered).
        Its follow-ups (a quarantine the query tripped) are recorded after it."""
        record = decision_record(decision, request_id="", latency_us=0, now=self._clock())
        try:
            self._log.append(record)
        except DecisionLogError as exc:
            self._log_failed(decision, exc, record)
        self._record_followups(decision, "")

    def record_refusal(self, refusal: ProxyRefusal, *, agent: str | None) -> Decision:
        """Record what Envoy refused without a decision (its gRPC access log): a deny with reason
        ``refused_by_proxy``, Envoy's status and explanation, the host and path when it parsed them
        (the path without its query string). A failed write is logged like any other.

        Returns:
            The recorded decision.
        """
        decision_id = self.new_id()
        host, port = "", 0
        if refusal.authority:
            try:
                host, port = normalize_authority(refusal.authority, "http")
            except BadRequestError:
                host = ""
        decision = Decision(
            False,
            Reason.REFUSED_BY_PROXY,
            refusal.status,
            decision_id,
            refusal.detail,
            refusal.direction,
            agent=agent,
            method=refusal.method,
            host=host,
            port=port,
            path=refusal.path,
            protocol=refusal.protocol,
            sni=refusal.sni,
            destination=refusal.destination[:64],
        )
        self.record(decision)
        if self._metrics is not None:
            self._metrics.count(decision)
        return decision

    def _finish(self, decision: Decision, started: int) -> None:
        self.decisions += 1
        if self._metrics is not None:
            self._metrics.observe(decision, (time.perf_counter_ns() - started) / 1e9)

    def answer(
        self, parse: Callable[[], AuthzRequest], build: Callable[[Decision], bytes]
    ) -> tuple[bytes, Callable[[], Awaitable[bytes]] | None]:
        """Decide the request ``parse`` reads, record it and build the answer with ``build``.

        Returns:
            ``(answer, None)``; with ``decision_log.fsync``, ``(b"", wait)`` where ``await wait()``
            syncs the record and returns the answer (a deny if the sync failed).
        """
        started = time.perf_counter_ns()
        decision, answer, record = self._decide_and_record(parse, build, started)
        if not self._log.fsync:
            self._finish(decision, started)
            return answer, None

        async def synced() -> bytes:
            nonlocal decision, answer
            try:
                await self._log.sync()
            except DecisionLogError as exc:
                failed = self._log_failed(decision, exc, record)
                if failed is not decision:
                    decision, answer = failed, build(failed)
            self._finish(decision, started)
            return answer

        return b"", synced

    def check_bytes(self, raw: bytes, metadata: Mapping[str, str] | None = None) -> bytes:
        """Decide one serialized CheckRequest and return the serialized CheckResponse (no fsync wait).

        ``metadata`` is the call's gRPC metadata (network-level checks carry their context there).
        """
        started = time.perf_counter_ns()
        decision, answer, _ = self._decide_and_record(
            lambda: parse_check_request(raw, metadata), build_check_response, started
        )
        self._finish(decision, started)
        return answer

    async def check(self, raw: bytes, metadata: Mapping[str, str] | None = None) -> bytes:
        """Like :meth:`check_bytes`, and with ``decision_log.fsync`` wait until the record is synced."""
        answer, wait = self.answer(lambda: parse_check_request(raw, metadata), build_check_response)
        return answer if wait is None else await wait()

    async def _check(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        metadata = context.invocation_metadata() or ()
        return await self.check(raw, {k: v for k, v in metadata if isinstance(v, str)})

    def handler(self) -> grpc.GenericRpcHandler:
        """A generic handler for ``Check`` taking and returning raw bytes."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME, {"Check": grpc.unary_unary_rpc_method_handler(self._check)}
        )


def _denied(decision: Decision, detail: str) -> Decision:
    """``decision`` turned into an ``internal_error`` deny (no obligations)."""
    return replace(
        decision,
        allow=False,
        reason=Reason.INTERNAL_ERROR,
        http_status=403,
        detail=detail,
        headers_to_set=(),
        headers_to_remove=(),
        token=None,
        list_filter=None,
    )
