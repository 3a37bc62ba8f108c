"""The SPIFFE Workload API as an identity source (SPIFFE Workload API §5: ``FetchX509SVID``, ``FetchJWTBundles``).

:class:`WorkloadApiIdentity` keeps the streams open to the agent socket (py-spiffe's generated
``workload.proto`` stubs, the ``workload.spiffe.io: true`` header), reconnecting with backoff. Each
update is parsed and validated here - the SVID with
:func:`~sidecar.identity.local_svid.validate_local_svid` (X509-SVID §4/§5, unexpired, key matches
leaf, chains to its own trust domain's bundle), JWT bundles with the SPIFFE bundle rules of
:func:`~sidecar.identity.bundles.parse_bundle_document` - and only a valid one becomes the new
:class:`~sidecar.identity.state.IdentityState`, handed to ``on_update``: rotation needs no restart.

An invalid update keeps the previous identity, is logged (``identity_update_rejected``) and handed
to ``on_reject`` (the runtime counts it and shows it in ``/readyz``). py-spiffe's own sources are not
used for this: they parse with their own rules and stop streaming for good after one bad update.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from spiffe._proto import workload_pb2, workload_pb2_grpc

from sidecar.errors import AgentAuthzError, BundleDetail, ErrorCode, SpiffeIdError, SvidDetail
from sidecar.identity.bundles import (
    BundleError,
    TrustBundles,
    log_ignored,
    parse_bundle_document,
    parse_x509_bundle_der,
)
from sidecar.identity.local_svid import LocalIdentityError, Svid, parse_svid_der, validate_local_svid
from sidecar.identity.spiffe_id import parse_spiffe_id
from sidecar.identity.state import IdentityState

__all__ = ["WorkloadApiError", "WorkloadApiIdentity"]

_log = structlog.get_logger("agent_authz.identity")

_HEADER = (("workload.spiffe.io", "true"),)  # SPIFFE Workload Endpoint §4: the security header
_RETRY_MIN, _RETRY_MAX = 0.1, 5.0  # seconds between reconnects (doubling)
_X509, _JWT = "X.509-SVID", "JWT bundles"  # the two parts of an identity, as errors name them

Detail = SvidDetail | BundleDetail
Rejected = Callable[[Detail, str], None]
"""``(detail, message)`` of a rejected update."""


class WorkloadApiError(AgentAuthzError):
    """The Workload API did not deliver a usable identity at start."""

    code = ErrorCode.IDENTITY_UNAVAILABLE


def _trust_domain(name: str) -> str:
    """``spiffe://td`` (the Workload API's bundle map keys) -> ``td``."""
    try:
        return str(parse_spiffe_id(name, require_path=False).trust_domain)
    except SpiffeIdError as exc:
        raise BundleError(
            BundleDetail.BUNDLE_MALFORMED, f"bundle key {name!r} is not a trust domain ID ({exc})"
        ) from None


def _der_bundle(name: str, data: bytes) -> tuple[x509.Certificate, ...]:
    try:
        return parse_x509_bundle_der(data)
    except BundleError as exc:
        raise BundleError(exc.detail, f"the X.509 bundle of {name}: {exc}") from None


class WorkloadApiIdentity:
    """A live, validated identity from the Workload API (``state`` is always the latest valid one).

    Args:
        socket: ``unix:///path`` of the SPIRE agent.
        timeout: seconds to wait for the first SVID (and, with ``with_jwt``, JWT bundles).
        with_jwt: also stream JWT bundles (for JWT-SVIDs on ingress).
        on_update: called (from a stream thread) with each new valid state.
        clock: POSIX seconds, for the validity checks.

    Raises:
        WorkloadApiError: nothing arrived within ``timeout``, or the first SVID or JWT bundles were
            invalid (the message carries the sub-code).
    """

    def __init__(
        self,
        socket: str,
        *,
        timeout: float,
        with_jwt: bool,
        on_update: Callable[[IdentityState], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state: IdentityState
        self._socket = socket
        self._clock = clock
        self._on_update = on_update
        self._on_reject: Rejected | None = None
        self._pending: list[tuple[Detail, str]] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._deliver = threading.Lock()  # one on_update at a time, always with the latest state
        self._closed = threading.Event()
        self._calls: set[Any] = set()
        self._svid: Svid | None = None
        self._x509_bundles: Mapping[str, tuple[x509.Certificate, ...]] = {}
        self._jwt_bundles: Mapping[str, Mapping[str, PublicKeyTypes]] | None = None if with_jwt else {}
        self._startup_error: str | None = None
        self._problems: dict[str, str] = {}  # part -> why its last update was refused
        self._last_rpc_error = "no answer yet"
        self._channel = grpc.insecure_channel(socket)
        self._stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel)  # type: ignore[no-untyped-call]
        streams: list[tuple[str, Callable[[], Iterator[Any]], Callable[[Any], None]]] = [
            ("x509", lambda: self._stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=_HEADER), self._x509),
        ]
        if with_jwt:
            streams.append(
                (
                    "jwt",
                    lambda: self._stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=_HEADER),
                    self._jwt,
                )
            )
        self._threads = [
            threading.Thread(target=self._watch, args=stream, name=f"workload-api-{stream[0]}", daemon=True)
            for stream in streams
        ]
        for thread in self._threads:
            thread.start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._current() is None and self._startup_error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            state, startup_error, rpc_error = self._current(), self._startup_error, self._last_rpc_error
            have_svid = self._svid is not None
        if state is None:
            self.close()
            if startup_error is not None:
                raise WorkloadApiError(f"invalid identity from {socket}: {startup_error}")
            what = "JWT bundles" if have_svid else "X.509-SVID"
            raise WorkloadApiError(f"no {what} from {socket} within {timeout:g}s ({rpc_error})")

    # -- streams ---------------------------------------------------------------------------------
    def _watch(self, kind: str, open_stream: Callable[[], Iterator[Any]], handle: Callable[[Any], None]) -> None:
        delay = _RETRY_MIN
        while not self._closed.is_set():
            try:
                call = open_stream()
                with self._lock:
                    self._calls.add(call)
                try:
                    for response in call:
                        delay = _RETRY_MIN
                        handle(response)
                finally:
                    with self._lock:
                        self._calls.discard(call)
            except grpc.RpcError as exc:
                if self._closed.is_set():
                    return
                if isinstance(exc, grpc.Call):
                    self._last_rpc_error = f"{exc.code().name}: {exc.details()}"
                else:
                    self._last_rpc_error = str(exc)
                _log.debug("workload_api_stream_error", stream=kind, error=self._last_rpc_error)
            if self._closed.wait(delay):
                return
            delay = min(delay * 2, _RETRY_MAX)

    def _current(self) -> IdentityState | None:
        """The state from the latest valid parts (call with the lock held)."""
        if self._svid is None or self._jwt_bundles is None:
            return None
        problems = tuple(self._problems[part] for part in sorted(self._problems))
        return IdentityState(self._svid, TrustBundles(self._x509_bundles, self._jwt_bundles), "workload_api", problems)

    def _x509(self, response: Any) -> None:
        try:
            if not response.svids:
                raise LocalIdentityError(SvidDetail.SVID_MALFORMED, "the X509SVIDResponse holds no SVID")
            message = response.svids[0]  # the default SVID (Workload API §5.2.1)
            own = _trust_domain(message.spiffe_id)
            bundles = {_trust_domain(name): _der_bundle(name, der) for name, der in response.federated_bundles.items()}
            bundles[own] = _der_bundle(message.spiffe_id, message.bundle)
            chain, key = parse_svid_der(message.x509_svid, message.x509_svid_key)
            with self._lock:
                jwt_bundles = self._jwt_bundles or {}
            svid = validate_local_svid(chain, key, TrustBundles(bundles, jwt_bundles), now=self._clock())
            if svid.spiffe_id != message.spiffe_id:
                raise LocalIdentityError(
                    SvidDetail.SVID_INVALID_SPIFFE_ID,
                    f"the response names {message.spiffe_id}, the certificate {svid.spiffe_id}",
                )
        except (LocalIdentityError, BundleError) as exc:
            self._rejected(_X509, exc)
            return
        with self._cond:
            self._svid, self._x509_bundles = svid, bundles
            self._problems.pop(_X509, None)
            published = self._publish()
        _log.info("identity_updated", spiffe_id=svid.spiffe_id, serial=svid.serial)
        if published:
            self._deliver_latest()

    def _jwt(self, response: Any) -> None:
        try:
            bundles: dict[str, Mapping[str, PublicKeyTypes]] = {}
            for name, data in response.bundles.items():
                trust_domain = _trust_domain(name)
                document = parse_bundle_document(data)
                log_ignored(trust_domain, document, source="workload_api")
                bundles[trust_domain] = document.jwt_authorities
        except BundleError as exc:
            self._rejected(_JWT, exc)
            return
        with self._cond:
            self._jwt_bundles = bundles
            self._problems.pop(_JWT, None)
            published = self._publish()
        if published:
            self._deliver_latest()

    def _publish(self) -> bool:
        """A part changed (lock held): make the combined state current; ``False`` while one is missing."""
        state = self._current()
        if state is None:
            return False
        self.state = state
        self._cond.notify_all()
        return True

    def _deliver_latest(self) -> None:
        with self._deliver:
            with self._lock:
                callback, state = self._on_update, self.state
            if callback is None:
                return
            try:
                callback(state)
            except Exception:  # a failing consumer must not end the stream
                _log.exception("identity_update_callback_failed")

    def _rejected(self, what: str, error: LocalIdentityError | BundleError) -> None:
        with self._cond:
            if self._current() is None:  # nothing valid yet: the sidecar must not start
                self._startup_error = f"{what}: {error}"
                self._cond.notify_all()
                return
            self._problems[what] = str(error)
            self._publish()  # the same SVID and bundles, now with the problem attached
            callback = self._on_reject
            if callback is None:
                self._pending.append((error.detail, str(error)))
        _log.error("identity_update_rejected", source="workload_api", part=what, detail=error.detail, error=str(error))
        if callback is not None:
            callback(error.detail, str(error))
        self._deliver_latest()

    # -- public ----------------------------------------------------------------------------------
    def set_callback(self, on_update: Callable[[IdentityState], None], on_reject: Rejected | None = None) -> None:
        """Call ``on_update`` with the current state now and with every later one, ``on_reject`` with
        ``(detail, message)`` of every rejected update (rejections since start are replayed); both
        from a stream thread."""
        with self._lock:
            self._on_update = on_update
            self._on_reject = on_reject
            current = self.state
            pending, self._pending = self._pending, []
        on_update(current)
        if on_reject is not None:
            for detail, message in pending:
                on_reject(detail, message)

    def close(self) -> None:
        """Stop streaming (joins the stream threads)."""
        self._closed.set()
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            call.cancel()
        self._channel.close()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
