"""The DNS proxy on real sockets: a real upstream resolver (tests.support.dns_server), dnspython clients,
and hostile input - junk, responses, oversized names, floods - that never crashes it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.decision import Decision, Direction, Protocol, Reason
from sidecar.dns.answers import AddressBook
from sidecar.dns.proxy import JUNK_RECORDS_PER_SECOND, DnsHooks, DnsProxy
from sidecar.runtime import Runtime
from tests.support.config import base_config, task, write_config, write_keys
from tests.support.dns_server import DnsServer, answer

ZONE = {
    "api.example.com": ["10.1.0.1", "fd00::1"],
    "svc.default.svc.cluster.local": ["10.96.0.5"],
    "big.example.com": [f"10.2.{i // 250}.{i % 250}" for i in range(200)],
}
TASK = task(
    egress=[
        {"host": "api.example.com", "methods": ["GET"], "paths": ["*"]},
        {"host": "*.files.example.com", "tls": "passthrough"},
        {"host": "big.example.com", "methods": ["GET"], "paths": ["*"]},
    ]
)


@dataclass
class Env:
    proxy: DnsProxy
    port: int
    upstream: DnsServer
    book: AddressBook
    records: list[Decision] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def ask(self, name: str, qtype: str = "A", *, tcp: bool = False, edns: bool = True) -> dns.message.Message:
        query = dns.message.make_query(name, qtype, use_edns=0 if edns else False)
        send = dns.query.tcp if tcp else dns.query.udp
        return send(query, "127.0.0.1", timeout=5, port=self.port)

    def forwarded(self) -> list[str]:
        return [r.get("name", "") for r in self.upstream.received]


class _Loop:
    """An event loop in a thread (the proxy's), so blocking clients can talk to it from the test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def _env(
    tmp_path: Path,
    refuse_with: str = "nxdomain",
    upstreams: tuple[tuple[str, int], ...] | None = None,
    clock: Any = None,
) -> Iterator[Env]:
    write_keys(tmp_path)
    config = base_config(tmp_path, [TASK])
    config["dns"] = {"allow": ["*.cluster.local"], "refuse_with": refuse_with}
    write_config(tmp_path, config)
    runtime = Runtime(tmp_path / "sidecar.yaml")
    upstream = DnsServer("127.0.0.1", 0, ZONE)
    ids = iter(range(10**9))
    env_box: list[Env] = []

    def judge(name: str, qtype: str, destination: str) -> Decision:
        return runtime.decide_dns(name, qtype, destination, f"d{next(ids)}")

    def malformed(detail: str, destination: str) -> Decision:
        return Decision(False, Reason.BAD_REQUEST, 0, f"d{next(ids)}", detail, Direction.EGRESS, protocol=Protocol.DNS)

    def count(outcome: str) -> None:
        env_box[0].counts[outcome] = env_box[0].counts.get(outcome, 0) + 1

    def record(decision: Decision) -> None:
        env_box[0].records.append(decision)

    hooks = DnsHooks(judge, malformed, record, count)
    loop = _Loop()
    proxy = DnsProxy(
        upstreams or (("127.0.0.1", upstream.port),),
        hooks,
        runtime.addresses,
        timeout=1.0,
        refuse_with=refuse_with,
        **({"clock": clock} if clock is not None else {}),
    )
    (bound,) = loop.run(proxy.start([("127.0.0.1", 0)]))
    env_box.append(Env(proxy, int(bound.rpartition(":")[2]), upstream, runtime.addresses))
    try:
        yield env_box[0]
    finally:
        loop.run(proxy.close())
        loop.stop()
        upstream.stop()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from _env(tmp_path)


def test_an_allowed_name_is_answered_by_the_pods_resolver(env: Env) -> None:
    reply = env.ask("api.example.com")
    assert reply.rcode() == dns.rcode.NOERROR and [r.to_text() for r in reply.answer[0]] == ["10.1.0.1"]
    assert env.ask("api.example.com", "AAAA", tcp=True).answer[0][0].to_text() == "fd00::1"
    assert env.forwarded() == ["api.example.com", "api.example.com"]
    assert {str(a) for a in env.book.addresses("api.example.com", 0)} == {"10.1.0.1", "fd00::1"}
    (first, aaaa) = env.records  # one record per name and type in the interval
    assert (first.allow, first.host, first.qtype, first.protocol, first.rule) == (
        True,
        "api.example.com",
        "A",
        Protocol.DNS,
        "egress[0]",
    )
    assert aaaa.qtype == "AAAA"
    env.ask("api.example.com")
    assert len(env.records) == 2 and env.counts["allowed"] == 3


@pytest.mark.parametrize(
    "name", ["ApI.eXaMpLe.CoM", "api.example.com.", "x.files.example.com", "svc.default.svc.cluster.local"]
)
def test_every_spelling_and_kind_of_an_allowed_name_resolves(env: Env, name: str) -> None:
    reply = env.ask(name)
    assert reply.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)  # forwarded: the resolver answered
    assert env.forwarded() == [name.lower().removesuffix(".")]


@pytest.mark.parametrize(
    "name",
    [
        "evil.example.net",
        "c2VjcmV0LWRhdGE.exfil.attacker.test",  # data in a name: the classic channel
        "files.example.com",  # *.suffix is not the suffix itself
        "api.example.com.evil.test",
        "1.0.77.10.in-addr.arpa",
    ],
)
def test_a_name_outside_the_task_is_refused_recorded_and_never_forwarded(env: Env, name: str) -> None:
    reply = env.ask(name, "TXT")
    assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer
    (ede,) = [o for o in reply.options if isinstance(o, dns.edns.EDEOption)]
    (record,) = env.records
    assert ede.code == dns.edns.EDECode.BLOCKED and ede.text == f"agent-authz dns_not_allowed {record.decision_id}"
    assert (record.allow, record.reason, record.host, record.qtype) == (
        False,
        Reason.DNS_NOT_ALLOWED,
        name.lower(),
        "TXT",
    )
    assert env.forwarded() == [] and env.counts == {"refused": 1}


def test_refused_is_an_option(tmp_path: Path) -> None:
    for env in _env(tmp_path, refuse_with="refused"):
        reply = env.ask("evil.example.net", edns=False)
        assert reply.rcode() == dns.rcode.REFUSED and reply.edns < 0  # no EDNS asked, none answered
        assert env.ask("evil.example.net").options[0].code == dns.edns.EDECode.PROHIBITED


def _raw_name(labels: list[bytes]) -> bytes:
    return b"".join(struct.pack("!B", len(label)) + label for label in labels) + b"\0"


def _query_wire(qname: bytes, qdcount: int = 1, flags: int = 0x0100) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, qdcount, 0, 0, 0) + qname * max(qdcount, 1) + struct.pack("!HH", 1, 1)


def _udp(env: Env, data: bytes, timeout: float = 1.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(data, ("127.0.0.1", env.port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


@pytest.mark.parametrize(
    ("data", "answered"),
    [
        (b"", False),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),  # a readable header, then garbage: FORMERR
        (_query_wire(_raw_name([b"a" * 64, b"com"])), True),  # a label over 63 octets
        (_query_wire(_raw_name([b"a" * 63] * 5)), True),  # a name over 255 octets
        (_query_wire(_raw_name([b"api", b"example", b"com"]), qdcount=2), True),  # two questions
        (_query_wire(_raw_name([b"api", b"example", b"com"]), flags=0x8180), False),  # a response: never answered
        (_query_wire(_raw_name([b"api", b"example", b"com"]), flags=0x2900), True),  # opcode UPDATE: NOTIMP
        (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01", True),  # a pointer loop
    ],
)
def test_what_is_not_a_dns_query_is_dropped_and_recorded(env: Env, data: bytes, answered: bool) -> None:
    reply = _udp(env, data)
    assert (reply is not None) == answered, reply
    if reply is not None:
        assert dns.message.from_wire(reply).rcode() in (dns.rcode.FORMERR, dns.rcode.NOTIMP)
    assert env.forwarded() == [] and env.counts == {"malformed": 1}
    (record,) = env.records
    assert (record.reason, record.protocol, record.allow) == (Reason.BAD_REQUEST, Protocol.DNS, False)
    assert env.ask("api.example.com").answer  # and the proxy still answers


def test_a_name_carrying_odd_bytes_is_not_a_host_name(env: Env) -> None:
    for labels in ([b"api:80", b"example", b"com"], [b"a\x00b", b"example", b"com"], [b"a b", b"com"]):
        reply = dns.message.from_wire(_udp(env, _query_wire(_raw_name(labels))) or b"")
        assert reply.rcode() == dns.rcode.NXDOMAIN
    assert env.forwarded() == [] and all(r.detail == "not a host name" for r in env.records)


def test_junk_records_are_capped_but_all_counted(tmp_path: Path) -> None:
    """A flood of junk within one second: every packet counted, at most JUNK_RECORDS_PER_SECOND recorded."""
    for env in _env(tmp_path, clock=lambda: 1_800_000_000.5):
        for _ in range(3 * JUNK_RECORDS_PER_SECOND):
            assert _udp(env, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") is not None  # FORMERR: processed
        assert env.counts == {"malformed": 3 * JUNK_RECORDS_PER_SECOND}
        assert len(env.records) == JUNK_RECORDS_PER_SECOND


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=0, max_size=600))
def test_no_bytes_crash_the_proxy(env: Env, data: bytes) -> None:
    """Any bytes, over UDP and as a TCP stream: whatever happens to them, the next query is answered."""
    _udp(env, data, timeout=0.05)
    with socket.create_connection(("127.0.0.1", env.port), timeout=2) as sock:
        sock.sendall(data)
    assert env.ask("api.example.com").answer


def test_a_tcp_stream_of_junk_is_closed(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as sock:
        sock.sendall(struct.pack("!H", 40) + b"\xee" * 40)
        assert sock.recv(100) == b""  # closed, nothing answered
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as sock:
        sock.sendall(struct.pack("!H", 65535) + b"x" * 10)  # a length it will never get
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""
    assert env.counts.get("malformed") == 1 and env.forwarded() == []


def test_several_queries_on_one_tcp_connection(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as sock:
        for name in ("api.example.com", "evil.example.net", "api.example.com"):
            wire = dns.message.make_query(name, "A").to_wire()
            sock.sendall(struct.pack("!H", len(wire)) + wire)
            (length,) = struct.unpack("!H", sock.recv(2))
            reply = dns.message.from_wire(sock.recv(length))
            assert reply.rcode() == (dns.rcode.NXDOMAIN if name.startswith("evil") else dns.rcode.NOERROR)


def test_no_resolver_is_servfail(tmp_path: Path) -> None:
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))  # bound, never answering
    try:
        for env in _env(tmp_path, upstreams=(("127.0.0.1", dead.getsockname()[1]),)):
            assert env.ask("api.example.com").rcode() == dns.rcode.SERVFAIL
            assert env.counts == {"allowed": 1, "upstream_failed": 1}
    finally:
        dead.close()


def test_an_answer_larger_than_the_client_takes_is_truncated(env: Env) -> None:
    """200 addresses do not fit 512 bytes: truncated over UDP (TC), whole over TCP (RFC 1035 §4.2.1)."""
    query = dns.message.make_query("big.example.com", "A", use_edns=False)
    small = dns.query.udp(query, "127.0.0.1", timeout=5, port=env.port, raise_on_truncation=False)
    assert small.flags & dns.flags.TC
    whole = env.ask("big.example.com", tcp=True)
    assert len(whole.answer[0]) == 200 and len(env.book.addresses("big.example.com", 0)) == 64  # bounded


def test_an_allowed_query_reaches_the_resolver_as_its_question_only(env: Env) -> None:
    """The message around an allowed name carries nothing of the agent's to the resolvers: its EDNS
    options (1 KiB in a private option here) and its authority and additional records are not forwarded;
    the question, RD and the DO bit are."""
    secret = b"SECRET-" + b"x" * 1000
    query = dns.message.make_query(
        "api.example.com", "A", use_edns=0, want_dnssec=True, options=[dns.edns.GenericOption(65001, secret)]
    )
    query.additional.append(dns.rrset.from_text("carrier.", 0, "IN", "TXT", '"EXFIL-IN-ADDITIONAL"'))
    query.authority.append(dns.rrset.from_text("carrier.", 0, "IN", "TXT", '"EXFIL-IN-AUTHORITY"'))
    reply = dns.query.udp(query, "127.0.0.1", timeout=5, port=env.port)
    assert [r.to_text() for rrset in reply.answer for r in rrset] == ["10.1.0.1"]
    (forwarded,) = env.upstream.messages
    assert not [m for m in (b"SECRET-", b"EXFIL-IN-ADDITIONAL", b"EXFIL-IN-AUTHORITY") if m in forwarded]
    sent = dns.message.from_wire(forwarded)
    assert (list(sent.options), sent.authority, sent.additional) == ([], [], [])
    assert sent.id != query.id and sent.flags & dns.flags.RD and sent.ednsflags & dns.flags.DO
    assert sent.payload == 1232 and sent.question == query.question


@pytest.mark.parametrize("rdclass", ["CH", "HS", "ANY"])
def test_an_allowed_name_in_another_class_is_refused_and_recorded_as_a_deny(env: Env, rdclass: str) -> None:
    query = dns.message.make_query("api.example.com", "TXT", rdclass=rdclass, use_edns=0)
    reply = dns.query.udp(query, "127.0.0.1", timeout=5, port=env.port)
    assert reply.rcode() == dns.rcode.NXDOMAIN and env.upstream.messages == []
    (record,) = env.records
    assert (record.allow, record.reason) == (False, Reason.DNS_NOT_ALLOWED)
    assert record.detail == f"class {rdclass}: only IN names resolve" and env.counts == {"refused": 1}


def _udp_and_tcp_on_one_port(attempts: int = 50) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket bound to the same free port of 127.0.0.1 (a free UDP port may be taken
    for TCP by another process: then another port)."""
    for _ in range(attempts):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        try:
            tcp = socket.create_server(("127.0.0.1", udp.getsockname()[1]))
        except OSError:
            udp.close()
            continue
        return udp, tcp
    raise RuntimeError(f"no port free for both UDP and TCP in {attempts} attempts")


class _Liar:
    """A resolver on UDP and TCP (one port) whose every reply is ``lie(query, honest reply)``; ``None``
    sends nothing (UDP) or closes the connection (TCP)."""

    def __init__(self, lie: Any) -> None:
        self.udp, self.tcp = _udp_and_tcp_on_one_port()
        self.port = self.udp.getsockname()[1]
        self.lie = lie
        self.received: list[str] = []
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    def _reply(self, data: bytes, transport: str) -> bytes | None:
        self.received.append(transport)
        query = dns.message.from_wire(data)
        honest, _ = answer(data, ZONE, 30, transport == "tcp")
        assert honest is not None
        lied: bytes | None = self.lie(query, dns.message.from_wire(honest))
        return lied

    def _serve_udp(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                data, peer = self.udp.recvfrom(65535)
                reply = self._reply(data, "udp")
                if reply is not None:
                    self.udp.sendto(reply, peer)

    def _serve_tcp(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.tcp.accept()
                with conn:
                    (length,) = struct.unpack("!H", conn.recv(2))
                    reply = self._reply(conn.recv(length), "tcp")
                    if reply is not None:
                        conn.sendall(struct.pack("!H", len(reply)) + reply)

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


def _wrong_id(query: dns.message.Message, reply: dns.message.Message) -> bytes:
    reply.id = (query.id + 1) % 65536
    return bytes(reply.to_wire())


def _wrong_question(query: dns.message.Message, reply: dns.message.Message) -> bytes:
    other = dns.message.make_query("evil.example.net", "A")
    other.id, other.flags = reply.id, reply.flags
    other.answer.append(dns.rrset.from_text("evil.example.net.", 30, "IN", "A", "203.0.113.66"))
    return bytes(other.to_wire())


def _not_dns(query: dns.message.Message, reply: dns.message.Message) -> bytes:
    return struct.pack("!H", query.id) + b"\xff" * 40


def _silent(query: dns.message.Message, reply: dns.message.Message) -> None:
    return None


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("lie", [_wrong_id, _wrong_question, _not_dns, _silent])
def test_a_resolver_message_that_does_not_answer_the_question_is_not_relayed(
    tmp_path: Path, lie: Any, tcp: bool
) -> None:
    """Its first message decides: not the answer (another id, another question, no DNS) - or none within
    the timeout - and the next resolver is asked; with none left, SERVFAIL."""
    liar = _Liar(lie)
    try:
        for env in _env(tmp_path, upstreams=(("127.0.0.1", liar.port),)):
            upstream = env.upstream.port
            reply = env.ask("api.example.com", tcp=tcp)
            assert reply.rcode() == dns.rcode.SERVFAIL and reply.answer == []
            assert env.counts == {"allowed": 1, "upstream_failed": 1}
            assert liar.received == ["tcp" if tcp else "udp"]
            env.proxy._upstreams = (("127.0.0.1", liar.port), ("127.0.0.1", upstream))
            reply = env.ask("api.example.com", tcp=tcp)
            assert [r.to_text() for r in reply.answer[0]] == ["10.1.0.1"]  # from the second resolver
            assert env.forwarded() == ["api.example.com"] and len(liar.received) == 2
            assert {str(a) for a in env.book.addresses("api.example.com", 0)} == {"10.1.0.1"}
    finally:
        liar.close()


def test_the_resolvers_are_asked_in_order_past_one_that_is_not_there(tmp_path: Path) -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: UDP gets ICMP port unreachable, TCP a refused connection
    for env in _env(tmp_path):
        env.proxy._upstreams = (("127.0.0.1", port), ("127.0.0.1", env.upstream.port))
        assert env.ask("api.example.com").answer[0][0].to_text() == "10.1.0.1"
        assert env.ask("api.example.com", tcp=True).answer[0][0].to_text() == "10.1.0.1"
        assert env.counts == {"allowed": 2}


def test_a_truncated_answer_of_the_resolver_is_relayed_truncated(tmp_path: Path) -> None:
    """Over UDP the proxy relays what the resolver sent, TC set: the agent retries over TCP itself."""

    def truncated(query: dns.message.Message, reply: dns.message.Message) -> bytes:
        reply.answer.clear()
        reply.flags |= dns.flags.TC
        return bytes(reply.to_wire())

    liar = _Liar(truncated)
    try:
        for env in _env(tmp_path, upstreams=(("127.0.0.1", liar.port),)):
            query = dns.message.make_query("api.example.com", "A", use_edns=0)
            reply = dns.query.udp(query, "127.0.0.1", timeout=5, port=env.port, raise_on_truncation=False)
            assert reply.flags & dns.flags.TC and reply.answer == [] and reply.id == query.id
            assert liar.received == ["udp"] and env.counts == {"allowed": 1}
    finally:
        liar.close()
