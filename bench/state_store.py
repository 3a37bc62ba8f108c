"""Cost per decision of the durable call counter (``state.path``), next to no store, in one run.

Run: ``.venv/bin/python bench/state_store.py [DIR]`` (DIR: a directory on the disk to measure; default:
a temporary directory). Prints a markdown table.

Each configuration decides the same egress call in-process through ``AuthorizationService.check_bytes``
(parse, decide, charge the budget, write the decision record, build the response), for a task whose
call charges two limited counters (the task's ``max_calls`` and the rule's):

* ``no store``: the counters in memory only (what a restart forgets);
* ``WAL NORMAL, per-call commit``: the chosen design - each allowed call's counters are one SQLite
  statement, committed (written to the OS, no fsync) before the allow is answered;
* ``WAL FULL, per-call commit``: the same with an ``fsync`` of the WAL per commit;
* ``WAL NORMAL/FULL, reserve-ahead blocks of B``: the counter is written only when it crosses a
  watermark, ``B`` calls ahead (a crash then burns up to ``B - 1`` calls: never an over-count, but
  not exact across a crash).

Figures: mean µs per decision, the tail of single decisions (a checkpoint's fsyncs land on one
call), and the mean's ratio to ``no store``.
"""

from __future__ import annotations

import json
import platform
import sqlite3
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sidecar.audit.log import DecisionLog  # noqa: E402
from sidecar.envoy_authz.service import AuthorizationService  # noqa: E402
from sidecar.policy.budget import BudgetKey, BudgetLedger  # noqa: E402
from sidecar.runtime import Runtime  # noqa: E402
from sidecar.state import StateStore  # noqa: E402
from sidecar.tokens.keys import generate_private_key_pem  # noqa: E402
from tests.support.envoy_authz import check_request  # noqa: E402

AGENT = "spiffe://bench.example/ns/agents/sa/worker"
HOST = "api.svc.internal"
BLOCK = 64


class ReserveAhead:
    """A counter journal that writes a watermark ``block`` calls ahead (the alternative measured)."""

    def __init__(self, store: StateStore, block: int) -> None:
        self.store = store
        self.block = block
        self.marks: dict[BudgetKey, int] = {}

    def save_counters(self, counters: Mapping[BudgetKey, int]) -> None:
        due = {key: used + self.block - 1 for key, used in counters.items() if used > self.marks.get(key, 0)}
        if due:
            self.store.save_counters(due)
            self.marks.update(due)


def _config(directory: Path, state: dict[str, Any] | None) -> Path:
    (directory / "keys").mkdir(parents=True, exist_ok=True)
    (directory / "keys" / "signing.pem").write_bytes(generate_private_key_pem())
    config: dict[str, Any] = {
        "agent": AGENT,
        "issuer": {"url": "https://bench.example", "signing_key": "keys/signing.pem", "max_token_ttl": "10m"},
        "listen": {"authz": f"unix:{directory / 'x.sock'}", "admin": "127.0.0.1:0"},
        "decision_log": {"path": "decisions.log", "stdout": False},
        "tasks": [
            {
                "id": "budgeted",
                "agent": AGENT,
                "purpose": "bench",
                "ttl": "2h",
                "max_calls": 10**9,
                "egress": [{"name": "api", "host": HOST, "methods": ["GET"], "paths": ["/v1/*"], "max_calls": 10**9}],
            }
        ],
    }
    if state is not None:
        config["state"] = state
    path = directory / "sidecar.yaml"
    path.write_text(json.dumps(config))
    return path


class Subject:
    """One configuration, ready to decide: its runtime, store, decision log and the call."""

    def __init__(self, directory: Path, name: str, share: int, synchronous: str | None, block: int | None) -> None:
        self.name, self.share = name, share
        work = directory / f"c{len(list(directory.iterdir()))}"
        work.mkdir()
        self.store = None
        if synchronous is not None:
            self.store = StateStore.open(work / "state" / "state.db", synchronous=synchronous)  # type: ignore[arg-type]
        self.runtime = Runtime(_config(work, None), store=self.store)
        if self.store is not None and block is not None:
            self.runtime.budgets = BudgetLedger(journal=ReserveAhead(self.store, block))
        self.log = DecisionLog(work / "decisions.log", stdout=False)
        self.service = AuthorizationService(self.runtime.decide, self.log, self.runtime.clock)
        self.raw = check_request(host=HOST, path="/v1/items/42", headers={"x-request-id": "r", "user-agent": "bench"})
        self.latencies: list[int] = []
        self.wall = self.cpu = 0.0
        self.decided = 0
        self.run(200)  # warm up: caches, the first token, the prepared statement
        self.latencies.clear()
        self.wall = self.cpu = 0.0
        self.decided = 0

    def run(self, n: int) -> None:
        check, raw, latencies = self.service.check_bytes, self.raw, self.latencies
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            begin = time.perf_counter_ns()
            check(raw)
            latencies.append(time.perf_counter_ns() - begin)
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        self.decided += n

    def close(self) -> dict[str, Any]:
        used = self.runtime.budgets.used(("budgeted", ""))
        assert used == self.decided + 200, "every decision was an allow that charged the budget"
        self.log.close()
        if self.store is not None:
            self.store.close()
        latencies = sorted(self.latencies)

        def q(fraction: float) -> float:
            return latencies[min(len(latencies) - 1, int(len(latencies) * fraction))] / 1000

        return {
            "name": self.name,
            "n": self.decided,
            "mean_us": self.wall / self.decided * 1e6,
            "cpu_us": self.cpu / self.decided * 1e6,
            "p50_us": q(0.5),
            "p99_us": q(0.99),
            "p999_us": q(0.999),
            "max_us": latencies[-1] / 1000,
        }


# name, decisions per round (FULL commits are slow: fewer), synchronous, reserve-ahead block
CONFIGURATIONS = (
    ("no store", 2_000, None, None),
    ("WAL NORMAL, per-call commit (chosen)", 2_000, "normal", None),
    ("WAL FULL, per-call commit", 200, "full", None),
    (f"WAL NORMAL, reserve-ahead blocks of {BLOCK}", 2_000, "normal", BLOCK),
    (f"WAL FULL, reserve-ahead blocks of {BLOCK}", 2_000, "full", BLOCK),
)
ROUNDS = 10


def main() -> None:
    with tempfile.TemporaryDirectory(dir=sys.argv[1] if len(sys.argv) > 1 else None) as tmp:
        directory = Path(tmp)
        subjects = [Subject(directory, *config) for config in CONFIGURATIONS]
        for _ in range(ROUNDS):  # interleaved, so the load of a shared machine falls on all alike
            for subject in subjects:
                subject.run(subject.share)
        rows = [subject.close() for subject in subjects]
    base, base_cpu = rows[0]["mean_us"], rows[0]["cpu_us"]
    print(
        f"Machine: {platform.machine()}, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}; "
        f"disk: {directory}; {ROUNDS} interleaved rounds"
    )
    print()
    print(
        "| configuration | decisions | µs per decision: wall (mean) / CPU | vs no store: wall / CPU "
        "| p50 / p99 / p99.9 / max (µs) |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        tail = f"{row['p50_us']:.0f} / {row['p99_us']:.0f} / {row['p999_us']:.0f} / {row['max_us']:.0f}"
        ratios = f"{row['mean_us'] / base:.2f}× / {row['cpu_us'] / base_cpu:.2f}×"
        print(f"| {row['name']} | {row['n']} | {row['mean_us']:.1f} / {row['cpu_us']:.1f} | {ratios} | {tail} |")


if __name__ == "__main__":
    main()
