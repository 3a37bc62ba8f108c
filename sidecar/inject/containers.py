"""What the injector checks on the pod's own containers and what it adds: the three injected containers.

1. ``agent-authz-init``: ``agent-authz iptables …`` as root with only ``NET_ADMIN`` and
   ``NET_RAW``, read-only root filesystem (the xtables lock goes to its own emptyDir ``/tmp``).
2. ``agent-authz`` (native sidecar): ``agent-authz serve``, as the proxy UID/GID, non-root,
   read-only root filesystem, no capabilities, probes on the health port.
3. ``agent-authz-envoy`` (native sidecar): ``agent-authz envoy`` (renders the bootstrap into the
   ``/run/agent-authz`` emptyDir, then becomes Envoy), same security context.

The two native sidecars start side by side: ``agent-authz`` has no ``startupProbe``, so the
kubelet starts ``agent-authz-envoy`` right after it (Envoy retries the sidecar's sockets until they
exist); ``agent-authz-envoy``'s ``startupProbe`` is ``/proxy/ready`` (both ready), so the pod's own
containers start only once the sidecar and Envoy are both ready. On termination they stop in
reverse order: Envoy first.

What the pod's own containers may not do is :mod:`sidecar.inject.escapes`; their probe and HTTP
lifecycle hook ports bypass inbound mTLS (kubelet has no SVID). With ``intercept``, each of them
mounts the trust volume and gets the trust variables (:func:`trust_patch`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.inject import layout
from sidecar.inject.podspec import InjectionDenied, Json, containers_of, mapping, object_list
from sidecar.inject.settings import InjectorConfig, Resources
from sidecar.tls_intercept.trust import agent_trust_env, agent_trust_mount

__all__ = ["OUR_CONTAINERS", "build_containers", "probed_ports", "trust_patch"]

OUR_CONTAINERS = frozenset({layout.CONTAINER_INIT, layout.CONTAINER_SIDECAR, layout.CONTAINER_ENVOY})
"""The names of the injected containers."""


def _resolve_port(port: object, named: Mapping[str, object], name: str, where: str) -> int | None:
    """A probe's or hook's ``port`` (number, digit string or container port name) as a number."""
    if isinstance(port, str) and not port.isdigit():
        resolved = named.get(port)
        if not isinstance(resolved, int):
            raise InjectionDenied(
                f"container {name!r}: {where} names port {port!r}, which the container does not declare"
            )
        port = resolved
    if isinstance(port, str):
        port = int(port)
    return port if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535 else None


def probed_ports(spec: Mapping[str, Any], ours: frozenset[str]) -> tuple[list[int], list[str]]:
    """Ports the kubelet calls on the pod IP for the pod's own containers, and warnings.

    Probes (httpGet, tcpSocket, grpc) and HTTP lifecycle hooks (``postStart`` / ``preStop``
    ``httpGet`` without a ``host``: the kubelet calls them on the pod IP) come without an SVID, so
    their ports are excluded from inbound interception, as Istio does for the probes it does not
    rewrite: refusing such pods would forbid a common pattern, and intercepting them fails the mTLS
    handshake (a failing ``postStart`` gets the container killed). A hook ``httpGet`` with a
    ``host`` calls that host, not this pod: nothing to exclude. ``tcpSocket`` hooks are not run by
    the kubelet; ``exec`` and ``sleep`` hooks use no port.

    Raises:
        InjectionDenied: a probe or hook names a port the container does not declare.
    """
    ports: set[int] = set()
    hook_ports: set[int] = set()
    for _, container in containers_of(spec):
        name = str(container.get("name", "?"))
        if name in ours:
            continue
        named = {
            str(p.get("name")): p.get("containerPort")
            for p in object_list(container.get("ports"), f"{name}.ports")
            if p.get("name")
        }
        for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = mapping(container.get(probe_kind), f"{name}.{probe_kind}")
            for handler in ("httpGet", "tcpSocket", "grpc"):
                if handler not in probe:
                    continue
                port = mapping(probe[handler], f"{name}.{probe_kind}.{handler}").get("port")
                resolved = _resolve_port(port, named, name, probe_kind)
                if resolved is not None:
                    ports.add(resolved)
        lifecycle = mapping(container.get("lifecycle"), f"{name}.lifecycle")
        for hook_kind in ("postStart", "preStop"):
            hook = mapping(lifecycle.get(hook_kind), f"{name}.lifecycle.{hook_kind}")
            if "httpGet" not in hook:
                continue
            action = mapping(hook["httpGet"], f"{name}.lifecycle.{hook_kind}.httpGet")
            if action.get("host"):
                continue
            resolved = _resolve_port(action.get("port"), named, name, f"lifecycle.{hook_kind}")
            if resolved is not None:
                hook_ports.add(resolved)
    warnings: list[str] = []
    if ports:
        warnings.append(
            f"agent-authz: probe port(s) {','.join(map(str, sorted(ports)))} bypass inbound mTLS (kubelet has no SVID)"
        )
    if hook_ports:
        warnings.append(
            f"agent-authz: lifecycle hook port(s) {','.join(map(str, sorted(hook_ports)))} bypass inbound mTLS "
            "(kubelet has no SVID)"
        )
    return sorted(ports | hook_ports), warnings


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
        "--proxy-ports",
        ",".join(map(str, config.proxy_ports)),
        "--dns-port",
        str(config.dns_port),
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
        {"name": layout.VOLUME_STATE, "mountPath": layout.STATE_DIR},  # the sidecar's alone, not Envoy's
        spire,
    ]
    if config.intercept:  # the sidecar publishes the pod CA there (the agent mounts it read-only)
        sidecar_mounts.append({"name": layout.VOLUME_TRUST, "mountPath": layout.TRUST_DIR})
    for index, credential in enumerate(sorted(settings.credentials, key=lambda c: c.name)):
        sidecar_mounts.append(  # the directory, not a subPath: the kubelet's ..data swap reaches the sidecar
            {
                "name": f"{layout.VOLUME_CREDENTIAL_PREFIX}{index}",
                "mountPath": f"{layout.CREDENTIALS_DIR}/{credential.name}",
                "readOnly": True,
            }
        )
    sidecar = {
        "name": layout.CONTAINER_SIDECAR,
        **image,
        "command": ["agent-authz", "serve", "--config", layout.CONFIG_FILE, "--log-level", settings.sidecar.log_level],
        "restartPolicy": "Always",
        "ports": [{"name": "authz-health", "containerPort": health, "protocol": "TCP"}],
        "securityContext": _proxy_security(config),
        "resources": _resources(settings.sidecar.resources),
        # no startupProbe: the kubelet starts the Envoy container right after this one, so the two
        # start side by side; the Envoy container's startupProbe (/proxy/ready) waits for both
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
        "startupProbe": _http_probe("/proxy/ready", health, period=1, failures=120),
        "readinessProbe": _http_probe("/envoy/ready", health, period=5, failures=3),
        "volumeMounts": [conf, run, spire],
    }
    return [init, sidecar, envoy]


def trust_patch(spec: Mapping[str, Any]) -> tuple[list[Json], list[str]]:
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
        for index, container in enumerate(object_list(spec.get(kind), f"spec.{kind}")):
            name = str(container.get("name", "?"))
            mounts = object_list(container.get("volumeMounts"), f"{name}.volumeMounts")
            if any(str(m.get("mountPath", "")).rstrip("/") == layout.TRUST_DIR for m in mounts):
                raise InjectionDenied(
                    f"container {name!r} mounts {layout.TRUST_DIR}, where agent-authz puts the pod CA"
                )
            base = f"/spec/{kind}/{index}"
            if container.get("volumeMounts") is None:
                ops.append({"op": "add", "path": f"{base}/volumeMounts", "value": [mount]})
            else:
                ops.append({"op": "add", "path": f"{base}/volumeMounts/-", "value": mount})
            own = {str(e.get("name")) for e in object_list(container.get("env"), f"{name}.env")}
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
