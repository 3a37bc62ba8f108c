"""How long an injected pod's proxy takes to be ready: container start -> Envoy and the sidecar ready.

Run (as root, with helm from ``scripts/install-k8s-tools.sh``):
``.venv/bin/python bench/pod_ready.py [--runs N] [--json PATH]``

The pod of ``tests/e2e/test_injected_pod.py``, with the chart's default values: ``helm template``,
the webhook's real AdmissionReview answer and patch, and the pod simulation of
``tests/support/kubelet.py`` (network namespaces, the init step's iptables rules, per-container
mounts, the proxy UID, read-only roots), a SPIFFE Workload API server for the SVID. The kubelet's
part is played step by step so that each moment is seen within milliseconds: the native sidecars
start in the order and with the dependencies the chart gives them (the next one after the
previous one's ``startupProbe`` passes when it has one), and readiness is polled every 5 ms from
inside the pod (``/readyz`` and ``/envoy/ready`` on the probe port) rather than every
``periodSeconds`` as a real kubelet does. Per run:

* ``ready_s`` - from the first proxy container's start to both the sidecar's ``/readyz`` and
  Envoy's ``/ready`` (through ``/envoy/ready``) answering 200;
* the sidecar's breakdown from its ``serving`` log line (``startup_s``, monotonic): interpreter and
  imports, configuration, identity (the Workload API's first SVID), runtime (policy, keys, state),
  servers listening; the Envoy container's from its ``envoy_exec`` line: interpreter and imports,
  bootstrap rendering, then Envoy itself until ``/ready``;
* ``kubelet_s`` - when a kubelet probing every ``periodSeconds`` (1 s in the chart) would see it.

Prints the median of ``--runs`` pods (default 5), a fresh pod each.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from sidecar.identity.devca import DevCA  # noqa: E402
from sidecar.inject import layout  # noqa: E402
from sidecar.simulation.chart import find, secret_data  # noqa: E402
from sidecar.simulation.kubelet import Kubelet  # noqa: E402
from sidecar.simulation.netns import AGENT_UID  # noqa: E402
from sidecar.simulation.webhook import Webhook  # noqa: E402
from sidecar.simulation.workload_api import WorkloadApiServer, serve_sds  # noqa: E402
from tests.support.k8s import RESTRICTED, validate  # noqa: E402
from tests.support.netns_pod import pod_sandbox  # noqa: E402
from tests.support.webhook_env import admission_review, install, patched  # noqa: E402

TD = "bench.example"
AGENT = f"spiffe://{TD}/ns/agents/sa/worker"
API = "api.example.com"
TASK = {
    "id": "bench",
    "purpose": "pod start",
    "ttl": "1h",
    "egress": [{"name": "items", "host": API, "methods": ["GET"], "paths": ["/v1/items/*"]}],
}
VALUES = {  # the chart's defaults, plus what any install sets: the namespaces, the trust domain, the issuer
    "agentNamespaces": ["agents"],
    "identity": {"trustDomain": TD},
    "sidecar": {"issuerUrl": "https://agent-authz.bench.example"},
}
POLL = 0.005


def _agent_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "agent",
            "namespace": "agents",
            "annotations": {layout.ANNOTATION_TASK: yaml.safe_dump(TASK)},
        },
        "spec": {
            "serviceAccountName": "worker",
            "containers": [
                {
                    "name": "agent",
                    "image": "registry.example/agent:1.0",
                    "command": ["sleep", "3600"],
                    "securityContext": {**RESTRICTED, "runAsUser": AGENT_UID, "runAsGroup": AGENT_UID},
                }
            ],
        },
    }


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def _json_line(path: Path, event: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    for line in path.read_text(errors="replace").splitlines():
        if f'"{event}"' in line:
            try:
                entry: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("event") == event:
                return entry
    return None


def one_pod(run: int) -> dict[str, Any]:
    """Admit, lay out and start one pod; time its proxy containers."""
    with pod_sandbox(f"aa-ready{run}-", tools=["nsenter", "unshare", "mount"]) as sandbox:
        net, base = sandbox.net, sandbox.base
        installed = install(base / "chart", VALUES)
        webhook = sandbox.keep(Webhook(installed, base / "chart"))
        webhook.start()
        pod = _agent_pod()
        admitted = patched(pod, webhook.review(admission_review(pod)))
        validate(admitted)
        csi = sandbox.dir("csi")
        spire = sandbox.keep(WorkloadApiServer(csi / "spire-agent.sock", DevCA.create(TD), AGENT))
        serve_sds(spire)
        spire.start()
        (csi / "spire-agent.sock").chmod(0o777)
        objects = [m for m in installed.manifests if m["metadata"].get("namespace") == "agents"]
        kubelet = sandbox.keep(
            Kubelet(
                admitted,
                net,
                base / "node",
                config_maps={m["metadata"]["name"]: m["data"] for m in find(objects, "ConfigMap")},
                secrets={
                    m["metadata"]["name"]: {k: secret_data(m, k) for k in m["data"]} for m in find(objects, "Secret")
                },
                csi={"csi.spiffe.io": csi},
                path=f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                hide=(base,),
            )
        )
        kubelet.lay_out_volumes()
        init, *sidecars = admitted["spec"]["initContainers"]
        started = time.monotonic()
        kubelet.run_to_completion(init)
        init_s = time.monotonic() - started
        by_name = {c["name"]: c for c in sidecars}
        sidecar = by_name[layout.CONTAINER_SIDECAR]
        health = next(p["containerPort"] for p in sidecar["ports"] if p["name"] == "authz-health")
        order = [c["name"] for c in sidecars]
        period = max(int(c.get("startupProbe", {}).get("periodSeconds", 1)) for c in sidecars)
        t0 = time.monotonic()
        moments: dict[str, float] = {}

        def ready(name: str) -> bool:
            path = "/readyz" if name == layout.CONTAINER_SIDECAR else "/envoy/ready"
            with net.inside():
                return _get(health, path) == 200

        pending = list(order)
        while True:
            if pending:  # start the next one now, unless the previous one's startupProbe has not passed
                previous = order[order.index(pending[0]) - 1] if order.index(pending[0]) else None
                gate = (
                    previous is not None and "startupProbe" in by_name[previous] and f"{previous}_ready" not in moments
                )
                if not gate:
                    name = pending.pop(0)
                    moments[f"{name}_start"] = time.monotonic()
                    kubelet.start(by_name[name])
                    continue
            for name in order:
                if f"{name}_start" in moments and f"{name}_ready" not in moments and ready(name):
                    moments[f"{name}_ready"] = time.monotonic()
            if all(f"{n}_ready" in moments for n in order):
                break
            if time.monotonic() - t0 > 120:
                raise TimeoutError(f"not ready after 120 s: {moments}")
            time.sleep(POLL)
        logs = kubelet.logs
        serving = _json_line(logs / f"{layout.CONTAINER_SIDECAR}.err", "serving") or {}
        exec_line = _json_line(logs / f"{layout.CONTAINER_ENVOY}.err", "envoy_exec") or {}
        done = max(moments[f"{n}_ready"] for n in order)
        result: dict[str, Any] = {
            "order": order,
            "init_s": round(init_s, 3),
            "ready_s": round(done - t0, 3),
            "kubelet_s": _kubelet_view(moments, order, by_name, t0, period),
            "sidecar_ready_s": round(
                moments[f"{layout.CONTAINER_SIDECAR}_ready"] - moments[f"{layout.CONTAINER_SIDECAR}_start"], 3
            ),
            "envoy_ready_s": round(
                moments[f"{layout.CONTAINER_ENVOY}_ready"] - moments[f"{layout.CONTAINER_ENVOY}_start"], 3
            ),
        }
        sidecar_start = moments[f"{layout.CONTAINER_SIDECAR}_start"]
        if serving:
            stamps, at = serving["startup_s"], serving["started_monotonic"]
            result["sidecar"] = {
                "interpreter_s": round(at - sidecar_start, 3),  # exec, the container runtime, Python's own start
                "imports_s": round(stamps["serve"], 3),
                "config_s": round(stamps["config"] - stamps["serve"], 3),
                "identity_s": round(stamps["identity"] - stamps["config"], 3),
                "runtime_s": round(stamps["runtime"] - stamps["identity"], 3),
                "servers_s": round(stamps["ready"] - stamps["runtime"], 3),
            }
        if exec_line:
            stamps, at = exec_line["startup_s"], exec_line["started_monotonic"]
            envoy_start = moments[f"{layout.CONTAINER_ENVOY}_start"]
            result["envoy"] = {
                "interpreter_s": round(at - envoy_start, 3),
                "imports_config_s": round(stamps["render"], 3),
                "render_s": round(stamps["rendered"] - stamps["render"], 3),
                "envoy_s": round(moments[f"{layout.CONTAINER_ENVOY}_ready"] - (at + stamps["exec"]), 3),
            }
        kubelet.stop()
        return result


def _kubelet_view(
    moments: dict[str, float], order: list[str], by_name: dict[str, Any], t0: float, period: int
) -> float:
    """When a kubelet probing every ``period`` seconds from each container's start would see all ready
    (a sidecar with a startupProbe gates the next one on that probe)."""
    clock, seen = t0, 0.0
    for name in order:
        ready_after = moments[f"{name}_ready"] - moments[f"{name}_start"]
        probe_at = clock + math.ceil(max(ready_after, 0) / period) * period
        seen = max(seen, probe_at)
        if "startupProbe" in by_name[name]:
            clock = probe_at
    return round(seen - t0, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="write every run's figures here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("pod_ready: needs root (network namespaces, mounts, iptables)", file=sys.stderr)
        return 2
    runs = [one_pod(i) for i in range(args.runs)]
    print(report(runs))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "median": summary(runs)}, indent=2) + "\n")
    return 0


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over ``runs``."""

    def med(*keys: str) -> float:
        values = []
        for run in runs:
            value: Any = run
            for key in keys:
                value = value.get(key, {}) if isinstance(value, dict) else {}
            if isinstance(value, (int, float)):
                values.append(float(value))
        return round(statistics.median(values), 3) if values else float("nan")

    return {
        "ready_s": med("ready_s"),
        "kubelet_s": med("kubelet_s"),
        "init_s": med("init_s"),
        "sidecar_ready_s": med("sidecar_ready_s"),
        "envoy_ready_s": med("envoy_ready_s"),
        "sidecar": {
            k: med("sidecar", k)
            for k in ("interpreter_s", "imports_s", "config_s", "identity_s", "runtime_s", "servers_s")
        },
        "envoy": {k: med("envoy", k) for k in ("interpreter_s", "imports_config_s", "render_s", "envoy_s")},
        "order": runs[0]["order"] if runs else [],
    }


def report(runs: list[dict[str, Any]]) -> str:
    s = summary(runs)
    sc, ev = s["sidecar"], s["envoy"]
    return "\n".join(
        [
            f"pod ready (median of {len(runs)}; containers {' -> '.join(s['order'])}): {s['ready_s']:.2f} s from "
            f"the first proxy container's start to both ready (a kubelet probing every second: "
            f"{s['kubelet_s']:.1f} s); init step before it {s['init_s']:.2f} s",
            f"  sidecar {s['sidecar_ready_s']:.2f} s: interpreter {sc['interpreter_s']:.2f}, imports "
            f"{sc['imports_s']:.2f}, config {sc['config_s']:.2f}, identity {sc['identity_s']:.2f}, runtime "
            f"{sc['runtime_s']:.2f}, servers {sc['servers_s']:.2f}",
            f"  envoy container {s['envoy_ready_s']:.2f} s: interpreter {ev['interpreter_s']:.2f}, imports and "
            f"config {ev['imports_config_s']:.2f}, bootstrap rendering {ev['render_s']:.2f}, Envoy to /ready "
            f"{ev['envoy_s']:.2f}",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
