"""``agent-authz serve``: the ext_authz gRPC service and the admin server in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import structlog
from aiohttp import web

from sidecar import STARTED
from sidecar.admin.app import make_admin_app
from sidecar.admin.health import make_health_app
from sidecar.audit.chain import load_hmac_key
from sidecar.audit.log import DecisionLog, decision_record
from sidecar.authority.client import FeedClient
from sidecar.authority.protocol import RevocationEntry, key_announcement, lists_from_entries
from sidecar.config.loader import LoadedConfig, load_config
from sidecar.config.watch import watch_and_reload
from sidecar.control.documents import ControlError, verify_action
from sidecar.control_socket import prepare_socket_dir, restrict_socket, tcp_control_endpoints
from sidecar.decision import Decision, Direction, Protocol, Reason
from sidecar.dns.resolv import read_nameservers
from sidecar.envoy_authz.access_log import RefusalLogService
from sidecar.envoy_authz.ext_proc import ListFilterService
from sidecar.envoy_authz.http_server import start_http_service
from sidecar.envoy_authz.service import AuthorizationService
from sidecar.errors import BundleDetail, ConfigError, DecisionLogError, StateError, SvidDetail
from sidecar.identity.state import IdentityState, Svid
from sidecar.identity.workload_api import WorkloadApiIdentity
from sidecar.metrics import Metrics
from sidecar.runtime.active import Runtime
from sidecar.runtime.snapshot import Snapshot
from sidecar.runtime.tasks import TaskService
from sidecar.state.store import StateStore

if TYPE_CHECKING:
    from sidecar.dns.proxy import DnsProxy
from sidecar.tls_intercept.manager import InterceptManager
from sidecar.tls_intercept.sds import SecretStore

__all__ = ["open_decision_log", "open_state", "run_server", "serve"]

_log = structlog.get_logger("agent_authz.server")


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(config_path: Path, *, ready_file: Path | None = None, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop``), then shut down gracefully.

    Args:
        config_path: ``sidecar.yaml``.
        ready_file: once listening, write ``{"authz": addr, "admin": "host:port", "pid": n}`` here
            (atomically; with ``listen.health`` also ``"health": "host:port"``, with the HTTP checks
            service ``"authz_http": addr``, with ``dns`` also ``"dns": ["host:port", ...]``), so callers
            can use port 0 without races.
        stop: an event that ends the server (tests); signals are handled too.

    Raises:
        ConfigError: the initial configuration (or the decision log's HMAC key) is invalid.
        StateError: the state file is refused (another agent's, not a state file, corrupt, open
            elsewhere, accessible to other users).
        DecisionLogError: the decision log file cannot be opened.
        OSError: a listen address is unavailable.
    """
    loop = asyncio.get_running_loop()
    stamps = {"started": STARTED, "serve": time.monotonic()}  # the startup breakdown (monotonic clock)
    # Parsed once: the Workload API connection, the runtime and the intercept manager all start from it.
    loaded = await loop.run_in_executor(None, load_config, config_path)
    stamps["config"] = time.monotonic()
    store = open_state(loaded)
    try:
        workload = await _start_workload_identity(loaded, loop)
        stamps["identity"] = time.monotonic()
    except BaseException:
        if store is not None:
            store.close()
        raise
    try:
        runtime = Runtime(
            config_path,
            loaded=loaded,
            defer=loop.call_soon,
            workload_identity=workload.state if workload is not None else None,
            store=store,
        )
    except BaseException:
        if workload is not None:
            workload.close()
        if store is not None:
            store.close()
        raise
    stamps["runtime"] = time.monotonic()
    if workload is not None:

        def identity_changed(state: IdentityState) -> None:
            loop.call_soon_threadsafe(runtime.set_identity, state)

        def identity_rejected(detail: SvidDetail | BundleDetail, message: str) -> None:
            loop.call_soon_threadsafe(runtime.identity_rejected, "workload_api", detail, message)

        workload.set_callback(identity_changed, identity_rejected)
    try:
        intercept = await _start_intercept(loaded, runtime)
    except BaseException:
        if workload is not None:
            workload.close()
        if store is not None:
            store.close()
        raise
    # From here on the runtime's copy, without the tasks: the parsed ones (1,000 tasks x 10 rules: ~17 MB
    # of models) are compiled into the policy and not kept alive by this frame for the process's life.
    loaded = runtime.snapshot.loaded
    decision_log = open_decision_log(runtime)
    metrics = Metrics()
    metrics.bind(runtime, decision_log)
    runtime.set_recorder(_control_recorder(runtime, decision_log, metrics))
    settings = runtime.snapshot.loaded.settings
    service = AuthorizationService(
        runtime.decide,
        decision_log,
        runtime.clock,
        metrics=metrics,
        on_log_failure=settings.decision_log.on_log_failure,
    )
    try:  # the agent's DNS: a bad resolv.conf or a taken port is a start error, nothing left behind
        dns_proxy, dns_bound = await _start_dns(runtime, service, metrics)
    except BaseException:
        for close in (intercept.close if intercept is not None else None, workload.close if workload else None):
            if close is not None:
                close()
        await decision_log.aclose()
        if store is not None:
            store.close()
        raise

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((service.handler(),))
    # tools/list responses of MCP routes (Envoy's ext_proc filter): same server, same socket
    server.add_generic_rpc_handlers((ListFilterService().handler(),))
    # what Envoy refused without a decision (its gRPC access log): a record each
    refusals = RefusalLogService(lambda refusal: service.record_refusal(refusal, agent=runtime.snapshot.policy.agent))
    server.add_generic_rpc_handlers((refusals.handler(),))
    if intercept is not None:  # the pod-CA leaves, for Envoy's intercepting filter chains (gRPC SDS)
        intercept.secrets.bind(loop)
        server.add_generic_rpc_handlers((intercept.secrets.handler(),))
    http_checks = settings.http_checks()
    http_server: asyncio.Server | None = None
    http_bound: str | None = None
    authz = settings.listen.authz
    sock_path: Path | None = None
    if authz.startswith("unix:"):
        sock_path = Path(authz[5:])
        prepare_socket_dir(sock_path, file=str(loaded.source), field="listen.authz")
        sock_path.unlink(missing_ok=True)
        server.add_insecure_port(f"unix:{sock_path}")
        authz_bound = authz
    else:
        host, port = _split(authz)
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"cannot listen on {authz}")
        authz_bound = f"{host}:{bound}"
    await server.start()
    if sock_path is not None:
        restrict_socket(sock_path)
    if http_checks is not None:  # Envoy's HTTP ext_authz transport (envoy.authz_transport: http)
        if http_checks.startswith("unix:"):
            prepare_socket_dir(Path(http_checks[5:]), file=str(loaded.source), field="listen.authz_http")
        http_server, http_bound = await start_http_service(service, http_checks)
        if http_checks.startswith("unix:"):
            restrict_socket(Path(http_checks[5:]))
    for key, address in tcp_control_endpoints(loaded):
        _log.warning(
            "control_endpoint_on_tcp",
            key=key,
            address=address,
            detail="every process of the pod, the agent included, can reach it: use a Unix socket",
        )

    feed = _feed_client(runtime)
    tasks = TaskService(runtime, forward=feed.forward if feed is not None else None)
    admin_app = make_admin_app(runtime, decision_log, metrics, intercept=intercept, tasks=tasks)
    runner = web.AppRunner(admin_app, access_log=None, handle_signals=False)
    await runner.setup()
    admin = settings.listen.admin
    if admin.startswith("unix:"):
        site: web.BaseSite = web.UnixSite(runner, admin[5:])
        await site.start()
        admin_bound = admin
    else:
        admin_bound = await _start_tcp_site(runner, admin)

    health_runner: web.AppRunner | None = None
    health_bound: str | None = None
    if settings.listen.health is not None:
        health_runner = web.AppRunner(
            make_health_app(runtime, decision_log, intercept=intercept), access_log=None, handle_signals=False
        )
        await health_runner.setup()
        health_bound = await _start_tcp_site(health_runner, settings.listen.health)

    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    own_files = _own_files(runtime, decision_log)

    def reload() -> bool:
        changed = runtime.reload()
        if changed:
            gc.freeze()  # the new snapshot is long-lived: keep it out of the collector's scans
        return changed

    watcher = asyncio.create_task(
        watch_and_reload(lambda: runtime.watched, reload, stop, ignore=own_files),
        name="config-watch",
    )
    intercepting = (
        asyncio.create_task(intercept.run(runtime, stop), name="intercept") if intercept is not None else None
    )
    feeding = asyncio.create_task(feed.run(stop), name="revocation-feed") if feed is not None else None
    # Everything built so far (imports, the compiled policy) lives as long as the process: freeze it,
    # so a full collection never walks 10,000 compiled rules in the middle of a decision.
    gc.freeze()
    stamps["ready"] = time.monotonic()
    _log.info(
        "serving",
        startup_s={k: round(v - stamps["started"], 4) for k, v in stamps.items()},
        started_monotonic=stamps["started"],
        authz=authz_bound,
        authz_http=http_bound,
        admin=admin_bound,
        health=health_bound,
        dns=dns_bound,
        tasks=len(runtime.snapshot.policy.tasks_by_id),
    )
    if ready_file is not None:
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        addresses: dict[str, object] = {"authz": authz_bound, "admin": admin_bound, "pid": os.getpid()}
        if http_bound is not None:
            addresses["authz_http"] = http_bound
        if health_bound is not None:
            addresses["health"] = health_bound
        if dns_bound:
            addresses["dns"] = dns_bound
        tmp.write_text(json.dumps(addresses))
        tmp.replace(ready_file)
    try:
        await stop.wait()
    finally:
        _log.info("shutting_down", decisions=service.decisions, seq=decision_log.head.seq)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if http_server is not None:
            http_server.close()
        if dns_proxy is not None:
            await dns_proxy.close()
        await server.stop(grace=2.0)
        await runner.cleanup()
        if health_runner is not None:
            await health_runner.cleanup()
        if workload is not None:
            workload.close()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if feeding is not None:
            feeding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeding
        if intercepting is not None and intercept is not None:
            intercepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await intercepting
            intercept.close()
        await decision_log.aclose()
        if store is not None:
            store.close()
        _log.info("stopped", seq=decision_log.head.seq)


async def _start_dns(
    runtime: Runtime, service: AuthorizationService, metrics: Metrics
) -> tuple[DnsProxy | None, list[str]]:
    """With a ``dns`` section: the DNS proxy, listening (also on ``[::1]`` with ``envoy.ipv6``), its
    decisions recorded through ``service``, its queries counted in ``metrics``.

    Raises:
        ConfigError: ``dns.resolv_conf`` names no usable resolver.
        OSError: the listen address is unavailable.
    """
    loaded = runtime.snapshot.loaded
    spec = loaded.settings.dns
    if spec is None:
        return None, []
    from sidecar.dns.proxy import DnsHooks, DnsProxy  # dnspython's wire format (~3 MB): only with a ``dns`` section

    upstreams = read_nameservers(loaded.resolve(spec.resolv_conf), file=str(loaded.source))
    host, port = _split(spec.listen)
    listen = [(host, port)]
    if loaded.settings.envoy.ipv6 and host != "::1":
        listen.append(("::1", port))

    def malformed(detail: str, destination: str) -> Decision:
        return Decision(
            False,
            Reason.BAD_REQUEST,
            0,
            service.new_id(),
            detail,
            Direction.EGRESS,
            agent=runtime.snapshot.policy.agent,
            protocol=Protocol.DNS,
            destination=destination,
        )

    hooks = DnsHooks(
        judge=lambda name, qtype, destination: runtime.decide_dns(name, qtype, destination, service.new_id()),
        malformed=malformed,
        record=service.record,
        count=metrics.dns_query,
    )
    proxy = DnsProxy(
        upstreams,
        hooks,
        runtime.addresses,
        timeout=spec.timeout,
        refuse_with=spec.refuse_with,
        allowed_record_interval=spec.allowed_record_interval,
        clock=runtime.clock,
    )
    return proxy, await proxy.start(listen)


FEED_SOURCE = "authority"
"""The ``CarriedState.received`` source of the cluster authority's revocation feed."""


def _feed_client(runtime: Runtime) -> FeedClient | None:
    """The revocation feed client of ``grants.revocation_feed`` (``None`` without one).

    Received entries are applied on the event loop as they arrive: remembered as the ``authority``
    source's lists (one per signer) and enforced by a rebuild before the next request is decided.
    Received ladder actions are verified with this sidecar's trust and honoured at once (the
    runtime's ladder keeps them); this sidecar's own quarantines are forwarded, and after each
    snapshot those the authority lacks again. A reload that changes the signing keys announces them
    again.
    """
    loaded = runtime.snapshot.loaded
    spec = loaded.settings.grants.revocation_feed
    if spec is None:
        return None
    received: frozenset[RevocationEntry] = frozenset()

    def apply(entries: tuple[RevocationEntry, ...], snapshot: bool) -> None:
        nonlocal received
        new = frozenset(entries) if snapshot else received | frozenset(entries)
        if new == received:
            return
        received = new
        carried = runtime.carried
        try:
            runtime.remember(replace(carried, received={**carried.received, FEED_SOURCE: lists_from_entries(new)}))
        except StateError as exc:  # in force all the same (a revocation must not wait); a restart would forget it
            _log.error("feed_revocations_not_stored", file=exc.file, reason=exc.reason)
        runtime.reload()

    def apply_actions(tokens: tuple[str, ...], snapshot: bool) -> None:
        verifier = runtime.snapshot.grants.verifier
        verified = []
        for token in tokens:
            if runtime.ladder.knows_token(token):
                continue
            try:
                verified.append(verify_action(token, verifier=verifier, now=runtime.clock(), source=FEED_SOURCE))
            except ControlError as exc:  # another sidecar may trust other signers; nothing to apply here
                _log.warning("feed_action_refused", reason=str(exc))
        if verified:
            runtime.add_actions(verified, strict=False)
        if snapshot:  # this sidecar's own actions the authority lacks (made while the feed was down)
            held = set(tokens)
            for own in runtime.ladder.own():
                if own.token and own.token not in held:
                    client.forward_action(str(own.target), own.token)

    def svid() -> Svid | None:
        identity = runtime.snapshot.identity
        return identity.state.svid if identity is not None else None

    def announcement() -> dict[str, object] | None:
        snapshot = runtime.snapshot
        if snapshot.identity is None:
            return None
        issuer = snapshot.loaded.settings.issuer.url
        return key_announcement(snapshot.keys, issuer=issuer, subject=snapshot.policy.agent, now=runtime.clock())

    store = runtime.store
    last_contact: float | None = None
    if store is not None:
        try:
            last_contact = store.feed_contact()
        except StateError as exc:  # counted from start then; the file was checked at open
            _log.error("feed_contact_unreadable", file=exc.file, reason=exc.reason)

    def remember_contact(at: float) -> None:
        if store is None:
            return
        try:
            store.save_feed_contact(at)
        except StateError as exc:  # a restart would count from an older contact: only stale sooner
            _log.error("feed_contact_not_stored", file=exc.file, reason=exc.reason)

    client = FeedClient(
        spec,
        ca_file=loaded.resolve(spec.ca),
        svid=svid,
        apply=apply,
        announcement=announcement,
        apply_actions=apply_actions,
        clock=runtime.clock,
        last_contact=last_contact,
        remember_contact=remember_contact,
    )
    runtime.action_listeners.append(
        lambda own: client.forward_action(str(own.target), own.token) if own.token else None
    )
    announced = {runtime.snapshot.keys.current.kid}

    def keys_changed(snapshot: Snapshot) -> None:
        kids = {snapshot.keys.current.kid} | ({snapshot.keys.next.kid} if snapshot.keys.next is not None else set())
        if kids != announced:
            announced.clear()
            announced.update(kids)
            client.announce_soon()

    runtime.add_listener(keys_changed)
    runtime.feed = client.status
    return client


async def _start_tcp_site(runner: web.AppRunner, address: str) -> str:
    """Listen on ``host:port`` (port 0: any free port); returns the bound ``host:port``."""
    host, port = _split(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    site = web.SockSite(runner, sock)
    await site.start()
    return f"{host}:{sock.getsockname()[1]}"


def open_state(loaded: LoadedConfig) -> StateStore | None:
    """The durable state named by ``state.path`` (``None`` without one: a warning, nothing survives a
    restart).

    Raises:
        StateError: see :meth:`StateStore.open`.
    """
    spec = loaded.settings.state
    if spec.path is None:
        _log.warning(
            "state_not_durable",
            reason="no state.path: revocations, budgets, posted grants and ttl anchors are forgotten on restart",
        )
        return None
    store = StateStore.open(loaded.resolve(spec.path), synchronous=spec.synchronous)
    _log.info("state_opened", file=str(store.path))
    return store


def open_decision_log(runtime: Runtime) -> DecisionLog:
    """The decision log described by the active configuration's ``decision_log`` section.

    Raises:
        KeyLoadError: the HMAC key file cannot be read or is too short.
        DecisionLogError: the file cannot be opened.
    """
    loaded = runtime.snapshot.loaded
    spec = loaded.settings.decision_log
    key = None
    if spec.hmac_key_file is not None:
        key = load_hmac_key(
            loaded.resolve(spec.hmac_key_file), file=str(loaded.source), field="decision_log.hmac_key_file"
        )
    return DecisionLog(
        loaded.resolve(spec.path) if spec.path is not None else None,
        stdout=spec.stdout,
        fsync=spec.fsync,
        hmac_key=key,
        max_bytes=int(spec.rotate.max_bytes) if spec.rotate.max_bytes is not None else None,
        max_age=spec.rotate.max_age,
        keep=spec.rotate.keep,
        clock=runtime.clock,
    )


def _control_recorder(runtime: Runtime, decision_log: DecisionLog, metrics: Metrics) -> Callable[[Decision], None]:
    """Writes a control record (a quarantine, an operator's action or approval) to the decision log.

    A record that cannot be written is logged (``decision_log_write_failed``, with the record): the
    step it records has been taken. With ``decision_log.fsync`` it is synced with the next decision.
    """

    def record(decision: Decision) -> None:
        fields = decision_record(decision, request_id="", latency_us=0, now=runtime.clock())
        try:
            decision_log.append(fields)
        except DecisionLogError as exc:
            _log.error("decision_log_write_failed", error=str(exc), sink=exc.sink, record=fields)
        metrics.observe_control(decision)

    return record


def _own_files(runtime: Runtime, decision_log: DecisionLog) -> Callable[[Path], bool]:
    """A predicate for the files this process writes (decision log and rotations, published
    revocations and ladder actions, the state file with its -wal and -shm)."""
    log_path = decision_log.path.absolute() if decision_log.path is not None else None
    settings, loaded = runtime.snapshot.loaded.settings, runtime.snapshot.loaded
    published = [
        loaded.resolve(target).absolute()
        for target in (settings.grants.publish_revocations, settings.ladder.publish)
        if target is not None
    ]
    state = runtime.store.path if runtime.store is not None else None

    def own(path: Path) -> bool:
        path = path.absolute()
        if log_path is not None and path.parent == log_path.parent and path.name.startswith(log_path.name):
            return True
        if state is not None and path.parent == state.parent and path.name.startswith(state.name):
            return True
        return any(path.parent == p.parent and path.name.endswith(p.name) for p in published)

    return own


async def _start_intercept(loaded: LoadedConfig, runtime: Runtime) -> InterceptManager | None:
    """With an ``intercept`` section: the pod CA, its published certificate and Envoy's first
    intercept files, all before the sidecar reports ready (Envoy's bootstrap names those files).

    Args:
        loaded: the configuration as parsed at start, with its tasks (the bootstrap was rendered from
            the file with them; the runtime's snapshot keeps a copy without them).
        runtime: whose policy the intercepted targets follow.

    Raises:
        ConfigError: see :meth:`InterceptManager.prepare`, or the first sync failed.
    """
    if loaded.settings.intercept is None:
        return None
    loop = asyncio.get_running_loop()
    manager = InterceptManager(loaded, SecretStore(), clock=runtime.clock)
    try:
        await loop.run_in_executor(None, manager.prepare)
        await manager.sync_now(runtime)
        if manager.last_error is not None:
            raise ConfigError(
                str(loaded.source), "intercept", f"cannot write Envoy's intercept files: {manager.last_error}"
            )
    except BaseException:
        manager.close()
        raise
    return manager


async def _start_workload_identity(loaded: LoadedConfig, loop: asyncio.AbstractEventLoop) -> WorkloadApiIdentity | None:
    """Connect to the Workload API when the config asks for it (blocking work runs in a thread)."""
    settings = loaded.settings
    spec = settings.identity
    if spec is None or spec.source != "workload_api":
        return None
    api = spec.workload_api
    return await loop.run_in_executor(
        None, lambda: WorkloadApiIdentity(api.socket, timeout=api.timeout, with_jwt=settings.ingress.jwt_svid)
    )


def run_server(config_path: Path, *, ready_file: Path | None = None) -> None:
    """Run :func:`serve` on uvloop (when installed)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(config_path, ready_file=ready_file))
    else:
        uvloop.run(serve(config_path, ready_file=ready_file))
