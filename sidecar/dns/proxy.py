"""The DNS proxy: every query of the agent (redirected here from port 53, UDP and TCP) is judged first.

For each message (RFC 1035 §4; dnspython reads and writes the wire format, the forwarding is this
module's own asyncio UDP and TCP - dnspython's ``dns.query`` would import an HTTP client for
DNS-over-HTTPS, ~5 MB, whenever one is installed):

1. not a DNS query - shorter than a header, undecodable, a response (``QR`` set), another opcode than
   ``QUERY``, not exactly one question, a name over 255 octets or a label over 63 - is dropped
   (``FORMERR``/``NOTIMP`` when the header could be read), counted (``malformed``) and recorded
   (``bad_request``; at most :data:`JUNK_RECORDS_PER_SECOND` a second, the rest only counted); a
   TCP stream of junk is closed;
2. the name is judged (:func:`~sidecar.policy.names.decide_name`): a refused one is answered
   NXDOMAIN (or REFUSED) with an Extended DNS Error (RFC 8914, ``Blocked``/``Prohibited``, naming the
   decision) when the query has EDNS, recorded and counted (``refused``) - and never forwarded; so is
   an allowed name asked in another class than ``IN`` (``CH``, ``HS``, ``ANY``: ``dns_not_allowed``);
3. an allowed one is forwarded to the pod's resolvers in order as a new query (:func:`_outbound`: the
   question, a fresh id, ``RD``/``CD``/``DO``, the proxy's own EDNS without options - nothing else of
   the agent's message, so EDNS options and extra records carry no data to the resolvers) (UDP
   queries over UDP, on a socket connected to the resolver, TCP ones over TCP; each resolver gets
   ``timeout`` seconds; its first message must answer the question - id, flags, question - else the
   next resolver is asked; a truncated UDP answer is relayed as it is, ``TC`` set), and the
   answer is relayed with the agent's id; its ``A``/``AAAA`` records are remembered for the
   passthrough binding (:class:`~sidecar.dns.answers.AddressBook`). Counted (``allowed``); recorded
   once per name and type per ``dns.allowed_record_interval``. No resolver answering is SERVFAIL
   (``upstream_failed``).

Bounds: 64 KiB a message (TCP's 2-byte length), :data:`MAX_PENDING_UDP` UDP queries in flight (more
are dropped and counted), :data:`MAX_TCP_CONNECTIONS` TCP connections, each closed after
:data:`TCP_IDLE` seconds without a query. Nothing here raises into the event loop: one bad packet
ends only itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import structlog

from sidecar.decision import Decision, Reason
from sidecar.dns.answers import Address, AddressBook
from sidecar.errors import BadRequestError

__all__ = [
    "JUNK_RECORDS_PER_SECOND",
    "MAX_PENDING_UDP",
    "MAX_TCP_CONNECTIONS",
    "OUTCOMES",
    "TCP_IDLE",
    "DnsHooks",
    "DnsProxy",
]

_log = structlog.get_logger("agent_authz.dns")
OUTCOMES = ("allowed", "refused", "malformed", "upstream_failed", "overloaded")
"""What a query comes to: the ``outcome`` label of ``agent_authz_dns_queries``
(:data:`sidecar.metrics.DNS_OUTCOMES`, which a test keeps equal)."""
JUNK_RECORDS_PER_SECOND = 10
MAX_PENDING_UDP = 256
MAX_TCP_CONNECTIONS = 64
TCP_IDLE = 10.0
_HEADER = 12
_MAX_MESSAGE = 65535
_FORWARD_PAYLOAD = 1232
"""The EDNS UDP payload size the proxy asks its resolvers for (the DNS Flag Day 2020 value)."""
_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
_MAX_SAMPLED = 4096


@dataclass(frozen=True)
class DnsHooks:
    """What the proxy asks of the sidecar.

    Attributes:
        judge: ``(name text, qtype, destination) -> Decision`` (allocates the decision id).
        malformed: ``(detail, destination) -> Decision``: the ``bad_request`` deny of something that is no query.
        record: writes a decision record.
        count: counts one query under an outcome of :data:`OUTCOMES`.
    """

    judge: Callable[[str, str, str], Decision]
    malformed: Callable[[str, str], Decision]
    record: Callable[[Decision], object]
    count: Callable[[str], object]


class _Junk(BadRequestError):
    """A message that is no DNS query; ``answer`` is what to send back, if anything."""

    def __init__(self, detail: str, answer: bytes | None = None) -> None:
        super().__init__(detail)
        self.answer = answer


def _original_destination(sock: socket.socket | None) -> str:
    """``SO_ORIGINAL_DST`` of a redirected TCP connection (IPv4), or ``""``."""
    if sock is None or sock.family != socket.AF_INET:
        return ""
    try:
        raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    except OSError:
        return ""
    port, address = struct.unpack_from("!2xH4s", raw)
    return f"{ipaddress.IPv4Address(address)}:{port}"


class DnsProxy:
    """Answers the agent's DNS over UDP and TCP.

    Args:
        upstreams: ``(address, port)`` of the pod's resolvers, asked in order.
        hooks: judging, recording and counting (:class:`DnsHooks`).
        book: where answered addresses are kept.
        timeout: seconds one resolver may take.
        refuse_with: ``nxdomain`` or ``refused``.
        allowed_record_interval: seconds between two records of the same allowed name and type (0: every one).
        clock: POSIX seconds.
    """

    def __init__(
        self,
        upstreams: tuple[tuple[str, int], ...],
        hooks: DnsHooks,
        book: AddressBook,
        *,
        timeout: float = 2.0,
        refuse_with: str = "nxdomain",
        allowed_record_interval: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._upstreams = upstreams
        self._hooks = hooks
        self._book = book
        self._timeout = timeout
        self._refusal = dns.rcode.NXDOMAIN if refuse_with == "nxdomain" else dns.rcode.REFUSED
        self._ede = dns.edns.EDECode.BLOCKED if refuse_with == "nxdomain" else dns.edns.EDECode.PROHIBITED
        self._interval = allowed_record_interval
        self._clock = clock
        self._sampled: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._junk_window = (0.0, 0)
        self._pending_udp = 0
        self._tcp_connections = 0
        self._transports: list[asyncio.DatagramTransport] = []
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self, addresses: list[tuple[str, int]]) -> list[str]:
        """Listen on each ``(host, port)``, UDP and TCP (port 0: a free one, the same for both).

        Returns:
            The bound ``host:port`` of each address.

        Raises:
            OSError: an address cannot be bound.
        """
        bound = []
        for host, port in addresses:
            for attempt in range(10 if port == 0 else 1):  # port 0: UDP's free port may be taken for TCP
                try:
                    bound.append(await self._listen(host, port))
                    break
                except OSError:
                    if attempt == 9 or port != 0:
                        raise
        return bound

    async def _listen(self, host: str, port: int) -> str:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(self), local_addr=(host, port), family=family
        )
        udp_port = transport.get_extra_info("sockname")[1]
        try:
            server = await asyncio.start_server(self._serve_tcp, host, udp_port, family=family, reuse_address=True)
        except OSError:
            transport.close()
            raise
        self._transports.append(transport)
        self._servers.append(server)
        return f"[{host}]:{udp_port}" if ":" in host else f"{host}:{udp_port}"

    async def close(self) -> None:
        """Stop listening; queries in flight are cancelled."""
        for transport in self._transports:
            transport.close()
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- UDP -----------------------------------------------------------------------------------------
    def datagram(self, data: bytes, peer: Any, transport: asyncio.DatagramTransport) -> None:
        """One UDP message: answered in a task of its own (bounded)."""
        if self._pending_udp >= MAX_PENDING_UDP:
            self._hooks.count("overloaded")
            return
        self._pending_udp += 1

        async def run() -> None:
            try:
                answer = await self.answer(data, tcp=False, destination="")
                if answer is not None and not transport.is_closing():
                    transport.sendto(answer, peer)
            finally:
                self._pending_udp -= 1

        self._spawn(run())

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- TCP (RFC 7766: two-byte length, several queries a connection) --------------------------------
    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_connections >= MAX_TCP_CONNECTIONS:
            self._hooks.count("overloaded")
            writer.close()
            return
        self._tcp_connections += 1
        destination = _original_destination(writer.get_extra_info("socket"))
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                    (length,) = struct.unpack("!H", head)
                    data = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
                    return
                answer, junk = await self._answer(data, tcp=True, destination=destination)
                if answer is not None:
                    writer.write(struct.pack("!H", len(answer)) + answer)
                    await writer.drain()
                if junk:
                    return  # the stream is not DNS: answered FORMERR when it could be, then closed
        except (ConnectionError, OSError):
            return
        finally:
            self._tcp_connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- one message ---------------------------------------------------------------------------------
    async def answer(self, data: bytes, *, tcp: bool, destination: str) -> bytes | None:
        """The reply to one message (``None``: send nothing).

        Never raises: junk and resolver failures are answered (or dropped) and counted.
        """
        reply, _ = await self._answer(data, tcp=tcp, destination=destination)
        return reply

    async def _answer(self, data: bytes, *, tcp: bool, destination: str) -> tuple[bytes | None, bool]:
        """The reply, and whether the message was junk (a TCP stream of it is then closed)."""
        try:
            query = self._parse(data)
        except _Junk as junk:
            self._hooks.count("malformed")
            self._record_junk(str(junk), destination)
            return junk.answer, True
        return await self._judged(query, tcp=tcp, destination=destination), False

    async def _judged(self, query: dns.message.Message, *, tcp: bool, destination: str) -> bytes:
        question = query.question[0]
        qtype = dns.rdatatype.to_text(question.rdtype)
        decision = self._hooks.judge(question.name.to_text(omit_final_dot=True), qtype, destination)
        if decision.allow and question.rdclass != dns.rdataclass.IN:
            rdclass = dns.rdataclass.to_text(question.rdclass)
            decision = replace(
                decision,
                allow=False,
                reason=Reason.DNS_NOT_ALLOWED,
                detail=f"class {rdclass}: only IN names resolve",
                dry_run=False,
                would_reason=None,
            )
        if not decision.allow:
            self._hooks.count("refused")
            self._hooks.record(decision)
            return self._refuse(query, decision)
        self._hooks.count("allowed")
        self._sample(decision, qtype)
        response = await self._forward(query, tcp)
        if response is None:
            self._hooks.count("upstream_failed")
            return self._reply(query, dns.rcode.SERVFAIL)
        self._book.remember(decision.host, _addresses(response), self._clock())
        return self._wire(response, query, tcp)

    def _parse(self, data: bytes) -> dns.message.Message:
        if not _HEADER <= len(data) <= _MAX_MESSAGE:
            raise _Junk(f"not a DNS message ({len(data)} bytes)")
        try:
            query = dns.message.from_wire(data)
        except dns.message.ShortHeader:
            raise _Junk("not a DNS message (short header)") from None
        except (dns.exception.DNSException, ValueError, IndexError, UnicodeError, struct.error) as exc:
            raise _Junk(f"not a DNS message ({type(exc).__name__})", self._header_error(data)) from None
        if query.flags & dns.flags.QR:
            raise _Junk("a DNS response, not a query")
        if query.opcode() != dns.opcode.QUERY:
            raise _Junk(f"opcode {dns.opcode.to_text(query.opcode())}", self._reply(query, dns.rcode.NOTIMP))
        if len(query.question) != 1:
            raise _Junk(f"{len(query.question)} questions", self._reply(query, dns.rcode.FORMERR))
        return query

    @staticmethod
    def _header_error(data: bytes) -> bytes | None:
        """FORMERR for a message whose header parses but whose body does not (RFC 1035 §4.1.1)."""
        message_id, flags = struct.unpack_from("!HH", data)
        if flags & 0x8000:
            return None  # a response: never answer one
        return struct.pack("!HHHHHH", message_id, 0x8000 | (flags & 0x7900) | dns.rcode.FORMERR, 0, 0, 0, 0)

    def _reply(self, query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
        response = dns.message.make_response(query)
        response.set_rcode(rcode)
        return bytes(response.to_wire())

    def _refuse(self, query: dns.message.Message, decision: Decision) -> bytes:
        response = dns.message.make_response(query)
        response.set_rcode(self._refusal)
        if query.edns >= 0:
            text = f"agent-authz {decision.reason.value} {decision.decision_id}"
            response.use_edns(0, payload=max(query.payload, 512), options=[dns.edns.EDEOption(self._ede, text)])
        return bytes(response.to_wire())

    def _wire(self, response: dns.message.Message, query: dns.message.Message, tcp: bool) -> bytes:
        response.id = query.id
        limit = _MAX_MESSAGE if tcp else max(query.payload if query.edns >= 0 else 512, 512)
        try:
            return bytes(response.to_wire(max_size=limit))
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC
            return bytes(truncated.to_wire())

    async def _forward(self, query: dns.message.Message, tcp: bool) -> dns.message.Message | None:
        outbound = _outbound(query)
        wire = outbound.to_wire()
        for host, port in self._upstreams:
            try:
                async with asyncio.timeout(self._timeout):
                    data = await (_over_tcp if tcp else _over_udp)(wire, host, port)
                response = dns.message.from_wire(data)
            except (dns.exception.DNSException, OSError, EOFError, ValueError, IndexError, struct.error) as exc:
                _log.debug("dns_upstream_failed", upstream=host, error=type(exc).__name__)
                continue
            if not outbound.is_response(response):  # another id, other flags or another question
                _log.debug("dns_upstream_failed", upstream=host, error="not_the_answer")
                continue
            return response
        return None

    # -- records -------------------------------------------------------------------------------------
    def _sample(self, decision: Decision, qtype: str) -> None:
        """Record an allowed lookup once per name and type per interval (0: always)."""
        now = self._clock()
        key = (decision.host, qtype)
        last = self._sampled.get(key)
        if self._interval and last is not None and now - last < self._interval:
            return
        self._sampled[key] = now
        self._sampled.move_to_end(key)
        while len(self._sampled) > _MAX_SAMPLED:
            self._sampled.popitem(last=False)
        self._hooks.record(decision)

    def _record_junk(self, detail: str, destination: str) -> None:
        """At most :data:`JUNK_RECORDS_PER_SECOND` records a second (a flood is only counted)."""
        second, written = self._junk_window
        now = self._clock()
        if int(now) != second:
            second, written = float(int(now)), 0
        if written < JUNK_RECORDS_PER_SECOND:
            self._hooks.record(self._hooks.malformed(detail, destination))
            written += 1
        self._junk_window = (second, written)


def _addresses(response: dns.message.Message) -> list[tuple[Address, int]]:
    found: list[tuple[Address, int]] = []
    for rrset in response.answer:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            for rdata in rrset:
                with contextlib.suppress(ValueError):
                    found.append((ipaddress.ip_address(rdata.address), rrset.ttl))
    return found


class _Reply(asyncio.DatagramProtocol):
    """The first datagram on a UDP socket connected to one resolver (the kernel drops any other sender's)."""

    def __init__(self) -> None:
        self.message: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.message.done():
            self.message.set_result(data)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable: no resolver there
        if not self.message.done():
            self.message.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.message.done():
            self.message.set_exception(exc or ConnectionError("the socket closed"))


async def _over_udp(wire: bytes, host: str, port: int) -> bytes:
    """Send ``wire`` to ``host:port`` over UDP; the first reply (the caller bounds the wait)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    transport, reply = await asyncio.get_running_loop().create_datagram_endpoint(
        _Reply, remote_addr=(host, port), family=family
    )
    try:
        transport.sendto(wire)
        return await reply.message
    finally:
        transport.close()


async def _over_tcp(wire: bytes, host: str, port: int) -> bytes:
    """Send ``wire`` to ``host:port`` over TCP (RFC 7766 framing); the reply (the caller bounds the wait)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(struct.pack("!H", len(wire)) + wire)
        await writer.drain()
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        return await reader.readexactly(length)
    finally:
        writer.close()


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, proxy: DnsProxy) -> None:
        self._proxy = proxy
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a datagram endpoint's transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self._transport is not None:
            self._proxy.datagram(data, addr, self._transport)

    def error_received(self, exc: Exception) -> None:
        _log.debug("dns_udp_error", error=type(exc).__name__)


def _outbound(query: dns.message.Message) -> dns.message.Message:
    """The query the resolvers get: a new message with the agent's question and nothing else the agent
    chose - a fresh id, the ``RD``/``CD`` flags and the ``DO`` bit kept, EDNS (RFC 6891) with the
    proxy's own payload size and no options, no authority or additional records (an allowed name is
    asked for; the message around it carries no data of the agent's to the resolvers)."""
    question = query.question[0]
    edns = 0 if query.edns >= 0 else -1
    outbound = dns.message.make_query(
        question.name,
        question.rdtype,
        question.rdclass,
        use_edns=edns,
        want_dnssec=bool(query.ednsflags & dns.flags.DO),
        payload=_FORWARD_PAYLOAD,
        id=secrets.randbelow(65536),
    )
    outbound.flags = dns.flags.Flag(query.flags & (dns.flags.RD | dns.flags.CD))
    return outbound
