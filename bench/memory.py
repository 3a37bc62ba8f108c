"""The sidecar's memory: RSS of ``agent-authz serve`` idle and after load, and of its imports.

Run: ``.venv/bin/python bench/memory.py [--seconds 20] [--json PATH]``

Per row, ``VmRSS`` / ``RssAnon`` / ``RssFile`` (MB, from ``/proc/PID/status``):

* ``import sidecar.server`` in a fresh interpreter (what every ``serve`` pays before configuration);
* ``agent-authz serve`` idle with 10 tasks, and idle with 1,000 tasks × 10 rules (``bench/run.py``'s
  ``_tasks`` and ``_sidecar_config``: decision logging to a file on);
* the 1,000 × 10 stack after ``wrk -t1 -c16`` for ``--seconds`` through Envoy's egress listener
  (the last task's last rule, token cache hits: (d) of ``bench/run.py``), then the same after
  ``--seconds`` more, twice (flat means bounded).

Needs ``wrk`` on PATH.
"""

from __future__ import annotations

import argparse
import json
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

from run import _bootstrap, _listener, _sidecar_config, _target, _write_keys, wrk  # noqa: E402

from sidecar.harness import AuthzStack, EnvoyProcess  # noqa: E402

_FIELDS = ("VmRSS", "RssAnon", "RssFile")


def rss(pid: int) -> dict[str, float]:
    """``VmRSS``, ``RssAnon``, ``RssFile`` of ``pid`` in MB (10^6 bytes)."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in _FIELDS:
            out[name] = round(int(value.split()[0]) * 1024 / 1e6, 1)
    return out


def imports() -> dict[str, float]:
    """RSS after ``import sidecar.server`` in a fresh interpreter."""
    code = "import sidecar.server, os; print(open(f'/proc/{os.getpid()}/status').read())"
    status = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    out: dict[str, float] = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in _FIELDS:
            out[name] = round(int(value.split()[0]) * 1024 / 1e6, 1)
    return out


def stack_rss(work: Path, tasks: int, up: str, seconds: int) -> dict[str, Any]:
    """The sidecar's RSS idle (2 s after ready) and, with ``seconds``, after two load runs."""
    state = work / f"state-{tasks}"
    state.mkdir()
    _write_keys(state)
    sock = Path(tempfile.mkdtemp(prefix="bench-mem-", dir="/tmp")) / "authz.sock"
    config = _sidecar_config(state, sock, tasks, up)
    run = work / f"run-{tasks}"
    run.mkdir()
    stack = AuthzStack(config, run)
    stack.start()
    try:
        pid = stack.sidecar.proc.pid  # type: ignore[union-attr]
        time.sleep(2)
        out: dict[str, Any] = {"idle": rss(pid)}
        if seconds:
            host, path = _target(tasks)
            out["rps"] = wrk(stack.egress_port, host, path, seconds)[0]
            out["load"] = rss(pid)
            wrk(stack.egress_port, host, path, seconds)[0]
            out["load2"] = rss(pid)
            wrk(stack.egress_port, host, path, seconds)[0]
            out["load3"] = rss(pid)
        return out
    finally:
        stack.stop()
        shutil.rmtree(sock.parent, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=20, help="seconds of wrk load per run")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="agent-authz-mem-"))
    results: dict[str, Any] = {"imports": imports()}
    upstream = EnvoyProcess(_write(work, _bootstrap(_listener("up", [], "", direct=True), [])), log_dir=work)
    upstream.start()
    try:
        upstream.wait_ready(30)
        up = f"127.0.0.1:{upstream.listener_port('up')}"
        results["tasks_10"] = stack_rss(work, 10, up, 0)
        results["tasks_1000"] = stack_rss(work, 1000, up, args.seconds)
    finally:
        upstream.stop()
    rows = [
        ("import sidecar.server", results["imports"]),
        ("serve idle, 10 tasks", results["tasks_10"]["idle"]),
        ("serve idle, 1000 × 10", results["tasks_1000"]["idle"]),
        (f"after {args.seconds} s wrk -c16", results["tasks_1000"].get("load")),
        (f"after {2 * args.seconds} s wrk -c16", results["tasks_1000"].get("load2")),
        (f"after {3 * args.seconds} s wrk -c16", results["tasks_1000"].get("load3")),
    ]
    print("| | VmRSS | RssAnon | RssFile |\n|---|---:|---:|---:|")
    for name, row in rows:
        if row:
            print(f"| {name} | {row['VmRSS']} | {row['RssAnon']} | {row['RssFile']} |")
    if "rps" in results["tasks_1000"]:
        print(f"(load: {results['tasks_1000']['rps']:.0f} req/s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _write(work: Path, bootstrap: dict[str, Any]) -> Path:
    path = work / "upstream.json"
    path.write_text(json.dumps(bootstrap))
    return path


if __name__ == "__main__":
    raise SystemExit(main())
