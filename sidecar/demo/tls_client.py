"""An HTTPS client with a client certificate (an mTLS caller), for the demo and the tests."""

from __future__ import annotations

import http.client
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

__all__ = ["TlsReply", "mtls_request"]


@dataclass
class TlsReply:
    """What a TLS client saw: a response, or the handshake failure.

    Attributes:
        status: HTTP status, or ``None`` when the handshake failed.
        headers: lower-case response headers.
        body: response body.
        handshake_error: why the handshake failed, or ``None``.
        server_serial: serial number (hex) of the certificate the server presented.
    """

    status: int | None
    headers: dict[str, str]
    body: bytes
    handshake_error: str | None
    server_serial: str | None

    @property
    def reason(self) -> str | None:
        """``x-agent-authz-reason`` of a deny."""
        return self.headers.get("x-agent-authz-reason")


def mtls_request(
    port: int,
    ca_file: Path,
    client: tuple[Path, Path] | None,
    path: str = "/",
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> TlsReply:
    """One HTTPS request to ``127.0.0.1:port`` presenting ``client`` = (cert, key) if given.

    The server certificate is verified against ``ca_file`` (the chain only: SVIDs carry no DNS name,
    their identity is the SPIFFE ID in the URI SAN).
    """
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.check_hostname = False
    if client is not None:
        ctx.load_cert_chain(str(client[0]), str(client[1]))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        sock = conn.sock
        der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        serial = format(x509.load_der_x509_certificate(der).serial_number, "x") if der else None
        return TlsReply(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read(), None, serial
        )
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        return TlsReply(None, {}, b"", f"{type(exc).__name__}: {exc}", None)
    finally:
        conn.close()
