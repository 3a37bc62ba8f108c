"""What the pod's own containers could use against the proxy: refused at admission, or hardened.

The agent is the adversary: whatever its pod spec allows, a hijacked agent may do - run as root in
its container, run a setuid binary, use every capability its container keeps. The iptables rules
and the proxy's private directories hold only against a process that cannot become the proxy UID,
cannot bypass netfilter and cannot reach the proxy's processes or files. So the webhook refuses a
pod (admission denied, with the reason) whose spec gives the agent any of these:

=====================================================  ==========================================================
spec                                                   why it is refused
=====================================================  ==========================================================
``hostNetwork``, ``hostPID``, ``hostIPC``               the node's network (the rules would change it), every
                                                       process of the node (the proxy's included), the node's IPC
``shareProcessNamespace: true``                        the proxy's processes become visible: root could signal
                                                       them, ``ptrace`` read their memory (keys, tokens)
a container with the proxy UID or GID; ``fsGroup``     its traffic bypasses the rules (they exempt the proxy), and
or ``supplementalGroups`` with the proxy GID           the proxy's files are its files
``privileged``                                         everything: the rules, mounts, devices
``capabilities.add`` of ``NET_ADMIN``, ``NET_RAW``,     change the rules; raw frames past them; mounts and
``SYS_ADMIN``, ``SYS_PTRACE``, ``SYS_MODULE``,          namespaces; other processes' memory; kernel modules;
``DAC_READ_SEARCH``, ``BPF``, ``SYS_RAWIO``, ``ALL``    files outside its mounts (``open_by_handle_at``); ...
keeping ``SETUID``, ``SETGID`` or ``NET_RAW`` while    root (``runAsUser: 0``, or no ``runAsUser`` without
it may be root                                         ``runAsNonRoot: true``) - or a setuid binary, unless
                                                       ``allowPrivilegeEscalation: false`` - could become the
                                                       proxy UID (``setuid``) or send ``AF_PACKET`` frames that
                                                       netfilter never sees; the runtime's default set
                                                       (containerd's) has all three
a ``hostPath`` volume                                  the node's files: the kubelet's pod directories (the
                                                       proxy's sockets and keys), the SPIRE agent socket
a ``csi`` volume of the Workload API driver            the pod's SVID and its key: the agent could sign
                                                       delegations and revocation lists itself
a ``volumeMount`` of an ``agent-authz*`` volume        the proxy's own volumes (run directory, keys, config)
a volume (``secret``, or a ``projected`` source) or    the API keys the sidecar injects (``credentials`` from
an ``env``/``envFrom`` reference naming a Secret of    Secrets): the agent would hold the key it must never see
the chart's ``sidecar.credentials``
=====================================================  ==========================================================

With ``harden_containers`` (chart: ``injection.hardenContainers``) the webhook does not refuse a
container for the ``SETUID``/``SETGID``/``NET_RAW`` row: it adds them to its
``capabilities.drop`` (the drop wins over an ``add``, as in the runtime) and says so in a warning.
The capability set is computed as containerd does: the runtime default (or every capability with
``add: [ALL]``), emptied by ``drop: [ALL]``, then the individual ``add``, then the individual ``drop``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.inject import layout
from sidecar.inject.podspec import InjectionDenied, Json, mapping, object_list
from sidecar.inject.settings import InjectorConfig

__all__ = [
    "DANGEROUS_CAPABILITIES",
    "ESCALATION_CAPABILITIES",
    "RUNTIME_DEFAULT_CAPABILITIES",
    "capability_set",
    "check_security",
]

RUNTIME_DEFAULT_CAPABILITIES = frozenset(
    {
        "CHOWN",
        "DAC_OVERRIDE",
        "FSETID",
        "FOWNER",
        "MKNOD",
        "NET_RAW",
        "SETGID",
        "SETUID",
        "SETFCAP",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "SYS_CHROOT",
        "KILL",
        "AUDIT_WRITE",
    }
)
"""containerd's (and Docker's) default capability set of a container."""
DANGEROUS_CAPABILITIES: Mapping[str, str] = {
    "NET_ADMIN": "change the interception rules",
    "NET_RAW": "send raw frames that netfilter never sees",
    "SYS_ADMIN": "mount, enter namespaces, load BPF",
    "SYS_PTRACE": "read other processes' memory",
    "SYS_MODULE": "load kernel modules",
    "DAC_READ_SEARCH": "open files outside its mounts by handle",
    "BPF": "load BPF programs",
    "SYS_RAWIO": "raw device and port I/O",
    "ALL": "all of the above",
}
"""Capabilities no container of the pod may add, and what each would let the agent do."""
ESCALATION_CAPABILITIES = ("NET_RAW", "SETGID", "SETUID")
"""What a container that may run as root must not keep: become the proxy UID/GID, bypass netfilter."""
_ALL_CAPABILITIES = RUNTIME_DEFAULT_CAPABILITIES | frozenset(DANGEROUS_CAPABILITIES) - {"ALL"}


def _capability_names(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise InjectionDenied(f"malformed pod: {where} must be a list of capability names")
    return [c.upper().removeprefix("CAP_") for c in value]


def capability_set(capabilities: Mapping[str, Any], where: str) -> frozenset[str]:
    """The capabilities a container keeps (its bounding set), computed as containerd does.

    Raises:
        InjectionDenied: ``add`` or ``drop`` is not a list of names.
    """
    added = _capability_names(capabilities.get("add"), f"{where}.add")
    dropped = _capability_names(capabilities.get("drop"), f"{where}.drop")
    caps = set(_ALL_CAPABILITIES if "ALL" in added else RUNTIME_DEFAULT_CAPABILITIES)
    if "ALL" in dropped:
        caps.clear()
    caps |= {c for c in added if c != "ALL"}
    caps -= set(dropped)
    return frozenset(caps)


def _may_be_root(ctx: Mapping[str, Any], pod_ctx: Mapping[str, Any]) -> str | None:
    """How the container could run with root's capabilities (``None``: it cannot)."""
    uid = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
    non_root = ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))
    if uid == 0:
        return "runs as root (runAsUser: 0)"
    if uid is None and non_root is not True:
        return "may run as root (no runAsUser, no runAsNonRoot: true: the image's USER decides)"
    if ctx.get("allowPrivilegeEscalation") is not False:
        return "may become root through a setuid binary (allowPrivilegeEscalation is not false)"
    return None


def _pod_level(spec: Mapping[str, Any], config: InjectorConfig) -> None:
    gid = config.settings.proxy_gid
    if spec.get("hostNetwork") is True:
        raise InjectionDenied(
            "agent-authz cannot inject a pod with hostNetwork: true "
            "(its iptables rules would change the node's network)"
        )
    for key, what in (
        ("hostPID", "every process of the node, the proxy's included"),
        ("hostIPC", "the node's IPC namespace"),
        ("shareProcessNamespace", "the proxy's processes: as root it could signal them, with ptrace read their memory"),
    ):
        if spec.get(key) is True:
            raise InjectionDenied(f"{key}: true would show the agent {what}; agent-authz refuses it")
    pod_ctx = mapping(spec.get("securityContext"), "spec.securityContext")
    groups = pod_ctx.get("supplementalGroups") or []
    if pod_ctx.get("fsGroup") == gid or (isinstance(groups, list) and gid in groups):
        raise InjectionDenied(
            f"the pod's fsGroup or supplementalGroups include GID {gid}, the proxy GID: every container would get "
            "the proxy's group (and its traffic would bypass agent-authz's interception)"
        )
    for volume in object_list(spec.get("volumes"), "spec.volumes"):
        name = str(volume.get("name", "?"))
        if name.startswith(layout.RESERVED_PREFIX):
            continue  # the injector's own (an injected pod), checked by _check_injected
        if "hostPath" in volume:
            path = mapping(volume["hostPath"], f"volume {name}.hostPath").get("path")
            raise InjectionDenied(
                f"volume {name!r} is a hostPath ({path}): the pod's containers could reach the node's files - the "
                "kubelet's pod directories (the proxy's sockets and keys) or the SPIRE agent socket"
            )
        _credential_volume(volume, name, config.settings.credential_secrets)
        csi = mapping(volume.get("csi"), f"volume {name}.csi")
        workload = config.settings.workload_api
        if csi and workload.mode == "csi" and csi.get("driver") == workload.driver:
            raise InjectionDenied(
                f"volume {name!r} mounts the SPIFFE Workload API ({workload.driver}): the agent would get the pod's "
                "SVID and its key, and could sign delegations and revocation lists itself"
            )


def _credential_volume(volume: Mapping[str, Any], name: str, secrets: frozenset[str]) -> None:
    """Refuse a volume of the pod's own that holds a credential Secret (directly or projected)."""
    if not secrets:
        return
    found = {mapping(volume.get("secret"), f"volume {name}.secret").get("secretName")}
    projected = mapping(volume.get("projected"), f"volume {name}.projected")
    for source in object_list(projected.get("sources"), f"volume {name}.projected.sources"):
        found.add(mapping(source.get("secret"), f"volume {name}.projected.sources[].secret").get("name"))
    held = sorted(s for s in found & secrets if isinstance(s, str))
    if held:
        raise InjectionDenied(
            f"volume {name!r} mounts the Secret {held[0]!r}, which holds an API key agent-authz injects: only the "
            "sidecar may read it (the agent would hold the key it must never see)"
        )


def _credential_env(container: Mapping[str, Any], name: str, secrets: frozenset[str]) -> None:
    """Refuse a container of the pod's own that reads a credential Secret into its environment."""
    if not secrets:
        return
    refs = []
    for item in object_list(container.get("env"), f"{name}.env"):
        value_from = mapping(item.get("valueFrom"), f"{name}.env[].valueFrom")
        refs.append(mapping(value_from.get("secretKeyRef"), f"{name}.env[].valueFrom.secretKeyRef").get("name"))
    for item in object_list(container.get("envFrom"), f"{name}.envFrom"):
        refs.append(mapping(item.get("secretRef"), f"{name}.envFrom[].secretRef").get("name"))
    held = sorted(s for s in set(refs) & secrets if isinstance(s, str))
    if held:
        raise InjectionDenied(
            f"container {name!r} reads the Secret {held[0]!r} into its environment, and it holds an API key "
            "agent-authz injects: only the sidecar may read it"
        )


def _mounts(container: Mapping[str, Any], name: str, injected: bool) -> None:
    for mount in object_list(container.get("volumeMounts"), f"{name}.volumeMounts"):
        volume = str(mount.get("name", ""))
        if not volume.startswith(layout.RESERVED_PREFIX):
            continue
        trust = volume == layout.VOLUME_TRUST and mount.get("readOnly") is True
        if injected and trust and str(mount.get("mountPath", "")).rstrip("/") == layout.TRUST_DIR:
            continue  # the pod CA, mounted read-only by the injector itself
        raise InjectionDenied(f"container {name!r} mounts volume {volume!r}: the agent-authz volumes are the proxy's")


def _harden_ops(base: str, container: Mapping[str, Any], missing: list[str]) -> list[Json]:
    """JSON Patch operations adding ``missing`` to ``container``'s ``capabilities.drop`` (at ``base``)."""
    ctx = container.get("securityContext")
    if ctx is None:
        return [{"op": "add", "path": f"{base}/securityContext", "value": {"capabilities": {"drop": missing}}}]
    capabilities = ctx.get("capabilities")
    if capabilities is None:
        return [{"op": "add", "path": f"{base}/securityContext/capabilities", "value": {"drop": missing}}]
    if capabilities.get("drop") is None:
        return [{"op": "add", "path": f"{base}/securityContext/capabilities/drop", "value": missing}]
    return [{"op": "add", "path": f"{base}/securityContext/capabilities/drop/-", "value": cap} for cap in missing]


def check_security(
    spec: Mapping[str, Any], config: InjectorConfig, *, ours: frozenset[str], harden: bool = False
) -> tuple[list[Json], list[str]]:
    """Refuse a pod whose own containers could reach the proxy or escape the interception rules.

    Args:
        spec: the pod spec (untrusted).
        config: the injector's settings (proxy UID/GID, the Workload API driver).
        ours: names of the injected containers present (an injected pod), skipped.
        harden: instead of refusing a container that may be root and keeps ``SETUID``, ``SETGID``
            or ``NET_RAW``, return the operations that drop them (at the pod's own indices).

    Returns:
        ``(patch operations, warnings)`` - both empty unless ``harden`` changed a container.

    Raises:
        InjectionDenied: one of the cases of the module's table, naming the container and the reason.
    """
    settings = config.settings
    _pod_level(spec, config)
    pod_ctx = mapping(spec.get("securityContext"), "spec.securityContext")
    ops: list[Json] = []
    warnings: list[str] = []
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for index, container in enumerate(object_list(spec.get(kind), f"spec.{kind}")):
            name = str(container.get("name", "?"))
            if name in ours:
                continue
            ctx = mapping(container.get("securityContext"), f"spec.{kind}[{name}].securityContext")
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
                    f"container {name!r} sets no runAsUser: this installation requires one (the image's USER might "
                    "be the proxy UID)"
                )
            if ctx.get("privileged") is True:
                raise InjectionDenied(
                    f"container {name!r} is privileged: it could remove agent-authz's interception rules"
                )
            capabilities = mapping(ctx.get("capabilities"), f"{name}.securityContext.capabilities")
            added = set(_capability_names(capabilities.get("add"), f"{name}.securityContext.capabilities.add"))
            dangerous = sorted(added & set(DANGEROUS_CAPABILITIES))
            if dangerous:
                reasons = "; ".join(f"{c}: {DANGEROUS_CAPABILITIES[c]}" for c in dangerous)
                raise InjectionDenied(f"container {name!r} adds capabilities {dangerous}: it could {reasons}")
            _mounts(container, name, injected=bool(ours))
            _credential_env(container, name, settings.credential_secrets)
            root = _may_be_root(ctx, pod_ctx)
            kept = sorted(capability_set(capabilities, f"{name}.capabilities") & set(ESCALATION_CAPABILITIES))
            if root is None or not kept:
                continue
            if not harden or kind == "ephemeralContainers":
                raise InjectionDenied(
                    f"container {name!r} {root} and keeps {', '.join('CAP_' + c for c in kept)}: as root it could "
                    "become the proxy UID (SETUID/SETGID) or send raw frames past the interception rules (NET_RAW); "
                    "drop them (capabilities.drop: [ALL]), or run it with runAsNonRoot: true and "
                    "allowPrivilegeEscalation: false"
                )
            ops += _harden_ops(f"/spec/{kind}/{index}", container, kept)
            warnings.append(f"agent-authz: container {name!r} {root}: added capabilities.drop {kept}")
    return ops, warnings
