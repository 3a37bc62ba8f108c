"""The ingress decision against a real compiled config with a file identity."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.decision import AuthzRequest, Direction, Reason
from sidecar.errors import ConfigError
from sidecar.identity.devca import DevCA
from sidecar.runtime import Runtime
from tests.support.certs import make_leaf, url_pem
from tests.support.config import AGENT, PLANNER, add_file_identity, base_config, task, write_config, write_keys

RULES = [
    {
        "name": "planner",
        "callers": [{"id": PLANNER}],
        "methods": ["GET", "POST"],
        "paths": ["/v1/status", "/v1/jobs/*"],
    },
    {
        "name": "partners",
        "callers": [{"trust_domain": "partner.example", "path_prefix": "/reports"}],
        "methods": ["GET"],
        "paths": ["/v1/status"],
    },
]


def make(tmp_path: Path, rules: list[dict[str, Any]] = RULES, **ingress: Any) -> tuple[Runtime, dict[str, DevCA]]:
    write_keys(tmp_path)
    config = base_config(tmp_path, [task()])
    cas = add_file_identity(tmp_path, config)
    config["ingress"] = {"rules": rules, **ingress}
    write_config(tmp_path, config)
    return Runtime(tmp_path / "sidecar.yaml"), cas


def ingress(path: str = "/v1/status", method: str = "GET", cert: str = "", **headers: str) -> AuthzRequest:
    return AuthzRequest(
        Direction.INGRESS,
        method,
        "https",
        "agent.local",
        path,
        {k.replace("_", "-"): v for k, v in headers.items()},
        peer_certificate=cert,
    )


def test_identity_comes_from_the_svid(tmp_path: Path) -> None:
    runtime, _ = make(tmp_path)
    assert runtime.snapshot.policy.agent == AGENT
    assert runtime.snapshot.identity is not None
    assert runtime.snapshot.identity.state.svid.spiffe_id == AGENT


def test_allowed_caller_gets_the_caller_header(tmp_path: Path) -> None:
    runtime, cas = make(tmp_path)
    cert, _ = make_leaf(cas["test.example"], [PLANNER])
    decision = runtime.decide(ingress(cert=url_pem(cert), x_agent_authz_caller="spiffe://forged/x"), "d")
    assert decision.allow and decision.caller == PLANNER and decision.rule == "planner"
    assert dict(decision.headers_to_set)["x-agent-authz-caller"] == PLANNER
    assert decision.direction is Direction.INGRESS and decision.agent == AGENT


@pytest.mark.parametrize(
    ("caller", "request_", "reason"),
    [
        ("spiffe://test.example/ns/orchestration/sa/other", ingress(), Reason.CALLER_NOT_ALLOWED),
        (PLANNER, ingress(method="DELETE"), Reason.METHOD_NOT_ALLOWED),
        (PLANNER, ingress("/v1/secrets"), Reason.PATH_NOT_ALLOWED),
        ("spiffe://partner.example/reports/q3", ingress(), Reason.ALLOWED),
        ("spiffe://partner.example/reports", ingress(), Reason.ALLOWED),
        ("spiffe://partner.example/reportsX/q3", ingress(), Reason.CALLER_NOT_ALLOWED),
        ("spiffe://partner.example/other", ingress(), Reason.CALLER_NOT_ALLOWED),
        ("spiffe://partner.example/reports/q3", ingress(method="POST"), Reason.METHOD_NOT_ALLOWED),
    ],
)
def test_ingress_rules(tmp_path: Path, caller: str, request_: AuthzRequest, reason: Reason) -> None:
    runtime, cas = make(tmp_path)
    td = caller.split("/")[2]
    cert, _ = make_leaf(cas[td], [caller])
    decision = runtime.decide(
        AuthzRequest(
            request_.direction,
            request_.method,
            "https",
            "agent.local",
            request_.path,
            {},
            peer_certificate=url_pem(cert),
        ),
        "d",
    )
    assert decision.reason is reason, decision.detail
    assert decision.allow is (reason is Reason.ALLOWED)


def test_no_identity_at_all(tmp_path: Path) -> None:
    runtime, _ = make(tmp_path)
    decision = runtime.decide(ingress(), "d")
    assert decision.reason is Reason.NO_CLIENT_IDENTITY and decision.http_status == 403


def test_untrusted_peer(tmp_path: Path) -> None:
    runtime, _ = make(tmp_path)
    stranger = DevCA.create("test.example")  # same name, different CA
    cert, _ = make_leaf(stranger, [PLANNER])
    decision = runtime.decide(ingress(cert=url_pem(cert)), "d")
    assert decision.reason is Reason.UNTRUSTED_IDENTITY
    assert decision.detail.startswith("svid_chain_invalid")


GATEWAY = "spiffe://test.example/ns/edge/sa/gateway"


def test_jwt_svid_identifies_the_caller_and_is_stripped(tmp_path: Path) -> None:
    runtime, cas = make(tmp_path)
    own, _ = make_leaf(cas["test.example"], [PLANNER])
    token = cas["test.example"].issue_jwt(PLANNER, [AGENT])
    decision = runtime.decide(ingress(cert=url_pem(own), authorization=f"Bearer {token}"), "d")
    assert decision.allow and decision.caller == PLANNER and decision.peer == PLANNER
    assert "authorization" in decision.headers_to_remove


def test_a_jwt_svid_of_another_workload_than_the_peer_is_refused_with_both_recorded(tmp_path: Path) -> None:
    runtime, cas = make(tmp_path)
    gateway, _ = make_leaf(cas["test.example"], [GATEWAY])
    token = cas["test.example"].issue_jwt(PLANNER, [AGENT])
    decision = runtime.decide(ingress(cert=url_pem(gateway), authorization=f"Bearer {token}"), "d")
    assert (decision.allow, decision.reason) == (False, Reason.UNTRUSTED_IDENTITY)
    assert decision.detail.startswith("jwt_svid_peer_mismatch")
    assert (decision.caller, decision.peer) == (PLANNER, GATEWAY)


def test_a_named_forwarder_may_present_its_callers_jwt_svid(tmp_path: Path) -> None:
    rules = [{**RULES[0], "forwarders": [{"id": GATEWAY}]}, RULES[1]]
    runtime, cas = make(tmp_path, rules)
    gateway, _ = make_leaf(cas["test.example"], [GATEWAY])
    token = cas["test.example"].issue_jwt(PLANNER, [AGENT])
    decision = runtime.decide(ingress(cert=url_pem(gateway), authorization=f"Bearer {token}"), "d")
    assert decision.allow and (decision.caller, decision.peer, decision.rule) == (PLANNER, GATEWAY, "planner")
    assert "authorization" in decision.headers_to_remove
    # the forwarder alone is no caller, and another peer is no forwarder
    other, _ = make_leaf(cas["test.example"], ["spiffe://test.example/ns/edge/sa/other"])
    assert runtime.decide(ingress(cert=url_pem(gateway)), "d").reason is Reason.CALLER_NOT_ALLOWED
    refused = runtime.decide(ingress(cert=url_pem(other), authorization=f"Bearer {token}"), "d")
    assert refused.reason is Reason.UNTRUSTED_IDENTITY and refused.detail.startswith("jwt_svid_peer_mismatch")


def test_jwt_svid_alone_is_enough(tmp_path: Path) -> None:
    runtime, cas = make(tmp_path)
    token = cas["test.example"].issue_jwt(PLANNER, [AGENT])
    assert runtime.decide(ingress(authorization=f"Bearer {token}"), "d").allow


def test_jwt_svid_for_another_audience(tmp_path: Path) -> None:
    runtime, cas = make(tmp_path)
    token = cas["test.example"].issue_jwt(PLANNER, ["spiffe://test.example/ns/agents/sa/someone-else"])
    decision = runtime.decide(ingress(authorization=f"Bearer {token}"), "d")
    assert decision.reason is Reason.UNTRUSTED_IDENTITY and "jwt_svid_bad_audience" in decision.detail


def test_configured_audiences(tmp_path: Path) -> None:
    runtime, cas = make(tmp_path, audiences=["https://agent.example"])
    token = cas["test.example"].issue_jwt(PLANNER, ["https://agent.example"])
    assert runtime.decide(ingress(authorization=f"Bearer {token}"), "d").allow


def test_jwt_svids_can_be_turned_off(tmp_path: Path) -> None:
    runtime, cas = make(tmp_path, jwt_svid=False)
    token = cas["test.example"].issue_jwt(PLANNER, [AGENT])
    assert runtime.decide(ingress(authorization=f"Bearer {token}"), "d").reason is Reason.NO_CLIENT_IDENTITY


def test_a_bad_peer_certificate_fails_even_with_a_good_jwt(tmp_path: Path) -> None:
    runtime, cas = make(tmp_path)
    token = cas["test.example"].issue_jwt(PLANNER, [AGENT])
    bogus, _ = make_leaf(DevCA.create("test.example"), [PLANNER])
    decision = runtime.decide(ingress(cert=url_pem(bogus), authorization=f"Bearer {token}"), "d")
    assert decision.reason is Reason.UNTRUSTED_IDENTITY


def test_default_deny_without_rules(tmp_path: Path) -> None:
    runtime, cas = make(tmp_path, rules=[])
    cert, _ = make_leaf(cas["test.example"], [PLANNER])
    assert runtime.decide(ingress(cert=url_pem(cert)), "d").reason is Reason.CALLER_NOT_ALLOWED


def test_ingress_without_identity_source(tmp_path: Path) -> None:
    write_keys(tmp_path)
    write_config(tmp_path, base_config(tmp_path, [task()]))
    runtime = Runtime(tmp_path / "sidecar.yaml")
    cas = DevCA.create("test.example")
    cert, _ = make_leaf(cas, [PLANNER])
    assert runtime.decide(ingress(cert=url_pem(cert)), "d").reason is Reason.UNTRUSTED_IDENTITY


def test_agent_cross_check(tmp_path: Path) -> None:
    write_keys(tmp_path)
    config = base_config(tmp_path, [task()])
    add_file_identity(tmp_path, config)
    config["agent"] = "spiffe://test.example/ns/agents/sa/impostor"
    write_config(tmp_path, config)
    with pytest.raises(ConfigError, match="does not match the SVID"):
        Runtime(tmp_path / "sidecar.yaml")


def test_agent_optional_with_identity(tmp_path: Path) -> None:
    write_keys(tmp_path)
    config = base_config(tmp_path, [task()])
    add_file_identity(tmp_path, config)
    del config["agent"]
    write_config(tmp_path, config)
    assert Runtime(tmp_path / "sidecar.yaml").snapshot.policy.agent == AGENT


@pytest.mark.parametrize(
    ("target", "content", "field"),
    [
        ("svid/agent.pem", b"garbage", "identity.files.svid"),
        ("svid/agent.key", b"garbage", "identity.files.key"),
        ("svid/agent.key", None, "identity.files.key"),
        ("cas/partner.example/bundle.pem", b"nope", "identity.files.bundles.partner.example"),
        ("cas/test.example/jwt-bundle.json", b"{not json", "identity.files.jwt_bundles.test.example"),
    ],
)
def test_bad_identity_files(tmp_path: Path, target: str, content: bytes | None, field: str) -> None:
    write_keys(tmp_path)
    config = base_config(tmp_path, [task()])
    add_file_identity(tmp_path, config)
    write_config(tmp_path, config)
    if content is None:  # a key that does not match the certificate
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        content = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    (tmp_path / target).write_bytes(content)
    with pytest.raises(ConfigError) as info:
        Runtime(tmp_path / "sidecar.yaml")
    assert info.value.field == field


def test_a_changed_bundle_is_not_served_from_the_svid_cache(tmp_path: Path) -> None:
    runtime, cas = make(tmp_path)
    cert, _ = make_leaf(cas["partner.example"], ["spiffe://partner.example/reports/q3"])
    for _ in range(2):  # verified once, then from the cache
        assert runtime.decide(ingress(cert=url_pem(cert)), "d").allow
    x509 = runtime.snapshot.identity.x509  # type: ignore[union-attr]
    assert (x509.misses, x509.hits) == (1, 1)
    # partner.example's CA taken out of its bundle (SPIFFE's revocation): a new CA in its place
    DevCA.create("partner.example").save(tmp_path / "cas" / "partner.example")
    assert runtime.reload()
    decision = runtime.decide(ingress(cert=url_pem(cert)), "d")
    assert decision.reason is Reason.UNTRUSTED_IDENTITY and decision.detail.startswith("svid_chain_invalid")


def test_svid_rotation_by_file_reload(tmp_path: Path) -> None:
    runtime, cas = make(tmp_path)
    before = runtime.snapshot.identity.state.svid.serial  # type: ignore[union-attr]
    cas["test.example"].write_svid(AGENT, tmp_path / "svid", name="agent")
    assert runtime.reload()
    after = runtime.snapshot.identity.state.svid.serial  # type: ignore[union-attr]
    assert after != before


def test_tokens_bound_to_the_svid(tmp_path: Path) -> None:
    write_keys(tmp_path)
    config = base_config(tmp_path, [task()])
    add_file_identity(tmp_path, config)
    config["issuer"]["bind_to_svid"] = True
    write_config(tmp_path, config)
    runtime = Runtime(tmp_path / "sidecar.yaml")
    decision = runtime.decide(AuthzRequest(Direction.EGRESS, "GET", "http", "api.internal", "/v1/items/1", {}), "d")
    import jwt

    token = dict(decision.headers_to_set)["authorization"].removeprefix("Bearer ")
    svid = runtime.snapshot.identity.state.svid  # type: ignore[union-attr]
    assert jwt.decode(token, options={"verify_signature": False})["cnf"] == {"x5t#S256": svid.x5t_s256}
    assert len(svid.x5t_s256) == 43 and time.time() < svid.not_after


# -- duplicate credentials, as a kind -------------------------------------------------------------------
@pytest.fixture(scope="module")
def planner_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Runtime, str, str, str]:
    """A runtime, the planner's mTLS certificate and JWT-SVID, and another workload's JWT-SVID."""
    runtime, cas = make(tmp_path_factory.mktemp("dup"))
    cert, _ = make_leaf(cas["test.example"], [PLANNER])
    token = cas["test.example"].issue_jwt(PLANNER, [AGENT])
    other = cas["test.example"].issue_jwt("spiffe://test.example/ns/x/sa/other", [AGENT])
    return runtime, url_pem(cert), token, other


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    others=st.lists(
        st.sampled_from(["planner-jwt", "other-jwt", "Basic cGxhbm5lcjpwdw==", "Bearer opaque", "Negotiate"]),
        min_size=1,
        max_size=3,
    ),
    scheme=st.sampled_from(["Bearer", "bearer", "BEARER", "BeArEr"]),
    separator=st.sampled_from([",", ", ", " , "]),
    first=st.booleans(),
    with_peer=st.booleans(),
)
def test_any_second_credential_beside_a_jwt_svid_is_refused(
    planner_env: tuple[Runtime, str, str, str],
    others: list[str],
    scheme: str,
    separator: str,
    first: bool,
    with_peer: bool,
) -> None:
    """Several Authorization headers reach the sidecar comma-joined, in any order and scheme casing: never
    a fallback to one of them or to the mTLS peer."""
    runtime, cert, token, other = planner_env
    names = {"planner-jwt": f"{scheme} {token}", "other-jwt": f"Bearer {other}"}
    values = [names.get(o, o) for o in others]
    values = [f"{scheme} {token}", *values] if first else [*values, f"{scheme} {token}"]
    decision = runtime.decide(ingress(cert=cert if with_peer else "", authorization=separator.join(values)), "d")
    assert (decision.allow, decision.reason) == (False, Reason.UNTRUSTED_IDENTITY)
    assert decision.detail.startswith("jwt_svid_duplicate")
    assert decision.peer == (PLANNER if with_peer else None)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scheme=st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR"]), padding=st.sampled_from(["", " ", "  "]))
def test_one_jwt_svid_in_any_scheme_casing_is_the_caller(
    planner_env: tuple[Runtime, str, str, str], scheme: str, padding: str
) -> None:
    runtime, cert, token, _ = planner_env
    decision = runtime.decide(ingress(cert=cert, authorization=f"{padding}{scheme} {token}{padding}"), "d")
    assert decision.allow and (decision.caller, decision.peer) == (PLANNER, PLANNER)
    assert "authorization" in decision.headers_to_remove


def test_an_authorization_for_the_app_is_left_alone(planner_env: tuple[Runtime, str, str, str]) -> None:
    """Not a JWT-SVID (the app's own credential): mTLS decides, and the header reaches the app."""
    runtime, cert, _, _ = planner_env
    for value in ("Basic cGxhbm5lcjpwdw==", "Bearer opaque-token", 'Digest username="a, b", realm="r"'):
        decision = runtime.decide(ingress(cert=cert, authorization=value), "d")
        assert decision.allow and decision.caller == PLANNER and decision.peer is None
        assert "authorization" not in decision.headers_to_remove


def test_reserved_headers_a_caller_sends_are_removed(planner_env: tuple[Runtime, str, str, str]) -> None:
    runtime, cert, _, _ = planner_env
    decision = runtime.decide(
        ingress(
            cert=cert, x_agent_authz_caller="spiffe://forged/x", x_agent_authz_decision_id="forged", x_agent_authz_x="1"
        ),
        "d",
    )
    assert decision.allow and dict(decision.headers_to_set)["x-agent-authz-caller"] == PLANNER
    assert {"x-agent-authz-x"} <= set(decision.headers_to_remove)
    assert "x-agent-authz-caller" not in decision.headers_to_remove  # set, not removed (Envoy removes after setting)
