"""Envoy bootstrap rendering."""

from sidecar.bootstrap.render import render_bootstrap_json

__all__ = ["render_bootstrap_json"]
