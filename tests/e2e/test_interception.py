"""Transparent interception in real network namespaces: iptables, Envoy's outbound and inbound listeners.

A "pod" namespace (10.77.0.1) holds the agent (UID 1000: plain ``curl`` or Python, no proxy
settings, no token), the agent's own app (UID 1000, ports 8080 and 8081) and Envoy plus the sidecar
(proxy UID 1337); ``agent-authz iptables`` is installed there as the init step would. An
"upstream" namespace joined by a veth pair serves HTTP on 10.77.0.2:80 and HTTPS on 10.77.0.2:443
(its own test CA), an echo server on 10.77.0.2:9000, and an "attacker" HTTP server on 10.77.0.3:80.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.harness import AuthzStack
from sidecar.identity.devca import DevCA
from sidecar.simulation.netns import (
    AGENT_UID,
    ATTACKER_IP,
    POD_IP,
    PROXY_UID,
    UPSTREAM_IP,
    UPSTREAM_IP6,
    PodNetwork,
    as_user,
    chown_tree,
)
from tests.support.certs import make_leaf, write_pair
from tests.support.config import AGENT, PLANNER, add_file_identity, base_config, task, write_config, write_keys
from tests.support.netns_pod import Pod, pod_sandbox, start_servers, token_claims

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="interception tests need root (network namespaces, iptables)"),
]

REPO = Path(__file__).resolve().parents[2]
API = "api.example.com"
SECURE = "secure.example.com"
VAULT = "vault.example.com"
OUTBOUND_PORT, INBOUND_PORT, EGRESS_PORT, ADMIN_PORT = 15001, 15006, 15080, 15000
APP_PORT, PROBE_PORT = 8080, 8081
TASK = task(
    "work",
    egress=[
        {"name": "api-read", "host": API, "methods": ["GET"], "paths": ["/v1/items/*"], "scope": "items:read"},
        {"name": "secure-tls", "host": SECURE, "tls": "passthrough"},
        {"name": "vault", "host": VAULT, "methods": ["GET"], "paths": ["/v1/*"], "tls": "originate"},
    ],
)
IPTABLES = [sys.executable, "-m", "sidecar", "iptables", "--exclude-inbound-ports", str(PROBE_PORT)]


def _config(state: Path, public: Path) -> Path:
    write_keys(state)
    # SECURE's pin is an address of its name: a passthrough connection must go there (no DNS in this pod)
    destinations = {API: f"{UPSTREAM_IP}:80", VAULT: f"{UPSTREAM_IP}:80", SECURE: f"{UPSTREAM_IP}:443"}
    config = base_config(state, [TASK], destinations)
    add_file_identity(state, config)
    config["listen"]["admin"] = "127.0.0.1:9902"
    config["envoy"].update(
        egress_port=EGRESS_PORT,
        admin_port=ADMIN_PORT,
        outbound_port=OUTBOUND_PORT,
        ingress_address="0.0.0.0",
        ingress_port=INBOUND_PORT,
        inbound_redirect=True,
        local_app=f"127.0.0.1:{APP_PORT}",
        upstream_ca=str(public / "upstream-ca" / "bundle.pem"),
    )
    config["ingress"] = {
        "rules": [{"name": "planner", "callers": [{"id": PLANNER}], "methods": ["GET"], "paths": ["/v1/status"]}]
    }
    return write_config(state, config)


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    for uid in (PROXY_UID, AGENT_UID):
        probe = subprocess.run([*as_user(uid), sys.executable, "-c", "import sidecar"], capture_output=True, timeout=30)
        assert probe.returncode == 0, f"UID {uid} cannot run {sys.executable} from {REPO}: {probe.stderr[-500:]!r}"
    with pod_sandbox("aa-ns-") as sandbox:
        net = sandbox.net
        state, public, logs, app_dir = (sandbox.dir(name) for name in ("state", "public", "up", "app"))
        upstream_ca = DevCA.create("upstream.test")
        upstream_ca.save(public / "upstream-ca")
        cert, key = write_pair(logs, "upstream", *make_leaf(upstream_ca, [], dns=[SECURE, VAULT, "evil.example.com"]))
        sandbox.keep(
            start_servers(
                "upstream",
                logs,
                net.exec_in(net.upstream, []),
                *("--http", f"{UPSTREAM_IP}:80", "--http", f"{ATTACKER_IP}:80", "--https", f"{UPSTREAM_IP}:443"),
                *("--tcp", f"{UPSTREAM_IP}:9000", "--cert", str(cert), "--key", str(key)),
            )
        )
        config = _config(state, public)
        chown_tree(app_dir, AGENT_UID)
        with net.inside():
            sandbox.keep(
                start_servers(
                    "app", app_dir, as_user(AGENT_UID), "--http", f"0.0.0.0:{APP_PORT}", "--http", "0.0.0.0:8081"
                )
            )
            subprocess.run(IPTABLES, check=True, capture_output=True, timeout=30)  # the init step, as root
            chown_tree(state, PROXY_UID)
            stack = sandbox.keep(AuthzStack(config, state, run_as=as_user(PROXY_UID)))
            stack.start()
            cas = DevCA.load(state / "cas" / "test.example")
            planner = write_pair(logs, "planner", *make_leaf(cas, [PLANNER]))
            yield Pod(net, state, public, stack, logs / "upstream.log", app_dir / "app.log", planner)


def test_allowed_http_call_arrives_with_the_minted_token(pod: Pod) -> None:
    reply = pod.curl(f"http://{API}/v1/items/1", "--resolve", f"{API}:80:{UPSTREAM_IP}")
    assert reply.status == 200, reply
    (received,) = pod.upstream(path="/v1/items/1")
    assert received["listener"] == f"http {UPSTREAM_IP}:80" and received["peer"] == POD_IP
    claims = token_claims(pod, received["headers"]["authorization"], f"http://{API}")
    assert claims["txn"] == "work" and claims["act"] == {"sub": AGENT} and claims["scope"] == "items:read"
    record = pod.record(decision_id=reply.headers["x-agent-authz-decision-id"])
    assert (record["decision"], record["protocol"], record["destination"]) == ("allow", "http", f"{UPSTREAM_IP}:80")


def test_disallowed_http_call_gets_403(pod: Pod) -> None:
    reply = pod.curl(f"http://{API}/v1/admin", "--resolve", f"{API}:80:{UPSTREAM_IP}")
    assert (reply.status, reply.headers["x-agent-authz-reason"]) == (403, "path_not_allowed")
    assert pod.upstream(path="/v1/admin") == []


def test_a_call_is_judged_and_routed_by_the_host_the_agent_named(pod: Pod) -> None:
    """Another IP with ``Host: api.example.com``: allowed as api.example.com, and sent there - never to that IP."""
    reply = pod.curl(f"http://{ATTACKER_IP}/v1/items/2", "-H", f"Host: {API}")
    assert reply.status == 200, reply
    (received,) = pod.upstream(path="/v1/items/2")
    assert received["listener"] == f"http {UPSTREAM_IP}:80"
    assert received["headers"]["authorization"].startswith("Bearer ")
    assert pod.upstream(listener=f"http {ATTACKER_IP}:80") == []
    record = pod.record(decision_id=reply.headers["x-agent-authz-decision-id"])
    assert (record["host"], record["destination"]) == (API, f"{ATTACKER_IP}:80")
    # and the allowed host's own IP with another name is judged on that name
    other = pod.curl(f"http://{UPSTREAM_IP}/v1/items/3", "-H", "Host: evil.example.com")
    assert (other.status, other.headers["x-agent-authz-reason"]) == (403, "host_not_allowed")
    assert pod.upstream(path="/v1/items/3") == []


def test_tls_originate_injects_the_token_and_encrypts(pod: Pod) -> None:
    reply = pod.curl(f"http://{VAULT}/v1/secret", "--resolve", f"{VAULT}:80:{UPSTREAM_IP}")
    assert reply.status == 200, reply
    (received,) = pod.upstream(path="/v1/secret")
    assert received["listener"] == f"https {UPSTREAM_IP}:443" and received["scheme"] == "https"
    claims = token_claims(pod, received["headers"]["authorization"], f"https://{VAULT}")
    assert claims["txn"] == "work"


def test_tls_passthrough_to_an_allowed_sni(pod: Pod) -> None:
    ca = str(pod.public / "upstream-ca" / "bundle.pem")
    reply = pod.curl(f"https://{SECURE}/hello", "--cacert", ca, "--resolve", f"{SECURE}:443:{UPSTREAM_IP}")
    assert reply.status == 200, reply
    (received,) = pod.upstream(path="/hello")
    assert received["scheme"] == "https" and "authorization" not in received["headers"]
    assert received["peer"] == POD_IP
    record = pod.record(protocol="tls", sni=SECURE)
    assert (record["decision"], record["rule"], record["destination"]) == ("allow", "secure-tls", f"{UPSTREAM_IP}:443")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (
            ["-k", "--resolve", f"evil.example.com:443:{UPSTREAM_IP}", "https://evil.example.com/evil"],
            {
                "sni": "evil.example.com",
                "reason": "host_not_allowed",
            },
        ),
        (["-k", f"https://{UPSTREAM_IP}/no-sni"], {"sni": "", "reason": "no_sni"}),
        (
            ["-k", "--resolve", f"{SECURE}:8443:{UPSTREAM_IP}", f"https://{SECURE}:8443/port"],
            {
                "destination": f"{UPSTREAM_IP}:8443",
                "reason": "port_not_allowed",
            },
        ),
    ],
)
def test_tls_to_another_sni_is_refused_and_logged(pod: Pod, args: list[str], match: dict[str, str]) -> None:
    reply = pod.curl(*args)
    assert reply.exit_code != 0 and reply.status is None, reply
    record = pod.record(protocol="tls", **match)
    assert record["decision"] == "deny" and record["agent"] == AGENT
    assert pod.stack.envoy.stat("ext_authz.outbound_tls.denied") >= 1  # the stat docs/guides/debug-a-deny.md points to
    assert pod.upstream(path=args[-1].rsplit("/", 1)[-1]) == []


RAW_TCP = f"""
import socket
s = socket.create_connection(("{UPSTREAM_IP}", 9000), timeout=10)
s.sendall(b"hello\\n")
try:
    data = s.recv(100)
except ConnectionResetError:
    data = b""
print(repr(data))
"""


def test_raw_tcp_is_refused_and_logged(pod: Pod) -> None:
    assert pod.python(RAW_TCP) == "b''"
    record = pod.record(protocol="tcp", destination=f"{UPSTREAM_IP}:9000")
    assert (record["decision"], record["reason"]) == ("deny", "tcp_not_allowed")
    assert pod.stack.envoy.stat("ext_authz.outbound_tcp.denied") >= 1
    assert pod.upstream(scheme="tcp") == []  # Envoy never even connected upstream


def test_udp_and_ipv6_cannot_bypass_envoy(pod: Pod) -> None:
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try:\n"
        f"    s.sendto(b'x', ('{UPSTREAM_IP}', 9999)); print('sent')\n"
        "except PermissionError:\n"
        "    print('blocked')\n"
        "s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM); s6.settimeout(5)\n"
        "try:\n"
        f"    s6.connect(('{UPSTREAM_IP6}', 9000)); print('connected')\n"
        "except TimeoutError:\n"
        "    print('timeout')\n"
        "except OSError:\n"
        "    print('blocked')\n"
    )
    assert pod.python(code).split() == ["blocked", "blocked"]
    assert pod.upstream(scheme="tcp") == []
    # the upstream is there: the proxy UID is not subject to the UDP rule, IPv6 is blocked for everyone
    assert "AGENT_AUTHZ_BLOCK_OUT" in pod.iptables_save()


def test_envoy_upstream_connections_are_not_redirected(pod: Pod) -> None:
    before = pod.outbound_connections()
    assert pod.curl(f"http://{API}/v1/items/loop", "--resolve", f"{API}:80:{UPSTREAM_IP}").status == 200
    ca = str(pod.public / "upstream-ca" / "bundle.pem")
    assert pod.curl(f"https://{SECURE}/loop", "--cacert", ca, "--resolve", f"{SECURE}:443:{UPSTREAM_IP}").status == 200
    # one listener connection per agent call: Envoy's own upstream connections did not come back
    assert pod.outbound_connections() - before == 2
    assert all(e["peer"] == POD_IP for e in pod.upstream(path="/v1/items/loop") + pod.upstream(path="/loop"))
    # the proxy UID itself is never redirected: it reaches the upstream directly, without a token
    direct = pod.curl(f"http://{UPSTREAM_IP}/proxy-direct", uid=PROXY_UID)
    assert direct.status == 200 and "x-agent-authz-decision-id" not in direct.headers
    (received,) = pod.upstream(path="/proxy-direct")
    assert "authorization" not in received["headers"]


def test_the_agents_local_services_are_not_intercepted(pod: Pod) -> None:
    before = pod.outbound_connections()
    assert pod.curl(f"http://127.0.0.1:{APP_PORT}/local").status == 200
    assert pod.curl(f"http://{POD_IP}:{PROBE_PORT}/own-ip").status == 200
    (local,) = pod.app(path="/local")
    assert local["peer"] == "127.0.0.1" and "x-agent-authz-caller" not in local["headers"]
    assert pod.app(path="/own-ip")
    assert pod.outbound_connections() == before


def test_inbound_is_redirected_to_the_mtls_listener(pod: Pod) -> None:
    assert pod.planner is not None
    cert, key = pod.planner
    ok = pod.from_upstream(
        "curl", "-sS", "-k", "--max-time", "10", "--cert", str(cert), "--key", str(key), "-o", "/dev/null",
        "-H", f"x-agent-authz-inbound-dst: {UPSTREAM_IP}:80",  # forged: the route overwrites it
        "-w", "%{http_code}", f"https://{POD_IP}:{APP_PORT}/v1/status",
    )  # fmt: skip
    assert ok.stdout == "200", ok
    (received,) = pod.app(path="/v1/status")
    assert received["headers"]["x-agent-authz-caller"] == PLANNER
    assert received["peer"] == "127.0.0.1" and received["listener"] == f"http 0.0.0.0:{APP_PORT}"
    record = pod.record(direction="ingress", caller=PLANNER)
    assert record["decision"] == "allow"
    # without a client certificate, or in clear text: no way in
    no_cert = pod.from_upstream("curl", "-sS", "-k", "--max-time", "10", f"https://{POD_IP}:{APP_PORT}/v1/nocert")
    plain = pod.from_upstream("curl", "-sS", "--max-time", "10", f"http://{POD_IP}:{APP_PORT}/v1/plain")
    assert no_cert.returncode != 0 and plain.returncode != 0
    assert pod.app(path="/v1/nocert") == [] and pod.app(path="/v1/plain") == []
    # the excluded probe port reaches the app directly
    probe = pod.from_upstream("curl", "-sS", "--max-time", "10", f"http://{POD_IP}:{PROBE_PORT}/healthz")
    assert probe.returncode == 0, probe
    (health,) = pod.app(path="/healthz")
    assert health["peer"] == UPSTREAM_IP


def test_install_is_idempotent_and_cleanup_restores_direct_connectivity(pod: Pod) -> None:
    installed = pod.iptables_save()
    subprocess.run(IPTABLES, check=True, capture_output=True, timeout=30)
    assert pod.iptables_save().count("AGENT_AUTHZ") == installed.count("AGENT_AUTHZ") > 0
    cleanup = [sys.executable, "-m", "sidecar", "iptables", "--cleanup"]
    try:
        subprocess.run(cleanup, check=True, capture_output=True, timeout=30)
        assert "AGENT_AUTHZ" not in pod.iptables_save()
        reply = pod.curl(f"http://{UPSTREAM_IP}/v1/items/direct")
        assert reply.status == 200 and "x-agent-authz-decision-id" not in reply.headers
        (received,) = pod.upstream(path="/v1/items/direct")
        assert "authorization" not in received["headers"]
        assert pod.python(RAW_TCP) == "b'hello\\n'"
    finally:
        subprocess.run(IPTABLES, check=True, capture_output=True, timeout=30)
    assert pod.iptables_save().count("AGENT_AUTHZ") == installed.count("AGENT_AUTHZ")


@pytest.fixture
def empty_netns() -> Iterator[PodNetwork]:
    """A pod namespace alone (no processes), entered by the test; always deleted."""
    with pod_sandbox("aa-empty-") as sandbox, sandbox.net.inside():
        yield sandbox.net


def _iptables(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "sidecar", "iptables", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, check=False)


def _saved() -> str:
    return subprocess.run(["iptables-save"], capture_output=True, text=True, check=True, timeout=10).stdout + (
        subprocess.run(["ip6tables-save"], capture_output=True, text=True, check=True, timeout=10).stdout
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--outbound-port", "70000"], "--outbound-port: port 70000 is out of range"),
        (["--exclude-outbound-cidrs", "10.0.0.0/8,10.0.0.0/33"], "'10.0.0.0/33' is not a CIDR"),
        (["--proxy-uid", "envoy"], "--proxy-uid: 'envoy' is not a numeric id"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    ],
)
def test_bad_input_installs_nothing(empty_netns: PodNetwork, args: list[str], message: str) -> None:
    result = _iptables(*args)
    assert result.returncode == 2 and message in result.stderr
    assert "AGENT_AUTHZ" not in _saved()


def test_a_failing_ipv6_step_rolls_ipv4_back(empty_netns: PodNetwork, tmp_path: Path) -> None:
    """ip6tables-restore fails (as on a kernel without IPv6 netfilter): IPv4 is left as it was."""
    subprocess.run(["iptables", "-t", "nat", "-N", "KEEP_ME"], check=True, timeout=10)
    subprocess.run(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "7", "-j", "KEEP_ME"], check=True)
    before = _saved()
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "ip6tables-restore").write_text("#!/bin/sh\necho 'ip6tables-restore: no IPv6 here' >&2\nexit 1\n")
    (shim / "ip6tables-restore").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}
    result = _iptables("--ipv6", "same", env=env)
    assert result.returncode == 2 and "no IPv6 here" in result.stderr
    after = _saved()
    assert "AGENT_AUTHZ" not in after and ":KEEP_ME" in after
    # the same chains and rules as before (an empty table may now be listed where none was)
    assert _rules(after) == _rules(before)


def _rules(saved: str) -> list[str]:
    return sorted(line for line in saved.splitlines() if line.startswith("-A") or " - [" in line)


def test_ipv6_same_is_accepted_by_ip6tables_and_cleaned_up(empty_netns: PodNetwork) -> None:
    assert _iptables("--ipv6", "same", "--exclude-outbound-cidrs", "fd00::/8,10.0.0.0/8").returncode == 0
    v6 = subprocess.run(["ip6tables-save"], capture_output=True, text=True, check=True, timeout=10).stdout
    assert "-A AGENT_AUTHZ_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in v6
    assert "-A AGENT_AUTHZ_OUTPUT -d fd00::/8 -j RETURN" in v6 and "10.0.0.0/8" not in v6
    assert "AGENT_AUTHZ_BLOCK" not in v6
    assert _iptables("--ipv6", "block").returncode == 0  # switching modes replaces the IPv6 rules
    v6 = subprocess.run(["ip6tables-save"], capture_output=True, text=True, check=True, timeout=10).stdout
    assert "AGENT_AUTHZ_BLOCK_OUT" in v6 and "AGENT_AUTHZ_REDIRECT" not in v6
    assert _iptables("--cleanup").returncode == 0
    assert "AGENT_AUTHZ" not in _saved()
