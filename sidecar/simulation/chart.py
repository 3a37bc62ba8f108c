"""The Helm chart as the cluster would get it: ``helm template`` of ``charts/agent-authz``, offline.

The chart is the source of every manifest the simulation uses (the webhook's settings and TLS, the
authority's Role, ConfigMaps and serving certificate, each agent namespace's sidecar ConfigMap and
signing key), so what runs here is what the chart installs. ``helm`` is the static binary
``scripts/install-k8s-tools.sh`` puts in ``.tools/bin`` (or one on ``PATH``); no cluster is
contacted. Needs a checkout of the repository (the chart is not in the wheel).
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

import sidecar
from sidecar.errors import AgentAuthzError, ErrorCode

__all__ = ["CHART", "KUBE_VERSION", "ChartError", "find", "helm_binary", "helm_template", "secret_data"]

REPO = Path(sidecar.__file__).resolve().parent.parent
CHART = REPO / "charts" / "agent-authz"
TOOLS = REPO / ".tools" / "bin"
KUBE_VERSION = "1.35.0"
"""The Kubernetes version the chart is rendered for (``--kube-version``)."""


class ChartError(AgentAuthzError):
    """The chart cannot be rendered here: no chart directory, no ``helm``, or ``helm`` failed."""

    code = ErrorCode.USAGE


def helm_binary() -> Path:
    """``.tools/bin/helm`` or ``helm`` on ``PATH``.

    Raises:
        ChartError: neither exists (run ``scripts/install-k8s-tools.sh``).
    """
    if (TOOLS / "helm").exists():
        return TOOLS / "helm"
    found = shutil.which("helm")
    if found is None:
        raise ChartError("helm is not installed: run scripts/install-k8s-tools.sh (it puts helm in .tools/bin)")
    return Path(found)


def helm_template(
    *set_values: str,
    values: dict[str, Any] | None = None,
    namespace: str = "agent-authz",
    release: str = "aa",
    helm: Path | None = None,
) -> list[dict[str, Any]]:
    """``helm template`` the chart (its tests included) and return the manifests.

    Args:
        set_values: ``--set`` expressions.
        values: a values document (written to a temporary file for ``-f``).
        namespace: the release namespace.
        release: the release name.
        helm: the helm binary (default :func:`helm_binary`).

    Raises:
        ChartError: no chart here, no helm, or helm refused the values (its message).
    """
    if not (CHART / "Chart.yaml").exists():
        raise ChartError(f"no chart at {CHART} (the cluster simulation needs a checkout of the repository)")
    args = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION]
    for item in set_values:
        args += ["--set", item]
    with tempfile.TemporaryDirectory(prefix="aa-values-") as tmp:
        if values is not None:
            path = Path(tmp) / "values.yaml"
            path.write_text(yaml.safe_dump(values))
            args += ["-f", str(path)]
        result = subprocess.run(
            [str(helm or helm_binary()), *args], capture_output=True, text=True, timeout=120, check=False
        )
    if result.returncode != 0:
        raise ChartError(f"helm template failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(manifests: list[dict[str, Any]], kind: str, name_suffix: str = "") -> list[dict[str, Any]]:
    """The manifests of ``kind`` whose name ends with ``name_suffix``."""
    return [m for m in manifests if m["kind"] == kind and m["metadata"]["name"].endswith(name_suffix)]


def secret_data(secret: dict[str, Any], key: str) -> bytes:
    """A Secret's ``data[key]``, decoded."""
    return base64.b64decode(secret["data"][key])
