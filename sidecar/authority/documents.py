"""A ConfigMap as a shared document: conflict-safe read-modify-write, and a watch that keeps a local copy.

Several authority replicas write the same ConfigMap. Every change is a read-modify-write whose
``PUT`` names the ``resourceVersion`` it read (optimistic concurrency, API conventions
"Concurrency Control and Consistency"): when another replica wrote in between, the API server
answers ``409 Conflict`` and the change is applied again to the newer version, so no replica ever
overwrites an entry it did not see. Changes are expressed as a function of the current data
(``mutate``), never as a stale copy.

Each replica also watches the ConfigMap, so a change one replica wrote reaches the others (and an
operator's ``kubectl edit`` reaches all). The copy only moves forward: a version is taken when its
``resourceVersion`` is newer than the one held (compared as integers, as etcd revisions are; the
API treats them as opaque, and a non-numeric one is taken whenever it differs). After a ``PUT``
the replica takes the stored object at once, without waiting for its own watch event.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Mapping

import structlog

from sidecar.authority.kube import KubeApiError, KubeClient

__all__ = ["ConfigMapDocument"]

_log = structlog.get_logger("agent_authz.authority.documents")
Data = Mapping[str, str]


def _newer(candidate: str, held: str) -> bool:
    if not held:
        return True
    try:
        return int(candidate) > int(held)
    except ValueError:
        return candidate != held


class ConfigMapDocument:
    """One ConfigMap's ``data``, kept current and changed safely.

    Args:
        client: the API client (its namespace holds the ConfigMap).
        name: the ConfigMap's name (it must exist: the chart creates it).
        on_change: called with ``(data, resourceVersion)`` each time a newer version is taken.
        max_retries: read-modify-write attempts of one change.
        watch_timeout: seconds of each watch request.

    Attributes:
        data: the latest data taken (empty before :meth:`load`).
        resource_version: its ``resourceVersion``.
        conflicts: ``409 Conflict`` answers met so far (each was retried on the newer version).
        writes: successful writes.
        watch_restarts: watches resumed or restarted (410 Gone, errors, server timeouts).
        loaded: set once the document has been read.
    """

    def __init__(
        self,
        client: KubeClient,
        name: str,
        *,
        on_change: Callable[[Data, str], None],
        max_retries: int = 20,
        watch_timeout: float = 300.0,
    ) -> None:
        self.client = client
        self.name = name
        self.data: Data = {}
        self.resource_version = ""
        self.conflicts = 0
        self.writes = 0
        self.watch_restarts = 0
        self.loaded = asyncio.Event()
        self._on_change = on_change
        self._max_retries = max_retries
        self._watch_timeout = watch_timeout
        self._watch_from = ""
        self._object: dict[str, object] | None = None

    def _take(self, obj: Mapping[str, object]) -> None:
        metadata = obj.get("metadata")
        rv = str(metadata.get("resourceVersion", "")) if isinstance(metadata, dict) else ""
        if not _newer(rv, self.resource_version):
            return
        raw = obj.get("data")
        data = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        self.data, self.resource_version = data, rv
        self._object = dict(obj)
        if _newer(rv, self._watch_from):
            self._watch_from = rv
        self.loaded.set()
        self._on_change(data, rv)

    async def load(self) -> None:
        """Read the ConfigMap (again).

        Raises:
            KubeApiError: it does not exist (404), may not be read (403), or no answer.
        """
        obj = await self.client.get_configmap(self.name)
        metadata = obj.get("metadata", {})
        rv = str(metadata.get("resourceVersion", "")) if isinstance(metadata, dict) else ""
        self._watch_from = rv
        self._take(obj)

    async def update(self, mutate: Callable[[dict[str, str]], dict[str, str] | None]) -> bool:
        """Apply ``mutate`` to the current data and write it; on ``409 Conflict`` apply it again to the
        newer version, up to ``max_retries`` times.

        Args:
            mutate: gets a copy of the current data; returns the new data, or ``None`` (or the same
                data) when nothing needs to change. It may run several times: it must depend on its
                argument only.

        Returns:
            Whether a write happened.

        Raises:
            KubeApiError: another error, or still conflicting after ``max_retries`` attempts.
        """
        for attempt in range(self._max_retries):
            # the copy the watch keeps saves a read; after a conflict, read the newer version
            current = (
                self._object
                if attempt == 0 and self._object is not None
                else await self.client.get_configmap(self.name)
            )
            raw = current.get("data")
            data = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
            new = mutate(dict(data))
            if new is None or new == data:
                self._take(current)
                return False
            body = dict(current)
            body["data"] = new
            try:
                stored = await self.client.replace_configmap(body)
            except KubeApiError as exc:
                if exc.status != 409:
                    raise
                self.conflicts += 1
                _log.info("configmap_conflict", configmap=self.name, attempt=attempt + 1)
                await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))  # noqa: S311 - jitter, not crypto
                continue
            self.writes += 1
            self._take(stored)
            return True
        raise KubeApiError(409, "Conflict", f"{self.name}: still conflicting after {self._max_retries} attempts")

    async def follow(self, stop: asyncio.Event) -> None:
        """Watch the ConfigMap until ``stop``: take every newer version; on 410 Gone read it afresh; on
        errors retry with backoff (0.1 s doubling to 5 s). Never raises."""
        backoff = 0.1
        while not stop.is_set():
            try:
                if not self.loaded.is_set():
                    await self.load()
                async for event in self.client.watch_configmap(
                    self.name, self._watch_from, timeout=self._watch_timeout
                ):
                    backoff = 0.1
                    if event.type == "BOOKMARK":
                        if _newer(event.resource_version, self._watch_from):
                            self._watch_from = event.resource_version
                    elif event.type in ("ADDED", "MODIFIED"):
                        self._take(event.object)
                    elif event.type == "DELETED":
                        _log.error("configmap_deleted", configmap=self.name)
                    if stop.is_set():
                        return
                self.watch_restarts += 1  # the server ended the stream (timeoutSeconds, restart)
            except KubeApiError as exc:
                self.watch_restarts += 1
                if exc.status == 410:
                    _log.info("configmap_watch_expired", configmap=self.name)
                    try:
                        await self.load()
                    except KubeApiError as again:
                        _log.warning("configmap_read_failed", configmap=self.name, error=str(again))
                    continue
                _log.warning("configmap_watch_failed", configmap=self.name, error=str(exc), retry_in=backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)
                with contextlib.suppress(KubeApiError):
                    await self.load()
