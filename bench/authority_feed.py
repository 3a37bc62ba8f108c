"""Revocation propagation through the cluster authority, feed reconnect time, and the authority's memory.

Run: ``.venv/bin/python bench/authority_feed.py [SIDECARS] [ROUNDS]`` (default 6 sidecars, 3 rounds).
Prints a markdown table.

Two ``agent-authz authority`` replicas against the Kubernetes API double (``sidecar/simulation/kube_api.py``;
no API server runs here), SIDECARS real ``agent-authz serve`` processes, half streaming from each
replica. Each sidecar holds, per round, a grant delegated from one root task ``q<round>``. A round
revokes ``q<round>`` with the root key at replica 0 (the same request ``agent-authz task revoke
--authority`` sends) and measures, for every sidecar, the time from sending the request to that
sidecar's first ``task_revoked`` (each sweep asks every sidecar once over its ext_authz socket, so
the resolution is one sweep). Then replica 1 is restarted and the time from its ``/readyz`` to each
of its sidecars' reconnected snapshot is measured (bounded by the client's backoff at that moment),
and the resident memory of both replicas is read with every sidecar connected.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sidecar.harness import http_get, wait_until  # noqa: E402
from tests.support.authority_env import (  # noqa: E402
    TD,
    AuthorityCluster,
    https_json,
    metric_value,
    reason,
    wait_feed_connected,
)
from tests.support.grant_chain import Chain, root_task  # noqa: E402

ORCH = f"spiffe://{TD}/ns/agents/sa/orchestrator"


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def _task(sock: Path, task_id: str) -> str:
    """The reason of one Check naming ``task_id`` (``x-agent-task``)."""
    return reason(_check_task(sock, task_id))


def _check_task(sock: Path, task_id: str) -> object:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2

    from tests.support.envoy_authz import check_request

    raw = check_request(host="api.internal", path="/v1/prices", headers={"x-agent-task": task_id})
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        call = channel.unary_unary(
            "/envoy.service.auth.v3.Authorization/Check",
            request_serializer=None,
            response_deserializer=external_auth_pb2.CheckResponse.FromString,
        )
        return call(raw, timeout=5)


def main(sidecars: int = 6, rounds: int = 3) -> int:
    root = Path(tempfile.mkdtemp(prefix="aa-bench-authority-"))
    socks = Path(tempfile.mkdtemp(prefix="aab-", dir="/tmp"))
    cluster = AuthorityCluster(root, replicas=2, heartbeat=5.0)
    try:
        cluster.start()
        chain = Chain(cluster.ca, cluster.issuer)
        roots = [chain.root(root_task(f"q{r}", ORCH)) for r in range(rounds)]
        agents = []
        for index in range(sidecars):
            spiffe_id = f"spiffe://{TD}/ns/agents/sa/sub{index}"
            grants = [chain.delegate(roots[r], spiffe_id, f"s{index}") for r in range(rounds)]
            sock = socks / f"s{index}"
            sock.mkdir()
            config = cluster.sidecar_config(
                root / f"s{index}", spiffe_id, "agents", sock, authority=index % 2, grants=grants
            )
            sidecar = cluster.start_sidecar(config, f"sub{index}")
            agents.append((sidecar, sock / "authz.sock", index))
        for sidecar, _, _ in agents:
            wait_feed_connected(sidecar, timeout=60)
        samples: list[float] = []
        sweeps: list[float] = []
        for r in range(rounds):
            body = {"list": chain.root_revocation(f"q{r}")}
            for _, sock, index in agents:
                assert _task(sock, f"q{r}/s{index}") == "allowed"
            seen: dict[int, float] = {}
            started = time.perf_counter()
            status, _, _ = https_json(
                cluster.url(0) + "/v1/revocations", ca_file=cluster.tls_ca, method="POST", body=body
            )
            assert status == 200
            while len(seen) < len(agents) and time.perf_counter() - started < 10:
                sweep = time.perf_counter()
                for _, sock, index in agents:
                    if index not in seen and _task(sock, f"q{r}/s{index}") == "task_revoked":
                        seen[index] = time.perf_counter() - started
                sweeps.append(time.perf_counter() - sweep)
            assert len(seen) == len(agents), f"round {r}: {len(seen)}/{len(agents)} revoked"
            samples.extend(seen.values())
        rss = {a.name: round(_rss_mib(a.proc.pid), 1) for a in cluster.authorities if a.proc is not None}
        cluster.authorities[1].stop()
        time.sleep(1.0)  # the outage the sidecars of replica 1 go through (their backoff grows meanwhile)
        cluster.authorities[1].start()
        cluster.authorities[1].wait_ready()
        ready = time.monotonic()
        reconnects = []
        for sidecar, _, index in agents:
            if index % 2 != 1:
                continue

            def connected(s: object = sidecar) -> bool:
                text = http_get(s.admin_url + "/metrics")[1].decode()  # type: ignore[attr-defined]
                return metric_value(text, "agent_authz_revocation_feed_connected") == 1.0

            wait_until(connected, timeout=30, what="reconnect", interval=0.005)
            reconnects.append(time.monotonic() - ready)
        ordered = sorted(samples)
        rows = {
            "sidecars / replicas / rounds": f"{sidecars} / 2 / {rounds}",
            "propagation, send -> first deny, p50": f"{statistics.median(ordered) * 1000:.0f} ms",
            "propagation, p90": f"{ordered[int(0.9 * (len(ordered) - 1))] * 1000:.0f} ms",
            "propagation, max": f"{ordered[-1] * 1000:.0f} ms",
            "sweep (resolution)": f"{statistics.median(sweeps) * 1000:.0f} ms",
            "reconnect after the replica is ready (max of its sidecars)": f"{max(reconnects) * 1000:.0f} ms",
            "authority RSS per replica": ", ".join(f"{v} MiB" for v in rss.values()),
        }
        print("| figure | value |\n|---|---|")
        for key, value in rows.items():
            print(f"| {key} | {value} |")
        print(json.dumps({"samples_s": [round(s, 4) for s in ordered], "reconnect_s": reconnects}))
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(socks, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*(int(a) for a in sys.argv[1:3])))
