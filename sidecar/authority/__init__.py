"""The cluster authority (``agent-authz authority``): a token issuer upstreams can verify, and a revocation feed.

The authority is a stateless HTTPS service the Helm chart runs as a Deployment of two or more
replicas. It holds public keys only and keeps its state in the Kubernetes API:

* :mod:`~sidecar.authority.protocol` - the wire contract with the sidecars (paths, events, shapes).
* :mod:`~sidecar.authority.config` - ``authority.yaml``.
* :mod:`~sidecar.authority.kube` - a small Kubernetes API client (ConfigMaps: get, replace, watch).
* :mod:`~sidecar.authority.documents` - a ConfigMap as a conflict-safe document (read-modify-write
  with ``resourceVersion``, followed by a watch).
* :mod:`~sidecar.authority.revocations` - the revocation store: who may revoke what (the sidecars'
  own rules), persisted and fanned out.
* :mod:`~sidecar.authority.keys` - public keys announced by the sidecars, per namespace, and the
  JWKS and OpenID discovery documents built from them.
* :mod:`~sidecar.authority.peers` - the X.509-SVID of an mTLS client, and which namespace it is in.
* :mod:`~sidecar.authority.server` - the two HTTPS listeners and the process.
* :mod:`~sidecar.authority.client` - the sidecar's side: the feed stream, key announcements and
  forwarded revocations.
"""
