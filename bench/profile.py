"""Where the sidecar's CPU goes per decision: a sampling profile of the running process under load.

Run: ``.venv/bin/python bench/profile.py [--seconds N] [--rate R] [--tasks N] [--speedscope PATH]``

Starts what ``bench/run.py`` measures as (d) - the rendered bootstrap, 1,000 tasks of 10 rules,
decision logging on, every request on the token-cache-hit path - and loads it with ``hey`` at a
fixed rate (default 1000 req/s; ``--rate 0``: ``wrk -c16`` flat out) while ``py-spy record
--native`` samples the sidecar (500 Hz, Python and native frames; nothing in the sidecar
changes; samples of waiting threads - the event loop's ``epoll_wait``, parked workers - are left
out, and those waiting for the GIL are counted apart). Each sample is charged
to the innermost frame that belongs to one stage of a decision:

=============  ======================================================================
parse          the check request read into an ``AuthzRequest`` (protobuf or HTTP)
normalize      host, port and path to their canonical form (``sidecar.http_norm``)
match          task selection and rule matching (``sidecar.policy``, ``Runtime.decide``)
token          the task token from the cache (``sidecar.tokens``)
record         the decision record built (``decision_record``)
log write      the hash chain and the ``write(2)`` (``sidecar.audit``)
metrics        the Prometheus counter and histogram (``sidecar.metrics``)
response       the answer serialized (CheckResponse or HTTP response)
state store    the durable counters (``sidecar.state``; only with limited budgets)
glue           the handler around them (ids, clocks, exceptions)
transport      everything else: the gRPC or HTTP server, the event loop, the interpreter
refusals       recording what Envoy refused without a decision (the gRPC access log stream,
               ``refused_by_proxy``): none under load, but py-spy's native sampling pauses the
               sidecar past Envoy's ext_authz timeout now and then, and each such check comes back
               as a refusal; counted apart, outside the decision's stages
=============  ======================================================================

The per-stage figure is the stage's share of busy samples times the sidecar's CPU seconds per
decision measured just before, without the profiler attached (``/proc/PID/stat`` and the decision
counter; native sampling pauses the process, so it slows it down). ``--transport`` picks the
ext_authz transport of HTTP checks (``envoy.authz_transport``). Needs ``py-spy`` (PyPI), ``hey``
and ``wrk``.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run

from sidecar.harness import AuthzStack, EnvoyProcess

STAGES = (
    "parse",
    "normalize",
    "match",
    "token",
    "record",
    "log write",
    "metrics",
    "response",
    "state store",
    "glue",
    "transport",
)
# (path fragment, function name or None for any) -> stage; the first rule that matches a frame wins
_RULES: tuple[tuple[str, str | None, str], ...] = (
    ("sidecar/envoy_authz/translate.py", "build_check_response", "response"),
    ("sidecar/envoy_authz/translate.py", "_add_headers", "response"),
    ("sidecar/envoy_authz/translate.py", "_deny_body", "response"),
    ("sidecar/envoy_authz/translate.py", None, "parse"),
    ("sidecar/envoy_authz/http_check.py", "build_", "response"),
    ("sidecar/envoy_authz/http_check.py", "_deny_body", "response"),
    ("sidecar/envoy_authz/http_check.py", "parse", "parse"),
    ("sidecar/envoy_authz/http_check.py", "_context", "parse"),
    ("sidecar/envoy_authz/http_check.py", "_interception", "parse"),
    ("sidecar/envoy_authz/http_check.py", "_rpc_route", "parse"),
    ("sidecar/http_norm.py", None, "normalize"),
    ("sidecar/tokens/", None, "token"),
    ("sidecar/state/", None, "state store"),
    ("sidecar/policy/", None, "match"),
    ("sidecar/agentproto/", None, "match"),
    ("sidecar/runtime/active.py", None, "match"),
    ("sidecar/audit/log.py", "decision_record", "record"),
    ("sidecar/audit/", None, "log write"),
    ("sidecar/metrics.py", None, "metrics"),
    ("sidecar/envoy_authz/", None, "glue"),
)
_WAITS = (
    "epoll_wait",
    "epoll_pwait",
    "clock_nanosleep",
    "nanosleep",
    "pthread_cond_wait",
    "pthread_cond_timedwait",
    "PyThread_acquire_lock_timed",
    "sem_clockwait",
    "sem_timedwait",
    "sem_wait",
    "poll",
    "select",
    "accept",
)
"""Frames of a thread that waits (an event loop's poll, a sleeping or parked thread): not CPU."""
_GIL = ("take_gil", "PyEval_RestoreThread", "PyEval_AcquireThread", "PyGILState_Ensure")
"""A wait under these is a thread waiting for the GIL (counted apart: not CPU, but latency)."""
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def _name(frame: str) -> str:
    return frame.split(" (", 1)[0]


def stage_of(stack: str) -> str:
    """The stage a collapsed ``py-spy`` stack (root first, ``;``-separated) is charged to:
    one of :data:`STAGES`, ``refusals``, ``idle`` or ``gil wait``."""
    frames = stack.split(";")
    tail = [_name(f) for f in frames[-6:]]
    if any(name.startswith(_WAITS) for name in tail):
        return "gil wait" if any(name.startswith(_GIL) for name in tail) else "idle"
    if any("sidecar/envoy_authz/access_log.py" in frame for frame in frames):
        return "refusals"
    for frame in reversed(frames):
        found = _FRAME.match(frame)
        if found is None:
            continue
        file, func = found["file"], found["func"]
        for fragment, name, stage in _RULES:
            if fragment in file and (name is None or func.startswith(name)):
                return stage
    return "transport"


def _where(stack: str) -> str:
    """Transport samples by the innermost library or module that has a name."""
    for frame in reversed(stack.split(";")):
        found = re.search(r"\(([^():]+)(?::\d+)?\)$", frame)
        if found is None:
            continue
        where = found[1]
        if "cygrpc" in where or "/grpc/" in where:
            return "grpc"
        if "uvloop" in where or where in ("loop.c", "loop-watcher.c") or _name(frame).startswith("uv_"):
            return "event loop (uvloop)"
        if "asyncio" in where:
            return "asyncio"
        if "aiohttp" in where or "httptools" in where or "llhttp" in where:
            return "http server"
        if where.startswith(("libc.so", "[vdso]")):
            continue
        if "libpython" in where or where.endswith((".c", ".h")):
            return "interpreter"
        return where.rsplit("/", 1)[-1]
    return "system calls"


def breakdown(raw: str) -> tuple[dict[str, int], dict[str, int]]:
    """Samples per stage (and ``idle``, ``gil wait``) of ``py-spy record -f raw`` output, and the
    transport samples by where they were."""
    counts: collections.Counter[str] = collections.Counter()
    where: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stage = stage_of(stack)
        counts[stage] += int(count)
        if stage == "transport":
            where[_where(stack)] += int(count)
    return dict(counts), dict(where)


def profile(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    upstream = EnvoyProcess(work / "upstream.json", log_dir=work, name="upstream")
    (work / "upstream.json").write_text(run.json.dumps(run._bootstrap(run._listener("up", [], "", direct=True), [])))
    upstream.start()
    stack: AuthzStack | None = None
    try:
        upstream.wait_ready(30)
        up = f"127.0.0.1:{upstream.listener_port('up')}"
        state = work / "d"
        state.mkdir()
        run._write_keys(state)
        extra: dict[str, Any] = {}
        if args.transport:
            extra["envoy"] = {"authz_transport": args.transport}
        config = run._sidecar_config(state, run.socket_dir() / "authz.sock", args.tasks, up, **extra)
        (work / "d-run").mkdir()
        stack = AuthzStack(config, work / "d-run")  # process logs apart from the config, as in a pod
        stack.start()
        host, path = run._target(args.tasks)
        url = f"http://127.0.0.1:{stack.egress_port}{path}"
        subprocess.run(["wrk", "-t1", "-c16", "-d2s", "-H", f"Host: {host}", url], capture_output=True, check=True)
        pid = stack.sidecar.proc.pid  # type: ignore[union-attr]
        load = (
            ["wrk", "-t1", "-c16", f"-d{args.seconds + 3}s", "-H", f"Host: {host}", url]
            if args.rate == 0
            else ["hey", "-z", f"{args.seconds + 3}s", "-c", "10", "-q", str(args.rate // 10), "-host", host, url]
        )
        loader = subprocess.Popen(load, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1)
        # CPU per decision in a window without the profiler attached (sampling perturbs the process)
        cpu0, n0 = run._proc_cpu(pid), run._decisions(stack)
        time.sleep(args.seconds / 2)
        cpu, decisions = run._proc_cpu(pid) - cpu0, run._decisions(stack) - n0
        raw_path = work / "profile.txt"
        spy = ["py-spy", "record", "-r", "500", "-p", str(pid), "-d", str(args.seconds // 2)]
        subprocess.run([*spy, "--native", "-f", "raw", "-o", str(raw_path)], capture_output=True, check=True)
        if args.speedscope:
            speedscope = [*spy, "--native", "-f", "speedscope", "-o", args.speedscope]
            subprocess.run(speedscope, capture_output=True, check=True)
        out, _ = loader.communicate(timeout=60)
        if args.raw:
            shutil.copy(raw_path, args.raw)
        counts, where = breakdown(raw_path.read_text())
        busy = sum(counts.get(stage, 0) for stage in STAGES)
        per = cpu / max(decisions, 1) * 1e6
        return {
            "transport": args.transport or "default",
            "load": "wrk -c16" if args.rate == 0 else f"hey -q at {args.rate} req/s",
            "decisions": decisions,
            "decisions_per_s": round(decisions / (args.seconds / 2), 1),
            "cpu_us_per_decision": round(per, 1),
            "samples": busy,
            "idle_samples": counts.get("idle", 0),
            "gil_wait_samples": counts.get("gil wait", 0),
            "refusal_samples": counts.get("refusals", 0),
            "stages": {s: round(counts.get(s, 0) / max(busy, 1), 4) for s in STAGES},
            "transport_by_where": {
                k: round(v / max(busy, 1), 4) for k, v in sorted(where.items(), key=lambda kv: -kv[1])
            },
            "load_output": out[-600:],
        }
    finally:
        if stack is not None:
            stack.stop()
        upstream.stop()


def report(result: dict[str, Any]) -> str:
    per = result["cpu_us_per_decision"]
    lines = [
        f"transport {result['transport']}, {result['load']} ({result['decisions_per_s']:.0f} decisions/s reached): "
        f"{per:.0f} µs of sidecar CPU per decision; {result['samples']} busy samples, "
        f"{result['gil_wait_samples']} waiting for the GIL, {result['refusal_samples']} recording refusals (apart)",
        "",
        "| stage | share of busy samples | µs per decision |",
        "|---|---:|---:|",
    ]
    for stage, share in result["stages"].items():
        lines.append(f"| {stage} | {share * 100:.1f} % | {share * per:.0f} |")
    lines += [
        "",
        "transport, by where: "
        + ", ".join(f"{k} {v * 100:.1f} %" for k, v in list(result["transport_by_where"].items())[:8]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="sampling window")
    parser.add_argument("--rate", type=int, default=1000, help="req/s with hey (0: wrk -c16 flat out)")
    parser.add_argument("--tasks", type=int, default=1000, help="tasks in the configuration (10 rules each)")
    parser.add_argument("--transport", choices=("grpc", "http"), help="envoy.authz_transport (default: the default)")
    parser.add_argument("--speedscope", help="also write a speedscope profile here (a second window)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--raw", help="keep the collapsed stacks (py-spy -f raw) here")
    args = parser.parse_args(argv)
    for tool in ("py-spy", "wrk", "hey"):
        if shutil.which(tool) is None:
            print(f"profile: {tool} is not on PATH (pip install py-spy; apt-get install -y wrk hey)", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="agent-authz-profile-"))
    try:
        result = profile(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(result))
    if args.json:
        Path(args.json).write_text(run.json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
