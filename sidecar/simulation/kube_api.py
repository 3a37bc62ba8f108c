"""A Kubernetes API server double: the real REST shapes over HTTPS, for the authority and the cluster scenario.

No API server can run here (no etcd, no kube-apiserver binary, no Docker), so this server speaks the
parts of the Kubernetes REST API that agent-authz uses, with the real shapes and semantics, the way
``sidecar/simulation/workload_api.py`` speaks the SPIFFE Workload API. It is a double, and says so in
every test that uses it.

What it implements (``/api/v1/namespaces/{ns}/{resource}`` and
``/apis/{group}/{version}/namespaces/{ns}/{resource}``, any resource in :data:`KINDS`):

* ``GET`` one object; ``GET`` a list (``kind: <Kind>List``, ``metadata.resourceVersion``) with
  ``fieldSelector=metadata.name=<name>``; ``POST`` create (409 ``AlreadyExists``); ``PUT`` replace;
  ``DELETE``.
* ``PATCH`` with ``application/merge-patch+json`` (RFC 7386), ``application/strategic-merge-patch+json``
  (for the maps of ConfigMaps and Secrets it is the merge patch) and ``application/json-patch+json``
  (RFC 6902, with the ``jsonpatch`` library).
* ``resourceVersion``: one counter for the whole store, as etcd's revision; a ``PUT`` or ``PATCH``
  naming a ``metadata.resourceVersion`` that is not the current one answers **409 Conflict**
  (``the object has been modified; please apply your changes to the latest version and try again``).
* ``watch=true``: a chunked response of JSON events, one per line (``ADDED``, ``MODIFIED``,
  ``DELETED``, ``BOOKMARK`` with ``allowWatchBookmarks=true``); without ``resourceVersion`` (or
  ``0``) the current objects come first as ``ADDED``; with one older than the retained history the
  stream is one ``ERROR`` event with a ``Status`` of code **410** (``Expired``, "too old resource
  version"), as the real server answers after a compaction; ``timeoutSeconds`` ends the stream.
* Authentication by bearer token (401 ``Unauthorized`` otherwise) and authorization by RBAC
  ``PolicyRule`` values per namespace (403 ``Forbidden`` with the real message), including the rule
  that ``list`` and ``watch`` match ``resourceNames`` only with a ``metadata.name`` field selector.
  Tests feed it the Role the chart renders, so an RBAC rule that is too narrow fails a test and one
  wider than needed is caught by the chart test.

Test controls (thread-safe, from the test's thread): :meth:`KubeApiDouble.seed`,
:meth:`~KubeApiDouble.object`, :meth:`~KubeApiDouble.compact` (forget the history: older watches get
410), :meth:`~KubeApiDouble.drop_watches` (close every open watch, as an API server restart does) and
:attr:`~KubeApiDouble.before_write` (run something just before a write is applied, e.g. a competing
write that makes it conflict).

Run it in-process (:meth:`KubeApiDouble.start` serves from a thread of its own) or as a process::

    python -m sidecar.simulation.kube_api --dir DIR [--rbac rbac.json] [--ready-file FILE]

which writes ``DIR/ca.crt``, ``DIR/token`` (the admin token) and the ready file
``{"url": "https://127.0.0.1:PORT", "pid": N}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import datetime as dt
import ipaddress
import json
import os
import secrets
import signal
import socket
import ssl
import threading
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonpatch
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "JOB_CONTROLLER",
    "KINDS",
    "SERVICE_ACCOUNT_MOUNT",
    "AdmissionWebhook",
    "KubeApiDouble",
    "PolicyRule",
    "Subject",
    "main",
    "rules_from_role",
]

Json = dict[str, Any]

KINDS: Mapping[tuple[str, str], str] = {
    ("", "configmaps"): "ConfigMap",
    ("", "secrets"): "Secret",
    ("", "pods"): "Pod",
    ("", "serviceaccounts"): "ServiceAccount",
    ("batch", "jobs"): "Job",
}
"""``(API group, resource) -> kind`` the double stores (the group ``""`` is the core group)."""
_VERSIONS = {"": "v1", "batch": "v1"}
_PATCH_TYPES = frozenset(
    {"application/merge-patch+json", "application/strategic-merge-patch+json", "application/json-patch+json"}
)
_MAX_BODY = 3 * 1024 * 1024  # the API server's default request size limit is 3 MiB
_MAX_CONFIGMAP = 1024 * 1024  # ConfigMap data + binaryData may not exceed 1 MiB


@dataclass(frozen=True)
class PolicyRule:
    """An RBAC ``PolicyRule`` (``rbac.authorization.k8s.io/v1``)."""

    verbs: frozenset[str]
    api_groups: frozenset[str]
    resources: frozenset[str]
    resource_names: frozenset[str] = frozenset()

    def allows(self, verb: str, group: str, resource: str, name: str | None) -> bool:
        """Whether the rule allows ``verb`` on ``group/resource`` (named ``name``; ``None`` for a
        collection request without a ``metadata.name`` field selector)."""
        if not ({"*", verb} & self.verbs and {"*", group} & self.api_groups and {"*", resource} & self.resources):
            return False
        if not self.resource_names:
            return True
        return name is not None and name in self.resource_names


@dataclass
class Subject:
    """Who a bearer token authenticates as, and the rules bound to it per namespace (``None``: all).

    Attributes:
        name: the username (``system:serviceaccount:<ns>:<name>`` for a ServiceAccount).
        rules: RBAC rules by namespace.
        admin: every right (``system:masters``).
        groups: the user's groups (``userInfo.groups`` of the AdmissionReviews it causes).
    """

    name: str
    rules: dict[str | None, list[PolicyRule]] = field(default_factory=dict)
    admin: bool = False
    groups: tuple[str, ...] = ()

    @classmethod
    def service_account(
        cls, namespace: str, name: str, rules: dict[str | None, list[PolicyRule]] | None = None
    ) -> Subject:
        """A ServiceAccount's subject, with the groups the API server gives it."""
        return cls(
            f"system:serviceaccount:{namespace}:{name}",
            rules or {},
            groups=("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"),
        )

    def allows(self, verb: str, namespace: str, group: str, resource: str, name: str | None) -> bool:
        """RBAC: any rule bound in ``namespace`` (or cluster-wide) allows the request."""
        if self.admin:
            return True
        rules = [*self.rules.get(namespace, []), *self.rules.get(None, [])]
        return any(rule.allows(verb, group, resource, name) for rule in rules)

    def user_info(self) -> Json:
        """``userInfo`` as the API server puts it into an AdmissionReview."""
        groups = list(self.groups) or (
            ["system:masters", "system:authenticated"] if self.admin else ["system:authenticated"]
        )
        return {"username": self.name, "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, self.name)), "groups": groups}


JOB_CONTROLLER = Subject.service_account("kube-system", "job-controller")
"""Who creates a Job's pods (the controller-manager with ``--use-service-account-credentials``)."""
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
"""Where the ServiceAccount admission plugin mounts the token volume in every container."""


@dataclass(frozen=True)
class AdmissionWebhook:
    """A mutating admission webhook the double calls, as a ``MutatingWebhookConfiguration`` names it.

    Attributes:
        name: the webhook's name (``inject.agent-authz.io``).
        url: where to POST (``https://127.0.0.1:PORT/inject``: the Service's endpoint).
        ca_file: the ``caBundle`` that verifies it.
        server_name: the Service's DNS name its certificate must name.
        rules: ``(API group, resource, operation)`` it is registered for.
        namespaces: the namespaces its ``namespaceSelector`` matches (the labeled ones).
        timeout: ``timeoutSeconds``; with ``failurePolicy: Fail``, an unreachable webhook refuses.
    """

    name: str
    url: str
    ca_file: Path
    server_name: str
    rules: frozenset[tuple[str, str, str]]
    namespaces: frozenset[str]
    timeout: float = 10.0

    @classmethod
    def from_configuration(
        cls, manifest: Mapping[str, Any], *, url: str, ca_file: Path, namespaces: frozenset[str]
    ) -> AdmissionWebhook:
        """The first webhook of a rendered ``MutatingWebhookConfiguration`` (its rules and timeout)."""
        hook = manifest["webhooks"][0]
        service = hook["clientConfig"]["service"]
        rules = frozenset(
            (group, resource, operation)
            for rule in hook["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for operation in rule["operations"]
        )
        return cls(
            hook["name"],
            url,
            ca_file,
            f"{service['name']}.{service['namespace']}.svc",
            rules,
            namespaces,
            float(hook.get("timeoutSeconds", 10)),
        )


def rules_from_role(role: Mapping[str, Any]) -> list[PolicyRule]:
    """The rules of a rendered ``Role`` or ``ClusterRole`` manifest."""
    return [
        PolicyRule(
            verbs=frozenset(rule.get("verbs", [])),
            api_groups=frozenset(rule.get("apiGroups", [])),
            resources=frozenset(rule.get("resources", [])),
            resource_names=frozenset(rule.get("resourceNames", [])),
        )
        for rule in role.get("rules", [])
    ]


def _status(code: int, reason: str, message: str, details: Json | None = None) -> web.Response:
    body: Json = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return web.json_response(body, status=code)


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _serving_pair(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a serving certificate for ``127.0.0.1``/``localhost`` in ``directory``."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-api-double CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("kubernetes.default.svc"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca.public_bytes(pem))
    (directory / "apiserver.crt").write_bytes(leaf.public_bytes(pem))
    (directory / "apiserver.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return directory / "ca.crt", directory / "apiserver.crt", directory / "apiserver.key"


@dataclass
class _Event:
    resource_version: int
    type: str
    key: tuple[str, str, str, str]  # group, resource, namespace, name
    object: Json


class _Watch:
    def __init__(self, key_filter: Callable[[tuple[str, str, str, str]], bool]) -> None:
        self.filter = key_filter
        self.queue: asyncio.Queue[_Event | None] = asyncio.Queue()


class KubeApiDouble:
    """The API server double (see the module docstring).

    Args:
        directory: where ``ca.crt`` and the serving certificate are written.
        subjects: bearer token -> :class:`Subject`; an ``admin`` token (all rights) is always added
            and written to ``directory/token``.
        history: events kept for watches that resume from a ``resourceVersion``.
        bookmark_interval: seconds between ``BOOKMARK`` events on watches that ask for them.

    Attributes:
        url: ``https://127.0.0.1:PORT`` once started.
        ca_file: the CA clients verify the server with.
        admin_token: the all-rights token.
        before_write: called as ``before_write(group, resource, namespace, name)`` (on the server's
            thread, before the write is checked and applied); tests use it to race a write.
        requests: ``(method, path, verb, subject)`` of each request, in order.
        webhooks: the mutating admission webhooks called for pods and Jobs (:class:`AdmissionWebhook`).
        events: what the controllers report (``{"object", "reason", "message"}``, e.g. ``FailedCreate``).
        warnings: the admission warnings returned so far.
    """

    def __init__(
        self,
        directory: Path,
        *,
        subjects: Mapping[str, Subject] | None = None,
        history: int = 1000,
        bookmark_interval: float = 5.0,
    ) -> None:
        self.ca_file, self._cert, self._key = _serving_pair(directory)
        self.admin_token = secrets.token_urlsafe(24)
        (directory / "token").write_text(self.admin_token)
        self.subjects: dict[str, Subject] = {self.admin_token: Subject("admin", admin=True), **(subjects or {})}
        self.url = ""
        self.webhooks: list[AdmissionWebhook] = []
        self.events: list[Json] = []
        self.warnings: list[str] = []
        self._bindings: dict[tuple[str, str], list[PolicyRule]] = {}
        self._jobs_started: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.before_write: Callable[[str, str, str, str], None] | None = None
        self.requests: list[tuple[str, str, str, str]] = []
        self._objects: dict[tuple[str, str, str, str], Json] = {}
        self._events: deque[_Event] = deque(maxlen=history)
        self._oldest = 1  # the oldest resourceVersion a watch may resume from
        self._rv = 1
        self._watches: set[_Watch] = set()
        self._lock = threading.Lock()
        self._bookmark_interval = bookmark_interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None

    # -- running -------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(client_max_size=_MAX_BODY)
        app.router.add_get("/version", self._version)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._healthz)
        for prefix in ("/api/{version}", "/apis/{group}/{version}"):
            collection = prefix + "/namespaces/{namespace}/{resource}"
            app.router.add_get(collection, self._collection_get)
            app.router.add_post(collection, self._create)
            item = collection + "/{name}"
            app.router.add_get(item, self._get)
            app.router.add_put(item, self._replace)
            app.router.add_patch(item, self._patch)
            app.router.add_delete(item, self._delete)
        return app

    def tls_context(self) -> ssl.SSLContext:
        """The server's TLS context (TLS >= 1.2)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._cert, self._key)
        return context

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start serving on this event loop; returns the URL."""
        self._loop = asyncio.get_running_loop()
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        site = web.SockSite(self._runner, sock, ssl_context=self.tls_context())
        await site.start()
        self.url = f"https://{host}:{sock.getsockname()[1]}"
        return self.url

    async def aclose(self) -> None:
        """Close every watch (waiting up to a second for the streams to end) and stop serving."""
        self._close_watches()
        for _ in range(100):
            if not self._watches:
                break
            await asyncio.sleep(0.01)
        if self._runner is not None:
            await self._runner.cleanup()
        await asyncio.sleep(0.05)  # let closed transports finish closing before the loop goes

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve from a thread of its own on ``host:port`` (the thread inherits the caller's network
        namespace); returns the URL."""

        def run() -> None:
            async def main() -> None:
                self._stop = asyncio.Event()
                await self.serve(host, port)
                self._started.set()
                await self._stop.wait()
                await self.aclose()

            asyncio.run(main())

        self._thread = threading.Thread(target=run, name="kube-api-double", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise TimeoutError("the Kubernetes API double did not start")
        return self.url

    def stop(self) -> None:
        """Stop the thread started by :meth:`start` (idempotent)."""
        if self._thread is None or self._loop is None or self._stop is None:
            return
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._thread = None

    # -- test controls -------------------------------------------------------------------------------
    def seed(self, obj: Json) -> Json:
        """Create or replace ``obj`` (a manifest with ``apiVersion``, ``kind``, namespace and name)
        as an administrator would; returns it as stored."""
        group, _, _ = obj["apiVersion"].rpartition("/")
        resource = next(r for (g, r), k in KINDS.items() if g == group and k == obj["kind"])
        meta = obj["metadata"]
        key = (group, resource, meta["namespace"], meta["name"])
        with self._lock:
            kind = "MODIFIED" if key in self._objects else "ADDED"
            return self._store(key, copy.deepcopy(obj), kind)

    def object(self, group: str, resource: str, namespace: str, name: str) -> Json | None:
        """The stored object (a copy), or ``None``."""
        with self._lock:
            found = self._objects.get((group, resource, namespace, name))
            return copy.deepcopy(found) if found is not None else None

    @property
    def resource_version(self) -> int:
        """The store's current resourceVersion."""
        with self._lock:
            return self._rv

    def bind(self, namespace: str, service_account: str, rules: Sequence[PolicyRule]) -> None:
        """Bind ``rules`` to a ServiceAccount in ``namespace`` (a Role and its RoleBinding)."""
        with self._lock:
            self._bindings[(namespace, service_account)] = list(rules)
            for subject in self.subjects.values():
                if subject.name == f"system:serviceaccount:{namespace}:{service_account}":
                    subject.rules = {namespace: list(rules)}

    def service_account_token(self, namespace: str, name: str) -> str:
        """The bearer token of ServiceAccount ``namespace/name`` (what its pods' token volume holds)."""
        username = f"system:serviceaccount:{namespace}:{name}"
        with self._lock:
            for token, subject in self.subjects.items():
                if subject.name == username:
                    return token
            token = "sa-" + secrets.token_urlsafe(24)
            rules = self._bindings.get((namespace, name))
            self.subjects[token] = Subject.service_account(namespace, name, {namespace: rules} if rules else {})
            return token

    def objects(self, group: str, resource: str, namespace: str) -> list[Json]:
        """Copies of the stored objects of a resource in ``namespace``, by name."""
        with self._lock:
            return [
                copy.deepcopy(o)
                for (g, r, n, _), o in sorted(self._objects.items())
                if (g, r, n) == (group, resource, namespace)
            ]

    def set_pod_phase(self, namespace: str, name: str, phase: str) -> None:
        """The kubelet reports a pod's phase (``Running``, ``Succeeded``, ``Failed``); the job controller
        updates the pod's Job (``succeeded``/``failed``, and the ``Complete``/``Failed`` condition)."""
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self._lock:
            key = ("", "pods", namespace, name)
            pod = copy.deepcopy(self._objects[key])
            pod["status"] = {**pod.get("status", {}), "phase": phase}
            self._store(key, pod, "MODIFIED")
            owner = next(
                (
                    o
                    for o in pod["metadata"].get("ownerReferences", [])
                    if o.get("kind") == "Job" and o.get("controller")
                ),
                None,
            )
            job_key = ("batch", "jobs", namespace, owner["name"]) if owner else None
            if job_key is None or job_key not in self._objects or phase not in ("Succeeded", "Failed"):
                return
            job = copy.deepcopy(self._objects[job_key])
            status = job.setdefault("status", {})
            status["active"] = 0
            done = "succeeded" if phase == "Succeeded" else "failed"
            status[done] = int(status.get(done, 0)) + 1
            kind = "Complete" if phase == "Succeeded" else "Failed"
            criteria = "SuccessCriteriaMet" if phase == "Succeeded" else "FailureTarget"
            status["conditions"] = [
                {"type": criteria, "status": "True", "lastTransitionTime": now},
                {"type": kind, "status": "True", "lastTransitionTime": now},
            ]
            if phase == "Succeeded":
                status["completionTime"] = now
            self._store(job_key, job, "MODIFIED")

    def compact(self) -> None:
        """Forget the event history: a watch resuming from an older resourceVersion gets 410 Gone."""
        with self._lock:
            self._events.clear()
            self._oldest = self._rv

    def drop_watches(self) -> None:
        """End every open watch stream (clients must re-list or resume), as an API server restart does."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._close_watches)

    def _close_watches(self) -> None:
        for watch in list(self._watches):
            watch.queue.put_nowait(None)

    # -- the store -----------------------------------------------------------------------------------
    def _store(self, key: tuple[str, str, str, str], obj: Json, kind: str) -> Json:
        """Under the lock: assign the next resourceVersion, keep, record and fan out the event."""
        self._rv += 1
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(self._rv)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        if kind == "DELETED":
            self._objects.pop(key, None)
        else:
            self._objects[key] = obj
        event = _Event(self._rv, kind, key, copy.deepcopy(obj))
        if len(self._events) == self._events.maxlen:
            self._oldest = self._events[0].resource_version
        self._events.append(event)
        if self._loop is not None:
            for watch in list(self._watches):
                if watch.filter(key):
                    self._loop.call_soon_threadsafe(watch.queue.put_nowait, event)
        return copy.deepcopy(obj)

    # -- request handling ----------------------------------------------------------------------------
    def _target(self, request: web.Request) -> tuple[str, str, str, str | None] | web.Response:
        info = request.match_info
        group = info.get("group", "")
        version, resource, namespace = info["version"], info["resource"], info["namespace"]
        if (group, resource) not in KINDS or _VERSIONS.get(group) != version:
            return _status(404, "NotFound", "the server could not find the requested resource")
        return group, resource, namespace, info.get("name")

    def _subject(self, request: web.Request) -> Subject | None:
        header = request.headers.get("Authorization", "")
        return self.subjects.get(header.removeprefix("Bearer ").strip()) if header.startswith("Bearer ") else None

    def _authorize(
        self, request: web.Request, verb: str, group: str, resource: str, namespace: str, name: str | None
    ) -> web.Response | None:
        subject = self._subject(request)
        self.requests.append((request.method, request.path, verb, subject.name if subject else "-"))
        if subject is None:
            return _status(401, "Unauthorized", "Unauthorized")
        if subject.allows(verb, namespace, group, resource, name):
            return None
        what = f"{resource}.{group}" if group else resource
        named = f' "{name}"' if name else ""
        return _status(
            403,
            "Forbidden",
            f'{what}{named} is forbidden: User "{subject.name}" cannot {verb} resource "{resource}" in API group '
            f'"{group}" in the namespace "{namespace}"',
            {"name": name or "", "group": group, "kind": resource},
        )

    async def _version(self, _: web.Request) -> web.Response:
        return web.json_response({"major": "1", "minor": "35", "gitVersion": "v1.35.0-double"})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    @staticmethod
    def _name_selector(request: web.Request) -> str | web.Response | None:
        selector = request.query.get("fieldSelector")
        if not selector:
            return None
        field_name, sep, value = selector.partition("=")
        if field_name == "metadata.name" and sep and value and "," not in value:
            return value.removeprefix("=")
        return _status(400, "BadRequest", f'field label not supported: "{selector}"')

    async def _collection_get(self, request: web.Request) -> web.StreamResponse:
        target = self._target(request)
        if isinstance(target, web.Response):
            return target
        group, resource, namespace, _ = target
        name = self._name_selector(request)
        if isinstance(name, web.Response):
            return name
        watching = request.query.get("watch") in ("true", "1")
        denied = self._authorize(request, "watch" if watching else "list", group, resource, namespace, name)
        if denied is not None:
            return denied

        def selected(key: tuple[str, str, str, str]) -> bool:
            return key[:3] == (group, resource, namespace) and (name is None or key[3] == name)

        if watching:
            return await self._watch(request, selected)
        with self._lock:
            items = [copy.deepcopy(o) for k, o in sorted(self._objects.items()) if selected(k)]
            rv = self._rv
        return web.json_response(
            {
                "kind": KINDS[(group, resource)] + "List",
                "apiVersion": f"{group}/v1" if group else "v1",
                "metadata": {"resourceVersion": str(rv)},
                "items": items,
            }
        )

    async def _watch(
        self, request: web.Request, selected: Callable[[tuple[str, str, str, str]], bool]
    ) -> web.StreamResponse:
        since_text = request.query.get("resourceVersion", "")
        bookmarks = request.query.get("allowWatchBookmarks") in ("true", "1")
        try:
            timeout = float(request.query.get("timeoutSeconds", "1800"))
            since = int(since_text) if since_text not in ("", "0") else None
        except ValueError:
            return _status(400, "BadRequest", f"invalid resourceVersion or timeoutSeconds: {since_text!r}")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        watch = _Watch(selected)
        with self._lock:
            if since is not None and since < self._oldest:
                gone = {
                    "type": "ERROR",
                    "object": {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": f"too old resource version: {since} ({self._oldest})",
                        "reason": "Expired",
                        "code": 410,
                    },
                }
                await response.write(json.dumps(gone).encode() + b"\n")
                return response
            if since is None:
                backlog = [
                    _Event(self._rv, "ADDED", k, copy.deepcopy(o))
                    for k, o in sorted(self._objects.items())
                    if selected(k)
                ]
            else:
                backlog = [e for e in self._events if e.resource_version > since and selected(e.key)]
            self._watches.add(watch)
            current = self._rv
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            for old in backlog:
                await response.write(json.dumps({"type": old.type, "object": old.object}).encode() + b"\n")
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    wait = min(remaining, self._bookmark_interval) if bookmarks else remaining
                    event = await asyncio.wait_for(watch.queue.get(), wait)
                except TimeoutError:
                    if bookmarks and loop.time() < deadline:
                        with self._lock:
                            current = self._rv
                        mark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": str(current)}}}
                        await response.write(json.dumps(mark).encode() + b"\n")
                    continue
                if event is None:  # dropped by the test (an API server restart)
                    break
                await response.write(json.dumps({"type": event.type, "object": event.object}).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watches.discard(watch)
        return response

    async def _get(self, request: web.Request) -> web.Response:
        target = self._target(request)
        if isinstance(target, web.Response):
            return target
        group, resource, namespace, name = target
        assert name is not None
        denied = self._authorize(request, "get", group, resource, namespace, name)
        if denied is not None:
            return denied
        found = self.object(group, resource, namespace, name)
        if found is None:
            return _not_found(resource, group, name)
        return web.json_response(found)

    async def _body(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except ValueError:
            return None

    def _check_object(
        self, obj: Any, group: str, resource: str, namespace: str, name: str | None
    ) -> web.Response | None:
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
            return _status(400, "BadRequest", "the body is not a Kubernetes object")
        kind = KINDS[(group, resource)]
        api_version = f"{group}/v1" if group else "v1"
        if obj.get("kind") != kind or obj.get("apiVersion") != api_version:
            return _status(400, "BadRequest", f"the object must be kind {kind}, apiVersion {api_version}")
        meta = obj["metadata"]
        if meta.get("namespace", namespace) != namespace:
            return _status(400, "BadRequest", "the namespace of the provided object does not match the request")
        if name is not None and meta.get("name") != name:
            return _status(400, "BadRequest", "the name of the object does not match the name on the URL")
        if kind == "ConfigMap":
            data = obj.get("data") or {}
            if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
                return _status(
                    422, "Invalid", f'ConfigMap "{meta.get("name")}" is invalid: data: values must be strings'
                )
            size = sum(len(k) + len(v.encode()) for k, v in data.items())
            if size > _MAX_CONFIGMAP:
                return _status(
                    422,
                    "Invalid",
                    f'ConfigMap "{meta.get("name")}" is invalid: []: Too long: must have at most 1048576 bytes',
                )
        return None

    def _write(
        self, group: str, resource: str, namespace: str, name: str, update: Callable[[Json | None], Json | web.Response]
    ) -> Json | web.Response:
        """Apply ``update`` to the current object under the lock (after the test's ``before_write``)."""
        if self.before_write is not None:
            self.before_write(group, resource, namespace, name)
        key = (group, resource, namespace, name)
        with self._lock:
            current = copy.deepcopy(self._objects.get(key))
            result = update(current)
            if isinstance(result, web.Response):
                return result
            problem = self._check_object(result, group, resource, namespace, name)
            if problem is not None:
                return problem
            result["metadata"]["namespace"] = namespace
            return self._store(key, result, "ADDED" if current is None else "MODIFIED")

    # -- admission: defaults, webhooks, the job controller --------------------------------------------
    @staticmethod
    def _default_pod(pod: Json) -> None:
        """What the ServiceAccount admission plugin adds: the ServiceAccount name and its token volume."""
        spec = pod.setdefault("spec", {})
        spec["serviceAccountName"] = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        if spec.get("automountServiceAccountToken") is False:
            return
        volume = f"kube-api-access-{secrets.token_hex(3)[:5]}"
        sources = [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {
                "downwardAPI": {
                    "items": [
                        {"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
                    ]
                }
            },
        ]
        spec.setdefault("volumes", []).append({"name": volume, "projected": {"defaultMode": 0o644, "sources": sources}})
        for kind in ("initContainers", "containers"):
            for container in spec.get(kind, []):
                mount = {"name": volume, "readOnly": True, "mountPath": SERVICE_ACCOUNT_MOUNT}
                container.setdefault("volumeMounts", []).append(mount)

    @staticmethod
    def _default_job(job: Json) -> None:
        spec = job.setdefault("spec", {})
        for key, value in (("completions", 1), ("parallelism", 1), ("backoffLimit", 6), ("suspend", False)):
            spec.setdefault(key, value)
        job.setdefault("status", {})

    async def _admit(
        self,
        operation: str,
        group: str,
        resource: str,
        namespace: str,
        name: str,
        obj: Json,
        old: Json | None,
        subject: Subject,
    ) -> Json | web.Response:
        """Call every matching webhook in turn (``admission.k8s.io/v1``, over TLS verified for the
        Service name); apply each JSON Patch; the first denial is the answer (``failurePolicy: Fail``)."""
        import aiohttp

        kind = KINDS[(group, resource)]
        for hook in self.webhooks:
            if (group, resource, operation) not in hook.rules or namespace not in hook.namespaces:
                continue
            uid = str(uuid.uuid4())
            gvk = {"group": group, "version": "v1", "kind": kind}
            gvr = {"group": group, "version": "v1", "resource": resource}
            review = {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "request": {
                    "uid": uid,
                    "kind": gvk,
                    "resource": gvr,
                    "requestKind": gvk,
                    "requestResource": gvr,
                    "name": name,
                    "namespace": namespace,
                    "operation": operation,
                    "userInfo": subject.user_info(),
                    "object": obj,
                    "oldObject": old,
                    "dryRun": False,
                    "options": {
                        "apiVersion": "meta.k8s.io/v1",
                        "kind": "CreateOptions" if operation == "CREATE" else "UpdateOptions",
                    },
                },
            }
            context = ssl.create_default_context(cafile=str(hook.ca_file))
            try:
                async with (
                    aiohttp.ClientSession(trust_env=False) as session,
                    session.post(
                        hook.url,
                        json=review,
                        ssl=context,
                        server_hostname=hook.server_name,
                        timeout=aiohttp.ClientTimeout(total=hook.timeout),
                    ) as reply,
                ):
                    answer = await reply.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError, ssl.SSLError, OSError) as exc:
                return _status(
                    500, "InternalError", f'Internal error occurred: failed calling webhook "{hook.name}": {exc}'
                )
            response = answer.get("response") if isinstance(answer, dict) else None
            if not isinstance(response, dict) or response.get("uid") != uid:
                return _status(500, "InternalError", f'webhook "{hook.name}" returned a response with a wrong uid')
            self.warnings += [str(w) for w in response.get("warnings", [])]
            if response.get("allowed") is not True:
                status = response.get("status") or {}
                return _status(
                    int(status.get("code") or 400),
                    str(status.get("reason") or "BadRequest"),
                    f'admission webhook "{hook.name}" denied the request: {status.get("message", "")}',
                )
            if response.get("patch"):
                patch = json.loads(base64.b64decode(response["patch"]))
                obj = jsonpatch.apply_patch(obj, patch)
        return obj

    async def _admitted_write(
        self,
        group: str,
        resource: str,
        namespace: str,
        name: str,
        operation: str,
        update: Callable[[Json | None], Json | web.Response],
        subject: Subject,
    ) -> Json | web.Response:
        """A write of a pod or Job: defaults, then the webhooks, then the write - refused with 409 when
        the object changed while the webhooks were deciding. Other resources are written directly."""
        if (group, resource) not in (("", "pods"), ("batch", "jobs")):
            return self._write(group, resource, namespace, name, update)
        with self._lock:
            current = copy.deepcopy(self._objects.get((group, resource, namespace, name)))
        candidate = update(copy.deepcopy(current))
        if isinstance(candidate, web.Response):
            return candidate
        problem = self._check_object(candidate, group, resource, namespace, name)
        if problem is not None:
            return problem
        candidate["metadata"]["namespace"] = namespace
        if operation == "CREATE":
            (self._default_pod if resource == "pods" else self._default_job)(candidate)
        admitted = await self._admit(operation, group, resource, namespace, name, candidate, current, subject)
        if isinstance(admitted, web.Response):
            return admitted
        seen = current["metadata"]["resourceVersion"] if current is not None else None

        def commit(now: Json | None) -> Json | web.Response:
            if now is not None and seen is None:
                return _status(409, "AlreadyExists", f'{resource} "{name}" already exists')
            if (now is None) != (seen is None) or (now is not None and now["metadata"]["resourceVersion"] != seen):
                return _conflict(resource, group, name)
            return admitted

        result = self._write(group, resource, namespace, name, commit)
        if not isinstance(result, web.Response) and resource == "jobs":
            self._start_job(namespace, result)
        return result

    def _start_job(self, namespace: str, job: Json) -> None:
        """The job controller: an unsuspended Job gets its pod (created as the job controller)."""
        key = (namespace, job["metadata"]["name"])
        if job["spec"].get("suspend") or key in self._jobs_started:
            return
        self._jobs_started.add(key)
        task = asyncio.get_running_loop().create_task(self._run_job(namespace, job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_job(self, namespace: str, job: Json) -> None:
        meta, template = job["metadata"], job["spec"]["template"]
        template_meta = template.get("metadata", {})
        labels = {
            **template_meta.get("labels", {}),
            "batch.kubernetes.io/controller-uid": meta["uid"],
            "batch.kubernetes.io/job-name": meta["name"],
            "controller-uid": meta["uid"],
            "job-name": meta["name"],
        }
        owner = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        pod: Json = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{meta['name']}-{secrets.token_hex(3)[:5]}",
                "generateName": f"{meta['name']}-",
                "namespace": namespace,
                "labels": labels,
                "annotations": dict(template_meta.get("annotations", {})),
                "ownerReferences": [owner],
                "finalizers": ["batch.kubernetes.io/job-tracking"],
            },
            "spec": copy.deepcopy(template["spec"]),
        }
        name = pod["metadata"]["name"]

        def create(current: Json | None) -> Json | web.Response:
            return pod if current is None else _status(409, "AlreadyExists", f'pods "{name}" already exists')

        result = await self._admitted_write("", "pods", namespace, name, "CREATE", create, JOB_CONTROLLER)
        if isinstance(result, web.Response):
            message = json.loads(result.body)["message"] if isinstance(result.body, bytes) else str(result.body)
            self.events.append({"object": f"job/{meta['name']}", "reason": "FailedCreate", "message": message})
            return
        self.events.append(
            {"object": f"job/{meta['name']}", "reason": "SuccessfulCreate", "message": f"Created pod: {name}"}
        )
        with self._lock:
            key = ("batch", "jobs", namespace, meta["name"])
            if key in self._objects:
                stored = copy.deepcopy(self._objects[key])
                stored.setdefault("status", {}).update(
                    active=1, startTime=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                )
                self._store(key, stored, "MODIFIED")

    async def _create(self, request: web.Request) -> web.Response:
        target = self._target(request)
        if isinstance(target, web.Response):
            return target
        group, resource, namespace, _ = target
        obj = await self._body(request)
        name = obj.get("metadata", {}).get("name") if isinstance(obj, dict) else None
        denied = self._authorize(request, "create", group, resource, namespace, None)
        if denied is not None:
            return denied
        if not isinstance(name, str) or not name:
            generate = obj.get("metadata", {}).get("generateName") if isinstance(obj, dict) else None
            if not isinstance(generate, str) or not generate:
                return _status(400, "BadRequest", "name or generateName is required")
            name = generate + secrets.token_hex(3)[:5]
            obj["metadata"]["name"] = name

        def create(current: Json | None) -> Json | web.Response:
            if current is not None:
                return _status(409, "AlreadyExists", f'{resource} "{name}" already exists')
            created = copy.deepcopy(obj)
            created["metadata"].pop("resourceVersion", None)
            return dict(created)

        subject = self._subject(request)
        assert subject is not None  # authorized above
        result = await self._admitted_write(group, resource, namespace, name, "CREATE", create, subject)
        return result if isinstance(result, web.Response) else web.json_response(result, status=201)

    async def _replace(self, request: web.Request) -> web.Response:
        target = self._target(request)
        if isinstance(target, web.Response):
            return target
        group, resource, namespace, name = target
        assert name is not None
        denied = self._authorize(request, "update", group, resource, namespace, name)
        if denied is not None:
            return denied
        obj = await self._body(request)
        problem = self._check_object(obj, group, resource, namespace, name)
        if problem is not None:
            return problem

        def replace(current: Json | None) -> Json | web.Response:
            if current is None:
                return _not_found(resource, group, name)
            wanted = obj["metadata"].get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                return _conflict(resource, group, name)
            updated = copy.deepcopy(obj)
            updated["metadata"]["uid"] = current["metadata"]["uid"]
            updated["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"]
            return dict(updated)

        subject = self._subject(request)
        assert subject is not None
        result = await self._admitted_write(group, resource, namespace, name, "UPDATE", replace, subject)
        return result if isinstance(result, web.Response) else web.json_response(result)

    async def _patch(self, request: web.Request) -> web.Response:
        target = self._target(request)
        if isinstance(target, web.Response):
            return target
        group, resource, namespace, name = target
        assert name is not None
        denied = self._authorize(request, "patch", group, resource, namespace, name)
        if denied is not None:
            return denied
        content_type = request.content_type
        if content_type not in _PATCH_TYPES:
            return _status(
                415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {content_type}"
            )
        patch = await self._body(request)
        if patch is None:
            return _status(400, "BadRequest", "the patch is not JSON")

        def apply(current: Json | None) -> Json | web.Response:
            if current is None:
                return _not_found(resource, group, name)
            if content_type == "application/json-patch+json":
                try:
                    patched = jsonpatch.apply_patch(current, patch)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as exc:
                    return _status(422, "Invalid", f"the JSON patch could not be applied: {exc}")
            else:
                if not isinstance(patch, dict):
                    return _status(400, "BadRequest", "a merge patch must be a JSON object")
                wanted = (patch.get("metadata") or {}).get("resourceVersion")
                if wanted and wanted != current["metadata"]["resourceVersion"]:
                    return _conflict(resource, group, name)
                patched = _merge_patch(current, patch)
            if not isinstance(patched, dict):
                return _status(422, "Invalid", "the patched object is not an object")
            wanted = (patched.get("metadata") or {}).get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                return _conflict(resource, group, name)
            return patched

        subject = self._subject(request)
        assert subject is not None
        result = await self._admitted_write(group, resource, namespace, name, "UPDATE", apply, subject)
        return result if isinstance(result, web.Response) else web.json_response(result)

    async def _delete(self, request: web.Request) -> web.Response:
        target = self._target(request)
        if isinstance(target, web.Response):
            return target
        group, resource, namespace, name = target
        assert name is not None
        denied = self._authorize(request, "delete", group, resource, namespace, name)
        if denied is not None:
            return denied
        with self._lock:
            key = (group, resource, namespace, name)
            current = self._objects.get(key)
            if current is None:
                return _not_found(resource, group, name)
            self._store(key, copy.deepcopy(current), "DELETED")
        return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})


def _not_found(resource: str, group: str, name: str) -> web.Response:
    what = f"{resource}.{group}" if group else resource
    return _status(404, "NotFound", f'{what} "{name}" not found', {"name": name, "group": group, "kind": resource})


def _conflict(resource: str, group: str, name: str) -> web.Response:
    what = f"{resource}.{group}" if group else resource
    return _status(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {what} "{name}": the object has been modified; please apply your '
        "changes to the latest version and try again",
        {"name": name, "group": group, "kind": resource},
    )


def subjects_from_json(text: str) -> dict[str, Subject]:
    """Parse ``{"TOKEN": {"name": "...", "namespace": "ns", "rules": [<PolicyRule JSON>, ...]}}``."""
    out: dict[str, Subject] = {}
    for token, spec in json.loads(text).items():
        rules = rules_from_role({"rules": spec.get("rules", [])})
        out[token] = Subject(spec["name"], {spec.get("namespace"): rules})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sidecar.simulation.kube_api``: serve until SIGTERM (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="kube_api", description="Kubernetes API server double (HTTPS)")
    parser.add_argument("--dir", required=True, help="where ca.crt, the serving pair and the admin token go")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rbac", help="JSON file: token -> {name, namespace, rules}")
    parser.add_argument("--ready-file", help='write {"url", "pid"} here once serving')
    parser.add_argument("--seed", action="append", default=[], help="a JSON manifest to create at start")
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    subjects = subjects_from_json(Path(args.rbac).read_text()) if args.rbac else None
    double = KubeApiDouble(directory, subjects=subjects)
    for path in args.seed:
        double.seed(json.loads(Path(path).read_text()))

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        url = await double.serve(port=args.port)
        if args.ready_file:
            ready = Path(args.ready_file)
            tmp = ready.with_name(ready.name + ".tmp")
            tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
            tmp.replace(ready)
        await stop.wait()
        await double.aclose()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
