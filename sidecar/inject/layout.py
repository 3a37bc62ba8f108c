"""Where things live inside an injected pod: container names, volume names and mount paths.

The Helm chart writes the sidecar configuration with exactly these paths, and the webhook checks at
start that the configuration it injects agrees (:func:`sidecar.inject.settings.check_layout`).

====================================  =======================  ==========================================
path                                  volume                   content
====================================  =======================  ==========================================
``/etc/agent-authz/config/``          ConfigMap                ``sidecar.yaml``
``/etc/agent-authz/pod/``             downwardAPI              ``task``, ``revoked`` (pod annotations)
``/etc/agent-authz/keys/``            Secret                   ``signing.pem`` (token signing key)
``/run/agent-authz/``                 emptyDir (memory)        rendered ``envoy.json``
``/run/agent-authz/ctl/``             (the ``run`` emptyDir)   ``0700``, the proxy user's: the ext_authz/SDS
                                                               socket and Envoy's admin socket (both ``0600``)
``/var/log/agent-authz/``             emptyDir                 the decision log
``/var/lib/agent-authz/``             emptyDir                 the durable state (``state/state.db``, dir
                                                               ``0700``); only the sidecar mounts it
``/spiffe-workload-api/``             CSI (csi.spiffe.io)      the SPIRE agent socket
                                      or hostPath
``/etc/agent-authz/credentials/N/``  Secret (one each)       credential ``N``'s key (chart:
                                                               ``sidecar.credentials``); only the sidecar
                                                               mounts it
``/tmp/``  (init step only)           emptyDir (memory)        the xtables lock (read-only root filesystem)
``/run/agent-authz/intercept/``       (the ``run`` emptyDir)   with ``intercept``: the pod CA, Envoy's LDS/CDS
``/etc/agent-authz/trust/``           emptyDir                 with ``intercept``: ``ca.pem``, ``ca-bundle.pem``;
                                                               written by the sidecar, read-only in the
                                                               pod's own containers (with the variables of
                                                               :func:`sidecar.tls_intercept.trust.agent_trust_env`)
====================================  =======================  ==========================================
"""

from __future__ import annotations

from sidecar.tls_intercept.trust import AGENT_TRUST_DIR, TRUST_VOLUME

__all__ = [
    "ANNOTATION_INJECT",
    "ANNOTATION_REVOKED",
    "ANNOTATION_STATUS",
    "ANNOTATION_TASK",
    "AUTHZ_SOCKET",
    "CONFIG_DIR",
    "CONFIG_FILE",
    "CONTAINER_ENVOY",
    "CONTAINER_INIT",
    "CONTAINER_SIDECAR",
    "CREDENTIALS_DIR",
    "CTL_DIR",
    "ENVOY_ADMIN_SOCKET",
    "ENVOY_BOOTSTRAP",
    "INTERCEPT_STATE_DIR",
    "KEYS_DIR",
    "LOG_DIR",
    "NAMESPACE_LABEL",
    "POD_DIR",
    "RESERVED_PREFIX",
    "REVOKED_FILE",
    "RUN_DIR",
    "SIGNING_KEY_FILE",
    "STATE_DIR",
    "STATE_FILE",
    "STATUS_INJECTED",
    "TASK_FILE",
    "TMP_DIR",
    "TRUST_DIR",
    "VOLUME_CONFIG",
    "VOLUME_CREDENTIAL_PREFIX",
    "VOLUME_KEYS",
    "VOLUME_LOGS",
    "VOLUME_POD",
    "VOLUME_RUN",
    "VOLUME_STATE",
    "VOLUME_TMP",
    "VOLUME_TRUST",
    "VOLUME_WORKLOAD_API",
    "WORKLOAD_API_DIR",
]

NAMESPACE_LABEL = "agent-authz.io/inject"
"""Namespace label that opts a namespace in (value ``enabled``; the chart's namespaceSelector)."""
ANNOTATION_INJECT = "agent-authz.io/inject"
"""Pod annotation; ``"false"`` opts the pod out (when the chart allows it)."""
ANNOTATION_TASK = "agent-authz.io/task"
"""Pod annotation holding the task: a signed grant (compact JWS) or one task in YAML/JSON."""
ANNOTATION_REVOKED = "agent-authz.io/revoked"
"""Pod annotation; ``"true"`` revokes the task."""
ANNOTATION_STATUS = "agent-authz.io/status"
"""Set by the webhook on the pods it injected (value :data:`STATUS_INJECTED`)."""
STATUS_INJECTED = "injected"

RESERVED_PREFIX = "agent-authz"
"""Container and volume names starting with this belong to the injector."""
CONTAINER_INIT = "agent-authz-init"
CONTAINER_SIDECAR = "agent-authz"
CONTAINER_ENVOY = "agent-authz-envoy"

VOLUME_CONFIG = "agent-authz-config"
VOLUME_POD = "agent-authz-pod"
VOLUME_KEYS = "agent-authz-signing-key"
VOLUME_RUN = "agent-authz-run"
VOLUME_LOGS = "agent-authz-logs"
VOLUME_STATE = "agent-authz-state"
VOLUME_TMP = "agent-authz-tmp"
VOLUME_WORKLOAD_API = "agent-authz-workload-api"
VOLUME_TRUST = TRUST_VOLUME
VOLUME_CREDENTIAL_PREFIX = "agent-authz-credential-"
"""Credential ``i`` (in name order) is the Secret volume ``agent-authz-credential-<i>``."""

CONFIG_DIR = "/etc/agent-authz/config"
CONFIG_FILE = f"{CONFIG_DIR}/sidecar.yaml"
POD_DIR = "/etc/agent-authz/pod"
TASK_FILE = f"{POD_DIR}/task"
REVOKED_FILE = f"{POD_DIR}/revoked"
KEYS_DIR = "/etc/agent-authz/keys"
SIGNING_KEY_FILE = f"{KEYS_DIR}/signing.pem"
RUN_DIR = "/run/agent-authz"
ENVOY_BOOTSTRAP = f"{RUN_DIR}/envoy.json"
CTL_DIR = f"{RUN_DIR}/ctl"
"""The control sockets' directory (:data:`sidecar.config.schema.CONTROL_DIR`): created ``0700`` by the proxy user."""
AUTHZ_SOCKET = f"{CTL_DIR}/authz.sock"
"""``listen.authz``: the ext_authz gRPC service and SDS."""
ENVOY_ADMIN_SOCKET = f"{CTL_DIR}/envoy-admin.sock"
"""``envoy.admin_socket``: Envoy's admin interface."""
CREDENTIALS_DIR = "/etc/agent-authz/credentials"
"""Credential ``N`` from a Secret is mounted at ``CREDENTIALS_DIR/N/`` (sidecar container only)."""
LOG_DIR = "/var/log/agent-authz"
STATE_DIR = "/var/lib/agent-authz"
"""The state volume's mount point (an emptyDir: kept across container restarts, mode ``0777`` at its root)."""
STATE_FILE = f"{STATE_DIR}/state/state.db"
"""``state.path``: in a subdirectory the sidecar creates ``0700``, as the volume's root is open to all."""
WORKLOAD_API_DIR = "/spiffe-workload-api"
TMP_DIR = "/tmp"  # noqa: S108 - the init container's own emptyDir
INTERCEPT_STATE_DIR = f"{RUN_DIR}/intercept"
"""``intercept.state_dir``: in the ``run`` emptyDir, which the sidecar and Envoy share and the agent lacks."""
TRUST_DIR = AGENT_TRUST_DIR
"""``intercept.publish_dir``, and where the pod's own containers see the pod CA (read-only)."""
