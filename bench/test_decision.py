"""Microbenchmark of one decision, for regression tracking (not part of the test suite).

Run: ``.venv/bin/python -m pytest bench/test_decision.py --benchmark-only`` (pytest-benchmark).
Measures ``AuthorizationService.check_bytes`` - parse, decide, record, respond - on the token cache
hit path, with 10 and with 1,000 tasks of 10 rules each.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run

from sidecar.audit.log import DecisionLog
from sidecar.envoy_authz.service import AuthorizationService
from sidecar.runtime import Runtime
from tests.support.envoy_authz import check_request


@pytest.fixture(params=[10, 1000], ids=["10-tasks", "1000-tasks"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[AuthorizationService, bytes]]:
    tasks = request.param
    run._write_keys(tmp_path)
    runtime = Runtime(run._sidecar_config(tmp_path, tmp_path / "x.sock", tasks, "127.0.0.1:9"))
    log = DecisionLog(tmp_path / "decisions.log", stdout=False)
    host, path = run._target(tasks)
    raw = check_request(host=host, path=path, headers={"x-request-id": "r", "user-agent": "bench", "accept": "*/*"})
    yield AuthorizationService(runtime.decide, log, runtime.clock), raw
    log.close()


def test_check_bytes(benchmark: Any, service: tuple[AuthorizationService, bytes]) -> None:
    svc, raw = service
    response = benchmark(svc.check_bytes, raw)
    assert b"authorization" in response  # allowed, token injected
