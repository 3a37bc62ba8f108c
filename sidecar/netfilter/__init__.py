"""Transparent interception: the iptables rules that send the agent's traffic through Envoy.

:mod:`sidecar.netfilter.rules` builds the rule set as ``iptables-restore`` text (pure functions);
:mod:`sidecar.netfilter.apply` installs and removes it atomically.
"""

from sidecar.netfilter.rules import CHAIN_PREFIX, InterceptSpec, Ipv6Mode, render_rules

__all__ = ["CHAIN_PREFIX", "InterceptSpec", "Ipv6Mode", "render_rules"]
