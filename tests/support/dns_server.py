"""A DNS server speaking the real protocol (dnspython), standing in for the pod's resolver or an attacker's.

    python -m tests.support.dns_server --listen ADDR:PORT [--listen ...] --log FILE --ready FILE
        [--zone NAME=IP[,IP...]]... [--ttl SECONDS]

Answers ``A``/``AAAA`` for the zone's names (NXDOMAIN for others) over UDP and TCP, and logs every
message it receives as one JSON line ``{"listener", "transport", "name", "qtype", "raw"}`` (``raw``:
the message in hex when it is no DNS query) - so a test can prove what reached it, and what did not.
:class:`DnsServer` runs the same in a thread (unit tests).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socketserver
import struct
import threading
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

__all__ = ["DnsServer", "answer"]

_lock = threading.Lock()


def answer(data: bytes, zone: dict[str, list[str]], ttl: int, tcp: bool = False) -> tuple[bytes | None, dict[str, Any]]:
    """The reply to ``data`` and what to log about it (over UDP, truncated to what the query takes)."""
    try:
        query = dns.message.from_wire(data)
        question = query.question[0]
    except Exception:
        return None, {"raw": data[:200].hex()}
    name = question.name.to_text(omit_final_dot=True).lower()
    qtype = dns.rdatatype.to_text(question.rdtype)
    response = dns.message.make_response(query)
    addresses = zone.get(name)
    if addresses is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
    else:
        family = 6 if question.rdtype == dns.rdatatype.AAAA else 4
        matching = [a for a in addresses if ipaddress.ip_address(a).version == family]
        if matching and question.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            response.answer.append(dns.rrset.from_text_list(question.name, ttl, "IN", qtype, matching))
    entry = {"name": name, "qtype": qtype}
    try:
        return response.to_wire(max_size=65535 if tcp else 0), entry
    except dns.exception.TooBig:
        response.answer.clear()
        response.flags |= dns.flags.TC
        return response.to_wire(), entry


class DnsServer:
    """UDP and TCP DNS on ``host:port`` (port 0: a free one) in daemon threads.

    Args:
        host / port: where to listen.
        zone: name -> addresses.
        ttl: TTL of the answers.

    Attributes:
        port: the bound port.
        received: what arrived (the log entries).
        messages: the messages as they arrived (wire format).
    """

    def __init__(
        self, host: str, port: int, zone: dict[str, list[str]], ttl: int = 30, log: Path | None = None
    ) -> None:
        self.zone, self.ttl, self.log = zone, ttl, log
        self.received: list[dict[str, Any]] = []
        self.messages: list[bytes] = []
        server = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = server._handle(data, "udp")
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock = self.request
                sock.settimeout(10)
                try:
                    while head := _read(sock, 2):
                        (length,) = struct.unpack("!H", head)
                        data = _read(sock, length)
                        reply = server._handle(data, "tcp") if data is not None else None
                        if reply is None:
                            return
                        sock.sendall(struct.pack("!H", len(reply)) + reply)
                except OSError:
                    return

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        for attempt in range(10):  # port 0: the UDP port may be taken for TCP
            self._udp = socketserver.ThreadingUDPServer((host, port), Udp)
            self.port = self._udp.server_address[1]
            try:
                self._tcp = socketserver.ThreadingTCPServer((host, self.port), Tcp)
                break
            except OSError:
                self._udp.server_close()
                if attempt == 9 or port != 0:
                    raise
        self.listener = f"{host}:{self.port}"
        for item in (self._udp, self._tcp):
            item.daemon_threads = True
            threading.Thread(target=item.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _handle(self, data: bytes, transport: str) -> bytes | None:
        reply, entry = answer(data, self.zone, self.ttl, transport == "tcp")
        entry = {"listener": self.listener, "transport": transport, **entry}
        with _lock:
            self.received.append(entry)
            self.messages.append(data)
            if self.log is not None:
                with self.log.open("a") as out:
                    out.write(json.dumps(entry) + "\n")
        return reply

    def stop(self) -> None:
        for item in (self._udp, self._tcp):
            item.shutdown()
            item.server_close()


def _read(sock: Any, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", action="append", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--zone", action="append", default=[])
    parser.add_argument("--ttl", type=int, default=30)
    args = parser.parse_args()
    zone = {name.lower(): ips.split(",") for name, _, ips in (z.partition("=") for z in args.zone)}
    for address in args.listen:
        host, _, port = address.rpartition(":")
        DnsServer(host, int(port), zone, args.ttl, Path(args.log))
    tmp = Path(args.ready + ".tmp")
    tmp.write_text("ready")
    tmp.replace(args.ready)
    threading.Event().wait()


if __name__ == "__main__":
    main()
