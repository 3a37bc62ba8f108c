"""Soak: the full stack at a steady 1000 req/s for 10 minutes; errors, latency and memory per minute.

Run: ``.venv/bin/python bench/soak.py [--minutes 10] [--rate 1000] [--tasks 1000] [--json PATH]``
(not part of CI; ``bench/run.py`` runs it too, unless ``--quick``).

The stack of ``bench/run.py``'s (d): Envoy with the rendered bootstrap, the sidecar with 1,000 tasks
of 10 rules, decision logging on (a file, rotated at 64 MiB, 3 kept: a 10-minute soak writes about
400 MiB of records), the default transport. A load generator in its own process (asyncio, HTTP/1.1
keep-alive, 32 connections, requests paced to ``--rate`` per second) sends a fixed mix:

* 70 % allowed, token from the cache (the last task's last rule);
* 20 % denied (``path_not_allowed``: a path no rule of that task names);
* 10 % allowed for a task picked at random among the last 100 (each its own host and token), with
  tokens of 5 s: each is minted on first use and re-minted ahead of expiry (~25 mints a second), so
  the token cache, the key and the minter are exercised, not only the hit path.

Per minute: requests, errors (a transport error, or a status other than the one the mix expects),
p50 / p99 latency seen by the client, the sidecar's RSS (and Envoy's) at the end of the minute.
Targets: 0 errors and less than 5 % RSS growth after the first minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run

from sidecar.harness import AuthzStack, EnvoyProcess, http_get

CONNECTIONS = 32
MINT_TASKS = 100
"""The 10 % share rotates over the last 100 tasks (each with its own host and token)."""


# -- the load generator (a child process) ------------------------------------------------------------
async def _client(
    port: int, queue: asyncio.Queue[tuple[bytes, int, float] | None], out: list[tuple[float, float, bool]]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while True:
        item = await queue.get()
        if item is None:
            break
        raw, expected, due = item
        ok = False
        try:
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            ok = status == expected
        except (OSError, asyncio.IncompleteReadError, ValueError):
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        out.append((due, time.monotonic() - due, ok))
    writer.close()


async def _load(port: int, seconds: float, rate: int, tasks: int, out_path: Path) -> None:
    host, path = run._target(tasks)
    allow = f"GET http://{host}{path} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()
    deny = f"GET http://{host}/forbidden/1 HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()
    mints = [
        f"GET http://t{i}.svc.internal/api/v0/items/1 HTTP/1.1\r\nhost: t{i}.svc.internal\r\n\r\n".encode()
        for i in range(tasks - MINT_TASKS, tasks)
    ]
    queue: asyncio.Queue[tuple[bytes, int, float] | None] = asyncio.Queue()
    results: list[tuple[float, float, bool]] = []
    clients = [asyncio.create_task(_client(port, queue, results)) for _ in range(CONNECTIONS)]
    start = time.monotonic()
    sent = 0
    rng = random.Random(16)  # noqa: S311 - the request mix, not a secret
    with out_path.open("w") as out:
        flushed = 0
        while (now := time.monotonic()) - start < seconds:
            due_count = int((now - start) * rate)
            while sent < due_count:
                pick = rng.random()
                raw, expected = (allow, 200) if pick < 0.7 else (deny, 403) if pick < 0.9 else (rng.choice(mints), 200)
                queue.put_nowait((raw, expected, start + sent / rate))
                sent += 1
            if len(results) - flushed > 500:
                out.write("".join(f"{d - start:.4f} {lat * 1000:.3f} {int(ok)}\n" for d, lat, ok in results[flushed:]))
                flushed = len(results)
            await asyncio.sleep(0.002)
        for _ in clients:
            queue.put_nowait(None)
        await asyncio.gather(*clients)
        out.write("".join(f"{d - start:.4f} {lat * 1000:.3f} {int(ok)}\n" for d, lat, ok in results[flushed:]))


# -- the harness ---------------------------------------------------------------------------------
def _minted(stack: AuthzStack) -> int:
    _, body = http_get(stack.sidecar.admin_url + "/metrics")
    for line in body.decode().splitlines():
        if line.startswith("agent_authz_tokens_minted_total "):
            return int(float(line.split()[1]))
    return 0


def run_soak(work: Path, *, minutes: float = 10, rate: int = 1000, tasks: int = 1000) -> dict[str, Any]:
    """Run the soak in ``work``; returns the per-minute figures and the verdict."""
    work.mkdir(parents=True, exist_ok=True)
    upstream = EnvoyProcess(work / "upstream.json", log_dir=work, name="upstream")
    (work / "upstream.json").write_text(json.dumps(run._bootstrap(run._listener("up", [], "", direct=True), [])))
    upstream.start()
    stack: AuthzStack | None = None
    try:
        upstream.wait_ready(30)
        state = work / "state"
        state.mkdir()
        run._write_keys(state)
        up = f"127.0.0.1:{upstream.listener_port('up')}"
        config = run._sidecar_config(
            state,
            run.socket_dir() / "authz.sock",
            tasks,
            up,
            issuer={"max_token_ttl": "5s"},
            decision_log={"rotate": {"max_bytes": "64MiB", "keep": 3}},
            envoy={"destinations": {f"t{i}.svc.internal": up for i in range(tasks - MINT_TASKS, tasks)}},
        )
        (work / "run").mkdir()
        stack = AuthzStack(config, work / "run")
        stack.start()
        sidecar_pid = stack.sidecar.proc.pid  # type: ignore[union-attr]
        envoy_pid = stack.envoy.proc.pid  # type: ignore[union-attr]
        seconds = minutes * 60
        samples = work / "latencies.txt"
        loader = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "load",
                str(stack.egress_port),
                str(seconds),
                str(rate),
                str(tasks),
                str(samples),
            ]
        )
        started = time.monotonic()
        per_minute: list[dict[str, Any]] = []
        minute = 1
        minted_before = _minted(stack)
        while loader.poll() is None or minute <= int(-(-seconds // 60)):
            if time.monotonic() - started >= minute * 60 or loader.poll() is not None:
                minted = _minted(stack)
                per_minute.append(
                    {
                        "minute": minute,
                        "sidecar_rss_mb": round(run._proc_rss_mb(sidecar_pid), 1),
                        "envoy_rss_mb": round(run._proc_rss_mb(envoy_pid), 1),
                        "minted": minted - minted_before,
                    }
                )
                minted_before = minted
                print(f"  soak minute {minute}: sidecar RSS {per_minute[-1]['sidecar_rss_mb']} MB", flush=True)
                minute += 1
                if loader.poll() is not None and minute > int(-(-seconds // 60)):
                    break
            time.sleep(0.5)
        loader.wait(60)
        stack.sidecar.check_alive()
    finally:
        if stack is not None:
            stack.stop()
        upstream.stop()
    by_minute: dict[int, list[tuple[float, bool]]] = {}
    for line in samples.read_text().splitlines():
        at, latency, ok = line.split()
        by_minute.setdefault(int(float(at) // 60) + 1, []).append((float(latency), ok == "1"))
    for entry in per_minute:
        got = by_minute.get(entry["minute"], [])
        latencies = sorted(x for x, _ in got)
        entry["requests"] = len(got)
        entry["errors"] = sum(1 for _, ok in got if not ok)
        entry["p50_ms"] = round(statistics.median(latencies), 2) if latencies else None
        entry["p99_ms"] = round(latencies[int(len(latencies) * 0.99)], 2) if latencies else None
    first, last = per_minute[0]["sidecar_rss_mb"], per_minute[-1]["sidecar_rss_mb"]
    return {
        "minutes": minutes,
        "rate": rate,
        "requests": sum(e["requests"] for e in per_minute),
        "errors": sum(e["errors"] for e in per_minute),
        "rss_growth_pct": round((last - first) / first * 100, 2),
        "per_minute": per_minute,
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"soak: {result['minutes']:g} min at {result['rate']} req/s: {result['requests']} requests, "
        f"{result['errors']} errors, sidecar RSS {result['rss_growth_pct']:+.1f} % after minute 1",
        "",
        "| minute | requests | errors | p50 (ms) | p99 (ms) | sidecar RSS (MB) | Envoy RSS (MB) | tokens minted |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in result["per_minute"]:
        lines.append(
            f"| {e['minute']} | {e['requests']} | {e['errors']} | {e['p50_ms']} | {e['p99_ms']} | "
            f"{e['sidecar_rss_mb']} | {e['envoy_rss_mb']} | {e['minted']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load"]:
        port, seconds, rate, tasks, out = argv[1:6]
        asyncio.run(_load(int(port), float(seconds), int(rate), int(tasks), Path(out)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="agent-authz-soak-"))
    result = run_soak(work, minutes=args.minutes, rate=args.rate, tasks=args.tasks)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
