"""The Envoy edge: ext_authz gRPC service and protobuf translation."""

from sidecar.envoy_authz.service import AuthorizationService
from sidecar.envoy_authz.translate import build_check_response, parse_check_request

__all__ = ["AuthorizationService", "build_check_response", "parse_check_request"]
