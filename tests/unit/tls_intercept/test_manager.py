"""The InterceptManager: CA, published trust files, and Envoy's SDS/CDS/LDS files in a safe order."""

from __future__ import annotations

import asyncio
import json
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from sidecar.bootstrap.launch import wait_for_intercept_files
from sidecar.config.loader import load_config
from sidecar.errors import ConfigError
from sidecar.runtime import Runtime
from sidecar.tls_intercept import manager as manager_module
from sidecar.tls_intercept.manager import InterceptManager
from sidecar.tls_intercept.sds import SecretStore
from tests.support.config import base_config, task, write_config, write_keys
from tests.support.runtime import Clock

API = "api.example.com"
RULE = {"name": "api", "host": API, "tls": "intercept", "methods": ["GET"], "paths": ["*"]}
SYSTEM = b"-----BEGIN CERTIFICATE-----\nU1lTVEVN\n-----END CERTIFICATE-----\n"


def _setup(tmp_path: Path, tasks: list[dict[str, Any]], clock: Clock) -> tuple[Runtime, InterceptManager]:
    write_keys(tmp_path)
    (tmp_path / "system.pem").write_bytes(SYSTEM)
    config = base_config(tmp_path, tasks)
    config["intercept"] = {
        "state_dir": "state",
        "publish_dir": "trust",
        "system_bundle": "system.pem",
        "leaf_ttl": "30s",
    }
    path = write_config(tmp_path, config)
    runtime = Runtime(path, clock=clock)
    manager = InterceptManager(load_config(path), SecretStore(), clock=clock)
    manager.prepare()
    return runtime, manager


def _resources(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text())["resources"])


def _chains(manager: InterceptManager) -> set[str]:
    listeners = _resources(manager.paths.listeners)
    return {
        c["name"]
        for listener in listeners
        for c in listener.get("filterChains", [])
        if c["name"].startswith("intercept|")
    }


def _leaf(manager: InterceptManager, host: str) -> x509.Certificate:
    response, _ = manager.secrets._response([f"intercept|{host}"])
    assert response is not None
    secret = secret_pb2.Secret()
    response.resources[0].Unpack(secret)
    return x509.load_pem_x509_certificate(secret.tls_certificate.certificate_chain.inline_bytes)


def test_prepare_publishes_the_ca_and_keeps_it_across_restarts(tmp_path: Path) -> None:
    clock = Clock()
    _, manager = _setup(tmp_path, [], clock)
    assert manager.ca is not None
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state" / "ca" / "ca.key").stat().st_mode) == 0o600
    assert (tmp_path / "trust" / "ca.pem").read_bytes() == manager.ca.cert_pem
    assert (tmp_path / "trust" / "ca-bundle.pem").read_bytes() == SYSTEM + manager.ca.cert_pem
    again = InterceptManager(load_config(tmp_path / "sidecar.yaml"), SecretStore(), clock=clock)
    again.prepare()
    assert again.ca is not None and again.ca.serial == manager.ca.serial  # the agent's trust stays valid


def test_prepare_fails_closed_without_a_system_bundle(tmp_path: Path) -> None:
    _setup(tmp_path, [], Clock())
    (tmp_path / "system.pem").unlink()
    with pytest.raises(ConfigError, match=r"intercept\.system_bundle"):
        InterceptManager(load_config(tmp_path / "sidecar.yaml"), SecretStore()).prepare()


def test_sync_writes_secret_then_clusters_then_listeners_and_removes_in_reverse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    runtime, manager = _setup(tmp_path, [task("t1", egress=[RULE])], clock)
    writes: list[tuple[str, list[str]]] = []
    real_write = manager_module.write_resources

    def spy(path: Path, type_url: str, resources: list[dict[str, Any]], version: str, mode: int) -> None:
        writes.append((path.name if path.name != "secret.json" else "secret", [r["name"] for r in resources]))
        real_write(path, type_url, resources, version, mode)

    monkeypatch.setattr(manager_module, "write_resources", spy)
    put, remove = manager.secrets.put_certificate, manager.secrets.remove
    monkeypatch.setattr(
        manager.secrets, "put_certificate", lambda n, c, k: (writes.append(("secret", [n])), put(n, c, k))
    )
    monkeypatch.setattr(manager.secrets, "remove", lambda n: (writes.append(("forget", [n])), remove(n)))
    wake = manager.sync(runtime.snapshot.policy, clock.now)
    cluster = f"intercept|{API}|443"
    assert writes == [
        ("secret", [f"intercept|{API}"]),
        ("clusters.json", [cluster]),
        ("listeners.json", ["intercept_connect"]),  # no envoy.outbound_port: the CONNECT listener only
        ("clusters.json", [cluster]),
    ]
    assert _chains(manager) == {f"intercept|{API}:443"}
    assert manager.secrets.names() == [f"intercept|{API}"]
    keys = [p for p in manager.paths.state_dir.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert keys == [manager.paths.ca_dir / "ca.key"]  # the leaf's key went to the SDS store, not to a file
    assert wake == pytest.approx(clock.now + 20, abs=1)  # renewed with a third of its 30 s left
    leaf = _leaf(manager, API)
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == [API]

    writes.clear()
    clock.now += 21
    manager.sync(runtime.snapshot.policy, clock.now)
    assert writes == [("secret", [f"intercept|{API}"])]  # a rotation touches nothing else
    assert _leaf(manager, API).serial_number != leaf.serial_number and manager.rotations == 1

    writes.clear()
    config = yaml.safe_load((tmp_path / "sidecar.yaml").read_text())
    config["tasks"][0]["revoked"] = True
    write_config(tmp_path, config)
    assert runtime.reload()
    manager.sync(runtime.snapshot.policy, clock.now)
    assert writes == [
        ("clusters.json", [cluster]),
        ("listeners.json", ["intercept_connect"]),
        ("clusters.json", []),
        ("forget", [f"intercept|{API}"]),
    ]
    assert _chains(manager) == set() and manager.secrets.names() == []


def test_a_failed_sync_is_reported_and_retried(tmp_path: Path) -> None:
    clock = Clock()
    runtime, manager = _setup(tmp_path, [task("t1", egress=[RULE])], clock)
    manager.paths.xds_dir.rmdir()
    manager.paths.xds_dir.write_text("not a directory")  # any write below it fails, even as root
    try:
        wake = asyncio.run(manager.sync_now(runtime))
    finally:
        manager.paths.xds_dir.unlink()
        manager.paths.xds_dir.mkdir(mode=0o700)
    assert manager.last_error is not None and "NotADirectoryError" in manager.last_error
    assert wake == pytest.approx(clock.now + 1)
    asyncio.run(manager.sync_now(runtime))
    assert manager.last_error is None and _chains(manager) == {f"intercept|{API}:443"}
    manager.close()


def test_envoy_launch_waits_for_the_sidecars_files(tmp_path: Path) -> None:
    """``agent-authz envoy`` (the injected Envoy container) starts Envoy only once LDS/CDS exist."""
    clock = Clock()
    runtime, manager = _setup(tmp_path, [task("t1", egress=[RULE])], clock)
    loaded = load_config(tmp_path / "sidecar.yaml")
    with pytest.raises(ConfigError, match="has not written"):
        wait_for_intercept_files(loaded, timeout=0.2)
    timer = threading.Timer(0.3, manager.sync, args=(runtime.snapshot.policy, clock.now))
    timer.start()
    started = time.monotonic()
    wait_for_intercept_files(loaded, timeout=10)
    assert 0.2 < time.monotonic() - started < 5
    timer.join()
