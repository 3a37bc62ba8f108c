"""Shared fixtures: structlog reset, short socket directories and a real sidecar + Envoy stack.

Helpers live in :mod:`tests.support`; test modules import from there (never from each other).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.support.stack import Env, start_env


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Each test starts with structlog's default configuration."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory path for unix sockets (sun_path is limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="aa-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env_factory(tmp_path: Path, short_dir: Path) -> Iterator[Callable[..., Env]]:
    """Start a stack with the given tasks; everything is stopped and reaped after the test."""
    started: list[Env] = []

    def make(
        tasks: list[dict[str, Any]],
        checks: dict[str, Any] | None = None,
        mutate: Callable[[dict[str, Any], int], None] | None = None,
    ) -> Env:
        env = start_env(tmp_path, short_dir, tasks, checks, mutate)
        started.append(env)
        return env

    yield make
    for env in started:
        env.stack.stop()
        env.upstream.stop()
