"""The ingress decision: who is calling this agent, and may they call this method and path?

Default deny. The caller is identified by a JWT-SVID in ``Authorization: Bearer`` (when accepted) or
by the mTLS peer's X.509-SVID, re-verified here on every decision (results cached per certificate).
Reasons: ``no_client_identity``, ``untrusted_identity`` (with a ``svid_*``/``jwt_svid_*`` detail),
``caller_not_allowed``, ``method_not_allowed``, ``path_not_allowed``, ``bad_request``,
``headers_too_large``.

The credential rule - one identity, never a silent fallback to another:

* ``Authorization`` holding a bearer credential *and* another one (repeated headers arrive
  comma-joined; :func:`~sidecar.http_norm.split_credentials`) is ``jwt_svid_duplicate``: neither the
  JWT-SVIDs nor the mTLS peer decide;
* a JWT-SVID whose subject is not the mTLS peer is ``jwt_svid_peer_mismatch``, unless the rule that
  admits the subject names the peer in ``forwarders``; the record carries both (``caller`` the
  JWT-SVID's subject, ``peer`` the mTLS peer);
* the JWT-SVID used to authenticate is removed before the request reaches the agent's app, and so is
  every ``x-agent-authz-*`` header the caller sent (``x-agent-authz-caller`` is set by the sidecar).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sidecar.config.schema import CallerSpec, SidecarConfig
from sidecar.decision import AuthzRequest, Decision, Direction, Reason, deny_status
from sidecar.errors import BadRequestError, IdentityError, SvidDetail
from sidecar.http_norm import normalize_target, split_credentials
from sidecar.identity.jwtsvid import DEFAULT_LEEWAY, DEFAULT_MAX_LIFETIME, JwtSvidVerifier, looks_like_jwt
from sidecar.identity.state import IdentityState
from sidecar.identity.x509svid import X509SvidVerifier, chain_from_xfcc
from sidecar.policy.headers import forged_reserved, over_envoy_limits
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


_NOBODY = CallerMatcher(frozenset(), ())


@dataclass(frozen=True, slots=True)
class IngressRule:
    """One compiled ingress rule (``forwarders``: mTLS peers that may present another caller's JWT-SVID)."""

    name: str
    callers: CallerMatcher
    methods: frozenset[str] | None
    paths: PathMatcher
    forwarders: CallerMatcher = _NOBODY


@dataclass(frozen=True, slots=True)
class IngressPolicy:
    """All ingress rules, whether JWT-SVIDs identify callers, and how their time claims are checked
    (``leeway`` and ``max_lifetime`` in seconds)."""

    rules: tuple[IngressRule, ...]
    jwt_svid: bool
    audiences: tuple[str, ...]
    leeway: float = DEFAULT_LEEWAY
    max_lifetime: float = DEFAULT_MAX_LIFETIME


@dataclass(frozen=True, slots=True)
class IdentityContext:
    """An identity state with verifiers built for it (rebuilt whenever either changes)."""

    state: IdentityState
    x509: X509SvidVerifier
    jwt: JwtSvidVerifier

    @classmethod
    def build(cls, state: IdentityState, policy: IngressPolicy) -> IdentityContext:
        """Verifiers over ``state.bundles`` accepting JWT-SVIDs for ``policy``'s audiences, leeway and
        maximum lifetime."""
        jwt_verifier = JwtSvidVerifier(
            state.bundles, policy.audiences, leeway=policy.leeway, max_lifetime=policy.max_lifetime
        )
        return cls(state, X509SvidVerifier(state.bundles), jwt_verifier)


def _callers(specs: list[CallerSpec]) -> CallerMatcher:
    exact = frozenset(c.id for c in specs if c.id is not None)
    prefixes = tuple((c.trust_domain, (c.path_prefix or "").rstrip("/")) for c in specs if c.trust_domain is not None)
    return CallerMatcher(exact, prefixes)


def compile_ingress(settings: SidecarConfig, agent: str) -> IngressPolicy:
    """Compile ``ingress`` from the config; ``agent`` is the default JWT-SVID audience."""
    rules = [
        IngressRule(
            name=spec.name or f"ingress[{index}]",
            callers=_callers(spec.callers),
            methods=None if "*" in spec.methods else frozenset(spec.methods),
            paths=PathMatcher.compile(spec.paths),
            forwarders=_callers(spec.forwarders),
        )
        for index, spec in enumerate(settings.ingress.rules)
    ]
    ingress = settings.ingress
    audiences = tuple(ingress.audiences) or (agent,)
    return IngressPolicy(
        tuple(rules), ingress.jwt_svid, audiences, ingress.jwt_svid_leeway, ingress.jwt_svid_max_lifetime
    )


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

    def deny(reason: Reason, detail: str, caller: str | None = None, peer: str | None = None) -> Decision:
        return replace(base, reason=reason, http_status=403, detail=detail, caller=caller, peer=peer)

    credentials = split_credentials(request.headers.get("authorization", ""))
    bearer = [c for c in credentials if c[:7].lower() == "bearer "]
    duplicate = policy.jwt_svid and bool(bearer) and len(credentials) > 1
    token = bearer[0][7:].strip() if bearer else ""
    use_jwt = policy.jwt_svid and not duplicate and looks_like_jwt(token)
    if not use_jwt and not duplicate and not request.peer_certificate:
        return deny(Reason.NO_CLIENT_IDENTITY, "no client certificate and no JWT-SVID")
    if identity is None:
        return deny(Reason.UNTRUSTED_IDENTITY, "no trust bundles: configure an identity source")
    peer_id: str | None = None
    try:
        peer = None
        if request.peer_certificate:
            chain = chain_from_xfcc(request.headers.get(XFCC_HEADER, ""))
            peer = identity.x509.verify(request.peer_certificate, chain, now=now)
            peer_id = peer.spiffe_id
        if duplicate:
            raise IdentityError(
                SvidDetail.JWT_SVID_DUPLICATE,
                f"Authorization holds {len(credentials)} credentials (repeated headers arrive comma-joined); "
                "send one JWT-SVID alone",
            )
        if use_jwt:
            verified = identity.jwt.verify(token, now=now)
            caller, trust_domain = verified.spiffe_id, verified.trust_domain
        else:
            assert peer is not None
            caller, trust_domain, peer_id = peer.spiffe_id, peer.trust_domain, None
    except IdentityError as exc:
        return deny(Reason.UNTRUSTED_IDENTITY, str(exc), peer=peer_id)

    forwarded = peer is not None and use_jwt and peer.spiffe_id != caller
    deepest = 0
    for rule in policy.rules:
        if not rule.callers.matches(caller, trust_domain):
            continue
        if forwarded and peer is not None and not rule.forwarders.matches(peer.spiffe_id, peer.trust_domain):
            continue
        deepest = max(deepest, 1)
        if rule.methods is not None and method not in rule.methods:
            continue
        deepest = max(deepest, 2)
        if not rule.paths.matches(target.path):
            continue
        to_set = ((CALLER_HEADER, caller), (DECISION_ID_HEADER, decision_id))
        to_remove = (*(("authorization",) if use_jwt else ()), *forged_reserved(request.headers, (CALLER_HEADER,)))
        too_large = over_envoy_limits(request.headers, to_set, to_remove)
        if too_large is not None:
            return replace(
                deny(Reason.HEADERS_TOO_LARGE, too_large, caller, peer_id),
                http_status=deny_status(Reason.HEADERS_TOO_LARGE),
            )
        return replace(
            base,
            allow=True,
            reason=Reason.ALLOWED,
            http_status=200,
            caller=caller,
            peer=peer_id,
            rule=rule.name,
            headers_to_set=to_set,
            headers_to_remove=tuple(dict.fromkeys(to_remove)),
        )
    if forwarded and deepest == 0 and any(r.callers.matches(caller, trust_domain) for r in policy.rules):
        detail = f"{SvidDetail.JWT_SVID_PEER_MISMATCH}: the JWT-SVID names {caller}, the mTLS peer is {peer_id}"
        return deny(Reason.UNTRUSTED_IDENTITY, detail + " (no rule names the peer in 'forwarders')", caller, peer_id)
    reason = (Reason.CALLER_NOT_ALLOWED, Reason.METHOD_NOT_ALLOWED, Reason.PATH_NOT_ALLOWED)[deepest]
    return deny(reason, f"no ingress rule allows this call ({reason.value})", caller, peer_id)
