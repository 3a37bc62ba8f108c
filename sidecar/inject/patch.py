"""The pure patch builder: a pod in, an RFC 6902 JSON Patch (or a refusal) out.

:func:`plan_injection` decides for one pod at ``CREATE``; :func:`check_update` for an annotation
change of an injected pod at ``UPDATE``. Nothing here does I/O, so every rule is unit-testable
with plain dicts; :mod:`sidecar.inject.review` wraps it in AdmissionReview.

What an injected pod gets (Kubernetes >= 1.29: native sidecars are init containers with
``restartPolicy: Always``, which run for the pod's life without keeping a Job's pod alive):

1. ``agent-authz-init``: ``agent-authz iptables …`` as root with only ``NET_ADMIN`` and
   ``NET_RAW``, read-only root filesystem (the xtables lock goes to its own emptyDir ``/tmp``).
2. ``agent-authz`` (native sidecar): ``agent-authz serve``, as the proxy UID/GID, non-root,
   read-only root filesystem, no capabilities, probes on the health port.
3. ``agent-authz-envoy`` (native sidecar): ``agent-authz envoy`` (renders the bootstrap into the
   ``/run/agent-authz`` emptyDir, then becomes Envoy), same security context.

All three come before the pod's own init containers, so those are intercepted too and find Envoy
running. Volumes: see :mod:`sidecar.inject.layout`.

With an ``intercept`` section in ``sidecar.yaml`` (HTTPS interception, ``tls: intercept``), the pod
also gets the trust volume: the sidecar writes the pod CA there, and every container of the pod's
own (init containers included) mounts it read-only at ``/etc/agent-authz/trust`` and gets the
variables common runtimes read (:func:`sidecar.tls_intercept.trust.agent_trust_env`). A variable the
container already sets is kept (with a warning: that runtime will not trust the pod CA); a
container already mounting something at that path is refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.inject import layout
from sidecar.inject.annotations import (
    AnnotationError,
    check_revoked_annotation,
    check_task_annotation,
    inject_choice,
)
from sidecar.inject.settings import InjectorConfig, Resources
from sidecar.tls_intercept.trust import agent_trust_env, agent_trust_mount, trust_volume

__all__ = ["Injection", "InjectionDenied", "check_update", "plan_injection"]

Json = dict[str, Any]

_ESCALATING_CAPABILITIES = frozenset({"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "ALL"})


class InjectionDenied(Exception):
    """The pod must not be admitted; ``str(exc)`` is the message the API server shows the user."""


@dataclass(frozen=True, slots=True)
class Injection:
    """The outcome for one pod.

    Attributes:
        patch: RFC 6902 operations (empty: admit unchanged).
        outcome: ``injected``, ``already_injected``, ``opted_out`` or ``validated`` (for logs).
        warnings: short texts for AdmissionResponse ``warnings`` (shown by kubectl).
        task_id: the task the annotation declares, if any.
    """

    patch: list[Json]
    outcome: str
    warnings: list[str] = field(default_factory=list)
    task_id: str | None = None


def _pointer(token: str) -> str:
    """RFC 6901 §3: escape ``~`` and ``/`` in a JSON Pointer reference token."""
    return token.replace("~", "~0").replace("/", "~1")


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InjectionDenied(f"malformed pod: {where} must be an object")
    return value


def _list(value: object, where: str) -> list[Json]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise InjectionDenied(f"malformed pod: {where} must be a list of objects")
    return value


def _annotations(pod: Mapping[str, Any]) -> dict[str, str]:
    metadata = _mapping(pod.get("metadata"), "metadata")
    annotations = _mapping(metadata.get("annotations"), "metadata.annotations")
    if not all(isinstance(v, str) for v in annotations.values()):
        raise InjectionDenied("malformed pod: annotation values must be strings")
    return dict(annotations)


def _containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Json]]:
    """``(kind, container)`` for every container of the pod spec (ephemeral ones included)."""
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for container in _list(spec.get(kind), f"spec.{kind}"):
            yield kind, container


def _pod_name(pod: Mapping[str, Any]) -> str:
    metadata = _mapping(pod.get("metadata"), "metadata")
    return str(metadata.get("name") or metadata.get("generateName") or "<unnamed>")


def _check_security(spec: Mapping[str, Any], config: InjectorConfig, *, ours: frozenset[str]) -> None:
    """Refuse a pod whose own containers could escape the interception rules."""
    settings = config.settings
    if spec.get("hostNetwork") is True:
        raise InjectionDenied(
            "agent-authz cannot inject a pod with hostNetwork: true "
            "(its iptables rules would change the node's network)"
        )
    pod_ctx = _mapping(spec.get("securityContext"), "spec.securityContext")
    for kind, container in _containers(spec):
        name = str(container.get("name", "?"))
        if name in ours:
            continue
        ctx = _mapping(container.get("securityContext"), f"spec.{kind}[{name}].securityContext")
        uid = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
        gid = ctx.get("runAsGroup", pod_ctx.get("runAsGroup"))
        if uid == settings.proxy_uid:
            raise InjectionDenied(
                f"container {name!r} runs as UID {uid}, the proxy UID: its traffic would bypass agent-authz's "
                "interception; run it as another user"
            )
        if gid == settings.proxy_gid:
            raise InjectionDenied(
                f"container {name!r} runs with GID {gid}, the proxy GID: its traffic would bypass agent-authz's "
                "interception; run it with another group"
            )
        if settings.require_run_as_user and uid is None:
            raise InjectionDenied(
                f"container {name!r} sets no runAsUser: this installation requires one (the image's USER might be "
                "the proxy UID)"
            )
        if ctx.get("privileged") is True:
            raise InjectionDenied(f"container {name!r} is privileged: it could remove agent-authz's interception rules")
        added = _mapping(ctx.get("capabilities"), f"{name}.securityContext.capabilities").get("add") or []
        if not isinstance(added, list):
            raise InjectionDenied(f"malformed pod: container {name!r}: capabilities.add must be a list")
        escalating = sorted({str(c).upper().removeprefix("CAP_") for c in added} & _ESCALATING_CAPABILITIES)
        if escalating:
            raise InjectionDenied(
                f"container {name!r} adds capabilities {escalating}: it could remove agent-authz's interception rules"
            )


def _probe_ports(spec: Mapping[str, Any], ours: frozenset[str]) -> tuple[list[int], list[str]]:
    """Ports kubelet probes (httpGet, tcpSocket, grpc) on the pod's own containers, and warnings."""
    ports: set[int] = set()
    warnings: list[str] = []
    for _, container in _containers(spec):
        name = str(container.get("name", "?"))
        if name in ours:
            continue
        named = {
            str(p.get("name")): p.get("containerPort")
            for p in _list(container.get("ports"), f"{name}.ports")
            if p.get("name")
        }
        for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = _mapping(container.get(probe_kind), f"{name}.{probe_kind}")
            for handler in ("httpGet", "tcpSocket", "grpc"):
                if handler not in probe:
                    continue
                port = _mapping(probe[handler], f"{name}.{probe_kind}.{handler}").get("port")
                if isinstance(port, str) and not port.isdigit():
                    resolved = named.get(port)
                    if not isinstance(resolved, int):
                        raise InjectionDenied(
                            f"container {name!r}: {probe_kind} names port {port!r}, "
                            "which the container does not declare"
                        )
                    port = resolved
                if isinstance(port, str):
                    port = int(port)
                if isinstance(port, int) and 1 <= port <= 65535:
                    ports.add(port)
    if ports:
        warnings.append(
            f"agent-authz: probe port(s) {','.join(map(str, sorted(ports)))} bypass inbound mTLS (kubelet has no SVID)"
        )
    return sorted(ports), warnings


def _resources(resources: Resources) -> Json:
    out: Json = {}
    if resources.requests:
        out["requests"] = dict(resources.requests)
    if resources.limits:
        out["limits"] = dict(resources.limits)
    return out


def _proxy_security(config: InjectorConfig) -> Json:
    return {
        "runAsUser": config.settings.proxy_uid,
        "runAsGroup": config.settings.proxy_gid,
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _http_probe(path: str, port: int, *, period: int, failures: int) -> Json:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 2,
    }


def _iptables_args(config: InjectorConfig, probe_ports: list[int]) -> list[str]:
    settings = config.settings
    exclude_in = sorted({*settings.exclude_inbound_ports, config.health_port, *probe_ports})
    args = [
        "iptables",
        "--outbound-port",
        str(config.outbound_port),
        "--inbound-port",
        str(config.inbound_port),
        "--proxy-uid",
        str(settings.proxy_uid),
        "--proxy-gid",
        str(settings.proxy_gid),
        "--inbound-ports",
        "*" if config.inbound else "",
        "--exclude-inbound-ports",
        ",".join(map(str, exclude_in)),
        "--exclude-outbound-cidrs",
        ",".join(settings.exclude_outbound_cidrs),
        "--exclude-outbound-ports",
        ",".join(map(str, settings.exclude_outbound_ports)),
        "--ipv6",
        "same" if config.ipv6 else "block",
    ]
    if settings.allow_non_tcp:
        args.append("--allow-non-tcp")
    return args


def build_containers(config: InjectorConfig, probe_ports: list[int]) -> list[Json]:
    """The three containers, in the order they go at the start of ``spec.initContainers``."""
    settings = config.settings
    image = {"image": settings.image, "imagePullPolicy": settings.image_pull_policy}
    run = {"name": layout.VOLUME_RUN, "mountPath": layout.RUN_DIR}
    conf = {"name": layout.VOLUME_CONFIG, "mountPath": layout.CONFIG_DIR, "readOnly": True}
    spire = {"name": layout.VOLUME_WORKLOAD_API, "mountPath": layout.WORKLOAD_API_DIR, "readOnly": True}
    init = {
        "name": layout.CONTAINER_INIT,
        **image,
        "command": ["agent-authz", *_iptables_args(config, probe_ports)],
        "env": [{"name": "XTABLES_LOCKFILE", "value": f"{layout.TMP_DIR}/xtables.lock"}],
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "resources": _resources(settings.init.resources),
        "volumeMounts": [{"name": layout.VOLUME_TMP, "mountPath": layout.TMP_DIR}],
    }
    health = config.health_port
    sidecar_mounts: list[Json] = [
        conf,
        {"name": layout.VOLUME_POD, "mountPath": layout.POD_DIR, "readOnly": True},
        {"name": layout.VOLUME_KEYS, "mountPath": layout.KEYS_DIR, "readOnly": True},
        run,
        {"name": layout.VOLUME_LOGS, "mountPath": layout.LOG_DIR},
        spire,
    ]
    if config.intercept:  # the sidecar publishes the pod CA there (the agent mounts it read-only)
        sidecar_mounts.append({"name": layout.VOLUME_TRUST, "mountPath": layout.TRUST_DIR})
    sidecar = {
        "name": layout.CONTAINER_SIDECAR,
        **image,
        "command": ["agent-authz", "serve", "--config", layout.CONFIG_FILE, "--log-level", settings.sidecar.log_level],
        "restartPolicy": "Always",
        "ports": [{"name": "authz-health", "containerPort": health, "protocol": "TCP"}],
        "securityContext": _proxy_security(config),
        "resources": _resources(settings.sidecar.resources),
        "startupProbe": _http_probe("/readyz", health, period=1, failures=120),
        "readinessProbe": _http_probe("/readyz", health, period=5, failures=3),
        "livenessProbe": _http_probe("/healthz", health, period=10, failures=3),
        "volumeMounts": sidecar_mounts,
    }
    envoy = {
        "name": layout.CONTAINER_ENVOY,
        **image,
        "command": [
            "agent-authz",
            "envoy",
            "--config",
            layout.CONFIG_FILE,
            "--out",
            layout.ENVOY_BOOTSTRAP,
            "--concurrency",
            str(settings.envoy.concurrency),
            "--log-level",
            settings.envoy.log_level,
        ],
        "restartPolicy": "Always",
        "securityContext": _proxy_security(config),
        "resources": _resources(settings.envoy.resources),
        "startupProbe": _http_probe("/envoy/ready", health, period=1, failures=120),
        "readinessProbe": _http_probe("/envoy/ready", health, period=5, failures=3),
        "volumeMounts": [conf, run, spire],
    }
    return [init, sidecar, envoy]


def build_volumes(config: InjectorConfig) -> list[Json]:
    """The volumes the three containers mount (:mod:`sidecar.inject.layout`)."""
    settings = config.settings
    annotation = "metadata.annotations['{}']"
    workload: Json
    if settings.workload_api.mode == "csi":
        workload = {"csi": {"driver": settings.workload_api.driver, "readOnly": True}}
    else:
        workload = {"hostPath": {"path": settings.workload_api.host_path, "type": "Directory"}}
    return [
        {"name": layout.VOLUME_CONFIG, "configMap": {"name": settings.config_map, "defaultMode": 0o444}},
        {
            "name": layout.VOLUME_POD,
            "downwardAPI": {
                "defaultMode": 0o444,
                "items": [
                    {"path": "task", "fieldRef": {"fieldPath": annotation.format(layout.ANNOTATION_TASK)}},
                    {"path": "revoked", "fieldRef": {"fieldPath": annotation.format(layout.ANNOTATION_REVOKED)}},
                ],
            },
        },
        {
            "name": layout.VOLUME_KEYS,
            "secret": {
                "secretName": settings.signing_key_secret,
                "defaultMode": 0o444,
                "items": [{"key": "signing.pem", "path": "signing.pem"}],
            },
        },
        {"name": layout.VOLUME_RUN, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        {"name": layout.VOLUME_LOGS, "emptyDir": {"sizeLimit": settings.logs_size_limit}},
        {"name": layout.VOLUME_TMP, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {"name": layout.VOLUME_WORKLOAD_API, **workload},
        *([trust_volume(layout.VOLUME_TRUST)] if config.intercept else []),
    ]


def _trust_patch(spec: Mapping[str, Any]) -> tuple[list[Json], list[str]]:
    """Operations giving every container of the pod's own the pod CA (mount) and the trust variables.

    Applied before the injected containers are inserted, so the indices are the pod's own.

    Raises:
        InjectionDenied: a container already mounts something at the trust directory.
    """
    ops: list[Json] = []
    warnings: list[str] = []
    env = agent_trust_env(layout.TRUST_DIR)
    mount = agent_trust_mount(layout.TRUST_DIR, layout.VOLUME_TRUST)
    for kind in ("initContainers", "containers"):
        for index, container in enumerate(_list(spec.get(kind), f"spec.{kind}")):
            name = str(container.get("name", "?"))
            mounts = _list(container.get("volumeMounts"), f"{name}.volumeMounts")
            if any(str(m.get("mountPath", "")).rstrip("/") == layout.TRUST_DIR for m in mounts):
                raise InjectionDenied(
                    f"container {name!r} mounts {layout.TRUST_DIR}, where agent-authz puts the pod CA"
                )
            base = f"/spec/{kind}/{index}"
            if container.get("volumeMounts") is None:
                ops.append({"op": "add", "path": f"{base}/volumeMounts", "value": [mount]})
            else:
                ops.append({"op": "add", "path": f"{base}/volumeMounts/-", "value": mount})
            own = {str(e.get("name")) for e in _list(container.get("env"), f"{name}.env")}
            kept = sorted(own & set(env))
            if kept:
                warnings.append(
                    f"agent-authz: container {name!r} sets {', '.join(kept)}: kept, so those runtimes will not trust "
                    "the pod CA (its HTTPS to intercepted hosts fails)"
                )
            added = [{"name": k, "value": v} for k, v in env.items() if k not in own]
            if container.get("env") is None:
                ops.append({"op": "add", "path": f"{base}/env", "value": added})
            else:
                ops += [{"op": "add", "path": f"{base}/env/-", "value": item} for item in added]
    return ops, warnings


_OUR_CONTAINERS = frozenset({layout.CONTAINER_INIT, layout.CONTAINER_SIDECAR, layout.CONTAINER_ENVOY})


def _subset(expected: object, actual: object) -> bool:
    """Whether ``actual`` holds everything ``expected`` does (extra keys allowed: API server defaults)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and _subset(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(expected) == len(actual)
            and all(_subset(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return expected == actual


def _check_injected(spec: Mapping[str, Any], volumes: list[Json], config: InjectorConfig) -> None:
    """An already-injected pod must carry exactly what this injector builds, first in ``initContainers``.

    Otherwise the status annotation plus look-alike containers would be a way around injection.
    """
    init = _list(spec.get("initContainers"), "spec.initContainers")
    probe_ports, _ = _probe_ports(spec, _OUR_CONTAINERS)
    expected = build_containers(config, probe_ports)
    by_name = {str(v.get("name")): v for v in volumes}
    problem = None
    if len(init) < len(expected) or [c.get("name") for c in init[: len(expected)]] != [c["name"] for c in expected]:
        problem = f"its first init containers are not {[c['name'] for c in expected]}"
    else:
        for want, have in zip(expected, init, strict=False):
            if not _subset(want, have):
                problem = f"init container {want['name']!r} differs from what this injector builds"
                break
        for volume in build_volumes(config):
            if problem is None and not _subset(volume, by_name.get(volume["name"])):
                problem = f"volume {volume['name']!r} is missing or differs from what this injector builds"
    if problem is not None:
        raise InjectionDenied(
            f"the pod is annotated {layout.ANNOTATION_STATUS}: {layout.STATUS_INJECTED} but {problem}: "
            "create it without the annotation and the injected containers so that it is injected afresh"
        )


def _check_task(
    annotations: Mapping[str, str], pod: Mapping[str, Any], namespace: str, config: InjectorConfig, now: float
) -> tuple[str | None, list[str]]:
    spec = _mapping(pod.get("spec"), "spec")
    service_account = str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default")
    agent = config.settings.spiffe_id(namespace, service_account)
    warnings = []
    try:
        check_revoked_annotation(annotations)
        task = check_task_annotation(
            annotations.get(layout.ANNOTATION_TASK),
            agent=agent,
            credentials=config.sidecar.settings.credentials,
            now=now,
        )
    except AnnotationError as exc:
        raise InjectionDenied(str(exc)) from None
    if task.kind == "none":
        warnings.append(
            f"agent-authz: no {layout.ANNOTATION_TASK} annotation: "
            "every outbound call is denied (no_task) until one is set"
        )
    if agent is None:
        warnings.append("agent-authz: the task's agent is not checked (no SPIFFE ID template configured)")
    return task.task_id, warnings


def plan_injection(pod: object, namespace: str, config: InjectorConfig, *, now: float) -> Injection:
    """Decide what to do with a pod being created (admission ``CREATE``).

    Args:
        pod: the Pod object (``AdmissionRequest.object``).
        namespace: the namespace of the request (pods from controllers often have none in metadata).
        config: injector settings and the sidecar configuration.
        now: POSIX seconds (a grant's expiry).

    Returns:
        The :class:`Injection`: a patch that adds the containers, volumes and the status annotation;
        or no patch for a pod that opted out or is already injected (idempotent: a reinvoked
        webhook, or a re-applied injected manifest, changes nothing).

    Raises:
        InjectionDenied: the pod must be refused - malformed; in a namespace the chart did not
            provision; opting out where that is not allowed; hostNetwork; a container running as
            the proxy UID or GID, privileged, or adding NET_ADMIN/NET_RAW/SYS_ADMIN; a name clash with
            the injected containers or volumes; marked injected without the containers; an invalid
            ``agent-authz.io/task`` or ``agent-authz.io/revoked`` annotation.
    """
    if not isinstance(pod, dict):
        raise InjectionDenied("malformed pod: the object must be a Pod")
    spec = _mapping(pod.get("spec"), "spec")
    if not _list(spec.get("containers"), "spec.containers"):
        raise InjectionDenied("malformed pod: spec.containers is missing or empty")
    annotations = _annotations(pod)
    settings = config.settings
    try:
        wanted = inject_choice(annotations)
    except AnnotationError as exc:
        raise InjectionDenied(str(exc)) from None
    if not wanted:
        if not settings.allow_opt_out:
            raise InjectionDenied(
                f'{layout.ANNOTATION_INJECT}: "false" is not allowed by this installation (injection is mandatory '
                f"in namespace {namespace})"
            )
        return Injection([], "opted_out")

    names = [str(c.get("name")) for _, c in _containers(spec)]
    volumes = _list(spec.get("volumes"), "spec.volumes")
    volume_names = {str(v.get("name")) for v in volumes}
    injected = annotations.get(layout.ANNOTATION_STATUS) == layout.STATUS_INJECTED
    if injected:
        _check_injected(spec, volumes, config)
    else:
        clash = sorted(
            {n for n in names if n.startswith(layout.RESERVED_PREFIX)}
            | {n for n in volume_names if n.startswith(layout.RESERVED_PREFIX)}
        )
        if clash:
            raise InjectionDenied(
                f"names starting with {layout.RESERVED_PREFIX!r} are reserved for the injector: {clash}"
            )
        if settings.namespaces and namespace not in settings.namespaces:
            raise InjectionDenied(
                f"namespace {namespace!r} is labeled {layout.NAMESPACE_LABEL}=enabled but the agent-authz chart does "
                "not provision its ConfigMap and signing-key Secret: add it to the chart's agentNamespaces"
            )
    ours = _OUR_CONTAINERS if injected else frozenset()
    _check_security(spec, config, ours=ours)
    task_id, warnings = _check_task(annotations, pod, namespace, config, now)
    if injected:
        return Injection([], "already_injected", warnings, task_id)

    probe_ports, probe_warnings = _probe_ports(spec, ours)
    warnings += probe_warnings
    patch: list[Json] = []
    metadata = _mapping(pod.get("metadata"), "metadata")
    if metadata.get("annotations") is None:
        if "metadata" not in pod:
            patch.append({"op": "add", "path": "/metadata", "value": {}})
        patch.append(
            {"op": "add", "path": "/metadata/annotations", "value": {layout.ANNOTATION_STATUS: layout.STATUS_INJECTED}}
        )
    else:
        patch.append(
            {
                "op": "add",
                "path": f"/metadata/annotations/{_pointer(layout.ANNOTATION_STATUS)}",
                "value": layout.STATUS_INJECTED,
            }
        )
    if config.intercept:  # before our containers are inserted: the pod's own indices still hold
        trust_ops, trust_warnings = _trust_patch(spec)
        patch += trust_ops
        warnings += trust_warnings
    containers = build_containers(config, probe_ports)
    if spec.get("initContainers") is None:
        patch.append({"op": "add", "path": "/spec/initContainers", "value": containers})
    else:
        patch += [{"op": "add", "path": f"/spec/initContainers/{i}", "value": c} for i, c in enumerate(containers)]
    new_volumes = build_volumes(config)
    if spec.get("volumes") is None:
        patch.append({"op": "add", "path": "/spec/volumes", "value": new_volumes})
    else:
        patch += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in new_volumes]
    return Injection(patch, "injected", warnings, task_id)


def check_update(pod: object, old: object, namespace: str, config: InjectorConfig, *, now: float) -> Injection:
    """Validate an update (admission ``UPDATE``) of an injected pod whose task annotations changed.

    Changing ``agent-authz.io/task`` or ``agent-authz.io/revoked`` is how a running pod's task is
    changed or revoked (the kubelet rewrites the downward-API files, the sidecar reloads); an
    invalid value is refused here rather than left for the sidecar to reject. Other updates,
    and pods that were not injected, pass unchanged.

    Raises:
        InjectionDenied: the new annotations are invalid (or the objects are malformed).
    """
    if not isinstance(pod, dict):
        raise InjectionDenied("malformed pod: the object must be a Pod")
    annotations = _annotations(pod)
    if annotations.get(layout.ANNOTATION_STATUS) != layout.STATUS_INJECTED:
        return Injection([], "not_injected")
    previous = _annotations(old) if isinstance(old, dict) else {}
    keys = (layout.ANNOTATION_TASK, layout.ANNOTATION_REVOKED)
    if all(annotations.get(k) == previous.get(k) for k in keys):
        return Injection([], "unchanged")
    task_id, warnings = _check_task(annotations, pod, namespace, config, now)
    return Injection([], "validated", warnings, task_id)
