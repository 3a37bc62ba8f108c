"""HTTPS the agent opens itself, for ``tls: intercept`` rules (see the README, "Intercepting HTTPS").

* :mod:`sidecar.intercept.ca` - the per-pod CA and the leaf certificates it mints.
* :mod:`sidecar.intercept.targets` - which ``host:port`` pairs active tasks intercept, and when that changes.
* :mod:`sidecar.intercept.sds` - the gRPC Secret Discovery Service handing the leaves to Envoy.
* :mod:`sidecar.intercept.files` - the files of ``intercept.state_dir`` and ``publish_dir``, written atomically.
* :mod:`sidecar.intercept.manager` - keeps Envoy in step with the policy, the clock and the leaves' lifetimes.
* :mod:`sidecar.intercept.trust` - the agent container's bundle, volume and variables (for the webhook).
"""
