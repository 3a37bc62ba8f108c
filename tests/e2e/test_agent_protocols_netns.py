"""The MCP SDK agent in a network-namespace pod, as the agent UID, with no proxy setting: iptables
sends its calls to Envoy's ``outbound`` listener, and the MCP rules hold there too - also against
bodies the SDK never sends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.harness import AuthzStack, ManagedProcess, wait_until
from sidecar.simulation.netns import AGENT_UID, PROXY_UID, UPSTREAM_IP, PodNetwork, as_user, chown_tree
from tests.support.agent_protocols import CALLS_PLAN, EXPECTED, MCP_HOST, WAREHOUSE, reason_of
from tests.support.config import base_config, task, write_config, write_keys
from tests.support.netns_pod import REPO, pod_sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespace tests need root (network namespaces, iptables)"),
]

OUTBOUND_PORT = 15001


def _config(state: Path) -> Path:
    write_keys(state)
    config = base_config(state, [task(egress=[WAREHOUSE])], {MCP_HOST: f"{UPSTREAM_IP}:80"})
    config["envoy"].update(egress_port=15080, admin_port=15000, outbound_port=OUTBOUND_PORT, rpc_body_cap="4KiB")
    return write_config(state, config)


@pytest.fixture(scope="module")
def pod() -> Iterator[tuple[PodNetwork, Path, Path]]:
    with pod_sandbox("aa-mcp-ns-", hosts={MCP_HOST: UPSTREAM_IP}) as sandbox:
        net = sandbox.net
        state, logs = sandbox.dir("state"), sandbox.dir("up")
        ready = logs / "mcp.ready"
        argv = [
            sys.executable,
            "-m",
            "sidecar.demo.agent_servers",
            "mcp",
            f"{UPSTREAM_IP}:80",
            MCP_HOST,
            "--log",
            str(logs / "calls.log"),
            "--ready",
            str(ready),
        ]
        server = sandbox.keep(ManagedProcess("mcp", argv, log_dir=logs, cwd=REPO, prefix=net.exec_in(net.upstream, [])))
        server.start()

        def up() -> bool:
            server.check_alive()
            return ready.exists()

        wait_until(up, timeout=30, what="the MCP server in the upstream namespace")
        config = _config(state)
        with net.inside():
            subprocess.run([sys.executable, "-m", "sidecar", "iptables"], check=True, capture_output=True, timeout=30)
            chown_tree(state, PROXY_UID)
            stack = sandbox.keep(AuthzStack(config, state, run_as=as_user(PROXY_UID)))
            stack.start()
            yield net, state, logs


def _as_agent(net: PodNetwork, argv: list[str]) -> subprocess.CompletedProcess[str]:
    command = net.exec_in(net.pod, [*as_user(AGENT_UID), *argv])
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={"PATH": os.environ["PATH"]}, check=False, cwd=REPO
    )


def test_the_sdk_agent_is_judged_without_any_proxy_setting(pod: tuple[PodNetwork, Path, Path]) -> None:
    net, state, logs = pod
    plan = [{"mcp": f"http://{MCP_HOST}/mcp", "mode": "auto", "calls": CALLS_PLAN}]
    done = _as_agent(net, [sys.executable, "-m", "sidecar.demo.mcp_agent", json.dumps(plan)])
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [reason_of(r) for r in results] == EXPECTED, results
    assert results[0]["result"] == ["query", "list_tables"]
    executed = [json.loads(line)["tool"] for line in (logs / "calls.log").read_text().splitlines()]
    assert executed == ["query", "list_tables", "query", "query"]
    records = [json.loads(line) for line in (state / "decisions.log").read_text().splitlines()]
    assert all(r["destination"].startswith(f"{UPSTREAM_IP}:80") for r in records if "mcp" in r)
    assert {r["mcp"]["tool"] for r in records if r.get("mcp", {}).get("method") == "tools/call"} == {
        "query",
        "drop_table",
        "list_tables",
    }


HOSTILE_AGENT = r"""
import http.client, json, sys
def post(body, extra={}):
    conn = http.client.HTTPConnection(sys.argv[1], 80, timeout=10)  # straight at the upstream's address
    conn.request("POST", "/mcp", body, {"host": sys.argv[2], "content-type": "application/json", **extra})
    reply = conn.getresponse()
    return str(reply.status), reply.getheader("x-agent-authz-reason", ""), json.loads(reply.read() or b"null")
dup = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_tables","name":"drop_table"}}'
lie = b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"drop_table","arguments":{}}}'
big = b'{"jsonrpc":"2.0","id":3,"method":"ping"}' + b" " * 5000
print(json.dumps([post(dup), post(lie, {"mcp-method": "tools/call", "mcp-name": "list_tables"}), post(big)]))
"""


def test_hostile_bodies_from_the_agent_uid(pod: tuple[PodNetwork, Path, Path]) -> None:
    """Raw sockets from the agent's UID, straight at the upstream's address: redirected, judged, refused."""
    net, _, logs = pod
    before = (logs / "calls.log").read_text() if (logs / "calls.log").exists() else ""
    done = _as_agent(net, [sys.executable, "-c", HOSTILE_AGENT, UPSTREAM_IP, MCP_HOST])
    assert done.returncode == 0, done.stderr[-3000:]
    results: list[Any] = json.loads(done.stdout)
    assert [(status, reason) for status, reason, _ in results] == [
        ("400", "mcp_ambiguous_body"),
        ("400", "mcp_header_mismatch"),
        ("413", "mcp_body_too_large"),
    ]
    assert all(body["jsonrpc"] == "2.0" and "error" in body for _, _, body in results)
    after = (logs / "calls.log").read_text() if (logs / "calls.log").exists() else ""
    assert after == before  # nothing reached the server
