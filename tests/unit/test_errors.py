"""One error root, stable codes: every exception class of the package, and the values never renamed."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import sidecar
from sidecar.agentproto.jsonrpc import BodyProblem
from sidecar.agentproto.rules import Refusal
from sidecar.authority.protocol import AuthorityCode
from sidecar.control.documents import ControlCode
from sidecar.errors import AgentAuthzError, BundleDetail, ErrorCode, SvidDetail
from sidecar.grants.model import GrantCode
from sidecar.inject.podspec import AdmissionOutcome


def _exception_classes() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(sidecar.__path__, "sidecar."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == module.__name__:
                found.append(value)
    return found


def test_every_error_of_the_package_has_the_one_root_and_a_code() -> None:
    classes = _exception_classes()
    names = {cls.__name__ for cls in classes}
    assert {"InjectionDenied", "BadReview", "CheckFailed", "KeyMismatchError", "GrantError", "BodyError"} <= names
    assert {"AuthorityError", "KubeApiError", "FeedError"} <= names
    for cls in classes:
        assert issubclass(cls, AgentAuthzError), cls
        assert isinstance(cls.code, ErrorCode), cls  # type: ignore[attr-defined]


def test_key_mismatch_is_still_a_value_error() -> None:
    from sidecar.identity.state import KeyMismatchError

    assert issubclass(KeyMismatchError, ValueError)  # for callers that catch ValueError


# Never rename: dashboards, alerts and clients key on these strings. A new member is fine - add it here.
NEVER_RENAMED = {
    ErrorCode: {
        "internal",
        "config_invalid",
        "key_invalid",
        "invalid_spiffe_id",
        "bad_request",
        "envoy_not_found",
        "untrusted_identity",
        "key_mismatch",
        "identity_unavailable",
        "identity_invalid",
        "bundle_invalid",
        "decision_log_unavailable",
        "grant_invalid",
        "netfilter_invalid",
        "usage",
        "annotation_invalid",
        "injection_denied",
        "bad_review",
        "webhook_check_failed",
        "not_authorized",
        "response_unfilterable",
        "state_unavailable",
        "control_refused",
        "kubernetes_api",
        "authority_refused",
        "authority_unavailable",
    },
    SvidDetail: {
        "svid_malformed",
        "svid_no_uri_san",
        "svid_multiple_uri_sans",
        "svid_invalid_spiffe_id",
        "svid_leaf_is_ca",
        "svid_bad_key_usage",
        "svid_unknown_trust_domain",
        "svid_not_yet_valid",
        "svid_expired",
        "svid_chain_invalid",
        "svid_no_basic_constraints",
        "svid_signer_not_ca",
        "svid_signer_bad_key_usage",
        "svid_bad_private_key",
        "svid_key_mismatch",
        "svid_spiffe_id_changed",
        "identity_file_unreadable",
        "jwt_svid_malformed",
        "jwt_svid_bad_header",
        "jwt_svid_bad_algorithm",
        "jwt_svid_missing_claim",
        "jwt_svid_invalid_subject",
        "jwt_svid_unknown_trust_domain",
        "jwt_svid_unknown_key",
        "jwt_svid_bad_signature",
        "jwt_svid_expired",
        "jwt_svid_bad_audience",
        "jwt_svid_not_yet_valid",
        "jwt_svid_issued_in_future",
        "jwt_svid_lifetime_too_long",
        "jwt_svid_duplicate",
        "jwt_svid_peer_mismatch",
    },
    BundleDetail: {
        "bundle_malformed",
        "bundle_empty",
        "bundle_missing_keys",
        "bundle_missing_kid",
        "bundle_bad_key",
        "bundle_bad_x509_entry",
    },
    GrantCode: {
        "grant_bad_header",
        "grant_bad_signature",
        "grant_broken_chain",
        "grant_duplicate",
        "grant_expired",
        "grant_malformed",
        "grant_not_delegable",
        "grant_not_root_issuer",
        "grant_rejected",
        "grant_too_deep",
        "grant_unknown_credential",
        "grant_unknown_task",
        "grant_untrusted_signer",
        "grant_widening",
        "grant_wrong_signer",
        "grant_wrong_subject",
    },
    ControlCode: {
        "control_malformed",
        "control_untrusted_signer",
        "control_not_authorized",
        "control_expired",
        "control_wrong_audience",
        "control_unknown_approval",
        "control_approval_closed",
    },
    AuthorityCode: {
        "bad_request",
        "no_client_certificate",
        "peer_not_allowed",
        "not_authorized",
        "signer_not_peer",
        "not_root",
        "key_proof_invalid",
        "key_private",
        "unknown_namespace",
    },
    BodyProblem: {
        "too_large",
        "content_encoding",
        "content_type",
        "not_utf8",
        "bom",
        "lone_surrogate",
        "invalid_json",
        "duplicate_key",
        "too_deep",
        "batch",
        "not_jsonrpc",
    },
    Refusal: {
        "mcp_header_mismatch",
        "mcp_ambiguous_body",
        "mcp_invalid_body",
        "mcp_body_too_large",
        "mcp_body_unavailable",
        "tool_not_allowed",
        "argument_not_allowed",
        "resource_not_allowed",
        "prompt_not_allowed",
        "rpc_method_not_allowed",
    },
    AdmissionOutcome: {
        "injected",
        "already_injected",
        "opted_out",
        "validated",
        "unchanged",
        "not_injected",
        "ignored",
        "denied",
        "unanswerable",
    },
}


def test_sub_codes_are_never_renamed() -> None:
    for enum_type, values in NEVER_RENAMED.items():
        assert values <= {member.value for member in enum_type}, enum_type  # type: ignore[attr-defined]
        assert {member.value for member in enum_type} == values, f"{enum_type}: add new members to NEVER_RENAMED"  # type: ignore[attr-defined]
