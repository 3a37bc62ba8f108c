"""Reload: the fingerprint short-circuit covers the failed state too, and a restored file clears the error."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from prometheus_client.parser import text_string_to_metric_families

from sidecar.audit.log import DecisionLog
from sidecar.config import loader
from sidecar.decision import Reason
from sidecar.errors import ErrorCode, SvidDetail
from sidecar.metrics import Metrics
from sidecar.runtime import Runtime, active
from sidecar.runtime.inputs import DiskFiles
from tests.support.certs import make_leaf, write_pair
from tests.support.config import AGENT, add_file_identity, base_config, task, write_config, write_keys
from tests.support.runtime import Clock, make_runtime, req


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every parse of a config file by the runtime (the real parser runs; this only counts). Tests
    clear it once their runtime is built."""
    seen: list[Path] = []

    def counting(source: Path, raw: bytes) -> loader.LoadedConfig:
        seen.append(source)
        return loader.parse_config(source, raw)

    monkeypatch.setattr(active, "parse_config", counting)
    return seen


def test_other_files_in_the_directory_of_an_invalid_config_cause_no_reparse(tmp_path: Path, parses: list[Path]) -> None:
    """The kubelet, an editor or a log next to sidecar.yaml writes there all the time; while the file is
    invalid each event used to reparse it and log another config_reload_failed (~24/s, forever)."""
    runtime = make_runtime(tmp_path, [task()])
    parses.clear()
    (tmp_path / "sidecar.yaml").write_text("agent: [broken")
    with structlog.testing.capture_logs() as events:
        assert not runtime.reload()
        for i in range(50):
            (tmp_path / "neighbour.log").write_text(f"line {i}\n")
            assert not runtime.reload()
    assert runtime.reload_failures == 1
    assert len(parses) == 1
    assert [e["event"] for e in events].count("config_reload_failed") == 1
    assert runtime.last_error is not None and "invalid YAML" in runtime.last_error
    assert runtime.decide(req(), "d").allow  # the last good configuration is still active


def test_another_invalid_version_is_reported_again(tmp_path: Path, parses: list[Path]) -> None:
    runtime = make_runtime(tmp_path, [task()])
    parses.clear()
    (tmp_path / "sidecar.yaml").write_text("agent: [broken")
    assert not runtime.reload() and not runtime.reload()
    (tmp_path / "sidecar.yaml").write_text("agent: [still broken")
    assert not runtime.reload()
    assert runtime.reload_failures == 2 and len(parses) == 2


def test_restoring_the_active_bytes_clears_the_stale_error(tmp_path: Path, parses: list[Path]) -> None:
    runtime = make_runtime(tmp_path, [task()])
    parses.clear()
    before = runtime.snapshot
    good = (tmp_path / "sidecar.yaml").read_bytes()
    (tmp_path / "sidecar.yaml").write_text("agent: [broken")
    assert not runtime.reload() and runtime.last_error is not None
    (tmp_path / "sidecar.yaml").write_bytes(good)  # byte-identical to the active configuration
    with structlog.testing.capture_logs() as events:
        assert not runtime.reload()  # nothing to rebuild ...
    assert runtime.last_error is None  # ... and nothing wrong any more
    assert runtime.snapshot is before and len(parses) == 1
    assert [e["event"] for e in events] == ["config_restored"]
    assert runtime.reload_failures == 1  # a counter: the failure happened


def test_a_missing_file_named_by_the_failed_version_is_watched_and_its_arrival_reloads(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, [task()])
    config: dict[str, Any] = base_config(tmp_path, [task(purpose="edited")])
    config["issuer"]["next_signing_key"] = "later/next.pem"
    write_config(tmp_path, config)
    assert not runtime.reload() and "issuer.next_signing_key" in (runtime.last_error or "")
    assert tmp_path / "later" / "next.pem" in runtime.watched  # its directory gets watched
    assert not runtime.reload() and runtime.reload_failures == 1
    (tmp_path / "later").mkdir()
    (tmp_path / "later" / "next.pem").write_bytes((tmp_path / "keys" / "next.pem").read_bytes())
    assert runtime.reload()
    assert runtime.last_error is None and runtime.snapshot.policy.tasks_by_id["t1"].purpose == "edited"
    assert tmp_path / "later" / "next.pem" in runtime.watched


def test_an_unreadable_config_is_one_failure_until_it_changes(tmp_path: Path, parses: list[Path]) -> None:
    runtime = make_runtime(tmp_path, [task()])
    parses.clear()
    good = (tmp_path / "sidecar.yaml").read_bytes()
    (tmp_path / "sidecar.yaml").unlink()
    assert not runtime.reload() and not runtime.reload()
    assert runtime.reload_failures == 1 and "cannot read" in (runtime.last_error or "") and parses == []
    (tmp_path / "sidecar.yaml").write_bytes(good)
    assert not runtime.reload() and runtime.last_error is None


def test_a_change_to_a_referenced_file_still_reloads_after_a_failure(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, [task()])
    old_kid = runtime.snapshot.keys.current.kid
    (tmp_path / "keys" / "signing.pem").write_text("not a key")
    assert not runtime.reload() and "issuer.signing_key" in (runtime.last_error or "")
    (tmp_path / "keys" / "signing.pem").write_bytes((tmp_path / "keys" / "next.pem").read_bytes())
    assert runtime.reload() and runtime.last_error is None
    assert runtime.snapshot.keys.current.kid != old_kid
    assert runtime.decide(req(), "d").reason is Reason.ALLOWED


def test_reload_failures_are_counted_by_error_code(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path, [task()])
    metrics = Metrics()
    metrics.bind(runtime, DecisionLog(None, stdout=False))

    def failures() -> dict[str, float]:
        return {
            sample.labels["code"]: sample.value
            for family in text_string_to_metric_families(metrics.render().decode())
            for sample in family.samples
            if sample.name == "agent_authz_config_reload_failures_total"
        }

    assert failures() == {"config_invalid": 0, "key_invalid": 0, "identity_invalid": 0}  # a sample from the start
    (tmp_path / "sidecar.yaml").write_text("agent: [broken")
    assert not runtime.reload()
    (tmp_path / "keys" / "next.pem").write_text("not a key")
    write_config(tmp_path, base_config(tmp_path, [task()]))
    assert not runtime.reload()
    assert failures() == {"config_invalid": 1, "key_invalid": 1, "identity_invalid": 0}
    assert runtime.reload_failures_by_code == {ErrorCode.CONFIG_INVALID: 1, ErrorCode.KEY_INVALID: 1}


class CountingDisk(DiskFiles):
    """The real disk, counting the reads of each file."""

    def __init__(self) -> None:
        self.reads: Counter[Path] = Counter()

    def fetch(self, path: Path, limit: int) -> bytes:
        self.reads[path] += 1
        return super().fetch(path, limit)


def test_one_reload_reads_and_parses_sidecar_yaml_once(tmp_path: Path, parses: list[Path]) -> None:
    write_keys(tmp_path)
    write_config(tmp_path, base_config(tmp_path, [task()]))
    disk = CountingDisk()
    runtime = Runtime(tmp_path / "sidecar.yaml", clock=Clock(), files=disk)
    config = tmp_path / "sidecar.yaml"
    assert disk.reads[config] == 1 and len(parses) == 1
    assert not runtime.reload()  # unchanged: read (fingerprint), not parsed
    assert disk.reads[config] == 2 and len(parses) == 1
    write_config(tmp_path, base_config(tmp_path, [task(purpose="edited")]))
    assert runtime.reload()  # changed: read once, parsed once
    assert disk.reads[config] == 3 and len(parses) == 2


def test_a_refused_identity_file_swap_is_counted_and_cleared_when_the_files_are_restored(tmp_path: Path) -> None:
    """``identity.files``: a swapped-in leaf with CA:TRUE fails the local identity checks, so the reload
    is refused (the previous SVID stays), counted as an identity rejection and shown as the last identity
    error; writing the previous files back is the active configuration again (no parse), and clears it."""
    write_keys(tmp_path)
    config = base_config(tmp_path, [task()])
    cas = add_file_identity(tmp_path, config)
    write_config(tmp_path, config)
    runtime = Runtime(tmp_path / "sidecar.yaml", clock=Clock(time.time()))  # the SVIDs are valid now
    assert runtime.snapshot.identity is not None
    serial = runtime.snapshot.identity.state.svid.serial
    good = {name: (tmp_path / "svid" / name).read_bytes() for name in ("agent.pem", "agent.key")}

    leaf, key = make_leaf(cas["test.example"], [AGENT], ca_flag=True)
    write_pair(tmp_path / "svid", "agent", leaf, key)
    assert not runtime.reload()
    assert runtime.snapshot.identity.state.svid.serial == serial
    assert runtime.identity_rejections == {("files", SvidDetail.SVID_LEAF_IS_CA): 1}
    assert runtime.reload_failures_by_code == {ErrorCode.IDENTITY_INVALID: 1}
    assert (runtime.last_identity_error or "").startswith("svid_leaf_is_ca: ")
    assert (runtime.last_identity_error or "").endswith("(identity.files.svid)")
    assert not runtime.reload()  # the same bad files: neither parsed nor counted again
    assert runtime.identity_rejections == {("files", SvidDetail.SVID_LEAF_IS_CA): 1}

    for name, data in good.items():
        (tmp_path / "svid" / name).write_bytes(data)
    assert not runtime.reload()  # back to the active snapshot's files
    assert runtime.last_error is None and runtime.last_identity_error is None
    assert runtime.snapshot.identity.state.svid.serial == serial
