"""The redirection rule set (transparent interception), as ``iptables-restore`` text. Pure functions: no I/O, no root.

What the rules do (IPv4, and IPv6 with ``--ipv6 same``), in the pod's network namespace:

``nat`` table
  * ``OUTPUT -p udp --dport 53`` and ``OUTPUT -p tcp --dport 53`` jump to ``AGENT_AUTHZ_DNS``
    first: the proxy UID and GID ``RETURN`` (the sidecar asks the pod's resolvers itself, Envoy
    resolves upstreams), everything else - to *any* address, loopback and excluded CIDRs included -
    is ``REDIRECT --to-ports <dns port>``, the sidecar's DNS proxy. Excluding port 53
    (``exclude_outbound_ports``) leaves DNS alone instead (an open channel: documented as such).
  * ``OUTPUT -p tcp -j AGENT_AUTHZ_OUTPUT``; in that chain, in order: the proxy UID and GID
    (Envoy and the sidecar) ``RETURN`` - their own upstream connections are never redirected, so
    nothing loops; traffic leaving through ``lo`` and to loopback addresses ``RETURN`` (the agent's
    own local services, and Envoy's inbound forwarding to the local app); the excluded CIDRs and
    ports ``RETURN``; everything else jumps to ``AGENT_AUTHZ_REDIRECT`` = ``REDIRECT --to-ports
    <outbound port>``.
  * ``PREROUTING -p tcp -j AGENT_AUTHZ_INBOUND``; in that chain the excluded inbound ports
    (health probes) ``RETURN`` first, then all ports (or the listed ones) jump to
    ``AGENT_AUTHZ_IN_REDIRECT`` = ``REDIRECT --to-ports <inbound port>``.

``filter`` table
  * ``OUTPUT -p tcp -j AGENT_AUTHZ_GUARD`` first, for every mode: the proxy's ports answer for the
    proxy only. The proxy UID and GID ``RETURN``; then a packet *from* one of the proxy's listening
    ports (outbound, inbound and ``proxy_ports``: egress, probe, admin) sent by a socket of any
    other UID is dropped - a process that binds a port the proxy freed (Envoy or the sidecar died)
    gets the redirected connections' SYNs, but its SYN-ACKs never leave, so neither another
    container's request, nor an outside caller, nor the agent's own traffic reaches it (a SYN-ACK
    is attributed to its listener's owner; packets of kernel sockets - resets for closed ports -
    carry no UID and pass); and a connection *to* the outbound or inbound port over ``lo`` that was
    not redirected there (``conntrack ! --ctstate DNAT``) is reset: those listeners are reached
    through ``REDIRECT`` only. The DNS proxy's port is guarded the same way, for UDP as well
    (``OUTPUT -p udp --sport <dns port> -j AGENT_AUTHZ_GUARD``): a squatter's answers never leave.
  * ``OUTPUT -j AGENT_AUTHZ_FILTER``: what the ``nat`` rules cannot send to Envoy or the DNS proxy
    is dropped when a non-proxy process sends it off the pod: UDP (QUIC, and DNS that was not
    redirected), ICMP, SCTP, ... (TCP and loopback pass, and a query ``nat`` redirected to the DNS
    proxy: ``-d 127.0.0.1 --dport <dns port>``, as the hook still sees the interface it was first
    routed to; excluded CIDRs and ports pass). ``allow_non_tcp`` turns this table's rules off.

IPv6 with ``--ipv6 block``: no ``nat`` rules; ``filter`` drops every IPv6 packet coming in and
rejects every one going out (so connects fail at once) that is not on ``lo``
(``AGENT_AUTHZ_BLOCK_IN``/``AGENT_AUTHZ_BLOCK_OUT``), for every UID.

Installation is a read-modify-write of whole tables (:func:`merge_table`): the current table from
``iptables-save``, minus every ``AGENT_AUTHZ_*`` chain and every jump to one, plus the new rule
set, handed to ``iptables-restore`` in one call. Running it twice leaves one copy; other rules in
the tables are kept; our jumps come first in the built-in chains.

Modelled on Istio's ``istio-iptables`` (``ISTIO_OUTPUT``, ``ISTIO_REDIRECT``, ``ISTIO_INBOUND``,
``ISTIO_IN_REDIRECT``); see iptables-extensions(8) ``REDIRECT`` and ``owner``.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from sidecar.errors import AgentAuthzError, ErrorCode

__all__ = [
    "CHAIN_PREFIX",
    "GUARD_CHAIN",
    "Ipv6Mode",
    "RedirectError",
    "RedirectSpec",
    "RuleSet",
    "TableRules",
    "merge_table",
    "parse_cidrs",
    "parse_id",
    "parse_inbound_ports",
    "parse_port",
    "parse_ports",
    "render_rules",
    "restore_text",
]

CHAIN_PREFIX = "AGENT_AUTHZ_"
OUTPUT_CHAIN = "AGENT_AUTHZ_OUTPUT"
REDIRECT_CHAIN = "AGENT_AUTHZ_REDIRECT"
INBOUND_CHAIN = "AGENT_AUTHZ_INBOUND"
IN_REDIRECT_CHAIN = "AGENT_AUTHZ_IN_REDIRECT"
DNS_CHAIN = "AGENT_AUTHZ_DNS"
FILTER_CHAIN = "AGENT_AUTHZ_FILTER"
GUARD_CHAIN = "AGENT_AUTHZ_GUARD"
BLOCK_IN_CHAIN = "AGENT_AUTHZ_BLOCK_IN"
BLOCK_OUT_CHAIN = "AGENT_AUTHZ_BLOCK_OUT"
DNS_PORT = 53
_MAX_ID = 2**32 - 2  # (uid_t)-1 is "no user"
_MULTIPORT_MAX = 15  # ports per ``-m multiport`` rule
_OURS = re.compile(r"(^[:]" + CHAIN_PREFIX + r")|(^-[AI] " + CHAIN_PREFIX + r")|(\s-[jg] " + CHAIN_PREFIX + r")")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RedirectError(AgentAuthzError):
    """Bad redirection options, or a failure to install or remove the rules."""

    code = ErrorCode.NETFILTER_INVALID


class Ipv6Mode(enum.StrEnum):
    """What happens to IPv6: the same interception as IPv4, or blocked (except loopback)."""

    SAME = "same"
    BLOCK = "block"


def parse_port(text: str, what: str) -> int:
    """A TCP port 1-65535 from ``text``.

    Raises:
        RedirectError: not a number, or out of range; the message names ``what``.
    """
    value = text.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 5:
        raise RedirectError(f"{what}: {text!r} is not a port number")
    port = int(value)
    if not 1 <= port <= 65535:
        raise RedirectError(f"{what}: port {port} is out of range (1-65535)")
    return port


def parse_ports(text: str, what: str) -> tuple[int, ...]:
    """A comma-separated list of ports (``""`` = none), sorted and de-duplicated.

    Raises:
        RedirectError: one item is not a port.
    """
    items = [item for item in (part.strip() for part in text.split(",")) if item]
    return tuple(sorted({parse_port(item, what) for item in items}))


def parse_inbound_ports(text: str) -> tuple[int, ...] | None:
    """``*`` = every port (``None``), ``""`` = none, else a list of ports."""
    if text.strip() == "*":
        return None
    return parse_ports(text, "--inbound-ports")


def parse_cidrs(text: str, what: str = "--exclude-outbound-cidrs") -> tuple[Network, ...]:
    """A comma-separated list of IPv4/IPv6 CIDRs (a bare address is a /32 or /128).

    Raises:
        RedirectError: malformed, or host bits set (``10.1.2.3/8``: did you mean ``10.0.0.0/8``?).
    """
    out: list[Network] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f" (did you mean {ipaddress.ip_network(item, strict=False)}?)"
            raise RedirectError(f"{what}: {item!r} is not a CIDR: {exc}{hint}") from None
    return tuple(out)


def parse_id(text: str, what: str) -> int:
    """A numeric UID or GID.

    Raises:
        RedirectError: not a number or out of range.
    """
    value = text.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 10 or int(value) > _MAX_ID:
        raise RedirectError(f"{what}: {text!r} is not a numeric id (0-{_MAX_ID})")
    return int(value)


@dataclass(frozen=True, slots=True)
class RedirectSpec:
    """Which traffic to redirect to Envoy. Defaults match Istio's and the rendered Envoy listeners.

    Attributes:
        outbound_port: Envoy's ``outbound`` listener (``envoy.outbound_port``), 1-65535.
        inbound_port: Envoy's inbound listener (``envoy.ingress_port``), 1-65535.
        proxy_uid / proxy_gid: Envoy and the sidecar run as these; their traffic is never redirected.
        proxy_ports: the proxy's other TCP listening ports (Envoy's egress listener, the probe and
            admin servers): like the outbound and inbound ports, only the proxy may answer from them.
        dns_port: the sidecar's DNS proxy (``dns.listen``), UDP and TCP: the agent's DNS (port 53,
            any address) is redirected there, unless port 53 is in ``exclude_outbound_ports``.
        inbound_ports: ports whose inbound connections go to Envoy; ``None`` = all, ``()`` = none.
        exclude_inbound_ports: inbound ports that reach the app directly (health probes).
        exclude_outbound_cidrs: destinations reached directly (IPv4 ones in the IPv4 rules,
            IPv6 ones in the IPv6 rules).
        exclude_outbound_ports: destination ports reached directly (TCP and UDP).
        ipv6: :class:`Ipv6Mode`.
        allow_non_tcp: do not drop outbound UDP (other than DNS), ICMP, ... of non-proxy processes.

    Raises:
        RedirectError: a port out of range, an id out of range, both listener ports equal, or more
            than 15 proxy ports in all.
    """

    outbound_port: int = 15001
    inbound_port: int = 15006
    proxy_uid: int = 1337
    proxy_gid: int = 1337
    proxy_ports: tuple[int, ...] = ()
    dns_port: int = 15053
    inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[Network, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    ipv6: Ipv6Mode = Ipv6Mode.BLOCK
    allow_non_tcp: bool = False

    def __post_init__(self) -> None:
        ports = [("outbound port", self.outbound_port), ("inbound port", self.inbound_port)]
        ports += [("dns port", self.dns_port)]
        ports += [("inbound ports", p) for p in self.inbound_ports or ()]
        ports += [("proxy ports", p) for p in self.proxy_ports]
        ports += [("excluded inbound ports", p) for p in self.exclude_inbound_ports]
        ports += [("excluded outbound ports", p) for p in self.exclude_outbound_ports]
        for what, port in ports:
            if not 1 <= port <= 65535:
                raise RedirectError(f"{what}: port {port} is out of range (1-65535)")
        for what, ident in (("proxy uid", self.proxy_uid), ("proxy gid", self.proxy_gid)):
            if not 0 <= ident <= _MAX_ID:
                raise RedirectError(f"{what}: {ident} is out of range (0-{_MAX_ID})")
        if len({self.outbound_port, self.inbound_port, self.dns_port}) < 3:
            raise RedirectError("the outbound, inbound and DNS ports must differ")
        if len(self.guarded_ports) > _MULTIPORT_MAX:
            raise RedirectError(f"at most {_MULTIPORT_MAX} proxy ports in all (outbound, inbound and --proxy-ports)")

    @property
    def redirects_dns(self) -> bool:
        """Whether the agent's DNS goes to the DNS proxy (port 53 is not excluded)."""
        return DNS_PORT not in self.exclude_outbound_ports

    @property
    def guarded_ports(self) -> tuple[int, ...]:
        """Every TCP port the proxy listens on: only the proxy UID may answer from them."""
        dns = (self.dns_port,) if self.redirects_dns else ()
        return tuple(sorted({self.outbound_port, self.inbound_port, *dns, *self.proxy_ports}))


@dataclass(frozen=True, slots=True)
class TableRules:
    """Our part of one table.

    Attributes:
        table: ``nat`` or ``filter``.
        chains: our chains, declared (and so flushed) on every install.
        jumps: ``-A <BUILTIN> ... -j AGENT_AUTHZ_*`` rules, placed before other rules of the chain.
        rules: the rules of our chains.
    """

    table: str
    chains: tuple[str, ...]
    jumps: tuple[str, ...]
    rules: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The rules for each address family; a table absent from a family is cleaned of our chains."""

    ipv4: tuple[TableRules, ...]
    ipv6: tuple[TableRules, ...]


def _nat(spec: RedirectSpec, family: int) -> TableRules:
    loopback = "127.0.0.0/8" if family == 4 else "::1/128"
    out = f"-A {OUTPUT_CHAIN}"
    rules = [
        f"-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {spec.outbound_port}",
        f"-A {IN_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {spec.inbound_port}",
        f"{out} -m owner --uid-owner {spec.proxy_uid} -j RETURN",
        f"{out} -m owner --gid-owner {spec.proxy_gid} -j RETURN",
        f"{out} -o lo -j RETURN",
        f"{out} -d {loopback} -j RETURN",
    ]
    rules += [f"{out} -d {net} -j RETURN" for net in spec.exclude_outbound_cidrs if net.version == family]
    rules += [f"{out} -p tcp --dport {port} -j RETURN" for port in spec.exclude_outbound_ports]
    rules.append(f"{out} -j {REDIRECT_CHAIN}")
    rules += [f"-A {INBOUND_CHAIN} -p tcp --dport {port} -j RETURN" for port in spec.exclude_inbound_ports]
    if spec.inbound_ports is None:
        rules.append(f"-A {INBOUND_CHAIN} -p tcp -j {IN_REDIRECT_CHAIN}")
    else:
        rules += [f"-A {INBOUND_CHAIN} -p tcp --dport {port} -j {IN_REDIRECT_CHAIN}" for port in spec.inbound_ports]
    jumps = [f"-A OUTPUT -p tcp -j {OUTPUT_CHAIN}"]
    chains: tuple[str, ...] = (INBOUND_CHAIN, IN_REDIRECT_CHAIN, OUTPUT_CHAIN, REDIRECT_CHAIN)
    if spec.redirects_dns:
        d = f"-A {DNS_CHAIN}"
        rules += [
            f"{d} -m owner --uid-owner {spec.proxy_uid} -j RETURN",
            f"{d} -m owner --gid-owner {spec.proxy_gid} -j RETURN",
            f"{d} -p udp -j REDIRECT --to-ports {spec.dns_port}",
            f"{d} -p tcp -j REDIRECT --to-ports {spec.dns_port}",
        ]
        jumps[:0] = [f"-A OUTPUT -p {proto} --dport {DNS_PORT} -j {DNS_CHAIN}" for proto in ("udp", "tcp")]
        chains = (*chains, DNS_CHAIN)
    if spec.inbound_ports != ():
        jumps.insert(0, f"-A PREROUTING -p tcp -j {INBOUND_CHAIN}")
    return TableRules("nat", chains, tuple(jumps), tuple(rules))


def _other_uids(proxy_uid: int) -> list[str]:
    """``--uid-owner`` ranges of every UID but the proxy's (a range matches only sockets with a UID)."""
    ranges = []
    if proxy_uid > 0:
        ranges.append(f"0-{proxy_uid - 1}")
    if proxy_uid < _MAX_ID:
        ranges.append(f"{proxy_uid + 1}-{_MAX_ID}")
    return ranges


def _guard(spec: RedirectSpec) -> TableRules:
    g = f"-A {GUARD_CHAIN}"
    ports = ",".join(map(str, spec.guarded_ports))
    listeners = ",".join(map(str, sorted({spec.outbound_port, spec.inbound_port})))
    rules = [
        f"{g} -m owner --uid-owner {spec.proxy_uid} -j RETURN",
        f"{g} -m owner --gid-owner {spec.proxy_gid} -j RETURN",
    ]
    rules += [
        f"{g} -p tcp -m multiport --sports {ports} -m owner --uid-owner {uids} -j DROP"
        for uids in _other_uids(spec.proxy_uid)
    ]
    rules.append(
        f"{g} -o lo -p tcp -m multiport --dports {listeners} -m conntrack ! --ctstate DNAT "
        "-j REJECT --reject-with tcp-reset"
    )
    jumps = [f"-A OUTPUT -p tcp -j {GUARD_CHAIN}"]
    if spec.redirects_dns:  # the DNS proxy answers over UDP too: a squatter's answers never leave
        rules += [
            f"{g} -p udp --sport {spec.dns_port} -m owner --uid-owner {uids} -j DROP"
            for uids in _other_uids(spec.proxy_uid)
        ]
        jumps.append(f"-A OUTPUT -p udp --sport {spec.dns_port} -j {GUARD_CHAIN}")
    return TableRules("filter", (GUARD_CHAIN,), tuple(jumps), tuple(rules))


def _joined(*parts: TableRules) -> TableRules:
    """One table's rules from several parts (jumps in the order given)."""
    return TableRules(
        parts[0].table,
        tuple(chain for part in parts for chain in part.chains),
        tuple(jump for part in parts for jump in part.jumps),
        tuple(rule for part in parts for rule in part.rules),
    )


def _filter(spec: RedirectSpec, family: int) -> TableRules:
    f = f"-A {FILTER_CHAIN}"
    rules = [
        f"{f} -o lo -j RETURN",
        f"{f} -m owner --uid-owner {spec.proxy_uid} -j RETURN",
        f"{f} -m owner --gid-owner {spec.proxy_gid} -j RETURN",
        f"{f} -p tcp -j RETURN",
    ]
    if spec.redirects_dns:
        # a redirected query: its destination is now the DNS proxy on loopback, but every chain of the
        # OUTPUT hook still sees the interface it was routed to before ``nat`` (``-o lo`` misses it)
        loopback = "127.0.0.1/32" if family == 4 else "::1/128"
        rules.append(f"{f} -p udp -d {loopback} --dport {spec.dns_port} -j RETURN")
    rules += [f"{f} -d {net} -j RETURN" for net in spec.exclude_outbound_cidrs if net.version == family]
    rules += [f"{f} -p udp --dport {port} -j RETURN" for port in spec.exclude_outbound_ports]
    rules.append(f"{f} -j DROP")
    return TableRules("filter", (FILTER_CHAIN,), (f"-A OUTPUT -j {FILTER_CHAIN}",), tuple(rules))


def _block6() -> TableRules:
    rules = (
        f"-A {BLOCK_IN_CHAIN} -i lo -j RETURN",
        f"-A {BLOCK_IN_CHAIN} -j DROP",
        f"-A {BLOCK_OUT_CHAIN} -o lo -j RETURN",
        f"-A {BLOCK_OUT_CHAIN} -j REJECT --reject-with icmp6-adm-prohibited",
    )
    jumps = (f"-A INPUT -j {BLOCK_IN_CHAIN}", f"-A OUTPUT -j {BLOCK_OUT_CHAIN}")
    return TableRules("filter", (BLOCK_IN_CHAIN, BLOCK_OUT_CHAIN), jumps, rules)


def render_rules(spec: RedirectSpec) -> RuleSet:
    """The rule set for ``spec`` (see the module docstring for what each rule does)."""
    guard = _guard(spec)
    ipv4 = [_nat(spec, 4), guard if spec.allow_non_tcp else _joined(guard, _filter(spec, 4))]
    if spec.ipv6 is Ipv6Mode.BLOCK:
        ipv6 = [_joined(guard, _block6())]
    else:
        ipv6 = [_nat(spec, 6), guard if spec.allow_non_tcp else _joined(guard, _filter(spec, 6))]
    return RuleSet(tuple(ipv4), tuple(ipv6))


def restore_text(tables: Iterable[TableRules]) -> str:
    """Our rules alone, as ``iptables-restore`` input (what ``--dry-run`` prints)."""
    out: list[str] = []
    for rules in tables:
        out.append(f"*{rules.table}")
        out += [f":{chain} - [0:0]" for chain in rules.chains]
        out += [*rules.jumps, *rules.rules, "COMMIT"]
    return "\n".join(out) + "\n"


def _section(saved: str, table: str) -> list[str]:
    lines: list[str] = []
    inside = False
    for line in saved.splitlines():
        if line == f"*{table}":
            inside = True
            continue
        if inside and line == "COMMIT":
            break
        if inside and line and not line.startswith("#"):
            lines.append(line)
    return lines


def merge_table(saved: str, table: str, ours: TableRules | None) -> str:
    """One table's ``iptables-restore`` input: ``saved`` without our chains, plus ``ours``.

    Args:
        saved: ``iptables-save -t <table>`` output (may be empty).
        table: the table name.
        ours: our rules for this table, or ``None`` to remove ours (cleanup).

    Returns:
        A complete ``*table ... COMMIT`` section: it replaces the whole table atomically.
        Other chains and rules are kept in order; our jumps come first in the built-in chains.
    """
    kept = [line for line in _section(saved, table) if not _OURS.search(line)]
    declarations = [line for line in kept if line.startswith(":")]
    rules = [line for line in kept if not line.startswith(":")]
    out = [f"*{table}", *declarations]
    if ours is not None:
        out += [f":{chain} - [0:0]" for chain in ours.chains]
        out += ours.jumps
    out += rules
    if ours is not None:
        out += ours.rules
    out.append("COMMIT")
    return "\n".join(out) + "\n"
