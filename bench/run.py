"""Benchmark agent-authz against Envoy alone, Envoy's RBAC filter and a trivial Python ext_authz.

Run: ``.venv/bin/python bench/run.py [--quick] [--json PATH] [--tasks N]``

Everything runs in one go on this machine, side by side, against the same fast upstream (an Envoy
answering with ``direct_response``):

(a) Envoy alone - a proxy hop with no authorization;
(b) Envoy's built-in RBAC filter holding the same allow-list (what one would pick for plain
    allow-lists, without tokens);
(c) Envoy + a trivial allow-all ext_authz in our stack (``bench/trivial_authz.py``): the Python ceiling;
(d) Envoy + agent-authz, token served from the cache (the normal path);
(e) Envoy + agent-authz minting a token on every call (``mint_per_call``);
(f) ingress: mTLS to Envoy's ingress listener with the sidecar re-verifying the SVID; (f0) the same
    mTLS hop without ext_authz, as its baseline;
(g) HTTPS the agent opens itself, intercepted (``tls: intercept``): ``hey`` through ``HTTPS_PROXY``
    (``CONNECT``), trusting the pod CA through ``SSL_CERT_FILE`` as any Go program does; Envoy
    terminates TLS with the pod-CA leaf, agent-authz decides (token, API key) and Envoy opens a
    verified TLS connection to an upstream serving HTTPS; (g0) the same Envoy configuration with
    the ext_authz filter removed, as its baseline. TLS on both sides, connections kept alive.

The configuration is realistic: ``--tasks`` tasks (default 1,000) of 10 egress rules each, all
for the local agent, requests hitting the last task's last rule without naming the task. Decision
logging is on (a file) in every agent-authz figure.

Per configuration: saturation with ``wrk`` (req/s = decisions/s; ``hey -c16`` for (g0)/(g), which go
through a proxy), fixed rate with ``hey -q`` at 500 and 1000 req/s (latency p50/p90/p99 and the
latency added over (a); for (g), also over (g0) and over (d)). For (d): the sidecar's RSS, CPU
seconds per 1000 decisions, and start-to-ready time. Separately, in-process: the decision cost with
10 and with 10,000 tasks. Prints a markdown table; ``--json`` writes every raw figure.

Needs ``wrk`` and ``hey`` (Debian packages) on PATH.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))

from sidecar.decision import AuthzRequest, Direction  # noqa: E402
from sidecar.harness import AuthzStack, EnvoyProcess, ManagedProcess, http_get, wait_until  # noqa: E402
from sidecar.identity.devca import DevCA  # noqa: E402
from sidecar.runtime import Runtime  # noqa: E402
from sidecar.tls_intercept.ca import PodCA  # noqa: E402
from sidecar.tls_intercept.trust import agent_trust_env  # noqa: E402
from sidecar.tokens.keys import generate_private_key_pem  # noqa: E402

AGENT = "spiffe://bench.example/ns/agents/sa/worker"
CALLER = "spiffe://bench.example/ns/agents/sa/caller"
RULES_PER_TASK = 10
TLS_HOST = "secure.svc.internal"
TLS_PATH = "/api/v1/items/42"


def socket_dir() -> Path:
    """A short directory under ``/tmp`` for Unix sockets (the 107-byte ``sun_path`` limit), removed
    when the benchmark process exits."""
    path = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
    atexit.register(shutil.rmtree, path, True)
    return path


def wrk(port: int, host: str, path: str, seconds: int) -> tuple[float, int]:
    """``wrk -t1 -c16`` for ``seconds`` against ``127.0.0.1:port``: ``(requests per second, requests)``.

    Raises:
        RuntimeError: wrk saw a non-2xx answer or a socket error.
    """
    out = subprocess.run(
        ["wrk", "-t1", "-c16", f"-d{seconds}s", "-H", f"Host: {host}", f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), requests  # type: ignore[union-attr]


# -- configuration ----------------------------------------------------------------------------------
def _tasks(count: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"task-{i}",
            "agent": AGENT,
            "purpose": "bench",
            "ttl": "2h",
            "egress": [
                {
                    "name": f"r{j}",
                    "host": f"t{i}.svc.internal",
                    "methods": ["GET", "POST"],
                    "paths": [f"/api/v{j}/*"],
                    "scope": "read",
                }
                for j in range(RULES_PER_TASK)
            ],
        }
        for i in range(count)
    ]


def _target(count: int) -> tuple[str, str]:
    """The host and path every benchmark request uses: the last task's last rule."""
    return f"t{count - 1}.svc.internal", f"/api/v{RULES_PER_TASK - 1}/items/42"


def _write_keys(state: Path) -> None:
    (state / "keys").mkdir(parents=True, exist_ok=True)
    (state / "keys" / "signing.pem").write_bytes(generate_private_key_pem())


def _sidecar_config(
    state: Path, sock: Path, tasks: int, upstream: str, more_tasks: tuple[dict[str, Any], ...] = (), **extra: Any
) -> Path:
    host, _ = _target(tasks)
    logs = state.with_name(f"{state.name}-log")  # the decision log apart from the config, as in a pod:
    logs.mkdir(exist_ok=True)  # in the config's directory, each write would wake the config watcher
    config: dict[str, Any] = {
        "agent": AGENT,
        "issuer": {"url": "https://bench.example", "signing_key": "keys/signing.pem", "max_token_ttl": "10m"},
        "listen": {"authz": f"unix:{sock}", "admin": "127.0.0.1:0"},
        "envoy": {
            "egress_port": 0,
            "admin_socket": str(sock.with_name(f"{sock.stem}-envoy-admin.sock")),
            "destinations": {host: upstream},
        },
        "decision_log": {"path": str(logs / "decisions.log"), "stdout": False},
        "tasks": [*_tasks(tasks), *more_tasks],
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    path = state / "sidecar.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML, and the loader reads it with orjson
    return path


def _any(type_name: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **body}


HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": _any("envoy.extensions.filters.http.router.v3.Router", {}),
}


def _cluster(name: str, address: str, *, http2: bool = False, tls: dict[str, Any] | None = None) -> dict[str, Any]:
    if address.startswith("unix:"):
        endpoint = {"pipe": {"path": address[5:]}}
    else:
        host, _, port = address.rpartition(":")
        endpoint = {"socket_address": {"address": host, "port_value": int(port)}}
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": endpoint}}]}],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                {"explicit_http_config": {"http2_protocol_options": {}}},
            )
        }
    if tls is not None:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return cluster


def _listener(
    name: str,
    filters: list[dict[str, Any]],
    cluster: str,
    transport: dict[str, Any] | None = None,
    direct: bool = False,
) -> dict[str, Any]:
    route: dict[str, Any] = (
        {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
        if direct
        else {"match": {"prefix": "/"}, "route": {"cluster": cluster}}
    )
    hcm = _any(
        HCM,
        {
            "stat_prefix": name,
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
            "http_filters": [*filters, ROUTER],
        },
    )
    chain: dict[str, Any] = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    }
    if transport is not None:
        chain["transport_socket"] = transport
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [chain],
    }


def _bootstrap(listener: dict[str, Any], clusters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }


def _rbac(tasks: int) -> dict[str, Any]:
    permissions = []
    for i in range(tasks):
        for j in range(RULES_PER_TASK):
            permissions.append(
                {
                    "and_rules": {
                        "rules": [
                            {"header": {"name": ":authority", "string_match": {"exact": f"t{i}.svc.internal"}}},
                            {
                                "or_rules": {
                                    "rules": [
                                        {"header": {"name": ":method", "string_match": {"exact": m}}}
                                        for m in ("GET", "POST")
                                    ]
                                }
                            },
                            {"url_path": {"path": {"prefix": f"/api/v{j}/"}}},
                        ]
                    }
                }
            )
    policy = {"permissions": permissions, "principals": [{"any": True}]}
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": _any(
            "envoy.extensions.filters.http.rbac.v3.RBAC",
            {"rules": {"action": "ALLOW", "policies": {"allow-list": policy}}},
        ),
    }


def _ext_authz(transport: str = "grpc") -> dict[str, Any]:
    """Envoy's ext_authz filter against cluster ``authz``: gRPC, or (``aiohttp``/``raw``) the HTTP service."""
    if transport == "grpc":
        service: dict[str, Any] = {
            "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "0.25s"},
            "transport_api_version": "V3",
        }
    else:
        service = {"http_service": {"server_uri": {"uri": "http://authz", "cluster": "authz", "timeout": "0.25s"}}}
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": _any(
            "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz", {**service, "failure_mode_allow": False}
        ),
    }


def _client_tls(cert: Path, key: Path, ca: Path) -> dict[str, Any]:
    return _any(
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        {
            "common_tls_context": {
                "tls_certificates": [
                    {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
                ],
                "validation_context": {"trusted_ca": {"filename": str(ca)}},
            }
        },
    )


def _tls_server(cert: Path, key: Path) -> dict[str, Any]:
    """A plain TLS server context (no client certificate): the HTTPS upstream of (g)."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": _any(
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            {
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificates": [
                        {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
                    ],
                }
            },
        ),
    }


def _server_tls(cert: Path, key: Path, ca: Path) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": _any(
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            {
                "require_client_certificate": True,
                "common_tls_context": {
                    "tls_certificates": [
                        {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
                    ],
                    "validation_context": {"trusted_ca": {"filename": str(ca)}},
                },
            },
        ),
    }


# -- processes ---------------------------------------------------------------------------------------
class Bench:
    def __init__(self, work: Path, quick: bool, tasks: int) -> None:
        self.work = work
        self.quick = quick
        self.seconds = 2 if quick else 8
        self.tasks = tasks
        self.procs: list[Any] = []
        self.results: dict[str, dict[str, Any]] = {}
        self.workers_rps: dict[str, float] | None = None
        self.last_requests = 0

    def envoy(self, name: str, bootstrap: dict[str, Any]) -> EnvoyProcess:
        path = self.work / f"{name}.json"
        path.write_text(json.dumps(bootstrap))
        proc = EnvoyProcess(path, log_dir=self.work, name=name)
        self.procs.append(proc)
        proc.start()
        proc.wait_ready(30)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    # -- load --------------------------------------------------------------------------------------
    def wrk(self, port: int, host: str, path: str) -> float:
        url = f"http://127.0.0.1:{port}{path}"
        subprocess.run(["wrk", "-t1", "-c16", "-d1s", "-H", f"Host: {host}", url], capture_output=True, check=True)
        rps, self.last_requests = wrk(port, host, path, self.seconds)
        return rps

    def hey(self, port: int, host: str, path: str, rate: int) -> dict[str, float]:
        workers = 10
        out = subprocess.run(
            [
                "hey",
                "-z",
                f"{self.seconds}s",
                "-c",
                str(workers),
                "-q",
                str(rate // workers),
                "-host",
                host,
                f"http://127.0.0.1:{port}{path}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        codes = re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)
        if any(code != "200" for code, _ in codes):
            raise RuntimeError(f"hey saw non-200 responses:\n{out}")
        figures = {f"p{p}": float(re.search(rf"{p}%+ in ([\d.]+) secs", out).group(1)) * 1000 for p in (50, 90, 99)}  # type: ignore[union-attr]
        figures["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        return figures

    def hey_proxy(self, proxy: int, url: str, env: dict[str, str], rate: int | None) -> dict[str, float]:
        """``hey`` through ``http://127.0.0.1:proxy`` (``CONNECT`` for https), at ``rate`` or flat out (-c16)."""
        workers = 10 if rate else 16
        limit = ["-q", str(rate // workers)] if rate else []
        argv = ["hey", "-z", f"{self.seconds}s", "-c", str(workers), *limit, "-x", f"http://127.0.0.1:{proxy}", url]
        out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout
        codes = re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)
        if not codes or any(code != "200" for code, _ in codes):
            raise RuntimeError(f"hey saw non-200 responses or errors:\n{out}")
        figures = {f"p{p}": float(re.search(rf"{p}%+ in ([\d.]+) secs", out).group(1)) * 1000 for p in (50, 90, 99)}  # type: ignore[union-attr]
        figures["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        return figures

    def measure_proxy(self, name: str, proxy: int, url: str, env: dict[str, str]) -> None:
        """Like :meth:`measure`, for a client that goes through the proxy (saturation with hey -c16)."""
        self.hey_proxy(proxy, url, env, None)  # warm-up: connections, the pod-CA leaf, the token cache
        figures: dict[str, Any] = {"rps": self.hey_proxy(proxy, url, env, None)["rps"]}
        for rate in (500, 1000):
            figures[f"at_{rate}"] = self.hey_proxy(proxy, url, env, rate)
        self.results[name] = figures
        print(
            f"  {name}: {figures['rps']:.0f} req/s; @1000: p50 {figures['at_1000']['p50']:.2f} ms, "
            f"p99 {figures['at_1000']['p99']:.2f} ms",
            flush=True,
        )

    def measure(
        self,
        name: str,
        port: int,
        host: str,
        path: str,
        extra: dict[str, Any] | None = None,
        pid: int | None = None,
    ) -> None:
        """Saturation (wrk), then 500 and 1000 req/s (hey); with ``pid``, that process's CPU per 1000
        requests during the saturation run and its RSS after all three."""
        cpu = _proc_cpu(pid) if pid is not None else 0.0
        figures: dict[str, Any] = {"rps": self.wrk(port, host, path)}
        if pid is not None:
            figures["cpu_s_per_1000"] = round((_proc_cpu(pid) - cpu) / max(self.last_requests, 1) * 1000, 4)
        for rate in (500, 1000):
            figures[f"at_{rate}"] = self.hey(port, host, path, rate)
        if pid is not None:
            figures["rss_mb"] = round(_proc_rss_mb(pid), 1)
        figures.update(extra or {})
        self.results[name] = figures
        print(
            f"  {name}: {figures['rps']:.0f} req/s; @1000: p50 {figures['at_1000']['p50']:.2f} ms, "
            f"p99 {figures['at_1000']['p99']:.2f} ms"
            + (f"; {figures['cpu_s_per_1000'] * 1000:.0f} µs CPU/request" if pid is not None else ""),
            flush=True,
        )


TRIVIAL = ("grpc", "aiohttp", "raw")
"""The trivial servers of (c): ``bench/trivial_authz.py --transport``."""


class _Trivial:
    """``bench/trivial_authz.py`` processes, one Unix socket each, and the Envoy cluster naming them all."""

    def __init__(self, procs: list[ManagedProcess], sockets: list[Path], transport: str) -> None:
        self.procs = procs
        self.transport = transport
        self.cluster = _cluster("authz", f"unix:{sockets[0]}", http2=transport == "grpc")
        endpoints = self.cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        endpoints += [{"endpoint": {"address": {"pipe": {"path": str(s)}}}} for s in sockets[1:]]

    @property
    def pid(self) -> int:
        return self.procs[0].proc.pid  # type: ignore[union-attr]

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


def _trivial_servers(bench: Bench, count: int, transport: str = "grpc") -> _Trivial:
    procs, sockets = [], []
    for index in range(count):
        sock = socket_dir() / "trivial.sock"
        proc = ManagedProcess(
            f"trivial-{transport}{index}",
            [sys.executable, str(REPO / "bench" / "trivial_authz.py"), "--transport", transport, f"unix:{sock}"],
            log_dir=bench.work,
        )
        proc.start()
        bench.procs.append(proc)
        wait_until(lambda p=proc: "ready" in p.stdout_path.read_text(), timeout=20, what="trivial authz")
        procs.append(proc)
        sockets.append(sock)
    return _Trivial(procs, sockets, transport)


def ceiling(results: dict[str, dict[str, Any]]) -> str:
    """The configuration name of the fastest trivial ext_authz server (c)."""
    return max((name for name in results if name.startswith("c_trivial_")), key=lambda n: results[n]["rps"])


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_configs(bench: Bench) -> None:
    work, tasks = bench.work, bench.tasks
    host, path = _target(tasks)
    upstream = bench.envoy("upstream", _bootstrap(_listener("up", [], "", direct=True), []))
    up = f"127.0.0.1:{upstream.listener_port('up')}"
    try:
        # (a) Envoy alone, (b) RBAC
        for name, filters in (("a_envoy", []), ("b_rbac", [_rbac(tasks)])):
            front = bench.envoy(name, _bootstrap(_listener(name, filters, "up"), [_cluster("up", up)]))
            bench.measure(name, front.listener_port(name), host, path)
            front.stop()
        # (c) the trivial ext_authz servers, one per transport: the best is the Python ceiling
        for transport in TRIVIAL:
            trivial = _trivial_servers(bench, 1, transport)
            name = f"c_trivial_{transport}"
            front = bench.envoy(
                name, _bootstrap(_listener(name, [_ext_authz(transport)], "up"), [_cluster("up", up), trivial.cluster])
            )
            bench.measure(name, front.listener_port(name), host, path, {"transport": transport}, pid=trivial.pid)
            front.stop()
            trivial.stop()
        best = ceiling(bench.results)
        if not bench.quick:
            # would worker processes help? the Python ceiling with two processes, one Unix socket each,
            # listed as two endpoints of the cluster (Envoy spreads checks over them round robin)
            transport = bench.results[best]["transport"]
            trivial = _trivial_servers(bench, 2, transport)
            front = bench.envoy(
                "c2",
                _bootstrap(_listener("c2", [_ext_authz(transport)], "up"), [_cluster("up", up), trivial.cluster]),
            )
            bench.workers_rps = {
                "transport": transport,
                "1": bench.results[best]["rps"],
                "2": bench.wrk(front.listener_port("c2"), host, path),
            }
            print(f"  {best} with 2 worker processes: {bench.workers_rps['2']:.0f} req/s", flush=True)
            front.stop()
            trivial.stop()
        # (d) agent-authz, token cache hits (HTTP checks, the default; d_grpc: the same over gRPC);
        # (e) minting on every call
        variants: tuple[tuple[str, dict[str, Any]], ...] = (
            ("d_agent_authz", {}),
            ("d_grpc", {"envoy": {"authz_transport": "grpc"}}),
            ("e_mint_per_call", {"issuer": {"mint_per_call": True}}),
        )
        for name, extra_config in variants:
            state = work / name
            state.mkdir()
            _write_keys(state)
            config = _sidecar_config(state, socket_dir() / "authz.sock", tasks, up, **extra_config)
            (work / f"{name}-run").mkdir()
            stack = AuthzStack(config, work / f"{name}-run")  # logs apart from the config, as in a pod
            started = time.monotonic()
            stack.start()
            bench.procs.append(stack.envoy)
            bench.procs.append(stack.sidecar)
            pid = stack.sidecar.proc.pid  # type: ignore[union-attr]
            extra: dict[str, Any] = {"transport": "grpc" if name == "d_grpc" else "http"}
            if name == "d_agent_authz":
                extra["stack_start_s"] = round(time.monotonic() - started, 2)
            decisions_before = _decisions(stack)
            bench.measure(name, stack.egress_port, host, path, extra, pid=pid)
            bench.results[name]["decisions_measured"] = _decisions(stack) - decisions_before
            bench.results[name]["envoy_rss_mb"] = round(_proc_rss_mb(stack.envoy.proc.pid), 1)  # type: ignore[union-attr]
            stack.stop()
        run_intercept(bench, up)
        # (f0) mTLS hop without ext_authz, (f) agent-authz ingress
        ca = DevCA.create("bench.example")
        ca.save(work / "ca")
        server = ca.write_svid(AGENT, work / "svids", name="server")
        client = ca.write_svid(CALLER, work / "svids", name="client")
        bundle = work / "ca" / "bundle.pem"
        front = bench.envoy(
            "f0_mtls",
            _bootstrap(
                _listener("f0_mtls", [], "up", _server_tls(server.cert, server.key, bundle)), [_cluster("up", up)]
            ),
        )
        client_envoy = bench.envoy(
            "f0_client",
            _bootstrap(
                _listener("f0_client", [], "target"),
                [
                    _cluster(
                        "target",
                        f"127.0.0.1:{front.listener_port('f0_mtls')}",
                        tls=_client_tls(client.cert, client.key, bundle),
                    )
                ],
            ),
        )
        bench.measure("f0_mtls_baseline", client_envoy.listener_port("f0_client"), "agent.local", "/v1/status")
        client_envoy.stop()
        front.stop()
        state = work / "f_ingress"
        state.mkdir()
        _write_keys(state)
        config = _sidecar_config(
            state,
            socket_dir() / "authz.sock",
            tasks,
            up,
            identity={
                "source": "files",
                "files": {"svid": str(server.cert), "key": str(server.key), "bundles": {"bench.example": str(bundle)}},
            },
            envoy={"local_app": up, "ingress_address": "127.0.0.1", "ingress_port": 0},
            ingress={"rules": [{"callers": [{"id": CALLER}], "methods": ["GET"], "paths": ["/v1/*"]}]},
        )
        (work / "f-run").mkdir()
        stack = AuthzStack(config, work / "f-run")
        stack.start()
        bench.procs.append(stack.envoy)
        bench.procs.append(stack.sidecar)
        client_envoy = bench.envoy(
            "f_client",
            _bootstrap(
                _listener("f_client", [], "target"),
                [
                    _cluster(
                        "target",
                        f"127.0.0.1:{stack.envoy.listener_port('ingress_https')}",
                        tls=_client_tls(client.cert, client.key, bundle),
                    )
                ],
            ),
        )
        bench.measure(
            "f_ingress_mtls_svid",
            client_envoy.listener_port("f_client"),
            "agent.local",
            "/v1/status",
            pid=stack.sidecar.proc.pid,  # type: ignore[union-attr]
        )
    finally:
        bench.stop_all()


def run_intercept(bench: Bench, plain_upstream: str) -> None:
    """(g0) and (g): intercepted HTTPS, TLS on both sides (see the module docstring)."""
    work, tasks = bench.work, bench.tasks
    upstream_ca = PodCA.create(ttl=86400, now=time.time(), label="bench upstream CA")
    leaf = upstream_ca.issue(TLS_HOST, ttl=7200, now=time.time())
    (work / "up-tls").mkdir()
    cert, key = work / "up-tls" / "leaf.pem", work / "up-tls" / "leaf.key"
    cert.write_bytes(leaf.cert_pem)
    key.write_bytes(leaf.key_pem)
    (work / "up-tls" / "ca.pem").write_bytes(upstream_ca.cert_pem)
    tls_up = bench.envoy(
        "upstream_tls", _bootstrap(_listener("up_tls", [], "", _tls_server(cert, key), direct=True), [])
    )
    tls_address = f"127.0.0.1:{tls_up.listener_port('up_tls')}"
    state = work / "g_intercept"
    state.mkdir()
    _write_keys(state)
    (state / "api.key").write_text("sk-bench-0123456789abcdef\n")
    rule = {
        "name": "tls",
        "host": TLS_HOST,
        "tls": "intercept",
        "upstream_port": int(tls_address.rsplit(":", 1)[1]),
        "methods": ["GET"],
        "paths": ["/api/*"],
        "credential": {"header": "x-api-key", "file": "api.key"},
    }
    config = _sidecar_config(
        state,
        socket_dir() / "authz.sock",
        tasks,
        plain_upstream,
        envoy={
            "destinations": {_target(tasks)[0]: plain_upstream, TLS_HOST: tls_address},
            "upstream_ca": str(work / "up-tls" / "ca.pem"),
        },
        more_tasks=({"id": "intercept", "agent": AGENT, "purpose": "bench", "ttl": "2h", "egress": [rule]},),
        intercept={"state_dir": "intercept", "publish_dir": "trust"},
    )
    (work / "g-run").mkdir()
    stack = AuthzStack(config, work / "g-run")
    stack.start()
    bench.procs.append(stack.envoy)
    bench.procs.append(stack.sidecar)
    env = {"PATH": os.environ["PATH"], **agent_trust_env(state / "trust")}  # hey is Go: SSL_CERT_FILE
    url = f"https://{TLS_HOST}{TLS_PATH}"
    # (g0): the very same Envoy configuration, with every ext_authz filter taken out
    baseline = work / "g0_intercept"
    shutil.copytree(state / "intercept", baseline, ignore=shutil.ignore_patterns("ca"))
    for path in [*baseline.rglob("*.json")]:
        text = path.read_text().replace(str(state / "intercept"), str(baseline))
        path.write_text(json.dumps(_without_ext_authz(json.loads(text))))
    bootstrap = _without_ext_authz(
        json.loads(stack.bootstrap.read_text().replace(str(state / "intercept"), str(baseline)))
    )
    front = bench.envoy("g0_envoy", bootstrap)
    bench.measure_proxy("g0_intercept_no_authz", front.listener_port("egress_http"), url, env)
    front.stop()
    bench.measure_proxy("g_intercept", stack.egress_port, url, env)
    bench.results["g_intercept"]["rss_mb"] = round(_proc_rss_mb(stack.sidecar.proc.pid), 1)  # type: ignore[union-attr]
    stack.stop()
    tls_up.stop()


def _without_ext_authz(config: Any) -> Any:
    """``config`` (proto3 JSON) with every ``envoy.filters.http.ext_authz`` HTTP filter removed."""
    if isinstance(config, dict):
        return {
            k: [f for f in map(_without_ext_authz, v) if f.get("name") != "envoy.filters.http.ext_authz"]
            if k == "httpFilters"
            else _without_ext_authz(v)
            for k, v in config.items()
        }
    if isinstance(config, list):
        return [_without_ext_authz(v) for v in config]
    return config


def _decisions(stack: AuthzStack) -> int:
    _, body = http_get(stack.sidecar.admin_url + "/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("agent_authz_decisions_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


# -- in-process figures ------------------------------------------------------------------------------
def decision_cost(work: Path, counts: tuple[int, ...], iterations: int, rounds: int = 11) -> dict[int, float]:
    """µs per decision (the decide function alone) for each task count, hitting the last task.

    Every runtime is built first, then the rounds alternate between them (each round times
    ``iterations`` decisions of each), and each count keeps its fastest round: an order or a
    noisy moment cannot favour one count, as measuring one after the other did (0.82× once).
    """
    runtimes = {}
    for tasks in counts:
        state = work / f"flat-{tasks}"
        state.mkdir()
        _write_keys(state)
        runtimes[tasks] = Runtime(_sidecar_config(state, state / "x.sock", tasks, "127.0.0.1:9"))
    gc.collect()
    gc.freeze()  # as serve does once loaded: no collection walks the compiled policy
    requests = {}
    for tasks, runtime in runtimes.items():
        host, path = _target(tasks)
        requests[tasks] = AuthzRequest(Direction.EGRESS, "GET", "http", host, path, {"x-request-id": "r"})
        for _ in range(1000):
            runtime.decide(requests[tasks], "warm")
    best = dict.fromkeys(counts, float("inf"))
    for _ in range(rounds):
        for tasks, runtime in runtimes.items():
            request = requests[tasks]
            started = time.perf_counter()
            for _ in range(iterations):
                runtime.decide(request, "d")
            best[tasks] = min(best[tasks], (time.perf_counter() - started) / iterations * 1e6)
    return best


def startup(work: Path, tasks: int, runs: int) -> float:
    """Seconds from spawning ``agent-authz serve`` to a ready ``/readyz`` (median of ``runs``)."""
    from sidecar.harness import SidecarProcess

    state = work / "startup"
    state.mkdir()
    _write_keys(state)
    config = _sidecar_config(state, socket_dir() / "authz.sock", tasks, "127.0.0.1:9")
    times = []
    for i in range(runs):
        proc = SidecarProcess(config, log_dir=state, name=f"s{i}")
        started = time.monotonic()
        proc.start()
        try:
            proc.wait_ready(30)
            times.append(time.monotonic() - started)
        finally:
            proc.stop()
    return sorted(times)[len(times) // 2]


def policy_bytes_per_rule(work: Path) -> float:
    """Bytes of Python objects the runtime keeps per compiled rule (tracemalloc: 1,000 tasks minus 10)."""
    import tracemalloc

    sizes = {}
    for tasks in (10, 1000):
        state = work / f"bytes-{tasks}"
        state.mkdir()
        _write_keys(state)
        config = _sidecar_config(state, state / "x.sock", tasks, "127.0.0.1:9")
        gc.collect()
        tracemalloc.start()
        runtime = Runtime(config)
        gc.collect()
        sizes[tasks] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del runtime
    return (sizes[1000] - sizes[10]) / ((1000 - 10) * RULES_PER_TASK)


def pod_ready(runs: int) -> dict[str, Any]:
    """``bench/pod_ready.py`` (the pod simulation; needs root and helm), or why it was not run."""
    if os.geteuid() != 0:
        return {"skipped": "needs root (network namespaces)"}
    tools = REPO / ".tools" / "bin"
    if shutil.which("helm") is None and not (tools / "helm").exists():
        return {"skipped": "needs helm (scripts/install-k8s-tools.sh)"}
    os.environ["PATH"] = f"{tools}:{os.environ['PATH']}"
    sys.path.insert(0, str(REPO / "bench"))
    import pod_ready as ready

    measured = [ready.one_pod(i) for i in range(runs)]
    return {"runs": measured, "median": ready.summary(measured), "report": ready.report(measured)}


# -- report ----------------------------------------------------------------------------------------
def _yes(met: bool | None) -> str:
    return "" if met is None else "yes" if met else "no"


def report(results: dict[str, Any]) -> str:
    configs = results["configs"]
    base = configs["a_envoy"]["at_1000"]
    lines = [
        f"Machine: {results['machine']}; {results['tasks']} tasks × {RULES_PER_TASK} rules; "
        f"{results['seconds_per_run']} s per run; decision log on.",
        "",
        "| configuration | req/s (wrk -c16) | p50 / p90 / p99 @500 (ms) | p50 / p90 / p99 @1000 (ms) "
        "| added @1000 vs (a) | CPU µs / request |",
        "|---|---|---|---|---|---|",
    ]
    for name, figures in configs.items():
        f5, f10 = figures["at_500"], figures["at_1000"]
        label = f"{name} ¹" if name.startswith("g") else name
        added = " / ".join(f"{f10[p] - base[p]:+.2f}" for p in ("p50", "p90", "p99"))
        cpu = f"{figures['cpu_s_per_1000'] * 1000:.0f}" if "cpu_s_per_1000" in figures else ""
        lines.append(
            f"| {label} | {figures['rps']:.0f} | {f5['p50']:.2f} / {f5['p90']:.2f} / {f5['p99']:.2f} | "
            f"{f10['p50']:.2f} / {f10['p90']:.2f} / {f10['p99']:.2f} | {added} | {cpu} |"
        )
    t, flat, mem = results["targets"], results["flat_cost"], results["memory"]
    if "g_intercept" in configs:
        g, g0, d = (configs[n]["at_1000"] for n in ("g_intercept", "g0_intercept_no_authz", "d_agent_authz"))
        lines += [
            "",
            "¹ through `HTTPS_PROXY` (`hey -x`, CONNECT), TLS terminated by Envoy and re-originated to an HTTPS "
            "upstream; req/s with `hey -c16`.",
            "",
            "Intercepted HTTPS @1000 req/s, added p50 / p90 / p99 (ms): over the same TLS path without ext_authz "
            f"(g0): {' / '.join(f'{g[p] - g0[p]:+.2f}' for p in ('p50', 'p90', 'p99'))}; "
            f"over plain-HTTP agent-authz (d): {' / '.join(f'{g[p] - d[p]:+.2f}' for p in ('p50', 'p90', 'p99'))}.",
        ]
    ceiling_ = results["ceiling"]
    d, dg = configs["d_agent_authz"], configs["d_grpc"]
    lines += [
        "",
        "Transports, same run (req/s with wrk -c16; CPU of the ext_authz process per request during it): "
        + "; ".join(
            f"{configs[f'c_trivial_{x}']['transport']} trivial {configs[f'c_trivial_{x}']['rps']:.0f} "
            f"({configs[f'c_trivial_{x}']['cpu_s_per_1000'] * 1000:.0f} µs)"
            for x in TRIVIAL
        )
        + f"; agent-authz over HTTP {d['rps']:.0f} ({d['cpu_s_per_1000'] * 1000:.0f} µs), "
        f"over gRPC {dg['rps']:.0f} ({dg['cpu_s_per_1000'] * 1000:.0f} µs): HTTP/gRPC {d['rps'] / dg['rps']:.2f}×.",
    ]
    ready = results["ready"]
    ready_text = (
        f"{ready['median']['ready_s']:.2f} s (kubelet every 1 s: {ready['median']['kubelet_s']:.1f} s)"
        if "median" in ready
        else f"not measured: {ready.get('skipped', '?')}"
    )
    soak = results.get("soak")
    soak_text = (
        f"{soak['errors']} errors, RSS {soak['rss_growth_pct']:+.1f} % after minute 1 ({soak['minutes']} min)"
        if soak
        else "not run (--quick; bench/soak.py)"
    )
    lines += [
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
        f"| throughput (d) / best trivial ({ceiling_['server']}) | ≥ 0.85 | {results['throughput_ratio']:.2f} "
        f"({d['rps']:.0f} / {ceiling_['rps']:.0f}) | {_yes(t['throughput'])} |",
        f"| added p50 @1000 (d) | ≤ 0.8 ms | {results['added_latency_ms']['p50']:.2f} ms | {_yes(t['p50'])} |",
        f"| added p99 @1000 (d) | ≤ 3 ms | {results['added_latency_ms']['p99']:.2f} ms | {_yes(t['p99'])} |",
        f"| sidecar RSS (d), 1000 × 10 rules | ≤ 64 MB | {results['rss_mb']:.1f} MB | {_yes(t['rss'])} |",
        f"| RSS `intercept` adds (g − d) | ≤ 10 MB | {mem['intercept_adds_mb']:+.1f} MB | {_yes(t['intercept'])} |",
        f"| pod ready (pod simulation, chart defaults) | ≤ 1 s | {ready_text} | {_yes(t['ready'])} |",
        f"| decision cost 10 vs 10,000 tasks | within 10 % | {flat['us_10']:.1f} µs vs {flat['us_10000']:.1f} µs "
        f"({flat['ratio']:.2f}×) | {_yes(t['flat'])} |",
        f"| soak: errors, RSS growth | 0, < 5 % | {soak_text} | {_yes(t.get('soak'))} |",
        f"| Envoy RSS (d); sidecar + Envoy | - | {mem['envoy_rss_mb']:.1f} MB; {mem['pair_mb']:.1f} MB | |",
        f"| compiled policy per rule | - | {mem['policy_bytes_per_rule']:.0f} bytes | |",
        f"| ingress (f) / same mTLS hop without ext_authz (f0) | - | {results['ingress_ratio']:.2f} "
        f"({configs['f_ingress_mtls_svid']['rps']:.0f} / {configs['f0_mtls_baseline']['rps']:.0f}) | |",
        f"| sidecar start to ready ({results['tasks']} tasks, no pod) | - | {results['startup_s']:.2f} s | |",
    ]
    if "median" in ready:
        lines += ["", ready["report"]]
    if "trivial_rps_by_workers" in results:
        by = results["trivial_rps_by_workers"]
        lines += [
            "",
            f"Worker processes, measured on the Python ceiling ({by['transport']}): 1 process {by['1']:.0f} req/s, "
            f"2 processes (one socket each, two endpoints) {by['2']:.0f} req/s ({by['2'] / by['1']:.2f}×).",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, one pod, no soak (about 2 minutes here)")
    parser.add_argument("--json", help="write all figures here")
    parser.add_argument("--tasks", type=int, default=1000, help="tasks in the configuration (10 rules each)")
    parser.add_argument("--soak-minutes", type=float, help="soak length (default: 10, 0 with --quick)")
    args = parser.parse_args(argv)
    for tool in ("wrk", "hey"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (apt-get install -y wrk hey)", file=sys.stderr)
            return 2
    soak_minutes = args.soak_minutes if args.soak_minutes is not None else (0 if args.quick else 10)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="agent-authz-bench-"))
    bench = Bench(work, args.quick, args.tasks)
    soak: dict[str, Any] | None = None
    try:
        print(f"benchmark in {work}", flush=True)
        run_configs(bench)
        iterations = 2000 if args.quick else 20000
        cost = decision_cost(work, (10, 10_000), iterations)
        flat = {"us_10": cost[10], "us_10000": cost[10_000]}
        flat["ratio"] = flat["us_10000"] / flat["us_10"]
        start_s = startup(work, args.tasks, 3 if args.quick else 5)
        per_rule = policy_bytes_per_rule(work)
        print("  pod simulation ...", flush=True)
        ready = pod_ready(1 if args.quick else 5)
        if soak_minutes > 0:
            import soak as soak_bench

            print(f"  soak, {soak_minutes:g} minutes ...", flush=True)
            soak = soak_bench.run_soak(work / "soak", minutes=soak_minutes, tasks=args.tasks)
    finally:
        bench.stop_all()
    configs = bench.results
    d, a = configs["d_agent_authz"], configs["a_envoy"]
    best = ceiling(configs)
    added = {p: round(d["at_1000"][p] - a["at_1000"][p], 3) for p in ("p50", "p90", "p99")}
    memory = {
        "sidecar_rss_mb": d["rss_mb"],
        "envoy_rss_mb": d["envoy_rss_mb"],
        "pair_mb": round(d["rss_mb"] + d["envoy_rss_mb"], 1),
        "intercept_adds_mb": round(configs["g_intercept"]["rss_mb"] - d["rss_mb"], 1),
        "policy_bytes_per_rule": round(per_rule),
    }
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "tasks": args.tasks,
        "seconds_per_run": bench.seconds,
        "configs": configs,
        "ceiling": {"server": configs[best]["transport"], "config": best, "rps": configs[best]["rps"]},
        "throughput_ratio": round(d["rps"] / configs[best]["rps"], 3),
        "throughput_ratio_grpc": round(configs["d_grpc"]["rps"] / configs[best]["rps"], 3),
        "added_latency_ms": added,
        "rss_mb": d["rss_mb"],
        "memory": memory,
        "ready_s": ready["median"]["ready_s"] if "median" in ready else None,
        "ready": ready,
        "ingress_ratio": round(configs["f_ingress_mtls_svid"]["rps"] / configs["f0_mtls_baseline"]["rps"], 3),
        "flat_cost": {k: round(v, 2) for k, v in flat.items()},
        "startup_s": round(start_s, 3),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    if soak is not None:
        results["soak"] = soak
    if bench.workers_rps is not None:
        results["trivial_rps_by_workers"] = bench.workers_rps
    results["targets"] = {
        "throughput": results["throughput_ratio"] >= 0.85,
        "p50": added["p50"] <= 0.8,
        "p99": added["p99"] <= 3.0,
        "rss": results["rss_mb"] <= 64,
        "intercept": memory["intercept_adds_mb"] <= 10,
        "ready": results["ready_s"] <= 1.0 if results["ready_s"] is not None else None,
        "flat": abs(flat["ratio"] - 1) <= 0.10,
        "soak": (soak["errors"] == 0 and soak["rss_growth_pct"] < 5) if soak is not None else None,
    }
    print()
    print(report(results))
    print(f"\n(elapsed {results['elapsed_s']} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
