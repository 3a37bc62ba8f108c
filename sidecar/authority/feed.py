"""The revocation feed: one Server-Sent Events stream per sidecar, fed by the revocation store.

Why SSE and not a gRPC server stream: the authority is an HTTPS server already (discovery and
JWKS for stock verifiers), and so is the sidecar's admin side; SSE is one more aiohttp route on
each end (``aiohttp-sse``, already a dependency for the decision viewer), needs no ``.proto`` and no
generated code, passes any HTTP proxy, can be read with ``curl``, and carries what the feed needs -
one direction, small JSON events, an ``id`` to resume from - with mTLS from the TLS layer below.
gRPC's extras (bidirectional streams, flow control per message, deadlines) buy nothing here.

A replica serves streams only once it has read the revocations (before that it answers 503: an
empty snapshot would tell the sidecars nothing is revoked). Each stream starts with a ``snapshot``
of every entry, then gets a ``revoked`` event with the new
entries of each change (a ``snapshot`` again when entries were removed), and a ``heartbeat`` every
``heartbeat`` seconds, so a client can measure the feed's lag and tell a quiet feed from a dead one.
Freeze/unfreeze/kill actions ride along: every ``snapshot`` carries them all (``actions``), and an
``actions`` event the ones added.
A client too slow to take its events (a full queue) is disconnected: it reconnects and gets a
snapshot, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp_sse import sse_response

from sidecar.authority.protocol import EVENT_ACTIONS, EVENT_HEARTBEAT, EVENT_REVOKED, EVENT_SNAPSHOT, RevocationEntry
from sidecar.authority.revocations import RevocationStore

__all__ = ["FeedHub"]

_log = structlog.get_logger("agent_authz.authority.feed")
_QUEUE = 256
Event = tuple[str, str, dict[str, Any]]  # (event name, revision, payload)


class _Subscriber:
    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(_QUEUE)


class FeedHub:
    """Fans the store's changes out to every connected stream.

    Args:
        store: the revocation store (the hub registers itself as a listener).
        heartbeat: seconds between heartbeats.
        max_clients: streams served at once (more get 503).
        clock: POSIX seconds.

    Attributes:
        clients: connected streams.
        events_sent: events written, by name.
        disconnected_slow: streams closed because their queue was full.
    """

    def __init__(
        self, store: RevocationStore, *, heartbeat: float, max_clients: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.heartbeat = heartbeat
        self.max_clients = max_clients
        self.events_sent = {EVENT_SNAPSHOT: 0, EVENT_REVOKED: 0, EVENT_HEARTBEAT: 0, EVENT_ACTIONS: 0}
        self.disconnected_slow = 0
        self._subscribers: set[_Subscriber] = set()
        self._clock = clock
        store.listeners.append(self._changed)
        store.action_listeners.append(self._actions_added)

    @property
    def clients(self) -> int:
        """Streams connected now."""
        return len(self._subscribers)

    def _entries(self, entries: frozenset[RevocationEntry]) -> list[dict[str, Any]]:
        return [entry.to_json() for entry in sorted(entries)]

    def _snapshot(self, revision: str) -> Event:
        store = self.store
        return EVENT_SNAPSHOT, revision, {"entries": self._entries(store.entries), "actions": list(store.actions)}

    def _actions_added(self, added: tuple[str, ...], revision: str) -> None:
        self._fan_out((EVENT_ACTIONS, revision, {"actions": list(added)}))

    def _changed(self, added: frozenset[RevocationEntry], removed: frozenset[RevocationEntry], revision: str) -> None:
        self._fan_out(
            self._snapshot(revision) if removed else (EVENT_REVOKED, revision, {"entries": self._entries(added)})
        )

    def _fan_out(self, event: Event) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber.queue.put_nowait(event)
            except asyncio.QueueFull:
                self.disconnected_slow += 1
                _log.warning("feed_client_too_slow", peer=subscriber.peer)
                self._subscribers.discard(subscriber)
                with contextlib.suppress(asyncio.QueueFull):
                    subscriber.queue.get_nowait()
                    subscriber.queue.put_nowait(None)

    async def stream(
        self, request: web.Request, peer: str, stop: asyncio.Event, *, until: float = float("inf")
    ) -> web.StreamResponse:
        """Serve one SSE stream to ``peer`` until it disconnects, ``stop`` is set, or ``until`` (POSIX
        seconds: the client's SVID expires; it reconnects with the rotated one)."""
        if len(self._subscribers) >= self.max_clients:
            return web.json_response({"error": "busy", "detail": "too many feed clients"}, status=503)
        if not self.store.document.loaded.is_set():  # an empty snapshot would un-revoke everything
            return web.json_response({"error": "not_ready", "detail": "the revocations are not read yet"}, status=503)
        subscriber = _Subscriber(peer)
        self._subscribers.add(subscriber)
        _log.info("feed_client_connected", peer=peer, clients=len(self._subscribers))
        response: web.StreamResponse = web.Response(status=499)
        try:
            async with sse_response(request, ping_interval=3600, headers={"X-Accel-Buffering": "no"}) as response:
                store = self.store
                await self._send(response, self._snapshot(store.revision))
                stopping = asyncio.ensure_future(stop.wait())
                try:
                    while not stop.is_set() and self._clock() < until:
                        getter = asyncio.ensure_future(subscriber.queue.get())
                        wait = max(0.0, min(self.heartbeat, until - self._clock()))
                        done, _ = await asyncio.wait({getter, stopping}, timeout=wait, return_when="FIRST_COMPLETED")
                        if getter not in done:
                            getter.cancel()
                            if stopping in done:
                                break
                            await self._send(response, (EVENT_HEARTBEAT, store.revision, {}))
                            continue
                        event = getter.result()
                        if event is None:  # too slow: close, the client reconnects for a snapshot
                            break
                        await self._send(response, event)
                finally:
                    stopping.cancel()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._subscribers.discard(subscriber)
            _log.info("feed_client_disconnected", peer=peer, clients=len(self._subscribers))
        return response

    async def _send(self, response: Any, event: Event) -> None:
        name, revision, payload = event
        body = {"revision": revision, "time": round(self._clock(), 6), **payload}
        await response.send(json.dumps(body, separators=(",", ":")), event=name, id=revision or None)
        self.events_sent[name] += 1
