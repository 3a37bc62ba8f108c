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

    async def _watch_once(self) -> None:
        """One watch request: take its events until the server ends the stream.

        Raises:
            KubeApiError: 410 Gone, or the request failed.
        """
        events = self.client.watch_configmap(self.name, self._watch_from, timeout=self._watch_timeout)
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for event in events:
                if event.type == "BOOKMARK":
                    if _newer(event.resource_version, self._watch_from):
                        self._watch_from = event.resource_version
                elif event.type in ("ADDED", "MODIFIED"):
                    self._take(event.object)
                elif event.type == "DELETED":
                    _log.error("configmap_deleted", configmap=self.name)

    async def follow(self, stop: asyncio.Event) -> None:
        """Watch the ConfigMap until ``stop``: take every newer version; on 410 Gone read it afresh; on
        errors retry with backoff (0.1 s doubling to 5 s). Never raises; ``stop`` ends a watch at once."""
        backoff = 0.1
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                watch = asyncio.ensure_future(self._follow_step())
                done, _ = await asyncio.wait({watch, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if watch not in done:
                    watch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watch
                    return
                failure = watch.result()
                if failure is None:
                    backoff = 0.1
                    continue
                _log.warning("configmap_watch_failed", configmap=self.name, error=failure, retry_in=backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stopping), backoff)
                backoff = min(backoff * 2, 5.0)
        finally:
            stopping.cancel()

    async def _follow_step(self) -> str | None:
        """Read the ConfigMap when needed, then watch it once; returns why it failed (``None``: the
        server ended the stream, or 410 Gone was handled by reading afresh)."""
        try:
            if not self.loaded.is_set():
                await self.load()
            await self._watch_once()
            self.watch_restarts += 1  # the server ended the stream (timeoutSeconds, restart)
            return None
        except KubeApiError as exc:
            self.watch_restarts += 1
            if exc.status == 410:
                _log.info("configmap_watch_expired", configmap=self.name)
                try:
                    await self.load()
                except KubeApiError as again:
                    return str(again)
                return None
            return str(exc)  # resumed from the last resourceVersion after the backoff
