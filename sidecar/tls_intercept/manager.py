"""Keep Envoy's intercepting filter chains, clusters and leaf certificates in step with the active tasks.

The :class:`InterceptManager` owns the per-pod CA, the leaves (handed to Envoy by the gRPC SDS of
:mod:`sidecar.tls_intercept.sds`) and the files of ``intercept.state_dir`` (:mod:`sidecar.tls_intercept.files`).
:meth:`InterceptManager.sync` makes them match the policy at a given instant:

1. a leaf certificate for every intercepted host that has none, or whose remaining life fell below
   ``leaf_refresh_ahead`` - put in the SDS store, which pushes it to Envoy at once, so new
   handshakes use it while connections already open keep theirs (nothing in flight is dropped);
2. when the set of targets changed: the verifying clusters (CDS, first as the union of old and new,
   so no route ever names a missing cluster), the listeners with one filter chain per target (LDS;
   rendered in sorted order, so Envoy keeps the chains that did not change and their connections),
   then CDS without the clusters no longer used;
3. the leaves of hosts no longer intercepted leave the SDS store.

:meth:`InterceptManager.run` calls it at start, whenever the runtime swaps in a new policy (tasks
added or revoked), when a task's ``not_before`` or ``expires_at`` passes and when a leaf is due.
Rendering imports Envoy's typed configuration classes (about a second, once) and takes tens of
milliseconds; it runs in a worker thread so the event loop keeps deciding.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from sidecar.bootstrap.intercept import RenderCache, prune_render_cache
from sidecar.bootstrap.names import InterceptTarget, XdsPaths
from sidecar.bootstrap.render import render_dynamic
from sidecar.config.loader import LoadedConfig
from sidecar.errors import ConfigError
from sidecar.policy.model import PolicyIndex
from sidecar.tls_intercept.ca import Leaf, PodCA
from sidecar.tls_intercept.files import CLUSTER_TYPE, LISTENER_TYPE, ensure_private_dir, write_resources
from sidecar.tls_intercept.sds import SecretStore
from sidecar.tls_intercept.targets import active_targets
from sidecar.tls_intercept.trust import write_trust_files
from sidecar.wire import intercept_secret_name

if TYPE_CHECKING:
    from sidecar.runtime.active import Runtime

__all__ = ["InterceptManager"]

_log = structlog.get_logger("agent_authz.intercept")
_MIN_WAKE = 0.05
_RETRY = 1.0
_MAX_SYSTEM_BUNDLE = 4 * 1024 * 1024


class InterceptManager:
    """The per-pod CA and Envoy's dynamic intercept configuration.

    Args:
        loaded: the configuration the Envoy bootstrap was rendered from (with its ``tasks``: the
            listeners refer to the static clusters rendered from them). Must have ``intercept``.
        secrets: where leaves go for Envoy (served by the sidecar's gRPC server).
        clock: POSIX seconds.

    Attributes:
        ca: the pod CA (after :meth:`prepare`).
        targets: the targets Envoy's files describe now.
        leaves: the current leaf per intercepted host.
        rotations: leaves re-minted ahead of expiry.
        last_error: why the last :meth:`sync` failed, ``None`` after a success.
        ca_file / bundle_file: the published certificate and bundle.
    """

    def __init__(self, loaded: LoadedConfig, secrets: SecretStore, *, clock: Callable[[], float] = time.time) -> None:
        spec = loaded.settings.intercept
        if spec is None:
            raise ValueError("InterceptManager needs an 'intercept' section")
        self.loaded = loaded
        self.secrets = secrets
        self.spec = spec
        self.clock = clock
        self.paths = XdsPaths(loaded.resolve(spec.state_dir).absolute())
        self.publish_dir = loaded.resolve(spec.publish_dir).absolute()
        self.ca: PodCA | None = None
        self.targets: frozenset[InterceptTarget] = frozenset()
        self.leaves: dict[str, Leaf] = {}
        self.rotations = 0
        self.syncs = 0
        self.last_error: str | None = None
        self.ca_file: Path | None = None
        self.bundle_file: Path | None = None
        self._clusters: dict[str, dict[str, Any]] = {}
        self._rendered: RenderCache = {}
        self._written = False
        self._version = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intercept")

    # -- start -----------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the private directories, load or create the CA, publish its certificate.

        A CA saved by an earlier run is kept while it has at least two leaf lifetimes left, so a
        restarted sidecar keeps serving certificates the agent already trusts.

        Raises:
            ConfigError: a directory cannot be created or belongs to another user, the system
                bundle cannot be read, or the certificates cannot be published.
        """
        name, spec = str(self.loaded.source), self.spec
        ca_dir = self.paths.ca_dir
        try:
            for directory in (self.paths.state_dir, self.paths.xds_dir, ca_dir):
                ensure_private_dir(directory)
        except OSError as exc:
            raise ConfigError(name, "intercept.state_dir", str(exc)) from None
        bundle_path = self.loaded.resolve(spec.system_bundle)
        try:
            with bundle_path.open("rb") as handle:
                system = handle.read(_MAX_SYSTEM_BUNDLE + 1)
        except OSError as exc:
            raise ConfigError(name, "intercept.system_bundle", f"cannot read {bundle_path}: {exc.strerror}") from None
        if len(system) > _MAX_SYSTEM_BUNDLE or b"PRIVATE KEY" in system:
            raise ConfigError(name, "intercept.system_bundle", f"{bundle_path} is not a certificate bundle")
        now = self.clock()
        ca = PodCA.load(ca_dir, now=now, min_remaining=2 * spec.leaf_ttl)
        if ca is None:
            ca = PodCA.create(ttl=spec.ca_ttl, now=now)
            try:
                ca.save(ca_dir)
            except OSError as exc:
                raise ConfigError(name, "intercept.state_dir", f"cannot write the CA: {exc}") from None
        try:
            self.ca_file, self.bundle_file = write_trust_files(self.publish_dir, ca.cert_pem, system)
        except OSError as exc:
            raise ConfigError(name, "intercept.publish_dir", f"cannot write {self.publish_dir}: {exc}") from None
        self.ca = ca
        _log.info("intercept_ca_ready", serial=ca.serial, not_after=int(ca.not_after), bundle=str(self.bundle_file))

    # -- one reconciliation ----------------------------------------------------------------------
    def _renew_at(self, leaf: Leaf) -> float:
        return leaf.not_after - self.spec.leaf_refresh_ahead * (leaf.not_after - leaf.issued_at)

    def sync(self, policy: PolicyIndex, now: float) -> float:
        """Make the files match ``policy`` at ``now``; returns when to call again (POSIX seconds).

        Raises:
            OSError: a file cannot be written (the previous files stay; call again later).
            ValueError: the pod CA has expired.
        """
        ca = self.ca
        assert ca is not None, "prepare() first"
        targets, next_change = active_targets(policy, now)
        hosts = {t.host for t in targets}
        for host in sorted(hosts):
            old = self.leaves.get(host)
            if old is not None and now < self._renew_at(old):
                continue
            leaf = ca.issue(host, ttl=self.spec.leaf_ttl, now=now)
            self.secrets.put_certificate(intercept_secret_name(host), leaf.cert_pem, leaf.key_pem)
            self.leaves[host] = leaf
            if old is not None:
                self.rotations += 1
            _log.info(
                "intercept_leaf", host=host, serial=leaf.serial, not_after=int(leaf.not_after), renewed=old is not None
            )
        if targets != self.targets or not self._written:
            prune_render_cache(self._rendered, targets)
            dynamic = render_dynamic(self.loaded, sorted(targets), self._rendered)
            clusters = {c["name"]: c for c in dynamic.clusters}
            self._version += 1
            version = str(self._version)
            write_resources(
                self.paths.clusters, CLUSTER_TYPE, list({**self._clusters, **clusters}.values()), version + "a", 0o600
            )
            write_resources(self.paths.listeners, LISTENER_TYPE, dynamic.listeners, version, 0o600)
            write_resources(self.paths.clusters, CLUSTER_TYPE, dynamic.clusters, version, 0o600)
            added, removed = targets - self.targets, self.targets - targets
            self.targets, self._clusters, self._written = targets, clusters, True
            _log.info(
                "intercept_targets",
                targets=[f"{t.host}:{t.port}" for t in sorted(targets)],
                added=[f"{t.host}:{t.port}" for t in sorted(added)],
                removed=[f"{t.host}:{t.port}" for t in sorted(removed)],
            )
        for host in set(self.leaves) - hosts:
            del self.leaves[host]
            self.secrets.remove(intercept_secret_name(host))
        self.syncs += 1
        renew = min((self._renew_at(leaf) for leaf in self.leaves.values()), default=math.inf)
        return max(min(next_change, renew, now + 3600.0), now + _MIN_WAKE)

    # -- the loop ----------------------------------------------------------------------------------
    async def sync_now(self, runtime: Runtime) -> float:
        """Run :meth:`sync` for the runtime's current policy in the worker thread.

        Returns:
            When to run again (POSIX seconds); a second from now after a failure, which is logged
            (``intercept_sync_failed``) and kept in :attr:`last_error`.
        """
        loop = asyncio.get_running_loop()
        policy, now = runtime.snapshot.policy, runtime.clock()
        try:
            wake = await loop.run_in_executor(self._executor, self.sync, policy, now)
        except Exception as exc:  # a supervisory boundary: log, keep the last good files, retry
            self.last_error = f"{type(exc).__name__}: {exc}"
            _log.error("intercept_sync_failed", error=self.last_error)
            return now + _RETRY
        self.last_error = None
        return wake

    async def run(self, runtime: Runtime, stop: asyncio.Event) -> None:
        """Re-sync on every policy swap, at each due time, until ``stop`` is set."""
        changed = asyncio.Event()
        runtime.add_listener(lambda _snapshot: changed.set())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                changed.clear()
                wake = await self.sync_now(runtime)
                waiter = asyncio.ensure_future(changed.wait())
                try:
                    await asyncio.wait(
                        {waiter, stopped}, timeout=max(0.0, wake - runtime.clock()), return_when="FIRST_COMPLETED"
                    )
                finally:
                    waiter.cancel()
        finally:
            stopped.cancel()

    def close(self) -> None:
        """Stop the worker thread (the files stay: Envoy keeps serving what they say)."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def status(self, now: float) -> dict[str, Any]:
        """What ``/readyz`` shows: the CA, the intercepted targets and their leaves, the last error."""
        ca = self.ca
        return {
            "ca_serial": ca.serial if ca else None,
            "ca_not_after": int(ca.not_after) if ca else None,
            "ca_expired": bool(ca is None or now >= ca.not_after),
            "bundle": str(self.bundle_file) if self.bundle_file else None,
            "targets": [f"{t.host}:{t.port}" for t in sorted(self.targets)],
            "leaves": {
                h: {"serial": leaf.serial, "not_after": int(leaf.not_after)} for h, leaf in sorted(self.leaves.items())
            },
            "rotations": self.rotations,
            "last_error": self.last_error,
        }
