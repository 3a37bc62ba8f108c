"""The agent of the cluster scenario: the process in each pod's own container (UID 1000, no proxy setting).

It knows nothing about tokens, keys or policies: it makes plain HTTP calls (the pod's iptables rules
send them through Envoy), calls its sidecar's local task API on ``127.0.0.1:9902``, and - the
orchestrator - the Kubernetes API with its ServiceAccount token. What it does next it reads from its
work queue, a directory in an ``emptyDir`` (``/work/in/N.json``, answered in ``/work/out/N.json``):
the scenario plays the model that decides, the agent's process is real.

    python -m sidecar.demo.cluster.agent --work /work

Commands (``op``): ``calls`` (a list of HTTP calls), ``probe`` (call one URL until the deny
reason is ``until``; the POSIX time of that first answer; it writes ``started`` when it begins),
``task_api`` (the local task API), ``kube`` (the Kubernetes API, ``https://kubernetes.default.svc``,
verified with the token volume's ``ca.crt``), ``look`` (whether paths exist and can be read: what
the agent can see), ``exit``.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["main"]

TASK_API = "http://127.0.0.1:9902"
KUBE_API = "https://kubernetes.default.svc"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _call(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """One HTTP call: ``{"status", "reason", "decision_id", "body"}`` (status 0: no answer)."""
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})  # noqa: S310 - given URLs
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(request, timeout=10) as response:
            status, answer, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        status, answer, raw = err.code, err.headers, err.read()
    except OSError as err:
        return {"status": 0, "reason": None, "decision_id": None, "body": str(err)}
    return {
        "status": status,
        "reason": answer.get("x-agent-authz-reason"),
        "decision_id": answer.get("x-agent-authz-decision-id"),
        "body": raw.decode(errors="replace")[:65536],
    }


def _probe(command: dict[str, Any]) -> dict[str, Any]:
    """Call ``url`` every ``interval`` seconds until the deny reason is ``until`` (or ``timeout``)."""
    deadline = time.monotonic() + float(command.get("timeout", 10))
    if command.get("started"):  # the scenario acts once every probe runs
        Path(command["started"]).write_text(str(time.time()))
    tries = 0
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        tries += 1
        last = _call(command.get("method", "GET"), command["url"])
        if (last["reason"] or ("allowed" if last["status"] == 200 else None)) == command["until"]:
            return {"first": time.time(), "tries": tries, "status": last["status"], "reason": last["reason"]}
        time.sleep(float(command.get("interval", 0.005)))
    return {"first": None, "tries": tries, "status": last.get("status"), "reason": last.get("reason")}


def _kube(command: dict[str, Any]) -> dict[str, Any]:
    """A Kubernetes API request with the pod's ServiceAccount token."""
    token = (SERVICE_ACCOUNT / "token").read_text().strip()
    context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
    body = command.get("body")
    request = urllib.request.Request(  # noqa: S310 - the API server's https:// URL
        KUBE_API + command["path"],
        data=None if body is None else json.dumps(body).encode(),
        method=command["method"],
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(request, timeout=15) as response:
            return {"status": response.status, "body": json.loads(response.read() or b"null")}
    except urllib.error.HTTPError as err:
        return {"status": err.code, "body": json.loads(err.read() or b"null")}


def _look(paths: list[str]) -> dict[str, Any]:
    """For each path: ``absent``, ``readable`` or the error opening it (what this container sees)."""
    seen = {}
    for path in paths:
        if not os.path.lexists(path):
            seen[path] = "absent"
            continue
        try:
            with open(path, "rb") as handle:
                handle.read(1)
            seen[path] = "readable"
        except OSError as exc:
            seen[path] = type(exc).__name__
    return {"paths": seen, "uid": os.getuid()}


def run(command: dict[str, Any]) -> Any:
    """Carry out one command (see the module docstring)."""
    op = command["op"]
    if op == "calls":
        return [_call(c["method"], c["url"], c.get("body"), c.get("headers")) for c in command["calls"]]
    if op == "probe":
        return _probe(command)
    if op == "task_api":
        return _call(command["method"], TASK_API + command["path"], command.get("body"))
    if op == "kube":
        return _kube(command)
    if op == "look":
        return _look(command["paths"])
    raise ValueError(f"unknown op {op!r}")


def main(argv: list[str] | None = None) -> int:
    """Serve the work queue until an ``exit`` command; returns its code."""
    parser = argparse.ArgumentParser(prog="sidecar.demo.cluster.agent")
    parser.add_argument("--work", required=True, type=Path)
    args = parser.parse_args(argv)
    inbox, outbox = args.work / "in", args.work / "out"
    for directory in (inbox, outbox):
        directory.mkdir(parents=True, exist_ok=True)
    (args.work / "ready").write_text(str(os.getpid()))
    done: set[str] = set()
    while True:
        for path in sorted(inbox.glob("[0-9]*.json")):  # not the scenario's ".N.json" being written
            if path.name in done:
                continue
            done.add(path.name)
            command = json.loads(path.read_text())
            if command["op"] == "exit":
                (outbox / path.name).write_text("{}")
                return int(command.get("code", 0))
            try:
                result = {"ok": True, "result": run(command)}
            except Exception as exc:  # reported to the scenario, which judges
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            tmp = outbox / f".{path.name}"
            tmp.write_text(json.dumps(result))
            tmp.replace(outbox / path.name)
        time.sleep(0.005)


if __name__ == "__main__":
    raise SystemExit(main())
