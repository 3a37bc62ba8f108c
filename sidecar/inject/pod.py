"""The pod-level decisions: a pod in, an RFC 6902 JSON Patch (or a refusal) out.

:func:`plan_injection` decides for one pod at ``CREATE``; :func:`check_update` for an annotation
change of an injected pod at ``UPDATE``. Nothing here does I/O, so every rule is unit-testable
with plain dicts; :mod:`sidecar.inject.review` wraps it in AdmissionReview.

What an injected pod gets (Kubernetes >= 1.29: native sidecars are init containers with
``restartPolicy: Always``, which run for the pod's life without keeping a Job's pod alive): the
three containers of :mod:`sidecar.inject.containers`. All three come before the pod's own init
containers, so those are intercepted too and find Envoy running. Volumes: :func:`build_volumes`
(where they are mounted: :mod:`sidecar.inject.layout`).

With an ``intercept`` section in ``sidecar.yaml`` (HTTPS interception, ``tls: intercept``), the pod
also gets the trust volume: the sidecar writes the pod CA there, and every container of the pod's
own (init containers included) mounts it read-only at ``/etc/agent-authz/trust`` and gets the
variables common runtimes read (:func:`sidecar.tls_intercept.trust.agent_trust_env`). A variable the
container already sets is kept (with a warning: that runtime will not trust the pod CA); a
container already mounting something at that path is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.inject import layout
from sidecar.inject.annotations import (
    AnnotationError,
    check_revoked_annotation,
    check_task_annotation,
    inject_choice,
)
from sidecar.inject.authors import Requester, relayed_by_job_controller
from sidecar.inject.containers import OUR_CONTAINERS, build_containers, probed_ports, trust_patch
from sidecar.inject.escapes import check_security
from sidecar.inject.podspec import (
    AdmissionOutcome,
    Injection,
    InjectionDenied,
    Json,
    annotations_of,
    containers_of,
    mapping,
    object_list,
    pointer,
)
from sidecar.inject.settings import InjectorConfig
from sidecar.tls_intercept.trust import trust_volume

__all__ = ["build_volumes", "check_job", "check_update", "plan_injection"]


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
        {"name": layout.VOLUME_STATE, "emptyDir": {"sizeLimit": settings.state_size_limit}},
        {"name": layout.VOLUME_TMP, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {"name": layout.VOLUME_WORKLOAD_API, **workload},
        *([trust_volume(layout.VOLUME_TRUST)] if config.intercept else []),
        *(
            {
                "name": f"{layout.VOLUME_CREDENTIAL_PREFIX}{index}",
                "secret": {
                    "secretName": credential.secret_name,
                    "defaultMode": 0o444,  # files are root's: readable by the proxy user (only the sidecar mounts it)
                    "items": [{"key": credential.key, "path": credential.key}],
                },
            }
            for index, credential in enumerate(sorted(settings.credentials, key=lambda c: c.name))
        ),
    ]


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
    init = object_list(spec.get("initContainers"), "spec.initContainers")
    probe_ports, _ = probed_ports(spec, OUR_CONTAINERS)
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


def _check_author(
    annotations: Mapping[str, str],
    previous: Mapping[str, str] | None,
    kind: str,
    agent: str | None,
    config: InjectorConfig,
    now: float,
    requester: Requester,
) -> None:
    """The rules of :mod:`sidecar.inject.authors` for a requester who is not a task author.

    ``previous``: the annotations before an ``UPDATE`` (``None`` at ``CREATE``).
    """
    revoked_before = (previous or {}).get(layout.ANNOTATION_REVOKED, "").strip().lower() == "true"
    if revoked_before and annotations.get(layout.ANNOTATION_REVOKED, "").strip().lower() != "true":
        raise InjectionDenied(
            f"annotation {layout.ANNOTATION_REVOKED}: only a task author may clear a revocation (it would restore "
            f"the task); {requester.describe()} is not one (injection.taskAuthors)"
        )
    text = annotations.get(layout.ANNOTATION_TASK)
    if previous is not None and (text or "").strip() == (previous.get(layout.ANNOTATION_TASK) or "").strip():
        return  # the task is as it was: judged when it was set
    where = f"annotation {layout.ANNOTATION_TASK}"
    if kind == "task":
        raise InjectionDenied(
            f"{where}: an unsigned task is accepted only from a task author, and {requester.describe()} is not one "
            "(chart: injection.taskAuthors); give the pod a signed grant instead (agent-authz task sign, or a "
            "delegation through the parent task's POST /v1/tasks/{id}/delegate)"
        )
    if kind == "grant":
        assert config.grant_trust is not None and text is not None
        config.grant_trust.verify(text.strip(), agent=agent, now=now, where=where)


def _check_task(
    annotations: Mapping[str, str],
    pod: Mapping[str, Any],
    namespace: str,
    config: InjectorConfig,
    now: float,
    requester: Requester,
    *,
    previous: Mapping[str, str] | None = None,
    relayed: bool = False,
) -> tuple[str | None, list[str]]:
    spec = mapping(pod.get("spec"), "spec")
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
    if not relayed and not config.settings.task_authors.includes(requester):
        _check_author(annotations, previous, task.kind, agent, config, now, requester)
    if task.kind == "none":
        warnings.append(
            f"agent-authz: no {layout.ANNOTATION_TASK} annotation: "
            "every outbound call is denied (no_task) until one is set"
        )
    if agent is None:
        warnings.append("agent-authz: the task's agent is not checked (no SPIFFE ID template configured)")
    return task.task_id, warnings


def plan_injection(
    pod: object, namespace: str, config: InjectorConfig, *, now: float, requester: Requester
) -> Injection:
    """Decide what to do with a pod being created (admission ``CREATE``).

    Args:
        pod: the Pod object (``AdmissionRequest.object``).
        namespace: the namespace of the request (pods from controllers often have none in metadata).
        config: injector settings and the sidecar configuration.
        now: POSIX seconds (a grant's expiry).
        requester: who creates it (``userInfo``): an unsigned task is accepted only from a task
            author, a grant from anyone else must verify (:mod:`sidecar.inject.authors`); a pod the
            job controller creates from a Job was judged with the Job.

    Returns:
        The :class:`Injection`: a patch that adds the containers, volumes and the status annotation;
        or no patch for a pod that opted out or is already injected (idempotent: a reinvoked
        webhook, or a re-applied injected manifest, changes nothing).

    Raises:
        InjectionDenied: the pod must be refused - malformed; in a namespace the chart did not
            provision; opting out where that is not allowed; a spec that would let the agent reach
            the proxy or escape interception (:mod:`sidecar.inject.escapes`: host namespaces, a
            shared process namespace, the proxy UID or GID, privileged, dangerous capabilities,
            root with SETUID/SETGID/NET_RAW unless hardened, hostPath, the Workload API, mounts of
            the injector's volumes); a name clash with the injected containers or volumes; marked
            injected without the containers; an invalid ``agent-authz.io/task`` or
            ``agent-authz.io/revoked`` annotation; a task its requester may not declare.
    """
    if not isinstance(pod, dict):
        raise InjectionDenied("malformed pod: the object must be a Pod")
    spec = mapping(pod.get("spec"), "spec")
    if not object_list(spec.get("containers"), "spec.containers"):
        raise InjectionDenied("malformed pod: spec.containers is missing or empty")
    annotations = annotations_of(pod)
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
        return Injection([], AdmissionOutcome.OPTED_OUT)

    names = [str(c.get("name")) for _, c in containers_of(spec)]
    volumes = object_list(spec.get("volumes"), "spec.volumes")
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
    ours = OUR_CONTAINERS if injected else frozenset()
    # an injected pod is admitted unchanged: its containers must pass as they are (no hardening then)
    harden_ops, harden_warnings = check_security(
        spec, config, ours=ours, harden=settings.harden_containers and not injected
    )
    relayed = relayed_by_job_controller(pod, requester)
    task_id, warnings = _check_task(annotations, pod, namespace, config, now, requester, relayed=relayed)
    if injected:
        return Injection([], AdmissionOutcome.ALREADY_INJECTED, warnings, task_id)
    warnings += harden_warnings

    probe_ports, probe_warnings = probed_ports(spec, ours)
    warnings += probe_warnings
    patch: list[Json] = []
    metadata = mapping(pod.get("metadata"), "metadata")
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
                "path": f"/metadata/annotations/{pointer(layout.ANNOTATION_STATUS)}",
                "value": layout.STATUS_INJECTED,
            }
        )
    patch += harden_ops  # before our containers are inserted: the pod's own indices still hold
    if config.intercept:
        trust_ops, trust_warnings = trust_patch(spec)
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
    return Injection(patch, AdmissionOutcome.INJECTED, warnings, task_id)


def check_update(
    pod: object, old: object, namespace: str, config: InjectorConfig, *, now: float, requester: Requester
) -> Injection:
    """Validate an update (admission ``UPDATE``) of an injected pod whose task annotations changed.

    Changing ``agent-authz.io/task`` or ``agent-authz.io/revoked`` is how a running pod's task is
    changed or revoked (the kubelet rewrites the downward-API files, the sidecar reloads); an
    invalid value is refused here rather than left for the sidecar to reject, and so is a change
    ``requester`` (``kubectl annotate``'s user) may not make (:mod:`sidecar.inject.authors`). Other
    updates, and pods that were not injected, pass unchanged.

    Raises:
        InjectionDenied: the new annotations are invalid or not the requester's to set (or the
            objects are malformed).
    """
    if not isinstance(pod, dict):
        raise InjectionDenied("malformed pod: the object must be a Pod")
    annotations = annotations_of(pod)
    if annotations.get(layout.ANNOTATION_STATUS) != layout.STATUS_INJECTED:
        return Injection([], AdmissionOutcome.NOT_INJECTED)
    previous = annotations_of(old) if isinstance(old, dict) else {}
    keys = (layout.ANNOTATION_TASK, layout.ANNOTATION_REVOKED)
    if all(annotations.get(k) == previous.get(k) for k in keys):
        return Injection([], AdmissionOutcome.UNCHANGED)
    task_id, warnings = _check_task(annotations, pod, namespace, config, now, requester, previous=previous)
    return Injection([], AdmissionOutcome.VALIDATED, warnings, task_id)


def check_job(
    job: object, old: object, namespace: str, config: InjectorConfig, *, now: float, requester: Requester
) -> Injection:
    """Judge a Job's pod template (admission ``CREATE``, or ``UPDATE`` with ``old``) as its pods will be.

    The job controller creates the pods under its own identity, so who may declare their task is
    decided here, with the Job's requester (:mod:`sidecar.inject.authors`); the template's
    annotations are validated like a pod's. Nothing is patched: the pods are injected when created.

    Raises:
        InjectionDenied: the template's task annotations are invalid, or not the requester's to set
            (or the Job is malformed).
    """
    if not isinstance(job, dict):
        raise InjectionDenied("malformed Job: the object must be a Job")
    template = mapping(mapping(job.get("spec"), "spec").get("template"), "spec.template")
    annotations = annotations_of(template)
    try:
        if not inject_choice(annotations):
            return Injection([], AdmissionOutcome.OPTED_OUT)  # its pods are refused there if opting out is not allowed
    except AnnotationError as exc:
        raise InjectionDenied(str(exc)) from None
    previous = None
    if old is not None:
        previous_template = mapping(mapping(mapping(old, "oldObject").get("spec"), "spec").get("template"), "template")
        previous = annotations_of(previous_template)
        keys = (layout.ANNOTATION_TASK, layout.ANNOTATION_REVOKED)
        if all(annotations.get(k) == previous.get(k) for k in keys):
            return Injection([], AdmissionOutcome.UNCHANGED)
    task_id, warnings = _check_task(annotations, template, namespace, config, now, requester, previous=previous)
    return Injection([], AdmissionOutcome.VALIDATED, warnings, task_id)
