"""The sidecar's side of the cluster authority: the feed stream, key announcements, forwarded revocations.

:class:`FeedClient` holds one long-lived ``GET /v1/feed`` stream (Server-Sent Events) to the
authority's feed listener over mTLS: the server is verified against ``revocation_feed.ca`` and the
client presents this agent's current X.509-SVID (loaded for each connection, so a rotated SVID is
used from the next one; the key goes to OpenSSL through a pipe and never touches a disk). Every
event counts as contact; ``snapshot`` and ``revoked`` events are handed to ``apply`` at once, on the
event loop, so they are in force before the next request is decided. A snapshot older than the
newest revision applied (a replica whose watch lags behind) only adds entries. A stream that ends, fails, or
brings nothing (not even a heartbeat) for ``read_timeout`` is reconnected with exponential backoff
and jitter, from ``reconnect_min`` up to ``reconnect_max``.

:class:`FeedStatus` is what the rest of the sidecar reads: whether the feed is stale (no contact for
``max_staleness``, counted from the last contact stored in the durable state - or from start when
there is none - until the first contact), the lag of the last event, the
reconnect time, counters. The runtime denies ``revocation_feed_stale`` while it is stale.

On each connection, and every ``announce_interval``, the client announces this sidecar's public
signing keys (``POST /v1/keys``, each current and next key with a proof of possession); and it
forwards each revocation made through the local task API (``POST /v1/revocations``: a list naming
the one id, signed with the SVID, with the grant that shows this agent's authority), retrying
until the authority answers. Freeze/unfreeze/kill actions travel the same way: those of
``snapshot`` and ``actions`` events go to ``apply_actions`` (the compact JWS as sent; the sidecar
verifies each), and this sidecar's own (its quarantines) are forwarded (``POST /v1/actions``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from cryptography.hazmat.primitives import serialization

from sidecar.authority.protocol import (
    ACTIONS_PATH,
    EVENT_ACTIONS,
    EVENT_HEARTBEAT,
    EVENT_REVOKED,
    EVENT_SNAPSHOT,
    FEED_PATH,
    KEYS_PATH,
    REVOCATIONS_PATH,
    RevocationEntry,
    parse_entries,
)
from sidecar.config.schema import RevocationFeedSpec
from sidecar.errors import AgentAuthzError, ErrorCode
from sidecar.identity.state import Svid

__all__ = ["FeedClient", "FeedError", "FeedStatus", "svid_client_context"]

_log = structlog.get_logger("agent_authz.feed")
_MAX_EVENT = 8 * 1024 * 1024


class FeedError(AgentAuthzError):
    """The authority could not be reached, or answered something unusable."""

    code = ErrorCode.AUTHORITY_UNAVAILABLE


def svid_client_context(ca_file: Path, svid: Svid) -> ssl.SSLContext:
    """A TLS client context verifying the server against ``ca_file`` and presenting ``svid``.

    The chain and key are handed to OpenSSL through pipes (``/dev/fd/N``): the private key is never
    written to a file.

    Raises:
        OSError / ssl.SSLError: the CA file is unreadable, or the SVID does not load.
    """
    context = ssl.create_default_context(cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    chain = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in svid.chain)
    key = svid.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fds: list[int] = []
    try:
        paths = []
        for data in (chain, key):
            read, write = os.pipe()
            fds.append(read)
            with os.fdopen(write, "wb") as pipe:  # both fit in the pipe buffer (64 KiB)
                pipe.write(data)
            paths.append(f"/dev/fd/{read}")
        context.load_cert_chain(paths[0], paths[1])
    finally:
        for fd in fds:
            os.close(fd)
    return context


@dataclass
class FeedStatus:
    """The feed as the sidecar sees it.

    Attributes:
        max_staleness: seconds without contact after which the feed is stale.
        applies_to: ``delegated`` or ``all`` (what is denied while stale).
        started_at: POSIX seconds the client started (the staleness reference before any contact).
        last_contact: POSIX seconds of the last event (heartbeats included), ``None`` before the first.
        connected: a stream is open and has delivered its snapshot.
        revision: the authority's revision of the last event.
        entries: entries in force from the feed.
        events: events received, by name.
        reconnects: streams opened after the first.
        last_lag: seconds between the authority sending the last event and this sidecar applying it.
        last_reconnect: seconds from losing the stream to the next snapshot, of the last reconnection.
        forwarded / forward_failures: revocations (and ladder actions) forwarded to the authority;
            attempts that failed.
        announced / announce_failures: key announcements accepted; attempts that failed.
        last_error: the last connection or request error, ``None`` while connected.
    """

    max_staleness: float
    applies_to: str
    started_at: float
    last_contact: float | None = None
    connected: bool = False
    revision: str = ""
    entries: int = 0
    reconnects: int = 0
    last_lag: float | None = None
    last_reconnect: float | None = None
    forwarded: int = 0
    forward_failures: int = 0
    announced: int = 0
    announce_failures: int = 0
    last_error: str | None = None

    def __post_init__(self) -> None:
        self.events = {EVENT_SNAPSHOT: 0, EVENT_REVOKED: 0, EVENT_HEARTBEAT: 0, EVENT_ACTIONS: 0}

    def stale(self, now: float) -> bool:
        """No contact for more than ``max_staleness`` (since start, before the first contact)."""
        reference = self.last_contact if self.last_contact is not None else self.started_at
        return now - reference > self.max_staleness

    def stale_scope(self, now: float) -> str | None:
        """``delegated`` or ``all`` while stale, else ``None`` (what the runtime denies)."""
        return self.applies_to if self.stale(now) else None

    @property
    def state(self) -> str:
        """``connected``, or ``disconnected`` (never connected, or the stream was lost)."""
        return "connected" if self.connected else "disconnected"


@dataclass(frozen=True, slots=True)
class _Forward:
    task_id: str
    body: dict[str, Any]
    path: str = REVOCATIONS_PATH


class FeedClient:
    """Keeps the feed stream, announces keys and forwards revocations (see the module docstring).

    Args:
        spec: ``grants.revocation_feed``.
        ca_file: ``spec.ca`` resolved.
        svid: returns this agent's current SVID (``None`` while there is none).
        apply: called with ``(entries, snapshot)`` for each ``snapshot`` (every entry: replace) and
            ``revoked`` (new entries: add) event, on the event loop.
        announcement: returns the body of a key announcement (``None``: nothing to announce).
        apply_actions: called with ``(actions, snapshot)``: the signed ladder actions of each
            ``snapshot`` (every action the authority keeps) and ``actions`` event (compact JWS,
            unverified: the callee verifies them), on the event loop.
        clock: POSIX seconds.
        last_contact: POSIX seconds of the last contact before this process started (from the
            durable state): staleness counts from it, so a restart while the feed is down gives no
            new grace period (a value in the future counts as now).
        remember_contact: called with the time of a contact to store it durably: on each snapshot,
            and for other events at most every :attr:`contact_interval` seconds - what is stored is
            never later than the real last contact, so a restart can only go stale sooner.

    Attributes:
        status: the :class:`FeedStatus` the runtime and the metrics read.
    """

    def __init__(
        self,
        spec: RevocationFeedSpec,
        *,
        ca_file: Path,
        svid: Callable[[], Svid | None],
        apply: Callable[[tuple[RevocationEntry, ...], bool], None],
        announcement: Callable[[], dict[str, Any] | None] | None = None,
        apply_actions: Callable[[tuple[str, ...], bool], None] | None = None,
        clock: Callable[[], float] = time.time,
        last_contact: float | None = None,
        remember_contact: Callable[[float], None] | None = None,
    ) -> None:
        self.spec = spec
        self._apply_actions = apply_actions
        self.ca_file = ca_file
        self._svid = svid
        self._apply = apply
        self._announcement = announcement
        self._clock = clock
        now = clock()
        self.status = FeedStatus(spec.max_staleness, spec.stale_applies_to, now)
        if last_contact is not None:
            self.status.last_contact = min(last_contact, now)
        self._remember_contact = remember_contact
        self._stored_contact = self.status.last_contact
        self.contact_interval = min(5.0, spec.max_staleness / 4)
        self.read_timeout = max(2.0, min(15.0, spec.max_staleness / 2))
        self._session: aiohttp.ClientSession | None = None
        self._pending: deque[_Forward] = deque()
        self._wake = asyncio.Event()
        self._announce_now = asyncio.Event()
        self._lost_at: float | None = None
        self._applied: int | None = None  # the newest revision applied

    # -- connections --------------------------------------------------------------------------------
    def _context(self) -> ssl.SSLContext:
        svid = self._svid()
        if svid is None:
            raise FeedError("no X.509-SVID yet to authenticate to the authority")
        try:
            return svid_client_context(self.ca_file, svid)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise FeedError(f"cannot build the TLS context: {exc}") from None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(trust_env=False, connector=aiohttp.TCPConnector(limit=8))
        return self._session

    async def _post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        try:
            async with self._client().post(
                self.spec.url + path,
                json=body,
                ssl=self._context(),
                timeout=aiohttp.ClientTimeout(
                    total=self.spec.connect_timeout * 2, sock_connect=self.spec.connect_timeout
                ),
            ) as response:
                try:
                    answer = await response.json(content_type=None)
                except ValueError:
                    answer = None
                return response.status, answer
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
            raise FeedError(f"{path}: {type(exc).__name__}: {exc}") from None

    # -- the stream ---------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Keep the stream (and the announcer and forwarder) until ``stop``; never raises."""
        helpers = [
            asyncio.create_task(self._forwarder(stop), name="feed-forwarder"),
            asyncio.create_task(self._announcer(stop), name="feed-announcer"),
        ]
        backoff = self.spec.reconnect_min
        first = True
        try:
            while not stop.is_set():
                if not first:
                    self.status.reconnects += 1
                first = False
                delivered = False
                try:
                    delivered = await self._stream(stop)
                except FeedError as exc:
                    self.status.last_error = str(exc)
                    _log.warning("revocation_feed_failed", error=str(exc), retry_in=round(backoff, 3))
                except Exception as exc:  # never let the feed die: a stale feed fails closed anyway
                    self.status.last_error = f"{type(exc).__name__}: {exc}"
                    _log.exception("revocation_feed_crashed")
                if self.status.connected:
                    self._lost_at = self._clock()
                self.status.connected = False
                if stop.is_set():
                    break
                if delivered:
                    backoff = self.spec.reconnect_min
                delay = random.uniform(backoff / 2, backoff)  # noqa: S311 - jitter, not crypto
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                backoff = min(backoff * 2, self.spec.reconnect_max)
        finally:
            for task in helpers:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self._session is not None:
                await self._session.close()
                await asyncio.sleep(0.05)  # let closed TLS connections finish closing (aiohttp's advice)

    async def _stream(self, stop: asyncio.Event) -> bool:
        """One stream until it ends; returns whether it delivered a snapshot."""
        if self._lost_at is None:
            self._lost_at = self._clock()
        try:
            async with self._client().get(
                self.spec.url + FEED_PATH,
                ssl=self._context(),
                headers={"Accept": "text/event-stream", "Cache-Control": "no-cache"},
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.spec.connect_timeout, sock_read=self.read_timeout
                ),
            ) as response:
                if response.status != 200:
                    text = (await response.text())[:300]
                    raise FeedError(f"the feed answered {response.status}: {text}")
                return await self._read_events(response, stop)
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
            raise FeedError(f"{type(exc).__name__}: {exc}") from None

    async def _read_events(self, response: aiohttp.ClientResponse, stop: asyncio.Event) -> bool:
        delivered = False
        name, data = "message", ""
        while not stop.is_set():
            raw = await response.content.readline()
            if not raw:
                return delivered
            if len(raw) > _MAX_EVENT:
                raise FeedError("a feed event is larger than 8 MiB")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line == "":
                if data:
                    delivered = self.handle_event(name, data) or delivered
                name, data = "message", ""
            elif line.startswith(":"):
                continue  # a comment (keep-alive)
            else:
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    name = value
                elif field == "data":
                    data = f"{data}\n{value}" if data else value
        return delivered

    def handle_event(self, name: str, data: str) -> bool:
        """Handle one SSE event (its name and its ``data`` JSON); returns whether it was a snapshot.

        Raises:
            FeedError: the data does not parse (the stream is then reopened).
        """
        now = self._clock()
        try:
            payload = json.loads(data)
            sent = float(payload.get("time", now))
            revision = str(payload.get("revision", ""))
            entries = parse_entries(payload.get("entries", [])) if name in (EVENT_SNAPSHOT, EVENT_REVOKED) else ()
            actions = payload.get("actions", []) if name in (EVENT_SNAPSHOT, EVENT_ACTIONS) else []
            if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
                raise ValueError("actions must be a list of compact JWS")
        except (ValueError, TypeError, AttributeError) as exc:
            raise FeedError(f"a {name!r} event does not parse: {exc}") from None
        status = self.status
        if name in (EVENT_SNAPSHOT, EVENT_REVOKED):
            older = self._older(revision)
            self._apply(entries, name == EVENT_SNAPSHOT and not older)
        if self._apply_actions is not None and (actions or name == EVENT_SNAPSHOT):  # an action is never taken back
            self._apply_actions(tuple(actions), name == EVENT_SNAPSHOT)
        if name not in (EVENT_SNAPSHOT, EVENT_REVOKED, EVENT_ACTIONS, EVENT_HEARTBEAT):
            return False  # an event this version does not know: contact, nothing to apply
        status.events[name] += 1
        status.last_contact = now
        self._store_contact(now, force=name == EVENT_SNAPSHOT)
        status.revision = revision
        status.last_lag = max(0.0, self._clock() - sent)
        if name == EVENT_SNAPSHOT:
            status.entries = len(entries)
            if not status.connected:
                status.connected = True
                status.last_error = None
                if self._lost_at is not None:
                    status.last_reconnect = now - self._lost_at
                    self._lost_at = None
                self._announce_now.set()
                self._wake.set()
                _log.info("revocation_feed_connected", revision=revision, entries=len(entries))
            return True
        if name == EVENT_REVOKED:
            status.entries += len(entries)
            _log.info("revocations_received", ids=[e.id for e in entries], revision=revision, lag=status.last_lag)
        return False

    def _store_contact(self, now: float, *, force: bool) -> None:
        if self._remember_contact is None:
            return
        stored = self._stored_contact
        if force or stored is None or now - stored >= self.contact_interval:
            self._remember_contact(now)
            self._stored_contact = now

    def _older(self, revision: str) -> bool:
        """Whether ``revision`` is older than one already applied (a replica whose watch lags behind
        the one streamed from before): its snapshot then only adds - it must not take back a newer
        revocation. Revisions are ConfigMap ``resourceVersion`` values, compared as integers."""
        try:
            number = int(revision)
        except ValueError:
            return False
        older = self._applied is not None and number < self._applied
        if not older:
            self._applied = number
        return older

    # -- key announcements --------------------------------------------------------------------------
    def announce_soon(self) -> None:
        """Announce the keys again at once (e.g. after a reload changed them)."""
        self._announce_now.set()

    async def _announcer(self, stop: asyncio.Event) -> None:
        if self._announcement is None or not self.spec.announce_keys:
            return
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._announce_now.wait(), self.spec.announce_interval)
            self._announce_now.clear()
            if stop.is_set():
                return
            body = self._announcement()
            if body is None:
                continue
            try:
                status, answer = await self._post(KEYS_PATH, body)
            except FeedError as exc:
                self.status.announce_failures += 1
                _log.warning("key_announcement_failed", error=str(exc))
                continue
            if status == 200:
                self.status.announced += 1
                _log.info("keys_announced", kids=(answer or {}).get("kids"), issuer=(answer or {}).get("issuer"))
            else:
                self.status.announce_failures += 1
                _log.error("key_announcement_refused", status=status, answer=answer)

    # -- forwarded revocations ----------------------------------------------------------------------
    def forward(self, task_id: str, token: str, grants: list[str]) -> None:
        """Queue a revocation for the authority (sent at once when connected, retried until answered)."""
        self._pending.append(_Forward(task_id, {"list": token, "grants": grants}))
        self._wake.set()

    def forward_action(self, target: str, token: str) -> None:
        """Queue one of this sidecar's own signed ladder actions (a quarantine) for the authority."""
        self._pending.append(_Forward(target, {"actions": [token]}, ACTIONS_PATH))
        self._wake.set()

    async def _forwarder(self, stop: asyncio.Event) -> None:
        backoff = self.spec.reconnect_min
        while not stop.is_set():
            await self._wake.wait()
            self._wake.clear()
            while self._pending and not stop.is_set():
                item = self._pending[0]
                try:
                    status, answer = await self._post(item.path, item.body)
                except FeedError as exc:
                    self.status.forward_failures += 1
                    _log.warning("revocation_forward_failed", task_id=item.task_id, error=str(exc))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff)
                    backoff = min(backoff * 2, self.spec.reconnect_max)
                    continue
                backoff = self.spec.reconnect_min
                self._pending.popleft()
                if status == 200:
                    self.status.forwarded += 1
                    _log.info("revocation_forwarded", task_id=item.task_id, revision=(answer or {}).get("revision"))
                elif status >= 500:
                    self._pending.appendleft(item)
                    self.status.forward_failures += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff)
                else:
                    self.status.forward_failures += 1
                    _log.error("revocation_forward_refused", task_id=item.task_id, status=status, answer=answer)

    @property
    def pending(self) -> int:
        """Revocations waiting to be forwarded."""
        return len(self._pending)
