"""What the DNS proxy adds to a lookup: an allowed name (forwarded) and a refused one (answered at once).

Run: ``.venv/bin/python bench/dns_proxy.py [--queries N]``

One DNS proxy (:class:`sidecar.dns.proxy.DnsProxy`, on uvloop in a thread, deciding through a real
:class:`~sidecar.runtime.Runtime`) in front of a minimal upstream resolver (dnspython, a fixed
answer, in a thread of its own). A dnspython client sends ``--queries`` ``A`` queries over UDP, one
at a time, for three targets: the upstream directly (what the lookup costs without the proxy), an
allowed name through the proxy (judged, forwarded, answer relayed and remembered), and a refused
name (judged, answered NXDOMAIN with an Extended DNS Error, recorded). Prints p50 / p90 / p99 in
microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import threading
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rrset
import yaml

from sidecar.decision import Decision
from sidecar.dns.proxy import DnsHooks, DnsProxy
from sidecar.runtime import Runtime
from sidecar.tokens.keys import generate_private_key_pem

AGENT = "spiffe://bench.example/ns/agents/sa/worker"


def _upstream() -> int:
    """A resolver answering every A query with 10.1.0.1 (UDP, its own thread); returns its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            data, peer = sock.recvfrom(65535)
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)
            reply.answer.append(dns.rrset.from_text(query.question[0].name, 30, "IN", "A", "10.1.0.1"))
            sock.sendto(reply.to_wire(), peer)

    threading.Thread(target=serve, daemon=True).start()
    return int(sock.getsockname()[1])


def _runtime(directory: Path) -> Runtime:
    (directory / "signing.pem").write_bytes(generate_private_key_pem("ES256"))
    config = {
        "agent": AGENT,
        "issuer": {"url": "https://issuer.bench", "signing_key": "signing.pem"},
        "decision_log": {"stdout": True},
        "dns": {},
        "tasks": [
            {
                "id": "t",
                "agent": AGENT,
                "purpose": "bench",
                "ttl": "1h",
                "egress": [{"host": "api.example.com", "methods": ["GET"], "paths": ["*"]}],
            }
        ],
    }
    (directory / "sidecar.yaml").write_text(yaml.safe_dump(config))
    return Runtime(directory / "sidecar.yaml")


def _percentiles(name: str, seconds: list[float]) -> None:
    seconds.sort()
    p50, p90, p99 = (seconds[int(len(seconds) * q)] * 1e6 for q in (0.5, 0.9, 0.99))
    print(f"{name:<32} p50 {p50:7.0f} us   p90 {p90:7.0f} us   p99 {p99:7.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()
    import uvloop

    runtime = _runtime(Path(tempfile.mkdtemp(prefix="aa-bench-dns-")))
    upstream = _upstream()
    ids = iter(range(10**12))
    records: list[Decision] = []

    def judge(name: str, qtype: str, destination: str) -> Decision:
        return runtime.decide_dns(name, qtype, destination, f"d{next(ids)}")

    hooks = DnsHooks(judge, lambda detail, destination: judge("", "A", destination), records.append, lambda _: None)
    loop = uvloop.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    proxy = DnsProxy((("127.0.0.1", upstream),), hooks, runtime.addresses)
    (bound,) = asyncio.run_coroutine_threadsafe(proxy.start([("127.0.0.1", 0)]), loop).result(10)
    port = int(bound.rpartition(":")[2])
    for label, name, target in (
        ("upstream directly", "api.example.com", upstream),
        ("allowed name, through the proxy", "api.example.com", port),
        ("refused name, through the proxy", "evil.example.net", port),
    ):
        query = dns.message.make_query(name, "A")
        seconds = []
        for _ in range(args.queries):
            started = time.perf_counter()
            reply = dns.query.udp(query, "127.0.0.1", port=target, timeout=2)
            seconds.append(time.perf_counter() - started)
        assert reply.rcode() == (dns.rcode.NXDOMAIN if name.startswith("evil") else dns.rcode.NOERROR)
        _percentiles(label, seconds)
    print(f"{len(records)} decision records (every refusal, one sample of the allowed name)")


if __name__ == "__main__":
    main()
