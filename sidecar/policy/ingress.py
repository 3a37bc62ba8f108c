"""The ingress decision: who is calling this agent, and may they call this method and path?

Default deny. The caller is identified by a JWT-SVID in ``Authorization: Bearer`` (when accepted) or
by the mTLS peer's X.509-SVID, re-verified here on every decision (results cached per certificate).
Reasons: ``no_client_identity``, ``untrusted_identity`` (with a ``svid_*``/``jwt_svid_*`` detail),
``caller_not_allowed``, ``method_not_allowed``, ``path_not_allowed``, ``bad_request``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sidecar.config.schema import SidecarConfig
from sidecar.decision import AuthzRequest, Decision, Direction, Reason
from sidecar.errors import BadRequestError, IdentityError
from sidecar.http_norm import normalize_target
from sidecar.identity.jwtsvid import JwtSvidVerifier, looks_like_jwt
from sidecar.identity.state import IdentityState
from sidecar.identity.x509svid import X509SvidVerifier, chain_from_xfcc
from sidecar.policy.model import PathMatcher
from sidecar.wire import CALLER_HEADER, DECISION_ID_HEADER, XFCC_HEADER

__all__ = ["CallerMatcher", "IdentityContext", "IngressPolicy", "IngressRule", "compile_ingress", "decide_ingress"]


@dataclass(frozen=True, slots=True)
class CallerMatcher:
    """Exact SPIFFE IDs, and ``(trust_domain, path_prefix)`` pairs (prefix ``""`` = whole domain)."""

    exact: frozenset[str]
    prefixes: tuple[tuple[str, str], ...]

    def matches(self, spiffe_id: str, trust_domain: str) -> bool:
        """Whether ``spiffe_id`` (in ``trust_domain``) is one of the callers."""
        if spiffe_id in self.exact:
            return True
        path = spiffe_id[len("spiffe://") + len(trust_domain) :]
        for domain, prefix in self.prefixes:
            if domain == trust_domain and (not prefix or path == prefix or path.startswith(prefix + "/")):
                return True
        return False


@dataclass(frozen=True, slots=True)
class IngressRule:
    """One compiled ingress rule."""

    name: str
    callers: CallerMatcher
    methods: frozenset[str] | None
    paths: PathMatcher


@dataclass(frozen=True, slots=True)
class IngressPolicy:
    """All ingress rules, and whether JWT-SVIDs identify callers."""

    rules: tuple[IngressRule, ...]
    jwt_svid: bool
    audiences: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class IdentityContext:
    """An identity state with verifiers built for it (rebuilt whenever either changes)."""

    state: IdentityState
    x509: X509SvidVerifier
    jwt: JwtSvidVerifier

    @classmethod
    def build(cls, state: IdentityState, audiences: tuple[str, ...]) -> IdentityContext:
        """Verifiers over ``state.bundles`` accepting JWT-SVIDs for ``audiences``."""
        return cls(state, X509SvidVerifier(state.bundles), JwtSvidVerifier(state.bundles, audiences))


def compile_ingress(settings: SidecarConfig, agent: str) -> IngressPolicy:
    """Compile ``ingress`` from the config; ``agent`` is the default JWT-SVID audience."""
    rules = []
    for index, spec in enumerate(settings.ingress.rules):
        exact = frozenset(c.id for c in spec.callers if c.id is not None)
        prefixes = tuple(
            (c.trust_domain, (c.path_prefix or "").rstrip("/")) for c in spec.callers if c.trust_domain is not None
        )
        rules.append(
            IngressRule(
                name=spec.name or f"ingress[{index}]",
                callers=CallerMatcher(exact, prefixes),
                methods=None if "*" in spec.methods else frozenset(spec.methods),
                paths=PathMatcher.compile(spec.paths),
            )
        )
    audiences = tuple(settings.ingress.audiences) or (agent,)
    return IngressPolicy(tuple(rules), settings.ingress.jwt_svid, audiences)


def decide_ingress(
    policy: IngressPolicy,
    request: AuthzRequest,
    *,
    identity: IdentityContext | None,
    agent: str,
    now: float,
    decision_id: str,
) -> Decision:
    """Decide one inbound request to the local agent.

    Args:
        policy: compiled ingress rules.
        request: the request as Envoy saw it (``peer_certificate`` set by ``include_peer_certificate``).
        identity: trust bundles and verifiers; ``None`` when no identity source is configured.
        agent: this agent's SPIFFE ID.
        now: POSIX seconds.
        decision_id: id to put on the decision.

    Returns:
        The :class:`Decision`; on allow it sets ``x-agent-authz-caller`` to the verified caller.
    """
    method = request.method.upper()
    base = Decision(False, Reason.BAD_REQUEST, 400, decision_id, "", Direction.INGRESS, agent=agent, method=method)
    try:
        target = normalize_target(request.authority, request.path, request.scheme or "https")
    except BadRequestError as exc:
        return replace(base, detail=str(exc), path=request.path[:256])
    base = replace(base, host=target.host, port=target.port, path=target.path)

    def deny(reason: Reason, detail: str, caller: str | None = None) -> Decision:
        return replace(base, reason=reason, http_status=403, detail=detail, caller=caller)

    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    use_jwt = policy.jwt_svid and bool(token) and looks_like_jwt(token)
    if not use_jwt and not request.peer_certificate:
        return deny(Reason.NO_CLIENT_IDENTITY, "no client certificate and no JWT-SVID")
    if identity is None:
        return deny(Reason.UNTRUSTED_IDENTITY, "no trust bundles: configure an identity source")
    try:
        peer = None
        if request.peer_certificate:
            chain = chain_from_xfcc(request.headers.get(XFCC_HEADER, ""))
            peer = identity.x509.verify(request.peer_certificate, chain, now=now)
        if use_jwt:
            verified = identity.jwt.verify(token, now=now)
            caller, trust_domain = verified.spiffe_id, verified.trust_domain
        else:
            assert peer is not None
            caller, trust_domain = peer.spiffe_id, peer.trust_domain
    except IdentityError as exc:
        return deny(Reason.UNTRUSTED_IDENTITY, str(exc))

    deepest = 0
    for rule in policy.rules:
        if not rule.callers.matches(caller, trust_domain):
            continue
        deepest = max(deepest, 1)
        if rule.methods is not None and method not in rule.methods:
            continue
        deepest = max(deepest, 2)
        if not rule.paths.matches(target.path):
            continue
        to_remove = ("authorization",) if use_jwt else ()
        return replace(
            base,
            allow=True,
            reason=Reason.ALLOWED,
            http_status=200,
            caller=caller,
            rule=rule.name,
            headers_to_set=((CALLER_HEADER, caller), (DECISION_ID_HEADER, decision_id)),
            headers_to_remove=to_remove,
        )
    reason = (Reason.CALLER_NOT_ALLOWED, Reason.METHOD_NOT_ALLOWED, Reason.PATH_NOT_ALLOWED)[deepest]
    return deny(reason, f"no ingress rule allows this call ({reason.value})", caller)
