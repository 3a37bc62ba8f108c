"""Workload identity: SPIFFE IDs, SVIDs and trust bundles."""

from sidecar.identity.spiffe_id import parse_spiffe_id

__all__ = ["parse_spiffe_id"]
