"""The authority process in-process: its listeners' TLS, and a rotated trust bundle taking effect without restart.

The Kubernetes API is the double (``sidecar/simulation/kube_api.py``; no API server runs here).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from sidecar.authority.config import load_authority_config
from sidecar.authority.server import Authority
from sidecar.identity.devca import DevCA
from sidecar.simulation.kube_api import KubeApiDouble
from tests.support.authority_env import serving_pair

TD = "unit.example"


def _setup(tmp_path: Path) -> tuple[KubeApiDouble, Path, Path, DevCA, DevCA]:
    double = KubeApiDouble(tmp_path / "kube")
    for name in ("revocations", "keys"):
        double.seed({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "authz"}})
    double.start()
    (tmp_path / "token").write_text(double.admin_token)
    old, new = DevCA.create(TD), DevCA.create(TD)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(old.ca_cert.public_bytes(_pem()))
    ca, cert, key = serving_pair(tmp_path / "tls")
    config = {
        "issuer_base_url": "https://authority.authz.svc",
        "namespaces": ["agents"],
        "listen": {"public": "127.0.0.1:0", "feed": "127.0.0.1:0"},
        "tls": {"cert": str(cert), "key": str(key)},
        "trust": {"trust_domain": TD, "bundles": {TD: str(bundle)}},
        "kubernetes": {
            "api_server": double.url,
            "token_file": str(tmp_path / "token"),
            "ca_file": str(double.ca_file),
            "namespace": "authz",
            "revocations_configmap": "revocations",
            "keys_configmap": "keys",
        },
        "decision_log": {"stdout": False, "path": "records.log"},
    }
    path = tmp_path / "authority.yaml"
    path.write_text(yaml.safe_dump(config))
    return double, path, ca, old, new


def _pem() -> Any:
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.PEM


async def _status(url: str, ca: Path, cert: tuple[Path, Path] | None) -> int | str:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    try:
        async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as response:
            return response.status
    except (aiohttp.ClientError, ssl.SSLError, OSError) as exc:
        return type(exc).__name__


def test_a_rotated_bundle_is_trusted_for_new_connections_and_the_old_ca_no_longer(tmp_path: Path) -> None:
    double, path, ca, old, new = _setup(tmp_path)
    old_svid = old.write_svid(f"spiffe://{TD}/ns/agents/sa/a", tmp_path / "old", name="svid")
    new_svid = new.write_svid(f"spiffe://{TD}/ns/agents/sa/a", tmp_path / "new", name="svid")
    ready = tmp_path / "ready.json"

    async def scenario() -> list[int | str]:
        authority = Authority(load_authority_config(path), path)
        server = asyncio.create_task(authority.run(ready_file=ready))
        while not ready.exists() or not authority.ready:
            await asyncio.sleep(0.02)
        feed = "https://" + json.loads(ready.read_text())["feed"] + "/healthz"
        public = "https://" + json.loads(ready.read_text())["public"] + "/readyz"
        seen = [
            await _status(public, ca, None),  # the public listener needs no client certificate
            await _status(feed, ca, None),  # the feed listener does
            await _status(feed, ca, (old_svid.cert, old_svid.key)),
            await _status(feed, ca, (new_svid.cert, new_svid.key)),
        ]
        tmp = path.parent / "bundle.pem.tmp"
        tmp.write_bytes(new.ca_cert.public_bytes(_pem()))
        tmp.replace(path.parent / "bundle.pem")  # SPIRE rotated its CA: the old one is gone
        for _ in range(250):
            if await _status(feed, ca, (new_svid.cert, new_svid.key)) == 200:
                break
            await asyncio.sleep(0.02)
        seen += [
            await _status(feed, ca, (new_svid.cert, new_svid.key)),
            await _status(feed, ca, (old_svid.cert, old_svid.key)),
        ]
        authority.stop.set()
        await server
        return seen

    try:
        seen = asyncio.run(scenario())
    finally:
        double.stop()
    assert seen[0] == 200 and seen[2] == 200
    assert seen[1] != 200 and seen[3] != 200  # no certificate; a CA not (yet) in the bundle
    assert seen[4] == 200 and seen[5] != 200  # after the rotation: the new CA only
