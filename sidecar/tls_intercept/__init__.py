"""TLS interception: HTTPS the agent opens itself, for ``tls: intercept`` rules (docs/concepts/interception.md).

Not to be confused with :mod:`sidecar.redirect` (the iptables rules that send the agent's TCP to Envoy at all).
The user-facing names stay: the ``intercept:`` config section, ``tls: intercept`` rules.

* :mod:`sidecar.tls_intercept.ca` - the per-pod CA and the leaf certificates it mints.
* :mod:`sidecar.tls_intercept.targets` - which ``host:port`` pairs active tasks intercept, and when that changes.
* :mod:`sidecar.tls_intercept.sds` - the gRPC Secret Discovery Service handing the leaves to Envoy.
* :mod:`sidecar.tls_intercept.files` - the files of ``intercept.state_dir`` and ``publish_dir``, written atomically.
* :mod:`sidecar.tls_intercept.manager` - keeps Envoy in step with the policy, the clock and the leaves' lifetimes.
* :mod:`sidecar.tls_intercept.trust` - the agent container's bundle, volume and variables (for the webhook).
"""
