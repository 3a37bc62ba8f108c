"""Durable enforcement state: what a sidecar restart or crash must not forget (:mod:`sidecar.state.store`)."""

from sidecar.state.store import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, DelegatedChild, Remembered, StateStore

__all__ = ["APPLICATION_ID", "MIGRATIONS", "SCHEMA_VERSION", "DelegatedChild", "Remembered", "StateStore"]
