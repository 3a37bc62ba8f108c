"""The admin HTTP server."""

from sidecar.admin.app import make_admin_app

__all__ = ["make_admin_app"]
