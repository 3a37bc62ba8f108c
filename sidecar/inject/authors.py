"""Who may declare a task: the requester of an AdmissionReview (``userInfo``) and the task's form.

Once an agent can create pods - an orchestrator creating its sub-agents' Jobs - a pod's task
annotation is agent-controlled input: an unsigned task is whatever its writer typed. So the webhook
judges each task annotation by who sent it (``AdmissionRequest.userInfo``, which the API server
fills from the authenticated requester and the requester cannot choose):

=====================================  ======================  ==========================================
the annotation                         from a task author      from anyone else
=====================================  ======================  ==========================================
none                                   admitted                admitted (every call is ``no_task``)
an unsigned YAML/JSON task             admitted                **refused**
a signed grant                         admitted (structure     **verified here**: the signature, the chain
                                       checked; the sidecar    to a root issuer, attenuation at every
                                       verifies it)            link (a sub-grant only narrows), the
                                                               subject is the pod's SPIFFE ID, not expired
``revoked: "true"``                    admitted                admitted (it only takes away)
``revoked`` cleared (was ``true``)     admitted                **refused** (it would restore a task)
=====================================  ======================  ==========================================

Task authors are the users, groups and ServiceAccounts the chart names (``injection.taskAuthors``,
by default the group ``system:masters``): the deploy pipeline, the operators. ``kubectl annotate``
of a running pod is an ``UPDATE`` the webhook sees with the annotating user, so it is judged too.

**Jobs.** The job controller creates a Job's pods with its own identity
(``system:serviceaccount:kube-system:job-controller``), so the pod's requester says nothing about
who wrote the template; naming the controller an author would let anyone who may create Jobs
declare any task. The webhook therefore also judges Jobs (``CREATE``, and ``UPDATE``: a suspended
Job's template annotations are mutable), with the Job's requester and the same rules, and a pod
the job controller creates whose controlling owner is a ``batch/v1`` Job is taken as judged
there. Pods of other controllers (ReplicaSets, StatefulSets, a CronJob's Jobs - created by the
cronjob controller) are not relayed: they need signed grants, unless their controller is named an
author knowingly.

The grant check needs the trust bundle of the trust domain (delegations are signed with
X.509-SVIDs) and the root issuers' JWKS: the webhook reads them from files (the chart mounts the
ConfigMaps the authority reads) and reloads them when they change. Without them, a grant from a
non-author is refused with a message saying so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from sidecar.grants.model import GrantError
from sidecar.grants.verify import GrantVerifier
from sidecar.identity.bundles import TrustBundles
from sidecar.identity.state import parse_jwt_bundle
from sidecar.identity.x509svid import X509SvidVerifier
from sidecar.inject.podspec import InjectionDenied, mapping

__all__ = ["JOB_CONTROLLERS", "GrantTrust", "Requester", "relayed_by_job_controller"]

JOB_CONTROLLERS = frozenset({"system:serviceaccount:kube-system:job-controller", "system:kube-controller-manager"})
"""Who creates a Job's pods: the job controller's ServiceAccount (controller-manager with
``--use-service-account-credentials``, the default of kubeadm and the managed offerings), or the
controller-manager's own identity."""


@dataclass(frozen=True, slots=True)
class Requester:
    """Who sent an AdmissionReview (``request.userInfo``).

    Attributes:
        username: e.g. ``jane@example.com`` or ``system:serviceaccount:agents:orchestrator``
            (``""`` when the review carries none: nobody's).
        groups: the requester's groups (``system:authenticated``, ``system:serviceaccounts:agents``...).
    """

    username: str
    groups: frozenset[str] = frozenset()

    @classmethod
    def from_user_info(cls, value: object) -> Requester:
        """Read ``userInfo`` (untrusted JSON); a missing or malformed one is nobody (never an author)."""
        if not isinstance(value, dict):
            return cls("")
        username = value.get("username")
        groups = value.get("groups")
        return cls(
            username if isinstance(username, str) else "",
            frozenset(g for g in groups if isinstance(g, str)) if isinstance(groups, list) else frozenset(),
        )

    @property
    def service_account(self) -> str | None:
        """``namespace/name`` for a ServiceAccount's username, else ``None``."""
        prefix = "system:serviceaccount:"
        if not self.username.startswith(prefix):
            return None
        namespace, sep, name = self.username.removeprefix(prefix).partition(":")
        return f"{namespace}/{name}" if sep and namespace and name else None

    def describe(self) -> str:
        """How messages name the requester."""
        return repr(self.username) if self.username else "an unnamed requester"


def relayed_by_job_controller(pod: Mapping[str, Any], requester: Requester) -> bool:
    """Whether ``pod`` is created by the job controller from a Job (whose template was judged when the
    Job was admitted): the requester is the job controller and the pod's controlling owner a Job."""
    if requester.username not in JOB_CONTROLLERS:
        return False
    metadata = mapping(pod.get("metadata"), "metadata")
    owners = metadata.get("ownerReferences")
    if not isinstance(owners, list):
        return False
    return any(
        isinstance(o, dict)
        and o.get("controller") is True
        and o.get("kind") == "Job"
        and o.get("apiVersion") == "batch/v1"
        for o in owners
    )


def _stat(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        info = os.stat(path)  # follows the kubelet's ..data symlink: a swap changes the inode
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)


class GrantTrust:
    """What verifies a grant at admission: the trust domain's X.509 bundle and the root issuers' JWKS.

    The files are read when first needed and again whenever they change (a rotated SPIRE bundle, a
    new root issuer key: the kubelet swaps the ConfigMap's ``..data`` symlink).

    Args:
        trust_domain: the agents' trust domain.
        bundle: PEM X.509 authorities of ``trust_domain`` (``None``: not configured).
        root_issuers: JWKS of the root issuers (``None``: none).
        max_depth: the longest delegation chain accepted (the sidecar's ``grants.max_depth``).
    """

    def __init__(self, trust_domain: str, bundle: Path | None, root_issuers: Path | None, *, max_depth: int) -> None:
        self.trust_domain = trust_domain
        self.bundle = bundle
        self.root_issuers = root_issuers
        self.max_depth = max_depth
        self._seen: tuple[object, object] | None = None
        self._verifier: GrantVerifier | None = None

    def verifier(self) -> GrantVerifier:
        """The current verifier.

        Raises:
            InjectionDenied: neither file is configured or readable, or one does not parse.
        """
        seen = (_stat(self.bundle), _stat(self.root_issuers))
        if self._verifier is not None and seen == self._seen:
            return self._verifier
        if seen == (None, None):
            raise InjectionDenied(
                "this webhook cannot verify grants: it has neither the trust bundle nor the root issuers' keys "
                "(chart: authority.trustBundle, authority.rootIssuers)"
            )
        certificates: tuple[x509.Certificate, ...] = ()
        root_keys: dict[str, PublicKeyTypes] = {}
        try:
            if seen[0] is not None and self.bundle is not None:
                certificates = tuple(x509.load_pem_x509_certificates(self.bundle.read_bytes()))
            if seen[1] is not None and self.root_issuers is not None:
                root_keys = parse_jwt_bundle(self.root_issuers.read_bytes())
        except (OSError, ValueError) as exc:
            raise InjectionDenied(f"this webhook cannot read its grant trust material: {exc}") from None
        bundles = TrustBundles({self.trust_domain: certificates} if certificates else {})
        self._verifier = GrantVerifier(
            root_keys=root_keys,
            root_ids=frozenset(),
            svids=X509SvidVerifier(bundles) if certificates else None,
            max_depth=self.max_depth,
        )
        self._seen = seen
        return self._verifier

    def verify(self, token: str, *, agent: str | None, now: float, where: str) -> str:
        """Verify a grant a non-author sent; returns its id.

        Raises:
            InjectionDenied: it does not verify (the grant code and reason are in the message), is
                for another agent, or has expired.
        """
        try:
            grant = self.verifier().verify(token, now=now)
        except GrantError as exc:
            raise InjectionDenied(f"{where}: the grant does not verify: {exc}") from None
        if agent is not None and grant.subject != agent:
            raise InjectionDenied(f"{where}: the grant is for {grant.subject}, but this pod's SPIFFE ID is {agent}")
        if grant.expires_at <= now:
            raise InjectionDenied(f"{where}: the grant has expired")
        return grant.id
