"""Traffic redirection: the iptables rules that send the agent's TCP through Envoy (``agent-authz iptables``).

Not to be confused with :mod:`sidecar.tls_intercept` (terminating the agent's TLS with a pod-CA
certificate): this package only decides which packets reach Envoy's listeners.

:mod:`sidecar.redirect.rules` builds the rule set as ``iptables-restore`` text (pure functions);
:mod:`sidecar.redirect.apply` installs and removes it atomically.
"""

from sidecar.redirect.rules import CHAIN_PREFIX, Ipv6Mode, RedirectSpec, render_rules

__all__ = ["CHAIN_PREFIX", "Ipv6Mode", "RedirectSpec", "render_rules"]
