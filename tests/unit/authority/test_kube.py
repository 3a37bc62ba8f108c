"""The authority's Kubernetes client and ConfigMap document against the API double (HTTPS, real REST shapes).

The Kubernetes API server cannot run here; ``sidecar/simulation/kube_api.py`` is a double that speaks
its protocol (resourceVersion, 409 Conflict, chunked watch events, 410 Gone, RBAC by resourceNames).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.authority.documents import ConfigMapDocument
from sidecar.authority.kube import KubeApiError, KubeClient
from sidecar.simulation.kube_api import KubeApiDouble, PolicyRule, Subject

NS = "authz"
ROLE = [
    PolicyRule(frozenset({"get", "watch", "update"}), frozenset({""}), frozenset({"configmaps"}), frozenset({"mine"}))
]


def _configmap(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": NS}, "data": data}


@pytest.fixture
def double(tmp_path: Path) -> Iterator[KubeApiDouble]:
    server = KubeApiDouble(
        tmp_path / "kube", subjects={"sa-token": Subject("system:serviceaccount:authz:a", {NS: ROLE})}
    )
    server.seed(_configmap("mine", a="1"))
    server.seed(_configmap("theirs", b="2"))
    server.start()
    (tmp_path / "admin").write_text(server.admin_token)
    (tmp_path / "sa").write_text("sa-token")
    yield server
    server.stop()


def client(double: KubeApiDouble, tmp_path: Path, who: str = "sa") -> KubeClient:
    return KubeClient(double.url, token_file=tmp_path / who, ca_file=double.ca_file, namespace=NS, timeout=5)


def raw(
    double: KubeApiDouble,
    method: str,
    path: str,
    body: Any = None,
    content_type: str = "application/json",
    token: str | None = None,
) -> tuple[int, Any]:
    context = ssl.create_default_context(cafile=str(double.ca_file))
    request = urllib.request.Request(
        double.url + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token or double.admin_token}", "Content-Type": content_type},
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_get_replace_and_a_stale_replace_conflicts(double: KubeApiDouble, tmp_path: Path) -> None:
    async def scenario() -> None:
        kube = client(double, tmp_path)
        current = await kube.get_configmap("mine")
        assert current["data"] == {"a": "1"} and current["kind"] == "ConfigMap"
        stored = await kube.replace_configmap({**current, "data": {"a": "2"}})
        assert int(stored["metadata"]["resourceVersion"]) > int(current["metadata"]["resourceVersion"])
        with pytest.raises(KubeApiError) as stale:
            await kube.replace_configmap({**current, "data": {"a": "3"}})  # the old resourceVersion
        assert stale.value.status == 409 and stale.value.reason == "Conflict"
        assert "the object has been modified" in str(stale.value)
        admin = client(double, tmp_path, "admin")
        with pytest.raises(KubeApiError) as missing:
            await admin.get_configmap("nope")
        assert missing.value.status == 404
        await kube.aclose()
        await admin.aclose()

    asyncio.run(scenario())
    stored = double.object("", "configmaps", NS, "mine")
    assert stored is not None and stored["data"] == {"a": "2"}


def test_rbac_by_resource_name_as_the_api_server_enforces_it(double: KubeApiDouble, tmp_path: Path) -> None:
    async def scenario() -> None:
        kube = client(double, tmp_path)
        with pytest.raises(KubeApiError) as other:
            await kube.get_configmap("theirs")
        assert other.value.status == 403 and 'cannot get resource "configmaps"' in str(other.value)
        # a watch of one name (metadata.name field selector) is allowed; the events come for it only
        events = kube.watch_configmap("mine", "0", timeout=1)
        first = await anext(events)
        assert first.type == "ADDED" and first.object["metadata"]["name"] == "mine"
        await events.aclose()
        with pytest.raises(KubeApiError) as other_watch:
            async for _ in kube.watch_configmap("theirs", "0", timeout=1):
                pass
        assert other_watch.value.status == 403
        anonymous = KubeClient(double.url, token_file=tmp_path / "nope", ca_file=double.ca_file, namespace=NS)
        (tmp_path / "nope").write_text("not-a-token")
        with pytest.raises(KubeApiError) as unauthenticated:
            await anonymous.get_configmap("mine")
        assert unauthenticated.value.status == 401
        await kube.aclose()
        await anonymous.aclose()

    asyncio.run(scenario())
    # a list or a watch without the name selector is not covered by resourceNames (the real API server's rule)
    collection = f"/api/v1/namespaces/{NS}/configmaps"
    status, body = raw(double, "GET", collection, token="sa-token")
    assert status == 403 and body["reason"] == "Forbidden"
    status, body = raw(double, "GET", collection + "?watch=true&timeoutSeconds=1", token="sa-token")
    assert status == 403
    status, body = raw(double, "GET", collection + "?fieldSelector=metadata.name%3Dmine", token="sa-token")
    assert status == 403  # a named list needs the list verb, which the role does not give
    status, body = raw(double, "GET", collection)
    assert status == 200 and body["kind"] == "ConfigMapList" and len(body["items"]) == 2  # the admin may
    status, body = raw(double, "DELETE", collection + "/mine", token="sa-token")
    assert status == 403


def test_patch_types_and_preconditions(double: KubeApiDouble) -> None:
    path = f"/api/v1/namespaces/{NS}/configmaps/theirs"
    status, merged = raw(double, "PATCH", path, {"data": {"c": "3"}}, "application/merge-patch+json")
    assert status == 200 and merged["data"] == {"b": "2", "c": "3"}
    status, strategic = raw(double, "PATCH", path, {"data": {"b": None}}, "application/strategic-merge-patch+json")
    assert status == 200 and strategic["data"] == {"c": "3"}
    status, patched = raw(
        double, "PATCH", path, [{"op": "add", "path": "/data/d", "value": "4"}], "application/json-patch+json"
    )
    assert status == 200 and patched["data"] == {"c": "3", "d": "4"}
    stale = {"metadata": {"resourceVersion": merged["metadata"]["resourceVersion"]}, "data": {"e": "5"}}
    status, conflict = raw(double, "PATCH", path, stale, "application/merge-patch+json")
    assert status == 409 and conflict["reason"] == "Conflict"
    status, bad = raw(double, "PATCH", path, {"data": {"e": 5}}, "application/merge-patch+json")
    assert status == 422 and bad["reason"] == "Invalid"
    status, exists = raw(double, "POST", f"/api/v1/namespaces/{NS}/configmaps", _configmap("theirs"))
    assert status == 409 and exists["reason"] == "AlreadyExists"


def test_the_document_follows_changes_and_recovers_from_410_gone(double: KubeApiDouble, tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []

    async def scenario() -> ConfigMapDocument:
        kube = client(double, tmp_path)
        document = ConfigMapDocument(kube, "mine", on_change=lambda data, rv: seen.append((data.get("a", ""), rv)))
        stop = asyncio.Event()
        follower = asyncio.create_task(document.follow(stop))
        await asyncio.wait_for(document.loaded.wait(), 5)
        loop = asyncio.get_running_loop()

        async def until(value: str) -> None:
            while not seen or seen[-1][0] != value:
                await asyncio.sleep(0.01)

        await loop.run_in_executor(None, lambda: double.seed(_configmap("mine", a="from-operator")))
        await asyncio.wait_for(until("from-operator"), 5)
        # the history is compacted and the watch dropped: resuming from an old version is 410 Gone
        double.compact()
        double.drop_watches()
        await loop.run_in_executor(None, lambda: double.seed(_configmap("mine", a="after-compaction")))
        await asyncio.wait_for(until("after-compaction"), 10)
        stop.set()
        await follower
        await kube.aclose()
        return document

    document = asyncio.run(scenario())
    assert [value for value, _ in seen] == ["1", "from-operator", "after-compaction"]
    assert document.watch_restarts >= 1
    versions = [int(rv) for _, rv in seen]
    assert versions == sorted(versions)


def test_a_watch_older_than_the_history_is_an_error_event_with_code_410(double: KubeApiDouble, tmp_path: Path) -> None:
    double.seed(_configmap("mine", a="2"))
    double.compact()

    async def scenario() -> KubeApiError:
        kube = client(double, tmp_path)
        try:
            async for _ in kube.watch_configmap("mine", "1", timeout=2):
                pass
        except KubeApiError as exc:
            return exc
        finally:
            await kube.aclose()
        raise AssertionError("no 410")

    gone = asyncio.run(scenario())
    assert gone.status == 410 and gone.reason == "Expired" and "too old resource version" in str(gone)


def test_the_double_runs_as_a_process_for_the_cluster_scenario(tmp_path: Path) -> None:
    """``python -m sidecar.simulation.kube_api``: what a scenario starts next to the authority replicas."""
    import sys

    from sidecar.harness import ManagedProcess, wait_until

    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps(_configmap("mine", a="1")))
    ready = tmp_path / "ready.json"
    repo = Path(__file__).resolve().parents[3]
    argv = [sys.executable, "-m", "sidecar.simulation.kube_api", "--dir", str(tmp_path / "kube"), "--seed", str(seed)]
    process = ManagedProcess("kube-api", [*argv, "--ready-file", str(ready)], log_dir=tmp_path, cwd=repo)
    process.start()
    try:
        url = wait_until(lambda: ready.exists() and json.loads(ready.read_text())["url"], timeout=20, what="kube api")
        context = ssl.create_default_context(cafile=str(tmp_path / "kube" / "ca.crt"))
        token = (tmp_path / "kube" / "token").read_text()
        request = urllib.request.Request(
            f"{url}/api/v1/namespaces/{NS}/configmaps/mine", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, context=context, timeout=5) as response:
            assert json.loads(response.read())["data"] == {"a": "1"}
    finally:
        assert process.stop() == 0
