"""``agent-authz authority``: the cluster token issuer and revocation feed, two HTTPS listeners in one event loop.

Routes of the **public** listener (server TLS; stock verifiers, admins, kubelet probes):
    ``GET <base>/ns/<namespace>/.well-known/openid-configuration`` - OpenID discovery metadata.
    ``GET <base>/ns/<namespace>/jwks.json`` - the namespace's JWKS (``Cache-Control: public,
        max-age=<jwks.max_age>``, a strong ``ETag``; ``If-None-Match`` answers 304).
    ``POST /v1/revocations`` - ``{"list": <JWS>, "grants": [...]}`` signed by a root issuer
        (``agent-authz task revoke --authority``).
    ``POST /v1/actions`` - ``{"actions": [<JWS>, ...]}``, freeze/unfreeze/kill actions signed by a root
        issuer (``agent-authz task freeze --authority``).
    ``GET /healthz``, ``GET /readyz`` (200 once both ConfigMaps have been read), ``GET /metrics``.

Routes of the **feed** listener (mTLS; an X.509-SVID of an agent namespace required):
    ``GET /v1/feed`` - the revocation feed (Server-Sent Events, :mod:`sidecar.authority.feed`).
    ``POST /v1/revocations`` - a sidecar forwards its revocation: the list signed with its SVID and
        the grants that show its authority (:class:`~sidecar.authority.revocations.RevocationJudge`).
    ``POST /v1/actions`` - a sidecar forwards its own ladder actions (its quarantines, signed with its
        SVID); every sidecar that receives them judges, per task, the signer's authority.
    ``POST /v1/keys`` - a sidecar announces its public keys (:mod:`sidecar.authority.keys`).

Errors answer ``{"error": <code>, "detail": <text>}``. Every revocation id accepted or refused and
every key announcement is a hash-chained record (``decision_log``); the authority is stateless
otherwise, so any number of replicas serve the same Service. The serving certificate and the trust
bundles are re-read when their files change (a renewed certificate, a rotated SPIRE bundle): new
connections get the new ones, and a CA removed from the bundle is no longer trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from sidecar.audit.log import DecisionLog
from sidecar.authority.config import AuthorityConfig, load_authority_config, resolve
from sidecar.authority.feed import FeedHub
from sidecar.authority.keys import KeyRegistry, parse_announcement
from sidecar.authority.kube import KubeApiError, KubeClient
from sidecar.authority.peers import Peer, PeerIdentifier, feed_tls_context, server_tls_context
from sidecar.authority.protocol import (
    ACTIONS_PATH,
    DISCOVERY_SUFFIX,
    FEED_PATH,
    JWKS_SUFFIX,
    KEYS_PATH,
    REVOCATIONS_PATH,
    AuthorityCode,
    AuthorityError,
)
from sidecar.authority.revocations import Judgement, RevocationJudge, RevocationStore
from sidecar.config.watch import watch_and_reload
from sidecar.control.documents import ControlError, verify_action
from sidecar.errors import ConfigError, KeyLoadError
from sidecar.identity.bundles import TrustBundles
from sidecar.identity.state import parse_jwt_bundle
from sidecar.identity.x509svid import X509SvidVerifier
from sidecar.metrics import CONTENT_TYPE, AuthorityMetrics, AuthorityState

__all__ = ["Authority", "run_authority", "serve_authority"]

_log = structlog.get_logger("agent_authz.authority")
_MAX_BODY = 1024 * 1024
AUTHORITY: web.AppKey[Authority] = web.AppKey("authority")


def _error(code: str, detail: str, status: int) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status)


@dataclass(frozen=True)
class _Trust:
    """What the bundle and root-issuer files give: rebuilt together when one changes."""

    judge: RevocationJudge
    public_tls: ssl.SSLContext
    feed_tls: ssl.SSLContext
    files: frozenset[Path]


class Authority:
    """The authority's parts, bound to one configuration.

    Args:
        config: the validated ``authority.yaml``.
        source: its path (relative paths resolve against its directory).
        clock: POSIX seconds.

    Raises:
        ConfigError: a bundle, root issuer JWKS or the serving certificate is unreadable or invalid;
            the Kubernetes API server is not known.
    """

    def __init__(self, config: AuthorityConfig, source: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.source = source
        self.clock = clock
        kube = config.kubernetes
        namespace = kube.namespace or self._pod_namespace(resolve(source, kube.token_file))
        try:
            server = kube.server_url()
        except ValueError as exc:
            raise ConfigError(str(source), "kubernetes.api_server", str(exc)) from None
        self.client = KubeClient(
            server,
            token_file=resolve(source, kube.token_file),
            ca_file=resolve(source, kube.ca_file),
            namespace=namespace,
            timeout=kube.request_timeout,
        )
        self.revocations = RevocationStore(
            self.client,
            kube.revocations_configmap,
            prune_after=config.revocations.prune_after,
            max_retries=config.revocations.max_retries,
            watch_timeout=kube.watch_timeout,
            clock=clock,
        )
        self.keys = KeyRegistry(
            self.client,
            kube.keys_configmap,
            base_url=config.issuer_base_url,
            namespaces=config.namespaces,
            announce_ttl=config.keys.announce_ttl,
            max_retries=config.revocations.max_retries,
            watch_timeout=kube.watch_timeout,
            clock=clock,
        )
        self.hub = FeedHub(
            self.revocations, heartbeat=config.feed.heartbeat, max_clients=config.feed.max_clients, clock=clock
        )
        self.peers = PeerIdentifier(
            config.trust.trust_domain, config.trust.namespace_pattern(), config.namespaces, clock=clock
        )
        self.metrics = AuthorityMetrics(self.state)
        self.trust = self._load_trust()
        spec = config.decision_log
        self.records = DecisionLog(
            resolve(source, spec.path) if spec.path is not None else None, stdout=spec.stdout, fsync=spec.fsync
        )
        self.base_path = urllib.parse.urlsplit(config.issuer_base_url).path.rstrip("/")
        self.replica = os.environ.get("HOSTNAME") or socket.gethostname()
        self.stop = asyncio.Event()

    @staticmethod
    def _pod_namespace(token_file: Path) -> str:
        try:
            return (token_file.parent / "namespace").read_text().strip()
        except OSError:
            return "default"

    # -- trust: bundles, root issuers, TLS --------------------------------------------------------
    def _load_trust(self) -> _Trust:
        config, source = self.config, str(self.source)
        files: set[Path] = set()
        bundles: dict[str, tuple[x509.Certificate, ...]] = {}
        for trust_domain, path in sorted(config.trust.bundles.items()):
            resolved = resolve(self.source, path)
            files.add(resolved)
            try:
                bundles[trust_domain] = tuple(x509.load_pem_x509_certificates(resolved.read_bytes()))
            except (OSError, ValueError) as exc:
                raise KeyLoadError(source, f"trust.bundles.{trust_domain}", f"cannot load {resolved}: {exc}") from None
        root_keys: dict[str, PublicKeyTypes] = {}
        root_ids: set[str] = set()
        for index, issuer in enumerate(config.grants.root_issuers):
            if issuer.spiffe_id is not None:
                root_ids.add(issuer.spiffe_id)
                continue
            assert issuer.jwks is not None
            resolved = resolve(self.source, issuer.jwks)
            files.add(resolved)
            try:
                root_keys.update(parse_jwt_bundle(resolved.read_bytes()))
            except (OSError, ValueError) as exc:
                raise KeyLoadError(source, f"grants.root_issuers[{index}].jwks", str(exc)) from None
        cert, key = resolve(self.source, config.tls.cert), resolve(self.source, config.tls.key)
        local = resolve(self.source, config.trust.bundles[config.trust.trust_domain])
        files |= {cert, key, local}
        try:
            public_tls = server_tls_context(cert, key)
            feed_tls = feed_tls_context(cert, key, local)
        except (OSError, ssl.SSLError) as exc:
            raise KeyLoadError(source, "tls", f"cannot load the serving certificate or bundle: {exc}") from None
        judge = RevocationJudge(
            root_keys=root_keys,
            root_ids=frozenset(root_ids),
            svids=X509SvidVerifier(TrustBundles(bundles)),
            max_depth=config.grants.max_depth,
        )
        return _Trust(judge, public_tls, feed_tls, frozenset(files))

    def reload_trust(self) -> bool:
        """Re-read the bundles, root issuers and serving certificate; keep the old ones on error."""
        try:
            self.trust = self._load_trust()
        except ConfigError as exc:
            _log.error("authority_trust_reload_failed", error=str(exc))
            return False
        _log.info("authority_trust_reloaded")
        return True

    def _switching_context(self, pick: Callable[[_Trust], ssl.SSLContext]) -> ssl.SSLContext:
        """A context for a site that hands each handshake to the current context (``sni_callback`` is
        called for every ClientHello, with or without SNI)."""
        base = pick(self.trust)

        def switch(ssl_object: Any, _name: str | None, _context: ssl.SSLContext) -> None:
            ssl_object.context = pick(self.trust)

        base.sni_callback = switch
        return base

    # -- state ------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Both ConfigMaps have been read."""
        return self.revocations.document.loaded.is_set() and self.keys.document.loaded.is_set()

    def state(self) -> AuthorityState:
        """The values the scrape-time metrics read."""
        documents = (self.revocations.document, self.keys.document)
        return AuthorityState(
            ready=self.ready,
            feed_clients=self.hub.clients,
            feed_events=dict(self.hub.events_sent),
            feed_slow_disconnects=self.hub.disconnected_slow,
            revocation_entries=len(self.revocations.entries),
            configmap_writes={d.name: d.writes for d in documents},
            configmap_conflicts={d.name: d.conflicts for d in documents},
            watch_restarts={d.name: d.watch_restarts for d in documents},
            published_keys={ns: len(self.keys.jwks(ns)["keys"]) for ns in self.config.namespaces},
        )

    def record(self, kind: str, outcome: str, **fields: Any) -> None:
        """Append one hash-chained record (a failing sink is logged, never fatal to the answer)."""
        record = {
            "time": round(self.clock(), 6),
            "kind": kind,
            "outcome": outcome,
            "replica": self.replica,
            **{k: v for k, v in fields.items() if v is not None},
        }
        try:
            self.records.append(record)
        except Exception as exc:  # the decision log reports its own failures; answering matters more here
            _log.error("authority_record_failed", error=str(exc))

    # -- the apps ---------------------------------------------------------------------------------
    def public_app(self) -> web.Application:
        """The public listener's application."""
        app = web.Application(client_max_size=_MAX_BODY, middlewares=[_errors])
        app[AUTHORITY] = self
        issuer_path = self.base_path + "/ns/{namespace}"
        app.router.add_get(issuer_path + DISCOVERY_SUFFIX, _discovery)
        app.router.add_get(issuer_path + JWKS_SUFFIX, _jwks)
        app.router.add_post(REVOCATIONS_PATH, _revoke_public)
        app.router.add_post(ACTIONS_PATH, _actions_public)
        app.router.add_get("/healthz", _healthz)
        app.router.add_get("/readyz", _readyz)
        app.router.add_get("/metrics", _metrics)
        return app

    def feed_app(self) -> web.Application:
        """The feed listener's application."""
        app = web.Application(client_max_size=_MAX_BODY, middlewares=[_errors])
        app[AUTHORITY] = self
        app.router.add_get(FEED_PATH, _feed)
        app.router.add_post(REVOCATIONS_PATH, _revoke_feed)
        app.router.add_post(ACTIONS_PATH, _actions_feed)
        app.router.add_post(KEYS_PATH, _keys)
        app.router.add_get("/healthz", _healthz)
        return app

    async def submit(self, body: Any, *, peer: Peer | None, listener: str) -> web.Response:
        """Judge and persist one submitted revocation list (both listeners)."""
        if not isinstance(body, dict) or not isinstance(body.get("list"), str):
            raise AuthorityError(AuthorityCode.BAD_REQUEST, 'expected {"list": "<JWS>", "grants": ["<JWS>", ...]}')
        grants = body.get("grants", [])
        if not isinstance(grants, list) or not all(isinstance(g, str) for g in grants):
            raise AuthorityError(AuthorityCode.BAD_REQUEST, "grants must be a list of compact JWS")
        peer_id = peer.spiffe_id if peer is not None else None
        try:
            judgement = self.trust.judge.judge(body["list"], grants, peer=peer_id, now=self.clock())
        except AuthorityError as exc:
            self.metrics.revocation(listener, "refused")
            self.record("revocation", "refused", listener=listener, peer=peer_id, error=exc.detail, detail=str(exc))
            raise
        revision = self.revocations.revision
        if judgement.accepted:
            started = time.perf_counter()
            try:
                revision = await self.revocations.add(judgement.accepted)
            except (KubeApiError, ValueError) as exc:
                _log.error("revocation_not_persisted", error=str(exc), ids=[e.id for e in judgement.accepted])
                for entry in judgement.accepted:
                    self.record(
                        "revocation", "failed", listener=listener, peer=peer_id, task_id=entry.id, detail=str(exc)
                    )
                return _error("unavailable", f"the revocation could not be stored: {exc}", 503)
            self.metrics.persisted(time.perf_counter() - started)
        self._record_judgement(judgement, listener, peer_id, revision)
        answer = {
            "signer": judgement.signer,
            "accepted": [e.id for e in judgement.accepted],
            "refused": [{"id": r.id, "error": r.error, "detail": r.detail} for r in judgement.refused],
            "revision": revision,
        }
        return web.json_response(answer, status=200 if judgement.accepted or not judgement.refused else 403)

    async def submit_actions(self, body: Any, *, peer: Peer | None, listener: str) -> web.Response:
        """Verify and persist signed ladder actions (both listeners).

        On the public listener only a root issuer's actions are taken; on the feed listener a root
        issuer's or the client's own (signed with the SVID it presents). Whether the signer has
        authority over a task is each receiving sidecar's judgement (:mod:`sidecar.control.ladder`).
        """
        if not isinstance(body, dict) or not isinstance(body.get("actions"), list) or not body["actions"]:
            raise AuthorityError(AuthorityCode.BAD_REQUEST, 'expected {"actions": ["<JWS>", ...]}')
        tokens = body["actions"]
        if len(tokens) > 64 or not all(isinstance(t, str) for t in tokens):
            raise AuthorityError(AuthorityCode.BAD_REQUEST, "actions must be at most 64 compact JWS")
        peer_id = peer.spiffe_id if peer is not None else None
        accepted: list[tuple[str, str, str]] = []  # (token, action id, target)
        refused: list[dict[str, str]] = []
        for token in tokens:
            try:
                action = verify_action(token, verifier=self.trust.judge.grants, now=self.clock(), source=listener)
            except ControlError as exc:
                refused.append({"error": exc.detail.value, "detail": str(exc)})
                continue
            if not action.root and (peer_id is None or action.signer != peer_id):
                code = AuthorityCode.NOT_ROOT if peer_id is None else AuthorityCode.SIGNER_NOT_PEER
                refused.append({"id": action.action_id, "error": code.value, "detail": f"signed by {action.signer}"})
                continue
            accepted.append((action.token, action.action_id, f"{action.kind.value} {action.target}"))
        revision = self.revocations.revision
        if accepted:
            try:
                revision = await self.revocations.add_actions(token for token, _, _ in accepted)
            except KubeApiError as exc:
                _log.error("actions_not_persisted", error=str(exc))
                return _error("unavailable", f"the actions could not be stored: {exc}", 503)
        for _, action_id, what in accepted:
            self.record("action", "accepted", listener=listener, peer=peer_id, action_id=action_id, detail=what)
        for refusal in refused:
            self.record("action", "refused", listener=listener, peer=peer_id, **refusal)
            _log.warning("action_refused", peer=peer_id, listener=listener, **refusal)
        answer = {"accepted": [action_id for _, action_id, _ in accepted], "refused": refused, "revision": revision}
        return web.json_response(answer, status=200 if accepted or not refused else 403)

    def _record_judgement(self, judgement: Judgement, listener: str, peer: str | None, revision: str) -> None:
        self.metrics.revocation(listener, "accepted", len(judgement.accepted))
        self.metrics.revocation(listener, "refused", len(judgement.refused))
        for entry in judgement.accepted:
            self.record(
                "revocation",
                "accepted",
                listener=listener,
                peer=peer,
                task_id=entry.id,
                signer=entry.signer,
                root=entry.root,
                revision=revision,
            )
        for refusal in judgement.refused:
            self.record(
                "revocation",
                "refused",
                listener=listener,
                peer=peer,
                task_id=refusal.id,
                signer=judgement.signer,
                error=refusal.error,
                detail=refusal.detail,
            )
            _log.warning(
                "revocation_refused", task_id=refusal.id, signer=judgement.signer, peer=peer, error=refusal.error
            )

    async def run(self, *, ready_file: Path | None = None) -> None:
        """Serve until :attr:`stop` is set."""
        config = self.config
        runners: list[web.AppRunner] = []
        bound: dict[str, str] = {}
        for name, app, context in (
            ("public", self.public_app(), self._switching_context(lambda t: t.public_tls)),
            ("feed", self.feed_app(), self._switching_context(lambda t: t.feed_tls)),
        ):
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
            await runner.setup()
            runners.append(runner)
            address = config.listen.public if name == "public" else config.listen.feed
            host, _, port = address.rpartition(":")
            host = host.strip("[]")
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))
            await web.SockSite(runner, sock, ssl_context=context).start()
            bound[name] = f"{host}:{sock.getsockname()[1]}"
        tasks = [
            asyncio.create_task(self.revocations.document.follow(self.stop), name="revocations-watch"),
            asyncio.create_task(self.keys.document.follow(self.stop), name="keys-watch"),
            asyncio.create_task(
                watch_and_reload(lambda: self.trust.files, self.reload_trust, self.stop), name="trust-watch"
            ),
        ]
        _log.info(
            "authority_serving",
            **bound,
            namespaces=config.namespaces,
            api_server=self.client.server,
            replica=self.replica,
        )
        if ready_file is not None:
            tmp = ready_file.with_name(ready_file.name + ".tmp")
            tmp.write_text(json.dumps({**bound, "pid": os.getpid()}))
            tmp.replace(ready_file)
        try:
            await self.stop.wait()
        finally:
            for runner in runners:
                await runner.cleanup()
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.client.aclose()
            await self.records.aclose()
            _log.info("authority_stopped")


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except AuthorityError as exc:
        return _error(exc.detail, str(exc), exc.status)
    except web.HTTPException:
        raise
    except Exception:  # an answer in the API's own shape, never a bare 500 page
        _log.exception("authority_request_failed", path=request.path)
        return _error("internal_error", "the request could not be handled", 500)


async def _json(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except ValueError:
        raise AuthorityError(AuthorityCode.BAD_REQUEST, "the body must be JSON") from None


async def _discovery(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    document = authority.keys.discovery(request.match_info["namespace"])
    return web.json_response(
        document, headers={"Cache-Control": f"public, max-age={int(authority.config.jwks.max_age)}"}
    )


async def _jwks(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    body, etag = authority.keys.jwks_body(request.match_info["namespace"])
    headers = {"Cache-Control": f"public, max-age={int(authority.config.jwks.max_age)}", "ETag": etag}
    if etag in {tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")}:
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type="application/jwk-set+json", headers=headers)


async def _revoke_public(request: web.Request) -> web.Response:
    return await request.app[AUTHORITY].submit(await _json(request), peer=None, listener="public")


async def _revoke_feed(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    peer = _peer(authority, request, "revocation")
    return await authority.submit(await _json(request), peer=peer, listener="feed")


async def _actions_public(request: web.Request) -> web.Response:
    return await request.app[AUTHORITY].submit_actions(await _json(request), peer=None, listener="public")


async def _actions_feed(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    peer = _peer(authority, request, "action")
    return await authority.submit_actions(await _json(request), peer=peer, listener="feed")


def _peer(authority: Authority, request: web.Request, kind: str) -> Peer:
    try:
        return authority.peers.identify(request)
    except AuthorityError as exc:
        authority.record(kind, "refused", listener="feed", error=exc.detail, detail=str(exc), remote=request.remote)
        if kind == "revocation":
            authority.metrics.revocation("feed", "refused")
        raise


async def _keys(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    peer = _peer(authority, request, "key_announcement")
    try:
        announcement = parse_announcement(await _json(request))
        kids = await authority.keys.announce(announcement, namespace=peer.namespace, peer=peer.spiffe_id)
    except AuthorityError as exc:
        authority.metrics.announcement("refused")
        authority.record(
            "key_announcement",
            "refused",
            peer=peer.spiffe_id,
            namespace=peer.namespace,
            error=exc.detail,
            detail=str(exc),
        )
        raise
    except KubeApiError as exc:
        return _error("unavailable", f"the keys could not be stored: {exc}", 503)
    authority.metrics.announcement("accepted")
    authority.record("key_announcement", "accepted", peer=peer.spiffe_id, namespace=peer.namespace, kids=kids)
    return web.json_response(
        {"namespace": peer.namespace, "issuer": authority.keys.issuer(peer.namespace), "kids": kids}
    )


async def _feed(request: web.Request) -> web.StreamResponse:
    authority = request.app[AUTHORITY]
    peer = _peer(authority, request, "feed")
    return await authority.hub.stream(request, peer.spiffe_id, authority.stop, until=peer.not_after)


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    body = {
        "status": "ready" if authority.ready else "not_ready",
        "replica": authority.replica,
        "revocations": {
            "revision": authority.revocations.revision,
            "entries": len(authority.revocations.entries),
            "error": authority.revocations.last_error,
        },
        "keys_revision": authority.keys.document.resource_version,
        "feed_clients": authority.hub.clients,
    }
    return web.json_response(body, status=200 if authority.ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[AUTHORITY].metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def serve_authority(
    config_path: Path, *, ready_file: Path | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run the authority until SIGTERM/SIGINT (or ``stop``).

    Raises:
        ConfigError: ``authority.yaml`` or a file it names is invalid.
        OSError: a listen address is unavailable.
    """
    config = load_authority_config(config_path)
    authority = Authority(config, config_path)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, authority.stop.set)
    relay = loop.create_task(_relay(stop, authority.stop)) if stop is not None else None
    try:
        await authority.run(ready_file=ready_file)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if relay is not None:
            relay.cancel()


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


def run_authority(config_path: Path, *, ready_file: Path | None = None) -> None:
    """Run :func:`serve_authority` on uvloop (when installed)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve_authority(config_path, ready_file=ready_file))
    else:
        uvloop.run(serve_authority(config_path, ready_file=ready_file))
