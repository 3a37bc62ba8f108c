"""Who is on the other end of a feed connection: the client's X.509-SVID, and the namespace it names.

The feed listener requires a client certificate during the TLS handshake (``CERT_REQUIRED``) and
verifies its chain against the bundle of the cluster's own trust domain only (OpenSSL path
validation, X509-SVID §5.2; a federated trust domain's CA cannot vouch for a feed client). Each
request then re-checks the leaf against the X509-SVID profile
(:func:`~sidecar.identity.x509svid.check_leaf`: one URI SAN with a SPIFFE ID, not a CA, key
usage, validity) and maps its SPIFFE ID to a namespace with the chart's SPIFFE ID template. Only
workloads of the authority's agent namespaces are served: anything else is ``peer_not_allowed``.

A client without a certificate never completes the handshake; the agent holds no SVID private key
(the Workload API socket and the SVID are the sidecar's), so it cannot be a feed client at all.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cryptography import x509

from sidecar.authority.protocol import AuthorityCode, AuthorityError
from sidecar.errors import IdentityError
from sidecar.identity.x509svid import check_leaf

__all__ = ["Peer", "PeerIdentifier", "feed_tls_context", "server_tls_context"]


@dataclass(frozen=True, slots=True)
class Peer:
    """A verified feed client: its SPIFFE ID, the namespace the ID names, and when its SVID expires
    (POSIX seconds; a stream is closed then, and the client reconnects with its rotated SVID)."""

    spiffe_id: str
    namespace: str
    not_after: float = float("inf")


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The public listener's context: TLS >= 1.2 with the serving certificate, no client certificate.

    Raises:
        OSError / ssl.SSLError: unreadable or invalid files.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def feed_tls_context(cert: Path, key: Path, bundle: Path) -> ssl.SSLContext:
    """The feed listener's context: the serving certificate, and a client certificate REQUIRED that
    chains to ``bundle`` (the local trust domain's X.509 authorities).

    Raises:
        OSError / ssl.SSLError: unreadable or invalid files.
    """
    context = server_tls_context(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(bundle))
    return context


class PeerIdentifier:
    """Maps a feed request's client certificate to a :class:`Peer`.

    Args:
        trust_domain: the cluster's trust domain.
        namespace_pattern: matches a SPIFFE ID, group ``namespace`` its namespace.
        namespaces: the namespaces served.
        clock: POSIX seconds.
    """

    def __init__(
        self,
        trust_domain: str,
        namespace_pattern: re.Pattern[str],
        namespaces: Iterable[str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.trust_domain = trust_domain
        self.pattern = namespace_pattern
        self.namespaces = frozenset(namespaces)
        self._clock = clock

    def identify(self, request: web.Request) -> Peer:
        """The verified client of ``request``.

        Raises:
            AuthorityError: ``no_client_certificate`` (401) or ``peer_not_allowed`` (403, naming why).
        """
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise AuthorityError(AuthorityCode.NO_CLIENT_CERTIFICATE, "a client X.509-SVID is required", 401)
        try:
            leaf = x509.load_der_x509_certificate(der)
            spiffe_id, trust_domain = check_leaf(leaf, self._clock())
        except (ValueError, IdentityError) as exc:
            raise AuthorityError(
                AuthorityCode.PEER_NOT_ALLOWED, f"the client certificate is no X.509-SVID ({exc})", 403
            ) from None
        if trust_domain != self.trust_domain:
            raise AuthorityError(AuthorityCode.PEER_NOT_ALLOWED, f"{spiffe_id} is not in {self.trust_domain}", 403)
        match = self.pattern.match(spiffe_id)
        namespace = match.group("namespace") if match else None
        if namespace is None or namespace not in self.namespaces:
            raise AuthorityError(
                AuthorityCode.PEER_NOT_ALLOWED, f"{spiffe_id} names no agent namespace of this authority", 403
            )
        return Peer(spiffe_id, namespace, leaf.not_valid_after_utc.timestamp())
