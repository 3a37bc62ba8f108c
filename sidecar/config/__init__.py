"""Configuration: schema, loading and hot reload of ``sidecar.yaml``."""

from sidecar.config.loader import LoadedConfig, load_config
from sidecar.config.schema import SidecarConfig

__all__ = ["LoadedConfig", "SidecarConfig", "load_config"]
