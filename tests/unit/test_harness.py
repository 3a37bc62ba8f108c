"""The process harness the tests and the demo run everything with: it leaves no process behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sidecar.harness import ManagedProcess, wait_until

# A wrapper that dies on SIGTERM, with a child that ignores it (as a container's PID 1 does).
WRAPPER = r"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(120)"],
    stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "up"
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_stop_takes_down_what_the_process_started(tmp_path: Path) -> None:
    proc = ManagedProcess("wrapper", [sys.executable, "-c", WRAPPER], log_dir=tmp_path)
    proc.start()
    try:
        child = int(wait_until(lambda: proc.stdout_path.read_text().strip() or None, timeout=20, what="the child"))
        assert _alive(child)
        proc.stop(timeout=2)
        wait_until(lambda: not _alive(child), timeout=10, what="the child gone")
    finally:
        proc.stop(timeout=2)
    assert proc.proc is not None and proc.proc.returncode is not None
