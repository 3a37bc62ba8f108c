"""The SPIFFE Workload API as an identity source, through py-spiffe.

:class:`WorkloadApiIdentity` keeps an ``X509Source`` (and, when JWT-SVIDs are accepted, a
``JwtSource``) streaming from the agent socket. Each update becomes a new
:class:`~sidecar.identity.state.IdentityState`, handed to ``on_update`` - rotation needs no restart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog
from spiffe import JwtSource, X509Source
from spiffe.errors import PySpiffeError

from sidecar.errors import AgentAuthzError, ErrorCode
from sidecar.identity.bundles import TrustBundles
from sidecar.identity.state import IdentityState, svid_from_chain

__all__ = ["WorkloadApiError", "WorkloadApiIdentity"]

_log = structlog.get_logger("agent_authz.identity")


class WorkloadApiError(AgentAuthzError):
    """The Workload API did not deliver an identity."""

    code = ErrorCode.IDENTITY_UNAVAILABLE


class WorkloadApiIdentity:
    """A live identity from the Workload API.

    Args:
        socket: ``unix:///path`` of the SPIRE agent.
        timeout: seconds to wait for the first SVID and bundles.
        with_jwt: also stream JWT bundles (for JWT-SVIDs on ingress).
        on_update: called (from a py-spiffe thread) with each new state.

    Raises:
        WorkloadApiError: nothing arrived within ``timeout``, or the answer was unusable.
    """

    def __init__(
        self,
        socket: str,
        *,
        timeout: float,
        with_jwt: bool,
        on_update: Callable[[IdentityState], None] | None = None,
    ) -> None:
        self._on_update = on_update
        self._lock = threading.Lock()
        try:
            self._x509 = X509Source(socket_path=socket, timeout_in_seconds=timeout)
        except PySpiffeError as exc:
            raise WorkloadApiError(f"no X.509-SVID from {socket}: {exc}") from None
        self._jwt: JwtSource | None = None
        if with_jwt:
            try:
                self._jwt = JwtSource(socket_path=socket, timeout_in_seconds=timeout)
            except PySpiffeError as exc:
                self._x509.close()
                raise WorkloadApiError(f"no JWT bundles from {socket}: {exc}") from None
        self.state = self._read()
        self._x509.subscribe_for_updates(self._changed)
        if self._jwt is not None:
            self._jwt.subscribe_for_updates(self._changed)

    def _read(self) -> IdentityState:
        svid = self._x509.svid
        try:
            own = svid_from_chain(list(svid.cert_chain), svid.private_key)
        except ValueError as exc:
            raise WorkloadApiError(f"unusable X.509-SVID: {exc}") from None
        x509_bundles = {str(b.trust_domain): tuple(b.x509_authorities) for b in self._x509.bundles}
        jwt_bundles = (
            {str(b.trust_domain): dict(b.jwt_authorities) for b in self._jwt.bundles} if self._jwt is not None else {}
        )
        return IdentityState(own, TrustBundles(x509_bundles, jwt_bundles), "workload_api")

    def _changed(self) -> None:
        try:
            with self._lock:
                self.state = state = self._read()
                callback = self._on_update
        except (WorkloadApiError, PySpiffeError) as exc:
            _log.error("identity_update_failed", error=str(exc))
            return
        _log.info("identity_updated", spiffe_id=state.svid.spiffe_id, serial=state.svid.serial)
        if callback is not None:
            callback(state)

    def set_callback(self, on_update: Callable[[IdentityState], None]) -> None:
        """Call ``on_update`` with the current state now and with every later one (from a py-spiffe thread)."""
        with self._lock:
            self._on_update = on_update
            current = self.state
        on_update(current)

    def close(self) -> None:
        """Stop streaming."""
        self._x509.close()
        if self._jwt is not None:
            self._jwt.close()
