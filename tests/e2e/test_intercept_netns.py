"""TLS interception in real network namespaces: the agent's own HTTPS, redirected by iptables.

The pod of ``test_interception.py`` (iptables installed as the init step; Envoy and the sidecar as
UID 1337; the agent as UID 1000), with an ``intercept`` section. The agent runs ``curl https://…``
and Python (``httpx``, ``ssl``) with only the injected environment (:func:`agent_trust_env`, no
``-k``, no ``--cacert``, no proxy variables); names resolve through a hosts file of the pod. The
upstream namespace serves HTTPS with its own test CA (trusted by Envoy via ``envoy.upstream_ca``):
10.77.0.2:443 for ``api`` and ``secure``, :8444 a certificate for another name, :8445 one from a CA
nobody trusts.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.harness import AuthzStack, http_get
from sidecar.identity.devca import DevCA
from sidecar.simulation.netns import POD_IP, PROXY_UID, UPSTREAM_IP, as_user, chown_tree
from sidecar.tls_intercept.trust import agent_trust_env
from tests.support.certs import make_leaf, write_pair
from tests.support.config import base_config, task, write_config, write_keys
from tests.support.netns_pod import Pod, pod_sandbox, start_servers, token_claims

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespace tests need root (network namespaces, iptables)"),
]

API = "api.example.com"
SECURE = "secure.example.com"
WRONG = "wrong.example.com"
UNTRUSTED = "untrusted.example.com"
EVIL = "evil.example.com"
KEY = "sk-netns-" + "4e1d" * 8
TASK = task(
    "work",
    egress=[
        {
            "name": "api",
            "host": API,
            "tls": "intercept",
            "methods": ["GET"],
            "paths": ["/v1/items/*"],
            "scope": "items:read",
            "credential": {"header": "x-api-key", "file": "secrets/api.key"},
        },
        {"name": "secure-tls", "host": SECURE, "tls": "passthrough"},
        {"name": "wrong", "host": WRONG, "tls": "intercept", "upstream_port": 8444, "methods": ["GET"], "paths": ["*"]},
        {
            "name": "untrusted",
            "host": UNTRUSTED,
            "tls": "intercept",
            "upstream_port": 8445,
            "methods": ["GET"],
            "paths": ["*"],
        },
    ],
)


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    hosts = {name: UPSTREAM_IP for name in (API, SECURE, WRONG, UNTRUSTED, EVIL)}
    with pod_sandbox("aa-tls-", tools=["openssl"], hosts=hosts) as sandbox:
        net = sandbox.net
        state, public, logs, trust = (sandbox.dir(name) for name in ("state", "public", "up", "trust"))
        upstream_ca, stranger = DevCA.create("upstream.test"), DevCA.create("stranger.test")
        upstream_ca.save(public / "upstream-ca")
        good = write_pair(logs, "good", *make_leaf(upstream_ca, [], dns=[API, SECURE]))
        other_name = write_pair(logs, "other-name", *make_leaf(upstream_ca, [], dns=["other.example.com"]))
        unknown_ca = write_pair(logs, "unknown-ca", *make_leaf(stranger, [], dns=[UNTRUSTED]))
        sandbox.keep(
            start_servers(
                "upstream",
                logs,
                net.exec_in(net.upstream, []),
                *("--https-cert", f"{UPSTREAM_IP}:443", *map(str, good)),
                *("--https-cert", f"{UPSTREAM_IP}:8444", *map(str, other_name)),
                *("--https-cert", f"{UPSTREAM_IP}:8445", *map(str, unknown_ca)),
            )
        )
        write_keys(state)
        (state / "secrets").mkdir()
        (state / "secrets" / "api.key").write_text(KEY + "\n")
        (state / "secrets" / "api.key").chmod(0o600)
        destinations = {h: f"{UPSTREAM_IP}:80" for h in (API, WRONG, UNTRUSTED)} | {SECURE: f"{UPSTREAM_IP}:443"}
        config = base_config(state, [TASK], destinations)  # SECURE's pin binds its passthrough (no DNS here)
        config["listen"]["admin"] = "127.0.0.1:9902"
        config["envoy"].update(
            egress_port=15080,
            admin_port=15000,
            outbound_port=15001,
            upstream_ca=str(public / "upstream-ca" / "bundle.pem"),
        )
        config["intercept"] = {"state_dir": "intercept", "publish_dir": str(trust), "leaf_ttl": "3s"}
        config_path = write_config(state, config)
        with net.inside():
            subprocess.run([sys.executable, "-m", "sidecar", "iptables"], check=True, capture_output=True, timeout=30)
            chown_tree(state, PROXY_UID)
            chown_tree(trust, PROXY_UID)
            stack = sandbox.keep(AuthzStack(config_path, state, run_as=as_user(PROXY_UID)))
            stack.start()
            yield Pod(net, state, public, stack, logs / "upstream.log", agent_env=agent_trust_env(trust))


HTTPX_GET = """
import json, sys, httpx
r = httpx.get(sys.argv[1], timeout=10)   # no proxy, SSL_CERT_FILE from the environment
print(json.dumps({"status": r.status_code, "headers": dict(r.headers), "body": r.text}))
"""


def _httpx(pod: Pod, url: str) -> dict[str, object]:
    return dict(json.loads(pod.python(HTTPX_GET, url)))


def test_allowed_https_call_arrives_with_token_and_key(pod: Pod) -> None:
    reply = pod.curl(f"https://{API}/v1/items/1")
    assert reply.status == 200, reply
    (received,) = pod.upstream(path="/v1/items/1")
    assert received["listener"] == f"https {UPSTREAM_IP}:443" and received["peer"] == POD_IP
    assert received["headers"]["x-api-key"] == KEY
    claims = token_claims(pod, received["headers"]["authorization"], f"https://{API}")
    assert claims["txn"] == "work" and claims["scope"] == "items:read"
    record = pod.record(decision_id=reply.headers["x-agent-authz-decision-id"])
    assert (record["decision"], record["tls"], record["sni"]) == ("allow", "intercept", API)
    assert record["destination"] == f"{UPSTREAM_IP}:443" and record["upstream_verify"].startswith(f"dns:{API} ca:")
    via_httpx = _httpx(pod, f"https://{API}/v1/items/2")
    assert via_httpx["status"] == 200, via_httpx
    (received,) = pod.upstream(path="/v1/items/2")
    assert received["headers"]["x-api-key"] == KEY and received["headers"]["authorization"].startswith("Bearer ")


NODE_GET = """
require("https").get(process.argv[1], (r) => {   // no agent, no ca option: NODE_EXTRA_CA_CERTS
  let body = ""; r.on("data", (c) => (body += c));
  r.on("end", () => console.log(JSON.stringify({status: r.statusCode, headers: r.headers, body})));
}).on("error", (e) => { console.log(JSON.stringify({error: String(e)})); });
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_node_trusts_the_pod_ca_through_node_extra_ca_certs(pod: Pod) -> None:
    argv = pod.as_agent(["node", "-e", NODE_GET, f"https://{API}/v1/items/node"])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=20, env=pod.env(), check=False)
    reply = json.loads(result.stdout or "{}")
    assert reply.get("status") == 200, (reply, result.stderr)
    (received,) = pod.upstream(path="/v1/items/node")
    assert received["headers"]["x-api-key"] == KEY and KEY not in result.stdout


def test_the_agent_never_sees_the_api_key(pod: Pod) -> None:
    reply = _httpx(pod, f"https://{API}/v1/items/key")
    assert reply["status"] == 200 and KEY not in json.dumps(reply)
    (received,) = pod.upstream(path="/v1/items/key")
    assert received["headers"]["x-api-key"] == KEY  # it was injected...
    environ = pod.python("import os, json; print(json.dumps(dict(os.environ)))")
    assert KEY not in environ
    scan = """
import os, sys, json
found, read = [], 0
for top in sys.argv[2:]:
    for root, dirs, files in os.walk(top):
        for name in files:
            try:
                with open(os.path.join(root, name), "rb") as f:
                    data = f.read()
            except OSError:
                continue
            read += 1
            if sys.argv[1].encode() in data:
                found.append(os.path.join(root, name))
print(json.dumps({"found": found, "read": read}))
"""
    # everything the pod has on disk: the sidecar's state (config, logs, Envoy's files) and the trust volume
    outcome = json.loads(pod.python(scan, KEY, str(pod.state), pod.agent_env["SSL_CERT_FILE"].rsplit("/", 1)[0]))
    assert outcome == {"found": [], "read": outcome["read"]} and outcome["read"] > 3, outcome
    assert KEY in (pod.state / "secrets" / "api.key").read_text()  # ...from a file only the proxy user reads


def test_a_disallowed_path_gets_403_inside_tls(pod: Pod) -> None:
    reply = pod.curl(f"https://{API}/v1/admin")
    assert (reply.status, reply.headers["x-agent-authz-reason"]) == (403, "path_not_allowed")
    assert pod.upstream(path="/v1/admin") == []
    record = pod.record(decision_id=reply.headers["x-agent-authz-decision-id"])
    assert (record["tls"], record["sni"], record["reason"]) == ("intercept", API, "path_not_allowed")


PEER_CERTS = """
import base64, json, socket, ssl, sys
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE   # only to look at what is presented
out = {}
for host in sys.argv[1:]:
    with socket.create_connection((host, 443), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            out[host] = base64.b64encode(tls.getpeercert(binary_form=True)).decode()
print(json.dumps(out))
"""


def test_passthrough_is_untouched_and_intercepted_hosts_get_pod_ca_leaves(pod: Pod) -> None:
    seen = json.loads(pod.python(PEER_CERTS, SECURE, API))
    upstream_cert = x509.load_pem_x509_certificate((pod.upstream_log.parent / "good.pem").read_bytes())
    secure = x509.load_der_x509_certificate(base64.b64decode(seen[SECURE]))
    assert secure == upstream_cert  # the upstream's own certificate
    api = x509.load_der_x509_certificate(base64.b64decode(seen[API]))
    ca = x509.load_pem_x509_certificate(http_get(pod.stack.sidecar.admin_url + "/ca.pem")[1])
    assert api.issuer == ca.subject and api.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName) == [API]
    # the agent trusts the pod CA, not the upstream's test CA: passthrough keeps the upstream's TLS
    assert pod.curl(f"https://{SECURE}/hello").exit_code != 0
    ok = pod.curl("--cacert", str(pod.public / "upstream-ca" / "bundle.pem"), f"https://{SECURE}/hello")
    assert ok.status == 200, ok
    (received,) = pod.upstream(path="/hello")
    assert "authorization" not in received["headers"] and "x-api-key" not in received["headers"]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["curl", "-sS", "--max-time", "10", f"https://{EVIL}/x"], {"sni": EVIL, "reason": "host_not_allowed"}),
        (
            ["openssl", "s_client", "-connect", f"{UPSTREAM_IP}:443", "-servername", "bad!name.example.com"],
            {"sni": "bad!name.example.com", "reason": "bad_request"},
        ),
        (["openssl", "s_client", "-connect", f"{UPSTREAM_IP}:443", "-noservername"], {"sni": "", "reason": "no_sni"}),
    ],
)
def test_unknown_odd_or_missing_sni_is_refused_and_logged(pod: Pod, argv: list[str], match: dict[str, str]) -> None:
    before = len(pod.upstream())
    result = subprocess.run(
        pod.as_agent(argv), input="", capture_output=True, text=True, timeout=20, env=pod.env(), check=False
    )
    assert "HTTP/" not in result.stdout
    record = pod.record(protocol="tls", **match)
    assert record["decision"] == "deny" and record["destination"] == f"{UPSTREAM_IP}:443"
    assert len(pod.upstream()) == before
    assert pod.stack.sidecar.alive() and pod.stack.envoy.alive()


@pytest.mark.parametrize(("host", "failure"), [(WRONG, "SAN"), (UNTRUSTED, "CERTIFICATE_VERIFY_FAILED")])
def test_an_upstream_with_a_bad_certificate_gets_502(pod: Pod, host: str, failure: str) -> None:
    reply = _httpx(pod, f"https://{host}/v1/x")
    assert reply["status"] == 502, reply
    body = json.loads(str(reply["body"]))
    record = pod.record(decision_id=body["decision_id"])
    assert (record["decision"], record["tls"], record["sni"]) == ("allow", "intercept", host)
    line = pod.access_log(body["decision_id"])
    assert line["status"] == 502 and failure in line["upstream_tls_failure"] and failure in body["detail"]
    assert pod.upstream(path="/v1/x") == []


def test_the_ca_private_key_is_not_readable_by_the_agent(pod: Pod) -> None:
    private = pod.state / "intercept"
    ca_key = serialization.load_pem_private_key((private / "ca" / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate(http_get(pod.stack.sidecar.admin_url + "/ca.pem")[1])
    assert ca_key.public_key() == ca.public_key()  # it exists, in the proxy user's directory...
    probe = f"""
import json, os
out = {{}}
for name, path in (("list", {str(private)!r}), ("read", {str(private / "ca" / "ca.key")!r})):
    try:
        os.listdir(path) if name == "list" else open(path, "rb").read()
        out[name] = "allowed"
    except PermissionError:
        out[name] = "denied"
print(json.dumps(out))
"""
    assert json.loads(pod.python(probe)) == {"list": "denied", "read": "denied"}  # ...closed to the agent
    keys = """
import os, sys
for top in sys.argv[1:]:
    for root, dirs, files in os.walk(top):
        for name in files:
            try:
                data = open(os.path.join(root, name), "rb").read()
            except OSError:
                continue
            if b"PRIVATE KEY" in data:
                sys.stdout.buffer.write(data)
"""
    readable = pod.python(keys, str(pod.state), pod.agent_env["SSL_CERT_FILE"].rsplit("/", 1)[0]).encode()
    blocks = [b"-----BEGIN" + part for part in readable.split(b"-----BEGIN")[1:] if b"PRIVATE KEY-----" in part]
    public = ca.public_key()
    for block in blocks:
        key = serialization.load_pem_private_key(block[: block.index(b"KEY-----", 20) + 8] + b"\n", None)
        assert key.public_key() != public


ROTATION = """
import http.client, json, ssl, sys, time
context = ssl.create_default_context()            # SSL_CERT_FILE: the pod bundle
deadline, failures, serials, done = time.monotonic() + float(sys.argv[2]), [], set(), 0
keep = http.client.HTTPSConnection(sys.argv[1], 443, context=context, timeout=10)
while time.monotonic() < deadline:
    for conn in (keep, None):                     # one long-lived connection, one new per round
        fresh = conn is None
        conn = conn or http.client.HTTPSConnection(sys.argv[1], 443, context=context, timeout=10)
        try:
            conn.request("GET", "/v1/items/rotation")
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failures.append(response.status)
            serials.add(conn.sock.getpeercert()["serialNumber"])
            done += 1
        except Exception as exc:
            failures.append(repr(exc))
        if fresh:
            conn.close()
print(json.dumps({"done": done, "failures": failures, "serials": sorted(serials)}))
"""


def test_leaf_rotation_under_a_stream_of_requests_drops_none(pod: Pod) -> None:
    """leaf_ttl 3 s (re-minted with 1 s left): 5 s of requests on a kept and on fresh connections."""
    before = _rotations(pod)
    outcome = json.loads(pod.python(ROTATION, API, "5", timeout=40))
    assert outcome["failures"] == [] and outcome["done"] > 20, outcome
    assert len(outcome["serials"]) >= 2, outcome
    assert _rotations(pod) >= before + 2
    assert len(pod.upstream(path="/v1/items/rotation")) == outcome["done"]


def _rotations(pod: Pod) -> int:
    status, body = http_get(pod.stack.sidecar.admin_url + "/readyz")
    assert status == 200
    return int(json.loads(body)["intercept"]["rotations"])
