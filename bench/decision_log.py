"""Cost of writing one decision record: write-only, write + fsync per record, group-committed fsync.

Run: ``.venv/bin/python bench/decision_log.py [DIR]`` (DIR: a directory on the disk to measure;
default: a temporary directory). Prints µs per record for each mode.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sidecar.audit.log import DecisionLog


def record(i: int) -> dict[str, Any]:
    return {
        "time": "2026-11-29T09:21:01.169Z",
        "decision_id": f"{i:032x}",
        "request_id": "625b9042-037e-4e6c-a901-973261a28bdf",
        "direction": "egress",
        "agent": "spiffe://demo.agent-authz.local/ns/finance/sa/risk-reporter",
        "task_id": "q3-risk-report",
        "on_behalf_of": "user:jane.doe@example.com",
        "method": "GET",
        "host": "market-data.internal",
        "port": 80,
        "path": f"/v1/prices/ACME/{i}",
        "rule": "market-data-read",
        "decision": "allow",
        "reason": "allowed",
        "status": 200,
        "detail": "",
        "token": {
            "jti": "6qhcj8n0XDjQK9DwXlShdw",
            "aud": "https://market-data.internal",
            "exp": 1795944361,
            "cached": True,
        },
        "latency_us": 212,
        "event": "decision",
    }


def write_only(directory: Path, n: int, key: bytes | None = None) -> float:
    log = DecisionLog(directory / f"w{key is not None}.log", stdout=False, hmac_key=key)
    started = time.perf_counter()
    for i in range(n):
        log.append(record(i))
    elapsed = time.perf_counter() - started
    log.close()
    return elapsed / n * 1e6


async def fsynced(directory: Path, n: int, concurrency: int) -> float:
    log = DecisionLog(directory / f"f{concurrency}.log", stdout=False, fsync=True)
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            log.append(record(i))
            await log.sync()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await log.aclose()
    return elapsed / n * 1e6


def main() -> None:
    with tempfile.TemporaryDirectory(dir=sys.argv[1] if len(sys.argv) > 1 else None) as tmp:
        directory = Path(tmp)
        print(f"disk: {directory}")
        print(f"write only (SHA-256 chain)          {write_only(directory, 20000):8.1f} µs/record")
        print(f"write only (HMAC-SHA256 chain)      {write_only(directory, 20000, b'k' * 32):8.1f} µs/record")
        for concurrency in (1, 16, 64):
            cost = asyncio.run(fsynced(directory, 2000 if concurrency == 1 else 8000, concurrency))
            label = "write + fsync, one at a time" if concurrency == 1 else f"group commit, {concurrency} concurrent"
            print(f"{label:<36}{cost:8.1f} µs/record")


if __name__ == "__main__":
    main()
